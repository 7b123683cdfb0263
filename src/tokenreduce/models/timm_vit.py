"""Adapter for timm ``VisionTransformer`` models (ViT, DeiT, distilled DeiT, DeiT-III, ...).

Patching follows ToMe/tomesd: the classes of the live model and of its blocks are
swapped for generated subclasses whose ``forward`` routes the tokens through the
reducer; no weight is copied and ``state_dict()`` is unchanged.  Removing the
patch restores the original classes, so the stock forward runs again, bit for bit.

Per-forward state (sizes, sources, token counts) lives in one
:class:`ReductionContext` shared by the model and its blocks; block 0 resets it.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..budget import CostModel
from ..methods.base import ModelInfo, Reducer
from ..ops.attention import NO_NEEDS, attention_with_signals, size_bias
from ..state import TokenState
from ..stats import LastForward

SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "")
SUPPORTED_FAMILIES = (
    "timm VisionTransformer models built from timm Block and Attention modules: ViT, DeiT, "
    "distilled DeiT, DeiT-III (LayerScale), ViTs with q/k-norm, scale-norm or register tokens; "
    f"global_pool in {[p for p in SUPPORTED_POOLS if p]} or ''"
)


class ReductionContext:
    """State shared by a reduced model and its blocks during one forward."""

    def __init__(self, reducer: Reducer, info: ModelInfo, method: str, trace_source: bool) -> None:
        self.reducer = reducer
        self.info = info
        self.method = method
        self.trace_source = trace_source
        depth = info.depth
        self.needs = [reducer.needs(i) for i in range(depth)]
        self.has_before = [reducer.has_before_block(i) for i in range(depth)]
        self.size: Tensor | None = None
        self.source: Tensor | None = None
        self.mask: Tensor | None = None
        self.bias: Tensor | None = None
        self._bias_of: Tensor | None = None
        self.rows: Tensor | None = None
        self._rows_of: Tensor | None = None
        self.enabled = True  # False: the model runs its stock forward (e.g. as its own distillation teacher)
        self.num_tokens_in = 0
        self.batch_size = 0
        self.records: list[tuple[Any, Any] | None] = [None] * depth
        self.stages: list[tuple[str, Tensor]] = []

    def start(self, x: Tensor, training: bool) -> None:
        """Reset for a new forward whose first block receives ``x`` (B×N×C)."""
        b, n, _ = x.shape
        self.reducer.training = training
        module = self.reducer.module
        if module is not None:  # learned parameters follow the activations (the model may have moved)
            first = next(module.parameters(), None)
            if first is not None and first.device != x.device:
                module.to(x.device)
        self.size = self.mask = None
        self.bias = self._bias_of = None
        self.rows = self._rows_of = None
        self.source = None
        if self.trace_source:
            self.source = torch.eye(n, device=x.device, dtype=x.dtype).expand(b, n, n)
        self.num_tokens_in = n
        self.batch_size = b
        self.records = [None] * self.info.depth
        self.stages: list[tuple[str, Tensor]] = []  # with trace_source: (label, B×N×N0 sources) per reduction

    def key_bias(self) -> Tensor | None:
        """``log size`` for proportional attention, recomputed only when sizes change."""
        if not self.reducer.prop_attn or self.size is None:
            return None
        if self._bias_of is not self.size:
            self.bias, self._bias_of = size_bias(self.size), self.size
        return self.bias

    def packed_rows(self, training: bool) -> Tensor | None:
        """For padded batched inference (a hard mask, eval mode): the rows of the live tokens
        in the B·N flattening of the current mask (ΣN), cached per mask; else ``None``.

        Finding them syncs with the host once per new mask (their number is data-dependent).
        """
        if self.mask is None or training or self.reducer.key_mask(self.mask).soft:
            return None
        if self._rows_of is not self.mask:
            self.rows, self._rows_of = self.mask.reshape(-1).nonzero().squeeze(1), self.mask
        return self.rows

    def snapshot(self, label: str) -> None:
        """Keep the live tokens' sources after a reduction (for token maps)."""
        source = self.source if self.mask is None else self.source * self.mask.to(self.source.dtype)
        self.stages.append((label, source))

    def state(self, x: Tensor) -> TokenState:
        return TokenState(x, self.size, self.source, self.info.num_prefix, self.mask)

    def update(self, state: TokenState) -> Tensor:
        self.size, self.source, self.mask = state.size, state.source, state.mask
        return state.x

    def last_forward(self) -> LastForward:
        """The record of the last reduced forward.

        Raises:
            RuntimeError: no reduced forward has run since the method was applied.
        """
        if self.records[0] is None or any(r is None for r in self.records):
            raise RuntimeError("the reduced model has not run a forward yet (call model(images) first)")
        return LastForward(
            method=self.method,
            batch_size=self.batch_size,
            num_tokens_in=self.num_tokens_in,
            num_prefix=self.info.num_prefix,
            block_tokens=tuple(self.records),
            size=self.size,
            source=self.source,
            mask=self.mask,
            stages=tuple(self.stages),
        )

    def count(self, x: Tensor) -> int | Tensor:
        """Live tokens per image: an int, or a B tensor when a mask is carried."""
        return x.shape[1] if self.mask is None else self.mask.sum(dim=(1, 2))


def _block_forward(self: Block, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """timm ``Block.forward`` with the reducer's hooks around the attention."""
    if attn_mask is not None or is_causal:
        raise NotImplementedError("tokenreduce: attention masks / causal attention are not supported on reduced models")
    ctx: ReductionContext = self._tr_ctx
    if not ctx.enabled:
        return self._tr_base.forward(self, x)
    i: int = self._tr_index
    if i == 0:
        ctx.start(x, self.training)
    reducer = ctx.reducer
    if ctx.has_before[i]:
        x = ctx.update(reducer.before_block(i, ctx.state(x)))
        if ctx.trace_source:
            ctx.snapshot(f"before block {i}")
    n_attn = ctx.count(x)
    needs = ctx.needs[i]
    key_mask = None if ctx.mask is None else reducer.key_mask(ctx.mask)
    rows = ctx.packed_rows(self.training)
    if rows is None:
        out, signals = attention_with_signals(
            self.attn, self.norm1(x), ctx.key_bias(), needs or NO_NEEDS, key_mask, class_token=ctx.info.has_class_token
        )
        x = x + self.drop_path1(self.ls1(out))
    else:  # padded batched inference: per-token work on the live tokens only
        live = x.reshape(-1, x.shape[-1]).index_select(0, rows)
        out, signals = attention_with_signals(
            self.attn, self.norm1(live), ctx.key_bias(), needs or NO_NEEDS, key_mask, rows,
            class_token=ctx.info.has_class_token,
        )
        x = _add_to_rows(x, rows, self.drop_path1(self.ls1(out)))
    del out  # free the attention output before the MLP, as the stock block does
    if needs is not None:
        x = ctx.update(reducer.reduce(i, ctx.state(x), signals))
        if ctx.trace_source:
            ctx.snapshot(f"block {i}")
    del signals  # keys / values / probabilities are not needed by the MLP
    ctx.records[i] = (n_attn, ctx.count(x))
    rows = ctx.packed_rows(self.training)
    if rows is not None:
        # The MLP is per-token: run it on the live tokens of all images packed into
        # one ΣN×C matrix, so padding rows cost nothing; they keep their values.
        live = x.reshape(-1, x.shape[-1]).index_select(0, rows)
        return _add_to_rows(x, rows, self.drop_path2(self.ls2(self.mlp(self.norm2(live)))))
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _add_to_rows(x: Tensor, rows: Tensor, update: Tensor) -> Tensor:
    """``x`` (B×N×C) plus ``update`` (ΣN×C) on the flattened ``rows``; other rows unchanged."""
    flat = x.reshape(-1, x.shape[-1])
    return flat.index_add(0, rows, update.to(flat.dtype)).view_as(x)


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


def _grid_entry_point(name: str) -> Any:
    """A stand-in for a timm entry point that reshapes the tokens into the patch grid.

    On a reduced model the surviving tokens no longer fill that grid, so the stand-in
    refuses (inside :func:`tokenreduce.unreduced` the stock method runs).
    """

    def refuse(self: VisionTransformer, *args: Any, **kwargs: Any) -> Any:
        if not self._tr_ctx.enabled:
            return getattr(self._tr_base, name)(self, *args, **kwargs)
        raise NotImplementedError(
            f"{name} on a reduced model: the reduced tokens no longer fill the patch grid it returns, so its "
            f"result would be wrong; run it on the stock model (tokenreduce.remove, or inside "
            f"tokenreduce.unreduced(model)), or use forward_features for the reduced tokens (B×N'×C)"
        )

    refuse.__name__ = name
    return refuse


def _shape_change(name: str) -> Any:
    """A stand-in for a timm method that changes what the applied reducer was built for."""

    def refuse(self: VisionTransformer, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{name} on a reduced model would leave the applied method configured for the old model; "
            f"call tokenreduce.remove(model), then {name}, then tokenreduce.apply again"
        )

    refuse.__name__ = name
    return refuse


_MODEL_MEMBERS: dict[str, Any] = {
    "pool": _model_pool,
    "forward_intermediates": _grid_entry_point("forward_intermediates"),
    "get_intermediate_layers": _grid_entry_point("get_intermediate_layers"),
    **{name: _shape_change(name) for name in (
        "set_input_size", "reset_classifier", "prune_intermediate_layers", "set_grad_checkpointing")},
}
"""Members of the generated model class: size-weighted pooling, and refusals of the timm methods whose
results a reduction would silently make wrong (grid-shaped outputs, changes of the model's shape)."""

_CLASS_CACHE: dict[tuple[type, str], type] = {}
"""Generated subclasses, one per (stock class, kind); bounded by the number of model and block classes used."""


def _reduced_class(base: type, kind: str, members: dict[str, Any]) -> type:
    key = (base, kind)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"TokenReduce{base.__name__}", (base,), {**members, "_tr_base": base})
    return _CLASS_CACHE[key]


def is_patched(model: nn.Module) -> bool:
    """Whether a method is applied to ``model``."""
    return isinstance(getattr(model, "_tr_ctx", None), ReductionContext)


def context_of(model: nn.Module) -> ReductionContext:
    """The reduction context of a patched model.

    Raises:
        RuntimeError: no method is applied to ``model``.
    """
    ctx = getattr(model, "_tr_ctx", None)
    if not isinstance(ctx, ReductionContext):
        raise RuntimeError("the model has no method applied (call tokenreduce.apply first)")
    return ctx


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` naming the supported families if ``model`` cannot be adapted."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"tokenreduce cannot adapt {type(model).__name__}; supported: {SUPPORTED_FAMILIES}")
    for i, blk in enumerate(model.blocks):
        blk_cls = getattr(blk, "_tr_base", type(blk))  # a patched block is checked as its stock class
        if not issubclass(blk_cls, Block) or blk_cls.forward is not Block.forward:
            raise TypeError(
                f"tokenreduce cannot adapt block {i} of type {type(blk).__name__}; supported: {SUPPORTED_FAMILIES}"
            )
        if not isinstance(blk.attn, Attention) or type(blk.attn).forward is not Attention.forward:
            raise TypeError(
                f"tokenreduce cannot adapt attention {type(blk.attn).__name__} in block {i}; "
                f"supported: {SUPPORTED_FAMILIES}"
            )
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in SUPPORTED_POOLS:
        raise TypeError(
            f"tokenreduce cannot adapt global_pool={model.global_pool!r}; supported: {SUPPORTED_FAMILIES}"
        )
    if model.global_pool in ("avg", "avgmax") and not hasattr(model, "pool"):
        raise TypeError("tokenreduce needs timm >= 1.0.15 for size-weighted average pooling")


def model_info(model: VisionTransformer) -> ModelInfo:
    """The facts a reducer may use about ``model``."""
    first = model.blocks[0]
    return ModelInfo(
        depth=len(model.blocks),
        dim=model.embed_dim,
        num_heads=first.attn.num_heads,
        num_prefix=model.num_prefix_tokens,
        num_patches=model.patch_embed.num_patches,
        cost=CostModel.from_model(model),
        num_classes=getattr(model, "num_classes", 0) or 0,
        has_class_token=getattr(model, "cls_token", None) is not None,
        architecture=str((getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")),
    )


def patch(model: VisionTransformer, reducer: Reducer, method: str, trace_source: bool = False) -> None:
    """Route ``model``'s blocks through ``reducer`` (in place)."""
    if getattr(model, "grad_checkpointing", False):
        raise ValueError(
            "tokenreduce cannot reduce a model with gradient checkpointing on (the recomputed blocks would see "
            "the token bookkeeping of the end of the forward); call model.set_grad_checkpointing(False) first"
        )
    ctx = ReductionContext(reducer, reducer.info, method, trace_source)
    model.__class__ = _reduced_class(type(model), "model", _MODEL_MEMBERS)
    model._tr_ctx = ctx
    for i, blk in enumerate(model.blocks):
        blk.__class__ = _reduced_class(type(blk), "block", {"forward": _block_forward})
        blk._tr_ctx = ctx
        blk._tr_index = i


def unpatch(model: nn.Module) -> None:
    """Undo :func:`patch`; a no-op on an unpatched model."""
    if not is_patched(model):
        return
    for blk in model.blocks:
        if hasattr(blk, "_tr_base"):
            blk.__class__ = blk._tr_base
        for attr in ("_tr_ctx", "_tr_index"):
            blk.__dict__.pop(attr, None)
    model.__class__ = model._tr_base
    model.__dict__.pop("_tr_ctx", None)
