"""Adapters for Hugging Face ViT, DeiT and DINOv2 (``pip install "tokenreduce[hf]"``).

Supported classes (transformers >= 5.18):

* ``ViTModel``, ``ViTForImageClassification`` (family ``hf-vit``): one class token; the classifier
  reads token 0 after the final layernorm, ``ViTModel``'s pooler too.
* ``DeiTModel``, ``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``
  (``hf-deit``): HF's DeiT always embeds a class and a distillation token, so 2 prefix tokens; the
  heads read tokens 0 and 1.
* ``Dinov2Model``, ``Dinov2ForImageClassification`` (``hf-dinov2``): LayerScale and drop path on
  both branches; the classifier concatenates the class token with the MEAN of the patch tokens,
  which on a reduced model weights every token by how many patches it stands for (and by its
  live mask), as the stock mean weighted every patch once.

* ``Dinov2Backbone`` (``hf-dinov2``), the feature-map backbone of dense heads (DPT, Depth Anything):
  its feature maps reshape every stage's tokens into the patch grid, so it is reduced only with
  restoration (``tokenreduce.apply(..., restore="frozen" | "fusion")``); every stage's output is
  then the restored grid while the layers run on the reduced tokens.

Refused: the masked-image-modeling heads (they reshape the tokens into the patch grid, which
reduced tokens no longer fill) and ``Dinov2WithRegisters`` (another module).
What the model's outputs hold after reduction (``last_hidden_state``, ``hidden_states``, refused
arguments) is described in :mod:`tokenreduce.models.hf`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .hf import HFAdapter, classifier_output, token_mean

_GRID = "it reshapes the tokens into the patch grid, which reduced tokens no longer fill"


class _ViTLike(HFAdapter):
    """ViT and DeiT layers: ``layernorm_before → attention → dropout → residual → layernorm_after →
    mlp → dropout → residual``."""

    layer_class = ""
    head_names = ("classifier", "cls_classifier", "distillation_classifier")

    @classmethod
    def head_modules(cls, model: nn.Module) -> list[nn.Module]:
        heads = [getattr(model, name) for name in cls.head_names if isinstance(getattr(model, name, None), nn.Module)]
        pooler = getattr(cls.backbone(model), "pooler", None)
        return heads + ([pooler] if pooler is not None else [])

    @classmethod
    def num_classes(cls, model: nn.Module) -> int:
        has_head = any(hasattr(model, name) for name in cls.head_names)
        return int(getattr(model.config, "num_labels", 0) or 0) if has_head else 0

    @classmethod
    def attention_residual(cls, block: nn.Module, out: Tensor) -> Tensor:
        return block.dropout(out)

    @classmethod
    def mlp(cls, block: nn.Module, x: Tensor) -> Tensor:
        return block.dropout(block.mlp(block.layernorm_after(x)))


class HFViT(_ViTLike):
    """Hugging Face ``ViTModel`` / ``ViTForImageClassification``."""

    name = "hf-vit"
    description = "Hugging Face ViTModel, ViTForImageClassification (transformers >= 5.18)"
    module_prefix = "transformers.models.vit."
    classes = {"ViTModel": "", "ViTForImageClassification": "vit"}
    refused = {"ViTForMaskedImageModeling": _GRID}
    layer_class = "ViTLayer"


class HFDeiT(_ViTLike):
    """Hugging Face DeiT (class + distillation token: 2 prefix tokens)."""

    name = "hf-deit"
    description = ("Hugging Face DeiTModel, DeiTForImageClassification, DeiTForImageClassificationWithTeacher "
                   "(transformers >= 5.18)")
    module_prefix = "transformers.models.deit."
    classes = {"DeiTModel": "", "DeiTForImageClassification": "deit", "DeiTForImageClassificationWithTeacher": "deit"}
    refused = {"DeiTForMaskedImageModeling": _GRID}
    layer_class = "DeiTLayer"
    num_prefix = 2


def _dinov2_classifier_forward(self: nn.Module, pixel_values: Tensor | None = None, labels: Tensor | None = None,
                               attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
    """``Dinov2ForImageClassification.forward`` with the patch-token mean weighted by size and mask."""
    return_dict = kwargs.pop("return_dict", None)
    outputs = self.dinov2(pixel_values, attention_mask=attention_mask, **kwargs)
    tokens = outputs.last_hidden_state  # B×N'×C
    features = torch.cat([tokens[:, 0], token_mean(self._tr_ctx, tokens, 1)], dim=1)  # B×2C
    return classifier_output(self, self.classifier(features), labels, outputs, return_dict, **kwargs)


class HFDinov2(HFAdapter):
    """Hugging Face DINOv2 (LayerScale, drop path; a class token and patch tokens, no registers)."""

    name = "hf-dinov2"
    description = "Hugging Face Dinov2Model, Dinov2ForImageClassification, Dinov2Backbone (transformers >= 5.18)"
    module_prefix = "transformers.models.dinov2."
    classes = {"Dinov2Model": "", "Dinov2ForImageClassification": "dinov2", "Dinov2Backbone": ""}
    grid_classes = {"Dinov2Backbone": "its feature maps reshape every stage's tokens into the patch grid"}
    layers_path = "encoder.layer"
    layer_class = "Dinov2Layer"
    norm1_name = "norm1"
    norm2_name = "norm2"

    @classmethod
    def head_modules(cls, model: nn.Module) -> list[nn.Module]:
        head = getattr(model, "classifier", None)
        return [head] if isinstance(head, nn.Module) else []

    @classmethod
    def reduced_forward(cls, base: type) -> Callable[..., Any] | None:
        return _dinov2_classifier_forward if base.__name__ == "Dinov2ForImageClassification" else None

    @classmethod
    def attention_residual(cls, block: nn.Module, out: Tensor) -> Tensor:
        return block.drop_path(block.layer_scale1(out))

    @classmethod
    def mlp(cls, block: nn.Module, x: Tensor) -> Tensor:
        return block.drop_path(block.layer_scale2(block.mlp(block.norm2(x))))
