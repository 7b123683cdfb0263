"""Bipartite soft matching (ToMe, Bolya et al. 2023) with generic prefix protection.

The sequence is split by position parity: set A holds positions 0, 2, 4, ...,
set B positions 1, 3, 5, ....  Every token of A finds its most similar token of
B (cosine of the metric); the ``r`` A-tokens with the strongest edges are merged
into their partners.  Prefix tokens (the first ``num_prefix`` positions) are
left out of both sets, so they can neither be merged away nor receive a merge;
this reproduces ToMe's class- and distillation-token handling (its ``−inf`` rows
and columns) and extends it to register tokens.

Output order: ``[prefix tokens] ++ [unmerged A tokens] ++ [B tokens]`` (the
latter two without their prefix members).  Unmerged A tokens are put back in
their original relative order when the model has prefix tokens (ToMe re-sorts them only when a
class token exists); otherwise they stay in edge-score order, as in ToMe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .gather import flat_rows
from .modes import cached_constants
from .similarity import alternate, unit_rows


def max_merges(num_tokens: int, num_prefix: int) -> int:
    """The largest r bipartite matching can remove from ``num_tokens`` tokens."""
    return max((num_tokens - num_prefix) // 2, 0)


@dataclass(frozen=True)
class BipartiteMatch:
    """The result of a bipartite matching on a B×N sequence.

    Indices are stored relative to the *non-prefix* members of A and B (A′ = A
    without its prefix positions, B′ likewise): prefix tokens are copied through
    and never enter the matching.

    Attributes:
        src: B×r positions within A′ of the merged tokens, strongest edge first.
        unm: B×(NA′−r) positions within A′ of the unmerged ones (in sequence order
            when the model has prefix tokens, else in edge order, as in ToMe).
        dst: B×r positions within B′ receiving ``src``.
        r: tokens merged away per image.
        num_tokens: N, the length of the matched sequence.
        num_prefix: protected leading tokens of the original sequence.
        rows: flat row numbers used by :meth:`merge` (see :func:`merge_rows`).
    """

    src: Tensor
    unm: Tensor
    dst: Tensor
    r: int
    num_tokens: int
    num_prefix: int
    rows: tuple[Tensor, Tensor, Tensor]

    @property
    def src_idx(self) -> Tensor:
        """B×r positions within A (prefix included) of the tokens merged away."""
        return self.src + (self.num_prefix + 1) // 2

    @property
    def unm_idx(self) -> Tensor:
        """B×(NA′−r) positions within A (prefix included) of the non-prefix tokens that stay."""
        return self.unm + (self.num_prefix + 1) // 2

    @property
    def dst_idx(self) -> Tensor:
        """B×r positions within B (prefix included) receiving the merged tokens."""
        return self.dst + self.num_prefix // 2

    def select(self, x: Tensor) -> Tensor:
        """The rows of the output tokens' own input tokens, without reducing (B×N×… → B×(N−r)×…).

        A merge destination keeps its own value: what a per-token label that cannot be
        averaged (an original position) becomes under the merge.
        """
        batch, n = x.shape[:2]
        flat = x.reshape(batch * n, x.shape[2:].numel())
        return flat.index_select(0, self.rows[0]).view(batch, n - self.r, *x.shape[2:])

    def remap(self) -> Tensor:
        """B×N int64: the output token every input token ends up in (its own row, or its destination's
        when merged away), for the owner maps of restoration (:func:`~tokenreduce.state.follow`)."""
        keep, src, dst = self.rows
        n, m = self.num_tokens, self.num_tokens - self.r
        batch = keep.shape[0] // m
        out = torch.empty(batch * n, dtype=torch.long, device=keep.device)
        out[keep] = torch.arange(keep.shape[0], device=keep.device) % m
        out[src] = dst % m
        return out.view(batch, n)

    def merge(self, x: Tensor, mode: str = "sum") -> Tensor:
        """Apply the matching to a per-token tensor.

        Flat ``index_select`` / ``index_add_`` on B·N rows: on CPU these are several
        times faster than ``gather`` / ``scatter`` with an index expanded over C.

        Args:
            x: B×N×C tensor aligned with the matched sequence.
            mode: reduction for tokens landing in the same destination:
                ``"sum"``, or ``"mean"`` / ``"amax"`` / ``"amin"`` / ``"prod"``
                (``Tensor.scatter_reduce_``, destination included).

        Returns:
            B×(N−r)×C tensor: ``[prefix] ++ [unmerged A′] ++ [B′ with merges]``.
        """
        batch, n = x.shape[:2]
        keep, src, dst = self.rows
        flat = x.reshape(batch * n, -1)
        out = flat.index_select(0, keep)
        moved = flat.index_select(0, src)
        if mode == "sum":
            out = out.index_add_(0, dst, moved)
        else:
            # scatter_reduce_, not index_reduce_ (the same result, but flagged beta: it warns)
            index = dst.view(-1, *([1] * (moved.dim() - 1))).expand_as(moved)
            out = out.scatter_reduce_(0, index, moved, mode, include_self=True)
        return out.view(batch, n - self.r, *x.shape[2:])


def merge_rows(src: Tensor, unm: Tensor, dst: Tensor, n: int, p: int) -> tuple[Tensor, Tensor, Tensor]:
    """Flat row numbers for :meth:`BipartiteMatch.merge`, built once per match.

    Args:
        src: B×r and unm: B×(NA′−r) positions within A′; dst: B×r positions within B′;
        n: sequence length; p: prefix tokens.

    Returns:
        ``keep`` (B·(N−r) input rows, in output order), ``src`` (B·r input rows
        merged away) and ``dst`` (B·r output rows receiving them).
    """
    batch, num_unm = unm.shape
    a_positions, prefix, b_positions = _layout(n, p, batch, unm.device)
    keep = torch.cat([prefix, a_positions.take(unm), b_positions], dim=1)  # sequence positions, output order
    return flat_rows(keep, n), flat_rows(a_positions.take(src), n), flat_rows(dst + (p + num_unm), keep.shape[1])


_LAYOUTS: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
"""Position tensors per (tokens, prefix, batch, device, inference mode); cleared when it passes 256 entries."""


def _layout(n: int, p: int, batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Constant position tensors of an ``n``-token sequence with ``p`` prefix tokens.

    Returns ``(a_positions, prefix, b_positions)``: the sequence positions of A′ (NA′),
    and ``prefix`` (B×P) and ``b_positions`` (B×NB′) expanded over the batch.  Cached per
    shape, device and inference mode (inference tensors cannot enter autograd), because at
    batch 1 every extra small op counts; built fresh while ``torch.compile`` traces.
    """
    if torch.compiler.is_compiling():
        return _build_layout(n, p, batch, device)
    return cached_constants(_LAYOUTS, (n, p, batch, device), lambda: _build_layout(n, p, batch, device), 256)


def _build_layout(n: int, p: int, batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    positions = torch.arange(n, device=device)
    return (
        positions[2 * ((p + 1) // 2) :: 2].contiguous(),
        positions[:p].expand(batch, p),
        positions[2 * (p // 2) + 1 :: 2].expand(batch, -1),
    )


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int) -> BipartiteMatch | None:
    """Match the ``r`` most similar A→B pairs of every image.

    Args:
        metric: B×N×D features to compare (ToMe: head-averaged keys).
        r: tokens to remove; clamped to ``(N − num_prefix) // 2``.
        num_prefix: protected leading tokens.

    Returns:
        A :class:`BipartiteMatch`, or ``None`` when nothing is merged (r ≤ 0).
    """
    n = metric.shape[1]
    r = min(r, max_merges(n, num_prefix))
    if r <= 0:
        return None
    if torch.is_grad_enabled():
        with torch.no_grad():
            return _match(metric, r, num_prefix)
    return _match(metric, r, num_prefix)


def _match(metric: Tensor, r: int, num_prefix: int) -> BipartiteMatch:
    """:func:`bipartite_soft_matching` without autograd, in as few ops as possible (each small op
    costs ~10 µs at batch 1 once the GEMMs around it have evicted the caches)."""
    n = metric.shape[1]
    if metric.dtype != torch.float32:
        metric = metric.float()
    a, b = alternate(unit_rows(metric))
    # Prefix positions are left out of both sets, which is the same as ToMe's
    # −inf on their rows (A) and columns (B), with fewer ops.
    a, b = a[:, (num_prefix + 1) // 2 :], b[:, num_prefix // 2 :]
    node_max, node_idx = torch.bmm(a, b.mT).max(dim=-1)  # best cosine similarity of every A′ token, B×NA′
    order = node_max.argsort(dim=-1, descending=True, stable=True)
    src, unm = order.split([r, order.shape[1] - r], dim=1)
    dst = node_idx.gather(1, src)
    if num_prefix > 0:
        unm = unm.sort(dim=-1).values
    rows = merge_rows(src, unm, dst, n, num_prefix)
    return BipartiteMatch(src=src, unm=unm, dst=dst, r=r, num_tokens=n, num_prefix=num_prefix, rows=rows)
