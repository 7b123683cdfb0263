"""Training tasks: what to train and which loss to minimise, separate from the loop.

The engine only needs a :class:`Task`: the parameters to optimise and a loss of
``(model, batch)``.  Classification is one task; learned token-reduction methods
(thresholds, scorers, predictors on a frozen backbone, extra loss terms) are others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Task(Protocol):
    """What the engine trains.

    ``trainable_parameters`` is called once on the bare model (never the DDP or
    compiled wrapper); every other parameter is frozen.  ``loss`` is called every
    step with the module to run (possibly wrapped) and one batch from the loader,
    and returns the scalar loss and a dict of floats to log.
    """

    def trainable_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]: ...


def logits_of(output: Any) -> Tensor:
    """The B×classes logits of a model's output: the tensor itself (timm), or its ``logits`` (a Hugging
    Face classification output).

    Raises:
        TypeError: the output holds no logits (a backbone without a classifier head).
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"training needs class logits, but the model returns {type(output).__name__} without them; "
            "train a classification model (e.g. ViTForImageClassification rather than ViTModel)"
        )
    return logits


class ClassificationTask:
    """Cross-entropy on ``(images, labels)`` batches, all parameters trained.

    Args:
        transform: applied to the image batch before the forward (augmentation,
            normalisation); ``uint8`` B×H×W or B×C×H×W in, float B×C×H'×W' out.
            It may draw from torch's global RNG, which the engine checkpoints.
        label_smoothing: as in ``F.cross_entropy``.
    """

    def __init__(self, transform: Callable[[Tensor], Tensor] | None = None, label_smoothing: float = 0.0) -> None:
        self.transform = transform
        self.label_smoothing = label_smoothing

    def trainable_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        images, labels = batch
        if self.transform is not None:
            images = self.transform(images)
        logits = logits_of(model(images))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean().item()
        return loss, {"train_acc": acc}
