"""Attention of a padded batch without its padding: images sorted by length into ragged chunks.

Data-dependent methods (LTMP) run a batch *padded*: image ``b`` holds its live tokens in a B×N
layout and the rest is masked out.  Per-token work already runs on the live rows only (ΣN×C,
``packed``); this module does the same for the attention of methods that need its probabilities:

* the images are sorted by length (last live position + 1) and cut into chunks of similar length,
  each holding a bounded number of probabilities (:data:`~tokenreduce.ops.attention.PROBS_CHUNK`),
  so a chunk's attention runs at its own longest image's length, not the batch's;
* the chunks' head-major q/k/v buffers are gathered once, as head vectors, straight from the live
  rows (one ``index_select``; padding slots read a live vector of their own image, which their
  -inf key bias and zero query weight keep out of every result), and the per-head outputs are
  gathered straight back into ΣN rows (one ``index_select``): no permute or reshape copies, no
  padded B×N×C tensors.

The arithmetic is that of :func:`~tokenreduce.ops.attention.attention_and_received` (float32 logits
with the key bias, softmax, the received average over live query rows); only the summation
blocking differs.  Finding the lengths costs one host synchronisation per layout.  A method that only
compares the received attention with a floor keeps the fused kernel instead, in length buckets
(:mod:`~tokenreduce.ops.buckets`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .gather import head_mean, padded_rows


@dataclass(frozen=True)
class Chunk:
    """Images ``order[start:start + images]`` of a :class:`RaggedLayout`, run at ``length`` tokens.

    ``qkv_at`` and ``out_at`` are the chunk's first head vector (row of d) in the q/k/v and the
    output buffers; its q, k and v are each ``images``×H×``length``×d there, one after the other."""

    start: int
    images: int
    length: int
    qkv_at: int
    out_at: int


@dataclass(frozen=True)
class RaggedLayout:
    """Where every live row's head vectors sit in the chunk buffers of one padded batch.

    Attributes:
        batch, tokens, heads: B, N and H of the padded layout.
        order: (B,) images sorted by length, longest first (device tensor).
        inverse: (B,) the position of every image in ``order``.
        chunks: the chunks, in ``order``.
        rows: the ΣN live rows (``packed``) the layout was made for.
        qkv_index: ΣN×3×H head-vector slots of the live rows' (q, k, v) × heads.
        qkv_source: the inverse, per slot: the ΣN·3·H head vector (in ``qkv_index``'s row-major
            order) it holds; a padding slot reads its own image's last live vector of the same
            part and head, so nothing crosses images.  The gather is cheaper than the scatter on CPU.
        out_index: ΣN·H slots of their output head vectors, in row order.
        qkv_slots, out_slots: the buffers' sizes in head vectors.
    """

    batch: int
    tokens: int
    heads: int
    order: Tensor
    inverse: Tensor
    chunks: tuple[Chunk, ...]
    rows: Tensor
    qkv_index: Tensor
    qkv_source: Tensor
    out_index: Tensor
    qkv_slots: int
    out_slots: int


def rounded_length(length: int, multiple: int, cap: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``, at most ``cap``."""
    return min(cap, -(-length // multiple) * multiple)


def image_lengths(packed: Tensor, batch: int, tokens: int) -> Tensor:
    """Every image's length in a padded batch (its last live position + 1; 0 for none), a B tensor.

    Args:
        packed: ΣN rows of the live tokens in the B·N flattening; batch, tokens: B and N.
    """
    image = torch.div(packed, tokens, rounding_mode="floor")
    return torch.zeros(batch, dtype=packed.dtype, device=packed.device).scatter_reduce_(
        0, image, packed - image * tokens + 1, reduce="amax")


def padded_key_means(keys: Tensor, packed: Tensor, batch: int, tokens: int) -> Tensor:
    """The head-averaged keys of a padded batch's live rows (``keys``: ΣN×H×d) in its B×N×d layout, zero at
    padding: :func:`~tokenreduce.ops.gather.head_mean`'s numbers."""
    return padded_rows(head_mean(keys.transpose(0, 1).unsqueeze(0)).squeeze(0), packed, batch, tokens)


def ragged_layout(packed: Tensor, batch: int, tokens: int, heads: int, budget: int) -> RaggedLayout:
    """The chunk layout of a padded batch's live rows (one host synchronisation).

    Args:
        packed: ΣN rows of the live tokens in the B·N flattening, in increasing order.
        batch, tokens: B and N of the padded layout.
        heads: H.
        budget: the most attention probabilities (m·H·L²) a chunk of several images may hold.
    """
    device = packed.device
    image = torch.div(packed, tokens, rounding_mode="floor")
    position = packed - image * tokens
    length_of = image_lengths(packed, batch, tokens).tolist()  # host sync
    order = sorted(range(batch), key=lambda b: -length_of[b])  # stable: ties keep batch order
    chunks: list[Chunk] = []
    qkv_base, out_base, block, stride = [0] * batch, [0] * batch, [0] * batch, [0] * batch
    start = qkv_at = out_at = 0
    while start < batch:
        length = max(length_of[order[start]], 1)
        images = min(batch - start, max(1, budget // (heads * length * length)))
        chunks.append(Chunk(start, images, length, qkv_at, out_at))
        for j, b in enumerate(order[start:start + images]):
            # slot of (q/k/v s, head h, position t): base + s·block + h·length + t
            qkv_base[b] = qkv_at + j * heads * length
            out_base[b] = out_at + j * heads * length
            block[b] = images * heads * length
            stride[b] = length
        qkv_at += 3 * images * heads * length
        out_at += images * heads * length
        start += images

    def per_row(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=packed.dtype, device=device).index_select(0, image)

    head = torch.arange(heads, device=device, dtype=packed.dtype) * per_row(stride).unsqueeze(1)  # ΣN×H
    out_index = (per_row(out_base) + position).unsqueeze(1) + head
    part = torch.arange(3, device=device, dtype=packed.dtype) * per_row(block).unsqueeze(1)  # ΣN×3
    qkv_index = (per_row(qkv_base) + position).view(-1, 1, 1) + part.unsqueeze(2) + head.unsqueeze(1)
    flat_index = qkv_index.reshape(-1)
    qkv_source = torch.full((qkv_at,), -1, dtype=flat_index.dtype, device=device).index_copy_(
        0, flat_index, torch.arange(flat_index.numel(), dtype=flat_index.dtype, device=device))
    for c in chunks:  # padding slots (-1) read their own image's last live vector (position length − 1)
        block_slots = qkv_source[c.qkv_at:c.qkv_at + 3 * c.images * heads * c.length].view(3, c.images, heads, -1)
        last = torch.tensor([max(length_of[b], 1) - 1 for b in order[c.start:c.start + c.images]], device=device)
        last_live = block_slots.gather(3, last.view(1, -1, 1, 1).expand(3, -1, heads, 1))
        block_slots.copy_(torch.where(block_slots < 0, last_live, block_slots))
    order_t = torch.tensor(order, dtype=torch.long, device=device)
    inverse = torch.empty_like(order_t).scatter_(0, order_t, torch.arange(batch, device=device))
    return RaggedLayout(batch, tokens, heads, order_t, inverse, tuple(chunks), packed, qkv_index, qkv_source,
                        out_index.reshape(-1), qkv_at, out_at)


def ragged_attention(
    qkv: Tensor | tuple[Tensor, Tensor, Tensor], layout: RaggedLayout, scale: float, bias: Tensor | None, live: Tensor,
    keys: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Softmax attention of the live rows, the attention every key receives, and the head-averaged keys
    (the explicit softmax: every received attention exact).

    Args:
        qkv: the live rows' q, k and v head vectors, in ``layout.rows`` order: one contiguous
            ΣN×3×H×d tensor (a fused projection), or three contiguous ΣN×H×d tensors.
        layout: their :class:`RaggedLayout`.
        scale: the logit scale.
        bias: additive bias on the logits of each key, B×1×1×N (``log size``), or ``None``.
        live: the hard live-token mask (B×N×1, 1 = live) the padding is removed with.
        keys: whether to return the head-averaged keys.

    Returns:
        ``(out, received, keys)``: ΣN×(H·d) outputs (heads concatenated), B×N float32 received
        attention (0 at padding) and B×N×d head-mean keys (0 at padding) or ``None``.
    """
    fused = isinstance(qkv, Tensor)
    first = qkv if fused else qkv[0]
    rows, heads, d = first.shape[0], layout.heads, first.shape[-1]
    b, n = layout.batch, layout.tokens
    live = live.reshape(b, n).float()
    key_bias = live.log() if bias is None else live.log() + bias.reshape(b, n).float()
    key_bias, live = key_bias.index_select(0, layout.order), live.index_select(0, layout.order)
    vectors = (qkv if fused else torch.stack(qkv, dim=1)).reshape(-1, d)  # ΣN·3·H head vectors, (row, s, h)
    # padding slots read a live vector of their image: kept out by the key bias and a zero query weight
    slots = vectors.index_select(0, layout.qkv_source)
    out = first.new_empty(layout.out_slots, d)
    received = live.new_zeros(b, n)
    for c in layout.chunks:
        m, length, size = c.images, c.length, c.images * heads * c.length
        q, k, v = (slots[c.qkv_at + i * size: c.qkv_at + (i + 1) * size].view(m * heads, length, d) for i in range(3))
        weights = live[c.start:c.start + m, :length]  # m×L: live query rows
        chunk_bias = key_bias[c.start:c.start + m, :length]
        shift = chunk_bias.unsqueeze(1).expand(m, heads, length)
        logits = torch.baddbmm(shift.reshape(m * heads, 1, length), q, k.transpose(1, 2), alpha=scale)
        probs = logits.softmax(dim=-1)  # (m·H)×L×L
        torch.bmm(probs, v, out=out[c.out_at:c.out_at + size].view(m * heads, length, d))
        total = torch.bmm(weights.repeat(1, heads).unsqueeze(1), probs.view(m, heads * length, length)).squeeze(1)
        received[c.start:c.start + m, :length] = total / (heads * weights.sum(dim=1, keepdim=True))
    out_rows = out.index_select(0, layout.out_index).view(rows, heads * d)
    key_rows = padded_key_means(qkv[:, 1] if fused else qkv[1], layout.rows, b, n) if keys else None
    return out_rows, received.index_select(0, layout.inverse), key_rows
