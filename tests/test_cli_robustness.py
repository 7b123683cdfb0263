"""The command line never loses a user's results and fails early, clearly and with exit status 2 (issue #18),
and reads the checkpoints timm reads (issue #17).  Each test reproduces one reported case in-process."""

from __future__ import annotations

import json
import os

import pytest
import torch

import tokenreduce.eval.accuracy as accuracy
from tokenreduce.cli import main
from tokenreduce.models.reference import load_reference_model

FAST = ["--limit", "50", "--repeats", "1", "--no-progress"]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if an evaluation starts (the command must stop before any work)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the evaluation started before the arguments were checked")

    monkeypatch.setattr(accuracy, "evaluate_reference", refuse)
    monkeypatch.setattr(accuracy, "evaluate_configs", refuse)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder (the default results paths are relative)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _earlier_results(folder):
    path = folder / "results" / "evaluate.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"earlier": "run"}')
    return path


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--method", "tome", "--param", "r=abc"], "'abc'"),
        (["--method", "tome", "--param", "bogus=1"], "bogus"),
        (["--method", "tome", "evit", "--param", "r=3"], "evit: unknown parameter(s) r"),
        (["--method", "tome", "--budget", "0.01"], "budget=0.01"),
        (["--method", "dynamicvit", "--param", "checkpoint=nope.safetensors"], "nope.safetensors"),
        (["--method", "nope"], "unknown method 'nope'"),
    ],
)
def test_bad_method_parameter_or_budget_stops_before_any_work(in_tmp, no_work, capsys, args, named):
    earlier = _earlier_results(in_tmp)
    assert main(["evaluate", *args, *FAST]) == 2
    err = capsys.readouterr().err
    assert named in err and "does not apply to this model" not in err
    assert earlier.read_text() == '{"earlier": "run"}'
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["evaluate.json"]


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", "--budget", "0"],  # used to print ten "skipped" rows and exit 0
        ["evaluate", "--method", "tome", "--budget", "1.5"],
        ["evaluate", "-b", "0"],
        ["evaluate", "--batch-size", "-4"],
        ["evaluate", "--limit", "0"],
        ["evaluate", "-j", "-1"],
        ["sweep", "--budgets", "0.6", "0"],
        ["benchmark", "-b", "8", "0"],
        ["train", "--method", "cropr", "--out", "x", "-b", "0"],
        ["evaluate", "--device", "no_such_device"],
    ],
)
def test_out_of_range_numbers_are_argument_errors(in_tmp, no_work, capsys, args):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: argument" in err
    assert not (in_tmp / "results").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        # a second budget lands in DATA_DIR: say so, instead of asking a learned method for a checkpoint
        (["evaluate", "--method", "ltmp", "--budget", "0.75", "0.6"], "data folder 0.6 does not exist (a number"),
        (["evaluate", "no_such_folder"], "data folder no_such_folder does not exist"),
        (["evaluate", "--data-dir", "no_such_folder"], "data folder no_such_folder does not exist"),
    ],
)
def test_a_missing_data_folder_is_named_before_any_work(in_tmp, no_work, capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "learned method" not in err
    assert not (in_tmp / "results").exists()


def test_a_failed_run_leaves_an_earlier_results_file_alone(in_tmp, monkeypatch, capsys):
    earlier = _earlier_results(in_tmp)
    real = accuracy.count_correct
    calls = []

    def fail_on_second(*args, **kwargs):  # the unreduced row finishes, then the run breaks
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(accuracy, "count_correct", fail_on_second)
    assert main(["evaluate", "--method", "tome", *FAST]) == 130
    assert earlier.read_text() == '{"earlier": "run"}'
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["evaluate.json"]  # no partial file either
    assert "no results file written" in capsys.readouterr().err


def test_an_existing_results_file_is_kept_unless_overwrite(in_tmp, capsys):
    earlier = _earlier_results(in_tmp)
    assert main(["evaluate", "--method", "tome", *FAST]) == 0
    out = capsys.readouterr().out
    assert "wrote results/evaluate-1.json (results/evaluate.json exists, kept; --overwrite replaces it)" in out
    assert earlier.read_text() == '{"earlier": "run"}'
    assert json.loads((in_tmp / "results/evaluate-1.json").read_text())["samples"] == 50
    assert main(["evaluate", "--method", "tome", *FAST]) == 0
    assert "wrote results/evaluate-2.json" in capsys.readouterr().out
    assert main(["evaluate", "--method", "tome", "--overwrite", *FAST]) == 0
    assert "wrote results/evaluate.json\n" in capsys.readouterr().out
    assert json.loads(earlier.read_text())["samples"] == 50
    assert not [p for p in earlier.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_benchmark_and_visualize_outputs_are_kept_too(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("L", (28, 28), 128).save(image)
    sheet = tmp_path / "tokens.png"
    sheet.write_bytes(b"earlier")
    assert main(["visualize", str(image), "--method", "tome", "--out", str(sheet)]) == 0
    assert sheet.read_bytes() == b"earlier" and (tmp_path / "tokens-1.png").is_file()
    assert "exists, kept" in capsys.readouterr().out
    assert main(["visualize", str(image), "--out", str(tmp_path / "tokens.txt")]) == 2
    assert "image extension" in capsys.readouterr().err

    bench = tmp_path / "bench.json"
    bench.write_text("[]")
    args = ["benchmark", "-m", "deit_tiny_patch16_224", "--img-size", "32", "-b", "1", "--repeats", "1",
            "--warmup", "0", "--no-progress", "--json", str(bench)]
    assert main(args) == 0
    assert bench.read_text() == "[]" and len(json.loads((tmp_path / "bench-1.json").read_text())) == 1


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_an_unwritable_output_is_refused_before_any_work(tmp_path, no_work, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("")
    target = blocker / "evaluate.json" if where == "under_a_file" else tmp_path
    assert main(["evaluate", "--method", "tome", "--json", str(target), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and str(target.parent if where == "under_a_file" else target) in err
    assert main(["sweep", "--methods", "tome", "--out", str(blocker / "sweep"), *FAST]) == 2
    assert "cannot write there" in capsys.readouterr().err


# -- checkpoints, as timm reads them -------------------------------------------------------------------


def _reference_state():
    return load_reference_model().state_dict()


def _top1(path):
    return json.loads(path.read_text())["rows"][0]["top1"]


def test_checkpoint_pth_tar_with_module_prefixes_loads(tmp_path):
    ckpt = tmp_path / "model.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in _reference_state().items()}}, ckpt)
    base, loaded = tmp_path / "base.json", tmp_path / "loaded.json"
    assert main(["evaluate", "--method", "tome", *FAST, "--json", str(base)]) == 0
    assert main(["evaluate", "--method", "tome", "--checkpoint", str(ckpt), *FAST, "--json", str(loaded)]) == 0
    assert _top1(loaded) == _top1(base) > 0.5


def test_checkpoint_ema_weights_with_use_ema(tmp_path, capsys):
    good = _reference_state()
    bad = {k: torch.zeros_like(v) if k.startswith("head") else v for k, v in good.items()}  # every logit 0
    ckpt = tmp_path / "train.pth.tar"
    torch.save({"state_dict": bad, "state_dict_ema": good}, ckpt)
    ema, plain = tmp_path / "ema.json", tmp_path / "plain.json"
    args = ["evaluate", "--method", "tome", "--checkpoint", str(ckpt), *FAST]
    assert main([*args, "--use-ema", "--json", str(ema)]) == 0
    assert main([*args, "--json", str(plain)]) == 0
    assert _top1(ema) > 0.5 > _top1(plain)
    ema_only = tmp_path / "ema_only.pth"
    torch.save({"epoch": 1, "state_dict_ema": good}, ema_only)
    assert main(["evaluate", "--checkpoint", str(ema_only), *FAST, "--json", ""]) == 2
    assert "--use-ema" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["garbage.safetensors", "garbage.pth", "garbage.pth.tar"])
def test_a_file_that_is_not_a_checkpoint_is_a_clean_error(tmp_path, no_work, capsys, name):
    path = tmp_path / name
    path.write_bytes(os.urandom(64) + b"not a checkpoint" * 8)
    assert main(["evaluate", "--method", "tome", "--checkpoint", str(path), *FAST, "--json", ""]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is not a model checkpoint") and "Traceback" not in err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pth"), *FAST, "--json", ""]) == 2
    assert "not found" in capsys.readouterr().err


def test_checkpoint_of_another_model_names_the_mismatch(tmp_path, no_work, capsys):
    path = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(3, 64), "extra": torch.zeros(1)}, str(path))
    assert main(["evaluate", "--checkpoint", str(path), *FAST, "--json", ""]) == 2
    err = capsys.readouterr().err
    assert "do not fit reference" in err and "missing" in err and "unexpected (extra)" in err
    assert "head.weight (3, 64) vs (10, 64)" in err


def test_model_kwargs_the_model_does_not_take_are_a_clean_error(capsys):
    assert main(["benchmark", "-m", "deit_tiny_patch16_224", "--model-kwargs", "no_such_arg=1", "-b", "1"]) == 2
    assert "no_such_arg" in capsys.readouterr().err


# -- train ---------------------------------------------------------------------------------------------


def test_train_without_fashion_mnist_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tokenreduce.training.reference.DEFAULT_DATA", str(tmp_path / "no_such_folder"))
    run = ["train", "--method", "cropr", "--param", "p=4", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(run) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "--data-dir" in err
    assert main([*run, "--data-dir", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


class WorkerRecordingImages(torch.utils.data.Dataset):
    """Fashion-MNIST-like samples that note which process loaded them (a file per worker)."""

    def __init__(self, folder, n=16):
        self.folder, self.n = folder, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        (self.folder / f"{os.getpid()}-{info.id if info else 'main'}").touch()
        return torch.full((28, 28), i * 8, dtype=torch.uint8), i % 10


def test_train_uses_the_loader_workers(tmp_path, monkeypatch):
    import tokenreduce.cli.commands as commands
    from tokenreduce.models.reference import preprocess

    seen = tmp_path / "loaded_by"
    seen.mkdir()
    monkeypatch.setattr(commands, "training_data", lambda *a: (WorkerRecordingImages(seen), preprocess))
    args = ["train", "--method", "cropr", "--param", "p=4", "--out", str(tmp_path / "run"), "-b", "4",
            "--max-steps", "2", "--no-progress", "-j", "2"]
    assert main(args) == 0
    loaders = {name.name for name in seen.iterdir()}
    assert {name.split("-")[1] for name in loaders} == {"0", "1"}  # two workers ...
    assert str(os.getpid()) not in {name.split("-")[0] for name in loaders}  # ... in other processes
    assert (tmp_path / "run" / "reducer.safetensors").is_file()


def test_train_does_not_reuse_another_runs_folder_silently(tmp_path, monkeypatch, capsys):
    import tokenreduce.cli.commands as commands
    from tokenreduce.models.reference import preprocess

    (tmp_path / "seen").mkdir()
    monkeypatch.setattr(commands, "training_data", lambda *a: (WorkerRecordingImages(tmp_path / "seen"), preprocess))
    run = tmp_path / "run"
    args = ["train", "--method", "cropr", "--param", "p=4", "--out", str(run), "-b", "4", "--max-steps", "1",
            "--no-progress"]
    assert main(args) == 0
    log = (run / "metrics.jsonl").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds another run (checkpoint.pt): --resume continues it, --overwrite starts over" in err
    assert (run / "metrics.jsonl").read_text() == log
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert main([*args, "--overwrite"]) == 0
    assert (run / "metrics.jsonl").read_text().count('"event": "start"') == 1  # a fresh log
    # a folder holding only a trained reducer is another run as well
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (run / name).unlink()
    reducer_bytes = (run / "reducer.safetensors").read_bytes()
    assert main(args) == 2
    assert "holds another run (reducer.safetensors)" in capsys.readouterr().err
    assert (run / "reducer.safetensors").read_bytes() == reducer_bytes
