"""``scripts/finetune_table.py`` end to end on a few real items: probe, plan, fine-tune, table; a rerun resumes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import write_fashion_mnist

from tokenreduce.methods import get_method
from tokenreduce.models.reference import load_reference_testset
from tokenreduce.training.recipes import resolve_recipe

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "finetune_table.py"


def load_script():
    spec = importlib.util.spec_from_file_location("finetune_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_table_plans_within_its_budget_and_a_rerun_reuses_the_result(tmp_path, capsys):
    images, labels = load_reference_testset(limit=256)
    data = tmp_path / "fashion"
    data.mkdir()
    write_fashion_mnist(data, "train", images, labels)
    out = tmp_path / "table"
    argv = ["--methods", "tome", "--minutes-per-method", "0.1", "--limit", "64", "--batch-size", "16",
            "--data-dir", str(data), "--out", str(out), "--no-progress", "--threads", "2", "--set", "mixup=0.0",
            "--set", "lr=1e-3"]
    script = load_script()
    assert script.main(argv) == 0
    table = json.loads((out / "finetune_table.json").read_text())
    (row,) = table["rows"]
    recipe = resolve_recipe("paper", get_method("tome").resolve({})[0])
    plan = row["plan"]
    assert plan["batch_size"] <= 16 and plan["epochs"] == recipe.epochs
    assert row["steps"] == plan["epochs"] * plan["epoch_steps"]  # every epoch of the recipe ran, shortened
    assert row["recipe"]["mixup"] == 0.0 and row["recipe"]["lr"] == 1e-3 != recipe.lr  # --set reaches the run
    assert row["samples"] == 64 and 0.0 <= row["finetuned_top1"] <= 1.0
    assert row["gmacs"] <= 0.6 * row["gmacs_unreduced"] * (1 + 1e-9)
    assert Path(row["model"]).is_file() and Path(row["reducer"]).is_file()
    printed = capsys.readouterr().out
    assert "tome" in printed and f"{100 * row['finetuned_top1']:.2f}%" in printed
    assert script.main(argv) == 0  # done earlier: read back, not trained again
    assert json.loads((out / "finetune_table.json").read_text())["rows"] == [row]
    assert "done earlier" in capsys.readouterr().err

    # a control: the unreduced model (budget 1) under the same recipe, with the earlier run's steps, no probe
    control = tmp_path / "control"
    control_argv = [*argv[:argv.index("--out")], "--out", str(control), "--budget", "1", "--plan-from", str(out)]
    assert script.main(control_argv) == 0
    (same,) = json.loads((control / "finetune_table.json").read_text())["rows"]
    assert same["plan"] == plan and same["steps"] == row["steps"]
    assert same["gmacs"] == same["gmacs_unreduced"] and not (control / "tome" / "probe").exists()
    missing = [*argv[:argv.index("--out")], "--out", str(tmp_path / "c2"), "--plan-from", str(tmp_path / "nowhere")]
    with pytest.raises(SystemExit, match="plan.json not found"):
        script.main(missing)


def test_fixed_epoch_steps_plan_without_a_probe(tmp_path):
    images, labels = load_reference_testset(limit=128)
    data = tmp_path / "fashion"
    data.mkdir()
    write_fashion_mnist(data, "train", images, labels)
    out = tmp_path / "fixed"
    common = ["--methods", "random", "--limit", "32", "--batch-size", "8", "--data-dir", str(data), "--no-progress",
              "--threads", "2", "--set", "mixup=0.0", "--set", "epochs=2", "--set", "warmup_epochs=0"]
    script = load_script()
    assert script.main([*common, "--epoch-steps", "3", "--out", str(out)]) == 0
    (row,) = json.loads((out / "finetune_table.json").read_text())["rows"]
    assert row["plan"]["epoch_steps"] == 3 and row["plan"]["batch_size"] == 8 and row["plan"]["epochs"] == 2
    assert row["steps"] == 6 and not (out / "random" / "probe").exists()
    with pytest.raises(SystemExit, match="more than the 128 training images"):
        script.main([*common, "--epoch-steps", "17", "--out", str(tmp_path / "too_many")])
    with pytest.raises(SystemExit, match="only one of --plan-from and --epoch-steps"):
        script.main([*common, "--epoch-steps", "3", "--plan-from", str(out), "--out", str(tmp_path / "both")])
    with pytest.raises(SystemExit, match="only one of --epoch-steps and --total-steps"):
        script.main([*common, "--epoch-steps", "3", "--total-steps", "6", "--out", str(tmp_path / "both2")])
    with pytest.raises(SystemExit, match="no step each"):
        script.main([*common, "--total-steps", "1", "--out", str(tmp_path / "too_few")])


@pytest.mark.parametrize(("method", "batch"), [("evit", 128), ("tps", 128), ("dynamicvit", 64), ("cropr", 128)])
def test_peak_lr_gives_every_parameter_one_peak_rate_at_the_runs_batch(method, batch):
    """--peak-lr sets the recipe's rate so that, scaled to the run's batch, it is the peak given, for recipes that scale
    per 512 (EViT), per 1024 (eTPS), not at all (DynamicViT) or per 256 (Cropr); the backbone then trains at it too."""
    script = load_script()
    args = script.build_parser().parse_args(["--methods", method, "--batch-size", str(batch), "--peak-lr", "5e-4",
                                             "--no-mixing", "--set", "cutmix=0.5"])
    overrides = script.recipe_overrides(method, args)
    recipe = resolve_recipe("paper", get_method(method).resolve({})[0], overrides)
    assert recipe.peak_lr(batch) == pytest.approx(5e-4, rel=1e-12)
    assert recipe.backbone_lr_scale == 1.0  # (DynamicViT's recipe trains its backbone at 0.01)
    assert (recipe.mixup, recipe.label_smoothing, recipe.cutmix) == (0.0, 0.0, 0.5)  # an explicit --set wins
    # at another batch (a probe's, a one-step-per-epoch plan's) the rate follows that batch
    assert resolve_recipe("paper", get_method(method).resolve({})[0], script.recipe_overrides(method, args, 32)
                          ).peak_lr(32) == pytest.approx(5e-4, rel=1e-12)
    with pytest.raises(SystemExit, match="drop --set lr"):
        script.main(["--methods", method, "--peak-lr", "5e-4", "--set", "lr=1e-3"])


def test_total_steps_give_recipes_of_different_lengths_the_same_steps(tmp_path):
    """--total-steps: 30-epoch and 50-epoch recipes train the same steps (total // epochs per epoch)."""
    images, labels = load_reference_testset(limit=64)
    data = tmp_path / "fashion"
    data.mkdir()
    write_fashion_mnist(data, "train", images, labels)
    script = load_script()
    args = script.build_parser().parse_args(["--methods", "evit", "cropr", "--batch-size", "4", "--total-steps", "150",
                                             "--out", str(tmp_path)])
    dataset = script.TensorDataset(*script.load_fashion_mnist(str(data), "train"))
    plans = {}
    for method in ("evit", "cropr"):
        (tmp_path / method).mkdir()
        plans[method] = script.plan_run(method, tmp_path / method, dataset, {}, args)
    assert (plans["evit"]["epochs"], plans["evit"]["epoch_steps"]) == (30, 5)
    assert (plans["cropr"]["epochs"], plans["cropr"]["epoch_steps"]) == (50, 3)
    assert not (tmp_path / "evit" / "probe").exists()
