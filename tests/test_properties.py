"""Token bookkeeping properties, checked over random schedules and inputs (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenreduce as tr

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

MODELS = {0: make_vit(), 1: make_vit(reg_tokens=3), 2: make_vit(class_token=False, global_pool="avg")}
PREFIX = {0: 1, 1: 4, 2: 0}

method_and_params = st.one_of(
    st.builds(lambda r: ("tome", {"r": r}), st.integers(0, 40)),
    st.builds(lambda r: ("tome", {"r": r}), st.lists(st.integers(0, 12), max_size=12)),
    st.builds(lambda r, i: ("tome", {"r": (r, i)}), st.integers(0, 8), st.floats(-1, 1)),
    st.builds(
        lambda k, layers, fuse: ("evit", {"keep_rate": k, "layers": tuple(layers), "fuse_token": fuse}),
        st.floats(0.05, 1.0),
        st.sets(st.integers(0, 11), min_size=1, max_size=5),
        st.booleans(),
    ),
    st.builds(lambda k, s: ("random", {"keep_rate": k, "seed": s}), st.floats(0.05, 1.0), st.integers(0, 99)),
)


@SETTINGS
@given(choice=method_and_params, model_id=st.sampled_from(sorted(MODELS)), batch=st.integers(1, 3))
def test_bookkeeping(choice, model_id, batch):
    method, params = choice
    model, p = MODELS[model_id], PREFIX[model_id]
    tr.apply(model, method, untrained=True, trace_source=True, **params)
    torch.manual_seed(batch)
    with torch.no_grad():
        out = model(torch.randn(batch, 3, 64, 64))
    ctx = tr.last_forward(model)
    assert torch.isfinite(out).all()
    # token counts follow the schedule
    assert [tuple(r) for r in ctx.block_tokens] == tr.reducer(model).schedule(64 + p)
    # prefix tokens survive untouched
    assert torch.equal(ctx.source[:, :p], torch.eye(64 + p)[:p].expand(batch, p, 64 + p))
    size = ctx.size if ctx.size is not None else torch.ones(batch, ctx.block_tokens[-1][1], 1)
    # every token's size is the number of original patches it stands for
    torch.testing.assert_close(ctx.source.sum(-1, keepdim=True), size)
    # no patch is counted twice; merge-only methods keep them all
    per_patch = ctx.source[:, p:, p:].sum(1)
    assert per_patch.max() <= 1
    if method == "tome":
        assert torch.equal(size[:, p:].sum(1), torch.full((batch, 1), 64.0))
    tr.remove(model)


@pytest.mark.parametrize("method,params", [("tome", {"r": 5}), ("evit", {}), ("tome", {"r": (6, -1)})])
@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_an_image_does_not_depend_on_its_batch(method, params, seed):
    model = MODELS[0]
    tr.apply(model, method, untrained=True, **params)
    torch.manual_seed(seed)
    batch = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(batch[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    tr.remove(model)
