"""Adapter for timm ``Eva`` models: EVA, EVA-02 and the other rotary-position ViTs built on timm's ``Eva``.

Blocks are timm ``EvaBlock`` (pre-norm, optional LayerScale ``gamma_1``/``gamma_2``) or
``EvaBlockPostNorm`` with timm ``EvaAttention``: fused qkv with q/v bias (or separate q/k/v
projections), optional q/k-norm, sub-LN (``attn.norm``), gate, output projection.  MLPs (GELU,
SwiGLU in its packed ``GluMlp`` or separate ``SwiGLU`` form) are run as they are and counted in
GMACs through every ``nn.Linear`` they hold.  Pooling: class token, size-weighted average / max /
avg+max over the non-prefix tokens, or a position-free ``AttentionPoolLatent``
(``global_pool='map'``) over all tokens, prefix included as in timm, that sees every token's size
and live mask (:func:`~tokenreduce.models.timm_vit.size_aware_pool`).

**Rotary positions follow the tokens.**  timm computes one rotary table per forward
(``Eva.rope.get_embed()``: N_patches×2d, or depth×H×N_patches×2d for ``rope_type='mixed'``, or
batched rows after patch dropout) and rotates q and k of every non-prefix token by the row of its
position.  On a reduced model every token carries its original sequence position
(:attr:`~tokenreduce.state.TokenState.pos`) and each block rotates it by that position's row:

* a kept token keeps its own position, wherever the reduction moves it in the sequence;
* a pruned token takes its row away with it (and brings it back if it rejoins, as with Cropr's
  last-layer fusion);
* **a merged token keeps its destination's position** (ToMe, PPT pooling, LTMP: the B-set token
  that absorbs others; TPS/dTPS: the host that absorbs the squeezed tokens).  The merged feature is
  a size-weighted mean of tokens at different places; giving it one of their positions (rather
  than, say, a mean angle, which is not a rotation of any real position and whose sin/cos would not
  be a valid rotary row) keeps every rotation one the model was trained with, and it is the
  destination that ToMe already treats as the survivor (the destination's slot, the source's
  removal).  No alternative rule is offered;
* tokens that are new combinations with no single position, EViT's fused token and BAT's cluster
  tokens, are not rotated (the identity rotation, like the class and register tokens).

ToMe's similarity signal (``keys``) is the head-averaged keys *before* the rotation: the rotation
depends on where a token sits, so rotated keys of two identical patches at different places are
not alike, and which tokens are redundant is a question of content (the merged token's position is
the destination's anyway).  Every other signal (class attention, values, probabilities) is that of
the attention as computed, rotation included.

Not supported (refused with a message): attention classes other than ``EvaAttention``
(``attn_type='rope'`` / grouped-query attention), attention pools other than a position-free
``AttentionPoolLatent``, gradient checkpointing, attention masks and causal attention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import Tensor, nn

from ..ops.attention import AttentionNeeds, AttentionSignals, KeyMask, attend, merge_heads, pack_rows, unpack_rows
from ..ops.gather import head_mean
from .base import ReductionContext, run_block
from .timm_vit import SUPPORTED_POOLS, TimmFamily


def _block_forward(
    self: nn.Module, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """timm ``EvaBlock.forward`` / ``EvaBlockPostNorm.forward`` with the reducer's hooks around the attention.

    ``rope`` is the rotary table timm passes every block (for the unreduced token order); the
    adapter's attention rotates the current tokens by their own rows of it.
    """
    if attn_mask is not None or is_causal:
        raise NotImplementedError("tokenreduce: attention masks / causal attention are not supported on reduced models")
    self._tr_ctx.scratch["rope"] = rope
    return run_block(self, x, lambda tokens: self._tr_base.forward(self, tokens, rope=rope))


def identity_rope_row(table: Tensor) -> Tensor:
    """The rotary row of no rotation (sin 0, cos 1) in ``table``'s [sin, cos] layout: 2d values."""
    width = table.shape[-1]
    return torch.cat([table.new_zeros(width // 2), table.new_ones(width - width // 2)])


def with_identity_row(table: Tensor) -> Tensor:
    """``table`` (N0×2d, H×N0×2d or B×H'×N0×2d) as B'×H'×(1+N0)×2d with the identity rotation as row 0."""
    if table.dim() not in (2, 3, 4):
        raise ValueError(f"tokenreduce: unexpected rotary table of shape {tuple(table.shape)} (expected 2 to 4 dims)")
    t = table.reshape((1,) * (4 - table.dim()) + tuple(table.shape))  # B'×H'×N0×2d
    return torch.cat([identity_rope_row(table).expand(t.shape[0], t.shape[1], 1, -1), t], dim=2)


def rope_rows(table: Tensor, pos: Tensor, num_prefix: int, padded: Tensor | None = None) -> Tensor:
    """The rotary rows of the current non-prefix tokens, gathered by their original positions.

    Args:
        table: the block's rotary table as timm passes it: N0×2d (one for all heads), H×N0×2d
            (``rope_type='mixed'``: per head) or B×H'×N0×2d (per image, after patch dropout);
            row j belongs to the token at original position ``num_prefix + j``.
        pos: B×N×1 original sequence positions of the current tokens (prefix included), negative
            for a token with no position (:data:`~tokenreduce.state.NO_POSITION`).
        num_prefix: P leading (class / register) tokens, which are not rotated.
        padded: :func:`with_identity_row` of ``table`` if already made (every block of a forward
            gets the same table).

    Returns:
        B×H'×(N−P)×2d rows for the tokens after the prefix (H' = 1 for a shared table), the
        identity rotation for tokens with no position; broadcastable against B×H×(N−P)×d q / k.
    """
    t = with_identity_row(table) if padded is None else padded  # row 0: identity
    index = (pos[:, num_prefix:, 0] - (num_prefix - 1)).clamp_min(0)  # B×M: table row + 1, or 0 (no position)
    b, m = index.shape
    heads, width = t.shape[1], t.shape[3]
    if t.shape[0] == 1:
        return t[0].index_select(1, index.reshape(-1)).view(heads, b, m, width).transpose(0, 1)
    return t.gather(2, index.view(b, 1, m, 1).expand(b, heads, m, width))


def signed_table(table: Tensor, half: bool) -> Tensor:
    """``table``'s [sin | cos] rows with the sign of the rotation partner folded into the sin half.

    timm rotates ``x`` to ``x·cos + rot(x)·sin``, where ``rot(x)`` is ``x``'s partners with every other
    one (``rot``) or the first half (``rope_rotate_half``) negated.  Negating a factor is exact, so
    ``x·cos + partners(x)·(±sin)`` (:func:`rotate`) gives the same numbers with fewer ops and copies than
    a stack or cat of negated slices per tensor.
    """
    width = table.shape[-1] // 2
    sign = torch.ones(width, dtype=table.dtype, device=table.device)
    if half:
        sign[: width // 2] = -1.0
    else:
        sign[0::2] = -1.0
    sin, cos = table.chunk(2, -1)
    return torch.cat([sin * sign, cos], dim=-1)


def rotation_partners(x: Tensor, half: bool) -> Tensor:
    """Every coordinate's rotation partner in its place (…×d): timm's ``rot`` pairs coordinates (2i, 2i+1),
    ``rope_rotate_half`` pairs (i, i + d/2); the signs are in :func:`signed_table`."""
    d = x.shape[-1]
    if half:
        return x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    return x.unflatten(-1, (d // 2, 2)).flip(-1).flatten(-2)


def rotate(x: Tensor, rows: Tensor, half: bool) -> Tensor:
    """timm's ``apply_rot_embed_cat(x, table, half)`` for the :func:`signed_table` rows of ``table``, bit for
    bit: ``x·cos + partners(x)·sin±`` (``x``: …×M×d; ``rows``: broadcastable …×M×2d; promoted dtype)."""
    sin, cos = rows.chunk(2, -1)
    return x * cos + rotation_partners(x, half) * sin


def current_rope(ctx: ReductionContext, table: Tensor | None, num_prefix: int, half: bool = False) -> Tensor | None:
    """The :func:`signed_table` rows for the tokens the block receives: timm's table, signed, while they are
    the unreduced tokens in their original order, else :func:`rope_rows` of it (cached until the positions or
    the table change; the signed table is made once per forward, as timm passes every block one table)."""
    if table is None:
        return None
    signed = ctx.scratch.get("rope_signed")
    if signed is None or signed[0] is not table or signed[1] != half:
        signed = (table, half, signed_table(table, half))
        ctx.scratch["rope_signed"] = signed
    table = signed[2]
    if ctx.pos is ctx.pos_start:
        return table
    cached = ctx.scratch.get("rope_rows")
    if cached is not None and cached[0] is table and cached[1] is ctx.pos:
        return cached[2]
    padded = ctx.scratch.get("rope_padded")
    if padded is None or padded[0] is not table:
        padded = (table, with_identity_row(table))
        ctx.scratch["rope_padded"] = padded
    rows = rope_rows(table, ctx.pos, num_prefix, padded[1])
    ctx.scratch["rope_rows"] = (table, ctx.pos, rows)
    return rows


def rotate_after_prefix(x: Tensor, rows: Tensor, num_prefix: int, half: bool, dtype: torch.dtype) -> Tensor:
    """``x`` (…×N×d) with the tokens after the ``num_prefix`` leading ones rotated by ``rows`` (:func:`rotate`),
    in ``dtype``: what timm's ``EvaAttention`` does to q and to k."""
    rotated = rotate(x[..., num_prefix:, :], rows, half).to(dtype)
    if num_prefix == 0:
        return rotated
    return torch.cat([x[..., :num_prefix, :].to(dtype), rotated], dim=-2)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """B×N×(H·d) → B×H×N×d."""
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(1, 2)


def eva_attention(
    attn: EvaAttention,
    x: Tensor,
    rope: Tensor | None,
    bias: Tensor | None,
    needs: AttentionNeeds,
    key_mask: KeyMask | None,
    packed: Tensor | None,
    class_token: bool,
) -> tuple[Tensor, AttentionSignals]:
    """timm ``EvaAttention.forward`` with a key bias, a key mask and signals (via :func:`attend`).

    Args:
        attn: the block's ``EvaAttention``.
        x: B×N×C normalised tokens (ΣN×C live tokens when ``packed``).
        rope: :func:`signed_table` rows for the tokens after the prefix, broadcastable against B×H×(N−P)×2d,
            or ``None``.
        bias, needs, key_mask, packed, class_token: as :func:`~tokenreduce.ops.attention.attention_with_signals`.

    Returns:
        ``(out, signals)``: B×N×C (ΣN×C when packed) and the signals; ``keys`` are taken before the rotation.
    """
    heads = attn.num_heads
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    query_key = None  # 2×B×H×N×d q and k, where they can be read as one tensor
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
        qkv = unpack_rows(qkv, packed, key_mask)
        b, n = qkv.shape[:2]
        per_head = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # 3×B×H×N×d
        q, k, v = per_head.unbind(0)
        if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity):
            query_key = per_head[:2]  # q and k rotate in one pass, read from the projection's output
    else:
        q, k, v = (_split_heads(unpack_rows(proj(x), packed, key_mask), heads)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = attn.q_norm(q), attn.k_norm(k)
    keys = head_mean(k) if needs.keys and not needs.keys_as_heads else None  # the keys before the rotary embedding
    head_keys = k if needs.head_keys or (needs.keys and needs.keys_as_heads) else None
    if rope is not None:
        if query_key is None:
            query_key = torch.stack([q, k])
        half = getattr(attn, "rotate_half", False)
        q, k = rotate_after_prefix(query_key, rope, attn.num_prefix_tokens, half, v.dtype).unbind(0)
    out, signals = attend(
        q, k, v, attn.scale, bias,
        dataclasses.replace(needs, keys=False, head_keys=False) if needs.keys or needs.head_keys else needs, key_mask,
        class_token=class_token, training=attn.training, dropout=attn.attn_drop, fused=attn.fused_attn,
    )
    if keys is not None or head_keys is not None:
        signals = dataclasses.replace(signals, keys=keys, head_keys=head_keys)
    out = attn.norm(pack_rows(merge_heads(out), packed))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), signals


class TimmEva(TimmFamily):
    """timm ``Eva``."""

    name = "timm-eva"
    description = (
        "timm Eva models (EVA, EVA-02, rotary-position ViTs) built from timm EvaBlock or EvaBlockPostNorm and "
        "EvaAttention, with or without rotary position embeddings (cat, mixed, dinov3, mrope tables), SwiGLU or "
        f"GELU MLPs, class / register tokens; global_pool in {[p for p in SUPPORTED_POOLS if p]} or '', or 'map' "
        "(AttentionPoolLatent without a position embedding)"
    )
    model_members = TimmFamily.members(("forward_intermediates",))
    block_classes = (EvaBlock, EvaBlockPostNorm)
    attention_class = EvaAttention
    attention_note = " (attn_type='rope' / grouped-query attention is not supported)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, Eva)

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        rope = getattr(model, "rope", None)
        if rope is not None and not callable(getattr(rope, "get_embed", None)):
            raise TypeError(f"tokenreduce cannot adapt the rotary embedding {type(rope).__name__} (no get_embed "
                            f"table); supported: {cls.description}")

    @classmethod
    def tracks_positions(cls, model: nn.Module) -> bool:
        return getattr(model, "rope", None) is not None

    @classmethod
    def attn_dim(cls, block: nn.Module) -> int:
        return block.attn.num_heads * block.attn.head_dim

    @classmethod
    def block_forward(cls) -> Callable[..., Any]:
        return _block_forward

    @classmethod
    def attention(
        cls, block: nn.Module, x: Tensor, bias: Tensor | None, needs: AttentionNeeds, key_mask: KeyMask | None,
        packed: Tensor | None, class_token: bool,
    ) -> tuple[Tensor, AttentionSignals]:
        ctx: ReductionContext = block._tr_ctx
        attn = block.attn
        rope = current_rope(ctx, ctx.scratch.get("rope"), attn.num_prefix_tokens, getattr(attn, "rotate_half", False))
        tokens = x if isinstance(block, EvaBlockPostNorm) else block.norm1(x)
        return eva_attention(attn, tokens, rope, bias, needs, key_mask, packed, class_token)

    @classmethod
    def attention_residual(cls, block: nn.Module, out: Tensor) -> Tensor:
        if isinstance(block, EvaBlockPostNorm):
            return block.drop_path1(block.norm1(out))
        return block.drop_path1(out if block.gamma_1 is None else block.gamma_1 * out)

    @classmethod
    def mlp(cls, block: nn.Module, x: Tensor) -> Tensor:
        if isinstance(block, EvaBlockPostNorm):
            return block.drop_path2(block.norm2(block.mlp(x)))
        out = block.mlp(block.norm2(x))
        return block.drop_path2(out if block.gamma_2 is None else block.gamma_2 * out)
