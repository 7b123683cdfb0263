"""Hugging Face transformers models: ViT, DeiT, DINOv2, CLIP and SigLIP vision towers.

The proof that the adapter interface is real: the same random weights in a timm model and in its
transformers counterpart (``hf_convert``) give the same outputs unreduced and under every method.
Then what holds for timm holds here: ``remove`` is bit-exact, ``state_dict()`` is unchanged, SDPA is
kept, prefix tokens survive, budgets resolve the same, analytic GMACs equal torch's FLOP counter,
torch.compile traces one graph, learned parameters train and load (and a timm checkpoint is refused).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch._dynamo  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402,F401  (the [hf] extra is part of [dev]: a missing install fails, not skips)
from hf_convert import NUM_CLASSES, PAIRS, dinov2_pair, hf_output, small_config_model  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import tokenreduce as tr  # noqa: E402
from tokenreduce.models import adapter_for  # noqa: E402
from tokenreduce.models.hf import MissingExtraError  # noqa: E402

CLASSES = [
    "ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher", "Dinov2Model", "Dinov2ForImageClassification", "CLIPVisionModel",
    "CLIPVisionModelWithProjection", "CLIPForImageClassification", "SiglipVisionModel",
    "SiglipForImageClassification",
]
PREFIX = {"ViT": 1, "DeiT": 2, "Dinov2": 1, "CLIP": 1, "Siglip": 0}

# Every method, on the 12-block pairs (paper defaults fit them); cropr's p fits 64 patch tokens.
METHODS = [(m, {"p": 4} if m == "cropr" else {}) for m in tr.methods()]


def _images(b: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))


def _prefix(name: str) -> int:
    return next(v for k, v in PREFIX.items() if name.startswith(k))


def _main_output(out) -> torch.Tensor:
    for key in ("logits", "image_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out.last_hidden_state


def _apply_both(timm_model, hf_model, method: str, params: dict, aux_heads: bool = True, **kwargs) -> None:
    """``method`` on both models, a learned one with the same parameters on both sides (without Cropr's
    training-only auxiliary heads when ``aux_heads`` is false)."""
    for model in (timm_model, hf_model):
        torch.manual_seed(0)
        tr.apply(model, method, untrained=True, **params, **kwargs)
    module = tr.reducer(timm_model).module
    if module is not None:
        state = module.state_dict()
        if not aux_heads:
            state = {k: v for k, v in state.items() if ".head." not in k}
        tr.reducer(hf_model).module.load_state_dict(state, strict=aux_heads)


# -- cross-framework parity ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(PAIRS))
def pair(request):
    timm_model, hf_model = PAIRS[request.param]()
    return request.param, timm_model, hf_model


def test_unreduced_models_match_across_frameworks(pair):
    family, timm_model, hf_model = pair
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(hf_output(family, hf_model(x)), timm_model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,params", METHODS)
def test_every_method_gives_the_same_outputs_in_timm_and_transformers(pair, method, params):
    family, timm_model, hf_model = pair
    x = _images(4)
    # timm's CLIP head is CLIP's projection (no classes): Cropr's training-only aux heads differ
    _apply_both(timm_model, hf_model, method, params, aux_heads=family != "clip")
    try:
        with torch.no_grad():
            expected, got = timm_model(x), hf_output(family, hf_model(x))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        a, b = tr.last_forward(timm_model), tr.last_forward(hf_model)
        assert [tuple(map(_as_int, r)) for r in a.block_tokens] == [tuple(map(_as_int, r)) for r in b.block_tokens]
        assert tr.stats(hf_model).gmacs == pytest.approx(tr.stats(timm_model).gmacs)
        assert tr.reducer(hf_model).config() == tr.reducer(timm_model).config()
        assert tr.reducer(hf_model).info.family == f"hf-{family}"
    finally:
        tr.remove(timm_model)
        tr.remove(hf_model)


def test_ltmp_padded_batches_run_the_ragged_attention_in_both_frameworks(monkeypatch):
    import tokenreduce.models.hf as hf_adapter
    import tokenreduce.ops.attention as attention_ops

    timm_model, hf_model = PAIRS["vit"]()
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    x[1] = x[1].mean()  # a flat image merges more than the others: a padded batch
    _apply_both(timm_model, hf_model, "ltmp", {"merge_threshold": 0.3, "prune_threshold": 0.012})
    monkeypatch.setattr(attention_ops, "received_floor_applies", lambda *a: False)  # not the fused kernel's bound
    calls = []
    for module in (attention_ops, hf_adapter):
        real = module.attend_ragged
        monkeypatch.setattr(module, "attend_ragged", lambda *a, real=real, m=module: calls.append(m) or real(*a))
    with torch.no_grad():
        timm_out, hf_out = timm_model(x), hf_output("vit", hf_model(x))
        assert attention_ops in calls and hf_adapter in calls
        monkeypatch.setattr(hf_adapter, "ragged_applies", lambda *a: False)
        padded = hf_output("vit", hf_model(x))
    torch.testing.assert_close(hf_out, timm_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hf_out, padded, atol=1e-5, rtol=1e-5)
    assert len({b.tokens_out for b in tr.stats(hf_model).blocks}) > 1


def _as_int(n):
    return tuple(n.tolist()) if isinstance(n, torch.Tensor) else n


@pytest.mark.parametrize("method,params", [("tome", {"budget": 0.6}), ("evit", {"budget": 0.6}),
                                           ("ppt", {"budget": 0.6})])
def test_budgets_resolve_the_same_in_both_frameworks(pair, method, params):
    family, timm_model, hf_model = pair
    assert tr.gmacs(hf_model) == pytest.approx(tr.gmacs(timm_model))
    try:
        tr.apply(timm_model, method, **params)
        tr.apply(hf_model, method, **params)
        assert tr.reducer(hf_model).config() == tr.reducer(timm_model).config()
        with torch.no_grad():
            hf_model(_images())
        assert tr.stats(hf_model).gmacs <= 0.6 * tr.gmacs(hf_model) * (1 + 1e-9)
    finally:
        tr.remove(timm_model)
        tr.remove(hf_model)


def test_dinov2_classifier_weights_the_patch_mean_by_size_and_mask():
    timm_model, hf_model = dinov2_pair(classifier=True)
    x = _images(4)
    for method, params in [("tome", {"r": 6}), ("ltmp", {})]:  # merging (sizes); LTMP pads (masks)
        tr.apply(timm_model, method, untrained=True, **params)
        tr.apply(hf_model, method, untrained=True, **params)
        if tr.reducer(timm_model).module is not None:
            tr.reducer(hf_model).module.load_state_dict(tr.reducer(timm_model).module.state_dict())
        with torch.no_grad():
            tokens = timm_model.forward_features(x)  # B×N'×C after the final norm
            record = tr.last_forward(timm_model)
            weights = record.size if record.size is not None else torch.ones_like(tokens[..., :1])
            if record.mask is not None:
                weights = weights * record.mask
            mean = (tokens[:, 1:] * weights[:, 1:]).sum(1) / weights[:, 1:].sum(1)
            expected = hf_model.classifier(torch.cat([tokens[:, 0], mean], dim=1))
            torch.testing.assert_close(hf_model(x).logits, expected, atol=1e-4, rtol=1e-4)
        assert record.size is not None or record.mask is not None  # the weighting was exercised
    tr.remove(hf_model)
    with torch.no_grad():  # the stock forward again: the plain mean
        out = hf_model(x)
        stock_tokens = hf_model.dinov2(x).last_hidden_state
        plain = torch.cat([stock_tokens[:, 0], stock_tokens[:, 1:].mean(1)], dim=1)
        torch.testing.assert_close(out.logits, hf_model.classifier(plain))


# -- the timm guarantees on every supported class -----------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", CLASSES)
def test_reduced_model_runs_and_remove_is_bit_exact(name, impl):
    model = small_config_model(name, impl)
    x = _images()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        stock = _main_output(model(x))
    tr.apply(model, "tome", r=6, trace_source=True)
    with torch.no_grad():
        reduced = model(x)
    assert torch.isfinite(_main_output(reduced)).all()
    assert _main_output(reduced).shape == stock.shape
    p = _prefix(name)
    record = tr.last_forward(model)
    assert record.block_tokens[-1][1] == 64 + p - 4 * 6
    n0 = 64 + p
    assert torch.equal(record.source[:, :p], torch.eye(n0)[:p].expand(2, p, n0))  # prefix tokens untouched
    assert set(model.state_dict()) == set(state)
    tr.remove(model)
    with torch.no_grad():
        again = _main_output(model(x))
    assert torch.equal(again, stock)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(model).__module__.startswith("transformers.")


@pytest.mark.parametrize("name", ["ViTForImageClassification", "SiglipVisionModel", "Dinov2ForImageClassification"])
def test_sdpa_is_kept_and_eager_agrees(name, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    x = _images()
    outs = {}
    for impl in ("sdpa", "eager"):
        model = small_config_model(name, impl)
        tr.apply(model, "tome", r=6)
        calls.clear()
        monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
        with torch.no_grad():
            outs[impl] = _main_output(model(x))
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        blocks = len(adapter_for(model).blocks(model))
        pool_head = 1 if name.startswith("Siglip") else 0  # SigLIP's head (stock: nn.MultiheadAttention) is fused
        assert len(calls) == (blocks + pool_head if impl == "sdpa" else pool_head)
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-5, rtol=1e-4)


def test_other_attention_implementations_are_refused():
    model = small_config_model("ViTForImageClassification")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2.*sdpa"):
        tr.apply(model, "tome")
    model.config._attn_implementation = "sdpa"
    tr.apply(model, "tome")
    model.config._attn_implementation = "flex_attention"  # switched after apply: refused at the call
    with pytest.raises(ValueError, match="flex_attention"):
        model(_images())


@pytest.mark.parametrize("name", CLASSES)
def test_analytic_gmacs_equal_torch_flop_counter_unreduced(name):
    # torch's counter does not count the CPU fused-attention op: compare on eager attention.
    model = small_config_model(name, "eager")
    x = _images()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    assert counter.get_total_flops() / 2 / x.shape[0] == pytest.approx(tr.gmacs(model) * 1e9, rel=1e-9)


@pytest.mark.parametrize("name", ["ViTForImageClassification", "SiglipVisionModel"])
def test_analytic_gmacs_track_flop_counter_when_reduced(name):
    model = small_config_model(name, "eager")
    tr.apply(model, "tome", r=6)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(_images())
    analytic = tr.stats(model).gmacs * 1e9
    counted = counter.get_total_flops() / 2 / 2
    assert analytic <= counted <= analytic * 1.05  # plus ToMe's own similarity matmuls
    assert analytic < 0.9 * tr.gmacs(model) * 1e9


@pytest.mark.parametrize("name,method,params", [
    ("ViTForImageClassification", "tome", {}),
    ("DeiTForImageClassificationWithTeacher", "evit", {"layers": (1, 2)}),
    ("Dinov2ForImageClassification", "evit", {"layers": (1, 2)}),
    ("SiglipVisionModel", "tome", {}),
])
def test_reduced_hf_model_traces_without_graph_breaks(name, method, params):
    model = small_config_model(name)
    tr.apply(model, method, **params)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(_images())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# -- SigLIP's attention-pool head -----------------------------------------------------------------


def test_siglip_head_counts_a_merged_token_as_the_tokens_it_stands_for():
    from tokenreduce.models import context_of

    model = small_config_model("SiglipVisionModel")
    head = model.head
    tr.apply(model, "tome", r=2)
    ctx = context_of(model)  # the adapter's per-forward state, set by hand below
    torch.manual_seed(0)
    a, b, pad = torch.randn(2, 1, 64), torch.randn(2, 5, 64), torch.randn(2, 1, 64)
    tokens = torch.cat([a, b[:, :1], b[:, :1], b[:, :1], b[:, 1:]], dim=1)  # b0 three times
    with torch.no_grad():
        expected = type(head)._tr_base.forward(head, tokens)  # the stock head on all tokens
        ctx.size, ctx.mask = torch.tensor([1.0, 3.0, 1, 1, 1, 1]).view(1, 6, 1).expand(2, 6, 1), None
        merged = head(torch.cat([a, b], dim=1))  # b0 once, with size 3
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
        ctx.size = torch.tensor([1.0, 3.0, 1, 1, 1, 1, 7.0]).view(1, 7, 1).expand(2, 7, 1)
        ctx.mask = torch.tensor([1.0] * 6 + [0.0]).view(1, 7, 1).expand(2, 7, 1)
        padded = head(torch.cat([a, b, pad], dim=1))  # a padding row is never attended to
        torch.testing.assert_close(padded, expected, atol=1e-5, rtol=1e-5)


def test_siglip_without_class_token_reduces_every_token():
    model = small_config_model("SiglipVisionModel")
    tr.apply(model, "evit", layers=(1, 2), keep_rate=0.5, fuse_token=False)
    info = tr.reducer(model).info
    assert info.num_prefix == 0 and not info.has_class_token and info.family == "hf-siglip"
    with torch.no_grad():
        out = model(_images())
    assert out.last_hidden_state.shape[1] == 16 and out.pooler_output.shape == (2, 64)


# -- the model's own outputs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ViTModel", "ViTForImageClassification", "Dinov2Model", "CLIPVisionModel",
                                  "SiglipVisionModel"])
def test_hidden_states_hold_every_layers_reduced_tokens(name):
    model = small_config_model(name)
    tr.apply(model, "tome", r=6)
    with torch.no_grad():
        out = model(_images(), output_hidden_states=True)
    counts = [h.shape[1] for h in out.hidden_states]
    record = tr.last_forward(model).block_tokens
    assert counts == [record[0][0]] + [m for _, m in record]
    assert counts[0] > counts[-1]


@pytest.mark.parametrize("family", ["vit", "dinov2"])
@pytest.mark.parametrize("method,params", [("tome", {"r": 6}), ("evit", {}), ("cropr", {"p": 4})])
def test_restored_hidden_states_match_timms_restored_intermediates(family, method, params):
    """With restoration every ``hidden_states`` entry is the full grid, and it is the grid timm's
    ``forward_intermediates`` restores from the same weights (an independent entry point and model)."""
    timm_model, hf_model = PAIRS[family]()
    x = _images(3)
    _apply_both(timm_model, hf_model, method, params, restore="frozen")
    depth, prefix = len(timm_model.blocks), timm_model.num_prefix_tokens
    with torch.no_grad():
        out = hf_model(x, output_hidden_states=True)
        grids = timm_model.forward_intermediates(x, indices=depth, norm=False, output_fmt="NLC",
                                                 intermediates_only=True)
    assert len(out.hidden_states) == depth + 1
    n0 = out.hidden_states[0].shape[1]
    assert all(h.shape == (3, n0, 64) for h in out.hidden_states)  # the full grid at every layer
    assert min(m for _, m in tr.last_forward(hf_model).block_tokens) < n0  # while the layers ran reduced
    for layer, grid in enumerate(grids):
        torch.testing.assert_close(out.hidden_states[layer + 1][:, prefix:], grid, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["ViTModel", "DeiTForImageClassificationWithTeacher", "CLIPVisionModel",
                                  "SiglipVisionModel"])
def test_restored_hidden_states_are_the_stock_ones_at_zero_reduction_and_full_grids_when_reduced(name):
    model = small_config_model(name)
    with torch.no_grad():
        stock = model(_images(), output_hidden_states=True).hidden_states
        tr.apply(model, "tome", r=0, restore="frozen")
        restored = model(_images(), output_hidden_states=True).hidden_states
        tr.apply(model, "tome", r=6, restore="frozen")
        reduced = model(_images(), output_hidden_states=True).hidden_states
    assert len(restored) == len(stock) == len(reduced)
    for a, b in zip(restored, stock, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(h.shape == stock[0].shape for h in reduced)
    assert tr.last_forward(model).block_tokens[-1][1] < stock[0].shape[1]


@pytest.mark.parametrize("kwargs,error", [
    ({"output_attentions": True}, "output_attentions"),
    ({"head_mask": torch.ones(4, 4)}, "head_mask"),
])
def test_unsupported_arguments_are_refused(kwargs, error):
    model = small_config_model("ViTForImageClassification")
    tr.apply(model, "tome")
    with pytest.raises(NotImplementedError, match=error):
        model(_images(), **kwargs)
    with tr.unreduced(model), torch.no_grad():  # the stock model answers them
        out = model(_images(), output_attentions=True) if "output_attentions" in kwargs else model(_images())
    assert out.logits.shape == (2, NUM_CLASSES)


def test_an_attention_mask_is_refused():
    model = small_config_model("ViTModel", "eager")
    tr.apply(model, "tome")
    with pytest.raises(NotImplementedError, match="attention_mask"):
        model(_images(), attention_mask=torch.ones(2, 65).bool().index_fill(1, torch.tensor([3]), False))


def test_return_dict_false_gives_the_stock_tuple_layout():
    model = small_config_model("Dinov2ForImageClassification")
    tr.apply(model, "tome", r=4)
    with torch.no_grad():
        as_tuple = model(_images(), return_dict=False)
        as_dict = model(_images())
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits)
    labels = torch.tensor([1, 2])
    assert model(_images(), labels=labels).loss.ndim == 0


@pytest.mark.parametrize("name", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher",
                                  "CLIPVisionModel", "SiglipVisionModel"])
def test_interpolated_positions_take_their_token_count_from_the_forward(name):
    model = small_config_model(name)
    tr.apply(model, "tome", r=8)
    with torch.no_grad():
        out = model(_images(size=96), interpolate_pos_encoding=True)  # 144 patch tokens, not 64
    record = tr.last_forward(model)
    p = _prefix(name)
    assert record.num_tokens_in == 144 + p
    assert record.block_tokens[-1][1] == 144 + p - 4 * 8
    assert torch.isfinite(_main_output(out)).all()
    assert tr.stats(model).gmacs > tr.gmacs(model)  # more tokens than the configured 64×64


# -- learned methods: train, save, load ---------------------------------------------------------------


def test_learned_parameters_train_and_load_on_hf_and_a_timm_checkpoint_is_refused(tmp_path):
    from tokenreduce.checkpoint import save_reducer

    model = small_config_model("ViTForImageClassification")
    tr.apply(model, "cropr", untrained=True, p=4)
    module = tr.reducer(model).module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    model.train()
    labels = torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        logits = model(_images(4)).logits
        loss = F.cross_entropy(logits, labels) + sum(F.cross_entropy(a, labels) for a in tr.reducer(model).aux_logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())
    path = tmp_path / "cropr_hf.safetensors"
    save_reducer(tr.reducer(model), path)

    other = small_config_model("ViTForImageClassification")
    tr.apply(other, "cropr", checkpoint=path)
    with torch.no_grad():
        torch.testing.assert_close(other(_images()).logits, model(_images()).logits)

    from conftest import make_vit

    timm_model = make_vit(depth=4)
    tr.apply(timm_model, "cropr", untrained=True, p=4)
    timm_path = tmp_path / "cropr_timm.safetensors"
    save_reducer(tr.reducer(timm_model), timm_path)
    with pytest.raises(ValueError, match="timm-vit|hf-vit|family"):
        tr.apply(small_config_model("ViTForImageClassification"), "cropr", checkpoint=timm_path)


@pytest.mark.parametrize("method,params", [("dynamicvit", {"layers": (1, 2)}), ("dtps", {"layers": (1, 2)}),
                                           ("ltmp", {"target": 0.6}), ("cropr", {"p": 4})])
@pytest.mark.parametrize("name", ["ViTForImageClassification", "CLIPForImageClassification"])
def test_tr_train_trains_learned_methods_on_hf_classifiers(tmp_path, name, method, params):
    from torch.utils.data import TensorDataset

    model = small_config_model(name)
    data = TensorDataset(_images(8), torch.arange(8) % 4)
    out = tr.train(model, method, data, out_dir=str(tmp_path), batch_size=4, epochs=1, lr=0.05, progress=False,
                   **params)
    assert out["complete"] and out["result"].step == 2
    trained = {k: v.clone() for k, v in tr.reducer(model).module.state_dict().items()}
    fresh = small_config_model(name)
    tr.apply(fresh, method, checkpoint=out["checkpoint"])
    loaded = tr.reducer(fresh).module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.items())
    with torch.no_grad():
        torch.testing.assert_close(fresh(_images()).logits, model.eval()(_images()).logits)


def test_training_a_backbone_without_classifier_says_so(tmp_path):
    from torch.utils.data import TensorDataset

    data = TensorDataset(_images(4), torch.arange(4))
    with pytest.raises(TypeError, match="class logits"):
        tr.train(small_config_model("ViTModel"), "cropr", data, out_dir=str(tmp_path), batch_size=4, progress=False,
                 p=4)


# -- refusals and the optional dependency -------------------------------------------------------------


def test_masked_image_modelling_is_refused():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                    patch_size=8)
    with pytest.raises(TypeError, match="patch grid"):
        tr.apply(transformers.ViTForMaskedImageModeling(config), "tome")


def test_dinov2_backbone_needs_restoration():
    model = small_config_model("Dinov2Backbone")
    with pytest.raises(ValueError, match="restore='frozen'"):
        tr.apply(model, "tome")
    assert not tr.is_reduced(model)


def _dinov2_backbone_pair():
    """timm's DINOv2-like ViT and an HF ``Dinov2Backbone`` (every stage out, final norm applied) with its
    weights (the backbone's state dict is ``Dinov2Model``'s)."""
    timm_model, hf_model = dinov2_pair()
    stages = [f"stage{i}" for i in range(1, len(timm_model.blocks) + 1)]
    config = {k: v for k, v in hf_model.config.to_dict().items() if k not in ("out_features", "out_indices")}
    backbone = transformers.Dinov2Backbone(transformers.Dinov2Config(**config, out_features=stages)).eval()
    backbone.load_state_dict(hf_model.state_dict())
    return timm_model, backbone


def test_dinov2_backbone_at_zero_reduction_gives_the_stock_feature_maps():
    _, backbone = _dinov2_backbone_pair()
    x = _images()
    with torch.no_grad():
        stock = backbone(x).feature_maps
        tr.apply(backbone, "tome", r=0, restore="frozen")
        restored = backbone(x).feature_maps
    for a, b in zip(restored, stock, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,params", [("tome", {"r": 6}), ("evit", {}), ("cropr", {"p": 4})])
def test_reduced_dinov2_backbone_feature_maps_match_timms_restored_intermediates(method, params):
    timm_model, backbone = _dinov2_backbone_pair()
    x = _images(3)
    _apply_both(timm_model, backbone, method, params, restore="frozen")
    with torch.no_grad():
        maps = backbone(x).feature_maps
        grids = timm_model.forward_intermediates(x, indices=len(timm_model.blocks), norm=True,
                                                 intermediates_only=True)  # B×C×H×W, final norm applied
    assert min(m for _, m in tr.last_forward(backbone).block_tokens) < 65  # the layers ran reduced
    assert len(maps) == len(grids) == 12
    for got, want in zip(maps, grids, strict=True):
        assert got.shape == (3, 64, 8, 8)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_tomesd_dinov2_backbone_needs_no_restoration_and_matches_timm():
    """ToMe for SD keeps the stream's grid: the backbone takes it without restore=, and its feature maps are
    timm's intermediates of the same reduced model."""
    timm_model, backbone = _dinov2_backbone_pair()
    x = _images(3)
    _apply_both(timm_model, backbone, "tomesd", {"r": 20})
    with torch.no_grad():
        maps = backbone(x).feature_maps
        grids = timm_model.forward_intermediates(x, indices=len(timm_model.blocks), norm=True,
                                                 intermediates_only=True)
    assert min(m for _, m in tr.last_forward(backbone).block_tokens) == 65 - 20  # the branches ran merged
    for got, want in zip(maps, grids, strict=True):
        assert got.shape == (3, 64, 8, 8)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_two_tower_clip_says_to_reduce_its_vision_tower():

    model = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                           intermediate_size=64),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)))
    with pytest.raises(TypeError, match="vision_model"):
        tr.apply(model, "tome")
    tr.apply(model.vision_model, "tome", r=2)


def test_gradient_checkpointing_is_refused():
    model = small_config_model("ViTForImageClassification")
    # newer transformers call it activation checkpointing (the old names warn)
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_enable")()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        tr.apply(model, "tome")
    getattr(model, f"{prefix}_checkpointing_disable")()
    tr.apply(model, "tome")
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        getattr(model, f"{prefix}_checkpointing_enable")()


def test_missing_transformers_says_to_install_the_extra(monkeypatch):
    fake = type("ViTModel", (torch.nn.Module,), {"__module__": "transformers.models.vit.modeling_vit"})
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(MissingExtraError, match=r'pip install "tokenreduce\[hf\]"'):
        tr.apply(fake(), "tome")


def test_timm_models_never_import_transformers():
    code = (
        "import sys, torch, tokenreduce as tr\n"
        "from timm.models.vision_transformer import VisionTransformer\n"
        "m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)\n"
        "tr.apply(m, 'tome', r=2); m(torch.randn(1, 3, 32, 32)); tr.gmacs(m)\n"
        "try:\n    tr.apply(torch.nn.Linear(2, 2), 'tome')\nexcept TypeError:\n    pass\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_load_model_reads_an_hf_directory_offline(tmp_path):
    from tokenreduce.models.loading import load_model

    model = small_config_model("ViTForImageClassification")
    model.save_pretrained(tmp_path / "vit")
    loaded = load_model(f"hf:{tmp_path / 'vit'}")
    assert type(loaded).__name__ == "ViTForImageClassification" and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(_images()).logits, model(_images()).logits)
    tr.apply(loaded, "tome", r=4)
    with pytest.raises(ValueError, match="img_size"):
        load_model(f"hf:{tmp_path / 'vit'}", img_size=96)
    with pytest.raises(FileNotFoundError):
        load_model(f"hf:{tmp_path / 'missing'}")


def test_command_line_benchmarks_an_hf_model_and_refuses_what_needs_its_image_processor(tmp_path, capsys):
    from PIL import Image

    from tokenreduce.cli import main

    saved = tmp_path / "vit"
    small_config_model("ViTForImageClassification").save_pretrained(saved)
    out = tmp_path / "bench.json"
    args = ["benchmark", "--model", f"hf:{saved}", "--method", "tome", "--param", "r=2", "-b", "2", "--repeats", "1",
            "--warmup", "0", "--no-progress", "--json", str(out)]
    assert main(args) == 0
    row = __import__("json").loads(out.read_text())[0]
    assert row["gmacs_reduced"] < row["gmacs_unreduced"] and row["images_per_s_reduced"] > 0

    folder = tmp_path / "data" / "0"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    assert main(["evaluate", "--model", f"hf:{saved}", "--data-dir", str(tmp_path / "data"), "--json", "",
                 "--no-progress"]) == 2
    assert "image processor" in capsys.readouterr().err
    assert main(["visualize", str(folder / "a.png"), "--model", f"hf:{saved}", "--method", "tome",
                 "--out", str(tmp_path / "t.png")]) == 2
    assert "image processor" in capsys.readouterr().err
