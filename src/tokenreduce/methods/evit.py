"""EViT — keep the attentive tokens, fuse the rest (Liang et al., ICLR 2022).

Inside blocks ``layers`` (default 3, 6, 9), after the attention residual: the
``ceil(keep_rate·(N−P))`` patch tokens with the highest head-averaged class-token
attention are kept (in descending score order); with ``fuse_token`` the others
are summed into one extra token weighted by their *un-normalised* class
attention, as the official code does.  See docs/methods.md#evit.

Deviation from the official code, by design: all ``P`` prefix tokens are
protected (the official code protects the class token only and treats a
distillation token as a patch token).

Restoration (``tr.apply(..., restore=...)``): the inattentive patches are *pruned* as far as
restoration goes — each gets back its own feature frozen at the block that removed it — not the
fused token's.  The fused token is one attention-weighted mean of up to a third of the image; giving
it to all those patches would paint them one feature with no spatial content, while their frozen
features are still their own.  The fused token itself stands for no patch of the restored grid
(with ``restore="fusion"`` it stays in the last block's sequence, and the inattentive tokens
rejoin beside it).  See docs/methods.md#token-restoration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..budget import Schedule, in_block_schedule
from ..ops.attention import AttentionNeeds, AttentionSignals
from ..ops.prune import keep_topk, masked_weighted_sum
from ..state import TokenState
from .base import (
    ModelInfo,
    Params,
    Reducer,
    block_indices,
    boolean,
    check_layers,
    checked,
    fraction,
    keep_rate_values,
)


def kept_count(keep_rate: float, num_candidates: int) -> int:
    """``ceil(keep_rate · num_candidates)``, robust to float noise (0.7·10 → 7, not 8), and at least 1 of at
    least one candidate (as the ceiling of a positive rate is: rounding must not make a tiny rate keep none)."""
    return min(num_candidates, max(1, math.ceil(round(keep_rate * num_candidates, 6))))


@dataclass(frozen=True)
class EViTParams(Params):
    """Parameters of :class:`EViT`.

    Attributes:
        keep_rate: fraction of the current patch tokens kept at each reduction block (ρ).
        layers: 0-based blocks that reduce (the paper's 4th, 7th and 10th layers).
        fuse_token: fuse the inattentive tokens into one extra token.
    """

    keep_rate: float = checked(0.7, fraction)
    layers: tuple[int, ...] = checked((3, 6, 9), block_indices)
    fuse_token: bool = checked(True, boolean)


class KeepRateReducer(Reducer):
    """Shared schedule logic of methods that keep ``ceil(ρ·(N−P))`` patch tokens at ``layers``."""

    knob = "keep_rate"
    extra_tokens = 0  # tokens added after selection (EViT's fused token)

    def __init__(self, info: ModelInfo, params: Any) -> None:
        super().__init__(info, params)
        self.keep_rate = params.keep_rate
        self.layers = check_layers(self.name, params.layers, info.depth)

    def needs(self, block: int) -> AttentionNeeds | None:
        return AttentionNeeds(cls_attn=True) if block in self.layers else None

    def kept_patches(self, state: TokenState) -> int | None:
        """Patch tokens this reduction keeps, or ``None`` when the keep rate keeps them all."""
        patches = state.num_tokens - state.num_prefix
        keep = kept_count(self.keep_rate, patches)
        return None if keep >= patches else keep

    @staticmethod
    def class_attention(state: TokenState, signals: AttentionSignals) -> Tensor:
        """B×(N−P) head-averaged class-token attention over the patch tokens (un-normalised over them)."""
        return signals.cls_attn.mean(dim=1)[:, state.num_prefix :]

    def tokens_after(self, n: int) -> int:
        patches = n - self.info.num_prefix
        keep = kept_count(self.keep_rate, patches)
        if keep >= patches:
            return n
        return self.info.num_prefix + keep + self.extra_tokens

    def schedule(self, num_tokens: int) -> Schedule:
        return in_block_schedule(
            num_tokens, self.info.depth, lambda block, n: self.tokens_after(n) if block in self.layers else n
        )

    @classmethod
    def knob_values(cls, info: ModelInfo, base: Any) -> list[float]:
        return keep_rate_values()


class EViT(KeepRateReducer):
    """Top-k by class attention, inattentive tokens fused into one."""

    name = "evit"
    recipe = "evit"
    Params = EViTParams

    def __init__(self, info: ModelInfo, params: EViTParams) -> None:
        super().__init__(info, params)
        self.extra_tokens = 1 if params.fuse_token else 0

    def reduce(self, block: int, state: TokenState, signals: AttentionSignals) -> TokenState:
        keep = self.kept_patches(state)
        if keep is None:
            return state
        p = state.num_prefix
        cls_attn = self.class_attention(state, signals)
        keep_idx = keep_topk(cls_attn, keep)
        out = state.prefix_and_patches(keep_idx)
        if not self.extra_tokens:
            return out
        fused = masked_weighted_sum(state.x[:, p:], cls_attn, keep_idx)
        dropped = torch.ones_like(cls_attn).scatter(1, keep_idx, 0.0).unsqueeze(1)  # B×1×(N−P)
        fused_size = dropped @ state.sizes()[:, p:]
        fused_source = None
        if state.source is not None:
            fused_source = (dropped.to(state.source.dtype) @ state.source[:, p:]).clamp(max=1)
        return out.append(fused, fused_size, fused_source, orphan=True)  # its patches are archived (restoration)
