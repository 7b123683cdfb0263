"""A property test of the Python API over methods, parameters and model configurations (issue #18).

For any method, any plausible or implausible parameters and any small timm ``VisionTransformer``,
``tr.apply`` either refuses with a clear ``ValueError`` / ``TypeError`` (leaving the model stock),
or the reduced model returns finite outputs of the stock shape, and ``tr.remove`` gives back the
stock outputs bit for bit.  Derandomized, so CI sees the same ~40 examples every run.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer

import tokenreduce as tr
from tokenreduce.methods import get_method

METHODS = tr.methods()


@st.composite
def vit_configs(draw) -> dict:
    """Small timm ViT configurations: depth 2-4, width 32/48/64, heads dividing it, 32/48 px images in
    8/16 px patches, class token on/off, 0-2 register tokens, token or average pooling."""
    dim = draw(st.sampled_from([32, 48, 64]))
    class_token = draw(st.booleans())
    return dict(
        depth=draw(st.integers(2, 4)),
        embed_dim=dim,
        num_heads=draw(st.sampled_from([h for h in (1, 2, 3, 4, 8) if dim % h == 0])),
        img_size=draw(st.sampled_from([32, 48])),
        patch_size=draw(st.sampled_from([8, 16])),
        class_token=class_token,
        reg_tokens=draw(st.integers(0, 2)),
        global_pool=draw(st.sampled_from(["token", "avg"])) if class_token else "avg",
        num_classes=5,
    )


def _fields(method: str) -> set[str]:
    cls, _ = get_method(method).resolve({})
    return {f.name for f in dataclasses.fields(cls.Params)}


PLAUSIBLE = {  # values every model drawn accepts (layers 0 and 1 exist at depth 2)
    "budget": st.floats(0.8, 1.0),  # tiny models reach few budgets
    "r": st.integers(0, 8),
    "keep_rate": st.floats(0.3, 1.0),
    "layers": st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True),
    "p": st.integers(1, 3),
}
IMPLAUSIBLE = {  # the ranges of issue #18, edge values included
    "budget": st.one_of(st.sampled_from([-0.5, 0.0, 1e-9, 1.0, 1.5]), st.floats(-0.5, 1.5)),
    "r": st.integers(-2, 40),
    "keep_rate": st.one_of(st.sampled_from([-0.2, 0.0, 1e-9, 1.0, 1.2]), st.floats(-0.2, 1.2)),
    "layers": st.one_of(st.just([]), st.lists(st.integers(-1, 5), max_size=3)),  # empty, repeated, out of range
    "p": st.integers(-1, 40),
}
UNKNOWN = ["bogus", "keeprate", "R", "layer"]


@st.composite
def method_and_params(draw) -> tuple[str, dict, bool]:
    """A method with parameters: 3 times in 4 plausible ones (the method's knob or a budget, layers that
    exist, learned methods untrained), else any mix of implausible values, unknown names and a missing
    ``untrained=True``."""
    method = draw(st.sampled_from(METHODS))
    fields = _fields(method)
    if draw(st.integers(0, 3)) > 0:
        params = {"layers": draw(PLAUSIBLE["layers"])} if "layers" in fields else {}
        knobs = [name for name in ("budget", "r", "keep_rate", "p") if name == "budget" or name in fields]
        knob = draw(st.sampled_from(knobs + [None]))
        if knob is not None:
            params[knob] = draw(PLAUSIBLE[knob])
        return method, params, True
    known = [name for name in IMPLAUSIBLE if name == "budget" or name in fields]
    names = draw(st.lists(st.sampled_from(known), unique=True, max_size=len(known)))
    params = {name: draw(IMPLAUSIBLE[name]) for name in names}
    if draw(st.integers(0, 4)) == 0:
        params[draw(st.sampled_from(UNKNOWN))] = 1
    return method, params, draw(st.integers(0, 4)) > 0


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(config=vit_configs(), choice=method_and_params())
def test_apply_refuses_clearly_or_reduces_and_removes_exactly(config, choice):
    method, params, untrained = choice
    torch.manual_seed(0)
    model = VisionTransformer(**config).eval()
    x = torch.randn(2, 3, config["img_size"], config["img_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = model(x)
    try:
        tr.apply(model, method, untrained=untrained, **params)
    except (ValueError, TypeError) as err:
        assert str(err)  # a message, saying what is wrong
        assert not tr.is_reduced(model)
        with torch.no_grad():
            assert torch.equal(model(x), stock)  # a refused apply leaves the model stock
        return
    with torch.no_grad():
        out = model(x)
    assert out.shape == stock.shape
    assert torch.isfinite(out).all()
    tr.remove(model)
    with torch.no_grad():
        assert torch.equal(model(x), stock)
