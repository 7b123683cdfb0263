"""Attention-pool heads (``global_pool='map'``, SigLIP's ``AttentionPoolLatent``) on reduced models: the latent
queries see every token with its size (``log size`` key bias) and never see removed tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit
from torch import nn
from torch.utils import flop_counter

import tokenreduce as tr
from tokenreduce.models.timm_vit import attention_pool
from tokenreduce.ops.attention import KeyMask, size_bias


def _pool(fused: bool = True) -> nn.Module:
    model = make_vit(global_pool="map")
    pool = model.attn_pool
    pool.fused_attn = fused
    with torch.no_grad():  # a sharper query than timm's init, so that the weights matter
        pool.latent.mul_(20.0)
    return pool


@pytest.mark.parametrize("fused", [True, False])
def test_without_sizes_or_masks_it_is_timms_pool(fused):
    pool = _pool(fused)
    x = torch.randn(3, 9, 64)
    with torch.no_grad():
        assert torch.equal(attention_pool(pool, x, None, None), pool(x))


@pytest.mark.parametrize("fused", [True, False])
def test_a_token_of_size_two_weighs_as_two_identical_tokens(fused):
    pool = _pool(fused)
    torch.manual_seed(0)
    a, b, c = torch.randn(3, 1, 1, 64).unbind(0)
    duplicated = torch.cat([a, b, b, c], dim=1)  # B×4×C
    merged = torch.cat([a, b, c], dim=1)
    sizes = torch.tensor([[[1.0], [2.0], [1.0]]])
    with torch.no_grad():
        expected = pool(duplicated)
        got = attention_pool(pool, merged, size_bias(sizes), None)
        unweighted = attention_pool(pool, merged, None, None)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert (unweighted - expected).abs().max() > 1e-3  # the size is what makes them equal


@pytest.mark.parametrize("soft", [False, True])
def test_removed_tokens_are_not_seen(soft):
    pool = _pool()
    x = torch.randn(2, 6, 64)
    mask = torch.tensor([[1.0, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 0]]).unsqueeze(-1)
    with torch.no_grad():
        got = attention_pool(pool, x, None, KeyMask(mask, soft=soft))
        for i in range(2):
            live = x[i : i + 1, mask[i, :, 0] > 0]
            torch.testing.assert_close(got[i : i + 1], pool(live), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("class_token", [True, False])
def test_zero_reduction_equals_the_stock_model(class_token):
    model = make_vit(global_pool="map", class_token=class_token)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stock = model(x)
        tr.apply(model, "tome", r=0)
        assert torch.equal(model(x), stock)
        tr.apply(model, "evit", keep_rate=1.0)
        assert torch.equal(model(x), stock)


@pytest.mark.parametrize("class_token", [True, False])
def test_merging_identical_tokens_changes_nothing_with_proportional_attention(class_token, monkeypatch):
    # No position embedding and horizontally paired identical patches: in block 0 every A token
    # (odd patch) has an identical B partner (the even patch before it); ToMe merges half of them
    # (sizes 2 and 1: a uniform size would cancel in every softmax).
    model = make_vit(global_pool="map", pos_embed="none", class_token=class_token, no_embed_class=True)
    with torch.no_grad():
        model.attn_pool.latent.mul_(20.0)
        model.head.weight.normal_(0, 0.5)
    torch.manual_seed(3)
    half = torch.randn(2, 3, 64, 32)
    images = half.view(2, 3, 64, 4, 8).repeat_interleave(2, dim=3).reshape(2, 3, 64, 64)  # 8-px patches in pairs
    r = 16
    with torch.no_grad():
        stock = model(images)
        tr.apply(model, "tome", r=[r], trace_source=True)
        merged = model(images)
    record = tr.last_forward(model)
    assert record.block_tokens[0] == (64 + class_token, 64 - r + class_token)
    assert bool((record.size[:, int(class_token):] == 2).sum(dim=1).eq(r).all())
    for b in range(2):  # every merge joined a pair of identical patches: (2j, 2j+1) are tokens (2j+c, 2j+1+c)
        for row in record.source[b][record.size[b, :, 0] == 2]:
            first = int(row.nonzero()[0]) - int(class_token)
            assert first % 2 == 0 and row.nonzero().flatten().tolist() == [first + class_token, first + 1 + class_token]
    torch.testing.assert_close(merged, stock, atol=1e-5, rtol=1e-5)
    # the pool's share: without the sizes in the pool the merged model is another model
    monkeypatch.setattr("tokenreduce.models.timm_vit.size_bias", lambda size: None)
    with torch.no_grad():
        assert (model(images) - stock).abs().max() > 1e-2 * stock.abs().max()


@pytest.mark.parametrize("method,params", [
    ("tome", {"r": 4}), ("evit", {}), ("ltmp", {}), ("dynamicvit", {}), ("cropr", {"p": 4}), ("ppt", {}),
])
def test_methods_run_on_map_models_and_remove_is_exact(method, params):
    model = make_vit(global_pool="map", reg_tokens=2)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        stock = model(x)
        tr.apply(model, method, untrained=True, **params)
        out = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
        tr.remove(model)
        assert torch.equal(model(x), stock)
    assert out.shape == stock.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)  # padding (LTMP) never reaches the pool


def test_training_forms_backpropagate_through_the_pool():
    model = make_vit(global_pool="map")
    tr.apply(model, "dynamicvit", untrained=True)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    grads = [p.grad for p in tr.reducer(model).module.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


@pytest.mark.parametrize("pool_include_prefix", [False, True])
def test_gmacs_count_the_pool(pool_include_prefix):
    model = make_vit(global_pool="map", pool_include_prefix=pool_include_prefix).requires_grad_(False)
    sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping={sdpa: _sdpa_cpu_flops} if sdpa else {})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), counter:
        model(x)
    assert counter.get_total_flops() / 2 / 2 == pytest.approx(tr.gmacs(model) * 1e9, rel=1e-9)
    cost = tr.reducer(tr.apply(model, "tome", r=4)).info.cost
    assert cost.pool_token > 0 and cost.pool_skip == (0 if pool_include_prefix else 1)


def test_other_attention_pools_are_refused():
    with pytest.raises(TypeError, match="AttentionPoolPrr"):
        tr.apply(make_vit(global_pool="prr"), "tome")
