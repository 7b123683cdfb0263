"""LTMP: the threshold rules by hand, batched == per-image inference, training moves GMACs, checkpoints."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_vit

import tokenreduce as tr
from tokenreduce.budget import CostModel
from tokenreduce.checkpoint import save_reducer
from tokenreduce.methods.base import ModelInfo
from tokenreduce.methods.ltmp import LTMP, LTMPParams, ltmp_loss
from tokenreduce.ops.attention import AttentionSignals
from tokenreduce.ops.prune import threshold_mask
from tokenreduce.state import TokenState


def _info(depth=1, num_patches=4, num_prefix=1):
    cost = CostModel((4,) * depth, (1,) * depth, (8,) * depth, 1, 1)
    return ModelInfo(depth=depth, dim=1, num_heads=1, num_prefix=num_prefix, num_patches=num_patches, cost=cost)


def test_threshold_mask_is_hard_forward_and_sigmoid_backward():
    theta = torch.tensor(0.5, requires_grad=True)
    score = torch.tensor([0.2, 0.6])
    out = threshold_mask(score, theta, tau=0.1)
    assert out.tolist() == [0.0, 1.0]
    out.sum().backward()
    sig = torch.sigmoid((score - 0.5) / 0.1)
    assert theta.grad == pytest.approx(float((-(sig * (1 - sig)) / 0.1).sum()))


def test_hard_rule_merges_above_threshold_prunes_below_and_protects_merge_destinations():
    # Class token + 4 patches at positions 1..4; A = {0, 2, 4}, B = {1, 3}.
    # Keys: token 2 points where token 3 points (cos 1), token 4 is orthogonal-ish to both B tokens.
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0], [1.0, -1.0]]])
    x = torch.tensor([[[10.0], [1.0], [2.0], [4.0], [8.0]]])
    # Attention received by each key (mean over heads and query rows).
    received = torch.tensor([[0.4, 0.3, 0.2, 0.02, 0.08]])
    ltmp = LTMP(_info(), LTMPParams(merge_threshold=0.95, prune_threshold=0.1))
    ltmp.training = False
    out = ltmp.reduce(0, TokenState(x, num_prefix=1), AttentionSignals(keys=keys, received=received))
    # token 2 (cos 1 > 0.95) merges into token 3; token 3's own importance 0.02 < 0.1 but a destination takes
    # the maximum of its group (0.2), so it stays; token 4 (0.08 < 0.1) is pruned; token 1 (0.3) stays.
    # Output order: [class] ++ surviving A ++ surviving B = [0, 1, 3'].
    assert out.x.flatten().tolist() == [10.0, 1.0, 3.0]
    assert out.size.flatten().tolist() == [1.0, 1.0, 2.0]
    assert out.mask is None


def test_received_attention_is_the_mean_over_heads_and_live_queries():
    from tokenreduce.ops.attention import received_attention

    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    rows = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # image 1: the last two tokens are padding
    bias = torch.log(rows).view(2, 1, 1, 5)
    probs = ((q @ k.transpose(-1, -2)) * 0.5 + bias).softmax(-1)  # B×H×N×N
    expected = torch.stack([probs[0].mean(dim=(0, 1)), probs[1, :, :3].mean(dim=(0, 1))])
    torch.testing.assert_close(received_attention(q, k, 0.5, bias, rows), expected)  # head by head
    torch.testing.assert_close(received_attention(q, k, 0.5, bias, rows, probs), expected)  # from probabilities
    assert float(expected[1, 3:].abs().max()) == 0.0  # padding receives nothing



def test_one_pass_attention_gives_the_fused_output_and_the_received_attention():
    from tokenreduce.ops.attention import attention_and_received, received_attention

    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    rows = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 0, 1, 0]])
    bias = torch.log(rows).view(2, 1, 1, 5) + 0.1 * torch.arange(5.0).view(1, 1, 1, 5)
    out, received = attention_and_received(q, k, v, 0.5, bias, rows)
    expected_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.5)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received, received_attention(q, k, 0.5, bias, rows))


TAU = 0.5


def _dsig(score: float, theta: float) -> float:
    """d/dθ of ``−sigmoid((score − θ)/τ)``, i.e. σ'((score − θ)/τ)/τ: the gradient magnitude of one decision."""
    s = torch.sigmoid(torch.tensor((score - theta) / TAU))
    return float(s * (1 - s) / TAU)


def _two_block_case(grad_inputs: bool = False):
    """Class token + 4 patches through two training-form blocks of hand-built signals.

    Block 0 (A = tokens 0, 2, 4; B = 1, 3): token 2 merges into token 3 (cos 0.996 > 0.9), token 4
    (importance 0.05 < 0.1) is pruned, token 3 keeps its group's maximum importance 0.2, token 1 (0.3) stays.
    Out: [0, 2, 4, 1, 3] with mask [1, 0, 0, 1, 1].  Block 1 (positions 0, 2, 4 = tokens 0, 4, 3 are A;
    1, 3 = tokens 2, 1 are B): nothing merges (cos 0), token 1 (0.05) is pruned, token 3 (0.3) stays.
    Out: [0, 4, 3, 2, 1] with mask [1, 0, 1, 0, 0].
    """
    ltmp = LTMP(_info(depth=2), LTMPParams(merge_threshold=0.9, prune_threshold=0.1, tau=TAU))
    ltmp.training = True
    x = torch.arange(10.0).view(1, 5, 2).requires_grad_(grad_inputs)
    keys0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.2], [1.0, -1.0]]], requires_grad=grad_inputs)
    received0 = torch.tensor([[0.4, 0.3, 0.2, 0.02, 0.05]], requires_grad=grad_inputs)
    out0 = ltmp.reduce(0, TokenState(x, num_prefix=1), AttentionSignals(keys=keys0, received=received0))
    keys1 = torch.tensor([[[1.0, 0.0], [0.3, 0.7], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0]]])
    received1 = torch.tensor([[0.5, 0.0, 0.0, 0.05, 0.3]])
    out1 = ltmp.reduce(1, out0, AttentionSignals(keys=keys1, received=received1))
    return ltmp, (x, keys0, received0), out0, out1


def test_training_gradients_follow_the_official_rule_by_hand():
    ltmp, _, out0, out1 = _two_block_case()
    assert out0.mask.flatten().tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert out1.mask.flatten().tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    th = ltmp.module
    cos23 = 2.2 / (2**0.5 * 2.44**0.5)
    # Block 0: only the merged token 2 carries the merge gradient (mask 1 − merge); the other live tokens
    # carry their prune decision only (token 3 with its group's maximum 0.2); the class token nothing.
    g_m, g_p = torch.autograd.grad(out0.mask.sum(), [th.merge_threshold, th.prune_threshold], retain_graph=True)
    assert g_m.tolist() == pytest.approx([_dsig(cos23, 0.9), 0.0], rel=1e-5)
    assert g_p.tolist() == pytest.approx([-(_dsig(0.05, 0.1) + _dsig(0.3, 0.1) + _dsig(0.2, 0.1)), 0.0], rel=1e-5)
    # Block 1: tokens alive after block 0 are re-decided (their block-0 gradients end); the dead tokens 2 and 4
    # keep the masks they died with, and so the gradients of their block-0 decisions; nothing merges in block 1.
    g_m, g_p = torch.autograd.grad(out1.mask.sum(), [th.merge_threshold, th.prune_threshold])
    assert g_m.tolist() == pytest.approx([_dsig(cos23, 0.9), 0.0], rel=1e-5)
    assert g_p.tolist() == pytest.approx([-_dsig(0.05, 0.1), -(_dsig(0.3, 0.1) + _dsig(0.05, 0.1))], rel=1e-5)


def test_training_merge_weights_are_detached_and_scores_carry_gradients():
    ltmp, (x, keys0, received0), out0, _ = _two_block_case(grad_inputs=True)
    th = ltmp.module
    # the merged values and sizes depend on the merge decision only through its (detached) hard value
    g = torch.autograd.grad((out0.x * torch.randn_like(out0.x)).sum() + out0.size.sum(),
                            [th.merge_threshold, th.prune_threshold], allow_unused=True, retain_graph=True)
    assert g == (None, None)
    # scores are not detached: the mask reaches the importances (token 2 through token 3's group maximum,
    # token 3's own value is not the maximum, the class token's keep is constant) and the keys
    g_recv, g_keys = torch.autograd.grad(out0.mask.sum(), [received0, keys0])
    expected = [0.0, _dsig(0.3, 0.1), _dsig(0.2, 0.1), 0.0, _dsig(0.05, 0.1)]
    assert g_recv.flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-12)
    # keys: only token 2's merge decision 1 − merge(cos(k2, k3)) counts: −σ'/τ · ∂cos/∂k
    k = keys0.detach().clone().requires_grad_(True)
    cos = torch.nn.functional.cosine_similarity(k[0, 2], k[0, 3], dim=0)
    (d_cos,) = torch.autograd.grad(cos, k)
    torch.testing.assert_close(g_keys, -_dsig(float(cos.detach()), 0.9) * d_cos)


def test_training_prefix_tokens_are_kept_exactly_with_zero_gradient():
    # two prefix tokens (positions 0 and 1: an A and a B position), importance below the threshold
    ltmp = LTMP(_info(num_prefix=2, num_patches=3), LTMPParams(merge_threshold=0.9, prune_threshold=0.1, tau=TAU))
    ltmp.training = True
    received = torch.tensor([[0.0, 0.05, 0.3, 0.3, 0.3]], requires_grad=True)
    keys = torch.randn(1, 5, 2, requires_grad=True)
    out = ltmp.reduce(0, TokenState(torch.randn(1, 5, 2), num_prefix=2), AttentionSignals(keys=keys, received=received))
    prefix_keep = out.mask[:, :2].sum()
    assert float(prefix_keep.detach()) == 2.0
    grads = torch.autograd.grad(prefix_keep, [ltmp.module.prune_threshold, ltmp.module.merge_threshold, received, keys],
                                allow_unused=True)
    for g in grads:
        assert g is None or (torch.isfinite(g).all() and float(g.abs().max()) == 0.0)


def test_nothing_to_merge_when_only_the_class_token_is_left():
    ltmp = LTMP(_info(), LTMPParams(merge_threshold=0.5, prune_threshold=0.5))
    state = TokenState(torch.randn(2, 1, 3), num_prefix=1)
    signals = AttentionSignals(keys=torch.randn(2, 1, 3), received=torch.ones(2, 1))
    ltmp.training = False
    out = ltmp.reduce(0, state, signals)
    assert out.x.shape == (2, 1, 3) and torch.equal(out.x, state.x) and out.mask is None
    ltmp.training = True
    out = ltmp.reduce(0, state, signals)
    assert torch.equal(out.x, state.x) and out.mask.flatten().tolist() == [1.0, 1.0]
    out.mask.sum().backward()  # nothing to differentiate but no error either
    # a whole model at batch size 1 where every patch goes in the first block
    model = make_vit()
    tr.apply(model, "ltmp", untrained=True, merge_threshold=1.0, prune_threshold=0.5)
    torch.manual_seed(3)
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(logits).all()
    assert [b.tokens_out for b in tr.stats(model).blocks] == [1.0] * 12


def test_ltmp_loss_uses_label_smoothing():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
    records = [(torch.tensor([5.0, 3.0, 5.0, 4.0]), torch.tensor([3.0, 3.0, 2.0, 1.0]))]
    info, target = _info(), 0.5
    ratio = info.cost.block_macs(0, 4.25, 4.25**2, 2.25) / info.cost.block_macs(0, 5, 25, 5)
    reg = 10.0 * (ratio - target) ** 2
    loss, got_ratio = ltmp_loss(logits, labels, records, info, 5, target)  # default smoothing 0.1
    assert float(got_ratio) == pytest.approx(float(ratio))
    smoothed = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert float(loss) == pytest.approx(float(smoothed + reg), rel=1e-6)
    assert float(smoothed) != pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))
    plain, _ = ltmp_loss(logits, labels, records, info, 5, target, label_smoothing=0.0)
    assert float(plain) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels) + reg), rel=1e-6)


MODELS = {
    "vit": lambda: make_vit(),
    "registers": lambda: make_vit(reg_tokens=3),
    "distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64).eval(),
}


@pytest.mark.parametrize("name,prune,trace", [(name, 0.012, True) for name in sorted(MODELS)]
                         + [("vit", 0.012, False), ("vit", 0.0, False)])
def test_batched_inference_equals_each_image_alone(name, prune, trace):
    """With source tracing the stream stays padded; without, it is packed, and with a prune threshold of 0 the
    attention needs no received attention (length buckets for the output and keys only)."""
    model = MODELS[name]()
    tr.apply(model, "ltmp", untrained=True, merge_threshold=0.3, prune_threshold=prune, trace_source=trace)
    torch.manual_seed(0)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        together = model(x)
        counts = tr.stats(model).blocks
        alone, finals = [], []
        for i in range(5):
            alone.append(model(x[i : i + 1]))
            finals.append(tr.stats(model).blocks[-1].tokens_out)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert counts[-1].tokens_out == pytest.approx(sum(finals) / 5)
    assert len(set(finals)) > 1, "the images should keep different numbers of tokens"
    assert counts[-1].tokens_out < 0.8 * counts[0].tokens_in


def test_initial_thresholds_are_the_papers_and_budget_sets_the_target():
    model = make_vit()
    tr.apply(model, "ltmp", untrained=True, budget=0.6)
    reducer = tr.reducer(model)
    assert reducer.config()["target"] == 0.6
    assert reducer.module.merge_threshold.tolist() == [pytest.approx(0.9)] * 12
    assert reducer.module.prune_threshold.tolist() == [0.0] * 12
    with pytest.raises(NotImplementedError, match="different number of tokens"):
        tr.gmacs(model, "ltmp")
    with pytest.raises(ValueError, match="merge_threshold"):
        tr.apply(model, "ltmp", untrained=True, merge_threshold=1.5)


def test_training_moves_the_gmacs_ratio_toward_the_target():
    model = make_vit().train()
    for p in model.parameters():
        p.requires_grad_(False)
    # θ_merge only gets a gradient from tokens that do merge (official rule); no key similarity of this
    # random-weight model reaches the paper's 0.9 (a pretrained model's do), so start where some merge.
    tr.apply(model, "ltmp", untrained=True, target=0.5, merge_threshold=0.8)
    reducer = tr.reducer(model)
    module = reducer.module
    groups = [{"params": [module.merge_threshold], "lr": 0.5}, {"params": [module.prune_threshold], "lr": 2e-3}]
    opt = torch.optim.SGD(groups)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    ratios = []
    for _ in range(6):
        logits = model(x)
        loss, ratio = ltmp_loss(logits, y, tr.last_forward(model).block_tokens, reducer.info, 65, target=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        reducer.module.clamp_()
        ratios.append(float(ratio.detach()))
    assert ratios[0] > 0.9  # barely reduces at first
    assert ratios[-1] < ratios[0] - 0.05
    assert abs(ratios[-1] - 0.5) < abs(ratios[0] - 0.5)
    # training-form counts are differentiable live-token sums; the eval form removes for real
    model.eval()
    with torch.no_grad():
        model(x)
    assert tr.stats(model).ratio < 0.95


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = make_vit()
    tr.apply(model, "ltmp", untrained=True, merge_threshold=0.4, prune_threshold=0.01, tau=0.1)
    path = tmp_path / "ltmp.safetensors"
    save_reducer(tr.reducer(model), path)
    tr.remove(model)

    tr.apply(model, "ltmp", checkpoint=path)
    cfg = tr.reducer(model).config()
    assert cfg["tau"] == 0.1 and cfg["merge_threshold"] == [0.4] * 12

    other = make_vit(depth=6)
    with pytest.raises(ValueError, match="another model"):
        tr.apply(other, "ltmp", checkpoint=path)
    with pytest.raises(ValueError, match="'ltmp' checkpoint, not 'tome'"):
        tr.apply(model, "tome", checkpoint=path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        tr.apply(model, "ltmp", checkpoint=broken)
    with pytest.raises(FileNotFoundError):
        tr.apply(model, "ltmp", checkpoint=tmp_path / "missing.safetensors")


def test_budget_overrides_the_knob_saved_in_a_checkpoint(tmp_path):
    model = make_vit()
    tr.apply(model, "dynamicvit", untrained=True, keep_rate=0.8)
    path = tmp_path / "dyvit.safetensors"
    save_reducer(tr.reducer(model), path)
    tr.apply(model, "dynamicvit", checkpoint=path)
    assert tr.reducer(model).config()["keep_rate"] == 0.8
    tr.apply(model, "dynamicvit", checkpoint=path, budget=0.5)
    assert tr.reducer(model).config()["keep_rate"] < 0.8
    assert tr.gmacs(model, "dynamicvit", keep_rate=tr.reducer(model).config()["keep_rate"]) <= 0.5 * tr.gmacs(model)


def test_the_packed_stream_gives_the_padded_streams_logits_and_hooks_see_the_padded_stream(monkeypatch):
    """At inference LTMP keeps the stream packed between blocks (only the live rows); a forward hook on a block
    sees the blocks' outputs, so with one the stream stays padded (B×N×C).  Both give the same logits."""
    import tokenreduce.methods.ltmp as ltmp_module

    real = ltmp_module.fused_ltmp_merge_prune
    packed_calls = []
    monkeypatch.setattr(ltmp_module, "fused_ltmp_merge_prune",
                        lambda *a, **k: packed_calls.append(k["counts"] is not None) or real(*a, **k))
    model = MODELS["vit"]()
    tr.apply(model, "ltmp", untrained=True, merge_threshold=0.3, prune_threshold=0.012)
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = model(x)
        assert any(packed_calls), "the reductions after the first should take the packed stream"
        packed_counts = tr.last_forward(model).block_tokens
        shapes = []
        handle = model.blocks[4].register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
        packed_calls.clear()
        padded = model(x)
        handle.remove()
    assert not any(packed_calls)
    assert len(shapes) == 1 and len(shapes[0]) == 3 and shapes[0][0] == 5
    assert torch.equal(packed, padded)
    for (a_in, a_out), (b_in, b_out) in zip(packed_counts, tr.last_forward(model).block_tokens, strict=True):
        assert torch.equal(torch.as_tensor(a_in), torch.as_tensor(b_in))
        assert torch.equal(torch.as_tensor(a_out), torch.as_tensor(b_out))
