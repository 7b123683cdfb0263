"""Segmentation under token reduction: mIoU, pixel accuracy, GMACs and images/s, reduced vs unreduced.

Methods are applied to the segmenter's backbone with token restoration (``restore="frozen"`` by
default: the decoder gets the full patch grid back, :func:`tokenreduce.apply`).  Every row is scored
on the same canvases; speed is the whole segmenter's (backbone, decoder, upsampling), timed
alternately against the unreduced segmenter in the same process.

A learned method's row needs a reducer trained for segmentation.  A reducer checkpoint trained end to
end with its segmenter names the segmenter weights it was trained with (``extra.model_weights`` in its
metadata, a file next to it); that row runs on those weights.

Under ``torchrun`` every rank scores a disjoint shard of the canvases (each counted once) and the
confusion matrices are summed over ranks.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..api import gmacs, remove, stats
from ..checkpoint import read_reducer
from ..distributed import rank_world
from ..eval.accuracy import (
    DEFAULT_SEEDS,
    UNREDUCED,
    Config,
    default_configs,
    row_weights,
    run_config,
    shard_indices,
    skip_reason,
)
from ..methods import get_method
from ..models import model_info
from .metrics import bootstrap_miou, confusion_matrix, scores
from .segmenter import LinearSegmenter, load_segmenter_weights

DEFAULT_BUDGET = 0.6
"""The budget of a default segmentation evaluation."""

RESTORE_MODES = ("frozen", "fusion")
"""How pruned tokens come back for the decoder (see :func:`tokenreduce.apply`)."""

Batch = tuple[Tensor, list[Tensor]]
"""Images B×C×H×W and B label maps (int64 h×w each; 255 = ignore)."""


@dataclass
class Confusions:
    """Per-image confusion matrices and GMACs summed over the images scored on this rank."""

    num_classes: int
    per_image: list[Tensor] = field(default_factory=list)
    gmacs_sum: float = 0.0

    def add(self, logits: Tensor, labels: list[Tensor], gmacs_per_image: float) -> None:
        """Score one batch: ``logits`` B×K×H×W (upsampled to a label map's size where it differs)."""
        for i, label in enumerate(labels):
            out = logits[i : i + 1]
            if tuple(out.shape[-2:]) != tuple(label.shape):
                out = F.interpolate(out.float(), size=tuple(label.shape), mode="bilinear", align_corners=False)
            pred = out.argmax(1)[0].cpu()
            self.per_image.append(confusion_matrix(pred, label.cpu(), self.num_classes))
            self.gmacs_sum += gmacs_per_image

    def gathered(self) -> Confusions:
        """All ranks' per-image matrices (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.per_image, self.gmacs_sum))
        out = Confusions(self.num_classes)
        for per_image, gmacs_sum in parts:
            out.per_image += per_image
            out.gmacs_sum += gmacs_sum
        return out

    @property
    def images(self) -> int:
        return len(self.per_image)

    def stacked(self) -> Tensor:
        """int64 M×K×K."""
        return torch.stack(self.per_image) if self.per_image else torch.zeros(0, self.num_classes, self.num_classes,
                                                                              dtype=torch.int64)


@torch.no_grad()
def score_batches(model: nn.Module, batches: Iterable[Batch], num_classes: int, *, gmacs_of: Callable[[], float],
                  device: torch.device | str = "cpu", progress: bool = True, desc: str = "eval",
                  total: int | None = None) -> Confusions:
    """Confusion matrices of ``model`` over ``batches`` on this rank; ``gmacs_of()`` gives each forward's GMACs."""
    out = Confusions(num_classes)
    rank, _ = rank_world()
    for images, labels in tqdm(batches, desc=desc, total=total, disable=not progress or rank != 0, leave=False):
        logits = model(images.to(device))
        out.add(logits, labels, gmacs_of())
    return out


def decoder_gmacs(model: LinearSegmenter, image_size: tuple[int, int]) -> float:
    """GMACs per image of the per-patch linear decoder (the upsampling is not counted)."""
    gh, gw = image_size[0] // model.patch_size[0], image_size[1] // model.patch_size[1]
    return gh * gw * model.head.in_features * model.head.out_features / 1e9


def segmentation_configs(backbone: nn.Module, budgets: Iterable[float] = (DEFAULT_BUDGET,),
                         shipped: bool = False) -> list[Config]:
    """The unreduced row and every method's default rows (:func:`~tokenreduce.eval.accuracy.default_configs`);
    with ``shipped`` a learned method runs from the reducer its class ships for the reference segmenter
    (:meth:`~tokenreduce.methods.base.Reducer.shipped_segmentation_checkpoint`)."""
    configs = default_configs(model_info(backbone), budgets, task="segmentation")
    if not shipped:
        return configs
    out = []
    for config in configs:
        cls = get_method(config.method) if config.method else None
        if cls is not None and cls.learned:
            path = cls.shipped_segmentation_checkpoint(config.params, config.budget)
            if path is not None:
                config = Config(config.method, {**config.params, "checkpoint": str(path)}, config.budget,
                                label=f"{config.label} [{path.stem}]")
        out.append(config)
    return out


def companion_weights(checkpoint: str | Path) -> Path | None:
    """The model weights a reducer checkpoint was trained end to end with (``extra.model_weights``), or ``None``.

    Raises:
        FileNotFoundError: the checkpoint names weights that are not next to it.
    """
    meta, _ = read_reducer(checkpoint)
    name = (meta.get("extra") or {}).get("model_weights")
    if not name:
        return None
    path = Path(checkpoint).with_name(name)
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} was trained with the model weights {name}, which are not next to it")
    return path


def evaluate_segmentation_configs(
    model: LinearSegmenter,
    configs: list[Config],
    make_batches: Callable[[], Iterator[Batch]],
    *,
    timing_batch: Tensor,
    num_batches: int | None = None,
    restore: str = "frozen",
    device: torch.device | str = "cpu",
    repeats: int = 9,
    progress: bool = True,
    seeds: int = DEFAULT_SEEDS,
    bootstrap_rounds: int = 1000,
) -> list[dict[str, Any]]:
    """Score ``model`` under every config; one JSON-friendly row per config.

    Args:
        model: an eval-mode segmenter on ``device``; its backbone is left unreduced at the end.
        configs: the rows (a config that cannot run becomes a row with ``skipped``).
        make_batches: returns a fresh iterator over this rank's batches.
        timing_batch: the B×C×H×W batch images/s are measured on.
        restore: how pruned tokens come back (:data:`RESTORE_MODES`).
        seeds: seeds a seeded method (``random``) is averaged over.

    Returns:
        Rows with ``label, method, params, budget, miou, miou_ci95, miou_foreground, pixel_accuracy, iou,
        images, gmacs, gmacs_analytic, gmacs_unreduced, images_per_s, images_per_s_unreduced, speedup,
        delta_miou`` (``miou_std``/``seeds`` for a seeded method; ``skipped`` when a config cannot run).
        GMACs are the backbone's plus the linear decoder's.
    """
    if restore not in RESTORE_MODES:
        raise ValueError(f"restore must be one of {RESTORE_MODES}, got {restore!r}")
    backbone = model.backbone
    remove(backbone)
    base = copy.deepcopy(model)
    timing_batch = timing_batch.to(device)
    num_classes = model.num_classes
    dec = decoder_gmacs(model, tuple(timing_batch.shape[-2:]))
    base_gmacs = gmacs(backbone) + dec
    rows: list[dict[str, Any]] = []
    base_miou: float | None = None
    for config in configs:
        row: dict[str, Any] = {"label": config.label, "method": config.method or UNREDUCED, "budget": config.budget}
        reason = skip_reason(backbone, config)
        weights = None
        if reason is None and "checkpoint" in config.params:
            try:
                weights = companion_weights(config.params["checkpoint"])
            except (FileNotFoundError, ValueError) as err:
                reason = str(err)
        if reason is not None:
            rows.append({**row, "params": config.params, "skipped": reason})
            continue
        if weights is not None:
            row["weights"] = weights.name
        reduced = config.method is not None

        def score(desc: str, reduced: bool = reduced) -> Confusions:
            def gmacs_of() -> float:
                return stats(backbone).gmacs + dec if reduced else base_gmacs

            return score_batches(model, make_batches(), num_classes, gmacs_of=gmacs_of, device=device,
                                 progress=progress, desc=desc, total=num_batches).gathered()

        with row_weights(model, weights, load_segmenter_weights):
            measured = run_config(config, row, target=backbone, timed=model, base=base, score=score,
                                  timing_batch=timing_batch, repeats=repeats, seeds=seeds, unreduced_gmacs=base_gmacs,
                                  extra_gmacs=dec, apply_kwargs={"restore": restore})
        runs = measured.scores
        first = runs[0]
        per_run = [scores(r.stacked().sum(0)) for r in runs]
        miou = statistics.fmean(s.miou for s in per_run)
        if not reduced:
            base_miou = miou
        if measured.seeds:
            row.update(seeds=measured.seeds, miou_per_seed=[s.miou for s in per_run],
                       miou_std=statistics.stdev([s.miou for s in per_run]) if len(runs) > 1 else None)
        interval = (bootstrap_miou(first.stacked(), rounds=bootstrap_rounds) if first.images > 1
                    else (float("nan"), float("nan")))
        row.update(
            miou=miou,
            miou_ci95=list(interval),
            miou_foreground=statistics.fmean(s.miou_foreground for s in per_run),
            pixel_accuracy=statistics.fmean(s.pixel_accuracy for s in per_run),
            iou=list(per_run[0].iou),
            images=first.images,
            gmacs=first.gmacs_sum / max(first.images, 1),
            **measured.common_fields(base_gmacs),
        )
        rows.append(row)
    for row in rows:
        if "miou" in row and base_miou is not None:
            row["delta_miou"] = row["miou"] - base_miou
    return rows


def mosaic_batches(canvas: Tensor, target: Tensor, batch_size: int) -> Iterator[Batch]:
    """Batches of preprocessed canvases and their label maps."""
    from .mosaic import preprocess

    for i in range(0, len(canvas), batch_size):
        yield preprocess(canvas[i : i + batch_size]), list(target[i : i + batch_size])


def evaluate_reference_segmenter(
    configs: list[Config] | None = None,
    *,
    budgets: Iterable[float] = (DEFAULT_BUDGET,),
    limit: int | None = None,
    batch_size: int = 100,
    repeats: int = 9,
    restore: str = "frozen",
    model: LinearSegmenter | None = None,
    checkpoint: str | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
    seeds: int = DEFAULT_SEEDS,
    bootstrap_rounds: int = 1000,
) -> dict[str, Any]:
    """The bundled reference segmenter on the bundled mosaic evaluation set (or its first ``limit`` canvases).

    Returns:
        ``{"model", "data", "samples", "skipped_images", "restore", "rows"}``.
    """
    from .mosaic import mosaic_testset
    from .segmenter import load_reference_segmenter

    rank, world = rank_world()
    model = (load_reference_segmenter(checkpoint) if model is None else model).to(device).eval()
    canvas, target = mosaic_testset(limit)
    mine = torch.tensor(shard_indices(len(canvas), rank, world), dtype=torch.long)
    if configs is None:
        configs = segmentation_configs(model.backbone, budgets, shipped=checkpoint is None)
    from .mosaic import preprocess

    rows = evaluate_segmentation_configs(
        model, configs, lambda: mosaic_batches(canvas[mine], target[mine], batch_size),
        timing_batch=preprocess(canvas[:batch_size]), num_batches=math.ceil(len(mine) / batch_size),
        restore=restore, device=device, repeats=repeats, progress=progress, seeds=seeds,
        bootstrap_rounds=bootstrap_rounds,
    )
    return {"model": "reference segmenter", "data": "bundled Fashion-MNIST mosaic evaluation set",
            "samples": len(canvas), "skipped_images": [], "restore": restore, "rows": rows}


def format_segmentation_table(rows: list[dict[str, Any]]) -> str:
    """A readable table: method, mIoU with its 95% bootstrap interval, change vs unreduced, foreground mIoU,
    pixel accuracy, GMACs, ratio, images/s, speed-up."""
    width = max([20, *(len(r["label"]) for r in rows)])
    head = (f"{'method':<{width}} {'mIoU':>12} {'95% CI':>14} {'Δ mIoU':>7} {'fg mIoU':>8} {'pix acc':>8} "
            f"{'GMACs':>8} {'ratio':>6} {'img/s':>7} {'speed-up':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['label']:<{width}} skipped: {r['skipped']}")
            continue
        miou = f"{100 * r['miou']:.2f}"
        if r.get("miou_std") is not None:
            miou += f"±{100 * r['miou_std']:.2f}"
        low, high = r["miou_ci95"]
        ci = "" if math.isnan(low) else f"[{100 * low:.1f}, {100 * high:.1f}]"
        lines.append(
            f"{r['label']:<{width}} {miou:>12} {ci:>14} {100 * r.get('delta_miou', 0.0):>+7.2f} "
            f"{100 * r['miou_foreground']:>7.2f}% {100 * r['pixel_accuracy']:>7.2f}% {r['gmacs']:>8.4f} "
            f"{r['gmacs'] / r['gmacs_unreduced']:>6.2f} {r['images_per_s']:>7.0f} {r['speedup']:>7.2f}x"
        )
    lines.append("mIoU over 11 classes (background included); fg mIoU over the 10 item classes; 95% CI: bootstrap "
                 "over images; GMACs: backbone + linear decoder")
    return "\n".join(lines)


def evaluate_segmentation_folder(
    data: str | Path,
    configs: list[Config] | None = None,
    *,
    checkpoint: str | None = None,
    model: LinearSegmenter | None = None,
    budgets: Iterable[float] = (DEFAULT_BUDGET,),
    limit: int | None = None,
    batch_size: int = 16,
    repeats: int = 9,
    restore: str = "frozen",
    progress: bool = True,
    device: torch.device | str = "cpu",
    seeds: int = DEFAULT_SEEDS,
    bootstrap_rounds: int = 1000,
) -> dict[str, Any]:
    """A segmenter trained by the project (``checkpoint``: a segmenter safetensors file with its JSON; default the
    bundled one) on a folder in the ADE20k layout (:mod:`tokenreduce.dense.ade`).

    Images are resized to the model's input size; predictions are upsampled to each annotation's size.  An
    unreadable pair is skipped and listed in ``skipped_images``; a missing annotation, a size mismatch between an
    image and its annotation, or a label outside the classes raises before any work.

    Raises:
        FileNotFoundError, ValueError: see :func:`~tokenreduce.dense.ade.find_pairs` and
            :func:`~tokenreduce.dense.ade.read_pair`.
    """
    from ..models.reference import MEAN, STD
    from .ade import find_pairs, read_pair
    from .segmenter import load_reference_segmenter

    rank, world = rank_world()
    model = (load_reference_segmenter(checkpoint) if model is None else model).to(device).eval()
    pairs = find_pairs(data)
    if limit is not None:
        pairs = pairs[:limit]
    channels = model.backbone.patch_embed.proj.in_channels
    size = tuple(model.backbone.patch_embed.img_size)
    mean, std = (MEAN,) * channels, (STD,) * channels
    images: list[Tensor] = []
    labels: list[Tensor] = []
    skipped: list[str] = []
    for index in shard_indices(len(pairs), rank, world):
        image_path, label_path = pairs[index]
        try:
            x, y = read_pair(image_path, label_path, channels=channels, size=size, mean=mean, std=std,
                             num_classes=model.num_classes)
        except (OSError, SyntaxError) as err:  # undecodable: skipped and reported
            skipped.append(f"{image_path.name}: {type(err).__name__}: {err}")
            continue
        images.append(x)
        labels.append(y)
    if world > 1 and dist.is_initialized():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, skipped)
        skipped = [s for part in gathered for s in part]
    if not images:
        raise ValueError(f"no readable image/annotation pair in {data} on rank {rank}")

    def batches() -> Iterator[Batch]:
        for i in range(0, len(images), batch_size):
            yield torch.stack(images[i : i + batch_size]), labels[i : i + batch_size]

    if configs is None:
        configs = segmentation_configs(model.backbone, budgets, shipped=checkpoint is None)
    rows = evaluate_segmentation_configs(
        model, configs, batches, timing_batch=torch.stack(images[:batch_size]),
        num_batches=math.ceil(len(images) / batch_size), restore=restore, device=device, repeats=repeats,
        progress=progress, seeds=seeds, bootstrap_rounds=bootstrap_rounds,
    )
    return {"model": str(checkpoint or "reference segmenter"), "data": str(data),
            "samples": len(pairs) - len(skipped), "skipped_images": skipped, "restore": restore, "rows": rows}
