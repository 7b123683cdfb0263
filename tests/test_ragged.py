"""Ragged attention of padded batches: layout by hand, agreement with the padded path, model logits."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
import tokenreduce.ops.attention as attention_ops
from tokenreduce.ops.attention import attention_and_received, unpack_rows
from tokenreduce.ops.ragged import ragged_attention, ragged_layout


def _packed(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().squeeze(1)


def test_layout_sorts_images_by_length_and_cuts_chunks_by_the_budget():
    # lengths (last live position + 1): 2, 4, 1, 4
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]).view(4, 4, 1)
    one_each = ragged_layout(_packed(mask), 4, 4, heads=2, budget=1)
    assert one_each.order.tolist() == [1, 3, 0, 2]  # longest first, ties in batch order
    assert [(c.start, c.images, c.length) for c in one_each.chunks] == [(0, 1, 4), (1, 1, 4), (2, 1, 2), (3, 1, 1)]
    assert one_each.inverse.tolist() == [2, 0, 3, 1]
    # H·L² = 32 probabilities per 4-long image: a budget of 64 holds both; the 2-long (8 each) go together
    grouped = ragged_layout(_packed(mask), 4, 4, heads=2, budget=64)
    assert [(c.start, c.images, c.length) for c in grouped.chunks] == [(0, 2, 4), (2, 2, 2)]
    # slots: q, k, v of a chunk are m×H×L head vectors each; image 1 (chunk 0, j=0), position 3, head 1
    assert grouped.qkv_slots == 3 * 2 * 2 * 4 + 3 * 2 * 2 * 2
    row = _packed(mask).tolist().index(1 * 4 + 3)
    assert grouped.qkv_index[row].tolist() == [[3, 7], [19, 23], [35, 39]]  # s·16 + h·4 + 3
    assert grouped.out_index.view(-1, 2)[row].tolist() == [3, 7]
    # the gather index inverts the slots: head vector (row, s, h) = row·6 + s·2 + h sits in slot qkv_index[row, s, h]
    expected = [row * 6 + s * 2 + h for s in range(3) for h in range(2)]
    assert grouped.qkv_source[[3, 7, 19, 23, 35, 39]].tolist() == expected
    taken = torch.zeros(grouped.qkv_slots, dtype=torch.bool)
    taken[grouped.qkv_index.view(-1)] = True
    # padding slots read their own image's last live vector of the same part and head: image 1's position 1 is
    # padding (chunk 0, j=0: slot s·16 + h·4 + 1); its last live position 3 is packed row 4
    assert (~taken).any() and (grouped.qkv_source >= 0).all()
    assert grouped.qkv_source[1 * 16 + 1 * 4 + 1].item() == 4 * 6 + 1 * 2 + 1  # k, head 1
    image_of_row = _packed(mask) // 4
    for slot in (~taken).nonzero().flatten().tolist():  # nothing crosses images
        chunk = [c for c in grouped.chunks if c.qkv_at <= slot][-1]
        j = (slot - chunk.qkv_at) % (chunk.images * 2 * chunk.length) // (2 * chunk.length)
        source_row = grouped.qkv_source[slot].item() // 6
        assert image_of_row[source_row] == grouped.order[chunk.start + j]


def test_attention_by_hand_on_a_two_image_batch():
    # H = 1, d = 1: logits are products of scalars.  Image 0: tokens 0, 1, 2 live; image 1: tokens 0, 1.
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]]).view(2, 3, 1)
    packed = _packed(mask)  # rows 0, 1, 2, 3, 4
    q = torch.tensor([1.0, 0.0, 2.0, 1.0, -1.0]).view(5, 1, 1)
    k = torch.tensor([0.0, 1.0, math.log(2.0), 1.0, 0.0]).view(5, 1, 1)
    v = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0]).view(5, 1, 1)
    layout = ragged_layout(packed, 2, 3, heads=1, budget=1)
    out, received, keys = ragged_attention((q, k, v), layout, 1.0, None, mask, keys=True)

    def softmax(logits):
        e = [math.exp(x) for x in logits]
        return [x / sum(e) for x in e]

    p0 = [softmax([qi * kj for kj in (0.0, 1.0, math.log(2.0))]) for qi in (1.0, 0.0, 2.0)]
    p1 = [softmax([qi * kj for kj in (1.0, 0.0)]) for qi in (1.0, -1.0)]
    expected_out = [sum(p * vj for p, vj in zip(row, (1.0, 2.0, 3.0), strict=True)) for row in p0]
    expected_out += [sum(p * vj for p, vj in zip(row, (10.0, 20.0), strict=True)) for row in p1]
    torch.testing.assert_close(out.view(-1), torch.tensor(expected_out))
    expected_received = [[sum(r[j] for r in p0) / 3 for j in range(3)],
                         [sum(r[j] for r in p1) / 2 for j in range(2)] + [0.0]]
    torch.testing.assert_close(received, torch.tensor(expected_received))
    expected_keys = torch.tensor([[0.0, 1.0, math.log(2.0)], [1.0, 0.0, 0.0]])  # padding: 0
    torch.testing.assert_close(keys.view(2, 3), expected_keys)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 6), tokens=st.integers(1, 9), heads=st.integers(1, 3), dim=st.integers(1, 4),
    budget=st.sampled_from([1, 40, 300, 1 << 19]), fused=st.booleans(), sizes=st.booleans(), seed=st.integers(0, 999),
)
def test_ragged_attention_equals_the_padded_path(batch, tokens, heads, dim, budget, fused, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, tokens, 1, generator=g) < 0.6).float()
    mask[:, 0] = 1.0  # the prefix token is always live
    packed = _packed(mask)
    rows = torch.randn(packed.numel(), 3, heads, dim, generator=g)
    bias = torch.rand(batch, 1, 1, tokens, generator=g).add(0.5).log() if sizes else None

    padded = unpack_rows(rows.view(packed.numel(), -1), packed, attention_ops.KeyMask(mask))
    q, k, v = padded.view(batch, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
    hard = mask.log().transpose(1, 2).unsqueeze(1)
    expected_out, expected_received = attention_and_received(
        q, k, v, 0.7, hard if bias is None else bias + hard, mask[..., 0])
    expected_rows = expected_out.transpose(1, 2).reshape(batch * tokens, heads * dim).index_select(0, packed)

    layout = ragged_layout(packed, batch, tokens, heads, budget)
    qkv = rows if fused else tuple(rows[:, i].contiguous() for i in range(3))
    out, received, keys = ragged_attention(qkv, layout, 0.7, bias, mask, keys=True)
    torch.testing.assert_close(out, expected_rows, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received, expected_received, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(keys, k.mean(dim=1) * mask)


def test_ltmp_model_uses_the_ragged_path_with_the_same_logits(monkeypatch):
    # the explicit pass where the fused kernel's bound is not used (attention_with_received_floor)
    monkeypatch.setattr(attention_ops, "received_floor_applies", lambda *args: False)
    model = make_vit()
    tr.apply(model, "ltmp", untrained=True, merge_threshold=0.3, prune_threshold=0.012)
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    calls = []
    original = attention_ops.attend_ragged

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_ops, "attend_ragged", spy)
    with torch.no_grad():
        ragged = model(x)
        assert calls, "padded batched inference should run the ragged attention"
        monkeypatch.setattr(attention_ops, "ragged_applies", lambda *args: False)
        padded = model(x)
    torch.testing.assert_close(ragged, padded, atol=1e-5, rtol=1e-5)
    assert len(set(b.tokens_out for b in tr.stats(model).blocks)) > 1


@pytest.mark.parametrize("grad", [True, False])
def test_ragged_path_is_left_out_with_autograd_or_batch_one(monkeypatch, grad):
    model = make_vit()
    tr.apply(model, "ltmp", untrained=True, merge_threshold=0.3, prune_threshold=0.012)
    monkeypatch.setattr(attention_ops, "attend_ragged", lambda *a, **k: pytest.fail("ragged path used"))
    x = torch.randn(2 if grad else 1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x[-1] = x[-1].mean()  # with two images: a flat one merges more, so the batch is padded
    with torch.set_grad_enabled(grad):
        model(x)
    if grad:
        final = tr.last_forward(model).block_tokens[-1][1]
        assert torch.is_tensor(final) and final[0] != final[1], "the batch should be padded"
