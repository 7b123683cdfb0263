"""Random pruning baseline: EViT's schedule, uniformly random choice of the kept tokens.

At blocks ``layers`` (default 3, 6, 9) it keeps ``ceil(keep_rate·(N−P))`` patch
tokens drawn uniformly without replacement (kept in their original order) and
drops the rest.  The random numbers are a counter-based hash of (``seed``, block,
image position in the batch, token position): no RNG state, so a given batch
always gives the same output on any device, and ``torch.compile`` can trace it.
Which tokens an image keeps depends on its position in the batch, not on its
content.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ops.attention import AttentionNeeds, AttentionSignals
from ..ops.prune import hashed_uniform, keep_topk
from ..state import TokenState
from .base import Params, block_indices, checked, fraction, integer
from .evit import KeepRateReducer


@dataclass(frozen=True)
class RandomParams(Params):
    """Parameters of :class:`RandomPrune`.

    Attributes:
        keep_rate: fraction of the current patch tokens kept at each reduction block.
        layers: 0-based reduction blocks.
        seed: seed of the token choice.
    """

    keep_rate: float = checked(0.7, fraction)
    layers: tuple[int, ...] = checked((3, 6, 9), block_indices)
    seed: int = checked(0, integer)


class RandomPrune(KeepRateReducer):
    """Uniform random pruning on a fixed schedule."""

    name = "random"
    recipe = "deit"  # a baseline without a paper: the generic DeiT fine-tune
    Params = RandomParams
    seed_param = "seed"

    def needs(self, block: int) -> AttentionNeeds | None:
        return AttentionNeeds() if block in self.layers else None

    def reduce(self, block: int, state: TokenState, signals: AttentionSignals) -> TokenState:
        keep = self.kept_patches(state)
        if keep is None:
            return state
        patches = state.num_tokens - state.num_prefix
        key = int(self.params.seed) * self.info.depth + block
        scores = hashed_uniform(state.x.shape[0], patches, key, state.x.device)
        return state.prefix_and_patches(keep_topk(scores, keep, keep_order=True))
