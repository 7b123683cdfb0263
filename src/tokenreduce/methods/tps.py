"""TPS — joint Token Pruning & Squeezing (Wei et al., CVPR 2023), the eTPS variant.

eTPS is EViT's selection followed by TPS's squeeze (specs/methods.md §5): inside
blocks ``layers`` (default 3, 6, 9), after the attention residual, the
``ceil(keep_rate·(N−P))`` patch tokens with the highest head-averaged
class-token attention are kept (in descending score order) and every other
patch token is squeezed into its most similar kept token
(:mod:`tokenreduce.ops.squeeze`).  The output has ``P + ceil(keep_rate·(N−P))``
tokens — EViT's counts without the fused token.

The paper has no proportional attention; ``prop_attn=True`` adds the
``log size`` key bias using the sizes the squeeze accumulates (opt-in).

``variant="dtps"`` is DynamicViT's learned predictor before blocks ``layers``
(:mod:`tokenreduce.methods.dynamicvit`: keep ``int((N−P)·ρ^k)`` at stage k, Gumbel
straight-through masks in training) with the pruned tokens squeezed into their
hosts instead of discarded — at inference with real removal
(:func:`~tokenreduce.ops.squeeze.squeeze_state`), in training at fixed shape
(:func:`~tokenreduce.ops.squeeze.squeeze_masked`).  It is a learned method: load
its predictors with ``checkpoint=``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..ops.attention import AttentionSignals
from ..ops.prune import keep_topk
from ..ops.squeeze import squeeze_masked, squeeze_state
from ..state import TokenState
from .base import ModelInfo, Reducer
from .dynamicvit import DynamicViT
from .evit import KeepRateReducer

VARIANTS = ("etps", "dtps")


@dataclass(frozen=True)
class TPSParams:
    """Parameters of :class:`TPS`.

    Attributes:
        variant: ``"etps"`` (training-free, EViT selection inside blocks) or ``"dtps"``
            (learned predictor before the blocks).
        keep_rate: fraction of the current patch tokens kept at each reduction block (ρ).
        layers: 0-based reduction blocks (the paper's ``prune_loc``).
        temperature: T of the squeeze similarity ``cos / T`` (host self-weight stays e¹).
        prop_attn: proportional attention with the squeezed sizes (not in the paper;
            inference only: dTPS's fixed-shape training form tracks no sizes and refuses it).
    """

    variant: str = "etps"
    keep_rate: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    temperature: float = 1.0
    prop_attn: bool = False


class TPS(KeepRateReducer):
    """eTPS: keep the top class-attention tokens, squeeze the rest into them."""

    name = "tps"
    Params = TPSParams

    @classmethod
    def create(cls, info: ModelInfo, budget: float | None = None, **kwargs: Any) -> Reducer:
        """eTPS, or :class:`DTPS` when ``variant="dtps"``."""
        variant = kwargs.get("variant", "etps")
        if isinstance(variant, str) and variant.lower() == "dtps":
            return DTPS.create(info, budget=budget, **kwargs)
        return super().create(info, budget=budget, **kwargs)

    def __init__(self, info: ModelInfo, params: TPSParams) -> None:
        _check_variant(params.variant, "etps")
        self.temperature = _check_temperature(params.temperature)
        super().__init__(info, params)
        self.prop_attn = bool(params.prop_attn)

    def reduce(self, block: int, state: TokenState, signals: AttentionSignals) -> TokenState:
        keep = self.kept_patches(state)
        if keep is None:
            return state
        cls_attn = self.class_attention(state, signals)
        order = keep_topk(cls_attn, cls_attn.shape[1])  # all patch tokens, descending score
        return squeeze_state(state, order[:, :keep], order[:, keep:], self.temperature)


def _check_variant(variant: Any, expected: str) -> None:
    name = variant.lower() if isinstance(variant, str) else variant
    if name not in VARIANTS:
        raise ValueError(f"tps: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    assert name == expected


def _check_temperature(temperature: Any) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"tps: temperature must be a number > 0, got {temperature!r}")
    return float(temperature)


class DTPS(DynamicViT):
    """dTPS: DynamicViT's predictor and schedule, pruned tokens squeezed into hosts."""

    name = "tps"
    Params = TPSParams

    def __init__(self, info: ModelInfo, params: TPSParams) -> None:
        _check_variant(params.variant, "dtps")
        self.temperature = _check_temperature(params.temperature)
        super().__init__(info, dataclasses.replace(params, variant="dtps"))
        self.prop_attn = bool(params.prop_attn)

    def drop_hard(self, state: TokenState, keep_index: Tensor, drop_index: Tensor) -> TokenState:
        return squeeze_state(state, keep_index, drop_index, self.temperature)

    def drop_soft(self, state: TokenState, keep: Tensor) -> TokenState:
        if self.prop_attn:
            raise ValueError(
                "tps: dTPS's training form keeps the shape fixed and tracks no sizes, so prop_attn=True "
                "(an inference-only option here) cannot be trained; train with prop_attn=False"
            )
        p = state.num_prefix
        live = state.mask[:, p:] if state.mask is not None else torch.ones_like(keep)
        patches = squeeze_masked(state.x[:, p:], keep, live * (1.0 - keep), self.temperature)
        mask = torch.cat([keep.new_ones(keep.shape[0], p, 1), keep], dim=1)
        return TokenState(torch.cat([state.x[:, :p], patches], dim=1), state.size, state.source, p, mask)
