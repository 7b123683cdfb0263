"""Batched index selection along the token axis.

Both helpers flatten the batch into rows (B·N) and use ``index_select`` /
``index_add_`` with per-image row offsets.  On CPU these are several times
faster than ``gather`` / ``scatter_add`` with an index expanded over the
channels (≈12× for a 32×197×384 selection), and they have the same gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .modes import tracing


def flat_rows(index: Tensor, num_rows: int) -> Tensor:
    """Turn B×K per-image positions into B·K row numbers of a B·``num_rows`` flattening."""
    batch = index.shape[0]
    if batch > 1 or tracing():  # a traced graph must hold for every batch size
        index = index + torch.arange(batch, device=index.device).unsqueeze(1) * num_rows
    return index.reshape(-1)


def batched_gather(x: Tensor, index: Tensor) -> Tensor:
    """Select tokens per image.

    Args:
        x: B×N×C tensor (any trailing shape).
        index: B×K integer positions into the N axis.

    Returns:
        B×K×C tensor with ``out[b, k] = x[b, index[b, k]]``.
    """
    batch, n = x.shape[:2]
    rows = x.reshape(batch * n, x.shape[2:].numel()).index_select(0, flat_rows(index, n))  # also for B·N = 0
    return rows.view(batch, index.shape[1], *x.shape[2:])


def batched_scatter_add(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Sum tokens into groups per image (the adjoint of :func:`batched_gather`).

    Args:
        values: B×M×C tensor.
        index: B×M integer group of every token, in ``[0, num_groups)``.
        num_groups: G, the number of output rows.

    Returns:
        B×G×C tensor with ``out[b, g] = Σ_{m: index[b, m] = g} values[b, m]``.
    """
    batch, m = values.shape[:2]
    flat = values.reshape(batch * m, values.shape[2:].numel())  # also for no tokens (M = 0): all-zero groups
    out = flat.new_zeros(batch * num_groups, flat.shape[1])
    out.index_add_(0, flat_rows(index, num_groups), flat)
    return out.view(batch, num_groups, *values.shape[2:])


def padded_rows(rows: Tensor, packed: Tensor, batch: int, tokens: int) -> Tensor:
    """The live rows of a padded batch (ΣN×…, at rows ``packed`` of the B·N flattening) in its B×N×… layout,
    zero elsewhere."""
    flat = rows.new_zeros(batch * tokens, *rows.shape[1:]).index_copy_(0, packed, rows)
    return flat.view(batch, tokens, *rows.shape[1:])


_SMALL = 1 << 16
"""Elements per head below which :func:`head_mean` uses a single op."""


def head_mean(x: Tensor) -> Tensor:
    """Average over the head axis of a B×H×N×d tensor (e.g. the keys), B×N×d.

    For large inputs, a chain of in-place adds over the heads: on the strided views a
    fused qkv projection produces, this is several times faster on CPU than
    ``x.mean(dim=1)``.  For small ones (batch 1), one ``mean`` op: there the cost is
    the number of ops, not the arithmetic.
    """
    if tracing() or x.shape[0] * x.shape[2] * x.shape[3] <= _SMALL:  # traced: one graph for every batch size
        return x.mean(dim=1)
    heads = x.unbind(1)
    if len(heads) == 1:
        return heads[0].clone()
    total = heads[0] + heads[1]
    for head in heads[2:]:
        total.add_(head)
    return total.div_(len(heads))
