"""Score-based token selection shared by the pruning methods."""

from __future__ import annotations

import torch
from torch import Tensor


def keep_topk(scores: Tensor, k: int, *, keep_order: bool = False) -> Tensor:
    """Positions of the ``k`` highest scores per image.

    Args:
        scores: B×M scores (higher = keep).
        k: how many to keep, ``0 <= k <= M``.
        keep_order: return the kept positions in ascending position order
            instead of descending score order (the papers' top-k order).

    Returns:
        B×k int64 positions into the M axis.
    """
    idx = scores.topk(k, dim=-1, largest=True, sorted=True).indices
    if keep_order:
        idx = idx.sort(dim=-1).values
    return idx


def masked_weighted_sum(x: Tensor, weights: Tensor, drop_index: Tensor) -> Tensor:
    """Σ_i w_i·x_i over the tokens *not* listed in ``drop_index`` (EViT's fused token).

    Done as one batched matrix product with the kept tokens' weights zeroed, so no
    complement index has to be built.

    Args:
        x: B×M×C tokens.
        weights: B×M weights (EViT: un-normalised CLS attention).
        drop_index: B×K positions whose weight is set to zero (the kept tokens).

    Returns:
        B×1×C weighted sum, in ``x.dtype``.
    """
    w = weights.scatter(1, drop_index, 0.0)
    return torch.bmm(w.unsqueeze(1).to(x.dtype), x)


_MASK32 = 0xFFFFFFFF


def _lowbias32(x: Tensor) -> Tensor:
    """A 32-bit integer mixing function (xor-shift-multiply), elementwise on int64 tensors."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def hashed_uniform(batch: int, num: int, key: int, device: torch.device) -> Tensor:
    """Counter-based pseudo-random numbers in [0, 1): a pure function of (key, image, position).

    Unlike ``torch.rand`` with a generator this needs no RNG state, so it is
    reproducible across devices and traceable by ``torch.compile``.

    Args:
        batch: B; num: M; key: any non-negative int (e.g. derived from a seed and a block index).

    Returns:
        B×M float32 tensor.
    """
    base = _lowbias32(torch.tensor(key, dtype=torch.int64, device=device))
    rows = _lowbias32(base + torch.arange(batch, dtype=torch.int64, device=device)).unsqueeze(1)
    values = _lowbias32(rows + torch.arange(num, dtype=torch.int64, device=device))
    return values.to(torch.float32) / float(2**32)


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard 0/1 decision; backward: the gradient of the soft sigmoid."""

    @staticmethod
    def forward(ctx, soft: Tensor) -> Tensor:  # noqa: D102
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad


def threshold_mask(score: Tensor, threshold: Tensor, tau: float) -> Tensor:
    """LTMP's threshold-masking module: ``[score > θ]`` forward, ``sigmoid((score − θ)/τ)`` gradient.

    Args:
        score: any shape; threshold: a scalar tensor (learned); tau: temperature > 0.

    Returns:
        0/1 float tensor shaped like ``score``, differentiable w.r.t. ``threshold``
        (and ``score``) through the sigmoid.
    """
    soft = torch.sigmoid((score - threshold) / tau)
    return _StraightThrough.apply(soft)
