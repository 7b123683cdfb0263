"""TPS (eTPS): EViT selection + squeeze, on a hand-worked example and on models."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import make_vit

import tokenreduce as tr
from tokenreduce.methods.tps import TPS
from tokenreduce.models import model_info
from tokenreduce.ops.attention import AttentionSignals
from tokenreduce.state import TokenState

E = math.e


def test_hand_worked_block():
    info = model_info(make_vit())
    reducer = TPS.create(info, keep_rate=0.5)
    # CLS, t1=(2,0), t2=(1,0), t3=(3,4), t4=(0,1)
    x = torch.tensor([[[5.0, 5.0], [2.0, 0.0], [1.0, 0.0], [3.0, 4.0], [0.0, 1.0]]])
    # head-averaged class attention: t1 .1, t2 .3, t3 .05, t4 .2 -> keep t2, t4 (in that order)
    cls_attn = torch.tensor([[[0.1, 0.2, 0.2, 0.1, 0.4], [0.3, 0.0, 0.4, 0.0, 0.0]]])
    state = TokenState(x, None, torch.eye(5).unsqueeze(0), 1)
    out = reducer.reduce(3, state, AttentionSignals(cls_attn=cls_attn))
    # t1 squeezes into t2 (cos 1, weight e); t3 into t4 (cos .8 > .6, weight e^.8)
    w = math.exp(0.8)
    expected = torch.tensor([[[5.0, 5.0], [1.5, 0.0], [3 * w / (E + w), (E + 4 * w) / (E + w)]]])
    torch.testing.assert_close(out.x, expected)
    assert out.size.squeeze(-1).tolist() == [[1.0, 2.0, 2.0]]
    assert out.source[0].nonzero().tolist() == [[0, 0], [1, 1], [1, 2], [2, 3], [2, 4]]


def _forward(model, images):
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("family", ["plain", "distilled", "registers"])
def test_bookkeeping_on_models(family):
    if family == "distilled":
        model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64).eval()
    else:
        model = make_vit(reg_tokens=4 if family == "registers" else 0)
    p = model.num_prefix_tokens
    patches = model.patch_embed.num_patches
    tr.apply(model, "tps", trace_source=True)
    images = torch.randn(3, 3, 64, 64)
    out = _forward(model, images)
    ctx = tr.last_forward(model)
    assert [tuple(r) for r in ctx.block_tokens] == tr.reducer(model).schedule(p + patches)
    # prefix untouched; squeezing keeps every patch: sizes sum to the patch count
    assert torch.equal(ctx.source[:, :p], torch.eye(p + patches)[:p].expand(3, -1, -1))
    assert torch.equal(ctx.size[:, p:].sum(1), torch.full((3, 1), float(patches)))
    assert torch.equal(ctx.source[:, p:, p:].sum(1), torch.ones(3, patches))
    torch.testing.assert_close(ctx.source.sum(-1, keepdim=True), ctx.size)
    # batch independence
    for i in range(3):
        torch.testing.assert_close(_forward(model, images[i : i + 1])[0], out[i], rtol=1e-4, atol=1e-5)


def test_prop_attn_is_off_by_default_and_optional():
    model = make_vit()
    images = torch.randn(2, 3, 64, 64)
    tr.apply(model, "tps")
    assert tr.reducer(model).prop_attn is False
    plain = _forward(model, images)
    tr.apply(model, "tps", prop_attn=True)
    assert not torch.allclose(_forward(model, images), plain)


def test_counts_and_gmacs_are_evit_without_the_fused_token():
    with torch.device("meta"):
        model = timm.create_model("deit_small_patch16_224")
    schedule = TPS.create(model_info(model)).schedule(197)
    assert [m for n, m in schedule if n != m] == [139, 98, 69]
    assert tr.gmacs(model, "tps") == pytest.approx(tr.gmacs(model, "evit", fuse_token=False))
    assert round(tr.gmacs(model, "tps"), 2) == 3.00
    tr.apply(model, "tps", budget=0.6)
    keep_rate = tr.reducer(model).params.keep_rate
    assert tr.gmacs(model, "tps", keep_rate=keep_rate) <= 0.6 * tr.gmacs(model)
    assert tr.gmacs(model, "tps", keep_rate=round(keep_rate + 0.001, 3)) > 0.6 * tr.gmacs(model)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"variant": "dtps", "temperature": -1.0}, "temperature"),
        ({"variant": "xtps"}, "variant must be"),
        ({"keep_rate": 0.0}, "keep_rate"),
        ({"keep_rate": 1.2}, "keep_rate"),
        ({"temperature": 0.0}, "temperature"),
        ({"layers": (-1,)}, "out of range"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        tr.apply(make_vit(), "tps", **params)
