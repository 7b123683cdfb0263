"""What the last forward of a reduced model did: its record (:class:`LastForward`) and its summary
(:class:`ReductionStats`: tokens per block and GMACs per image)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .methods.base import Reducer

TokenCount = int | Tensor
"""Tokens of one image (an ``int``), or per image (a B tensor) when a live-token mask is carried."""


@dataclass(frozen=True)
class LastForward:
    """The record of a reduced model's last forward (:func:`tokenreduce.last_forward`).

    Attributes:
        method: the applied method's name.
        batch_size: B, images in the forward.
        num_tokens_in: N0, tokens entering the first block (prefix tokens included).
        num_prefix: P, the leading class / distillation / register tokens.
        block_tokens: per block, (tokens entering its attention, tokens leaving it);
            each an ``int`` or a B tensor of live counts when a mask is carried.
        size: B×N×1 sizes of the tokens leaving the last block (``None``: all ones).
        source: B×N×N0 0/1 map from those tokens to the original ones (``None`` unless
            the method was applied with ``trace_source=True``).
        mask: B×N×1 live-token mask of those tokens (``None``: every token is live).
        stages: with ``trace_source``: ``(label, B×N×N0 source map of the live tokens)``
            after every reduction, in order.
        pos: B×N×1 original sequence positions of those tokens (−1: a combination with no single
            position), for families that track them (rotary positions); else ``None``.
    """

    method: str
    batch_size: int
    num_tokens_in: int
    num_prefix: int
    block_tokens: tuple[tuple[TokenCount, TokenCount], ...]
    size: Tensor | None = None
    source: Tensor | None = None
    mask: Tensor | None = None
    stages: tuple[tuple[str, Tensor], ...] = ()
    pos: Tensor | None = None


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


def collect_stats(reducer: Reducer, record: LastForward) -> ReductionStats:
    """Summarise ``record``, a forward of a model reduced by ``reducer``, as :class:`ReductionStats`."""
    info, cost = reducer.info, reducer.info.cost
    num_patches = record.num_tokens_in - info.num_prefix
    macs = num_patches * cost.patch_embed + cost.head + reducer.extra_macs(record.num_tokens_in)
    blocks = []
    for i, (n_attn, n_mlp) in enumerate(record.block_tokens):
        macs += cost.block_macs(i, _mean(n_attn), _mean(n_attn, squared=True), _mean(n_mlp))
        blocks.append(BlockStats(i, _mean(n_attn), _mean(n_mlp)))
    if blocks:
        macs += cost.pool_macs(blocks[-1].tokens_out)
    return ReductionStats(
        method=record.method,
        params=reducer.config(),
        blocks=blocks,
        gmacs=macs / 1e9,
        gmacs_unreduced=info.unreduced_macs(record.num_tokens_in) / 1e9,
        batch_size=record.batch_size,
    )
