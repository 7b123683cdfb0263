"""Evaluation on an ImageFolder (ImageNet validation layout) through timm's data pipeline.

``ROOT/<class>/<image>``: classes are the sorted sub-folder names (timm's
``ReaderImageFolder``), so an ImageNet validation folder maps to the usual 1000
indices.  Images go through ``timm.data.create_transform`` with the model's own data
config (``resolve_data_config``: input size, crop_pct, interpolation, mean/std).

Unlike timm's ``ImageDataset`` (which replaces an unreadable image with the next
one, counting that one twice), an unreadable image is skipped: it is left out of
every count and listed in the result.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..distributed import rank_world
from ..models import model_info, timm_data_config
from .accuracy import (
    DEFAULT_BUDGETS,
    DEFAULT_SEEDS,
    Config,
    default_configs,
    evaluate_configs,
    shard_indices,
)

REFERENCE_NAME = "reference"


class SkippingImageFolder(Dataset):
    """ImageFolder samples as ``(image C×H×W or None, label, index, error or None)``.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: no images in class sub-folders of ``root``.
    """

    def __init__(self, root: str | Path, transform: Any, img_mode: str = "RGB") -> None:
        from timm.data import get_img_extensions
        from timm.data.readers.reader_image_folder import find_images_and_targets

        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"data folder {root} does not exist")
        if not root.is_dir():
            raise FileNotFoundError(f"data path {root} is not a folder")
        samples, class_to_idx = find_images_and_targets(str(root))
        layout = "expected ImageNet validation layout ROOT/<class>/<image>"
        if not samples:
            raise ValueError(
                f"no images found in {root} ({layout}; extensions {', '.join(sorted(get_img_extensions()))})"
            )
        if "" in class_to_idx:
            raise ValueError(f"{root} holds images directly, not in class sub-folders ({layout})")
        self.root, self.samples, self.class_to_idx = root, samples, class_to_idx
        self.transform, self.img_mode = transform, img_mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, int, str | None]:
        path, target = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert(self.img_mode)  # decodes the pixels: truncated files fail here
            return self.transform(img), target, index, None
        except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
            rel = Path(path).relative_to(self.root)
            return None, target, index, f"{rel}: {type(err).__name__}: {err}"


def collate_skipping(items: list[tuple[Tensor | None, int, int, str | None]]) -> tuple[Tensor, Tensor, list[str]]:
    """Stack the readable samples; return (images B×C×H×W, labels B, errors of the unreadable ones)."""
    good = [(x, y) for x, y, _, err in items if err is None]
    errors = [err for _, _, _, err in items if err is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), errors
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), errors


def load_timm_model(name: str, pretrained: bool = False, checkpoint: str | None = None) -> nn.Module:
    """A timm model by name, or the bundled reference model for ``"reference"``; eval mode.

    Kept for callers of this module; see :func:`tokenreduce.models.loading.load_model`.

    Raises:
        ValueError: unknown model name.
        ModelLoadError: pretrained weights or the checkpoint cannot be loaded.
    """
    from ..models.loading import load_model

    return load_model(name, pretrained=pretrained, checkpoint=checkpoint)


def subset_indices(n: int, limit: int | None) -> list[int]:
    """All of ``range(n)``, or ``limit`` of them chosen by a fixed-seed permutation (sorted), so every class shows."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    gen = torch.Generator().manual_seed(0)
    return sorted(torch.randperm(n, generator=gen)[:limit].tolist())


def evaluate_imagefolder(
    model_name: str,
    data: str | Path,
    *,
    configs: list[Config] | None = None,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    pretrained: bool = False,
    checkpoint: str | None = None,
    crop_pct: float | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    repeats: int = 5,
    device: str = "cpu",
    progress: bool = True,
    model: nn.Module | None = None,
    seeds: int = DEFAULT_SEEDS,
) -> dict[str, Any]:
    """Top-1/top-5, GMACs and images/s of ``model_name`` under ``configs`` on the ImageFolder ``data``.

    ``model``: the model already loaded (``model_name`` then only names it in the result);
    default: loaded by name with ``pretrained`` and ``checkpoint``.  ``configs``: the rows (default:
    :func:`~tokenreduce.eval.accuracy.default_configs` for this model at ``budgets``).  ``seeds``: seeds a
    seeded method is evaluated over (:func:`~tokenreduce.eval.accuracy.evaluate_configs`).

    Returns:
        ``{"model", "data", "data_config", "samples", "skipped_images", "rows"}``;
        ``samples`` is the number of images scored (the readable ones, summed over ranks: each
        row's ``samples`` too) and ``skipped_images`` lists the unreadable ones, so ``samples +
        len(skipped_images)`` is the number of images considered (after ``limit``).

    Raises:
        FileNotFoundError, ValueError: missing or empty folder, class count that does
            not match the model, unknown model name.
    """
    from timm.data import create_transform

    model = (load_timm_model(model_name, pretrained, checkpoint) if model is None else model).to(device)
    overrides = {} if crop_pct is None else {"crop_pct": crop_pct}
    data_config = timm_data_config(model, overrides)
    transform = create_transform(**data_config, is_training=False)
    img_mode = "L" if data_config["input_size"][0] == 1 else "RGB"
    dataset = SkippingImageFolder(data, transform, img_mode)
    num_classes = model_info(model).num_classes  # the family says how many its head predicts
    if num_classes != len(dataset.class_to_idx):
        raise ValueError(
            f"{data} has {len(dataset.class_to_idx)} class folders but {model_name} predicts {num_classes} classes; "
            "the folder must hold one sub-folder per model class (ImageNet validation layout)"
        )
    rank, world = rank_world()
    chosen = subset_indices(len(dataset), limit)
    mine = [chosen[i] for i in shard_indices(len(chosen), rank, world)]
    loader = DataLoader(
        Subset(dataset, mine), batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping
    )
    errors: set[str] = set()

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels, bad in loader:
            errors.update(bad)
            if len(labels):
                yield images, labels

    timing_batch = next(batches(), None)
    if timing_batch is None:
        timing_batch = (torch.zeros(1, *data_config["input_size"]), None)
    if configs is None:
        configs = default_configs(model_info(model), budgets)
    rows = evaluate_configs(
        model,
        configs,
        batches,
        timing_batch=timing_batch[0],
        num_batches=math.ceil(len(mine) / batch_size),
        device=device,
        repeats=repeats,
        progress=progress,
        seeds=seeds,
    )
    skipped = sorted(errors)
    if world > 1:
        gathered: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, skipped)
        skipped = sorted({e for part in gathered for e in part})
    return {
        "model": model_name,
        "data": str(data),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "samples": len(chosen) - len(skipped),  # scored; with the skipped ones, all that were considered
        "skipped_images": skipped,
        "rows": rows,
    }
