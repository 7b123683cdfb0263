"""Bipartite soft matching (ToMe, Bolya et al. 2023) with generic prefix protection.

The sequence is split by position parity: set A holds positions 0, 2, 4, ...,
set B positions 1, 3, 5, ....  Every token of A finds its most similar token of
B (cosine of the metric); the ``r`` A-tokens with the strongest edges are merged
into their partners.  Prefix tokens (the first ``num_prefix`` positions) can
neither be merged away (their A-rows are masked) nor receive a merge (their
B-columns are masked), which reproduces ToMe's class- and distillation-token
handling and extends it to register tokens.

Output order: ``[prefix tokens] ++ [unmerged A tokens] ++ [B tokens]`` (without
their prefix members).  Unmerged A tokens are put back in their original
relative order when the model has prefix tokens (ToMe re-sorts them only when a
class token exists); otherwise they stay in edge-score order, as in ToMe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .gather import batched_gather

_EPS = 1e-6


def max_merges(num_tokens: int, num_prefix: int) -> int:
    """The largest r bipartite matching can remove from ``num_tokens`` tokens."""
    return max((num_tokens - num_prefix) // 2, 0)


@dataclass(frozen=True)
class BipartiteMatch:
    """The result of a bipartite matching on a B×N sequence.

    Attributes:
        unm_idx: B×(NA−r) positions within A of the tokens that stay unmerged.
        src_idx: B×r positions within A of the tokens merged away.
        dst_idx: B×r positions within B that receive them.
        num_prefix: protected leading tokens of the original sequence.
    """

    unm_idx: Tensor
    src_idx: Tensor
    dst_idx: Tensor
    num_prefix: int

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    def merge(self, x: Tensor, mode: str = "sum") -> Tensor:
        """Apply the matching to a per-token tensor.

        Args:
            x: B×N×C tensor aligned with the matched sequence.
            mode: reduction for tokens landing in the same destination:
                ``"sum"``, ``"mean"`` or ``"amax"`` (``torch.scatter_reduce``).

        Returns:
            B×(N−r)×C tensor in the documented output order.
        """
        a, b = x[:, ::2], x[:, 1::2]
        unm = batched_gather(a, self.unm_idx)
        src = batched_gather(a, self.src_idx)
        idx = self.dst_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        b = b.scatter_reduce(1, idx, src, reduce=mode, include_self=True)
        p = self.num_prefix
        na_prefix, nb_prefix = (p + 1) // 2, p // 2
        return torch.cat([x[:, :p], unm[:, na_prefix:], b[:, nb_prefix:]], dim=1)


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
    with torch.no_grad():
        metric = metric.float()
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # B×NA×NB cosine similarities
        na_prefix, nb_prefix = (num_prefix + 1) // 2, num_prefix // 2
        if na_prefix:
            scores[:, :na_prefix, :] = -torch.inf
        if nb_prefix:
            scores[:, :, :nb_prefix] = -torch.inf
        node_max, node_idx = scores.max(dim=-1)  # B×NA
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
        src_idx = edge_idx[:, :r]
        unm_idx = edge_idx[:, r:]
        dst_idx = node_idx.gather(1, src_idx)
        if num_prefix > 0:
            unm_idx = unm_idx.sort(dim=-1).values
    return BipartiteMatch(unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx, num_prefix=num_prefix)
