"""Cosine-similarity building blocks shared by matching, squeezing and LTMP.

* :func:`unit_rows` — L2-normalised token features (the norm clamped at :data:`NORM_EPS`, so a zero
  row stays zero instead of becoming NaN);
* :func:`alternate` — ToMe's bipartite split of a sequence into its even (A) and odd (B) positions.
"""

from __future__ import annotations

from torch import Tensor

NORM_EPS = 1e-6
"""Lower clamp of a row norm before dividing by it."""


def unit_rows(x: Tensor) -> Tensor:
    """``x`` (…×C) with every row divided by its L2 norm (clamped at :data:`NORM_EPS`); dtype kept."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def alternate(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x[:, 0::2], x[:, 1::2])``: the A (even) and B (odd) positions of a B×N×… sequence."""
    return x[:, ::2], x[:, 1::2]
