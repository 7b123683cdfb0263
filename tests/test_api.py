"""The API contract: apply / remove / stats / methods and its errors (README.md#quick-start)."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_vit

import tokenreduce as tr

FOUNDATION_METHODS = {"tome": {}, "evit": {}, "random": {}}


def test_methods_lists_registered_names():
    assert {"tome", "evit", "random"} <= set(tr.methods())
    assert tr.methods() == sorted(tr.methods())


def test_method_modules_import_by_dotted_path():
    # tr.methods() is callable, yet tokenreduce.methods must stay the importable subpackage.
    import tokenreduce.methods.tome as tome_module
    from tokenreduce.methods.evit import EViT

    assert tome_module.ToMe is tr.methods.REGISTRY["tome"]
    assert EViT is tr.methods.REGISTRY["evit"]


NO_REDUCTION = [("tome", {"r": 0}), ("evit", {"keep_rate": 1.0}), ("random", {"keep_rate": 1.0})]


@pytest.mark.parametrize("method,params", NO_REDUCTION)
def test_no_reduction_matches_stock_model(vit, images, method, params):
    with torch.no_grad():
        expected = vit(images)
        tr.apply(vit, method, untrained=True, **params)
        got = vit(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(FOUNDATION_METHODS))
def test_remove_is_bit_identical(vit, images, method):
    with torch.no_grad():
        expected = vit(images)
        tr.apply(vit, method, untrained=True)
        reduced = vit(images)
        tr.remove(vit)
        got = vit(images)
    assert not torch.allclose(reduced, expected)  # the method did something
    assert torch.equal(got, expected)
    assert type(vit) is timm.models.vision_transformer.VisionTransformer
    assert all(type(b) is timm.models.vision_transformer.Block for b in vit.blocks)
    tr.remove(vit)  # idempotent


def test_apply_returns_model_and_keeps_state_dict(vit):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    assert tr.apply(vit, "tome", r=4) is vit
    after = vit.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_reapplying_replaces_previous_method(vit, images):
    tr.apply(vit, "tome", r=4)
    tr.apply(vit, "evit", keep_rate=0.5)
    with torch.no_grad():
        vit(images)
    s = tr.stats(vit)
    assert s.method == "evit"
    assert type(vit).__mro__[1] is timm.models.vision_transformer.VisionTransformer
    assert [b.tokens_in for b in s.blocks][:4] == [65, 65, 65, 65]  # ToMe would have merged in block 0


def test_stats_reports_tokens_and_gmacs(vit, images):
    tr.apply(vit, "tome", r=4)
    with torch.no_grad():
        vit(images)
    s = tr.stats(vit)
    assert s.batch_size == 4
    assert [b.tokens_in for b in s.blocks] == [65 - 4 * i for i in range(12)]
    assert [b.tokens_out for b in s.blocks] == [65 - 4 * (i + 1) for i in range(12)]
    assert s.gmacs == pytest.approx(tr.gmacs(vit, "tome", r=4))
    assert s.gmacs_unreduced == pytest.approx(tr.gmacs(vit))
    assert 0 < s.ratio < 1
    assert "GMACs" in str(s)
    assert s.to_dict()["tokens_out"][-1] == 17


def test_stats_before_forward_and_on_stock_model_raise(vit):
    with pytest.raises(RuntimeError, match="apply"):
        tr.stats(vit)
    tr.apply(vit, "tome")
    with pytest.raises(RuntimeError, match="forward"):
        tr.stats(vit)


def test_random_is_seeded_and_repeatable(vit, images):
    tr.apply(vit, "random", seed=3)
    with torch.no_grad():
        a, b = vit(images), vit(images)
    tr.apply(vit, "random", seed=4)
    with torch.no_grad():
        c = vit(images)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# -- bad input -----------------------------------------------------------------------


def test_unknown_method_lists_available(vit):
    with pytest.raises(ValueError, match="available: .*tome"):
        tr.apply(vit, "tomato")


def test_unknown_parameter_lists_accepted(vit):
    with pytest.raises(TypeError, match="unknown parameter.*ratio.*accepted: .*r"):
        tr.apply(vit, "tome", ratio=0.5)


@pytest.mark.parametrize(
    "method,params,match",
    [
        ("tome", {"r": -1}, "r must be >= 0"),
        ("tome", {"r": (4, 2.0)}, "inflection"),
        ("tome", {"r": [1] * 13}, "at most 12"),
        ("tome", {"r": "13"}, "r must be"),
        ("evit", {"keep_rate": 1.5}, r"keep_rate must be in \(0, 1\]"),
        ("evit", {"keep_rate": 0.0}, r"keep_rate must be in \(0, 1\]"),
        ("evit", {"layers": (3, 12)}, "out of range"),
        ("random", {"layers": (3, 3)}, "must not repeat"),
    ],
)
def test_out_of_range_parameters_raise(vit, method, params, match):
    with pytest.raises(ValueError, match=match):
        tr.apply(vit, method, untrained=True, **params)
    assert not tr.is_reduced(vit)  # a failed apply leaves the model stock


def test_impossible_budget_gives_achievable_range(vit):
    with pytest.raises(ValueError, match=r"achievable budgets .* to 1.0"):
        tr.apply(vit, "evit", budget=0.05)
    with pytest.raises(ValueError, match="budget must be"):
        tr.apply(vit, "tome", budget=1.5)
    with pytest.raises(ValueError, match="either budget or 'r'"):
        tr.apply(vit, "tome", budget=0.5, r=4)


def test_unsupported_models_raise_type_error():
    with pytest.raises(TypeError, match="supported families: timm-vit: timm VisionTransformer"):
        tr.apply(torch.nn.Linear(3, 3), "tome")
    post_norm = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, img_size=64)
    with pytest.raises(TypeError, match="supported"):
        tr.apply(post_norm, "tome")
    prr_pool = make_vit(global_pool="prr")  # 'map' (AttentionPoolLatent) is supported: tests/test_attention_pool.py
    with pytest.raises(TypeError, match="AttentionPoolPrr"):
        tr.apply(prr_pool, "tome")


def test_attention_masks_are_refused(vit):
    tr.apply(vit, "tome")
    with pytest.raises(NotImplementedError, match="attention masks"):
        vit.blocks[0](torch.randn(1, 65, 64), attn_mask=torch.zeros(1, 1, 65, 65))


# -- budgets -------------------------------------------------------------------------


@pytest.mark.parametrize("method,knob", [("tome", "r"), ("evit", "keep_rate"), ("random", "keep_rate")])
@pytest.mark.parametrize("budget", [0.9, 0.75, 0.6])
def test_budget_resolves_to_closest_schedule_not_exceeding(vit, method, knob, budget):
    tr.apply(vit, method, untrained=True, budget=budget)
    resolved = tr.reducer(vit).config()[knob]
    g = tr.gmacs(vit, method, **{knob: resolved})
    assert g <= budget * tr.gmacs(vit) * (1 + 1e-9)
    # one step less reduction would exceed the budget
    looser = resolved - 1 if knob == "r" else round(resolved + 0.001, 3)
    assert tr.gmacs(vit, method, **{knob: looser}) > budget * tr.gmacs(vit)


def test_budget_one_means_no_reduction(vit):
    tr.apply(vit, "tome", budget=1.0)
    assert tr.reducer(vit).config()["r"] == 0


def test_unreduced_context_runs_the_stock_forward(vit, images):
    with torch.no_grad():
        expected = vit(images)
        tr.apply(vit, "tome", r=8)
        reduced = vit(images)
        with tr.unreduced(vit):
            stock = vit(images)
        again = vit(images)
    assert torch.equal(stock, expected)
    assert torch.equal(again, reduced)
    assert tr.stats(vit).blocks[0].tokens_out == 57  # still the reduced forward's record
