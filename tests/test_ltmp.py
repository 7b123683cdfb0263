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


def _info(depth=1, num_patches=4):
    cost = CostModel((4,) * depth, (1,) * depth, (8,) * depth, 1, 1)
    return ModelInfo(depth=depth, dim=1, num_heads=1, num_prefix=1, num_patches=num_patches, cost=cost)


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


MODELS = {
    "vit": lambda: make_vit(),
    "registers": lambda: make_vit(reg_tokens=3),
    "distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64).eval(),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_inference_equals_each_image_alone(name):
    model = MODELS[name]()
    tr.apply(model, "ltmp", merge_threshold=0.3, prune_threshold=0.012, trace_source=True)
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
    tr.apply(model, "ltmp", budget=0.6)
    reducer = model._tr_ctx.reducer
    assert reducer.config()["target"] == 0.6
    assert reducer.module.merge_threshold.tolist() == [pytest.approx(0.9)] * 12
    assert reducer.module.prune_threshold.tolist() == [0.0] * 12
    with pytest.raises(NotImplementedError, match="different number of tokens"):
        tr.gmacs(model, "ltmp")
    with pytest.raises(ValueError, match="merge_threshold"):
        tr.apply(model, "ltmp", merge_threshold=1.5)


def test_training_moves_the_gmacs_ratio_toward_the_target():
    model = make_vit().train()
    for p in model.parameters():
        p.requires_grad_(False)
    tr.apply(model, "ltmp", target=0.5)
    reducer = model._tr_ctx.reducer
    module = reducer.module
    groups = [{"params": [module.merge_threshold], "lr": 0.05}, {"params": [module.prune_threshold], "lr": 2e-3}]
    opt = torch.optim.SGD(groups)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    ratios = []
    for _ in range(6):
        logits = model(x)
        loss, ratio = ltmp_loss(logits, y, model._tr_ctx.records, reducer.info, 65, target=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        reducer.module.clamp_()
        ratios.append(float(ratio.detach()))
    assert ratios[0] > 0.9  # the paper's initialisation barely reduces
    assert ratios[-1] < ratios[0] - 0.05
    assert abs(ratios[-1] - 0.5) < abs(ratios[0] - 0.5)
    # training-form counts are differentiable live-token sums; the eval form removes for real
    model.eval()
    with torch.no_grad():
        model(x)
    assert tr.stats(model).ratio < 0.95


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = make_vit()
    tr.apply(model, "ltmp", merge_threshold=0.4, prune_threshold=0.01, tau=0.1)
    path = tmp_path / "ltmp.safetensors"
    save_reducer(model._tr_ctx.reducer, path)
    tr.remove(model)

    tr.apply(model, "ltmp", checkpoint=path)
    cfg = model._tr_ctx.reducer.config()
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
    tr.apply(model, "dynamicvit", keep_rate=0.8)
    path = tmp_path / "dyvit.safetensors"
    save_reducer(model._tr_ctx.reducer, path)
    tr.apply(model, "dynamicvit", checkpoint=path)
    assert model._tr_ctx.reducer.config()["keep_rate"] == 0.8
    tr.apply(model, "dynamicvit", checkpoint=path, budget=0.5)
    assert model._tr_ctx.reducer.config()["keep_rate"] < 0.8
    assert tr.gmacs(model, "dynamicvit", keep_rate=model._tr_ctx.reducer.config()["keep_rate"]) <= 0.5 * tr.gmacs(model)
