"""The public introspection API, per-method knowledge on the reducer classes, and refusals of what a
reduced model cannot serve correctly."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from conftest import make_vit

import tokenreduce as tr
from tokenreduce.budget import resolve_budget
from tokenreduce.methods import REGISTRY, get_method
from tokenreduce.methods.base import Reducer
from tokenreduce.models import model_info

LEARNED = sorted(name for name, cls in REGISTRY.items() if cls.learned)


# -- tr.reducer / tr.last_forward / tr.is_reduced -------------------------------------------------------


def test_introspection_of_a_reduced_model(vit, images):
    assert not tr.is_reduced(vit)
    with pytest.raises(RuntimeError, match="no method applied"):
        tr.reducer(vit)
    tr.apply(vit, "evit", keep_rate=0.5, trace_source=True)
    assert tr.is_reduced(vit)
    applied = tr.reducer(vit)
    assert applied.name == "evit" and applied.config()["keep_rate"] == 0.5 and applied.module is None
    with pytest.raises(RuntimeError, match="not run a forward"):
        tr.last_forward(vit)
    with torch.no_grad():
        vit(images)
    record = tr.last_forward(vit)
    # EViT at keep rate 0.5, blocks 3, 6, 9: ceil(0.5·64) = 32 kept (+ class + fused); the fused token is a
    # patch token for the next stage, as in EViT's code: ceil(0.5·33) = 17, then ceil(0.5·18) = 9
    assert [m for n, m in record.block_tokens if n != m] == [1 + 32 + 1, 1 + 17 + 1, 1 + 9 + 1]
    assert record.batch_size == 4 and record.num_tokens_in == 65 and record.num_prefix == 1
    assert record.source.shape == (4, 11, 65) and len(record.stages) == 3
    assert torch.equal(record.size.sum(dim=1), torch.full((4, 1), 65.0))  # every original token counted once
    tr.remove(vit)
    assert not tr.is_reduced(vit)


def test_learned_module_is_reachable_and_is_what_the_forward_uses(vit, images):
    tr.apply(vit, "dynamicvit", untrained=True)
    module = tr.reducer(vit).module
    assert isinstance(module, torch.nn.Module) and len(list(module.parameters())) > 0
    with torch.no_grad():
        before = vit(images)
        for p in module.parameters():
            p.add_(torch.randn_like(p))
        after = vit(images)
    assert not torch.equal(before, after)  # the forward reads the very parameters tr.reducer exposes


# -- learned methods need trained parameters --------------------------------------------------------------


@pytest.mark.parametrize("method", LEARNED)
def test_learned_method_without_parameters_is_refused(vit, method):
    params = {"p": 4} if method == "cropr" else {}
    with pytest.raises(ValueError, match="learned method.*checkpoint=PATH.*untrained=True"):
        tr.apply(vit, method, **params)
    assert not tr.is_reduced(vit)
    tr.apply(vit, method, untrained=True, **params)
    assert tr.reducer(vit).name == method


@pytest.mark.parametrize("method", ["dtps", "dynamicvit"])
def test_evaluation_skips_a_learned_method_without_parameters(vit, method):
    from tokenreduce.eval.accuracy import Config, evaluate_configs

    x, y = torch.randn(4, 3, 64, 64), torch.arange(4)
    rows = evaluate_configs(vit, [Config(None), Config(method)], lambda: [(x, y)], timing_batch=x, repeats=1,
                            progress=False)
    assert "top1" in rows[0]
    assert "top1" not in rows[1] and "needs trained parameters" in rows[1]["skipped"]


def test_tests_use_the_public_api_not_the_private_context():
    from pathlib import Path

    here = Path(__file__).parent
    private = "_tr" + "_ctx"  # spelled apart so this file does not match itself
    offenders = [p.name for p in here.glob("*.py") if private in p.read_text()]
    assert offenders == []


def test_bad_parameters_are_reported_before_the_missing_checkpoint(vit):
    with pytest.raises(ValueError, match="keep_rate"):
        tr.apply(vit, "dynamicvit", keep_rate=1.5)


def test_dtps_is_its_own_method_and_tps_variant_is_an_alias(vit, images):
    assert "dtps" in tr.methods() and get_method("dtps").learned and not get_method("tps").learned
    torch.manual_seed(3)
    tr.apply(vit, "tps", variant="dtps", untrained=True, keep_rate=0.5)
    assert tr.reducer(vit).name == "dtps" and "variant" not in tr.reducer(vit).config()
    with torch.no_grad():
        alias = vit(images)
    torch.manual_seed(3)
    tr.apply(vit, "dtps", untrained=True, keep_rate=0.5)
    with torch.no_grad():
        direct = vit(images)
    # the same class and seed: identical predictors, identical outputs
    torch.testing.assert_close(alias, direct, rtol=0, atol=0)
    with pytest.raises(ValueError, match="variant must be one of"):
        tr.apply(vit, "tps", variant="nope")


def test_shipped_dtps_checkpoint_loads_under_both_names():
    from tokenreduce.models.reference import load_reference_model, shipped_reducer

    path = shipped_reducer("dtps")
    model = load_reference_model()
    tr.apply(model, "dtps", checkpoint=path)
    assert tr.reducer(model).name == "dtps"
    tr.apply(model, "tps", variant="dtps", checkpoint=path)
    assert tr.reducer(model).name == "dtps"


# -- per-method knowledge lives on the classes ----------------------------------------------------------


def test_training_tasks_come_from_the_classes():
    from tokenreduce.training.learned import learned_methods

    assert learned_methods() == LEARNED == ["cropr", "dtps", "dynamicvit", "ltmp"]
    for name, cls in REGISTRY.items():
        assert (cls.training_task() is not None) == cls.learned, name


def test_evaluation_rows_show_paper_defaults_only_on_their_grid():
    with torch.device("meta"):
        small = model_info(make_vit())  # 64 patches
        deit = model_info(timm.create_model("deit_small_patch16_224"))  # 196 patches
    for name, cls in REGISTRY.items():
        small_rows = [label for label, _, _ in cls.evaluation_rows(small, (0.75, 0.6))]
        deit_rows = [label for label, _, _ in cls.evaluation_rows(deit, (0.75, 0.6))]
        if name == "ltmp":  # its budget is a training target: one row per target, on any model
            assert small_rows == deit_rows == ["ltmp (target 0.75)", "ltmp (target 0.6)"]
            continue
        if name == "tomesd":  # dense prediction only; its default (half the patches) fits any grid
            assert small_rows == deit_rows == []
            assert [label for label, _, _ in cls.evaluation_rows(small, (0.6,), "segmentation")] == [
                "tomesd (default)", "tomesd@0.6"]
            continue
        assert small_rows == [f"{name}@0.75", f"{name}@0.6"]
        assert deit_rows == [f"{name} (default)", f"{name}@0.75", f"{name}@0.6"]
        dense = cls.evaluation_rows(small, (0.6,), "segmentation")
        if name == "tome":  # the decreasing schedule, which scores higher under a dense head
            assert dense == [("tome@0.6", {}, 0.6), ("tome@0.6 decreasing", {"inflection": -1.0}, 0.6)]
        else:
            assert dense == cls.evaluation_rows(small, (0.6,))


def test_ppt_asks_for_calibration_off_its_home_model():
    with torch.device("meta"):
        deit = timm.create_model("deit_small_patch16_224")
        other = timm.create_model("deit_tiny_patch16_224")
    home, away = get_method("ppt").create(model_info(deit)), get_method("ppt").create(model_info(other))
    assert not home.needs_calibration({}) and away.needs_calibration({})
    assert not away.needs_calibration({"threshold": 1e-4})
    assert not get_method("tome").create(model_info(other)).needs_calibration({})


# -- budgets: bisection from the schedule alone ---------------------------------------------------------


def _linear_scan(cls: type[Reducer], info, budget: float):
    """The first knob value, from least to most reduction, whose analytic cost fits (an independent search)."""
    base = cls.Params()
    for value in cls.knob_values(info, base):
        reducer = cls(info, dataclasses.replace(base, **{cls.knob: value}))
        n = info.num_tokens
        cost = info.cost.macs(reducer.schedule(n), info.num_patches) + reducer.extra_macs(n)
        if cost <= budget * info.unreduced_macs() * (1 + 1e-9):
            return value
    return None


@pytest.mark.parametrize("method", sorted(name for name, cls in REGISTRY.items() if cls.budget_sets_schedule))
@pytest.mark.parametrize("budget", [0.95, 0.75, 0.6, 0.45, 0.3])
def test_bisection_finds_what_a_linear_scan_finds(method, budget):
    cls = get_method(method)
    with torch.device("meta"):
        info = model_info(make_vit())
    expected = _linear_scan(cls, info, budget)
    if expected is None:
        with pytest.raises(ValueError, match="not reachable"):
            cls.create(info, budget=budget)
        return
    assert cls.create(info, budget=budget).config()[cls.knob] == expected


def test_budget_resolution_builds_no_learned_module(monkeypatch):
    built = []
    cls = get_method("dynamicvit")
    original = cls.build_module
    monkeypatch.setattr(cls, "build_module", lambda self: built.append(1) or original(self))
    with torch.device("meta"):
        info = model_info(make_vit())
    reducer = cls.create(info, budget=0.6)
    assert built == []  # resolving the budget built nothing
    assert reducer.module is not None and built == [1]  # the chosen reducer builds its module once, on use


def test_bisection_evaluates_few_costs():
    calls = []
    values = list(range(1000))
    assert resolve_budget(0.5, values, lambda v: calls.append(v) or 1000.0 - v, 1000.0, "k") == 500
    assert len(calls) <= 12


# -- timm entry points a reduced model cannot serve -----------------------------------------------------


def test_grid_entry_points_refuse_on_a_reduced_model_and_run_inside_unreduced(vit, images):
    stock = vit.forward_intermediates(images, indices=[2, 5])
    layers = vit.get_intermediate_layers(images, n=2)
    tr.apply(vit, "tome", r=4)
    with pytest.raises(NotImplementedError, match="no longer fill the patch grid"):
        vit.forward_intermediates(images, indices=[2, 5])
    with pytest.raises(NotImplementedError, match="no longer fill the patch grid"):
        vit.get_intermediate_layers(images, n=2)
    with tr.unreduced(vit):
        again = vit.forward_intermediates(images, indices=[2, 5])
        layers_again = vit.get_intermediate_layers(images, n=2)
    assert torch.equal(again[0], stock[0]) and all(torch.equal(a, b) for a, b in zip(again[1], stock[1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(layers, layers_again, strict=True))


def test_forward_head_pre_logits_is_consistent_with_the_forward(vit, images):
    tr.apply(vit, "tome", r=4)
    vit.global_pool = "avg"  # size-weighted average pooling of the merged tokens
    with torch.no_grad():
        features = vit.forward_features(images)
        pooled = vit.forward_head(features, pre_logits=True)
        logits = vit(images)
    assert pooled.shape == (4, 64)
    torch.testing.assert_close(vit.head(pooled), logits)


@pytest.mark.parametrize("call", [
    lambda m: m.set_input_size(img_size=(32, 32)),
    lambda m: m.reset_classifier(3),
    lambda m: m.set_grad_checkpointing(True),
    lambda m: m.prune_intermediate_layers(indices=2),
])
def test_methods_that_change_the_model_refuse_while_reduced(vit, call):
    tr.apply(vit, "tome", r=2)
    with pytest.raises(RuntimeError, match="tokenreduce.remove"):
        call(vit)
    tr.remove(vit)
    call(vit)  # the stock model does it


def test_gradient_checkpointing_is_refused(vit):
    vit.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        tr.apply(vit, "tome", r=2)
    assert not tr.is_reduced(vit)


# -- parameters are validated where they are declared -----------------------------------------------------


@pytest.mark.parametrize("method,params,match", [
    ("evit", {"keep_rate": 0}, "keep_rate must be in"),
    ("random", {"seed": 1.5}, "seed must be an int"),
    ("tps", {"temperature": -1}, "temperature must be a number > 0"),
    ("dtps", {"prop_attn": "yes"}, "prop_attn must be True or False"),
    ("cropr", {"num_queries": 0}, "num_queries must be an int >= 1"),
    ("ltmp", {"merge_threshold": (0.5, 1.5)}, "merge_threshold needs numbers in"),
    ("ppt", {"threshold": -1e-5}, "threshold needs numbers in"),
    ("bat", {"layers": ()}, "empty layers"),
    ("tome", {"prop_attn": 1}, "prop_attn must be True or False"),
])
def test_params_dataclasses_validate_without_a_model(method, params, match):
    cls = get_method(method)
    with pytest.raises(ValueError, match=match):
        cls.Params(**params)  # no model involved: the dataclass itself refuses
    with torch.device("meta"):
        info = model_info(make_vit())
    with pytest.raises(ValueError, match=f"^{method}: {match}"):
        cls.create(info, **params)  # and the method's name leads the message
