"""Batched index selection along the token axis."""

from __future__ import annotations

from torch import Tensor


def batched_gather(x: Tensor, index: Tensor) -> Tensor:
    """Select tokens per image.

    Args:
        x: B×N×C tensor (any trailing width C).
        index: B×K integer positions into the N axis.

    Returns:
        B×K×C tensor with ``out[b, k] = x[b, index[b, k]]``.
    """
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
