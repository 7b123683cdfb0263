"""Analytic multiply-accumulate counts (GMACs) and budget → parameter resolution.

The papers' "GFLOPs" are GMACs (one fused multiply-add counted once).  For a
block that sees ``n_a`` tokens in attention and ``n_m`` tokens in its MLP::

    MACs = n_a · (qkv + proj weights) + 2 · n_a² · attn_dim + n_m · (MLP weights)

which for a standard ViT block of width C is ``4·n_a·C² + 2·n_a²·C + 8·n_m·C²``.
Patch embedding (per patch) and the classifier head (per image) are added, and an
attention-pool head's per-token part (its key/value projection and attention, for the
tokens leaving the last block) where the model has one.  The
weights are read off the live model, so q/k-norm, SwiGLU MLPs or other widths
count correctly.  Norms, softmax, GELU and the reductions' own bookkeeping are
not counted (as in fvcore and the papers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

Schedule = list[tuple[int, int]]
"""Per block: (tokens entering attention, tokens entering the MLP)."""


def in_block_schedule(num_tokens: int, depth: int, tokens_after: Callable[[int, int], int]) -> Schedule:
    """The schedule of a method that reduces inside blocks, after attention and before the MLP.

    Args:
        num_tokens: tokens entering block 0.
        depth: number of blocks.
        tokens_after: ``(block, n) -> m``: tokens leaving block ``block``'s reduction when ``n`` enter it.
    """
    counts, n = [], num_tokens
    for block in range(depth):
        m = tokens_after(block, n)
        counts.append((n, m))
        n = m
    return counts


def before_block_schedule(num_tokens: int, depth: int, tokens_before: Callable[[int, int], int]) -> Schedule:
    """The schedule of a method that reduces between blocks: each block sees the same count in both halves.

    Args:
        num_tokens: tokens entering the model's first reduction point (block 0).
        depth: number of blocks.
        tokens_before: ``(block, n) -> m``: tokens entering block ``block`` when ``n`` left the block before.
    """
    counts, n = [], num_tokens
    for block in range(depth):
        n = tokens_before(block, n)
        counts.append((n, n))
    return counts


def linear_macs(module: nn.Module | None) -> int:
    """MACs per token of all ``nn.Linear`` layers inside ``module``."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class CostModel:
    """Per-token and per-image MAC constants of one ViT, read off the live model by its family's adapter.

    ``head`` is per image (classifier, an attention pool's latent queries and MLP); ``pool_token``
    is per token entering an attention pool (its key/value projection and attention), of the
    tokens leaving the last block less the ``pool_skip`` leading ones it does not see.
    """

    attn_linear: tuple[int, ...]
    attn_dim: tuple[int, ...]
    mlp_linear: tuple[int, ...]
    patch_embed: int
    head: int
    pool_token: int = 0
    pool_skip: int = 0

    @property
    def depth(self) -> int:
        return len(self.attn_linear)

    def block_macs(self, block: int, n_attn: float, n_attn_sq: float, n_mlp: float) -> float:
        """MACs of one block; ``n_attn_sq`` is the (batch-mean of) squared attention count."""
        return (
            n_attn * self.attn_linear[block]
            + 2.0 * n_attn_sq * self.attn_dim[block]
            + n_mlp * self.mlp_linear[block]
        )

    def pool_macs(self, num_out: float) -> float:
        """MACs of the attention pool's per-token part when ``num_out`` tokens leave the last block."""
        return max(num_out - self.pool_skip, 0) * self.pool_token if self.pool_token else 0.0

    def macs(self, schedule: Sequence[tuple[int, int]], num_patches: int) -> float:
        """MACs per image of a fixed token schedule."""
        total = num_patches * self.patch_embed + self.head
        for i, (n_a, n_m) in enumerate(schedule):
            total += self.block_macs(i, n_a, n_a * n_a, n_m)
        if schedule:
            total += self.pool_macs(schedule[-1][1])
        return float(total)

    def unreduced_macs(self, num_tokens: int, num_patches: int) -> float:
        return self.macs([(num_tokens, num_tokens)] * self.depth, num_patches)


def resolve_budget(
    budget: float,
    values: Sequence[Any],
    cost_of: Callable[[Any], float],
    unreduced: float,
    knob: str,
) -> Any:
    """The least-reducing value of ``knob`` whose cost does not exceed ``budget × unreduced``.

    ``values`` run from least to most reduction and their costs must not increase
    along them, so the answer is found by bisection: ``cost_of`` is called about
    ``log2(len(values))`` times.

    Args:
        budget: fraction of the unreduced GMACs to keep, in (0, 1].
        values: the knob's values, ordered from least to most reduction.
        cost_of: MACs per image with the knob at a value.
        unreduced: MACs of the unreduced model.
        knob: the parameter the budget sets (for the error message).

    Raises:
        ValueError: ``budget`` is out of (0, 1] or no value fits; the message gives
            the achievable range.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a fraction of the unreduced GMACs in (0, 1], got {budget!r}")
    limit = budget * unreduced * (1.0 + 1e-9)
    if not values:
        raise ValueError(f"no value of {knob!r} to resolve budget={budget} with")
    lowest = cost_of(values[-1])
    if lowest > limit:
        raise ValueError(
            f"budget={budget} is not reachable by adjusting {knob!r}: achievable budgets on this model "
            f"are {lowest / unreduced:.3f} to 1.0 of the unreduced GMACs"
        )
    lo, hi = 0, len(values) - 1  # invariant: values[hi] fits; every value before lo does not
    while lo < hi:
        mid = (lo + hi) // 2
        if cost_of(values[mid]) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return values[hi]
