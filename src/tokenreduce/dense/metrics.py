"""Segmentation metrics from a confusion matrix: mIoU, pixel accuracy, bootstrap intervals."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """int64 K×K counts: row = true class, column = predicted class; ``ignore_index`` pixels are skipped.

    Args:
        pred, target: int64 tensors of the same shape (e.g. B×H×W).

    Raises:
        ValueError: shapes differ, or a label is neither a class nor ``ignore_index``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and labels {tuple(target.shape)} differ in shape")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)][0].item()
        raise ValueError(
            f"label {bad} is outside the {num_classes} classes (0–{num_classes - 1}, {ignore_index} = ignore)"
        )
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of one confusion matrix.

    Attributes:
        miou: mean IoU over the classes present in the truth or the prediction.
        miou_foreground: the same over the classes other than ``background`` (index 0).
        pixel_accuracy: correct pixels / counted pixels.
        iou: per-class IoU (NaN for a class absent from both truth and prediction).
    """

    miou: float
    miou_foreground: float
    pixel_accuracy: float
    iou: tuple[float, ...]


def scores(confusion: Tensor) -> SegmentationScores:
    """mIoU, foreground mIoU and pixel accuracy of a K×K confusion matrix (rows = truth).

    A class's IoU is ``TP / (TP + FP + FN)``; a class absent from both truth and prediction
    (denominator 0) is left out of the means.
    """
    c = confusion.double()
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = c.sum()
    return SegmentationScores(
        miou=float(iou.nanmean()),
        miou_foreground=float(iou[1:].nanmean()),
        pixel_accuracy=float(tp.sum() / total) if total > 0 else float("nan"),
        iou=tuple(float(v) for v in iou),
    )


def bootstrap_miou(per_image: Tensor, rounds: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """A percentile bootstrap interval of the mIoU over images.

    Args:
        per_image: int64 M×K×K confusion matrices, one per image (canvas).

    Returns:
        ``(low, high)`` mIoU bounds at ``level``.
    """
    gen = torch.Generator().manual_seed(seed)
    m = per_image.shape[0]
    values = []
    flat = per_image.reshape(m, -1).double()
    for _ in range(rounds):
        pick = torch.randint(0, m, (m,), generator=gen)
        total = torch.bincount(pick, minlength=m).double() @ flat
        values.append(scores(total.view_as(per_image[0])).miou)
    v = torch.tensor(values)
    tail = (1 - level) / 2
    return float(v.quantile(tail)), float(v.quantile(1 - tail))
