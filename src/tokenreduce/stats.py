"""What the last forward of a reduced model did: tokens per block and GMACs per image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class BlockStats:
    """Tokens entering a block's attention and leaving it (mean over the batch)."""

    block: int
    tokens_in: float
    tokens_out: float


@dataclass(frozen=True)
class ReductionStats:
    """Summary of the last forward.

    Attributes:
        method: method name; params: its resolved parameters.
        blocks: per-block token counts.
        gmacs: analytic GMACs per image of the last forward (mean over the batch).
        gmacs_unreduced: GMACs of the same model and image size without reduction.
        batch_size: images in the last forward.
    """

    method: str
    params: dict[str, Any]
    blocks: list[BlockStats] = field(default_factory=list)
    gmacs: float = 0.0
    gmacs_unreduced: float = 0.0
    batch_size: int = 0

    @property
    def ratio(self) -> float:
        """Fraction of the unreduced GMACs used."""
        return self.gmacs / self.gmacs_unreduced if self.gmacs_unreduced else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": self.params,
            "gmacs": self.gmacs,
            "gmacs_unreduced": self.gmacs_unreduced,
            "ratio": self.ratio,
            "batch_size": self.batch_size,
            "tokens_in": [b.tokens_in for b in self.blocks],
            "tokens_out": [b.tokens_out for b in self.blocks],
        }

    def __str__(self) -> str:
        lines = [
            f"{self.method} {self.params}",
            f"GMACs/image {self.gmacs:.3f} of {self.gmacs_unreduced:.3f} ({self.ratio:.1%})",
            "block  tokens in  tokens out",
        ]
        lines += [f"{b.block:5d}  {b.tokens_in:9.1f}  {b.tokens_out:10.1f}" for b in self.blocks]
        return "\n".join(lines)


def _mean(value: Any, squared: bool = False) -> float:
    if isinstance(value, torch.Tensor):
        v = value.detach().double()
        return float((v * v).mean() if squared else v.mean())
    return float(value * value if squared else value)


def collect_stats(ctx: Any) -> ReductionStats:
    """Build :class:`ReductionStats` from a model's :class:`ReductionContext`."""
    if ctx.records[0] is None:
        raise RuntimeError("tokenreduce.stats: run a forward pass of the reduced model first")
    info, cost = ctx.info, ctx.info.cost
    num_patches = ctx.num_tokens_in - info.num_prefix
    macs = num_patches * cost.patch_embed + cost.head + ctx.reducer.extra_macs(ctx.num_tokens_in)
    blocks = []
    for i, (n_attn, n_mlp) in enumerate(ctx.records):
        macs += cost.block_macs(i, _mean(n_attn), _mean(n_attn, squared=True), _mean(n_mlp))
        blocks.append(BlockStats(i, _mean(n_attn), _mean(n_mlp)))
    return ReductionStats(
        method=ctx.method,
        params=ctx.reducer.config(),
        blocks=blocks,
        gmacs=macs / 1e9,
        gmacs_unreduced=info.unreduced_macs(ctx.num_tokens_in) / 1e9,
        batch_size=ctx.batch_size,
    )
