"""The timm adapter on the model families docs/methods.md#supported-models lists."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_vit

import tokenreduce as tr

METHODS = [("tome", {"r": 4}), ("evit", {"keep_rate": 0.5}), ("random", {"keep_rate": 0.5})]


def _run(model, images, method, params, trace_source=True):
    tr.apply(model, method, untrained=True, trace_source=trace_source, **params)
    with torch.no_grad():
        out = model(images)
    return out, tr.last_forward(model)


def _assert_prefix_intact(ctx, num_prefix):
    eye = torch.eye(ctx.num_tokens_in)[:num_prefix]
    for b in range(ctx.source.shape[0]):
        assert torch.equal(ctx.source[b, :num_prefix], eye)


@pytest.mark.parametrize("method,params", METHODS)
def test_distilled_deit_protects_class_and_distillation_tokens(method, params):
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64).eval()
    assert model.num_prefix_tokens == 2
    out, ctx = _run(model, torch.randn(2, 3, 64, 64), method, params)
    assert out.shape == (2, 1000)
    _assert_prefix_intact(ctx, 2)


@pytest.mark.parametrize("method,params", METHODS)
def test_register_tokens_are_protected(method, params):
    model = make_vit(reg_tokens=4)
    assert model.num_prefix_tokens == 5
    out, ctx = _run(model, torch.randn(2, 3, 64, 64), method, params)
    _assert_prefix_intact(ctx, 5)
    assert torch.isfinite(out).all()


def test_deit3_layerscale_and_qk_norm_are_kept():
    # r=0 must equal the stock forward, so LayerScale, q/k-norm and scale-norm are applied.
    for model in (
        timm.create_model("deit3_small_patch16_224", pretrained=False, img_size=64).eval(),
        make_vit(qk_norm=True, init_values=0.1),
        make_vit(scale_attn_norm=True),
    ):
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            for blk in model.blocks:  # make LayerScale non-trivial
                if hasattr(blk.ls1, "gamma"):
                    blk.ls1.gamma.uniform_(0.5, 1.5)
            expected = model(x)
            tr.apply(model, "tome", r=0)
            got = model(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_unfused_attention_path_matches_too(monkeypatch):
    model = make_vit()
    for blk in model.blocks:
        blk.attn.fused_attn = False
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        tr.apply(model, "evit", keep_rate=1.0)
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_average_pooling_weights_tokens_by_patch_count():
    model = make_vit(global_pool="avg", class_token=False, reg_tokens=2)
    tr.apply(model, "tome", r=6, trace_source=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        # Independent check: give every original patch the feature of the token that absorbed it,
        # then take a plain mean over the 64 patches.
        source = tr.last_forward(model).source  # B×N×N0
        per_patch = source.transpose(1, 2) @ feats  # B×N0×C
        expected = model.fc_norm(per_patch[:, 2:].mean(dim=1))
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("img_size", [48, 96])
def test_other_image_sizes(img_size):
    model = make_vit(dynamic_img_size=True)
    tr.apply(model, "evit")
    with torch.no_grad():
        model(torch.randn(2, 3, img_size, img_size))
    s = tr.stats(model)
    n = (img_size // 8) ** 2 + 1
    expected = tr.reducer(model).schedule(n)
    assert [(b.tokens_in, b.tokens_out) for b in s.blocks] == expected
    assert s.gmacs_unreduced == pytest.approx(tr.gmacs(model, num_tokens=n))


@pytest.mark.parametrize("method,params", METHODS)
def test_bf16_autocast_runs_on_cpu(method, params):
    model = make_vit()
    x = torch.randn(2, 3, 64, 64)
    tr.apply(model, method, untrained=True, **params)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.25 * ref.abs().max()
    assert [b.tokens_out for b in tr.stats(model).blocks] == [m for _, m in tr.reducer(model).schedule(65)]


def test_training_mode_forward_and_backward_run():
    model = make_vit(drop_path_rate=0.1).train()
    tr.apply(model, "tome", r=4)
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
