"""Size-weighted merging of a :class:`~tokenreduce.state.TokenState`."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .matching import BipartiteMatch

if TYPE_CHECKING:
    from ..state import TokenState


def merge_wavg(state: TokenState, match: BipartiteMatch | None) -> TokenState:
    """Merge tokens as a size-weighted average: ``x = Σ s·x / Σ s``, ``s = Σ s``.

    Implemented as "multiply by size, scatter-add, divide by the summed size" in one
    merge of ``[x·s, s]``, so every merged token is the mean of the original patches
    it stands for.  The
    arithmetic runs in float32 and the result is cast back to ``state.x.dtype``.
    Sources, when traced, and live-token masks are merged with an element-wise maximum.

    Args:
        state: tokens aligned with the sequence ``match`` was computed on (B×N).
        match: the matching, or ``None`` for no merge.

    Returns:
        A state with B×(N−r) tokens.
    """
    if match is None:
        return state
    x = state.x.float()
    size = state.size
    # One pass for the weighted sum and the sizes: the size rides along as an
    # extra channel, B×N×(C+1).
    if size is None:
        weighted = torch.cat([x, x.new_ones(x.shape[0], x.shape[1], 1)], dim=-1)
    else:
        weighted = torch.cat([x * size, size], dim=-1)
    merged = match.merge(weighted, mode="sum")
    size = merged[..., -1:].contiguous()  # do not keep the B×N×(C+1) buffer alive
    x = (merged[..., :-1] / size).to(state.x.dtype)
    source = None if state.source is None else match.merge(state.source, mode="amax")
    mask = None if state.mask is None else match.merge(state.mask, mode="amax")
    return replace(state, x=x, size=size, source=source, mask=mask)
