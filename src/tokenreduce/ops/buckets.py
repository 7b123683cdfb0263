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

from .ragged import image_lengths

BUCKET_OVERHEAD = 1_500_000
"""The fixed cost of one more bucket, in attention multiply-adds: about 150 µs of the PyTorch path (a kernel
call, the key mask, the received-attention bound and their copies, ~10 small ops) at the ~0.1 ns per
multiply-add ATen's CPU flash kernel runs at with 16-wide heads on 2 cores.  Larger values make fewer, more
padded buckets.  On the reference model with the fused C++ path, values from 2·10⁵ to 5·10⁶ time within ±3%
of each other; ``benchmarks/ltmp_reference_speed.py --one-bucket`` prints what the buckets save."""


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


def plan_buckets(histogram: dict[int, int], heads: int, head_dim: int, overhead: float = BUCKET_OVERHEAD,
                 ) -> list[int]:
    """The buckets' lengths, shortest first (an image runs in the shortest bucket at least as long as it),
    minimising ``Σ_buckets (images · 2·heads·length²·head_dim + overhead)`` over contiguous groups of the sorted
    distinct lengths (dynamic programming; a bucket runs at its longest length).

    Args:
        histogram: how many images have each (already rounded) length, ≥ 1.
        heads, head_dim: H and d of the attention.
        overhead: the fixed cost of a bucket, in multiply-adds.
    """
    distinct = sorted(length for length, images in histogram.items() if images > 0)
    per_image = [2.0 * heads * length * length * head_dim for length in distinct]
    # best[j]: the cheapest cost of the first j distinct lengths; cut[j]: where its last bucket starts
    best, cut = [0.0] + [float("inf")] * len(distinct), [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        images = 0
        for i in range(j - 1, -1, -1):  # the last bucket holds distinct lengths i … j−1
            images += histogram[distinct[i]]
            cost = best[i] + images * per_image[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    lengths, j = [], len(distinct)
    while j > 0:
        lengths.append(distinct[j - 1])
        j = cut[j]
    return lengths[::-1]


def bucket_layout(packed: Tensor, batch: int, tokens: int, heads: int, head_dim: int, multiple: int,
                  overhead: float | None = None) -> BucketLayout:
    """The bucket layout of a padded batch's live rows (one host synchronisation, for the lengths' histogram).

    Args:
        packed: ΣN rows of the live tokens in the B·N flattening, in increasing order.
        batch, tokens: B and N of the padded layout.
        heads, head_dim: H and d of the attention (the cost model, :func:`plan_buckets`).
        multiple: an image's length is rounded up to a multiple of this (at most N).
        overhead: the fixed cost of a bucket, in multiply-adds (``None``: :data:`BUCKET_OVERHEAD`).
    """
    device, dtype = packed.device, packed.dtype
    overhead = BUCKET_OVERHEAD if overhead is None else overhead
    image = torch.div(packed, tokens, rounding_mode="floor")
    position = packed - image * tokens
    lengths = image_lengths(packed, batch, tokens).clamp_(min=1)
    rounded = (torch.div(lengths + (multiple - 1), multiple, rounding_mode="floor") * multiple).clamp_(max=tokens)
    histogram = torch.bincount(rounded, minlength=tokens + 1).tolist()  # host sync
    caps = plan_buckets({length: images for length, images in enumerate(histogram) if images}, heads, head_dim,
                        overhead)
    bucket_of, k = [0] * (tokens + 1), 0  # every length's bucket: the shortest at least as long
    for length in range(tokens + 1):
        while k < len(caps) - 1 and caps[k] < length:
            k += 1
        bucket_of[length] = k
    counts = [0] * len(caps)
    for length, images in enumerate(histogram):
        counts[bucket_of[length]] += images
    starts, firsts, start, first = [], [], 0, 0  # each bucket's first image (in ``order``) and first buffer row
    for count, cap in zip(counts, caps, strict=True):
        starts.append(start)
        firsts.append(first)
        start += count
        first += count * cap
    bucket = torch.tensor(bucket_of, dtype=dtype, device=device).index_select(0, rounded)  # B
    cap = torch.tensor(caps, dtype=dtype, device=device).index_select(0, bucket)
    order = torch.argsort(bucket, stable=True)  # bucket by bucket, ascending batch positions within one
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(batch, dtype=dtype, device=device))
    rank -= torch.tensor(starts, dtype=dtype, device=device).index_select(0, bucket)
    base = torch.tensor(firsts, dtype=dtype, device=device).index_select(0, bucket) + rank * cap  # B
    slots = base.index_select(0, image) + position
    # the buffer's rows as rows of the B·N flattening, bucket by bucket, image by image
    owner = order.repeat_interleave(cap.index_select(0, order), output_size=first)
    flat = owner * tokens + torch.arange(first, dtype=dtype, device=device) - base.index_select(0, owner)
    live_index = torch.arange(packed.numel(), dtype=dtype, device=device)
    where = torch.full((batch * tokens,), -1, dtype=dtype, device=device).index_copy_(0, packed, live_index)
    # every image's first live row (rows increase); an image without live rows reads another's: it has no result
    first_live = torch.searchsorted(image, torch.arange(batch, dtype=dtype, device=device)).clamp_(
        max=max(packed.numel() - 1, 0))
    source = where.index_select(0, flat)
    source = torch.where(source >= 0, source, first_live.index_select(0, owner))
    buckets = tuple(Bucket(order[start:start + count], count, cap_k, first_k)
                    for start, count, cap_k, first_k in zip(starts, counts, caps, firsts, strict=True) if count)
    return BucketLayout(batch, tokens, buckets, packed, slots, source, first)
