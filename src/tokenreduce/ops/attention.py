"""Self-attention that also returns what a method needs: :func:`attend` (family-agnostic, on q, k, v)
and :func:`attention_with_signals` (a timm ``Attention`` module around it).

The output is computed exactly as timm computes it (q/k-norm, scale-norm,
gating, fused scaled-dot-product attention when the module uses it).  The
additive size bias ``log s`` of proportional attention goes into SDPA as a float
``attn_mask``, so the fused kernel is kept.  Signals are produced only on
request:

* ``keys``: head-averaged keys, B×N×d (ToMe's similarity metric);
* ``cls_attn``: the class token's softmax attention row, B×H×N, computed from
  q_cls against all keys (one row, not the N×N matrix), in float32.  A model
  without a class token (``class_token=False``, e.g. ``global_pool='avg'`` ViTs)
  gets a substitute of the same shape instead: the attention each key receives per
  head, averaged over the (live) query rows (:func:`mean_query_attention`; all
  N×N probabilities, computed one head at a time next to the fused kernel);
* ``values``: the value vectors, B×H×N×d;
* ``probs``: the full attention probabilities B×H×N×N (forces the explicit path);
* ``received``: the attention each key receives, averaged over heads and live
  query rows, B×N float32 (LTMP's importance; differentiable in training).  At
  inference it comes with the output from one explicit softmax over chunks of images
  (:func:`attention_and_received`, about 2 MB of probabilities at a time); for a padded
  batch, over chunks of images of similar length without the padding (:func:`attend_ragged`).
  A caller that only compares it with a floor (``received_floor``: LTMP's prune threshold)
  lets CPU float32 inference keep the fused kernel: its log-sum-exp gives a lower bound on
  every token's received attention (:mod:`~tokenreduce.ops.received`), and only images where
  the bound does not clear the floor get the explicit softmax (:func:`attention_with_received_floor`).

A live-token mask (B×N×1) removes keys: hard masks (padding in batched
inference) become a ``−inf`` additive bias and keep the fused kernel; soft masks
of training forms (which carry gradients) use an explicit masked softmax.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import buckets
from .cpu_kernels import fused_bucketed_attention
from .gather import head_mean, padded_rows
from .modes import fp32, tracing
from .ragged import padded_key_means, ragged_attention, ragged_layout
from .received import FLOOR_MARGIN, MIN_FLOOR, certify_received, fused_attention_available, fused_attention_with_lse


@dataclass(frozen=True)
class AttentionNeeds:
    """Which signals a reducer wants from a block's attention."""

    keys: bool = False
    head_keys: bool = False
    """The keys of every head, B×H×N×d, for a method that averages them itself (ToMe's fused merge kernel
    takes them without a separate head-mean op); what ``keys`` averages."""
    keys_as_heads: bool = False
    """With ``keys``: the caller also takes the per-head keys in their place, averaging them itself (LTMP's fused
    kernel).  Where the attention has them as B×H×N×d, it then returns them as ``head_keys`` and ``keys`` is
    ``None``; where it has only their mean (a padded batch's packed rows), ``keys`` as usual."""
    cls_attn: bool = False
    values: bool = False
    probs: bool = False
    received: bool = False
    received_floor: float | None = None
    """With ``received``: the caller only asks, per token, whether the received attention is above this
    value (LTMP prunes a token whose importance is at or below its block's threshold).  Where
    :func:`received_floor_applies`, an image whose every token provably receives more than the floor gets
    a lower bound above it instead of the exact value (:func:`attention_with_received_floor`); every
    comparison with the floor comes out as with the exact values."""


@dataclass(frozen=True)
class AttentionSignals:
    """Signals of one attention call; fields not requested are ``None``.

    ``received`` holds exact values, except for the images that :func:`attention_with_received_floor`
    certified above a ``received_floor``: there it holds a lower bound above the floor."""

    keys: Tensor | None = None
    head_keys: Tensor | None = None
    cls_attn: Tensor | None = None
    values: Tensor | None = None
    probs: Tensor | None = None
    received: Tensor | None = None


NO_NEEDS = AttentionNeeds()


@dataclass(frozen=True)
class KeyMask:
    """Keys to leave out of attention.

    Attributes:
        mask: B×N×1 float, 1 = attend, 0 = removed.
        soft: multiply the mask into a masked softmax (training forms; gradients flow
            into the mask) instead of adding ``log mask`` as a bias.
        keep_diagonal: with ``soft``, every token still attends to itself
            (DynamicViT/TPS), so no row is empty.
        eps: the masked softmax's stabiliser.
    """

    mask: Tensor
    soft: bool = False
    keep_diagonal: bool = False
    eps: float = 1e-6


def masked_softmax(logits: Tensor, key_mask: KeyMask) -> Tensor:
    """Softmax over keys with removed keys zeroed and the rest renormalised, in float32.

    ``p_ij = m_j·exp(l_ij − max_i) / (Σ_k m_k·exp(l_ik − max_i) + eps)``

    DynamicViT's and TPS's ``softmax_with_policy`` also add ``eps/N`` to the numerator,
    so a removed key keeps a probability of about ``eps/N`` there; here it gets exactly
    0 (the live keys' probabilities differ by less than ``eps``).

    Args:
        logits: B×H×N×N attention logits (B×H×L×N for L queries attending to N keys, as an
            attention pool's latents do; ``keep_diagonal`` then needs L = N).

    Returns:
        B×H×N×N (B×H×L×N) float32 probabilities.
    """
    b, n = logits.shape[0], logits.shape[-1]
    m = key_mask.mask.float().reshape(b, 1, 1, n)
    if key_mask.keep_diagonal:
        eye = torch.eye(n, device=logits.device, dtype=m.dtype)
        m = m + (1.0 - m) * eye
    logits = logits.float()
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp() * m
    return weights / (weights.sum(dim=-1, keepdim=True) + key_mask.eps)


def attention_with_signals(
    attn: nn.Module,
    x: Tensor,
    bias: Tensor | None,
    needs: AttentionNeeds = NO_NEEDS,
    key_mask: KeyMask | None = None,
    packed: Tensor | None = None,
    class_token: bool = True,
) -> tuple[Tensor, AttentionSignals]:
    """Run a timm ``Attention`` module with an optional key bias and key mask.

    The projections are timm's (fused qkv, q/k-norm, output norm, gating, proj); the
    attention itself is :func:`attend`.

    Args:
        attn: a ``timm.layers.Attention`` module.
        x: B×N×C normalised input tokens, or ΣN×C live tokens when ``packed`` is given.
        bias: additive bias on the logits of each key, B×1×1×N (``log size``), or ``None``.
        needs: which signals to return.
        key_mask: keys to leave out, or ``None``.
        packed: for padded batched inference, the rows (of the B·N flattening of the
            hard ``key_mask``) of the live tokens ``x`` holds.  The per-token
            projections then run on live tokens only; the attention itself runs in length
            buckets (:func:`attend_bucketed`, :func:`fused_bucketed_rows`), in ragged chunks
            (the explicit softmax) or on the padded B×N layout (padding keys zero and masked out).
        class_token: whether token 0 is a class token.  Without one, ``cls_attn`` is
            the per-head attention each key receives, averaged over the live queries.

    Returns:
        ``(out, signals)`` with ``out`` B×N×C_out (ΣN×C_out when packed), as timm's
        forward would give it (plus the bias); signals are always B×N.
    """
    heads = attn.num_heads
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x)
    head_dim = qkv.shape[-1] // (3 * heads)
    served = None  # (out, signals) where a padded batch's attention ran without its padding
    if ragged_applies(qkv.dtype, needs, key_mask, packed, attn.training) or buckets_apply(
            qkv.dtype, needs, key_mask, packed, attn.training):
        rows = qkv.view(-1, 3, heads, head_dim)
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            rows = (attn.q_norm(rows[:, 0]), attn.k_norm(rows[:, 1]), rows[:, 2])
        if needs.received:
            served = attend_ragged(rows, packed, attn.scale, bias, needs, key_mask)
        else:  # the keys at most: the output in length buckets where the fused kernel is built
            served = fused_bucketed_rows(rows, packed, attn.scale, bias, needs, key_mask)
    if served is not None:
        out, signals = served
    else:
        qkv = unpack_rows(qkv, packed, key_mask)
        b, n = qkv.shape[:2]
        q, k, v = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out, signals = attend(
            q, k, v, attn.scale, bias, needs, key_mask, class_token=class_token, training=attn.training,
            dropout=attn.attn_drop, fused=attn.fused_attn,
        )
        out = pack_rows(merge_heads(out), packed)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), signals


def _padded_inference(dtype: torch.dtype, needs: AttentionNeeds, key_mask: KeyMask | None, packed: Tensor | None,
                      training: bool) -> bool:
    """Padded batched inference (a hard key mask and packed rows; no autograd, not traced), float32, for a
    method that needs at most the received attention and the head-averaged keys (LTMP)."""
    return (
        packed is not None and key_mask is not None and not key_mask.soft and not training
        and not (needs.probs or needs.cls_attn or needs.values or needs.head_keys)
        and dtype == torch.float32 and not torch.is_grad_enabled() and not tracing()
    )


def buckets_apply(dtype: torch.dtype, needs: AttentionNeeds, key_mask: KeyMask | None, packed: Tensor | None,
                  training: bool) -> bool:
    """Whether a padded batch's attention that needs no received attention (the output and at most the
    head-averaged keys: LTMP's blocks whose prune threshold is 0) may run in length buckets on the CPU
    (:func:`fused_bucketed_rows`): padded inference as for :func:`ragged_applies`, and ATen's CPU flash kernel."""
    return (_padded_inference(dtype, needs, key_mask, packed, training) and not needs.received
            and packed.device.type == "cpu" and fused_attention_available())


def fused_bucketed_rows(
    qkv: Tensor | tuple[Tensor, Tensor, Tensor], packed: Tensor, scale: float, bias: Tensor | None,
    needs: AttentionNeeds, key_mask: KeyMask, floor: float | None = None,
) -> tuple[Tensor, AttentionSignals] | None:
    """A padded batch's attention in length buckets in one call of the fused kernel
    (:func:`~tokenreduce.ops.cpu_kernels.fused_bucketed_attention`): the output, the head-mean keys and, with
    ``floor``, the received attention certified against it; ``None`` where the kernel is not built.

    Args:
        qkv: the live rows' head vectors: ΣN×3×H×d, or three ΣN×H×d tensors (q, k, v).
        packed, scale, bias, needs, key_mask: as :func:`attend_bucketed`.
        floor: ``needs.received_floor`` for a caller that needs the received attention, else ``None``.

    Returns:
        ``(out, signals)``: ΣN×(H·d) outputs (heads concatenated) and the signals (B×N), or ``None``.
    """
    rows = qkv if isinstance(qkv, Tensor) else torch.stack(qkv, dim=1)
    b, n = key_mask.mask.shape[:2]
    fused = fused_bucketed_attention(rows, packed, key_mask.mask.reshape(b, n).float(),
                                     None if bias is None else bias.reshape(b, n).float(), scale,
                                     None if floor is None else math.log(floor) + FLOOR_MARGIN, flash_multiple(),
                                     buckets.BUCKET_OVERHEAD, needs.keys)
    if fused is None:
        return None
    out, received, _, keys, _ = fused
    return out, AttentionSignals(keys=keys, received=received)


def ragged_applies(dtype: torch.dtype, needs: AttentionNeeds, key_mask: KeyMask | None, packed: Tensor | None,
                   training: bool) -> bool:
    """Whether :func:`attend_ragged` serves a call: padded inference (:func:`_padded_inference`) for a method
    that needs the received attention."""
    return _padded_inference(dtype, needs, key_mask, packed, training) and needs.received


def attend_ragged(
    qkv: Tensor | tuple[Tensor, Tensor, Tensor], packed: Tensor, scale: float, bias: Tensor | None,
    needs: AttentionNeeds, key_mask: KeyMask,
) -> tuple[Tensor, AttentionSignals]:
    """:func:`attend` for a padded batch's live rows, without the padding (where :func:`ragged_applies`).

    Args:
        qkv: the live rows' head vectors: ΣN×3×H×d, or three ΣN×H×d tensors (q, k, v).
        packed: their ΣN rows in the B·N flattening of ``key_mask``.
        scale, bias, needs, key_mask: as :func:`attend`.

    Returns:
        ``(out, signals)``: ΣN×(H·d) outputs (heads concatenated) and the signals (B×N).
    """
    b, n = key_mask.mask.shape[:2]
    heads = qkv.shape[2] if isinstance(qkv, Tensor) else qkv[0].shape[1]
    if received_floor_applies(needs, packed.device.type, torch.float32):  # the fused kernel, in length buckets
        return attend_bucketed(qkv, packed, scale, bias, needs, key_mask)
    layout = ragged_layout(packed, b, n, heads, PROBS_CHUNK)
    with fp32(packed.device.type):
        out, received, keys = ragged_attention(qkv, layout, scale, bias, key_mask.mask, needs.keys)
    return out, AttentionSignals(keys=keys, received=received)


@functools.cache
def flash_multiple() -> int:
    """Where the padding is ours to choose (a padded batch's length, ragged chunks for the fused kernel), lengths
    are rounded up to multiples of this: the CPU's vector width in float32 lanes, 8 with AVX2 and 16 with
    AVX-512 (and elsewhere).  ATen's CPU flash kernel runs up to twice as fast on such key counts as on a few
    keys fewer, and padding further costs time (``benchmarks/flash_lengths.py``,
    docs/benchmarks.md#ltmp-speed-on-deit-s)."""
    return 8 if torch.backends.cpu.get_cpu_capability() == "AVX2" else 16


def attend_bucketed(
    qkv: Tensor | tuple[Tensor, Tensor, Tensor], packed: Tensor, scale: float, bias: Tensor | None,
    needs: AttentionNeeds, key_mask: KeyMask,
) -> tuple[Tensor, AttentionSignals]:
    """:func:`attention_with_received_floor` for a padded batch's live rows, in length buckets
    (:mod:`~tokenreduce.ops.buckets`): each bucket of images of similar length runs the fused kernel at its
    own longest length (rounded up to :func:`flash_multiple`), not the batch's.  Every image's result is that
    of the padded layout: only the number of padding keys, which the ``−inf`` key bias removes, differs.

    Args:
        qkv: the live rows' head vectors: ΣN×3×H×d, or three ΣN×H×d tensors (q, k, v).
        packed: their ΣN rows in the B·N flattening of ``key_mask``.
        scale, bias, needs, key_mask: as :func:`attend` (``needs.received_floor`` set, see
            :func:`received_floor_applies`).

    Returns:
        ``(out, signals)``: ΣN×(H·d) outputs (heads concatenated) and the signals (B×N; 0 at padding).
    """
    floor = needs.received_floor
    served = fused_bucketed_rows(qkv, packed, scale, bias, needs, key_mask, floor)
    if served is not None:  # the same steps in one kernel call
        return served
    rows = qkv if isinstance(qkv, Tensor) else torch.stack(qkv, dim=1)
    total, _, heads, d = rows.shape
    b, n = key_mask.mask.shape[:2]
    live = key_mask.mask.reshape(b, n).float()
    layout = buckets.bucket_layout(packed, b, n, heads, d, flash_multiple())
    # padding rows read a live row of their image: finite (a padding key's probability is exactly 0, and 0·inf
    # is not), and nothing crosses images
    buffer = rows.reshape(total, -1).index_select(0, layout.source)
    key_bias = live.log() if bias is None else live.log() + bias.reshape(b, n).float()
    out = rows.new_empty(layout.total, heads * d)
    received = live.new_empty(layout.total)
    for bucket in layout.buckets:
        m, length, at = bucket.count, bucket.length, bucket.first
        q, k, v = buffer[at:at + m * length].view(m, length, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        if m == b and length == n:  # one bucket: the padded layout itself
            mask, weights = key_bias, live
        else:
            mask = key_bias.index_select(0, bucket.images)[:, :length]
            weights = live.index_select(0, bucket.images)[:, :length]
        bucket_out, bucket_received = attention_with_received_floor(q, k, v, scale, mask.view(m, 1, 1, length),
                                                                    weights, floor)
        out[at:at + m * length].view(m, length, heads, d).copy_(bucket_out.transpose(1, 2))
        received[at:at + m * length].view(m, length).copy_(bucket_received)
    received = padded_rows(received.index_select(0, layout.slots), packed, b, n)
    keys = padded_key_means(rows[:, 1], packed, b, n) if needs.keys else None
    return out.index_select(0, layout.slots), AttentionSignals(keys=keys, received=received)


def unpack_rows(rows: Tensor, packed: Tensor | None, key_mask: KeyMask | None) -> Tensor:
    """Per-token projections of the live tokens (ΣN×D, ``packed``) scattered into the padded B×N×D
    layout of ``key_mask`` (padding rows zero); ``rows`` (B×N×D) as it is when nothing is packed."""
    if packed is None:
        return rows
    return padded_rows(rows, packed, *key_mask.mask.shape[:2])


def pack_rows(x: Tensor, packed: Tensor | None) -> Tensor:
    """The live rows (ΣN×D) of a padded B×N×D tensor, or ``x`` as it is when nothing is packed."""
    if packed is None:
        return x
    return x.reshape(-1, x.shape[-1]).index_select(0, packed)


def merge_heads(out: Tensor) -> Tensor:
    """B×H×N×d per-head outputs → B×N×(H·d)."""
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    bias: Tensor | None,
    needs: AttentionNeeds = NO_NEEDS,
    key_mask: KeyMask | None = None,
    *,
    class_token: bool = True,
    training: bool = False,
    dropout: nn.Module | None = None,
    fused: bool = True,
) -> tuple[Tensor, AttentionSignals]:
    """Scaled dot-product attention with a key bias and key mask, plus the signals a method asks for.

    Family-agnostic: every adapter computes its model's q, k, v (projections, norms,
    rotary embeddings) and calls this; the output projection is the adapter's again.

    Args:
        q, k, v: B×H×N×d queries, keys and values.
        scale: the logit scale (usually d^−½).
        bias: additive bias on the logits of each key, B×1×1×N (``log size``), or ``None``.
        needs: which signals to return.
        key_mask: keys to leave out, or ``None``.
        class_token: whether token 0 is a class token (else ``cls_attn`` is the mean-query substitute).
        training: the attention module's training flag (dropout on; the fused path otherwise).
        dropout: the module's attention dropout (``nn.Dropout``), or ``None``.
        fused: whether the module uses the fused kernel (``F.scaled_dot_product_attention``).

    Returns:
        ``(out, signals)``: B×H×N×d per-head outputs and the signals (B×N).
    """
    b, _, n, _ = q.shape
    soft = key_mask is not None and key_mask.soft
    if key_mask is not None and not soft:
        hard = key_mask.mask.float().log().transpose(1, 2).unsqueeze(1)  # B×1×1×N: 0 or −inf
        bias = hard if bias is None else bias + hard

    probs = cls_attn = received = None
    rows = None
    if needs.received or (needs.cls_attn and not class_token):
        rows = key_mask.mask[..., 0].float() if key_mask is not None else q.new_ones(b, n, dtype=torch.float32)
    if needs.received and not (needs.probs or soft or training):
        if received_floor_applies(needs, q.device.type, q.dtype):
            # only a comparison with a floor: the fused kernel, and the explicit pass where it is not certain
            out, received = attention_with_received_floor(q, k, v, scale, bias, rows, needs.received_floor)
        else:
            # every probability is needed: one explicit pass gives the output and the received
            # attention (no second QKᵀ)
            out, received = attention_and_received(q, k, v, scale, bias, rows)
    elif needs.probs or soft or not fused:
        logits = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        probs = masked_softmax(logits, key_mask).to(v.dtype) if soft else logits.softmax(dim=-1)
        out = (probs if dropout is None else dropout(probs)) @ v
    else:
        mask = bias if bias is None or bias.dtype == q.dtype else bias.to(q.dtype)
        p = dropout.p if training and dropout is not None else 0.0
        if scale == q.shape[-1] ** -0.5:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
    if needs.cls_attn:
        if not class_token:
            cls_attn = mean_query_attention(q, k, scale, bias, rows, probs)
        elif probs is not None:
            cls_attn = probs[:, :, 0].float()
        else:
            cls_attn = class_attention_row(q, k, scale, bias)

    if needs.received and received is None:
        received = received_attention(q, k, scale, bias, rows, probs)

    signals = AttentionSignals(
        keys=head_mean(k) if needs.keys and not needs.keys_as_heads else None,
        head_keys=k if needs.head_keys or (needs.keys and needs.keys_as_heads) else None,
        cls_attn=cls_attn,
        values=v if needs.values else None,
        probs=probs if needs.probs else None,
        received=received,
    )
    return out, signals


def class_attention_row(q: Tensor, k: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """Softmax attention of query 0 (the class token) over all keys, in float32.

    Args:
        q: B×H×N×d queries; k: B×H×N×d keys; bias: B×1×1×N or ``None``.

    Returns:
        B×H×N probabilities.
    """
    with fp32(q.device.type):
        logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)  # B×H×1×N
        if bias is not None:
            logits = logits + bias.float()
        return logits.softmax(dim=-1).squeeze(2)


def _head_probs(q: Tensor, k: Tensor, scale: float, bias: Tensor | None, head: int) -> Tensor:
    """Softmax attention of one head in float32, B×N×N (call with autocast off)."""
    logits = (q[:, head].float() * scale) @ k[:, head].float().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias[:, 0].float()
    return logits.softmax(dim=-1)


PROBS_CHUNK = 1 << 19
"""Attention probabilities (elements) :func:`attention_and_received` holds at a time: whole images, all
heads at once, as many images as fit (≥ 1).  At batch 1 that is one softmax per block instead of one per
head; at large batches, chunks that stay in cache (~2 MB of float32)."""


def attention_and_received(
    q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Explicit softmax attention plus the attention each key receives.

    Used at inference when a method needs all probabilities (LTMP's importance):
    the logits and softmax are computed once, in float32, and serve both the
    output and :func:`received_attention`'s average.  Images are processed in chunks
    of at most :data:`PROBS_CHUNK` probabilities (every head of an image together).

    Args:
        q, k, v: B×H×N×d; bias: B×1×1×N or ``None``; rows: B×N query weights (live tokens).

    Returns:
        ``(out, received)``: B×H×N×d in ``v``'s dtype, and B×N float32.
    """
    b, heads, n, d = q.shape
    step = max(1, PROBS_CHUNK // max(heads * n * n, 1))
    # a traced graph holds for every batch size: one chunk, no loop over a symbolic batch
    chunks = [slice(None)] if tracing() or b <= step else [slice(i, i + step) for i in range(0, b, step)]
    weights = rows.float().repeat(1, heads).unsqueeze(1)  # B×1×(H·N): every head's query rows
    outs, totals = [], []
    with fp32(q.device.type):
        for chunk in chunks:
            m = q[chunk].shape[0]
            qc, kc = q[chunk].float().reshape(m * heads, n, d), k[chunk].float().reshape(m * heads, n, d)
            if bias is None:  # scale and bias folded into one baddbmm
                logits = torch.baddbmm(qc.new_zeros(1, 1, 1), qc, kc.transpose(1, 2), beta=0.0, alpha=scale)
            else:
                shift = bias[chunk].float().expand(m, heads, 1, n).reshape(m * heads, 1, n)
                logits = torch.baddbmm(shift, qc, kc.transpose(1, 2), alpha=scale)
            probs = logits.softmax(dim=-1)  # (m·H)×N×N
            outs.append(torch.bmm(probs.to(v.dtype), v[chunk].reshape(m * heads, n, d)).view(m, heads, n, d))
            totals.append(torch.bmm(weights[chunk], probs.view(m, heads * n, n)).squeeze(1))  # m×N
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        total = totals[0] if len(totals) == 1 else torch.cat(totals)
        received = total / (heads * rows.float().sum(dim=1, keepdim=True))
    return out, received


def received_floor_applies(needs: AttentionNeeds, device_type: str, dtype: torch.dtype) -> bool:
    """Whether :func:`attention_with_received_floor` serves a call: a ``received_floor`` of at least
    :data:`~.received.MIN_FLOOR`, CPU float32 inference without autograd, not traced (a captured graph gets the exact
    values), and ATen's CPU flash kernel with its log-sum-exp."""
    floor = needs.received_floor
    return (
        needs.received and floor is not None and floor >= MIN_FLOOR and device_type == "cpu"
        and dtype == torch.float32 and not torch.is_grad_enabled() and not tracing()
        and fused_attention_available()
    )


def attention_with_received_floor(
    q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None, rows: Tensor, floor: float
) -> tuple[Tensor, Tensor]:
    """Fused attention plus the received attention wherever it might be at or below ``floor``.

    The CPU flash kernel gives the output and every query row's log-sum-exp; from them
    :func:`~.received.received_log_lower_bound` bounds every key's received attention from below.  An image
    whose live tokens all have a bound above ``floor`` (by :data:`~.received.FLOOR_MARGIN`) cannot lose a token to the
    floor: it gets ``exp(bound)``.  The other images get the exact values from the explicit softmax
    (:func:`attention_and_received`, on those images only), so a comparison with ``floor`` is the same as
    with the exact values for every token.  Each image's result depends on that image alone.

    Args:
        q, k, v: B×H×N×d; bias: B×1×1×N additive key bias (``log size``, ``−inf`` for removed keys) or
        ``None``; rows: B×N query weights (1 for live tokens); floor: > 0.

    Returns:
        ``(out, received)``: B×H×N×d as :func:`torch.nn.functional.scaled_dot_product_attention` gives it,
        and B×N float32 (0 for removed keys).
    """
    out, lse = fused_attention_with_lse(q, k, v, bias, scale)
    bound, certified = certify_received(q, k, lse, scale, bias, rows, floor)
    received = bound.exp()
    if not bool(certified.all()):  # host sync: an image whose tokens might fall to the floor
        uncertain = (~certified).nonzero().squeeze(1)
        _, exact = attention_and_received(q.index_select(0, uncertain), k.index_select(0, uncertain),
                                          v.index_select(0, uncertain),
                                          scale, None if bias is None else bias.index_select(0, uncertain),
                                          rows.index_select(0, uncertain))
        received = received.index_copy(0, uncertain, exact)
    return out, received


def mean_query_attention(
    q: Tensor, k: Tensor, scale: float, bias: Tensor | None, rows: Tensor, probs: Tensor | None = None
) -> Tensor:
    """Attention every key receives in each head, averaged over the query rows weighted by ``rows``.

    ``m_h[j] = Σ_i rows_i · P_h[i, j] / Σ_i rows_i``, in float32.  Stands in for the
    class token's attention row in models without a class token; gradients flow
    when autograd is on.

    Args:
        q, k: B×H×N×d; bias: B×1×1×N or ``None``; rows: B×N query weights (live tokens);
        probs: B×H×N×N probabilities if already computed (then no recomputation).

    Returns:
        B×H×N.
    """
    weights = rows.float().unsqueeze(1)  # B×1×N
    with fp32(q.device.type):
        if probs is not None:
            per_head = (weights.unsqueeze(1) @ probs.float()).squeeze(2)
        else:
            # one B×N×N head at a time keeps peak memory at the fused kernel's level
            shares = [(weights @ _head_probs(q, k, scale, bias, h)).squeeze(1) for h in range(q.shape[1])]
            per_head = torch.stack(shares, dim=1)
        return per_head / weights.sum(dim=-1, keepdim=True)


def received_attention(
    q: Tensor, k: Tensor, scale: float, bias: Tensor | None, rows: Tensor, probs: Tensor | None = None
) -> Tensor:
    """Attention received by every key, averaged over heads and the query rows weighted by ``rows``.

    ``r_j = Σ_h Σ_i rows_i · P_h[i, j] / (H · Σ_i rows_i)``, in float32 (LTMP's importance).
    Gradients flow through the probabilities when autograd is on (LTMP's training form, as in
    the official code); the row weights are detached, so none flows through which rows count.

    Args:
        q, k: B×H×N×d; bias: B×1×1×N or ``None``; rows: B×N query weights (live tokens);
        probs: B×H×N×N probabilities if already computed (then no recomputation).

    Returns:
        B×N.
    """
    rows = rows.detach()
    if probs is None:
        return mean_query_attention(q, k, scale, bias, rows).mean(dim=1)
    weights = rows.float().unsqueeze(1)  # B×1×N
    with fp32(probs.device.type):
        # head mean first: backward then holds one B×N×N float32 tensor, not B×H×N×N
        received = (weights @ probs.float().mean(dim=1)).squeeze(1)
        return received / weights.sum(dim=-1)


def size_bias(size: Tensor | None) -> Tensor | None:
    """Proportional-attention bias ``log s`` as B×1×1×N float32, or ``None`` for unit sizes."""
    if size is None:
        return None
    return size.view(size.shape[0], 1, 1, size.shape[1]).log()  # B×N×1 and B×1×1×N share one memory order
