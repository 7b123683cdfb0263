"""Token Cropr: schedule, scorer selection, last-layer fusion, auxiliary heads in training only."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_vit

import tokenreduce as tr


def test_deit_schedule_with_llf():
    with torch.device("meta"):
        deit = timm.create_model("deit_small_patch16_224")
    tr.apply(deit, "cropr", untrained=True)
    counts = [n for n, _ in tr.reducer(deit).schedule(197)]
    assert counts == [197, 188, 180, 172, 164, 156, 148, 140, 132, 124, 116, 197]
    tr.apply(deit, "cropr", untrained=True, llf=False)
    counts = [n for n, _ in tr.reducer(deit).schedule(197)]
    assert counts == [197, 188, 180, 172, 164, 156, 148, 140, 132, 124, 116, 108]
    # docs/methods.md#token-cropr: DeiT-S with LLF is about 3.7 / 3.5 / 3.3 GMACs at p = 8 / 10 / 12
    assert [round(tr.gmacs(deit, "cropr", p=p), 1) for p in (8, 10, 12)] == [3.7, 3.5, 3.3]


def test_scorer_keeps_the_highest_query_dot_products_in_score_order():
    from tokenreduce.budget import CostModel
    from tokenreduce.methods.base import ModelInfo
    from tokenreduce.methods.cropr import Cropr, CroprParams
    from tokenreduce.state import TokenState

    cost = CostModel((1,) * 4, (1,) * 4, (1,) * 4, 1, 1)  # 7 patches: 3 modules may remove 2 each
    info = ModelInfo(depth=4, dim=2, num_heads=1, num_prefix=1, num_patches=7, cost=cost, num_classes=3)
    cropr = Cropr(info, CroprParams(p=2, first_extra=0, llf=False))
    with torch.no_grad():
        cropr.module[0].query.copy_(torch.tensor([[1.0, 2.0]]))
    # class token + 5 patches; scores q·x = [_, 1, 8, -2, 5, 0]: patches 2 and 4 then 1 survive
    x = torch.tensor([[[0.0, -9.0], [1.0, 0.0], [0.0, 4.0], [-2.0, 0.0], [1.0, 2.0], [0.0, 0.0]]])
    out = cropr.before_block(1, TokenState(x, num_prefix=1))
    assert out.x[0].tolist() == [[0.0, -9.0], [0.0, 4.0], [1.0, 2.0], [1.0, 0.0]]


def test_llf_restores_every_token_before_the_last_block():
    model = make_vit()
    tr.apply(model, "cropr", untrained=True, p=4, trace_source=True)
    with torch.no_grad():
        model(torch.randn(3, 3, 64, 64))
    ctx = tr.last_forward(model)
    assert [b.tokens_in for b in tr.stats(model).blocks][-1] == 65
    assert torch.equal(ctx.source.sum(dim=1), torch.ones(3, 65))  # every original token exactly once
    assert torch.equal(ctx.source[:, 0], torch.eye(65)[0].expand(3, 65))  # class token first


def test_auxiliary_heads_train_the_queries_only_in_training():
    model = make_vit().train()
    tr.apply(model, "cropr", untrained=True, p=4)
    reducer = tr.reducer(model)
    out = model(torch.randn(2, 3, 64, 64))
    assert len(reducer.aux_logits) == 10 and reducer.aux_logits[0].shape == (2, 10)
    aux = sum(torch.nn.functional.cross_entropy(a, torch.tensor([1, 2])) for a in reducer.aux_logits)
    aux.backward()
    assert reducer.module[0].query.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad is None  # detached: no gradient into the backbone
    assert out.shape == (2, 10)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert reducer.aux_logits == []


def test_batch_independence_and_bad_schedules():
    model = make_vit()
    tr.apply(model, "cropr", untrained=True, p=5)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="use p <= 6"):
        tr.apply(model, "cropr", untrained=True, p=7)
    with pytest.raises(ValueError, match="num_queries"):
        tr.apply(model, "cropr", untrained=True, num_queries=0)


def test_initialisation_follows_the_official_code():
    from tokenreduce.methods.cropr import CroprModule

    torch.manual_seed(0)
    dim = 384
    module = CroprModule(dim, num_queries=64, num_classes=1000)
    # Linear weights: truncated normal, std 0.02 (cut at ±2, so effectively untruncated); biases zero
    for layer in (module.mlp[0], module.mlp[2], module.head):
        assert abs(layer.weight.std().item() - 0.02) < 0.001
        assert abs(layer.weight.mean().item()) < 0.001
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    # queries: N(0, 1/C) cut at ±2 std (timm's trunc_normal_tf_): std 0.88/√C, nothing beyond 2/√C
    q = module.query.detach()
    assert q.abs().max() <= 2 * dim**-0.5
    assert abs(q.std().item() * dim**0.5 - 0.8796) < 0.03
    # the aggregator MLP's pre-LayerNorm uses the official eps 1e-6; the head's keeps PyTorch's 1e-5
    assert module.norm.eps == 1e-6 and module.head_norm.eps == 1e-5
    for norm in (module.norm, module.head_norm):
        assert torch.equal(norm.weight, torch.ones(dim)) and torch.equal(norm.bias, torch.zeros(dim))


def test_shipped_reference_checkpoint_still_loads():
    from tokenreduce.checkpoint import read_reducer
    from tokenreduce.models.reference import load_reference_model, preprocess, shipped_reducers

    path = shipped_reducers()["cropr"]
    model = load_reference_model()
    tr.apply(model, "cropr", checkpoint=path)
    reducer = tr.reducer(model)
    _, tensors = read_reducer(path)
    assert torch.equal(reducer.module[0].query.detach(), tensors["0.query"])
    x = preprocess(torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8))
    with torch.no_grad():
        assert model(x).shape == (4, 10)
        model.train()
        model(x)
    assert len(reducer.aux_logits) == len(reducer.after_blocks) and torch.isfinite(reducer.aux_logits[-1]).all()
