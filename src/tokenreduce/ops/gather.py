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


def batched_scatter_add(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Sum tokens into groups per image (the adjoint of :func:`batched_gather`).

    Args:
        values: B×M×C tensor.
        index: B×M integer group of every token, in ``[0, num_groups)``.
        num_groups: G, the number of output rows.

    Returns:
        B×G×C tensor with ``out[b, g] = Σ_{m: index[b, m] = g} values[b, m]``.
    """
    out = values.new_zeros(values.shape[0], num_groups, values.shape[-1])
    return out.scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]), values)
