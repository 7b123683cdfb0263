"""Density-peak clustering (DPC-kNN) of tokens, batched, and cluster merging.

DPC-kNN (Du et al. 2016; the form used for tokens by TCFormer and BAT):

* distances ``d_ij = ‖x_i − x_j‖₂ / √C`` between the M tokens of an image
  (B×M×M; the ``1/√C`` makes the density comparable across model widths, as in
  TCFormer);
* local density ``ρ_i = exp(−mean_{j ∈ kNN(i)} d_ij²)`` over the ``k`` nearest
  *other* tokens (``k`` is capped at M − 1);
* distance indicator ``δ_i = min_{j ranked above i} d_ij``, and for the
  top-ranked (densest) token ``δ = max_j d_ij``;
* the ``C`` tokens with the largest ``ρ_i·δ_i`` are the centres; every token
  joins its nearest centre and a centre always joins itself.

Ranking is a strict total order without randomness: ``j`` ranks above ``i``
when ``ρ_j > ρ_i``, or ``ρ_j = ρ_i`` and ``j < i`` (a lower position wins a
density tie).  This replaces the random noise some implementations add to the
density; it changes nothing when densities differ.  Densities are compared in
the log domain (``log ρ = −mean d²``) and centres picked by ``log ρ + log δ``:
the same ranking as ``ρ·δ``, without ``exp`` underflowing to 0 for far-apart
hidden states.  Centre-score ties and nearest-centre ties go to the lower
position / earlier centre (stable sort, ``argmin``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .gather import batched_scatter_add


def pairwise_distance(x: Tensor) -> Tensor:
    """B×M×M Euclidean distances of the rows of ``x`` (B×M×C), divided by √C, in float32.

    Computed directly (not via the ``‖a‖² + ‖b‖² − 2ab`` expansion), so it is exactly
    symmetric with a zero diagonal.
    """
    x = x.float()
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    return dist / math.sqrt(x.shape[-1])


def knn_log_density(dist: Tensor, k: int) -> Tensor:
    """``log ρ_i = −mean of d_ij² over the k nearest other tokens`` (B×M) from B×M×M distances."""
    m = dist.shape[-1]
    k = min(k, m - 1)
    if k <= 0:
        return dist.new_zeros(dist.shape[:2])
    eye = torch.eye(m, dtype=torch.bool, device=dist.device)
    nearest = dist.masked_fill(eye, torch.inf).topk(k, dim=-1, largest=False).values  # B×M×k
    return -(nearest**2).mean(dim=-1)


def ranks_above(log_density: Tensor) -> Tensor:
    """B×M×M bool: ``[b, i, j]`` is true when token j ranks above token i (denser, or tied and earlier)."""
    m = log_density.shape[-1]
    pos = torch.arange(m, device=log_density.device)
    di, dj = log_density.unsqueeze(-1), log_density.unsqueeze(-2)
    return (dj > di) | ((dj == di) & (pos.view(1, m) < pos.view(m, 1)))


def dpc_knn(x: Tensor, num_clusters: int, k: int = 5) -> tuple[Tensor, Tensor]:
    """Cluster the tokens of every image with DPC-kNN.

    Args:
        x: B×M×C token features (M ≥ 1).
        num_clusters: C, clamped to ``[1, M]``.
        k: neighbours in the density estimate.

    Returns:
        ``(assign, centres)``: B×M int64 cluster of every token in ``[0, C)`` and
        B×C int64 positions of the centres, in decreasing ``ρ·δ`` order (cluster
        ``c`` is the one around ``centres[:, c]``).
    """
    b, m, _ = x.shape
    c = max(1, min(num_clusters, m))
    with torch.no_grad():
        dist = pairwise_distance(x)
        log_density = knn_log_density(dist, k)
        above = ranks_above(log_density)
        delta = dist.masked_fill(~above, torch.inf).amin(dim=-1)  # B×M
        peak = ~above.any(dim=-1)
        delta = torch.where(peak, dist.amax(dim=-1), delta)
        score = log_density + delta.log()  # log(ρ·δ)
        centres = score.sort(dim=-1, descending=True, stable=True).indices[:, :c]  # B×C
        to_centre = dist.gather(2, centres.unsqueeze(1).expand(b, m, c))  # B×M×C
        assign = to_centre.argmin(dim=-1)
        assign = assign.scatter(1, centres, torch.arange(c, device=x.device).expand(b, c))
    return assign, centres


def cluster_mean(x: Tensor, assign: Tensor, weight: Tensor, num_clusters: int) -> Tensor:
    """One token per cluster: the mean of its members weighted by ``weight`` normalised within the cluster.

    Args:
        x: B×M×C tokens; assign: B×M clusters in ``[0, num_clusters)``;
        weight: B×M non-negative importance weights.

    Returns:
        B×num_clusters×C, in ``x.dtype`` (arithmetic in float32).  A cluster whose
        weights are all zero (or that has no member) gives a zero token.
    """
    w = weight.float().unsqueeze(-1)
    num = batched_scatter_add(w * x.float(), assign, num_clusters)
    den = batched_scatter_add(w, assign, num_clusters)
    return (num / den.clamp_min(torch.finfo(torch.float32).tiny)).to(x.dtype)


__all__ = ["cluster_mean", "dpc_knn", "knn_log_density", "pairwise_distance", "ranks_above"]
