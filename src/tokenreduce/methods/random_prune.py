"""Random pruning baseline: EViT's schedule, uniformly random choice of the kept tokens.

At blocks ``layers`` (default 3, 6, 9) it keeps ``ceil(keep_rate·(N−P))`` patch
tokens drawn uniformly without replacement (kept in their original order) and
drops the rest.  The generator is re-seeded with ``seed`` at every forward, so a
given batch always gives the same output; which tokens an image keeps depends on
its position in the batch, not on its content.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.attention import AttentionNeeds, AttentionSignals
from ..ops.prune import keep_topk
from ..state import TokenState
from .base import ModelInfo
from .evit import KeepRateReducer, kept_count


@dataclass(frozen=True)
class RandomParams:
    """Parameters of :class:`RandomPrune`.

    Attributes:
        keep_rate: fraction of the current patch tokens kept at each reduction block.
        layers: 0-based reduction blocks.
        seed: seed of the token choice (re-applied at every forward).
    """

    keep_rate: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    seed: int = 0


class RandomPrune(KeepRateReducer):
    """Uniform random pruning on a fixed schedule."""

    name = "random"
    Params = RandomParams

    def __init__(self, info: ModelInfo, params: RandomParams) -> None:
        super().__init__(info, params)
        self._generators: dict[torch.device, torch.Generator] = {}

    def needs(self, block: int) -> AttentionNeeds | None:
        return AttentionNeeds() if block in self.layers else None

    def begin_forward(self) -> None:
        for gen in self._generators.values():
            gen.manual_seed(self.params.seed)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.params.seed)
        return self._generators[device]

    def reduce(self, block: int, state: TokenState, signals: AttentionSignals) -> TokenState:
        p = state.num_prefix
        patches = state.num_tokens - p
        keep = kept_count(self.keep_rate, patches)
        if keep >= patches:
            return state
        x = state.x
        scores = torch.rand(x.shape[0], patches, generator=self._generator(x.device), device=x.device)
        return state.prefix_and_patches(keep_topk(scores, keep, keep_order=True))
