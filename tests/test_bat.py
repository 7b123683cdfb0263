"""BAT: decoupling, DPC-kNN clusters of inattentive tokens, attentive pair merges."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_vit

import tokenreduce as tr
from tokenreduce.methods import bat as bat_module
from tokenreduce.methods.bat import BAT, default_num_clusters
from tokenreduce.models import model_info
from tokenreduce.ops.attention import AttentionSignals
from tokenreduce.ops.cluster import dpc_knn
from tokenreduce.state import TokenState

# 8 patches behind a CLS token.  Attentive (top 4 by class attention): positions 4, 2, 8, 6.
# Inattentive, in attention order: a=pos3 (0,0) .08, b=pos7 (10,0) .06, c=pos1 (0,1) .04, d=pos5 (10,2) .02.
# DPC-kNN with k=1 (distances / √2): log ρ = (-.5, -2, -.5, -2); ties rank a over c and b over d;
# δ = (√52, 10/√2, 1/√2, √2) -> ρ·δ ranks a, b first: clusters {a, c} and {b, d}.
X = torch.tensor(
    [[[-1.0, -1.0], [0, 1], [100, 2], [0, 0], [100, 1], [10, 2], [100, 4], [10, 0], [100, 3]]],
)
CLS_ROW = torch.tensor([0.03, 0.04, 0.15, 0.08, 0.2, 0.02, 0.10, 0.06, 0.12])
CLUSTER_A_C = [(0.08 * 0 + 0.04 * 0) / 0.12, (0.08 * 0 + 0.04 * 1) / 0.12]  # (0, 1/3)
CLUSTER_B_D = [(0.06 * 10 + 0.02 * 10) / 0.08, (0.06 * 0 + 0.02 * 2) / 0.08]  # (10, 0.5)


def _signals(keys=None):
    return AttentionSignals(cls_attn=CLS_ROW.expand(1, 2, 9), keys=keys)  # two identical heads


@pytest.fixture(scope="module")
def info():
    return model_info(make_vit())


def test_default_cluster_count():
    assert [default_num_clusters(m) for m in (1, 4, 5, 14, 15, 58)] == [1, 1, 2, 2, 3, 7]


def test_hand_worked_block(info):
    reducer = BAT.create(info, keep_rate=0.5, num_clusters=2, k=1)
    out = reducer.reduce(3, TokenState(X, None, torch.eye(9).unsqueeze(0), 1), _signals())
    expected = torch.cat([X[0, [0, 4, 2, 8, 6]], torch.tensor([CLUSTER_A_C, CLUSTER_B_D])])
    torch.testing.assert_close(out.x[0], expected)
    assert out.size[0].squeeze(-1).tolist() == [1, 1, 1, 1, 1, 2, 2]
    assert out.source[0, 5].nonzero().flatten().tolist() == [1, 3]
    assert out.source[0, 6].nonzero().flatten().tolist() == [5, 7]


def test_attentive_pairs_are_merged(info):
    # attentive sequence [CLS, pos4, pos2, pos8, pos6]: ToMe sets A = (CLS, pos2, pos6), B = (pos4, pos8).
    # pos6's key equals pos8's; pos2's key is orthogonal to both B keys -> pos6 merges into pos8.
    keys = torch.zeros(1, 9, 3)
    keys[0, 0] = torch.tensor([1.0, 0, 0])
    keys[0, 4] = torch.tensor([0, 1.0, 0])
    keys[0, 2] = torch.tensor([0, 0, 1.0])
    keys[0, 8] = keys[0, 6] = torch.tensor([1.0, 1.0, 0])
    keys[0, [1, 3, 5, 7]] = torch.randn(4, 3)
    reducer = BAT.create(info, keep_rate=0.5, num_clusters=2, k=1, num_attentive_merges=1)
    assert reducer.needs(3).keys
    out = reducer.reduce(3, TokenState(X, None, torch.eye(9).unsqueeze(0), 1), _signals(keys))
    merged = (X[0, 8] + X[0, 6]) / 2
    expected = torch.cat([X[0, [0, 2, 4]], merged[None], torch.tensor([CLUSTER_A_C, CLUSTER_B_D])])
    torch.testing.assert_close(out.x[0], expected)
    assert out.size[0].squeeze(-1).tolist() == [1, 1, 1, 2, 2, 2]
    assert out.num_tokens == reducer.tokens_after(9)


def test_dpc_knn_form_is_threaded_to_the_clustering(info, monkeypatch):
    seen = []

    def spy(x, num_clusters, k, include_self, distance_scale):
        seen.append((num_clusters, k, include_self, distance_scale))
        return dpc_knn(x, num_clusters, k, include_self, distance_scale)

    monkeypatch.setattr(bat_module, "dpc_knn", spy)
    state = TokenState(X, None, torch.eye(9).unsqueeze(0), 1)
    BAT.create(info, keep_rate=0.5, num_clusters=2, k=1).reduce(3, state, _signals())
    options = {"knn_include_self": True, "distance_scale": "none"}
    BAT.create(info, keep_rate=0.5, num_clusters=2, k=1, **options).reduce(3, state, _signals())
    # defaults: the shipped form (self excluded, distances ÷√C)
    assert seen == [(2, 1, False, "sqrt_dim"), (2, 1, True, "none")]
    assert BAT.create(info, **options).config()["distance_scale"] == "none"


def _forward(model, images):
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"num_attentive_merges": 3, "num_clusters": 4, "k": 3},
        {"knn_include_self": True, "distance_scale": "none"},  # TCFormer's density, raw distances
    ],
)
@pytest.mark.parametrize("family", ["plain", "distilled", "registers"])
def test_bookkeeping_on_models(family, params):
    if family == "distilled":
        model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64).eval()
    else:
        model = make_vit(reg_tokens=4 if family == "registers" else 0)
    p = model.num_prefix_tokens
    patches = model.patch_embed.num_patches
    tr.apply(model, "bat", trace_source=True, **params)
    images = torch.randn(3, 3, 64, 64)
    out = _forward(model, images)
    ctx = tr.last_forward(model)
    assert [tuple(r) for r in ctx.block_tokens] == tr.reducer(model).schedule(p + patches)
    assert torch.equal(ctx.source[:, :p], torch.eye(p + patches)[:p].expand(3, -1, -1))
    # merge-type method: every patch lives in exactly one token, sizes sum to the patch count
    assert torch.equal(ctx.size[:, p:].sum(1), torch.full((3, 1), float(patches)))
    assert torch.equal(ctx.source[:, p:, p:].sum(1), torch.ones(3, patches))
    torch.testing.assert_close(ctx.source.sum(-1, keepdim=True), ctx.size)
    for i in range(3):
        torch.testing.assert_close(_forward(model, images[i : i + 1])[0], out[i], rtol=1e-4, atol=1e-5)


def test_counts_and_gmacs():
    with torch.device("meta"):
        model = timm.create_model("deit_small_patch16_224")
    info = model_info(model)
    counts = [m for n, m in BAT.create(info).schedule(197) if n != m]
    # 196 patches: 138 attentive + 1 + round(5.8) = 7 clusters; 145: 102 + 5; 107: 75 + 4
    assert counts == [146, 108, 80]
    assert round(tr.gmacs(model, "bat"), 2) == 3.15
    # one cluster = EViT's fused-token counts and GMACs
    assert [m for n, m in BAT.create(info, num_clusters=1).schedule(197) if n != m] == [140, 100, 72]
    assert tr.gmacs(model, "bat", num_clusters=1) == pytest.approx(tr.gmacs(model, "evit"))
    merged = [m for n, m in BAT.create(info, num_attentive_merges=10).schedule(197) if n != m]
    # 1+138-10+7 = 136; 135 patches: 1+95-10+(1+round(4.0)) = 91; 90 patches: 1+63-10+(1+round(2.7)) = 58
    assert merged == [136, 91, 58]
    # the comparison with BAT's logged GMACs in the module docstring and docs/methods.md#bat
    rates = (0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
    assert [round(tr.gmacs(model, "bat", keep_rate=r), 3) for r in rates] == [3.151, 2.783, 2.461, 2.206, 1.973, 1.790]
    one = [round(tr.gmacs(model, "bat", keep_rate=r, num_clusters=1), 3) for r in rates]
    assert one == [3.029, 2.635, 2.309, 2.043, 1.817, 1.644]
    logged = (3.005, 2.583, 2.344, 2.083, 1.823, 1.645)
    assert max(abs(a - b) for a, b in zip(one, logged, strict=True)) == pytest.approx(0.052)
    tr.apply(model, "bat", budget=0.6)
    keep_rate = tr.reducer(model).params.keep_rate
    assert tr.gmacs(model, "bat", keep_rate=keep_rate) <= 0.6 * tr.gmacs(model)
    assert tr.gmacs(model, "bat", keep_rate=round(keep_rate + 0.001, 3)) > 0.6 * tr.gmacs(model)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"num_clusters": 0}, "num_clusters"),
        ({"num_clusters": 2.5}, "num_clusters"),
        ({"num_attentive_merges": -1}, "num_attentive_merges"),
        ({"k": 0}, "k must be"),
        ({"knn_include_self": 1}, "bat: knn_include_self must be True or False"),
        ({"knn_include_self": "yes"}, "bat: knn_include_self must be True or False"),
        ({"distance_scale": "sqrt"}, "bat: distance_scale must be one of sqrt_dim, none"),
        ({"distance_scale": None}, "bat: distance_scale must be one of"),
        ({"keep_rate": 1.5}, "keep_rate"),
        ({"layers": (3, 3)}, "repeat"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        tr.apply(make_vit(), "bat", **params)
