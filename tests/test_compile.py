"""torch.compile: every fixed-schedule method traces into one graph (no graph breaks)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import make_vit

import tokenreduce as tr

FIXED = [
    ("tome", {}), ("evit", {}), ("random", {}), ("ppt", {}), ("tps", {}), ("bat", {}),
    ("dynamicvit", {}), ("cropr", {"p": 4}), ("tps", {"variant": "dtps"}), ("tomesd", {}),
]


@pytest.mark.parametrize("method,params", FIXED)
def test_reduced_model_traces_without_graph_breaks(method, params):
    model = make_vit()
    tr.apply(model, method, untrained=True, **params)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
