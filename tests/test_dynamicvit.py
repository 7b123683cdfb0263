"""DynamicViT and dTPS: schedules, selection by predictor score, training forms, squeeze bookkeeping."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_vit

import tokenreduce as tr
from tokenreduce.methods.dynamicvit import stage_keep
from tokenreduce.ops.squeeze import SELF_WEIGHT, squeeze_masked


def test_stage_counts_are_the_papers():
    assert [stage_keep(196, 0.7, k) for k in (1, 2, 3)] == [137, 96, 67]
    with torch.device("meta"):
        deit = timm.create_model("deit_small_patch16_224")
    tr.apply(deit, "dynamicvit", untrained=True)
    sched = tr.reducer(deit).schedule(197)
    assert [n for n, _ in sched] == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    # blocks alone: 2.88 GMACs (docs/methods.md#gmacs-counting); the predictors add their own MACs on top
    blocks_only = tr.reducer(deit).info.cost.macs(sched, 196) / 1e9
    assert round(blocks_only, 2) == 2.88
    assert 2.95 < tr.gmacs(deit, "dynamicvit") < 3.0


@pytest.mark.parametrize("method,params", [("dynamicvit", {}), ("tps", {"variant": "dtps"})])
def test_inference_keeps_the_best_scored_tokens(method, params):
    model = make_vit()
    tr.apply(model, method, untrained=True, trace_source=True, **params)
    reducer = tr.reducer(model)
    # Replace the first predictor by a known score: keep-logit = the first channel of the token.
    reducer.module[0].forward = lambda x, live=None: torch.stack([x[..., 0], -x[..., 0]], dim=-1)
    captured = {}
    hook = model.blocks[3].register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0].clone()))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    hook.remove()
    src = tr.last_forward(model).source  # B×N×65 after the last stage
    expected = captured["x"][:, 1:, 0].topk(44).indices.sort(dim=-1).values + 1  # patch positions kept at stage 1
    stats = tr.stats(model)
    assert [b.tokens_in for b in stats.blocks][3:] == [45.0] * 3 + [32.0] * 3 + [22.0] * 3
    if method == "dynamicvit":  # plain pruning: every original patch in the sources was kept at stage 1
        kept_patches = src[:, 1:].amax(dim=1).nonzero()
        for b in range(2):
            got = kept_patches[kept_patches[:, 0] == b, 1]
            assert set(got.tolist()) <= set(expected[b].tolist())
    else:  # squeezing: the 21 survivors still account for all 64 patches
        assert torch.equal(tr.last_forward(model).size[:, 1:].sum(dim=1), torch.full((2, 1), 64.0))


@pytest.mark.parametrize("method,params", [("dynamicvit", {}), ("tps", {"variant": "dtps"})])
def test_training_form_is_fixed_shape_monotone_and_differentiable(method, params):
    model = make_vit().train()
    tr.apply(model, method, untrained=True, **params)
    out = model(torch.randn(3, 3, 64, 64))
    records = tr.last_forward(model).block_tokens
    assert all(isinstance(n, torch.Tensor) for n, _ in records[3:])
    live = [float(n.detach().mean()) for n, _ in records[3:]]
    assert all(a >= b for a, b in zip(live, live[1:], strict=False))  # once dropped, always dropped
    assert tr.last_forward(model).mask.shape == (3, 65, 1)
    out.sum().backward()
    grads = [p.grad for p in tr.reducer(model).module.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("method,params", [("dynamicvit", {}), ("tps", {"variant": "dtps"})])
def test_inference_is_batch_independent(method, params):
    model = make_vit()
    tr.apply(model, method, untrained=True, **params)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_masked_squeeze_by_hand():
    # Three patch tokens; token 2 is pruned now and is closest to token 0; token 1 stays untouched.
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.2]]])
    keep = torch.tensor([[[1.0], [1.0], [0.0]]])
    guests = torch.tensor([[[0.0], [0.0], [1.0]]])
    out = squeeze_masked(x, keep, guests)
    cos = float(torch.nn.functional.cosine_similarity(x[0, 2], x[0, 0], dim=0))
    w = torch.tensor(cos).exp()
    expected0 = (SELF_WEIGHT * x[0, 0] + w * x[0, 2]) / (SELF_WEIGHT + w)
    torch.testing.assert_close(out[0, 0], expected0)
    torch.testing.assert_close(out[0, 1], x[0, 1])


def test_masked_squeeze_gradient_into_the_decision_is_tps():
    # TPS weighs a guest by exp(g·cos)·g, so d(out)/dg also has the exponent's term.
    # Written out for one host (token 0) and one guest (token 2), with g the guest's decision.
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.5]]])
    keep = torch.tensor([[[1.0], [1.0], [0.0]]])
    g = torch.tensor(1.0, requires_grad=True)
    guests = torch.stack([torch.tensor(0.0), torch.tensor(0.0), g]).view(1, 3, 1)
    squeeze_masked(x, keep, guests)[0, 0].sum().backward()
    cos = float(torch.nn.functional.cosine_similarity(x[0, 2], x[0, 0], dim=0))
    h = torch.tensor(1.0, requires_grad=True)
    w = (h * cos).exp() * h
    ((SELF_WEIGHT * x[0, 0] + w * x[0, 2]) / (SELF_WEIGHT + w)).sum().backward()
    torch.testing.assert_close(g.grad, h.grad)
    assert abs(float(g.grad)) > 0


def test_dtps_training_refuses_prop_attn():
    model = tr.apply(make_vit().train(), "tps", untrained=True, variant="dtps", prop_attn=True)
    with pytest.raises(ValueError, match="prop_attn"):
        model(torch.randn(2, 3, 64, 64))
    model.eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)  # inference keeps the option
