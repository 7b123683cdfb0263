"""Reading an image file as the 8-bit greyscale or RGB image a model's preprocessing expects.

PIL's own ``Image.convert("L")`` / ``("RGB")`` clips deeper modes to 0..255: a 16-bit
greyscale PNG (mode ``I;16``, or ``I``) comes out near-white and a float image (``F``)
in 0..1 near-black.  :func:`load_image` maps those modes to 8 bits by their actual range
instead, and converts every other mode (``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``,
``RGBA``, ``CMYK``, ``YCbCr``, ...) with PIL, as timm's data pipeline does (alpha is
dropped); a mode PIL cannot convert is refused with a ``ValueError`` naming it.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

MODES = {1: "L", 3: "RGB"}
"""The PIL mode an image is read in, by the model's input channels."""


def is_high_depth(mode: str) -> bool:
    """Whether PIL's ``convert`` would clip the mode's values to 0..255 (16/32-bit integer, float)."""
    return mode in ("I", "F") or mode.startswith("I;16")


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float single-channel image as 8-bit greyscale (mode ``L``), by its range.

    Values are scaled linearly from ``min(0, lowest)`` to the highest value onto 0..255: black stays
    black, the brightest pixel becomes white (a 0..65535 image is divided by 257; a 12-bit image in
    a 16-bit file uses the full range; a float image in 0..1 is multiplied by 255).  Non-finite
    values become black; an image of zeros stays black.
    """
    a = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(a)
    out = np.zeros(a.shape, dtype=np.uint8)
    if finite.any():
        lo, hi = min(0.0, float(a[finite].min())), float(a[finite].max())
        if hi > lo:
            scaled = np.where(finite, (a - lo) * (255.0 / (hi - lo)), 0.0)
            out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def load_image(path: str | os.PathLike, channels: int) -> Image.Image:
    """The image at ``path`` as an 8-bit image of ``channels`` channels (1: mode ``L``, 3: ``RGB``).

    Raises:
        ValueError: ``channels`` is not 1 or 3, or PIL cannot convert the image's mode.
        OSError: the file cannot be read as an image (PIL's ``UnidentifiedImageError`` is one).
    """
    if channels not in MODES:
        raise ValueError(f"images are read as greyscale (1 channel) or RGB (3 channels), not {channels} channels")
    target = MODES[channels]
    with Image.open(path) as img:
        img.load()
        source = img.mode
        if is_high_depth(source):
            img = to_8bit(img)
        try:
            return img.convert(target)
        except ValueError as err:
            raise ValueError(f"{path}: cannot convert a {source!r} image to {target!r} ({err})") from None
