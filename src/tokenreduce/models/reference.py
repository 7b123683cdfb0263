"""The bundled reference model: a 12-block timm ViT trained on Fashion-MNIST.

It exists so that every method can be seen working on a real trained model
offline, with no GPU: the checkpoint and the 10k test set ship inside the package
(``tokenreduce/data/``) and nothing is downloaded.

Architecture: ``timm.models.vision_transformer.VisionTransformer`` with 32×32
single-channel inputs (the 28×28 images zero-padded by 2 on every side), 4×4
patches → 64 patch tokens + a class token, width 64, 12 blocks, 4 heads.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

REFERENCE_CONFIG: dict[str, Any] = dict(
    img_size=32,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    embed_dim=64,
    depth=12,
    num_heads=4,
    mlp_ratio=4.0,
)
"""Keyword arguments of the reference ``VisionTransformer``."""

MEAN, STD = 0.2860, 0.3530
"""Fashion-MNIST training-set pixel mean and standard deviation (pixels in [0, 1])."""

PAD = 2
"""Zero padding on each side: 28×28 → 32×32."""

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

WEIGHTS_FILE = "reference_vit.safetensors"
INFO_FILE = "reference_vit.json"
TEST_IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
TEST_LABELS_FILE = "t10k-labels-idx1-ubyte.gz"


def data_path(name: str) -> Path:
    """Path of a file shipped in ``tokenreduce/data``."""
    return Path(str(resources.files("tokenreduce") / "data" / name))


def build_reference_model(config: dict[str, Any] | None = None) -> VisionTransformer:
    """The reference architecture with freshly initialised weights.

    ``config``: ``VisionTransformer`` keyword arguments that override :data:`REFERENCE_CONFIG`
    (a checkpoint's JSON records the ones it was trained with, e.g. another ``embed_dim``).
    """
    model = VisionTransformer(**{**REFERENCE_CONFIG, **(config or {})})
    model.pretrained_cfg = {
        "input_size": (1, 32, 32),
        "mean": (MEAN,),
        "std": (STD,),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "num_classes": 10,
        "label_names": list(CLASSES),
    }
    return model


def reference_info() -> dict[str, Any]:
    """The shipped checkpoint's metadata: config, provenance, licence, training command, accuracy."""
    return json.loads(data_path(INFO_FILE).read_text())


def load_reference_model(path: str | Path | None = None) -> VisionTransformer:
    """The trained reference model in eval mode (the shipped checkpoint unless ``path`` is given)."""
    from safetensors.torch import load_file

    path = data_path(WEIGHTS_FILE) if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint {path} not found (is the package installed with its data?)")
    info_path = path.with_name(INFO_FILE)
    config = json.loads(info_path.read_text()).get("config") if info_path.is_file() else None
    model = build_reference_model(config)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def shipped_reducer(name: str) -> Path | None:
    """The shipped reducer checkpoint ``name`` (a stem in ``data/reducers``), or ``None`` if absent."""
    path = data_path(f"reducers/{name}.safetensors")
    return path if path.is_file() else None


def shipped_reducers() -> dict[str, Path]:
    """Name → checkpoint of the learned reducers shipped for the reference model (those present)."""
    from ..methods import REGISTRY

    names = [name for cls in REGISTRY.values() for name in cls.shipped]  # each method lists its own
    paths = {name: data_path(f"reducers/{name}.safetensors") for name in names}
    return {name: path for name, path in paths.items() if path.is_file()}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): uint8 images N×H×W or labels N."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic == 2051:
        n, h, w = (int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
        return np.frombuffer(data, np.uint8, n * h * w, offset=16).reshape(n, h, w)
    if magic == 2049:
        n = int.from_bytes(data[4:8], "big")
        return np.frombuffer(data, np.uint8, n, offset=8)
    raise ValueError(f"{path} is not an idx image (magic 2051) or label (2049) file: magic {magic}")


def load_fashion_mnist(folder: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST ``split`` ('train' or 't10k') from a folder of the original gzipped idx files.

    Returns:
        images uint8 N×28×28 and labels int64 N.

    Raises:
        FileNotFoundError: the files are not there; the message says how to get them.
    """
    folder = Path(folder)
    names = [f"{split}-images-idx3-ubyte.gz", f"{split}-labels-idx1-ubyte.gz"]
    if not all((folder / name).is_file() for name in names):
        raise FileNotFoundError(
            f"the Fashion-MNIST {split!r} files ({', '.join(names)}) are not in {folder}: install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; they go to /usr/share/datasets/fashion-mnist) "
            "or download them from https://github.com/zalandoresearch/fashion-mnist and pass their folder with "
            "--data-dir DIR"
        )
    images = read_idx(folder / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{split}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_reference_testset(limit: int | None = None) -> tuple[Tensor, Tensor]:
    """The bundled Fashion-MNIST test set: uint8 images N×28×28 and int64 labels N (N = 10000 or ``limit``)."""
    images, labels = load_fashion_mnist(data_path(""), "t10k")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def preprocess(images: Tensor) -> Tensor:
    """uint8 B×28×28 (or B×1×28×28) → normalised float B×1×32×32, zero-padded by 2."""
    x = images.reshape(images.shape[0], 1, *images.shape[-2:]).float() / 255.0
    x = F.pad(x, (PAD, PAD, PAD, PAD))
    return (x - MEAN) / STD


def augment(images: Tensor, max_shift: int = 2, generator: torch.Generator | None = None) -> Tensor:
    """Training augmentation: random translation by up to ``max_shift`` px and a random horizontal flip.

    uint8 B×28×28 → normalised float B×1×32×32 (same framing as :func:`preprocess`).
    """
    b = images.shape[0]
    side = images.shape[-1] + 2 * PAD
    x = images.reshape(b, *images.shape[-2:]).float() / 255.0
    m = PAD + max_shift
    x = F.pad(x, (m, m, m, m))
    oy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    ar = torch.arange(side)
    rows = oy[:, None] + ar  # B×side
    cols = torch.where(flip[:, None], ox[:, None] + side - 1 - ar, ox[:, None] + ar)
    x = x[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return ((x - MEAN) / STD).unsqueeze(1)
