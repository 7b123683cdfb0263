"""A segmentation data set in the ADE20k layout: ``ROOT/images/<name>.<ext>`` with
``ROOT/annotations/<name>.png`` class-index maps (255 = ignore).

Images are read in the mode the model takes (``L`` for one channel, ``RGB`` for three), resized to
the model's input size and normalised with its mean and std; the annotation keeps its own size
(predictions are upsampled to it).  A pair that cannot be read is skipped and reported; a missing
annotation, an annotation whose size differs from its image's, or a label outside the classes is an
error that names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .mosaic import IGNORE_INDEX

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def find_pairs(root: str | Path) -> list[tuple[Path, Path]]:
    """``(image, annotation)`` paths of an ADE20k-layout folder, sorted by name.

    Raises:
        FileNotFoundError: ``root``, ``images/`` or ``annotations/`` is missing, or an image has no annotation.
        ValueError: no images.
    """
    root = Path(root)
    images_dir, labels_dir = root / "images", root / "annotations"
    for folder in (root, images_dir, labels_dir):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is not a folder: a segmentation set needs ROOT/images/<name>.<ext> and "
                "ROOT/annotations/<name>.png (class-index PNGs, 255 = ignore)"
            )
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"no images in {images_dir} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    pairs = []
    for image in images:
        label = labels_dir / f"{image.stem}.png"
        if not label.is_file():
            raise FileNotFoundError(f"{image.name} has no annotation {label}")
        pairs.append((image, label))
    return pairs


def read_pair(image_path: Path, label_path: Path, *, channels: int, size: tuple[int, int], mean: Any, std: Any,
              num_classes: int) -> tuple[Tensor, Tensor]:
    """One normalised image C×H×W at the model's ``size`` and its int64 label map at its own size.

    Raises:
        OSError: a file cannot be decoded (the caller skips the pair).
        ValueError: the sizes of image and annotation differ, or a label is outside the classes.
    """
    with Image.open(image_path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
    with Image.open(label_path) as lab:
        lab.load()
        label = torch.from_numpy(np.array(lab, dtype=np.int64))
    if label.ndim != 2:
        raise ValueError(f"{label_path.name}: an annotation must be a single-channel class-index PNG")
    if tuple(label.shape) != (img.height, img.width):
        raise ValueError(f"{image_path.name} is {img.width}×{img.height} but its annotation is "
                         f"{label.shape[1]}×{label.shape[0]}")
    bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"{label_path.name}: label {int(label[bad][0])} is outside the {num_classes} classes "
                         f"(0–{num_classes - 1}, {IGNORE_INDEX} = ignore)")
    x = torch.from_numpy(np.array(img, dtype=np.float32)) / 255.0
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    x = F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False).squeeze(0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean_t) / std_t, label
