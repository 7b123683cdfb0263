"""DynamicViT (Rao et al., NeurIPS 2021): a learned predictor prunes tokens before blocks 3, 6, 9.

Before each block in ``layers`` a local-global MLP (:class:`~tokenreduce.ops.predictor.TokenPredictor`)
scores the patch tokens (docs/methods.md#dynamicvit):

* **inference** (``model.eval()``): the ``int((N−P)·ρ^k)`` best-scored patch tokens
  survive stage k (ρ = ``keep_rate``; DeiT-S at 0.7: 137 / 96 / 67), in score
  order; the rest are removed;
* **training** (``model.train()``): a hard Gumbel-softmax decision (straight-through)
  multiplied by the previous stage's mask; the shape stays fixed and dropped tokens
  are masked out of attention as keys, every token still attending to itself.

The predictors' own MACs are counted in :func:`tokenreduce.stats` (the papers'
2.9 GMACs for DeiT-S leave them out; they add about 0.1 G).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..budget import Schedule, before_block_schedule
from ..ops.attention import KeyMask
from ..ops.predictor import TokenPredictor, gumbel_keep, predictor_macs_per_token
from ..ops.prune import keep_topk
from ..state import TokenState
from .base import (
    ModelInfo,
    Params,
    Reducer,
    block_indices,
    check_layers,
    checked,
    fraction,
    keep_rate_values,
)


@dataclass(frozen=True)
class DynamicViTParams(Params):
    """Parameters of :class:`DynamicViT`.

    Attributes:
        keep_rate: ρ; stage k keeps ``int((N−P)·ρ^k)`` of the original patch tokens.
        layers: the blocks *before* which the predictors prune (0-based).
    """

    keep_rate: float = checked(0.7, fraction)
    layers: tuple[int, ...] = checked((3, 6, 9), block_indices)


def stage_keep(num_patches: int, keep_rate: float, stage: int) -> int:
    """``int(num_patches · keep_rate^stage)`` (stage counted from 1), robust to float noise, at least 1."""
    return max(1, math.floor(round(num_patches * keep_rate**stage, 6)))


class DynamicViT(Reducer):
    """Learned per-stage predictors, pruning between blocks."""

    name = "dynamicvit"
    recipe = "dynamicvit"
    Params = DynamicViTParams
    knob = "keep_rate"
    learned = True
    shipped = ("dynamicvit",)

    @classmethod
    def training_task(cls) -> type:
        from ..training.learned import DynamicViTTask

        return DynamicViTTask

    def __init__(self, info: ModelInfo, params: Any) -> None:
        super().__init__(info, params)
        self.keep_rate = params.keep_rate
        self.layers = check_layers(self.name, params.layers, info.depth)

    def build_module(self) -> nn.ModuleList:
        """One freshly initialised predictor per stage."""
        return nn.ModuleList(TokenPredictor(self.info.dim) for _ in self.layers)

    def has_before_block(self, block: int) -> bool:
        return block in self.layers

    def key_mask(self, mask: Tensor) -> KeyMask:
        return KeyMask(mask, soft=self.training, keep_diagonal=True, eps=1e-6)

    def schedule(self, num_tokens: int) -> Schedule:
        p = self.info.num_prefix

        def tokens_before(block: int, n: int) -> int:
            if block not in self.layers:
                return n
            return p + min(n - p, stage_keep(num_tokens - p, self.keep_rate, self.layers.index(block) + 1))

        return before_block_schedule(num_tokens, self.info.depth, tokens_before)

    def extra_macs(self, num_tokens: int) -> float:
        sched = self.schedule(num_tokens)
        p = self.info.num_prefix
        # each predictor scores the tokens alive just before its stage
        entering = [num_tokens] + [m for _, m in sched[:-1]]
        per_token = predictor_macs_per_token(self.info.dim)
        return float(sum(per_token * (entering[b] - p) for b in self.layers))

    @classmethod
    def knob_values(cls, info: ModelInfo, base: Any) -> list[float]:
        return keep_rate_values()

    # -- the reduction ----------------------------------------------------------------
    def before_block(self, block: int, state: TokenState) -> TokenState:
        stage = self.layers.index(block)
        predictor = self.module[stage]
        p = state.num_prefix
        patches = state.x[:, p:]
        if self.training:
            live = None if state.mask is None else state.mask[:, p:]
            log_probs = predictor(patches, live)
            keep = gumbel_keep(log_probs)
            if live is not None:
                keep = keep * live
            return self.drop_soft(state, keep)
        if stage == 0:  # stages run in order: remember the patch count the schedule is relative to
            self._patches_at_start = patches.shape[1]
        log_probs = predictor(patches)
        keep = min(stage_keep(self._patches_at_start, self.keep_rate, stage + 1), patches.shape[1])
        order = keep_topk(log_probs[..., 0].float(), patches.shape[1])
        return self.drop_hard(state, order[:, :keep], order[:, keep:])

    def drop_hard(self, state: TokenState, keep_index: Tensor, drop_index: Tensor) -> TokenState:
        """Inference: keep ``keep_index`` (B×K patch positions, score order), remove the rest (``drop_index``)."""
        return state.prefix_and_patches(keep_index, drop_index)

    def drop_soft(self, state: TokenState, keep: Tensor) -> TokenState:
        """Training: patch-token mask ``keep`` (B×M×1, straight-through) becomes the state's mask (with
        restoration tracked, the tokens it drops are archived as pruned, frozen at this point)."""
        p = state.num_prefix
        mask = torch.cat([keep.new_ones(keep.shape[0], p, 1), keep], dim=1)
        return state.masked(mask)
