"""The schedule-only copy used to bound speed measurements follows the method's counts exactly."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import tokenreduce as tr
from tokenreduce.eval.ceiling import schedule_only_model


@pytest.mark.parametrize(("method", "params"), [("tome", {"r": 4}), ("evit", {}), ("cropr", {"p": 1})])
def test_schedule_only_reaches_the_same_token_counts(method, params):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    base = copy.deepcopy(model)
    tr.apply(model, method, untrained=True, **params)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
    expected = [(b.tokens_in, b.tokens_out) for b in tr.stats(model).blocks]
    reducer = tr.reducer(model)
    sliced = schedule_only_model(base, reducer.schedule(reducer.info.num_tokens))
    with torch.no_grad():
        out = sliced(x)
    assert out.shape == (2, model.num_classes)
    assert [(b.tokens_in, b.tokens_out) for b in tr.stats(sliced).blocks] == expected
    assert len(set(expected)) > 1


@pytest.mark.parametrize(("method", "params"), [("tome", {"r": 4}), ("dynamicvit", {})])
def test_ceiling_efficiency_is_taken_at_the_gmacs_the_slicing_copy_runs(method, params):
    from tokenreduce.eval.throughput import compare_throughput

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    row = compare_throughput(model, method, params={**params, "untrained": True}, batch_size=1, repeats=1,
                             warmup=0, progress=False, ceiling=True)
    reducer = tr.reducer(model)
    tr.remove(model)
    sliced = schedule_only_model(copy.deepcopy(model), reducer.schedule(reducer.info.num_tokens))
    with torch.no_grad():
        sliced(torch.randn(1, 3, 64, 64))
    # the slicing copy runs the blocks only: DynamicViT's predictors are in the method's GMACs, not in its
    assert row["ceiling_gmacs_ratio"] == pytest.approx(tr.stats(sliced).ratio, rel=1e-9)
    if method == "dynamicvit":
        assert row["ceiling_gmacs_ratio"] < row["gmacs_ratio"]
    else:
        assert row["ceiling_gmacs_ratio"] == pytest.approx(row["gmacs_ratio"], rel=1e-12)
    assert row["ceiling_efficiency"] == pytest.approx(row["ceiling_speedup"] * row["ceiling_gmacs_ratio"])


def test_schedule_only_refuses_a_reduced_model():
    model = tr.apply(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval(), "tome", r=2)
    with pytest.raises(ValueError, match="unreduced model"):
        schedule_only_model(copy.deepcopy(model), [(17, 17)] * 12)
