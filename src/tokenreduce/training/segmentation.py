"""Segmentation training: the reference segmenter on Fashion-MNIST mosaics.

:class:`SegmentationTask` is the engine's task for a :class:`~tokenreduce.dense.segmenter.LinearSegmenter`:
pixel-wise cross-entropy on canvases composed on the fly (:class:`~tokenreduce.dense.mosaic.MosaicComposer`)
from batches of single Fashion-MNIST items.  :func:`train_reference_segmenter` is the recipe of the
bundled segmenter (``python scripts/train_segmenter.py``): its backbone starts from the bundled
reference classifier (position embeddings resampled from 8×8 to 14×14), as Segmenter starts from a
pretrained ViT, and the whole model is fine-tuned.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..dense.metrics import confusion_matrix, scores
from ..dense.mosaic import (
    CANVAS,
    CELL,
    FILL_PROB,
    IGNORE_INDEX,
    MAX_OFFSET,
    NUM_CLASSES,
    THRESHOLD,
    MosaicComposer,
    mosaic_testset,
)
from ..dense.mosaic import preprocess as preprocess_canvas
from ..dense.segmenter import (
    INFO_FILE,
    SEGMENTER_CONFIG,
    WEIGHTS_FILE,
    LinearSegmenter,
    build_reference_segmenter,
    init_from_classifier,
    load_segmenter_weights,
)
from ..models.reference import load_fashion_mnist, load_reference_model
from ..threads import set_threads
from .engine import TrainConfig, precision_label, train
from .reference import DEFAULT_DATA, PROVENANCE, unfused_attention

ITEMS_PER_CANVAS = 4


class SegmentationTask:
    """Pixel-wise cross-entropy of a segmenter on mosaics composed from ``(items, labels)`` batches.

    Args:
        composer: turns a batch of K items into K/4 canvases and their label maps.
        ignore_index: label excluded from the loss.
    """

    def __init__(self, composer: MosaicComposer | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        self.composer = composer or MosaicComposer()
        self.ignore_index = ignore_index

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        images, target = self.composer(*batch)
        logits = model(images)
        loss = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)
        with torch.no_grad():
            acc = (logits.argmax(1) == target).float().mean().item()
        return loss, {"pixel_acc": acc}


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, canvas: Tensor, target: Tensor, batch_size: int = 100) -> dict[str, float]:
    """mIoU, foreground mIoU and pixel accuracy of ``model`` on uint8 canvases M×56×56 with labels M×56×56."""
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for i in range(0, len(canvas), batch_size):
        pred = model(preprocess_canvas(canvas[i : i + batch_size])).argmax(1)
        confusion += confusion_matrix(pred, target[i : i + batch_size], NUM_CLASSES)
    s = scores(confusion)
    return {"miou": s.miou, "miou_foreground": s.miou_foreground, "pixel_accuracy": s.pixel_accuracy}


@dataclass(frozen=True)
class _MosaicRun:
    """What both segmenter trainers set up the same way: the training items, the evaluation set, the step size."""

    train_set: TensorDataset
    test_canvas: Tensor
    test_target: Tensor
    eval_subset: tuple[Tensor, Tensor]
    batch_items: int
    steps_per_epoch: int

    @classmethod
    def prepare(cls, data_dir: str, canvases_per_batch: int, eval_canvases: int, seed: int,
                threads: int | None) -> _MosaicRun:
        """Set the threads, load the training items and the evaluation mosaics, then seed the RNG."""
        if threads:
            set_threads(threads)
        train_x, train_y = load_fashion_mnist(data_dir, "train")
        test_canvas, test_target = mosaic_testset()
        torch.manual_seed(seed)
        batch_items = canvases_per_batch * ITEMS_PER_CANVAS
        return cls(TensorDataset(train_x, train_y), test_canvas, test_target,
                   (test_canvas[:eval_canvases], test_target[:eval_canvases]), batch_items,
                   len(train_x) // batch_items)

    def config(self, out_dir: str, *, epochs: int, lr: float, weight_decay: float, warmup_epochs: float, seed: int,
               resume: bool, stop_at_step: int | None, compile: bool, amp: bool, progress: bool,
               extra: dict[str, Any]) -> TrainConfig:
        """The engine's configuration: no clipping, a checkpoint every 100 steps, a log line every 20."""
        return TrainConfig(
            out_dir=out_dir, epochs=epochs, batch_size=self.batch_items, lr=lr, weight_decay=weight_decay,
            warmup_steps=round(warmup_epochs * self.steps_per_epoch), grad_clip=None, seed=seed,
            checkpoint_every=100, log_every=20, resume=resume, stop_at_step=stop_at_step, compile=compile, amp=amp,
            progress=progress, extra=extra,
        )

    def score_all(self, model: nn.Module) -> dict[str, Any]:
        """The eval-mode model on every evaluation canvas."""
        model.eval()
        return {**evaluate_segmenter(model, self.test_canvas, self.test_target), "canvases": len(self.test_canvas)}


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _previous_training(init: str | None) -> dict[str, Any] | None:
    """The training record in the JSON beside a segmenter checkpoint ``init`` (``None`` for the classifier or
    random starts, or a checkpoint without one), with the eval it ended at."""
    if init is None or init == "classifier":
        return None
    info_path = Path(init).with_name(INFO_FILE)
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    return {**info.get("training", {}), "decoder": info.get("decoder", "bilinear"), "eval": info.get("eval")}


def train_reference_segmenter(
    data_dir: str = DEFAULT_DATA,
    out_dir: str = "runs/segmenter",
    *,
    epochs: int = 8,
    canvases_per_batch: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_epochs: float = 0.5,
    seed: int = 0,
    init: str | None = "classifier",
    decoder: str = "bilinear",
    eval_canvases: int = 500,
    compile: bool = True,
    amp: bool = False,
    resume: bool = False,
    stop_at_step: int | None = None,
    threads: int | None = 2,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train the reference segmenter and export it to ``out_dir`` (weights + JSON).  Returns the JSON.

    ``init``: ``"classifier"`` starts the backbone from the bundled reference classifier, ``None`` from
    random weights, anything else is a segmenter checkpoint (safetensors) to continue from; a bilinear
    segmenter's head starts a ``decoder="subpixel"`` one as its nearest-neighbour equivalent.  An epoch is
    one pass over the 60k training items (15k canvases).  After every epoch the first ``eval_canvases``
    canvases of the evaluation set are scored; the export is scored on all of them.
    """
    run = _MosaicRun.prepare(data_dir, canvases_per_batch, eval_canvases, seed, threads)
    model = build_reference_segmenter(decoder=decoder)
    if init == "classifier":
        init_from_classifier(model, load_reference_model())
    elif init is not None:
        load_segmenter_weights(model, init, convert_decoder=True)
    config = run.config(out_dir, epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                        seed=seed, resume=resume, stop_at_step=stop_at_step, compile=compile, amp=amp,
                        progress=progress, extra={"task": "segmentation", "init": init, "decoder": decoder})
    with unfused_attention(model):
        result = train(model, SegmentationTask(), run.train_set, config,
                       evaluate=lambda m: evaluate_segmenter(m, *run.eval_subset))
    out = Path(out_dir)
    info = {
        "model": "tokenreduce.dense.segmenter.LinearSegmenter(timm VisionTransformer)",
        "config": SEGMENTER_CONFIG,
        "decoder": decoder,
        "num_classes": NUM_CLASSES,
        "complete": result.complete,
        "training": {
            "command": command or "scripts/train_segmenter.py",
            "init": init,
            "epochs": epochs,
            "steps": result.step,
            "canvases_per_batch": canvases_per_batch,
            "optimizer": f"AdamW lr={lr} wd={weight_decay} (not on pos_embed, cls_token, biases, norms), "
            f"{warmup_epochs} epoch warm-up, cosine to 1e-5, no clipping",
            "loss": "pixel-wise cross-entropy on the upsampled logits",
            "precision": precision_label(amp),
            "data": f"{CANVAS}x{CANVAS} mosaics of {ITEMS_PER_CANVAS} {CELL}x{CELL} cells composed on the fly, "
            f"fill {FILL_PROB}, offsets up to {MAX_OFFSET} px, horizontal flips, foreground >= {THRESHOLD}",
            "seed": seed,
            "wall_time_s": round(result.wall_time_s, 1),
            "per_epoch_eval": result.evals,
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        },
        **PROVENANCE,
    }
    previous = _previous_training(init)
    if previous is not None:  # keep the record of the run this one continues
        info["training"]["previous_phase"] = previous
    if result.complete:
        info["eval"] = run.score_all(model)
        _save_weights(model, out / WEIGHTS_FILE)
        (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


class CroprSegmentationTask:
    """Token Cropr trained end to end under a segmenter, as the official segmentation recipe does.

    The loss is the main pixel-wise cross-entropy plus, for every Cropr module, the cross-entropy of its
    per-query auxiliary logits (B×M×classes, one query per patch position) against the label map
    downsampled to the patch grid with nearest-neighbour sampling; all weights 1.  The auxiliary heads
    read detached tokens, so the backbone and decoder learn from the main loss only and the auxiliary
    losses train only the Cropr modules.  The pruning rate rises linearly from 0 to ``p`` over the first
    ``curriculum`` fraction of the steps, then stays at ``p``
    (:attr:`~tokenreduce.methods.cropr.Cropr.p_override`).

    Args:
        reducer: the Cropr reducer applied to ``segmenter.backbone`` (``aux="segmentation"``,
            ``num_queries`` = patches).
        total_steps: the run's optimiser steps (for the curriculum).
        curriculum: fraction of the steps over which p rises (0: no curriculum).
    """

    def __init__(self, reducer: Any, total_steps: int, composer: MosaicComposer | None = None,
                 curriculum: float = 0.5, ignore_index: int = IGNORE_INDEX) -> None:
        if reducer.module is None:
            raise ValueError("cropr has no learned parameters to train")
        if reducer.params.aux != "segmentation":
            raise ValueError("train Cropr for segmentation with aux='segmentation' (per-query auxiliary heads)")
        self.reducer = reducer
        self.total_steps = total_steps
        self.curriculum = curriculum
        self.composer = composer or MosaicComposer()
        self.ignore_index = ignore_index
        self.step = 0

    def pruning_rate(self, step: int) -> int:
        """p at optimiser step ``step`` (0-based)."""
        ramp = self.curriculum * self.total_steps
        if ramp <= 0 or step >= ramp:
            return self.reducer.params.p
        return int(self.reducer.params.p * step / ramp)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad] + list(self.reducer.module.parameters())

    def state_dict(self) -> dict[str, Tensor]:
        return {**{f"reducer.{k}": v for k, v in self.reducer.module.state_dict().items()},
                "step": torch.tensor(self.step)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.step = int(state["step"])
        self.reducer.module.load_state_dict({k[len("reducer."):]: v for k, v in state.items()
                                             if k.startswith("reducer.")})

    def after_step(self, model: nn.Module) -> None:
        self.step += 1

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        images, target = self.composer(*batch)
        self.reducer.p_override = self.pruning_rate(self.step)
        logits = model(images)
        main = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)
        aux = self.reducer.aux_logits  # per module: B×M×classes
        m = aux[0].shape[1] if aux else 0
        side = math.isqrt(m)
        grid = F.interpolate(target.unsqueeze(1).float(), size=(side, side), mode="nearest").long().flatten(1)
        aux_loss = sum((F.cross_entropy(a.float().transpose(1, 2), grid, ignore_index=self.ignore_index)
                        for a in aux), torch.zeros(()))
        with torch.no_grad():
            acc = (logits.argmax(1) == target).float().mean().item()
        aux_mean = float(aux_loss.detach()) / max(len(aux), 1)
        return main + aux_loss, {"main_loss": float(main.detach()), "aux_loss": aux_mean,
                                 "p": float(self.reducer.p_override), "pixel_acc": acc}


def train_cropr_segmenter(
    segmenter_weights: str,
    data_dir: str = DEFAULT_DATA,
    out_dir: str = "runs/cropr_segmenter",
    *,
    budget: float = 0.6,
    epochs: int = 2,
    canvases_per_batch: int = 32,
    lr: float = 3e-4,
    weight_decay: float = 0.05,
    warmup_epochs: float = 0.25,
    curriculum: float = 0.5,
    reducer_init: str | Path | None = None,
    decoder: str | None = None,
    seed: int = 0,
    eval_canvases: int = 500,
    compile: bool = False,
    resume: bool = False,
    stop_at_step: int | None = None,
    threads: int | None = 2,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Fine-tune the reference segmenter end to end with Cropr (segmentation form, last-layer fusion) at
    ``budget`` of the unreduced GMACs, and export the segmenter weights plus the reducer checkpoint into
    ``out_dir`` (``segmenter_cropr.safetensors``, ``cropr_seg.safetensors``).  Returns a summary.

    ``reducer_init`` continues from a trained Cropr segmentation reducer (its queries, scorers and
    auxiliary heads; pass the segmenter weights it was trained with as ``segmenter_weights``), with
    ``curriculum=0`` usually; without it the Cropr modules start from scratch.  ``decoder`` switches the
    segmenter's decoder (a bilinear head starts a ``"subpixel"`` one as its nearest-neighbour equivalent);
    ``None`` keeps the one the weights' JSON names.
    """
    from ..api import apply, remove
    from ..api import reducer as applied
    from ..checkpoint import read_reducer, save_reducer
    from ..dense.segmenter import load_reference_segmenter

    run = _MosaicRun.prepare(data_dir, canvases_per_batch, eval_canvases, seed, threads)
    if decoder is None:
        model = load_reference_segmenter(segmenter_weights).train()
    else:
        model = build_reference_segmenter(decoder=decoder)
        load_segmenter_weights(model, segmenter_weights, convert_decoder=True)
        model.train()
    num_patches = model.backbone.patch_embed.num_patches
    if reducer_init is not None:
        apply(model.backbone, "cropr", checkpoint=reducer_init, budget=budget, restore="frozen")
    else:
        apply(model.backbone, "cropr", budget=budget, untrained=True, num_queries=num_patches,
              aux="segmentation", num_classes=NUM_CLASSES, restore="frozen")
    cropr = applied(model.backbone)
    task = CroprSegmentationTask(cropr, run.steps_per_epoch * epochs, curriculum=curriculum)
    config = run.config(out_dir, epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                        seed=seed, resume=resume, stop_at_step=stop_at_step, compile=compile, amp=False,
                        progress=progress,
                        extra={"task": "cropr-segmentation", "params": cropr.config(), "init": str(segmenter_weights),
                               "reducer_init": None if reducer_init is None else str(reducer_init)})

    def evaluate(m: nn.Module) -> dict[str, float]:
        cropr.p_override = None
        return evaluate_segmenter(m, *run.eval_subset)

    with unfused_attention(model):
        result = train(model, task, run.train_set, config, evaluate=evaluate)
    cropr.p_override = None
    summary: dict[str, Any] = {"complete": result.complete, "steps": result.step, "params": cropr.config(),
                               "decoder": model.decoder,
                               "per_epoch_eval": result.evals, "wall_time_s": round(result.wall_time_s, 1),
                               "command": command or "scripts/train_segmenter.py --cropr"}
    if reducer_init is not None:  # keep the record of the run this one continues
        summary["previous_phase"] = read_reducer(reducer_init)[0].get("extra", {}).get("training")
    if result.complete:
        summary["eval"] = run.score_all(model)
        out = Path(out_dir)
        remove(model.backbone)
        _save_weights(model, out / CROPR_WEIGHTS_FILE)
        save_reducer(cropr, out / f"{CROPR_REDUCER}.safetensors",
                     extra={"model_weights": CROPR_WEIGHTS_FILE, "task": "segmentation", "training": summary})
    return summary


CROPR_WEIGHTS_FILE = "segmenter_cropr.safetensors"
"""The segmenter weights fine-tuned end to end with Cropr (shipped next to the reducer checkpoint)."""
CROPR_REDUCER = "cropr_seg"
"""Stem of the Cropr segmentation reducer checkpoint."""

__all__ = ["CroprSegmentationTask", "SegmentationTask", "evaluate_segmenter", "train_cropr_segmenter",
           "train_reference_segmenter", "LinearSegmenter"]
