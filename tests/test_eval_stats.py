"""Honest comparisons: Wilson intervals by hand, seeded methods over several seeds, the table and the sweep files."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from conftest import make_vit

from tokenreduce.eval import accuracy
from tokenreduce.eval.accuracy import Config, evaluate_configs, format_table, seed_list, wilson_interval
from tokenreduce.eval.sweep import run_sweep, sweep_configs

Z = 1.959964
Z2 = Z * Z  # 3.8414588...


# -- the Wilson score interval, worked by hand ------------------------------------------------------------


def score_test_roots(correct: float, n: int) -> tuple[float, float]:
    """An independent derivation: the Wilson interval is the set of p the score test accepts,
    (p − p̂)² = z²·p(1 − p)/n, a quadratic a·p² + b·p + c = 0 in p."""
    p_hat = correct / n
    a, b, c = 1 + Z2 / n, -(2 * p_hat + Z2 / n), p_hat * p_hat
    d = math.sqrt(b * b - 4 * a * c)
    return (-b - d) / (2 * a), (-b + d) / (2 * a)


def test_wilson_zero_of_ten():
    # p = 0, n = 10: z²/n = 0.38414588; centre = (z²/2n) / (1 + z²/n) = 0.19207294 / 1.38414588 = 0.13876;
    # half = z / 1.38414588 · sqrt(z²/4n²) = (z / 1.38414588) · (z / 20) = the centre: [0, 0.27753]
    centre = (Z2 / 20) / (1 + Z2 / 10)
    assert centre == pytest.approx(0.138767, abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 2 * centre), abs=1e-12)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)


def test_wilson_ten_of_ten_mirrors_zero_of_ten():
    assert wilson_interval(10, 10) == pytest.approx((1 - 0.27753, 1.0), abs=1e-5)


def test_wilson_five_of_ten():
    # p = 0.5: centre 0.5; half = (z / 1.38414588) · sqrt(0.25/10 + 3.8414588/400)
    #                            = 1.4159996 · sqrt(0.025 + 0.00960365) = 1.4159996 · 0.1860206 = 0.263407
    half = Z / (1 + Z2 / 10) * math.sqrt(0.25 / 10 + Z2 / 400)
    assert half == pytest.approx(0.263407, abs=1e-6)
    assert wilson_interval(5, 10) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)


def test_wilson_ninety_of_hundred():
    # p = 0.9, n = 100: z²/n = 0.038414588; centre = (0.9 + 0.019207294) / 1.038414588 = 0.885203;
    # half = (z / 1.038414588) · sqrt(0.09/100 + 3.8414588/40000) = 1.887459 · 0.0315601 = 0.059568
    centre = (0.9 + Z2 / 200) / (1 + Z2 / 100)
    half = Z / (1 + Z2 / 100) * math.sqrt(0.9 * 0.1 / 100 + Z2 / 40000)
    assert (centre, half) == pytest.approx((0.885203, 0.059568), abs=1e-6)
    assert wilson_interval(90, 100) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(90, 100) == pytest.approx((0.82563, 0.94477), abs=1e-5)


@pytest.mark.parametrize(("correct", "n"), [(0, 10), (10, 10), (5, 10), (90, 100), (1234, 2000), (7, 9)])
def test_wilson_solves_the_score_test(correct, n):
    assert wilson_interval(correct, n) == pytest.approx(score_test_roots(correct, n), abs=1e-12)


def test_wilson_edge_cases():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    lo, hi = wilson_interval(2.5, 10)  # a mean count over seeds
    assert lo < 0.25 < hi
    with pytest.raises(ValueError, match="correct"):
        wilson_interval(11, 10)
    assert wilson_interval(5, 10, z=1.0)[1] < wilson_interval(5, 10)[1]  # a narrower interval for a smaller z


# -- seeded methods ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """48 random images labelled with the unreduced tiny ViT's own predictions (random labels would all be
    scored alike: the untrained model predicts one class for nearly every input), so pruning costs accuracy."""
    torch.manual_seed(3)
    x = torch.randn(48, 3, 64, 64)
    with torch.no_grad():
        return x, make_vit()(x).argmax(-1)


def _evaluate(configs: list[Config], data, **kwargs) -> list[dict]:
    x, y = data
    return evaluate_configs(make_vit(), configs, lambda: [(x[:24], y[:24]), (x[24:], y[24:])], timing_batch=x[:24],
                            repeats=1, progress=False, **kwargs)


def test_seed_list_follows_the_seed_param():
    assert seed_list(Config("random", budget=0.6)) == [0, 1, 2]
    assert seed_list(Config("random", budget=0.6), 5) == [0, 1, 2, 3, 4]
    assert seed_list(Config("random", {"seed": 7}, budget=0.6)) is None  # the user fixed it
    assert seed_list(Config("tome", budget=0.6)) is None and seed_list(Config(None)) is None
    with pytest.raises(ValueError, match="seeds"):
        seed_list(Config("random"), 0)


def test_seeded_row_is_the_mean_of_single_seed_runs(data):
    (base, seeded) = _evaluate([Config(None), Config("random", budget=0.4)], data, seeds=3)
    singles = _evaluate([Config("random", {"seed": s}, budget=0.4) for s in (0, 1, 2)], data)
    top1s = [r["top1"] for r in singles]
    assert len(set(top1s)) > 1  # the seeds disagree on this data: the spread is real
    assert seeded["seeds"] == [0, 1, 2]
    assert seeded["top1_per_seed"] == pytest.approx(top1s)
    assert seeded["top5_per_seed"] == pytest.approx([r["top5"] for r in singles])
    assert seeded["top1"] == pytest.approx(sum(top1s) / 3)
    assert seeded["top5"] == pytest.approx(sum(r["top5"] for r in singles) / 3)
    mean = sum(top1s) / 3
    assert seeded["top1_std"] == pytest.approx(math.sqrt(sum((t - mean) ** 2 for t in top1s) / 2))  # sample std
    mean_correct = sum(r["correct1"] for r in singles) / 3
    assert seeded["correct1"] == pytest.approx(mean_correct) and seeded["samples"] == 48
    assert seeded["top1_ci95"] == pytest.approx(list(wilson_interval(mean_correct, 48)))
    assert seeded["delta_top1"] == pytest.approx(seeded["top1"] - base["top1"])
    assert "seed" not in seeded["params"] and seeded["params"]["keep_rate"] == singles[0]["params"]["keep_rate"]
    assert seeded["gmacs"] == pytest.approx(singles[0]["gmacs"])  # same schedule for every seed
    for row in (base, *singles):  # unseeded rows: one run, an interval of their own counts
        assert "seeds" not in row and "top1_std" not in row
        assert row["top1_ci95"] == pytest.approx(list(wilson_interval(row["correct1"], 48)))
        assert row["top5_ci95"] == pytest.approx(list(wilson_interval(row["correct5"], 48)))


def test_fixed_seed_runs_once_and_seeded_runs_per_seed(data, monkeypatch):
    calls = []
    real = accuracy.count_correct

    def spy(model, batches, **kwargs):
        calls.append(kwargs["desc"])
        return real(model, batches, **kwargs)

    monkeypatch.setattr(accuracy, "count_correct", spy)
    fixed, seeded, tome = _evaluate(
        [Config("random", {"seed": 1}, budget=0.6, label="random seed 1"), Config("random", budget=0.6),
         Config("tome", budget=0.6)],
        data, seeds=2,
    )
    assert calls == ["random seed 1", "random@0.6 seed 0", "random@0.6 seed 1", "tome@0.6"]
    assert fixed["params"]["seed"] == 1 and "seeds" not in fixed
    assert seeded["seeds"] == [0, 1] and len(seeded["top1_per_seed"]) == 2
    assert "seeds" not in tome


def test_one_seed_has_no_spread(data):
    (row,) = _evaluate([Config("random", budget=0.6)], data, seeds=1)
    assert row["seeds"] == [0] and row["top1_std"] is None
    assert "±" not in format_table([row])


# -- the table and the sweep files -------------------------------------------------------------------------


def test_table_shows_mean_std_and_interval():
    row = {"label": "random@0.6", "method": "random", "top1": 0.835, "top1_std": 0.009, "seeds": [0, 1, 2],
           "top1_ci95": [0.881, 0.894], "top5": 0.99, "gmacs": 1.0, "gmacs_unreduced": 2.0, "images_per_s": 100.0,
           "speedup": 1.5, "delta_top1": -0.01}
    table = format_table([row])
    header, _, line, note = table.splitlines()
    assert "95% CI" in header
    assert "83.50±0.90%" in line and "[88.1, 89.4]" in line and "-1.00" in line
    assert "mean ± sample std over 3 seeds" in note and "Wilson" in note


def test_table_of_a_real_evaluation(data):
    rows = _evaluate([Config(None), Config("random", budget=0.6)], data)
    lines = format_table(rows).splitlines()
    base_line = next(line for line in lines if line.startswith("unreduced"))
    random_line = next(line for line in lines if line.startswith("random@0.6"))
    assert re.search(r"\d+\.\d\d% +\[\d+\.\d, \d+\.\d\]", base_line) and "±" not in base_line
    assert re.search(r"\d+\.\d\d±\d+\.\d\d% +\[\d+\.\d, \d+\.\d\]", random_line)


def test_sweep_csv_and_json_carry_the_intervals(tmp_path, data):
    x, y = data
    model = make_vit()

    def evaluate(cfgs):
        return evaluate_configs(model, cfgs, lambda: [(x, y)], timing_batch=x[:8], repeats=1, progress=False)

    run_sweep(evaluate, sweep_configs(["tome", "random"], [0.6]), tmp_path, progress=None)
    rows = {r["label"]: r for r in json.loads((tmp_path / "sweep.json").read_text())}
    with (tmp_path / "sweep.csv").open() as f:
        table = {r["label"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(table) == {"unreduced", "tome@0.6", "random@0.6"}
    for label, row in rows.items():
        lo, hi = row["top1_ci95"]
        assert lo <= row["top1"] <= hi and len(row["top5_ci95"]) == 2
        assert float(table[label]["top1_ci95_lo"]) == pytest.approx(lo)
        assert float(table[label]["top1_ci95_hi"]) == pytest.approx(hi)
        assert float(table[label]["top5_ci95_lo"]) == pytest.approx(row["top5_ci95"][0])
    assert rows["random@0.6"]["seeds"] == [0, 1, 2] and rows["random@0.6"]["top1_std"] is not None
    assert json.loads(table["random@0.6"]["seeds"]) == [0, 1, 2]
    assert float(table["random@0.6"]["top1_std"]) == pytest.approx(rows["random@0.6"]["top1_std"])
    assert table["tome@0.6"]["seeds"] == "" and table["tome@0.6"]["top1_std"] == ""
