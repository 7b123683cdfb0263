"""Adapter for timm ``VisionTransformer`` models (ViT, DeiT, distilled DeiT, DeiT-III, ...).

Blocks are timm ``Block``s with timm ``Attention``: pre-norm attention and MLP branches, each with
an optional LayerScale and drop path.  Pooling: class token, or average / max / avg+max pooling,
which on a reduced model weights every token by how many patches it stands for, or an attention
pool (``global_pool='map'``, SigLIP's ``AttentionPoolLatent``), whose latent queries on a reduced
model see every token with its size as proportional attention does (``log size`` added to its
key's logits, always, as average pooling always weights by size: a token standing for s identical
patches gets the weight the s patches had) and never see removed (masked) tokens.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from timm.layers import Attention, AttentionPoolLatent
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..budget import CostModel, linear_macs
from ..methods.base import ModelInfo
from ..ops.attention import (
    NO_NEEDS,
    AttentionNeeds,
    AttentionSignals,
    KeyMask,
    attend,
    attention_with_signals,
    size_bias,
)
from .base import FamilyAdapter, ReductionContext, grid_entry_point, run_block, shape_change

SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "")


def _block_forward(self: Block, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """timm ``Block.forward`` with the reducer's hooks around the attention."""
    if attn_mask is not None or is_causal:
        raise NotImplementedError("tokenreduce: attention masks / causal attention are not supported on reduced models")
    return run_block(self, x, lambda tokens: self._tr_base.forward(self, tokens))


def _model_pool(self: nn.Module, x: Tensor, pool_type: str | None = None) -> Tensor:
    """timm ``pool`` with average pooling weighted by how many patches each token stands for, and an
    attention pool that sees the tokens' sizes and live masks (over the tokens the family's pool sees)."""
    avg_skip = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
    return size_aware_pool(self, x, pool_type, avg_skip=avg_skip, attn_skip=self._tr_ctx.adapter.pool_skip(self))


def intermediate_blocks(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int]:
    """The blocks whose outputs a call of timm's ``forward_intermediates(x, indices=..., ...)`` returns
    (timm's own ``feature_take_indices``), for the restored grid entry point."""
    bound = inspect.signature(model._tr_base.forward_intermediates).bind(model, *args, **kwargs)
    take, _ = feature_take_indices(len(model.blocks), bound.arguments.get("indices"))
    return list(take)


def size_aware_pool(model: nn.Module, x: Tensor, pool_type: str | None, avg_skip: int, attn_skip: int) -> Tensor:
    """A timm model's ``pool`` on the reduced tokens ``x`` (B×N×C): the stock pool while no token has
    a size other than 1 and none is masked; else size-weighted average / max pooling over the tokens
    after the first ``avg_skip``, or the attention pool over those after the first ``attn_skip``."""
    base = model._tr_base
    pool_type = model.global_pool if pool_type is None else pool_type
    ctx: ReductionContext = model._tr_ctx
    if not ctx.enabled or ctx.size is None and ctx.mask is None:
        return base.pool(model, x, pool_type)
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:
        key_mask = ctx.key_mask()
        if key_mask is not None:  # the latent queries are not keys: nothing to keep on a diagonal
            key_mask = dataclasses.replace(key_mask, mask=key_mask.mask[:, attn_skip:], keep_diagonal=False)
        bias = size_bias(ctx.size)
        return attention_pool(attn_pool, x[:, attn_skip:], None if bias is None else bias[..., attn_skip:], key_mask)
    if pool_type not in ("avg", "avgmax", "max"):
        return base.pool(model, x, pool_type)
    p = avg_skip
    state = ctx.state(x)
    weights = state.sizes()[:, p:] if ctx.mask is None else state.sizes()[:, p:] * ctx.mask[:, p:]
    tokens, weights = x[:, p:], weights.to(x.dtype)
    peak = tokens.masked_fill(weights == 0, -torch.inf).amax(dim=1)
    if pool_type == "max":
        return peak
    avg = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
    return 0.5 * (peak + avg) if pool_type == "avgmax" else avg


def attention_pool(pool: AttentionPoolLatent, x: Tensor, bias: Tensor | None, key_mask: KeyMask | None) -> Tensor:
    """timm ``AttentionPoolLatent.forward`` on B×N×C tokens with a key bias and key mask.

    Args:
        pool: the pool (without a position embedding of its own).
        x: B×N×C tokens it attends over.
        bias: B×1×1×N additive bias on the logits of each key (``log size``), or ``None``.
        key_mask: tokens to leave out (B×N×1), or ``None``.

    Returns:
        B×C pooled features (B×L×C with ``pool_type=''`` and L latents), as timm's forward gives them;
        with neither bias nor mask, the same operations as timm's, so the same numbers.
    """
    b, n, c = x.shape
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
    k, v = pool.kv(x).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    out, _ = attend(q, k, v, pool.scale, bias, NO_NEEDS, key_mask, class_token=False, training=pool.training,
                    fused=pool.fused_attn)
    out = pool.proj_drop(pool.proj(out.transpose(1, 2).reshape(b, pool.latent_len, c)))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        return out[:, 0]
    return out.mean(1) if pool.pool == "avg" else out


def check_attention_pool(model: nn.Module, description: str) -> None:
    """Refuse an ``attn_pool`` :func:`attention_pool` cannot weight (not a position-free ``AttentionPoolLatent``)."""
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is None:
        return
    if type(attn_pool) is not AttentionPoolLatent:
        raise TypeError(
            f"tokenreduce cannot weight the reduced tokens in the attention pool {type(attn_pool).__name__} "
            f"(global_pool={model.global_pool!r}); supported: {description}"
        )
    if attn_pool.pos_embed is not None:
        raise TypeError(
            "tokenreduce cannot adapt an AttentionPoolLatent with its own position embedding (pos_embed='abs'): "
            f"the reduced tokens no longer sit at the positions it adds; supported: {description}"
        )


def attention_pool_cost(pool: nn.Module | None) -> tuple[int, int]:
    """``(per image, per token)`` MACs of an ``AttentionPoolLatent`` (``(0, 0)`` for none): the latent
    queries, output projection and MLP once per image; the key/value projection and the attention
    (``2·L·D`` for L latents of width D) once per token it attends over."""
    if pool is None:
        return 0, 0
    latents = pool.latent_len
    per_image = latents * (linear_macs(pool.q) + linear_macs(pool.proj) + linear_macs(pool.mlp))
    return per_image, linear_macs(pool.kv) + 2 * latents * pool.num_heads * pool.head_dim


def timm_cost_model(model: nn.Module, attn_dims: Sequence[int], heads: Sequence[nn.Module],
                    pool_skip: int = 0) -> CostModel:
    """The cost model of a timm ViT-like model (patch embedding ``model.patch_embed.proj``, blocks
    with ``attn`` and ``mlp``, an optional ``attn_pool`` that skips the first ``pool_skip`` tokens),
    with the attention width of each block and the head modules."""
    blocks = list(model.blocks)
    proj = model.patch_embed.proj
    if isinstance(proj, nn.Conv2d):
        patch = proj.out_channels * (proj.in_channels // proj.groups) * proj.kernel_size[0] * proj.kernel_size[1]
    else:
        patch = linear_macs(proj)
    pool_image, pool_token = attention_pool_cost(getattr(model, "attn_pool", None))
    return CostModel(
        attn_linear=tuple(linear_macs(b.attn) for b in blocks),
        attn_dim=tuple(attn_dims),
        mlp_linear=tuple(linear_macs(b.mlp) for b in blocks),
        patch_embed=patch,
        head=sum(linear_macs(h) for h in heads) + pool_image,
        pool_token=pool_token,
        pool_skip=pool_skip if pool_token else 0,
    )


class TimmFamily(FamilyAdapter):
    """What timm's ViT-like models share (``patch_embed``, ``blocks``, ``norm``, ``head``,
    ``num_prefix_tokens``, ``grad_checkpointing``): their facts, input and final tokens.  Subclasses
    give their block and attention classes, the attention width of a block (:meth:`attn_dim`), the
    classifier modules (:meth:`heads`) and the timm methods that return the patch grid."""

    block_classes: ClassVar[tuple[type, ...]] = ()
    attention_class: ClassVar[type] = nn.Module
    attention_note: ClassVar[str] = ""  # said when a block's attention is another class

    @classmethod
    def members(cls, grid_methods: tuple[str, ...]) -> dict[str, Any]:
        """The generated model class's members: size-aware ``pool``, refusals of ``grid_methods`` and of
        the methods that change the model's shape."""
        return {
            "pool": _model_pool,
            **{name: grid_entry_point(name, intermediate_blocks if name == "forward_intermediates" else None)
               for name in grid_methods},
            **{name: shape_change(name) for name in (
                "set_input_size", "reset_classifier", "prune_intermediate_layers", "set_grad_checkpointing")},
        }

    @classmethod
    def check_supported(cls, model: nn.Module) -> None:
        for i, blk in enumerate(model.blocks):
            blk_cls = getattr(blk, "_tr_base", type(blk))  # a patched block is checked as its stock class
            if not any(issubclass(blk_cls, c) and blk_cls.forward is c.forward for c in cls.block_classes):
                raise TypeError(f"tokenreduce cannot adapt block {i} of type {type(blk).__name__}; "
                                f"supported: {cls.description}")
            attn, expected = blk.attn, cls.attention_class
            if not isinstance(attn, expected) or type(attn).forward is not expected.forward:
                raise TypeError(f"tokenreduce cannot adapt attention {type(attn).__name__} in block {i}"
                                f"{cls.attention_note}; supported: {cls.description}")
        check_attention_pool(model, cls.description)
        if getattr(model, "attn_pool", None) is None and model.global_pool not in SUPPORTED_POOLS:
            raise TypeError(f"tokenreduce cannot adapt global_pool={model.global_pool!r}; supported: {cls.description}")
        cls.check_model(model)
        cls.check_not_checkpointing(model)

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Family-specific refusals (after the blocks and the pool are checked)."""

    @classmethod
    def check_not_checkpointing(cls, model: nn.Module) -> None:
        if getattr(model, "grad_checkpointing", False):
            raise ValueError(
                "tokenreduce cannot reduce a model with gradient checkpointing on (the recomputed blocks would see "
                "the token bookkeeping of the end of the forward); call model.set_grad_checkpointing(False) first"
            )

    @classmethod
    def blocks(cls, model: nn.Module) -> Sequence[nn.Module]:
        return list(model.blocks)

    @classmethod
    def attn_dim(cls, block: nn.Module) -> int:
        raise NotImplementedError

    @classmethod
    def heads(cls, model: nn.Module) -> list[nn.Module]:
        return [model.head]

    @classmethod
    def pool_skip(cls, model: nn.Module) -> int:
        """Leading tokens an attention pool does not see (0: it sees them all)."""
        return 0

    @classmethod
    def model_info(cls, model: nn.Module) -> ModelInfo:
        blocks = list(model.blocks)
        return ModelInfo(
            depth=len(blocks),
            dim=model.embed_dim,
            num_heads=blocks[0].attn.num_heads,
            num_prefix=model.num_prefix_tokens,
            num_patches=model.patch_embed.num_patches,
            cost=timm_cost_model(model, [cls.attn_dim(b) for b in blocks], cls.heads(model),
                                 pool_skip=cls.pool_skip(model)),
            num_classes=getattr(model, "num_classes", 0) or 0,
            has_class_token=getattr(model, "cls_token", None) is not None,
            architecture=str((getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")),
            family=cls.name,
        )

    @classmethod
    def input_size(cls, model: nn.Module) -> tuple[int, int, int]:
        return (model.patch_embed.proj.in_channels, *tuple(model.patch_embed.img_size))

    @classmethod
    def patch_size(cls, model: nn.Module) -> tuple[int, int]:
        return tuple(model.patch_embed.patch_size)

    @classmethod
    def final_tokens_module(cls, model: nn.Module) -> nn.Module:
        return model.norm


class TimmViT(TimmFamily):
    """timm ``VisionTransformer``."""

    name = "timm-vit"
    description = (
        "timm VisionTransformer models built from timm Block and Attention modules: ViT, DeiT, "
        "distilled DeiT, DeiT-III (LayerScale), ViTs with q/k-norm, scale-norm or register tokens; "
        f"global_pool in {[p for p in SUPPORTED_POOLS if p]} or '', or 'map' (AttentionPoolLatent without "
        "a position embedding)"
    )
    model_members = TimmFamily.members(("forward_intermediates", "get_intermediate_layers"))
    block_classes = (Block,)
    attention_class = Attention

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    @classmethod
    def attn_dim(cls, block: nn.Module) -> int:
        return block.attn.qkv.out_features // 3

    @classmethod
    def heads(cls, model: nn.Module) -> list[nn.Module]:
        return [h for h in (getattr(model, "head", None), getattr(model, "head_dist", None)) if h is not None]

    @classmethod
    def pool_skip(cls, model: nn.Module) -> int:
        return 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens

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
