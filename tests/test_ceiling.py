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
