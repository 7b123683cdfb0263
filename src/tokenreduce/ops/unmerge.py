"""Merge for the branches, unmerge into the stream: the token grouping of ToMe for Stable Diffusion.

ToMe for SD (Bolya & Hoffman, 2023) keeps every token in the residual stream and merges only what a
block's attention and MLP see: similar tokens are averaged into one, the branch runs on the merged
tokens, and each output row is copied back to every token of its group before the residual add.  A
token thereby keeps its own residual while the branches cost what the merged count costs, which suits
dense prediction: the final tokens still fill the patch grid.

:func:`window_groups` finds the groups (bipartite matching with one destination per ``stride×stride``
window of the patch grid, as ToMe for SD partitions its latents) and returns a :class:`TokenGroups`,
which merges (:meth:`TokenGroups.merge`, B×N×C → B×M×C) and unmerges (:meth:`TokenGroups.unmerge`,
B×M×C → B×N×C, or :meth:`TokenGroups.unmerge_add` into the stream).  Only index maps are kept (no B×M×N
matrix): merging is one gather and one scatter-add of the ``r`` merged rows, unmerging one gather; on
the CPU in inference each is one fused kernel call (``csrc/group_rows.cpp``, the same numbers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .cpu_kernels import fused_group_mean, fused_unmerge_add, fused_window_groups
from .gather import batched_gather, flat_rows
from .modes import cached_constants, tracing
from .similarity import NORM_EPS, unit_rows


@dataclass(frozen=True)
class TokenGroups:
    """A partition of a stream's N tokens into M groups, each standing for one merged token.

    Merged-token order: the prefix tokens, the unmerged sources, then the destinations.

    Attributes:
        slot: B×N int64: the merged token each stream token belongs to.
        rep: B×M int64: the stream token whose place each merged token takes (itself when alone, the
            destination of a group): its original position, for rotary position embeddings.
        src: B×R int64: the stream positions of the merged sources (R = tokens merged away).
        into: B×R int64: the merged token each of them joins.
        size: B×M×1 float: stream tokens per merged token.
    """

    slot: Tensor
    rep: Tensor
    src: Tensor
    into: Tensor
    size: Tensor

    @property
    def num_merged(self) -> int:
        """M, the tokens the branches see."""
        return self.rep.shape[1]

    def merge(self, x: Tensor) -> Tensor:
        """B×N×C stream → B×M×C: the mean of each group (every stream token has size 1)."""
        fused = fused_group_mean(x, self.rep, self.src, self.into, self.size)
        if fused is not None:
            return fused
        merged = batched_gather(x, self.rep)
        if self.src.shape[1] == 0:
            return merged
        b, m, c = merged.shape
        flat = merged.view(b * m, c).index_add(0, flat_rows(self.into, m), batched_gather(x, self.src).view(-1, c))
        return flat.view(b, m, c) / self.size.to(merged.dtype)

    def unmerge(self, y: Tensor) -> Tensor:
        """B×M×C branch output → B×N×C: every stream token receives its group's row."""
        return batched_gather(y, self.slot)

    def unmerge_add(self, x: Tensor, y: Tensor) -> Tensor:
        """``x + unmerge(y)``: the B×N×C stream plus every token's group row of the B×M×C ``y`` (a new tensor)."""
        fused = fused_unmerge_add(x, y, self.slot)
        return fused if fused is not None else x + self.unmerge(y)


def square_grid(num_patches: int) -> tuple[int, int]:
    """(rows, columns) of a square patch grid.

    Raises:
        ValueError: ``num_patches`` is not a square (give the grid explicitly).
    """
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid: give the grid as (rows, columns)")
    return side, side


class _Layout(NamedTuple):
    """The constant index tensors of one window matching (per grid, stride, prefix, r and batch)."""

    src_pos: Tensor  # S stream positions of the sources
    dst_pos: Tensor  # D stream positions of the destinations
    rep_fixed: tuple[Tensor, Tensor]  # B×P prefix positions, B×D destination positions (rep's fixed parts)
    slot_values: Tensor  # B×M: 0..M−1, the merged index of every group in rep order
    ones_groups: Tensor  # B×M×1 float32
    ones_merged: Tensor  # B×R×1 float32


_LAYOUTS: dict[tuple, _Layout] = {}
"""Layouts per ((rows, columns), stride, prefix, r, batch, device) and inference mode (:func:`cached_constants`)."""


def _window_layout(grid: tuple[int, int], stride: int, p: int, r: int, b: int, device: torch.device) -> _Layout:
    """The layout of a window matching, cached per shape (at batch 1 every small op counts); built fresh
    while a graph is captured (it must hold for every batch size)."""
    if tracing():
        return _build_layout(grid, stride, p, r, b, device)
    return cached_constants(_LAYOUTS, (grid, stride, p, r, b, device),
                            lambda: _build_layout(grid, stride, p, r, b, device), 64)


def _build_layout(grid: tuple[int, int], stride: int, p: int, r: int, b: int, device: torch.device) -> _Layout:
    """Destinations at the top-left patch of every ``stride×stride`` window (windows at the right and bottom
    edges may be smaller), sources the other patches, both in grid (row-major) order."""
    rows, cols = grid
    row = torch.arange(rows, device=device).unsqueeze(1)
    col = torch.arange(cols, device=device).unsqueeze(0)
    is_dst = ((row % stride == 0) & (col % stride == 0)).reshape(-1)
    order = torch.argsort((~is_dst).to(torch.int8), stable=True)  # destinations first
    num_dst = math.ceil(rows / stride) * math.ceil(cols / stride)
    dst_pos, src_pos = order[:num_dst] + p, order[num_dst:] + p
    num_groups = p + src_pos.numel() - r + num_dst
    return _Layout(
        src_pos=src_pos, dst_pos=dst_pos,
        rep_fixed=(torch.arange(p, device=device).expand(b, p), dst_pos.expand(b, num_dst)),
        slot_values=torch.arange(num_groups, device=device).expand(b, num_groups),
        ones_groups=torch.ones(b, num_groups, 1, device=device),
        ones_merged=torch.ones(b, r, 1, device=device),
    )


def max_window_merges(num_patches: int, grid: tuple[int, int], stride: int) -> int:
    """The most tokens one window matching can merge: its number of sources."""
    rows, cols = grid
    return num_patches - math.ceil(rows / stride) * math.ceil(cols / stride)


def window_groups(metric: Tensor, r: int, num_prefix: int, grid: tuple[int, int], stride: int) -> TokenGroups:
    """Group ``r`` patch tokens with their most similar window destination (ToMe for SD's matching).

    Every ``stride×stride`` window of the patch grid gives one destination (its top-left patch; ToMe for
    SD may draw it at random, which would make an image's result depend on the draw); the other patches
    are sources.  Each source's best destination is its highest cosine similarity; the ``r`` sources
    with the best matches join their destinations, the rest stay alone.  Prefix tokens are never merged.

    Args:
        metric: B×N×C features to compare (prefix first, then the patches in grid order).
        r: sources to merge (clamped to the number of sources).
        num_prefix: leading tokens never merged.
        grid: (rows, columns) of the N − num_prefix patches.
        stride: window side.
    """
    b, n, _ = metric.shape
    p = num_prefix
    device = metric.device
    if grid[0] * grid[1] != n - p:
        raise ValueError(f"a {grid[0]}×{grid[1]} grid holds {grid[0] * grid[1]} patches, the tokens hold {n - p}")
    r = max(0, min(r, max_window_merges(n - p, grid, stride)))
    layout = _window_layout(grid, stride, p, r, b, device)
    num_src = layout.src_pos.numel()
    with torch.no_grad():
        sources, dests = metric.index_select(1, layout.src_pos), metric.index_select(1, layout.dst_pos)
        if metric.dtype != torch.float32:
            sources, dests = sources.float(), dests.float()
        # a source's best destination needs only the destinations normalised; dividing its best product
        # by its own norm then gives the cosine that ranks the sources
        scores, norms = sources @ unit_rows(dests).mT, sources.norm(dim=-1)  # B×S×D, B×S
        fused = fused_window_groups(scores, norms, layout.src_pos, layout.dst_pos, r, p, n)
        if fused is not None:  # the same maps in one call (CPU inference)
            slot, rep, merged_pos, into, size = fused
            return TokenGroups(slot=slot, rep=rep, src=merged_pos, into=into, size=size)
        best, best_dst = scores.max(dim=-1)
        best = best / norms.clamp_min(NORM_EPS)
        order = best.argsort(dim=-1, descending=True, stable=True)
    merged_src, alone_src = order.split([r, num_src - r], dim=1)
    alone_pos, merged_pos = layout.src_pos[alone_src], layout.src_pos[merged_src]  # B×(S−r), B×r stream positions
    into = best_dst.gather(1, merged_src) + (p + num_src - r)  # the destinations follow the alone sources
    prefix, dst_pos = layout.rep_fixed
    rep = torch.cat([prefix, alone_pos, dst_pos], dim=1)
    # slot: the inverse of rep on the tokens that stand for a group, and ``into`` for the merged sources
    slot = torch.empty(b, n, dtype=torch.long, device=device).scatter_(
        1, torch.cat([rep, merged_pos], dim=1), torch.cat([layout.slot_values, into], dim=1))
    size = layout.ones_groups.scatter_add(1, into.unsqueeze(-1), layout.ones_merged)
    return TokenGroups(slot=slot, rep=rep, src=merged_pos, into=into, size=size)
