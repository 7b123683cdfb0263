"""Fine-tuning recipes: values, overrides, the keep-rate warm-up, mixup, backbone updates, exact resume, torchrun."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, make_vit, write_fashion_mnist
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

import tokenreduce as tr
from tokenreduce.checkpoint import read_reducer
from tokenreduce.methods import REGISTRY
from tokenreduce.training import CheckpointError
from tokenreduce.training.finetune import FinetuneTask, classification_criterion
from tokenreduce.training.recipes import RECIPES, Recipe, get_recipe, keep_rate_at, recipe_fields, resolve_recipe

DOCUMENTED = {  # docs/training.md#fine-tuning-recipes, from the official scripts
    "deit": dict(epochs=30, batch_size=512, lr=5e-6, lr_batch=512, min_lr=5e-6, warmup_epochs=5, weight_decay=1e-8,
                 layer_decay=None, drop_path=0.1, train_mode=False, ema_decay=0.99996, clip_grad=None),
    "evit": dict(epochs=30, batch_size=1024, lr=2e-5, lr_batch=512, min_lr=2e-6, warmup_epochs=0, weight_decay=1e-6,
                 train_mode=False, ema_decay=0.99996, clip_grad=None, keep_rate_hold_epochs=10,
                 keep_rate_shrink_epochs=0, mixup=0.8, cutmix=1.0, label_smoothing=0.1),
    "bat": dict(epochs=30, batch_size=1024, lr=2e-5, lr_batch=512, min_lr=2e-6, warmup_epochs=0, weight_decay=1e-6,
                keep_rate_hold_epochs=10),
    "tome": dict(epochs=100, batch_size=1024, lr=5e-4, lr_batch=256, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
                 layer_decay=0.65, drop_path=0.1, ema_decay=None, clip_grad=None),
    "ppt": dict(epochs=30, batch_size=1024, lr=1e-5, lr_batch=512, min_lr=1e-5, warmup_epochs=5, weight_decay=0.05,
                drop_path=0.1, train_mode=True, ema_decay=0.99996),
    "tps": dict(epochs=30, batch_size=1024, lr=2.5e-4, lr_batch=1024, min_lr=1e-5, warmup_epochs=5,
                backbone_lr_scale=1.0, color_jitter=0.3),
    "dtps": dict(epochs=30, batch_size=1024, lr=2.5e-4, lr_batch=1024, min_lr=1e-5, warmup_epochs=5,
                 weight_decay=0.05, filter_bias_and_bn=False, backbone_lr_scale=0.01, ratio_weight=2.0,
                 distill_weight=0.5, ema_decay=None, clip_grad=None),
    "dynamicvit": dict(epochs=30, batch_size=1024, lr=1e-3, lr_batch=None, min_lr=1e-6, warmup_epochs=5,
                       weight_decay=0.05, backbone_lr_scale=0.01, ratio_weight=2.0, distill_weight=0.5,
                       ema_decay=0.9999, drop_path=0.0, clip_grad=None),
    "cropr": dict(epochs=50, batch_size=1024, lr=1e-3, lr_batch=256, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
                  layer_decay=0.75, drop_path=0.2, drop_path_last_block=False, aux_weight=1.0, clip_grad=None,
                  ema_decay=None, mixup=0.8, cutmix=1.0, label_smoothing=0.1),
    "ltmp": dict(epochs=1, batch_size=128, optimizer="momentum", momentum=0.0, lr=5e-3, lr_batch=None, min_lr=5e-3,
                 warmup_epochs=0, weight_decay=0.0, backbone_lr_scale=1e-3, ratio_weight=10.0, mixup=0.0, cutmix=0.0,
                 label_smoothing=0.1),
}


def _data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 64, 64, generator=g), torch.randint(0, 10, (n,), generator=g))


def _steps(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "step"]


# -- the recipes as data --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_each_recipe_holds_its_documented_values(name):
    recipe = get_recipe(name)
    for key, value in DOCUMENTED[name].items():
        assert getattr(recipe, key) == value, (name, key)
    assert recipe.source and recipe.paper
    docs = Path(__file__).parents[1].joinpath("docs/training.md").read_text().split("## Fine-tuning recipes")[1]
    row = next(line for line in docs.splitlines() if line.startswith(f"| `{name}` "))
    mantissa, exponent = f"{recipe.lr:e}".split("e")
    lr = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 2.5e-4
    assert f"| {lr} " in row and f"| {recipe.epochs} | {recipe.batch_size} |" in row  # the docs table agrees


def test_every_recipe_is_documented_and_every_method_names_a_registered_recipe():
    assert set(RECIPES) == set(DOCUMENTED)
    assert {cls.recipe for cls in REGISTRY.values()} <= set(RECIPES)
    assert REGISTRY["evit"].recipe == "evit" and REGISTRY["random"].recipe == "deit"
    assert REGISTRY["dtps"].recipe == "dtps" and REGISTRY["tps"].recipe == "tps"
    method_params = {f.name for cls in REGISTRY.values() for f in dataclasses.fields(cls.Params)}
    assert not method_params & set(recipe_fields())  # a keyword argument is either a recipe value or a parameter


def test_overrides_replace_values_and_are_checked():
    recipe = resolve_recipe("evit", overrides={"lr": 1e-4, "mixup": 0.0, "layer_decay": 0.75})
    assert (recipe.lr, recipe.mixup, recipe.layer_decay, recipe.epochs) == (1e-4, 0.0, 0.75, 30)
    assert get_recipe("evit").lr == 2e-5  # the registered recipe is untouched
    assert resolve_recipe("paper", REGISTRY["cropr"]).name == "cropr"
    assert resolve_recipe(recipe).lr == 1e-4
    assert recipe.peak_lr(256) == pytest.approx(1e-4 * 256 / 512)
    assert get_recipe("dynamicvit").peak_lr(64) == 1e-3  # not scaled
    with pytest.raises(TypeError, match="unknown recipe value.*lrr"):
        resolve_recipe("evit", overrides={"lrr": 1.0})
    with pytest.raises(ValueError, match="layer_decay"):
        resolve_recipe("evit", overrides={"layer_decay": 1.5})
    with pytest.raises(ValueError, match="optimizer"):
        resolve_recipe("evit", overrides={"optimizer": "nope"})
    with pytest.raises(ValueError, match="warmup_epochs"):
        resolve_recipe("tome", overrides={"epochs": 2})
    with pytest.raises(ValueError, match="unknown recipe 'x'.*deit"):
        get_recipe("x")
    with pytest.raises(ValueError, match="recipe.s values: pass recipe="):
        tr.train(make_vit(), "evit", _data(), out_dir="unused", mixup=0.0)


# -- the training parts ----------------------------------------------------------------------------


def test_keep_rate_warm_up_by_hand():
    assert [keep_rate_at(s, 2, 0.5, 1, 0) for s in range(4)] == [1.0, 1.0, 0.5, 0.5]  # EViT's fine-tune: a step
    assert keep_rate_at(4, 2, 0.5, 1, 2) == pytest.approx(0.75)  # halfway through the cosine
    assert keep_rate_at(3, 2, 0.5, 1, 2) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi / 4)))


def test_evit_keep_rate_warm_up_follows_its_schedule_step_by_step(tmp_path):
    model = make_vit()
    overrides = dict(epochs=4, keep_rate_hold_epochs=1, keep_rate_shrink_epochs=2, mixup=0.0, cutmix=0.0)
    out = tr.train(model, "evit", _data(), out_dir=str(tmp_path), recipe="evit", budget=0.6, batch_size=8,
                   epoch_steps=2, log_every=1, checkpoint_every=100, progress=False, **overrides)
    target = tr.reducer(model).params.keep_rate
    steps = _steps(tmp_path)
    assert [s["keep_rate"] for s in steps] == pytest.approx([keep_rate_at(i, 2, target, 1, 2) for i in range(8)])
    assert [s["keep_rate"] for s in steps][:3] == [1.0, 1.0, 1.0] and steps[-1]["keep_rate"] == target
    ratios = [s["gmacs_ratio"] for s in steps]  # the reduction followed the keep rate
    assert ratios[:3] == [1.0, 1.0, 1.0] and ratios[3] < 1.0 and ratios[-1] < ratios[3]
    assert tr.reducer(model).keep_rate == target  # back at the target after training
    assert read_reducer(out["checkpoint"])[0]["extra"]["recipe"]["keep_rate_shrink_epochs"] == 2


def test_mixup_gives_soft_targets_that_sum_to_one():
    model = tr.apply(make_vit().train(), "evit", budget=0.6)
    seen = []

    def record(logits, targets):
        seen.append(targets)
        return logits.sum() * 0.0

    images, labels = _data(8)[:]
    task = FinetuneTask(tr.reducer(model), get_recipe("evit"), None, transform=None, steps_per_epoch=1)
    assert type(task.criterion).__name__ == "SoftTargetCrossEntropy"
    task.criterion = record
    task.loss(model, (images, labels))
    targets = seen[0]
    assert targets.shape == (8, 10)
    torch.testing.assert_close(targets.sum(-1), torch.ones(8))
    assert (targets > 0).all()  # label smoothing 0.1 spread over every class
    assert (targets.max(-1).values < 1.0).all()
    plain = resolve_recipe("evit", overrides={"mixup": 0.0, "cutmix": 0.0})
    assert type(classification_criterion(plain)).__name__ == "LabelSmoothingCrossEntropy"
    task = FinetuneTask(tr.reducer(model), plain, None, transform=None, steps_per_epoch=1)
    task.criterion = record
    task.loss(model, (images, labels))
    assert torch.equal(seen[1], labels)


def test_optimizer_has_timm_layer_decay_and_the_backbone_rate():
    model = tr.apply(make_vit(), "cropr", untrained=True, p=4)
    from tokenreduce.training.learned import task_for

    recipe = get_recipe("cropr")
    task = FinetuneTask(tr.reducer(model), recipe, task_for(tr.reducer(model), finetune=True), transform=None,
                        steps_per_epoch=1)
    trainable = task.trainable_parameters(model)
    optimizer = task.make_optimizer(model, trainable, type("Config", (), {"lr": 1.0})())
    scales = {g["lr"] for g in optimizer.param_groups}
    assert min(scales) == pytest.approx(0.75 ** 13) and max(scales) == 1.0  # patch embedding .. head, Cropr at 1
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert ids == {id(p) for p in trainable}
    dyn = tr.apply(make_vit(), "dynamicvit", untrained=True)
    task = FinetuneTask(tr.reducer(dyn), get_recipe("dynamicvit"), task_for(tr.reducer(dyn), finetune=True),
                        transform=None, steps_per_epoch=1)
    optimizer = task.make_optimizer(dyn, task.trainable_parameters(dyn), type("Config", (), {"lr": 1.0})())
    predictor = {id(p) for p in tr.reducer(dyn).module.parameters()}
    for group in optimizer.param_groups:
        assert group["lr"] == (1.0 if id(group["params"][0]) in predictor else 0.01)


@pytest.mark.parametrize("method", ["evit", "dynamicvit"])
def test_one_step_with_a_recipe_trains_the_backbone_and_the_reducer_only_mode_does_not(tmp_path, method):
    model = make_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tr.train(model, method, _data(16), out_dir=str(tmp_path / "ft"), recipe="paper", batch_size=8,
                   max_steps=1, progress=False)
    assert out["result"].step == 1
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "blocks.0.attn.qkv.weight" in changed and "head.weight" in changed
    saved = load_file(out["model"])
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    frozen = make_vit()
    if method == "evit":
        with pytest.raises(ValueError, match="nothing to train"):
            tr.train(frozen, method, _data(16), out_dir=str(tmp_path / "frozen"), batch_size=8, progress=False)
    else:
        tr.train(frozen, method, _data(16), out_dir=str(tmp_path / "frozen"), batch_size=8, max_steps=1,
                 progress=False)
        assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())


@pytest.mark.parametrize("method,overrides", [
    ("evit", dict(train_mode=True, drop_path=0.1, epochs=3, warmup_epochs=1, keep_rate_hold_epochs=1,
                  keep_rate_shrink_epochs=1)),
    ("dynamicvit", dict(epochs=3, warmup_epochs=1)),
])
def test_resume_after_an_interruption_gives_identical_parameters(tmp_path, method, overrides):
    # mixup/cutmix (NumPy's RNG), drop path / Gumbel noise (torch's), the EMA, the keep-rate warm-up
    kw = dict(recipe="paper", batch_size=8, epoch_steps=2, progress=False, checkpoint_every=100, **overrides)
    full = make_vit()
    out_full = tr.train(full, method, _data(), out_dir=str(tmp_path / "full"), **kw)
    cut = make_vit()
    first = tr.train(cut, method, _data(), out_dir=str(tmp_path / "cut"), max_steps=3, **kw)
    assert not first["complete"]
    resumed = make_vit()
    out = tr.train(resumed, method, _data(), out_dir=str(tmp_path / "cut"), resume=True, **kw)
    assert out["complete"] and out["result"].step == 6
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(cut.state_dict()["head.weight"], full.state_dict()["head.weight"])  # stopped early
    ema_full, ema_resumed = load_file(out_full["ema"]), load_file(out["ema"])
    assert all(torch.equal(ema_full[k], ema_resumed[k]) for k in ema_full)
    if tr.reducer(full).module is not None:
        for (name, a), b in zip(tr.reducer(full).module.state_dict().items(),
                                tr.reducer(resumed).module.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="recipe"):  # the recorded recipe must match
        tr.train(make_vit(), method, _data(), out_dir=str(tmp_path / "cut"), resume=True, **{**kw, "mixup": 0.5})


DDP_OVERRIDES = dict(mixup=0.0, cutmix=0.0, drop_path=0.0, optimizer="momentum", momentum=0.9, lr=0.05,
                     lr_batch=None, epochs=2, warmup_epochs=1)
"""A deterministic Cropr recipe (no per-process random draws), SGD so that the update is linear in the gradient."""


def ddp_run(out: str, batch_size: int) -> dict:
    """The run tests/ddp_recipe_script.py makes on each process, and the test on one."""
    model = make_vit()
    result = tr.train(model, "cropr", _data(), out_dir=out, recipe="cropr", batch_size=batch_size, p=4,
                      progress=False, **DDP_OVERRIDES)
    return {"model": model.state_dict(), "reducer": tr.reducer(model).module.state_dict(),
            "steps": result["result"].step}


def test_two_process_gloo_run_matches_one_process_on_the_same_global_batch(tmp_path):
    script = Path(__file__).with_name("ddp_recipe_script.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent)}
    proc = subprocess.run([*cmd, str(script), str(tmp_path / "ddp")], capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "ddp" / "rank0.pt"), torch.load(tmp_path / "ddp" / "rank1.pt")
    one = ddp_run(str(tmp_path / "one"), batch_size=8)  # 2 processes x 4 images = 8 per step
    assert r0["steps"] == r1["steps"] == one["steps"] == 8
    initial = make_vit().state_dict()
    for part in ("model", "reducer"):
        for name, value in r0[part].items():
            assert torch.equal(value, r1[part][name]), name
            torch.testing.assert_close(value, one[part][name], rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(r0["model"]["head.weight"], initial["head.weight"])
    extra = read_reducer(tmp_path / "ddp" / "reducer.safetensors")[0]["extra"]
    assert extra["recipe"]["batch_size"] == 8 and extra["recipe"]["optimizer"] == "momentum"


# -- the command line ------------------------------------------------------------------------------


def _idx_folder(root: Path, n: int = 32) -> Path:
    """A Fashion-MNIST-shaped folder of gzipped idx files with ``n`` random training images."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 255, (n, 28, 28), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, n, dtype=np.uint8))
    write_fashion_mnist(root, "train", images, labels)
    return root


def test_train_command_with_a_recipe_writes_what_evaluate_loads(tmp_path, capsys):
    from tokenreduce.cli import main

    data = _idx_folder(tmp_path / "fmnist")
    out = tmp_path / "run"
    args = ["train", "--method", "tome", "--recipe", "paper", "--budget", "0.6", "--data-dir", str(data), "--out",
            str(out), "-b", "8", "--epoch-steps", "1", "--set", "epochs=2", "--warmup-epochs", "1", "--layer-decay",
            "0.5", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "recipe tome: 2 epochs at batch 8" in printed.err
    meta = read_reducer(out / "reducer.safetensors")[0]
    assert meta["method"] == "tome" and meta["extra"]["complete"]
    recipe = meta["extra"]["recipe"]
    assert (recipe["name"], recipe["epochs"], recipe["warmup_epochs"], recipe["layer_decay"]) == ("tome", 2, 1.0, 0.5)
    assert "evaluate with: tokenreduce evaluate --checkpoint" in printed.out
    result = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(out / "model.safetensors"), "--method", "tome", "--param",
                 f"checkpoint={out / 'reducer.safetensors'}", "--limit", "20", "--repeats", "1", "--json", str(result),
                 "--no-progress"]) == 0
    rows = json.loads(result.read_text())["rows"]
    assert "reducer.safetensors" in rows[1]["label"] and rows[1]["gmacs"] < 0.65 * rows[0]["gmacs"]
    base = ["train", "--method", "tome", "--data-dir", str(data), "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "x"), "--set", "lr=1"]) == 2  # a recipe value without --recipe
    assert "need --recipe" in capsys.readouterr().err
    assert main(base + ["--recipe", "paper", "--out", str(tmp_path / "y"), "--set", "bogus=1"]) == 2
    assert "unknown recipe value" in capsys.readouterr().err


def test_a_recipe_the_method_cannot_use_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="keep-rate warm-up needs a method with a keep rate"):
        tr.train(make_vit(), "tome", _data(), out_dir=str(tmp_path), recipe="evit", batch_size=8)
    with pytest.raises(ValueError, match="eval mode"):
        tr.train(make_vit(), "cropr", _data(), out_dir=str(tmp_path), recipe="deit", batch_size=8)
    with pytest.raises(ValueError, match="ratio_weight weighs a loss term of dtps, dynamicvit, ltmp only"):
        tr.train(make_vit(), "tome", _data(), out_dir=str(tmp_path), recipe="deit", ratio_weight=1.0, batch_size=8)
    assert isinstance(get_recipe("deit"), Recipe)
