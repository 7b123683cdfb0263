"""The command line: parameter parsing and the benchmark command end to end (tiny model)."""

from __future__ import annotations

import argparse
import json

import pytest

import tokenreduce as tr
from tokenreduce.cli import load_model, main, parse_param


def test_parse_param_literals():
    assert parse_param("r=13") == ("r", 13)
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
    # r=3 is a ToMe parameter: EViT must refuse it with a clear message
    assert main(args) == 2
    assert "unknown parameter" in capsys.readouterr().err
    assert main(args[:7] + args[8:]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    row = rows[0]
    model = load_model("deit_tiny_patch16_224", False, img_size=64)
    assert row["gmacs_reduced"] == pytest.approx(tr.gmacs(model, "tome", r=3))
    assert row["gmacs_unreduced"] == pytest.approx(tr.gmacs(model))
    assert row["speedup"] == pytest.approx(row["images_per_s_reduced"] / row["images_per_s_unreduced"])
    assert len(row["timings"]["reduced"]["seconds"]) == 3
    assert "speed-up" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="Unknown model"):
        load_model("no_such_vit", False)
