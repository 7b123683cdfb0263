"""A lower bound on the attention every key receives, from the fused kernel's log-sum-exp.

LTMP prunes a token whose received attention (the mean over heads and live query rows of its softmax
probabilities) is at or below its block's threshold.  Computing it exactly needs every probability, so the
attention cannot run in the fused kernel.  But a comparison with a floor does not need the exact value where
the value is provably far above the floor: with the rows' log-sum-exp ``L_hi`` (which ATen's CPU flash
kernel returns with its output), Jensen's inequality bounds every key's received attention from below at the
cost of one product with the mean query per head (:func:`received_log_lower_bound`).  An image whose live
tokens all clear the floor (:func:`certify_received`) is decided by the bound; the others by the exact values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOOR_MARGIN = math.log(2.0)
"""A token counts as above the floor only where its bound clears the floor by this factor (in log space):
far more than the float32 rounding of the bound and of the exact values (relative ~1e-6)."""
MIN_FLOOR = 1e-30
"""Smaller floors are never certified: the explicit softmax's probabilities near them are not normal floats."""


def fused_attention_available() -> bool:
    """Whether this torch has ATen's CPU flash kernel that returns the rows' log-sum-exp."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def fused_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """ATen's CPU flash attention (the kernel ``F.scaled_dot_product_attention`` runs there) with every query
    row's log-sum-exp.

    Args:
        q, k, v: B×H×N×d CPU float32; bias: additive key bias broadcastable to B×H×N×N, or ``None``.

    Returns:
        ``(out, lse)``: B×H×N×d and B×H×N float32.
    """
    mask = None if bias is None else bias.to(q.dtype)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)


def certify_received(
    q: Tensor, k: Tensor, lse: Tensor, scale: float, bias: Tensor | None, rows: Tensor, floor: float
) -> tuple[Tensor, Tensor]:
    """:func:`received_log_lower_bound` and which images it certifies: every live key's bound above
    ``log floor`` + :data:`FLOOR_MARGIN`.

    Returns:
        ``(bound, certified)``: B×N float32 log bounds and B bool.
    """
    bound = received_log_lower_bound(q, k, lse, scale, bias, rows)
    return bound, (bound > math.log(floor) + FLOOR_MARGIN).logical_or_(rows <= 0).all(dim=1)


def received_log_lower_bound(
    q: Tensor, k: Tensor, lse: Tensor, scale: float, bias: Tensor | None, rows: Tensor
) -> Tensor:
    """A lower bound on the log of every key's received attention, from the rows' log-sum-exp (Jensen).

    With ``ℓ_hij = scale·q_hi·k_hj + b_j`` and ``L_hi = log Σ_j exp ℓ_hij``, key ``j`` receives
    ``r_j = (1/H) Σ_h Σ_i w_i exp(ℓ_hij − L_hi)`` (``w``: the live query rows' weights, summing to 1).
    The mean of an exponential is at least the exponential of the mean, so
    ``r_j ≥ (1/H) Σ_h exp(scale·q̄_h·k_hj + b_j − L̄_h) ≥ (1/H) max_h exp(…)`` with ``q̄_h = Σ_i w_i q_hi``
    and ``L̄_h = Σ_i w_i L_hi``: one product with the mean query per head, no N×N work (the maximum over
    heads instead of their sum costs at most log H and no exponentials).  On a trained model the bound is
    within a few nats of the exact value (docs/benchmarks.md#ltmp-speed-on-deit-s).

    Args:
        q, k: B×H×N×d; lse: B×H×N float32 log-sum-exp of every query row (the flash kernel's);
        bias: B×1×1×N or ``None``; rows: B×N query weights (live tokens).

    Returns:
        B×N float32 (``−inf`` for removed keys).
    """
    b, heads, n, d = q.shape
    weights = rows.float()
    weights = (weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-30)).unsqueeze(1)  # B×1×N
    # token-major views (B×N×H·d): no copy for the layout a fused qkv projection gives
    q_tokens, k_tokens = (t.float().transpose(1, 2).reshape(b, n, heads * d) for t in (q, k))
    mean_q = torch.bmm(weights, q_tokens).view(b, 1, heads, d)  # B×1×H×d
    mean_lse = torch.bmm(lse.float(), weights.transpose(1, 2)).view(b, 1, heads)  # B×1×H (live rows' lse finite)
    # every head's mean query against its keys: a product and a sum over d, 2-3× faster on the CPU than one
    # batched product with a block-diagonal B×(H·d)×H matrix (H× the work, tiny per-image matrices)
    logits = (k_tokens.view(b, n, heads, d) * mean_q).sum(dim=3).mul_(scale).sub_(mean_lse)  # B×N×H
    bound = logits.amax(dim=2) - math.log(heads)
    return bound if bias is None else bound.add_(bias.float().view(b, n))
