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
import platform
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..dense.metrics import confusion_matrix, scores
from ..dense.mosaic import CANVAS, CELL, FILL_PROB, IGNORE_INDEX, MAX_OFFSET, NUM_CLASSES, THRESHOLD, MosaicComposer
from ..dense.mosaic import preprocess as preprocess_canvas
from ..dense.segmenter import (
    INFO_FILE,
    SEGMENTER_CONFIG,
    WEIGHTS_FILE,
    LinearSegmenter,
    build_reference_segmenter,
    init_from_classifier,
)
from ..models.reference import load_fashion_mnist, load_reference_model
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
    random weights, anything else is a segmenter checkpoint (safetensors) to continue from.  An epoch is
    one pass over the 60k training items (15k canvases).  After every epoch the first ``eval_canvases``
    canvases of the evaluation set are scored; the export is scored on all of them.
    """
    from ..dense.mosaic import mosaic_testset

    if threads:
        torch.set_num_threads(threads)
    train_x, train_y = load_fashion_mnist(data_dir, "train")
    test_canvas, test_target = mosaic_testset()
    torch.manual_seed(seed)
    model = build_reference_segmenter()
    if init == "classifier":
        init_from_classifier(model, load_reference_model())
    elif init is not None:
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(init).items()})
    batch_items = canvases_per_batch * ITEMS_PER_CANVAS
    steps_per_epoch = len(train_x) // batch_items
    config = TrainConfig(
        out_dir=out_dir,
        epochs=epochs,
        batch_size=batch_items,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        grad_clip=None,
        seed=seed,
        checkpoint_every=100,
        log_every=20,
        resume=resume,
        stop_at_step=stop_at_step,
        compile=compile,
        amp=amp,
        progress=progress,
        extra={"task": "segmentation", "init": init},
    )
    subset = (test_canvas[:eval_canvases], test_target[:eval_canvases])
    with unfused_attention(model):
        result = train(model, SegmentationTask(), TensorDataset(train_x, train_y), config,
                       evaluate=lambda m: evaluate_segmenter(m, *subset))
    out = Path(out_dir)
    info = {
        "model": "tokenreduce.dense.segmenter.LinearSegmenter(timm VisionTransformer)",
        "config": SEGMENTER_CONFIG,
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
    if result.complete:
        model.eval()
        info["eval"] = {**evaluate_segmenter(model, test_canvas, test_target), "canvases": len(test_canvas)}
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
        (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


__all__ = ["SegmentationTask", "evaluate_segmenter", "train_reference_segmenter", "LinearSegmenter"]
