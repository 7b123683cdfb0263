"""Size-weighted merging of a :class:`~tokenreduce.state.TokenState`."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..state import TokenState, follow
from .cpu_kernels import fused_bipartite_merge
from .gather import batched_gather, head_mean
from .matching import BipartiteMatch, bipartite_soft_matching, max_merges


def bipartite_merge(state: TokenState, metric: Tensor, r: int) -> TokenState:
    """ToMe's merge step: :func:`bipartite_soft_matching` on ``metric``, then :func:`merge_wavg`.

    On the CPU in inference this runs as one fused kernel
    (:mod:`tokenreduce.ops.cpu_kernels`) with the same result; elsewhere, and whenever
    sources or a live-token mask are carried, it is the two functions above.

    Args:
        state: B×N tokens.
        metric: B×N×D features to match on, or B×H×N×D per-head features that are averaged over H first
            (:func:`~tokenreduce.ops.gather.head_mean`; ToMe: the keys, whose head mean the fused kernel takes
            without a separate op).
        r: tokens to remove per image; clamped to ``(N − P) // 2``.

    Returns:
        A state with B×(N−r) tokens (``state`` itself when r ≤ 0).
    """
    p = state.num_prefix
    r = min(r, max_merges(state.num_tokens, p))
    if r <= 0:
        return state
    if state.source is None and state.mask is None:
        fused = fused_bipartite_merge(state.x, state.size, metric, r, p)
        if fused is not None:
            x, size, keep, remap = fused
            pos = None if state.pos is None else batched_gather(state.pos, keep)
            owner = None if state.owner is None else follow(state.owner, remap, state.num_tokens, x.shape[1])
            return replace(state, x=x, size=size, pos=pos, owner=owner)
    if metric.dim() == 4:
        metric = head_mean(metric)
    return merge_wavg(state, bipartite_soft_matching(metric, r, p))


def merge_wavg(state: TokenState, match: BipartiteMatch | None) -> TokenState:
    """Merge tokens as a size-weighted average: ``x = Σ s·x / Σ s``, ``s = Σ s``.

    Implemented as "multiply by size, scatter-add, divide by the summed size" in one
    merge of ``[x·s, s]``, so every merged token is the mean of the original patches
    it stands for.  The
    arithmetic runs in float32 and the result is cast back to ``state.x.dtype``.
    Sources, when traced, and live-token masks are merged with an element-wise maximum;
    original positions, when tracked, are not merged: a destination keeps its own.  With restoration
    tracked, a merged-away token's original tokens follow it to its destination
    (:meth:`~tokenreduce.ops.matching.BipartiteMatch.remap`).

    Args:
        state: tokens aligned with the sequence ``match`` was computed on (B×N).
        match: the matching, or ``None`` for no merge.

    Returns:
        A state with B×(N−r) tokens.
    """
    if match is None:
        return state
    x = state.x if state.x.dtype == torch.float32 else state.x.float()
    size = state.size
    # One pass for the weighted sum and the sizes: the size rides along as an
    # extra channel, B×N×(C+1).
    if size is None:
        weighted = F.pad(x, (0, 1), value=1.0)
    else:
        weighted = torch.cat([x * size, size], dim=-1)
    x, size = match.merge(weighted, mode="sum").split([x.shape[-1], 1], dim=-1)
    size = size.contiguous()  # do not keep the B×N×(C+1) buffer alive
    x = x / size
    if x.dtype != state.x.dtype:
        x = x.to(state.x.dtype)
    source = None if state.source is None else match.merge(state.source, mode="amax")
    mask = None if state.mask is None else match.merge(state.mask, mode="amax")
    pos = None if state.pos is None else match.select(state.pos)
    owner = None if state.owner is None else follow(state.owner, match.remap(), match.num_tokens, x.shape[1])
    return replace(state, x=x, size=size, source=source, mask=mask, pos=pos, owner=owner)
