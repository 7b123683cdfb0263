"""Models without a class token: class-attention methods score tokens by the attention they receive.

EViT, PPT, BAT and eTPS rank tokens by the class token's attention row.  A ViT built with
``class_token=False`` has no such row (token 0 is a patch or register token), so the
adapter hands them the attention each key receives per head, averaged over the live
queries (the usual stand-in for CLS-free encoders).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_vit

import tokenreduce as tr
from tokenreduce.ops.attention import AttentionNeeds, attention_with_signals, mean_query_attention


def explicit_probs(attn, x):
    """The rule written out: the full softmax of every head, B×H×N×N, from the module's own weights."""
    b, n, c = x.shape
    q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    return ((q @ k.transpose(-2, -1)) / math.sqrt(c // attn.num_heads)).softmax(dim=-1)


def test_mean_query_attention_by_hand():
    # Head 0: zero queries, so every row is softmax(log s) = s / Σs = [1/4, 1/2, 1/4].
    # Head 1: q_i = 20·e_i, k_j = e_j: each query attends (up to e^-20) only to itself,
    # so the live rows 0 and 1 give keys 0 and 1 half of the attention each.
    q = torch.stack([torch.zeros(3, 3), 20 * torch.eye(3)]).unsqueeze(0)  # 1×2×3×3
    k = torch.stack([torch.randn(3, 3), torch.eye(3)]).unsqueeze(0)
    bias = torch.tensor([1.0, 2.0, 1.0]).log().view(1, 1, 1, 3)
    rows = torch.tensor([[1.0, 1.0, 0.0]])
    got = mean_query_attention(q, k, 1.0, bias, rows)
    torch.testing.assert_close(got[0, 0], torch.tensor([0.25, 0.5, 0.25]))
    torch.testing.assert_close(got[0, 1], torch.tensor([0.5, 0.5, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_signal_without_class_token_is_the_mean_over_queries(fused):
    model = make_vit(class_token=False, global_pool="avg")
    attn = model.blocks[0].attn
    attn.fused_attn = fused
    x = torch.randn(2, 64, model.embed_dim)
    with torch.no_grad():
        out_plain = attn(x)
        out, signals = attention_with_signals(attn, x, None, AttentionNeeds(cls_attn=True), class_token=False)
        out_cls, signals_cls = attention_with_signals(attn, x, None, AttentionNeeds(cls_attn=True))
        probs = explicit_probs(attn, x)
    torch.testing.assert_close(out, out_plain)
    torch.testing.assert_close(signals.cls_attn, probs.mean(dim=2))
    torch.testing.assert_close(signals_cls.cls_attn, probs[:, :, 0])  # with a class token: row 0
    torch.testing.assert_close(out_cls, out_plain)


def test_evit_without_class_token_keeps_the_most_attended_tokens():
    model = make_vit(class_token=False, global_pool="avg")
    tr.apply(model, "evit", keep_rate=0.5, fuse_token=False, trace_source=True)
    captured = {}
    model.blocks[3].norm1.register_forward_hook(lambda mod, inp, out: captured.setdefault("x", out))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(images)
        # block 3's attention input: all 64 patch tokens, no reduction before it
        probs = explicit_probs(model.blocks[3].attn, captured["x"])
    importance = probs.mean(dim=(1, 2))  # B×N: heads and queries averaged
    expected = importance.topk(32, dim=1).indices.sort(dim=1).values
    stages = dict(tr.last_forward(model).stages)
    source = stages["block 3"]  # B×32×64: one original token per kept token
    assert source.shape == (2, 32, 64)
    kept = source.argmax(dim=-1).sort(dim=1).values
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("method", ["evit", "ppt", "bat", "tps"])
def test_class_attention_methods_run_on_a_model_without_class_token(method):
    model = make_vit(class_token=False, global_pool="avg", reg_tokens=2)
    tr.apply(model, method, untrained=True)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert tr.reducer(model).info.has_class_token is False
    assert tr.stats(model).gmacs < tr.stats(model).gmacs_unreduced
