"""Adapter for timm ``VisionTransformer`` models (ViT, DeiT, distilled DeiT, DeiT-III, ...).

Blocks are timm ``Block``s with timm ``Attention``: pre-norm attention and MLP branches, each with
an optional LayerScale and drop path.  Pooling: class token, or average / max / avg+max pooling,
which on a reduced model weights every token by how many patches it stands for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..budget import CostModel, linear_macs
from ..methods.base import ModelInfo
from ..ops.attention import AttentionNeeds, AttentionSignals, KeyMask, attention_with_signals
from .base import FamilyAdapter, ReductionContext, grid_entry_point, run_block, shape_change

SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "")


def _block_forward(self: Block, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """timm ``Block.forward`` with the reducer's hooks around the attention."""
    if attn_mask is not None or is_causal:
        raise NotImplementedError("tokenreduce: attention masks / causal attention are not supported on reduced models")
    return run_block(self, x, lambda tokens: self._tr_base.forward(self, tokens))


def _model_pool(self: VisionTransformer, x: Tensor, pool_type: str | None = None) -> Tensor:
    """timm ``pool`` with average pooling weighted by how many patches each token stands for."""
    base = self._tr_base
    pool_type = self.global_pool if pool_type is None else pool_type
    ctx: ReductionContext = self._tr_ctx
    if not ctx.enabled or ctx.size is None and ctx.mask is None or getattr(self, "attn_pool", None) is not None:
        return base.pool(self, x, pool_type)
    if pool_type not in ("avg", "avgmax", "max"):
        return base.pool(self, x, pool_type)
    p = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
    state = ctx.state(x)
    weights = state.sizes()[:, p:] if ctx.mask is None else state.sizes()[:, p:] * ctx.mask[:, p:]
    tokens, weights = x[:, p:], weights.to(x.dtype)
    peak = tokens.masked_fill(weights == 0, -torch.inf).amax(dim=1)
    if pool_type == "max":
        return peak
    avg = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
    return 0.5 * (peak + avg) if pool_type == "avgmax" else avg


def timm_cost_model(model: nn.Module, attn_dims: Sequence[int], heads: Sequence[nn.Module]) -> CostModel:
    """The cost model of a timm ViT-like model (patch embedding ``model.patch_embed.proj``, blocks
    with ``attn`` and ``mlp``), with the attention width of each block and the head modules."""
    blocks = list(model.blocks)
    proj = model.patch_embed.proj
    if isinstance(proj, nn.Conv2d):
        patch = proj.out_channels * (proj.in_channels // proj.groups) * proj.kernel_size[0] * proj.kernel_size[1]
    else:
        patch = linear_macs(proj)
    return CostModel(
        attn_linear=tuple(linear_macs(b.attn) for b in blocks),
        attn_dim=tuple(attn_dims),
        mlp_linear=tuple(linear_macs(b.mlp) for b in blocks),
        patch_embed=patch,
        head=sum(linear_macs(h) for h in heads),
    )


class TimmViT(FamilyAdapter):
    """timm ``VisionTransformer``."""

    name = "timm-vit"
    description = (
        "timm VisionTransformer models built from timm Block and Attention modules: ViT, DeiT, "
        "distilled DeiT, DeiT-III (LayerScale), ViTs with q/k-norm, scale-norm or register tokens; "
        f"global_pool in {[p for p in SUPPORTED_POOLS if p]} or ''"
    )
    model_members = {
        "pool": _model_pool,
        "forward_intermediates": grid_entry_point("forward_intermediates"),
        "get_intermediate_layers": grid_entry_point("get_intermediate_layers"),
        **{name: shape_change(name) for name in (
            "set_input_size", "reset_classifier", "prune_intermediate_layers", "set_grad_checkpointing")},
    }

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    @classmethod
    def check_supported(cls, model: nn.Module) -> None:
        for i, blk in enumerate(model.blocks):
            blk_cls = getattr(blk, "_tr_base", type(blk))  # a patched block is checked as its stock class
            if not issubclass(blk_cls, Block) or blk_cls.forward is not Block.forward:
                raise TypeError(f"tokenreduce cannot adapt block {i} of type {type(blk).__name__}; "
                                f"supported: {cls.description}")
            if not isinstance(blk.attn, Attention) or type(blk.attn).forward is not Attention.forward:
                raise TypeError(f"tokenreduce cannot adapt attention {type(blk.attn).__name__} in block {i}; "
                                f"supported: {cls.description}")
        if getattr(model, "attn_pool", None) is not None or model.global_pool not in SUPPORTED_POOLS:
            raise TypeError(f"tokenreduce cannot adapt global_pool={model.global_pool!r}; supported: {cls.description}")
        if model.global_pool in ("avg", "avgmax") and not hasattr(model, "pool"):
            raise TypeError("tokenreduce needs timm >= 1.0.15 for size-weighted average pooling")
        if getattr(model, "grad_checkpointing", False):
            raise ValueError(
                "tokenreduce cannot reduce a model with gradient checkpointing on (the recomputed blocks would see "
                "the token bookkeeping of the end of the forward); call model.set_grad_checkpointing(False) first"
            )

    @classmethod
    def blocks(cls, model: nn.Module) -> Sequence[nn.Module]:
        return list(model.blocks)

    @classmethod
    def model_info(cls, model: nn.Module) -> ModelInfo:
        blocks = list(model.blocks)
        heads = [getattr(model, "head", None), getattr(model, "head_dist", None)]
        return ModelInfo(
            depth=len(blocks),
            dim=model.embed_dim,
            num_heads=blocks[0].attn.num_heads,
            num_prefix=model.num_prefix_tokens,
            num_patches=model.patch_embed.num_patches,
            cost=timm_cost_model(model, [b.attn.qkv.out_features // 3 for b in blocks], [h for h in heads if h]),
            num_classes=getattr(model, "num_classes", 0) or 0,
            has_class_token=getattr(model, "cls_token", None) is not None,
            architecture=str((getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")),
            family=cls.name,
        )

    @classmethod
    def block_forward(cls) -> Callable[..., Any]:
        return _block_forward

    @classmethod
    def attention(
        cls, block: nn.Module, x: Tensor, bias: Tensor | None, needs: AttentionNeeds, key_mask: KeyMask | None,
        packed: Tensor | None, class_token: bool,
    ) -> tuple[Tensor, AttentionSignals]:
        return attention_with_signals(block.attn, block.norm1(x), bias, needs, key_mask, packed, class_token)

    @classmethod
    def attention_residual(cls, block: nn.Module, out: Tensor) -> Tensor:
        return block.drop_path1(block.ls1(out))

    @classmethod
    def mlp(cls, block: nn.Module, x: Tensor) -> Tensor:
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
