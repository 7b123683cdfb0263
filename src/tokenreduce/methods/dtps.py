"""dTPS — the learned variant of joint Token Pruning & Squeezing (Wei et al., CVPR 2023).

DynamicViT's learned predictor before blocks ``layers``
(:mod:`tokenreduce.methods.dynamicvit`: keep ``int((N−P)·ρ^k)`` at stage k, Gumbel
straight-through masks in training), with the pruned tokens squeezed into their
most similar kept tokens instead of discarded — at inference with real removal
(:func:`~tokenreduce.ops.squeeze.squeeze_state`), in training at fixed shape
(:func:`~tokenreduce.ops.squeeze.squeeze_masked`).  A learned method: load its
predictors with ``checkpoint=``.  ``tps`` with ``variant="dtps"`` is an alias.
See docs/methods.md#tps-etps-and-dtps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..ops.squeeze import squeeze_masked, squeeze_state
from ..state import TokenState
from .base import ModelInfo, Params, block_indices, boolean, checked, fraction, positive
from .dynamicvit import DynamicViT


@dataclass(frozen=True)
class DTPSParams(Params):
    """Parameters of :class:`DTPS`.

    Attributes:
        keep_rate: ρ; stage k keeps ``int((N−P)·ρ^k)`` of the original patch tokens.
        layers: the blocks *before* which the predictors prune (0-based).
        temperature: T of the squeeze similarity ``cos / T`` (host self-weight stays e¹).
        prop_attn: proportional attention with the squeezed sizes (not in the paper;
            inference only: the fixed-shape training form tracks no sizes and refuses it).
    """

    keep_rate: float = checked(0.7, fraction)
    layers: tuple[int, ...] = checked((3, 6, 9), block_indices)
    temperature: float = checked(1.0, positive)
    prop_attn: bool = checked(False, boolean)


class DTPS(DynamicViT):
    """dTPS: DynamicViT's predictor and schedule, pruned tokens squeezed into hosts."""

    name = "dtps"
    recipe = "dtps"
    Params = DTPSParams
    shipped = ("dtps",)

    @classmethod
    def training_task(cls) -> type:
        from ..training.learned import DTPSTask

        return DTPSTask

    def __init__(self, info: ModelInfo, params: DTPSParams) -> None:
        self.temperature = params.temperature
        super().__init__(info, params)
        self.prop_attn = params.prop_attn

    def drop_hard(self, state: TokenState, keep_index: Tensor, drop_index: Tensor) -> TokenState:
        return squeeze_state(state, keep_index, drop_index, self.temperature)

    def drop_soft(self, state: TokenState, keep: Tensor) -> TokenState:
        if self.prop_attn:
            raise ValueError(
                "dtps: the training form keeps the shape fixed and tracks no sizes, so prop_attn=True "
                "(an inference-only option here) cannot be trained; train with prop_attn=False"
            )
        p = state.num_prefix
        live = state.mask[:, p:] if state.mask is not None else torch.ones_like(keep)
        guests = live * (1.0 - keep)
        patches, host = squeeze_masked(state.x[:, p:], keep, guests, self.temperature, return_hosts=True)
        mask = torch.cat([keep.new_ones(keep.shape[0], p, 1), keep], dim=1)
        out = replace(state, x=torch.cat([state.x[:, :p], patches], dim=1), mask=mask)
        if state.owner is None:
            return out
        # restoration: a guest's original tokens follow it to its host (the shape stays)
        own = torch.arange(state.num_tokens, device=host.device).expand(host.shape[0], -1)
        target = torch.where(guests[..., 0].detach() > 0, p + host, own[:, p:])
        return out.redirect(torch.cat([own[:, :p], target], dim=1))
