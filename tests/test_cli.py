"""The command line: parameter parsing and the benchmark command end to end (tiny model)."""

from __future__ import annotations

import argparse
import json

import pytest

import tokenreduce as tr
from tokenreduce.checkpoint import read_reducer
from tokenreduce.cli import build_parser, load_model, main, parse_param


def test_parse_param_literals():
    assert parse_param("r=13") == ("r", 13)
    assert parse_param("prop_attn=false") == ("prop_attn", False) and parse_param("llf=TRUE") == ("llf", True)
    assert parse_param("seed=none") == ("seed", None) and parse_param("name=falsey") == ("name", "falsey")
    assert parse_param("layers=3,6,9") == ("layers", (3, 6, 9))
    assert parse_param("layers=[3,6]") == ("layers", (3, 6))
    assert parse_param("r=(8,-0.5)") == ("r", (8, -0.5))
    assert parse_param("fuse_token=False") == ("fuse_token", False)
    assert parse_param("variant=etps") == ("variant", "etps")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_param("r")


def test_benchmark_writes_consistent_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["benchmark", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--method", "tome", "evit"]
    args += ["--param", "r=3", "--batch-size", "2", "--repeats", "3", "--warmup", "0", "--json", str(out)]
    args += ["--dtype", "fp32", "bf16"]  # the deprecated spelling of --amp: both precisions in one run
    # r=3 is a ToMe parameter: EViT must refuse it with a clear message, before any timing
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "evit: unknown parameter(s) r" in err and "--dtype is deprecated" in err
    assert not out.exists()
    assert main(args[:7] + args[8:]) == 0
    rows = json.loads(out.read_text())
    assert [(r["dtype"], r["batch_size"]) for r in rows] == [("fp32", 2), ("bf16", 2)]
    row = rows[0]
    assert row["latency_ms_reduced"]["p50"] <= row["latency_ms_reduced"]["p90"]
    assert row["threads"] >= 1
    model = load_model("deit_tiny_patch16_224", img_size=64)
    assert row["gmacs_reduced"] == pytest.approx(tr.gmacs(model, "tome", r=3))
    assert row["gmacs_unreduced"] == pytest.approx(tr.gmacs(model))
    assert row["speedup"] == pytest.approx(row["images_per_s_reduced"] / row["images_per_s_unreduced"])
    assert len(row["timings"]["reduced"]["seconds"]) == 3
    assert "speed-up" in capsys.readouterr().out


def test_benchmark_compile_flag_reaches_the_timing_and_lifts_dynamo_limits(monkeypatch, capsys):
    import torch

    import tokenreduce.eval.throughput as throughput

    limit = throughput.RECOMPILE_LIMIT
    name = limit if hasattr(torch._dynamo.config, limit) else "cache_size_limit"  # torch < 2.6 name
    seen = []

    def fake_compare(model, method, params, **kwargs):
        seen.append(kwargs["compile"])
        raise ValueError("stop here")  # the command reports it and exits 2

    monkeypatch.setattr(throughput, "compare_throughput", fake_compare)
    base = ["benchmark", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--batch-size", "1", "--dtype", "fp32"]
    # config.patch puts dynamo's process-wide settings back afterwards, whatever the command set
    before = (getattr(torch._dynamo.config, name), torch._dynamo.config.automatic_dynamic_shapes)
    with torch._dynamo.config.patch({name: 8, "automatic_dynamic_shapes": True}):
        assert main(base) == 2
        assert getattr(torch._dynamo.config, name) == 8  # untouched without --compile
        assert main(base + ["--compile"]) == 2
        assert seen == [False, True]
        assert getattr(torch._dynamo.config, name) >= 1024
        assert torch._dynamo.config.automatic_dynamic_shapes is False
    # as before the test (an earlier test in the process may have lifted the limit already)
    assert (getattr(torch._dynamo.config, name), torch._dynamo.config.automatic_dynamic_shapes) == before
    assert "stop here" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match="unknown model 'no_such_vit'"):
        load_model("no_such_vit")
    assert main(["benchmark", "--model", "no_such_vit", "--batch-size", "1"]) == 2
    assert "unknown model 'no_such_vit'" in capsys.readouterr().err


def test_version_and_help(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tokenreduce {version('tokenreduce')}"
    assert main(["evaluate", "--help"]) == 0
    text = capsys.readouterr().out
    assert "results/evaluate.json" in text and "--data-dir" in text and "-j N, --workers N" in text
    assert main(["train-reference", "--help"]) == 2  # a maintainer's script now: scripts/train_reference.py


def test_the_process_group_is_torn_down_after_every_command(monkeypatch, tmp_path):
    """A gloo group left alive at exit can abort a torchrun rank; main destroys it, waiting only on success."""
    import torch.distributed as dist

    import tokenreduce.cli as cli
    import tokenreduce.distributed as distributed

    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    waits: list[bool] = []
    real_shutdown = distributed.shutdown_distributed

    def record(wait: bool = False) -> None:
        waits.append(wait)
        real_shutdown(wait)

    monkeypatch.setattr(distributed, "shutdown_distributed", record)
    monkeypatch.setattr(cli, "cmd_benchmark", lambda args: 0)
    assert main(["benchmark", "-m", "deit_tiny_patch16_224"]) == 0
    assert waits == [True] and not dist.is_initialized()

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store2"), 1), rank=0, world_size=1)
    monkeypatch.setattr(cli, "cmd_evaluate", lambda args: (_ for _ in ()).throw(ValueError("stop here")))
    assert main(["evaluate", "--method", "tome"]) == 2  # an error: no barrier a failed peer could hang on
    assert waits == [True, False] and not dist.is_initialized()
    distributed.shutdown_distributed()  # a no-op without a group


def test_timm_flag_names_reach_the_commands(monkeypatch, tmp_path):
    """--data-dir / DATA_DIR, -b, -j, --amp, --device, --model-kwargs, --torchcompile and the old spellings."""
    import tokenreduce.cli.commands as commands
    import tokenreduce.eval.throughput as throughput

    seen: dict[str, dict] = {}

    def fake(name):
        def record(*args, **kwargs):
            seen[name] = kwargs
            raise ValueError("stop here")
        return record

    monkeypatch.setattr(throughput, "compare_throughput", fake("bench"))
    monkeypatch.setattr("tokenreduce.training.learned.train_reducer", fake("train"))
    monkeypatch.setattr(commands, "training_data", lambda *a: (None, None))
    bench = ["benchmark", "-m", "deit_tiny_patch16_224", "--img-size", "64", "-b", "3", "--device", "cpu"]
    assert main(bench + ["--amp", "--torchcompile"]) == 2
    assert seen["bench"]["dtype"] == "bf16" and seen["bench"]["compile"] is True
    assert seen["bench"]["batch_size"] == 3 and seen["bench"]["device"] == "cpu"
    assert main(bench + ["--amp", "--amp-dtype", "float16"]) == 2 and seen["bench"]["dtype"] == "fp16"
    assert main(bench) == 2 and seen["bench"]["dtype"] == "fp32" and seen["bench"]["compile"] is False
    assert main(bench + ["--dtype", "bf16"]) == 2 and seen["bench"]["dtype"] == "bf16"  # deprecated spelling

    train = ["train", "--method", "cropr", "--out", "unused", "-m", "deit_tiny_patch16_224", "--data-dir", "d"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()  # the data folder must exist (its contents are not read here)
    assert main(train + ["-j", "3", "-b", "4", "--amp"]) == 2
    assert (seen["train"]["workers"], seen["train"]["batch_size"], seen["train"]["amp"]) == (3, 4, True)
    assert main(train + ["--no-amp"]) == 2 and seen["train"]["amp"] is False
    assert main(train) == 2 and seen["train"]["amp"] is None  # auto: bf16 on a GPU, fp32 on a CPU
    assert main(train + ["--precision", "bf16"]) == 2 and seen["train"]["amp"] is True  # deprecated spelling
    assert main(train + ["--amp", "--amp-dtype", "float16"]) == 2  # bf16 only (no loss scaling)

    model = load_model("deit_tiny_patch16_224", img_size=64, model_kwargs={"drop_path_rate": 0.1})
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1) and model.pretrained_cfg["input_size"][1] == 64
    args = build_parser().parse_args(["evaluate", "/some/dir", "--model-kwargs", "drop_rate=0.2", "class_token=True"])
    assert args.data == "/some/dir" and args.model_kwargs == [("drop_rate", 0.2), ("class_token", True)]


def _image_folder(root, classes=2, per_class=3, size=64, split=None):
    import numpy as np
    from PIL import Image

    base = root / split if split else root
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = base / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_visualize_command_writes_one_panel_per_stage(tmp_path):
    from PIL import Image

    img_path = tmp_path / "in.png"
    Image.new("RGB", (300, 200), "orange").save(img_path)
    out = tmp_path / "tokens.png"
    assert main(["visualize", str(img_path), "--model", "deit_tiny_patch16_224", "--method", "evit",
                 "--out", str(out)]) == 0
    with Image.open(out) as sheet:
        assert sheet.size == (4 * 224 + 3 * 4, 224 + 14)  # input + blocks 3, 6, 9


def test_train_command_on_an_image_folder(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", split="train", size=32)
    out = tmp_path / "run"
    args = ["train", "--method", "cropr", "--param", "p=2", "--model", "deit_tiny_patch16_224", "--data", str(data),
            "--out", str(out), "--batch-size", "2", "--max-steps", "2", "--no-progress"]
    assert main(args) == 0
    assert (out / "reducer.safetensors").exists()
    assert "2/3 steps" in capsys.readouterr().out
    assert main(args[:3] + ["--model", "deit_tiny_patch16_224", "--out", str(out)]) == 2  # --model without --data
    bf16_out = tmp_path / "run_bf16"
    assert main(args[:-6] + [str(bf16_out), "--batch-size", "2", "--max-steps", "1", "--no-progress",
                             "--amp"]) == 0
    assert read_reducer(bf16_out / "reducer.safetensors")[0]["extra"]["precision"] == "bf16 autocast (fp32 weights)"
    assert read_reducer(out / "reducer.safetensors")[0]["extra"]["precision"] == "fp32"  # auto on a CPU
    dtps_out = tmp_path / "run_dtps"
    assert main(["train", "--method", "tps", "--param", "variant=dtps", "--model", "deit_tiny_patch16_224", "--data",
                 str(data), "--out", str(dtps_out), "--batch-size", "2", "--max-steps", "1", "--no-progress",
                 "--distill-weight", "0"]) == 0
    assert read_reducer(dtps_out / "reducer.safetensors")[0]["extra"]["distill_weight"] == 0.0


def test_sweep_command_on_an_image_folder(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", classes=10, per_class=1, size=28)
    out = tmp_path / "sweep"
    args = ["sweep", str(data), "--methods", "tome", "--budgets", "1.0", "0.6", "--model", "reference",
            "--repeats", "1", "--out", str(out), "--no-progress", "-j", "1", "-b", "4"]
    assert main(args) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["label"] for r in rows] == ["unreduced", "tome@1", "tome@0.6"]
    assert all(r["samples"] == 10 for r in rows)
    assert (out / "top1_vs_gmacs.png").exists()
    bad = ["sweep", "--model", "deit_tiny_patch16_224", "--data", str(data), "--out", str(tmp_path / "x")]
    assert main(bad) == 2 and "class folders" in capsys.readouterr().err
