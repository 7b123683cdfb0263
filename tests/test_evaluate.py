"""``tokenreduce evaluate``: every method on the reference model, the ImageFolder path, torchrun, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import free_port
from PIL import Image

import tokenreduce as tr
from tokenreduce.cli import main
from tokenreduce.eval.accuracy import Config, evaluate_reference, reference_checkpoint, shard_indices
from tokenreduce.eval.imagefolder import evaluate_imagefolder, subset_indices
from tokenreduce.models.reference import PAD, load_reference_model, load_reference_testset, preprocess

PER_CLASS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder built at test time: 3 bundled test images per class as 32×32 PNGs (already zero-padded,
    so timm's pipeline sees exactly the reference framing), one extra image (31: an odd count), one broken file."""
    root = tmp_path_factory.mktemp("imagefolder")
    images, labels = load_reference_testset(limit=300)
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    written = {c: 0 for c in range(10)}
    for i, (img, label) in enumerate(zip(padded, labels.tolist(), strict=True)):
        extra = label == 3 and written[3] == PER_CLASS  # one class gets a 4th image
        if written[label] < PER_CLASS or extra:
            (root / str(label)).mkdir(exist_ok=True)
            Image.fromarray(img.numpy(), mode="L").save(root / str(label) / f"{i:04d}.png")
            written[label] += 1
    (root / "0" / "broken.png").write_bytes(b"this is not a png")
    return root


def folder_tensors(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable images of ``root`` (uint8 N×32×32, cropped back to 28×28 for preprocess) and labels."""
    xs, ys = [], []
    for path in sorted(root.glob("*/*.png")):
        if path.name == "broken.png":
            continue
        arr = torch.from_numpy(__import__("numpy").array(Image.open(path)))
        xs.append(arr[PAD:-PAD, PAD:-PAD])
        ys.append(int(path.parent.name))
    return torch.stack(xs), torch.tensor(ys)


def test_default_run_every_method_with_analytic_gmacs(tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["evaluate", "--limit", "40", "--batch-size", "20", "--repeats", "1", "--no-progress", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {r["label"]: r for r in result["rows"]}
    model = load_reference_model()
    assert rows["unreduced"]["gmacs"] == pytest.approx(tr.gmacs(model)) and rows["unreduced"]["speedup"] == 1.0
    # the paper defaults are set for 196 patches: on the 64-patch reference model only the budget rows show
    assert not any("(default)" in label for label in rows)
    learned = {"cropr", "dtps", "dynamicvit"}
    for name in tr.methods():
        if name == "tomesd":  # dense prediction only (its merged branches keep a grid a classifier ignores)
            assert not any(label.startswith("tomesd") for label in rows)
            continue
        if name == "ltmp":
            labels = ("ltmp (target 0.75) [ltmp_0.75]", "ltmp (target 0.6) [ltmp_0.6]")
        else:
            labels = tuple(f"{name}@{b}" + (f" [{name}]" if name in learned else "") for b in ("0.75", "0.6"))
        for label in labels:
            row = rows[label]
            assert label in printed
            assert "skipped" not in row, (label, row.get("skipped"))  # learned methods run from shipped reducers
            assert row["samples"] == 40 and 0 <= row["top1"] <= row["top5"] <= 1
            assert row["delta_top1"] == pytest.approx(row["top1"] - rows["unreduced"]["top1"])
            assert row["images_per_s"] > 0 and row["speedup"] > 0
            # one timed round: the median of the per-round ratios is that round's ratio
            assert row["speedup"] == pytest.approx(row["images_per_s"] / row["images_per_s_unreduced"])
            if name == "ltmp":  # data-dependent counts: measured GMACs only
                assert row["gmacs_analytic"] is None and 0 < row["gmacs"] < row["gmacs_unreduced"]
                continue
            params = {k: tuple(v) if isinstance(v, list) else v for k, v in row["params"].items()}
            analytic = tr.gmacs(model, name, **params)
            assert row["gmacs"] == pytest.approx(analytic, rel=1e-9), label
            assert row["gmacs_analytic"] == pytest.approx(analytic, rel=1e-9), label
            budget = float(label.split("@")[1].split()[0])
            assert row["gmacs"] <= budget * row["gmacs_unreduced"] + 1e-12


def test_method_flag_runs_learned_methods_from_the_shipped_reducers(tmp_path):
    out = tmp_path / "eval.json"
    args = ["evaluate", "--method", "ltmp", "dynamicvit", "--budget", "0.6", "--limit", "20", "--repeats", "1",
            "--no-progress", "--json", str(out)]
    assert main(args) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert "skipped" not in rows["ltmp"] and "skipped" not in rows["dynamicvit"]
    assert rows["ltmp"]["label"] == "ltmp@0.6 [ltmp_0.6]"  # the checkpoint trained for the closest target
    assert rows["dynamicvit"]["label"] == "dynamicvit@0.6 [dynamicvit]"


def test_seeds_flag_reports_a_seeded_method_over_seeds_with_intervals(tmp_path, capsys):
    from tokenreduce.eval.accuracy import wilson_interval

    out = tmp_path / "eval.json"
    args = ["evaluate", "--method", "random", "tome", "--budget", "0.6", "--limit", "40", "--batch-size", "20",
            "--repeats", "1", "--no-progress", "--json", str(out)]
    assert main([*args, "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    rows = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    seeded = rows["random@0.6"]
    assert seeded["seeds"] == [0, 1] and len(seeded["top1_per_seed"]) == 2
    assert seeded["top1"] == pytest.approx(sum(seeded["top1_per_seed"]) / 2)
    assert "seeds" not in rows["tome@0.6"] and "seeds" not in rows["unreduced"]
    for row in rows.values():
        assert row["top1_ci95"] == pytest.approx(list(wilson_interval(row["correct1"], 40)))
        assert row["top1_ci95"][0] <= row["top1"] <= row["top1_ci95"][1]
    assert "95% CI" in printed
    assert "±" in next(line for line in printed.splitlines() if line.startswith("random@0.6"))
    fixed_args = ["evaluate", "--method", "random", "--param", "seed=4", "--budget", "0.6", "--limit", "40",
                  "--repeats", "1", "--no-progress", "--json", str(tmp_path / "fixed.json")]
    assert main(fixed_args) == 0  # the seed fixed: run once
    fixed = {r["label"]: r for r in json.loads((tmp_path / "fixed.json").read_text())["rows"]}
    assert "seeds" not in fixed["random@0.6"] and fixed["random@0.6"]["params"]["seed"] == 4


def test_imagefolder_evaluation_runs_a_seeded_method_over_seeds(folder):
    result = evaluate_imagefolder("reference", folder, configs=[Config("random", budget=0.6)], seeds=2, repeats=1,
                                  progress=False)
    assert result["rows"][0]["seeds"] == [0, 1] and result["rows"][0]["samples"] == 31


def test_reference_checkpoint_choice():
    assert reference_checkpoint("ltmp", {}).endswith("ltmp_0.75.safetensors")
    assert reference_checkpoint("ltmp", {}, budget=0.55).endswith("ltmp_0.6.safetensors")
    assert reference_checkpoint("ltmp", {"target": 0.7}, budget=0.55).endswith("ltmp_0.75.safetensors")
    assert reference_checkpoint("tps", {"variant": "dtps"}).endswith("dtps.safetensors")
    assert reference_checkpoint("dtps", {}).endswith("dtps.safetensors")
    assert reference_checkpoint("tps", {}) is None and reference_checkpoint("tome", {}) is None


def test_imagefolder_through_timm_pipeline_matches_bundled_path(folder):
    result = evaluate_imagefolder(
        "reference", folder, configs=[Config(None), Config("evit", {"keep_rate": 0.5})], repeats=1, progress=False
    )
    assert result["samples"] == 10 * PER_CLASS + 1  # the 31 images scored, not the broken one
    assert len(result["skipped_images"]) == 1 and "broken.png" in result["skipped_images"][0]
    assert result["data_config"]["input_size"] == [1, 32, 32]
    x, y = folder_tensors(folder)
    model = load_reference_model()
    with torch.no_grad():
        logits = model(preprocess(x))
    base = result["rows"][0]
    assert base["samples"] == len(y) == 31
    assert base["correct1"] == int((logits.argmax(-1) == y).sum())
    assert base["correct5"] == int((logits.topk(5, -1).indices == y[:, None]).any(-1).sum())
    assert result["rows"][1]["gmacs"] == pytest.approx(tr.gmacs(model, "evit", keep_rate=0.5))


def test_limit_and_sharding_count_every_sample_once():
    chosen = subset_indices(1000, 37)
    assert len(chosen) == len(set(chosen)) == 37 and chosen == subset_indices(1000, 37)
    shards = [shard_indices(37, r, 4) for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(37))


def test_distributed_run_gives_the_same_counts(folder, tmp_path):
    args = ["evaluate", "--data", str(folder), "--method", "tome", "--param", "r=4", "--batch-size", "4"]
    args += ["--repeats", "1", "--no-progress"]
    single = tmp_path / "single.json"
    assert main(args + ["--json", str(single)]) == 0
    dist_json = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port()]
    cmd += ["-m", "tokenreduce.cli", *args, "--json", str(dist_json)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(dist_json.read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["skipped_images"] == one["skipped_images"] and len(one["skipped_images"]) == 1
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert (a["samples"], a["correct1"], a["correct5"]) == (b["samples"], b["correct1"], b["correct5"])
        assert a["samples"] == 31
        assert a["gmacs"] == pytest.approx(b["gmacs"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: root, "no images found"),
        (lambda root: _flat(root), "not in class sub-folders"),
        (lambda root: _classes(root, 3), "has 3 class folders but reference predicts 10"),
    ],
)
def test_bad_folders_fail_clearly(tmp_path, capsys, make, message):
    data = make(tmp_path)
    assert main(["evaluate", "--data", str(data), "--no-progress", "--json", ""]) == 2
    assert message in capsys.readouterr().err


def test_unknown_model_and_misuse_fail_clearly(folder, capsys):
    assert main(["evaluate", "--model", "vit_no_such_model", "--data", str(folder), "--json", ""]) == 2
    assert "unknown model 'vit_no_such_model'" in capsys.readouterr().err
    assert main(["evaluate", "--model", "deit_tiny_patch16_224", "--json", ""]) == 2
    assert "need --data" in capsys.readouterr().err
    assert main(["evaluate", "--method", "nope", "--limit", "5", "--json", "", "--no-progress"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    args = ["evaluate", "--method", "tome", "--param", "nope=1", "--limit", "5", "--json", "", "--no-progress"]
    assert main(args) == 2
    assert "tome: unknown parameter(s) nope" in capsys.readouterr().err


def _flat(root: Path) -> Path:
    Image.new("L", (32, 32)).save(root / "a.png")
    return root


def _classes(root: Path, n: int) -> Path:
    for c in range(n):
        (root / f"c{c}").mkdir()
        Image.new("L", (32, 32)).save(root / f"c{c}" / "a.png")
    return root


def test_finetuned_rows_run_with_their_own_weights_and_give_the_model_its_own_back(tmp_path, capsys):
    from safetensors.torch import save_file

    from tokenreduce.checkpoint import save_reducer
    from tokenreduce.eval.accuracy import finetuned_configs

    # a "fine-tuned" model whose head always answers class 3, with a ToMe reducer, in the layout the table
    # script writes (<name>/run/); a folder without the pair is ignored
    tuned = load_reference_model()
    with torch.no_grad():
        tuned.head.weight.zero_()
        tuned.head.bias.copy_(torch.arange(10.0) == 3)
    run = tmp_path / "tome" / "run"
    run.mkdir(parents=True)
    save_file(tuned.state_dict(), str(run / "model.safetensors"))
    save_reducer(tr.reducer(tr.apply(load_reference_model(), "tome", r=2)), run / "reducer.safetensors")
    (tmp_path / "empty").mkdir()
    configs = finetuned_configs(tmp_path)
    assert [(c.method, c.label, c.weights) for c in configs] == [
        ("tome", "tome fine-tuned [tome]", str(run / "model.safetensors"))]
    with pytest.raises(FileNotFoundError, match="not found"):
        finetuned_configs(tmp_path / "missing")

    out = tmp_path / "eval.json"
    args = ["evaluate", "--method", "tome", "--param", "r=2", "--finetuned", str(tmp_path), "--limit", "100",
            "--repeats", "1", "--no-progress", "--json", str(out)]
    assert main(args) == 0
    assert "tome fine-tuned [tome]" in capsys.readouterr().out
    rows = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    _, labels = load_reference_testset(100)
    assert rows["tome fine-tuned [tome]"]["top1"] == pytest.approx(float((labels == 3).float().mean()))
    assert rows["tome(r=2)"]["top1"] > 0.6
    assert rows["tome fine-tuned [tome]"]["params"] == {"r": 2, "prop_attn": True, "inflection": 0.0}

    # the model gets its own weights back: a row after the fine-tuned one, and the model itself after the run
    model = load_reference_model()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    after = evaluate_reference([Config(None), *configs, Config("tome", {"r": 2})], model=model, limit=100,
                               repeats=1, progress=False)
    assert after[1]["top1"] == rows["tome fine-tuned [tome]"]["top1"]
    assert after[2]["top1"] == rows["tome(r=2)"]["top1"]
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
