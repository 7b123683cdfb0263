"""Length buckets: a padded batch's attention run in a few groups of images of similar length.

A data-dependent method (LTMP) runs a batch *padded*: every image holds its live tokens in a B×N layout,
N the longest image's count, and the rest is masked out.  Per-token work already runs on the live rows only
(ΣN×C, ``packed``); the attention, though, costs about ``B·N²``, the longest image's length for every
image.  Here the images are grouped by their length (last live position + 1, rounded up to a multiple of the
CPU's vector width), and each group, a *bucket*, runs the fused attention at its own longest length.

Which lengths share a bucket is chosen to minimise the estimated time: each bucket costs its images'
attention work (``images × 2·H·L²·d`` multiply-adds) plus a fixed :data:`BUCKET_OVERHEAD` (one more kernel
call with its key mask, lower bound and copies), solved exactly over the sorted distinct lengths
(:func:`plan_buckets`).  A batch whose lengths are alike runs as one bucket: the padded layout.

The buckets' rows sit one after the other in one buffer (bucket ``k``: ``images_k × L_k`` rows, image by
image).  The buffer is gathered from the live rows with one ``index_select`` (``source``: a padding row reads a
live row of its own image, which its ``−inf`` key bias keeps out of every result; no zero fill), and the
outputs come back with one ``index_select`` (``slots``: every live row's row in the buffer), whole rows of
3·H·d and H·d values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .ragged import image_lengths, rounded_length

BUCKET_OVERHEAD = 1_500_000
"""The fixed cost of one more bucket, in attention multiply-adds: about 150 µs (a kernel call, the key mask, the
received-attention bound and their copies, ~10 small ops) at the ~0.1 ns per multiply-add ATen's CPU flash
kernel runs at with 16-wide heads on 2 cores (``benchmarks/ltmp_reference_speed.py --buckets`` prints the
speed-up).  Larger values make fewer, more padded buckets."""


@dataclass(frozen=True)
class Bucket:
    """Images ``images`` (ascending batch positions, on the device) of a :class:`BucketLayout`, run at ``length``
    tokens from row ``first`` of the bucket buffer (``images × length`` rows, image by image)."""

    images: Tensor
    count: int
    length: int
    first: int


@dataclass(frozen=True)
class BucketLayout:
    """Where the live rows of one padded batch sit in the bucket buffer.

    Attributes:
        batch, tokens: B and N of the padded layout.
        buckets: the buckets, shortest first.
        rows: the ΣN live rows (``packed``, in the B·N flattening) the layout was made for.
        slots: ΣN, every live row's row in the bucket buffer.
        source: the bucket buffer's rows: the live row (in ``rows`` order) each one reads; a padding row reads
            its image's first live row.
        total: the bucket buffer's rows (Σ images × length).
    """

    batch: int
    tokens: int
    buckets: tuple[Bucket, ...]
    rows: Tensor
    slots: Tensor
    source: Tensor
    total: int


def plan_buckets(lengths: list[int], heads: int, head_dim: int, overhead: float = BUCKET_OVERHEAD,
                 ) -> list[tuple[int, list[int]]]:
    """Which images share a bucket: ``(length, images)`` per bucket, shortest first, minimising
    ``Σ_buckets (images · 2·heads·length²·head_dim + overhead)`` over contiguous groups of the sorted distinct
    ``lengths`` (dynamic programming; a bucket runs at its longest length).

    Args:
        lengths: every image's (already rounded) length, ≥ 1.
        heads, head_dim: H and d of the attention.
        overhead: the fixed cost of a bucket, in multiply-adds.
    """
    distinct = sorted(set(lengths))
    counts = [0] * len(distinct)
    where = {length: i for i, length in enumerate(distinct)}
    for length in lengths:
        counts[where[length]] += 1
    per_image = [2.0 * heads * length * length * head_dim for length in distinct]
    # best[j]: the cheapest cost of the first j distinct lengths; cut[j]: where its last bucket starts
    best, cut = [0.0] + [float("inf")] * len(distinct), [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        images = 0
        for i in range(j - 1, -1, -1):  # the last bucket holds distinct lengths i … j−1
            images += counts[i]
            cost = best[i] + images * per_image[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    spans, j = [], len(distinct)
    while j > 0:
        spans.append((cut[j], j))
        j = cut[j]
    plan = []
    for i, j in reversed(spans):
        members = set(distinct[i:j])
        plan.append((distinct[j - 1], [b for b, length in enumerate(lengths) if length in members]))
    return plan


def bucket_layout(packed: Tensor, batch: int, tokens: int, heads: int, head_dim: int, multiple: int,
                  overhead: float | None = None) -> BucketLayout:
    """The bucket layout of a padded batch's live rows (one host synchronisation, for the lengths).

    Args:
        packed: ΣN rows of the live tokens in the B·N flattening, in increasing order.
        batch, tokens: B and N of the padded layout.
        heads, head_dim: H and d of the attention (the cost model, :func:`plan_buckets`).
        multiple: an image's length is rounded up to a multiple of this (at most N).
        overhead: the fixed cost of a bucket, in multiply-adds (``None``: :data:`BUCKET_OVERHEAD`).
    """
    device = packed.device
    overhead = BUCKET_OVERHEAD if overhead is None else overhead
    lengths = [rounded_length(max(length, 1), multiple, tokens) for length in image_lengths(packed, batch, tokens)]
    buckets, base, first = [], [0] * batch, 0
    for length, images in plan_buckets(lengths, heads, head_dim, overhead):
        for rank, b in enumerate(images):
            base[b] = first + rank * length
        buckets.append(Bucket(torch.tensor(images, dtype=torch.long, device=device), len(images), length, first))
        first += len(images) * length
    image = torch.div(packed, tokens, rounding_mode="floor")
    slots = torch.tensor(base, dtype=packed.dtype, device=device).index_select(0, image) + (packed - image * tokens)
    # the buffer's rows as rows of the B·N flattening, bucket by bucket, image by image
    flat = torch.cat([(bucket.images.view(-1, 1) * tokens + torch.arange(bucket.length, device=device)).view(-1)
                      for bucket in buckets])
    live_index = torch.arange(packed.numel(), dtype=packed.dtype, device=device)
    where = torch.full((batch * tokens,), -1, dtype=packed.dtype, device=device).index_copy_(0, packed, live_index)
    # every image's first live row (rows increase); an image without live rows reads another's: it has no result
    first_live = torch.searchsorted(image, torch.arange(batch, dtype=image.dtype, device=device)).clamp_(
        max=max(packed.numel() - 1, 0))
    source = where.index_select(0, flat)
    owner = torch.div(flat, tokens, rounding_mode="floor")
    source = torch.where(source >= 0, source, first_live.index_select(0, owner))
    return BucketLayout(batch, tokens, tuple(buckets), packed, slots, source, first)
