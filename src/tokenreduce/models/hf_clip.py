"""Adapters for Hugging Face CLIP and SigLIP vision towers (``pip install "tokenreduce[hf]"``).

Supported classes (transformers >= 5.18):

* ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPForImageClassification``
  (family ``hf-clip``): one class token; ``pooler_output`` is the class token after
  ``post_layernorm`` (``image_embeds`` its projection); ``last_hidden_state`` is not post-normed,
  as in the stock model.  ``CLIPForImageClassification`` averages the patch tokens, weighted by
  size and live mask on a reduced model.
* ``SiglipVisionModel``, ``SiglipForImageClassification`` (``hf-siglip``): no class token
  (``has_class_token=False``: class-attention methods score tokens by the attention they receive),
  so every token may be reduced.  The attention-pool head (``SiglipMultiheadAttentionPoolingHead``,
  an ``nn.MultiheadAttention`` with one probe query) is given the reduced tokens with their sizes
  as proportional attention weights them (``log size`` added to each key's logit: a token standing
  for s identical patches gets the weight the s patches had) and never attends to removed (masked)
  tokens; the classifier's token mean is weighted by size and mask.

For the two-tower ``CLIPModel`` / ``SiglipModel`` reduce the vision tower:
``tr.apply(model.vision_model, ...)``.  What the outputs hold after reduction is described in
:mod:`tokenreduce.models.hf`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..budget import linear_macs
from ..ops.attention import NO_NEEDS, attend, merge_heads, size_bias
from .base import ReductionContext
from .hf import HFAdapter, classifier_output, split_heads, token_mean

_TOWERS = "it holds the text tower too: reduce its vision tower, tokenreduce.apply(model.vision_model, ...)"


class _EncoderLayers(HFAdapter):
    """CLIP-style layers: ``layer_norm1 → self_attn → residual → layer_norm2 → mlp → residual``."""

    layers_path = "encoder.layers"
    attn_name = "self_attn"
    norm1_name = "layer_norm1"
    norm2_name = "layer_norm2"
    out_proj_name = "out_proj"
    scale_name = "scale"
    dropout_name = "dropout"
    head_names: tuple[str, ...] = ("classifier",)

    @classmethod
    def patch_embedding(cls, model: nn.Module) -> nn.Module:
        return cls.backbone(model).embeddings.patch_embedding

    @classmethod
    def num_patches(cls, model: nn.Module) -> int:
        return int(cls.backbone(model).embeddings.num_patches)

    @classmethod
    def head_modules(cls, model: nn.Module) -> list[nn.Module]:
        return [getattr(model, n) for n in cls.head_names if isinstance(getattr(model, n, None), nn.Module)]


def _clip_classifier_forward(self: nn.Module, pixel_values: Tensor | None = None, labels: Tensor | None = None,
                             **kwargs: Any) -> Any:
    """``CLIPForImageClassification.forward`` with the patch-token mean weighted by size and mask."""
    return_dict = kwargs.pop("return_dict", None)
    outputs = self.vision_model(pixel_values, **kwargs)
    logits = self.classifier(token_mean(self._tr_ctx, outputs.last_hidden_state, 1))
    return classifier_output(self, logits, labels, outputs, return_dict)


class HFCLIPVision(_EncoderLayers):
    """Hugging Face CLIP vision tower."""

    name = "hf-clip"
    final_norm_name = None  # post_layernorm is applied to the pooled token only
    description = ("Hugging Face CLIPVisionModel, CLIPVisionModelWithProjection, CLIPForImageClassification "
                   "(transformers >= 5.18)")
    module_prefix = "transformers.models.clip."
    classes = {"CLIPVisionModel": "", "CLIPVisionModelWithProjection": "vision_model",
               "CLIPForImageClassification": "vision_model"}
    refused = {"CLIPModel": _TOWERS, "CLIPTextModel": "it is a text model",
               "CLIPTextModelWithProjection": "it is a text model"}
    layer_class = "CLIPEncoderLayer"
    head_names = ("visual_projection", "classifier")

    @classmethod
    def reduced_forward(cls, base: type) -> Callable[..., Any] | None:
        return _clip_classifier_forward if base.__name__ == "CLIPForImageClassification" else None


def _pool_head_forward(self: nn.Module, hidden_state: Tensor) -> Tensor:
    """``SiglipMultiheadAttentionPoolingHead.forward`` on B×N×C reduced tokens: the probe attends to
    every token with its ``log size`` added to the key's logit and never to a removed one; B×C.

    With no size other than 1 and no mask it is the stock forward (the same numbers)."""
    ctx: ReductionContext = self._tr_ctx
    if not ctx.enabled or ctx.size is None and ctx.mask is None:
        return self._tr_base.forward(self, hidden_state)
    mha: nn.MultiheadAttention = self.attention
    b = hidden_state.shape[0]
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    q = split_heads(F.linear(self.probe.expand(b, -1, -1), w_q, b_q), mha.head_dim)  # B×H×1×d
    k = split_heads(F.linear(hidden_state, w_k, b_k), mha.head_dim)  # B×H×N×d
    v = split_heads(F.linear(hidden_state, w_v, b_v), mha.head_dim)
    key_mask = ctx.key_mask()
    if key_mask is not None:  # the probe is not a key: no diagonal to keep
        key_mask = dataclasses.replace(key_mask, keep_diagonal=False)
    dropout = nn.Dropout(mha.dropout) if mha.training and mha.dropout > 0 else None
    out, _ = attend(q, k, v, mha.head_dim ** -0.5, size_bias(ctx.size), NO_NEEDS, key_mask, class_token=False,
                    training=mha.training, dropout=dropout, fused=True)
    out = mha.out_proj(merge_heads(out))  # B×1×C
    out = out + self.mlp(self.layernorm(out))
    return out[:, 0]


def _siglip_classifier_forward(self: nn.Module, pixel_values: Tensor | None = None, labels: Tensor | None = None,
                               interpolate_pos_encoding: bool = False, **kwargs: Any) -> Any:
    """``SiglipForImageClassification.forward`` with the token mean weighted by size and mask."""
    return_dict = kwargs.pop("return_dict", None)
    outputs = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
    logits = self.classifier(token_mean(self._tr_ctx, outputs.last_hidden_state, 0))
    return classifier_output(self, logits, labels, outputs, return_dict)


class HFSiglipVision(_EncoderLayers):
    """Hugging Face SigLIP vision tower (no class token; attention-pool head)."""

    name = "hf-siglip"
    final_norm_name = "post_layernorm"
    description = "Hugging Face SiglipVisionModel, SiglipForImageClassification (transformers >= 5.18)"
    module_prefix = "transformers.models.siglip."
    classes = {"SiglipVisionModel": "", "SiglipForImageClassification": "vision_model"}
    refused = {"SiglipModel": _TOWERS, "SiglipTextModel": "it is a text model"}
    layer_class = "SiglipEncoderLayer"
    num_prefix = 0
    has_class_token = False

    @classmethod
    def pool_head(cls, model: nn.Module) -> nn.Module | None:
        backbone = cls.backbone(model)
        return getattr(backbone, "head", None) if getattr(backbone, "use_head", False) else None

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        head = cls.pool_head(model)
        if head is not None and (type(head._tr_base if hasattr(head, "_tr_base") else head).__name__
                                 != "SiglipMultiheadAttentionPoolingHead"
                                 or not isinstance(getattr(head, "attention", None), nn.MultiheadAttention)
                                 or not head.attention.batch_first or not head.attention._qkv_same_embed_dim):
            raise TypeError(f"tokenreduce cannot weight the reduced tokens in the head {type(head).__name__} "
                            f"(expected a stock SiglipMultiheadAttentionPoolingHead); supported: {cls.description}")

    @classmethod
    def patched_modules(cls, model: nn.Module) -> Sequence[tuple[nn.Module, dict[str, Any]]]:
        head = cls.pool_head(model)
        return [] if head is None else [(head, {"forward": _pool_head_forward})]

    @classmethod
    def pool_cost(cls, model: nn.Module) -> tuple[int, int]:
        """The probe's query projection, the output projection and the MLP once per image; the key
        and value projections and the one-query attention (``2·C``) once per token."""
        head = cls.pool_head(model)
        if head is None:
            return 0, 0
        dim = head.attention.embed_dim
        return dim * dim + linear_macs(head), 2 * dim * dim + 2 * dim

    @classmethod
    def reduced_forward(cls, base: type) -> Callable[..., Any] | None:
        return _siglip_classifier_forward if base.__name__ == "SiglipForImageClassification" else None
