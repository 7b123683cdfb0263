"""PPT: importance score, per-image pool/prune policy, mixed batches, calibration, GMACs."""

from __future__ import annotations

import statistics

import pytest
import timm
import torch
from conftest import make_vit

import tokenreduce as tr
from tokenreduce.methods.ppt import PPT, importance_scores
from tokenreduce.models import model_info
from tokenreduce.ops.attention import AttentionSignals
from tokenreduce.state import TokenState

# --- the rule on tensors worked out by hand -----------------------------------------------------

# image 0: flat class attention over the 6 patches -> variance 0 -> pooled
# image 1: peaked class attention -> pruned, keeps tokens 2, 4, 5, 6 (scores .40, .25, .15, .05)
CLS_ATTN = torch.tensor(
    [
        [0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
        [0.1, 0.02, 0.40, 0.03, 0.25, 0.15, 0.05],
    ]
)
# image 0 keys: 2 ~ 1 and 4 ~ 3 are identical pairs (cos 1); 6 has best cos 0 -> ToMe merges 2->1, 4->3
KEYS0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 0.0]])
UNBIASED_VAR1 = statistics.variance([v / 0.9 for v in CLS_ATTN[1, 1:].tolist()])
BIASED_VAR1 = statistics.pvariance([v / 0.9 for v in CLS_ATTN[1, 1:].tolist()])


def _x(batch=2, n=7):
    i = torch.arange(n, dtype=torch.float32).view(1, n, 1)
    b = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1)
    return (i + 1) * torch.tensor([1.0, 2.0]) + 100 * b  # B×N×2, every token distinct


def _signals(batch_rows=(0, 1)):
    keys = torch.stack([KEYS0, torch.randn(7, 2, generator=torch.Generator().manual_seed(0))])
    rows = list(batch_rows)
    return AttentionSignals(
        head_keys=keys[rows].unsqueeze(1),  # B×H×N×d with H=1
        cls_attn=CLS_ATTN[rows].unsqueeze(1),  # B×H×N with H=1
        values=torch.ones(len(rows), 1, 7, 2),  # equal value norms: scores follow the attention
    )


@pytest.fixture(scope="module")
def info():
    return model_info(make_vit())


def _reducer(info, **params):
    return PPT.create(info, **{"r": 2, "threshold": 1e-3, **params})


def test_importance_score_by_hand():
    # heads sum: patch 1 -> 0.3+0.2 = 0.5, patch 2 -> 0.2+0.6 = 0.8
    # value norms over heads: patch 1 -> ‖(0, 2)‖ = 2, patch 2 -> ‖(0.6, 0.8)‖ = 1
    cls_attn = torch.tensor([[[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]])
    values = torch.tensor([[[[9.0], [0.0], [0.6]], [[9.0], [2.0], [0.8]]]])  # B×H×N×d, H=2, d=1
    scores = importance_scores(cls_attn, values, num_prefix=1)
    torch.testing.assert_close(scores, torch.tensor([[1.0 / 1.8, 0.8 / 1.8]]))


def test_mixed_batch_pools_one_image_and_prunes_the_other(info):
    x = _x()
    state = TokenState(x, None, torch.eye(7).expand(2, 7, 7), 1)
    out = _reducer(info).reduce(3, state, _signals())
    # image 0, pooled (ToMe order: CLS, unmerged A = [6], B = [1+2, 3+4, 5])
    expected0 = torch.stack([x[0, 0], x[0, 6], (x[0, 1] + x[0, 2]) / 2, (x[0, 3] + x[0, 4]) / 2, x[0, 5]])
    torch.testing.assert_close(out.x[0], expected0)
    assert out.size[0].squeeze(-1).tolist() == [1, 1, 2, 2, 1]
    # image 1, pruned (CLS, then the kept patches in descending score order, sizes 1)
    torch.testing.assert_close(out.x[1], x[1, [0, 2, 4, 5, 6]])
    assert out.size[1].squeeze(-1).tolist() == [1, 1, 1, 1, 1]
    # sources follow the same per-image choice
    assert out.source[0].nonzero().tolist() == [[0, 0], [1, 6], [2, 1], [2, 2], [3, 3], [3, 4], [4, 5]]
    assert out.source[1].nonzero().tolist() == [[0, 0], [1, 2], [2, 4], [3, 5], [4, 6]]
    # each image in the batch equals running it alone
    for b in range(2):
        alone_state = TokenState(x[b : b + 1], None, torch.eye(7).unsqueeze(0), 1)
        alone = _reducer(info).reduce(3, alone_state, _signals([b]))
        torch.testing.assert_close(alone.x[0], out.x[b])
        torch.testing.assert_close(alone.sizes()[0], out.size[b])
        assert torch.equal(alone.source[0], out.source[b])


def test_variance_is_unbiased_and_the_comparison_strict(info):
    state = TokenState(_x(), None, None, 1)
    between = (BIASED_VAR1 + UNBIASED_VAR1) / 2
    out = _reducer(info, threshold=between).reduce(3, state, _signals())
    assert out.size[1].max() == 1  # still pruned: the unbiased variance is above the threshold
    out = _reducer(info, threshold=UNBIASED_VAR1 * 1.001).reduce(3, state, _signals())
    assert out.size[1].max() == 2  # pooled now
    out = _reducer(info, threshold=0.0).reduce(3, state, _signals())
    assert out.size.max() == 1  # variance 0 is not < 0: nothing pooled


def test_per_layer_thresholds_follow_the_given_layer_order(info):
    reducer = PPT.create(info, layers=(6, 3), threshold=(1.0, 0.0))
    assert reducer.layers == (3, 6)
    assert reducer.thresholds == {6: 1.0, 3: 0.0}
    state = TokenState(_x(), None, None, 1)
    assert _reducer(info, layers=(6, 3), threshold=(1.0, 0.0)).reduce(3, state, _signals()).size.max() == 1
    assert _reducer(info, layers=(6, 3), threshold=(1.0, 0.0)).reduce(6, state, _signals()).size.max() == 2


def test_r_is_capped_at_half_the_patches(info):
    state = TokenState(_x(), None, None, 1)
    out = _reducer(info, r=50).reduce(3, state, _signals())
    assert out.num_tokens == 1 + 6 - 3
    assert _reducer(info, r=0).reduce(3, state, _signals()) is state


# --- on models ---------------------------------------------------------------------------------


def _forward(model, images):
    with torch.no_grad():
        return model(images)


def test_mixed_batch_on_a_model_equals_each_image_alone():
    model = make_vit()
    torch.manual_seed(3)
    images = torch.randn(6, 3, 64, 64)
    thresholds = tr.calibrate(model, "ppt", images, pool_fraction=0.5, r=8, trace_source=True)
    reducer = tr.reducer(model)
    reducer.start_recording()
    out = _forward(model, images)
    variances = reducer.stop_recording()
    for block, tau in zip(reducer.layers, thresholds, strict=True):
        assert int((variances[block] < tau).sum()) == 3  # half pooled, half pruned at every block
    ctx = tr.last_forward(model)
    torch.testing.assert_close(ctx.source.sum(-1, keepdim=True), ctx.size)
    assert ctx.source[:, 1:, 1:].sum(1).max() <= 1
    for i in range(6):
        torch.testing.assert_close(_forward(model, images[i : i + 1])[0], out[i], rtol=1e-4, atol=1e-5)


def test_always_pooling_is_tome_at_the_reduction_layers():
    images = torch.randn(2, 3, 64, 64)
    model = make_vit()
    tr.apply(model, "ppt", threshold=float("inf"), r=10, trace_source=True)
    out = _forward(model, images)
    size = tr.last_forward(model).size
    assert torch.equal(size[:, 1:].sum(1), torch.full((2, 1), 64.0))  # merge only: every patch kept
    tr.apply(model, "tome", r=[0, 0, 0, 10, 0, 0, 10, 0, 0, 10])
    torch.testing.assert_close(_forward(model, images), out)


def test_always_pruning_keeps_unit_sizes():
    model = make_vit()
    tr.apply(model, "ppt", threshold=0.0, r=10, trace_source=True)
    _forward(model, torch.randn(2, 3, 64, 64))
    ctx = tr.last_forward(model)
    assert torch.equal(ctx.size, torch.ones_like(ctx.size))
    assert ctx.size.shape[1] == 65 - 30


@pytest.mark.parametrize("threshold", [0.0, float("inf"), "calibrated"])
@pytest.mark.parametrize("family", ["distilled", "registers"])
def test_prefix_tokens_are_protected(family, threshold):
    if family == "distilled":
        model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64).eval()
    else:
        model = make_vit(reg_tokens=4)
    p = model.num_prefix_tokens
    images = torch.randn(4, 3, 64, 64)
    if threshold == "calibrated":
        tr.calibrate(model, "ppt", images, trace_source=True)
    else:
        tr.apply(model, "ppt", threshold=threshold, trace_source=True)
    _forward(model, images)
    ctx = tr.last_forward(model)
    eye = torch.eye(16 + p if family == "distilled" else 64 + p)[:p]
    assert torch.equal(ctx.source[:, :p], eye.expand(4, -1, -1))
    torch.testing.assert_close(ctx.source.sum(-1, keepdim=True), ctx.size)


# --- schedule, GMACs, budget, errors -------------------------------------------------------------


@pytest.fixture(scope="module")
def deits():
    with torch.device("meta"):
        return {n: timm.create_model(f"deit_{n}_patch16_224") for n in ("tiny", "small", "base")}


def test_gmacs_match_the_spec_table(deits):
    assert round(tr.gmacs(deits["small"], "ppt"), 2) == 2.94
    assert round(tr.gmacs(deits["tiny"], "ppt"), 2) == 0.80
    assert round(tr.gmacs(deits["base"], "ppt"), 2) == 11.26
    schedule = PPT.create(model_info(deits["small"])).schedule(197)
    assert [m for n, m in schedule if n != m] == [147, 97, 49]  # r capped at 48 in the last stage


def test_stats_after_a_forward():
    model = make_vit()
    tr.apply(model, "ppt", r=8)
    _forward(model, torch.randn(2, 3, 64, 64))
    stats = tr.stats(model)
    assert [b.tokens_out for b in stats.blocks if b.tokens_out != b.tokens_in] == [57, 49, 41]
    assert stats.gmacs == pytest.approx(tr.gmacs(model, "ppt", r=8))


def test_budget_resolves_r(deits):
    model = deits["small"]
    tr.apply(model, "ppt", budget=0.7)
    r = tr.reducer(model).params.r
    unreduced = tr.gmacs(model)
    assert tr.gmacs(model, "ppt", r=r) <= 0.7 * unreduced
    assert tr.gmacs(model, "ppt", r=r - 1) > 0.7 * unreduced
    tr.remove(model)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"r": -1}, "r must be"),
        ({"r": 2.5}, "r must be"),
        ({"threshold": -1e-5}, "threshold"),
        ({"threshold": (1e-5, 2e-5)}, "one per layer"),
        ({"threshold": "high"}, "threshold"),
        ({"layers": (3, 12)}, "out of range"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        tr.apply(make_vit(), "ppt", **params)


# --- calibration -------------------------------------------------------------------------------


def test_calibrate_single_threshold_is_the_first_layer_quantile():
    model = make_vit()
    images = torch.randn(5, 3, 64, 64)
    tau = tr.calibrate(model, "ppt", images, pool_fraction=0.4, per_layer=False, batch_size=2)
    assert isinstance(tau, float)
    assert tr.reducer(model).config()["threshold"] == tau
    reducer = tr.reducer(model)
    reducer.start_recording()
    _forward(model, images)
    first = reducer.stop_recording()[3]
    assert tau == pytest.approx(float(torch.quantile(first.double(), 0.4)))
    assert int((first < tau).sum()) == 2


def test_calibrate_reuses_the_applied_parameters_and_accepts_a_loader():
    model = make_vit()
    tr.apply(model, "ppt", r=5, layers=(2, 5))
    images = torch.randn(4, 3, 64, 64)
    loader = [(images[:2], torch.zeros(2)), (images[2:], torch.zeros(2))]
    taus = tr.calibrate(model, "ppt", loader, pool_fraction=0.25)
    config = tr.reducer(model).config()
    assert config["r"] == 5 and config["layers"] == [2, 5]
    assert list(config["threshold"]) == list(taus) and len(taus) == 2
    assert tr.calibrate(model, "ppt", images, pool_fraction=0.0) == (0.0, 0.0)
    assert tr.calibrate(model, "ppt", images, pool_fraction=1.0) == (float("inf"), float("inf"))


def test_calibrate_errors():
    model = make_vit()
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="only 'ppt'"):
        tr.calibrate(model, "tome", images)
    with pytest.raises(ValueError, match="pool_fraction"):
        tr.calibrate(model, "ppt", images, pool_fraction=1.5)
    with pytest.raises(ValueError, match="threshold"):
        tr.calibrate(model, "ppt", images, threshold=1e-4)
    with pytest.raises(TypeError, match="re-iterable"):
        tr.calibrate(model, "ppt", (b for b in [images]))
    with pytest.raises(ValueError, match="no images"):
        tr.calibrate(model, "ppt", [], per_layer=False)


@pytest.mark.parametrize("threshold", [float("inf"), 0.0])  # every image pools / every image prunes
def test_a_single_branch_batch_computes_one_branch_with_the_same_result(threshold, monkeypatch):
    import tokenreduce.methods.ppt as ppt_module
    from tokenreduce.ops import merge as merge_module

    model = tr.apply(make_vit(), "ppt", r=8, threshold=threshold, trace_source=True)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    merges = []
    real_merge = merge_module.bipartite_merge
    monkeypatch.setattr(ppt_module, "bipartite_merge", lambda *a: merges.append(1) or real_merge(*a))
    one_branch = _forward(model, images)
    one_record = tr.last_forward(model)
    assert len(merges) == (3 if threshold else 0)  # the merge runs only where every image pools
    merges.clear()
    monkeypatch.setattr(ppt_module, "tracing", lambda: True)  # as in a traced graph: both branches, selected
    both = _forward(model, images)
    assert len(merges) == 3
    torch.testing.assert_close(one_branch, both, rtol=1e-5, atol=1e-6)
    assert torch.equal(one_record.source, tr.last_forward(model).source)
    assert torch.equal(one_record.size, tr.last_forward(model).size)
