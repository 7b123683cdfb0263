"""Sweeps: Pareto fronts by hand, resumable results, plots that contain what they should, cells keyed on
everything that determines them, matplotlib optional."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_vit
from PIL import Image

from tokenreduce.eval.accuracy import Config, evaluate_configs
from tokenreduce.eval.sweep import (
    RESULTS,
    SweepMismatch,
    cell_key,
    pareto_front,
    read_results,
    run_sweep,
    sweep_configs,
    tradeoff_figure,
    weights_fingerprint,
)


def test_pareto_front_by_hand():
    # (GMACs, top-1): (1, 50) and (2, 70) and (4, 80) are on the front; (3, 60) is beaten by (2, 70).
    points = [(4.0, 80.0), (3.0, 60.0), (1.0, 50.0), (2.0, 70.0), (2.5, 70.0)]
    assert pareto_front(points, lower_x_is_better=True) == [2, 3, 0]
    # throughput: higher x is better; (10, 60) beats (5, 50)
    assert pareto_front([(5.0, 50.0), (10.0, 60.0), (2.0, 90.0)], lower_x_is_better=False) == [2, 1]


def fake_rows(config: Config) -> dict:
    b = 1.0 if config.budget is None else config.budget
    bonus = {"tome": 0.0, "evit": -0.05}.get(config.method or "", 0.0)
    return {"label": config.label, "method": config.method or "unreduced", "budget": config.budget,
            "top1": 0.9 * b ** 0.2 + bonus, "gmacs": 4.6 * b, "images_per_s": 100 / b}


def test_interrupted_sweep_resumes_without_redoing_cells(tmp_path):
    configs = sweep_configs(["tome", "evit"], [1.0, 0.6, 0.4])
    calls = []

    def evaluate(cfgs):
        calls.append(cfgs[0].label)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the machine goes down mid-sweep
        return [fake_rows(c) for c in cfgs]

    with pytest.raises(KeyboardInterrupt):
        run_sweep(evaluate, configs, tmp_path, progress=None)
    assert [r["label"] for r in read_results(tmp_path)] == [configs[0].label, configs[1].label]
    with (tmp_path / RESULTS).open("a") as f:
        f.write('{"label": "torn')  # a half-written line from the crash
    calls.clear()
    rows = run_sweep(lambda cfgs: [fake_rows(c) for c in cfgs], configs, tmp_path, progress=None)
    assert len(rows) == 7 and [r["label"] for r in rows] == [c.label for c in configs]
    assert json.loads((tmp_path / "sweep.json").read_text())[3]["label"] == "tome@0.4"
    csv_lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(csv_lines) == 8 and csv_lines[0].startswith("label,method,budget")
    assert rows[0]["delta_top1"] == 0.0 and rows[6]["delta_top1"] < 0
    for name in ("top1_vs_gmacs.png", "top1_vs_throughput.png"):
        with Image.open(tmp_path / name) as img:
            assert img.size == (840, 540)


def test_plot_contains_each_method_the_front_and_the_reference():
    configs = sweep_configs(["tome", "evit"], [1.0, 0.6, 0.4])
    rows = [fake_rows(c) for c in configs]
    fig = tradeoff_figure(rows, "gmacs", lower_x_is_better=True, xlabel="GMACs")
    lines = {line.get_gid(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"method:tome", "method:evit", "unreduced", "pareto"}
    assert list(lines["method:tome"].get_xdata()) == pytest.approx([4.6 * 0.4, 4.6 * 0.6, 4.6])
    assert list(lines["unreduced"].get_xdata()) == [4.6]
    # EViT is 5 points worse everywhere, so the front is ToMe's three points (the unreduced ties ToMe at 1.0)
    assert list(lines["pareto"].get_xdata()) == pytest.approx([4.6 * 0.4, 4.6 * 0.6, 4.6])


def test_plot_draws_each_interval_as_an_error_bar():
    configs = sweep_configs(["tome"], [1.0, 0.6])
    rows = [{**fake_rows(c), "top1_ci95": [fake_rows(c)["top1"] - 0.02, fake_rows(c)["top1"] + 0.01]}
            for c in configs]
    fig = tradeoff_figure(rows, "gmacs", lower_x_is_better=True, xlabel="GMACs")
    ax = fig.axes[0]
    bars = [c for c in ax.collections if c.get_gid() == "ci:tome"]
    assert len(bars) == 1
    segments = sorted(bars[0].get_segments(), key=lambda seg: seg[0][0])  # one vertical bar per point, x order
    for seg, row in zip(segments, sorted(rows[1:], key=lambda r: r["gmacs"]), strict=True):
        assert seg[0][0] == pytest.approx(row["gmacs"])
        assert sorted(p[1] for p in seg) == pytest.approx([100 * row["top1"] - 2, 100 * row["top1"] + 1])
    assert any(c.get_gid() == "ci:unreduced" for c in ax.collections)


def test_real_sweep_on_a_tiny_model(tmp_path):
    model = make_vit()
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))

    def evaluate(cfgs):
        return evaluate_configs(model, cfgs, lambda: [(x[:8], y[:8]), (x[8:], y[8:])], timing_batch=x[:8],
                                repeats=1, progress=False)

    rows = run_sweep(evaluate, sweep_configs(["tome", "evit"], [1.0, 0.6, 0.05]), tmp_path, progress=None)
    by_label = {r["label"]: r for r in rows}
    assert by_label["tome@0.6"]["gmacs"] <= 0.6 * by_label["unreduced"]["gmacs"] + 1e-9
    assert by_label["tome@1"]["gmacs"] == pytest.approx(by_label["unreduced"]["gmacs"])
    assert "achievable" in by_label["evit@0.05"]["skipped"]  # unreachable cells are recorded, not retried
    assert all(r["samples"] == 16 for r in rows if "top1" in r)


def test_evaluation_calibrates_ppt_off_its_home_model():
    model = make_vit()
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
    rows = evaluate_configs(model, [Config("ppt"), Config("ppt", {"threshold": 1e-3})], lambda: [(x, y)],
                            timing_batch=x, repeats=1, progress=False)
    calibrated = rows[0]["calibrated"]
    assert len(calibrated) == 3 and all(t > 0 for t in calibrated)  # one per reduction block
    assert rows[0]["params"]["threshold"] == pytest.approx(calibrated)
    assert "calibrated" not in rows[1] and rows[1]["params"]["threshold"] == 1e-3


def test_reference_configs_use_shipped_reducers(tmp_path, monkeypatch):
    from tokenreduce.eval import accuracy
    from tokenreduce.models import reference

    fake = {"ltmp_0.75": tmp_path / "a", "ltmp_0.6": tmp_path / "b", "cropr": tmp_path / "c", "dtps": tmp_path / "d"}
    monkeypatch.setattr(reference, "shipped_reducer", lambda name: fake.get(name))
    configs = {c.label: c for c in accuracy.reference_configs(0.6)}
    assert configs["ltmp (target 0.6) [b]"].params == {"target": 0.6, "checkpoint": str(tmp_path / "b")}
    cropr = configs["cropr@0.6 [c]"]
    assert cropr.params == {"checkpoint": str(tmp_path / "c")} and cropr.budget == 0.6
    assert configs["dtps@0.6 [d]"].params == {"checkpoint": str(tmp_path / "d")}
    assert configs["dynamicvit@0.6"].params == {}  # not shipped: evaluated as skipped
    assert list(configs)[0] == "unreduced"


def test_sweep_configs_with_learned_checkpoints():
    extra = {"cropr": {"checkpoint": "c"}, "tps:dtps": {"variant": "dtps"}}
    configs = sweep_configs(["tome", "cropr"], [1.0, 0.5], extra)
    labels = [c.label for c in configs]
    assert labels == ["unreduced", "tome@1", "tome@0.5", "cropr@1", "cropr@0.5", "dtps@1", "dtps@0.5"]
    assert configs[3].params == {"checkpoint": "c"} and configs[5].params == {"variant": "dtps"}
    assert configs[6].method == "tps" and configs[6].budget == 0.5


def test_reference_evaluation_runs_shipped_learned_reducers():
    from tokenreduce.eval.accuracy import evaluate_reference, reference_configs

    configs = [c for c in reference_configs(0.6) if c.method is None or "ltmp" in c.label or "dtps" in c.label]
    rows = {r["label"]: r for r in evaluate_reference(configs, limit=100, batch_size=50, repeats=1, progress=False)}
    assert set(rows) == {"unreduced", "ltmp (target 0.6) [ltmp_0.6]", "dtps@0.6 [dtps]"}
    assert all("skipped" not in r for r in rows.values()), rows
    assert rows["ltmp (target 0.6) [ltmp_0.6]"]["gmacs_analytic"] is None  # data-dependent: only measured
    assert rows["ltmp (target 0.6) [ltmp_0.6]"]["gmacs"] < rows["unreduced"]["gmacs"]
    assert rows["dtps@0.6 [dtps]"]["gmacs"] <= 0.6 * rows["unreduced"]["gmacs"] + 1e-12


# -- the cells' key --------------------------------------------------------------------------------------


def fake_evaluate(calls: list[str]):
    def evaluate(cfgs):
        calls.extend(c.label for c in cfgs)
        return [fake_rows(c) for c in cfgs]
    return evaluate


def test_cells_are_reused_only_under_the_same_key(tmp_path):
    configs = sweep_configs(["tome", "random"], [1.0, 0.6])
    context = {"model": "m", "weights": "abc", "data": "bundled", "limit": 40, "seeds": 3}
    calls: list[str] = []
    run_sweep(fake_evaluate(calls), configs, tmp_path, progress=None, context=context)
    assert len(calls) == 5
    stored = read_results(tmp_path)
    assert stored[1]["cache_key"]["limit"] == 40 and stored[1]["cache_key"]["method"] == "tome"
    assert stored[1]["cache_key"]["seeds"] is None and stored[3]["cache_key"]["seeds"] == 3  # random is seeded

    calls.clear()
    run_sweep(fake_evaluate(calls), configs, tmp_path, progress=None, context=dict(context))
    assert calls == []  # same key: every cell reused

    for change, named in (({"limit": 80}, "limit: 40 there, 80 now"), ({"weights": "xyz"}, "weights: abc there"),
                          ({"data": "/d"}, "data: bundled there, /d now"), ({"seeds": 5}, "seeds: 3 there, 5 now")):
        with pytest.raises(SweepMismatch, match=named) as err:
            run_sweep(fake_evaluate(calls), configs, tmp_path, progress=None, context={**context, **change})
        assert "--overwrite" in str(err.value) and "--out" in str(err.value)
    assert calls == []  # refused before any work

    other = [configs[0], Config("tome", {"r": 2}, label="tome@1")]  # same label, other parameters
    with pytest.raises(SweepMismatch, match=r"tome@1 params: \{\} there, \{\"r\": 2\} now"):
        run_sweep(fake_evaluate(calls), other, tmp_path, progress=None, context=context)

    run_sweep(fake_evaluate(calls), configs, tmp_path, progress=None, context={**context, "limit": 80},
              overwrite=True)
    assert len(calls) == 5 and {r["cache_key"]["limit"] for r in read_results(tmp_path)} == {80}


def test_a_fixed_seed_cell_ignores_the_seed_count():
    assert cell_key(Config("random", {"seed": 4}, budget=0.6), {"seeds": 3})["seeds"] is None
    assert cell_key(Config("random", budget=0.6), {"seeds": 2})["seeds"] == 2


def test_cells_without_a_key_are_refused(tmp_path):
    (tmp_path / RESULTS).write_text(json.dumps(fake_rows(Config(None))) + "\n")
    with pytest.raises(SweepMismatch, match="without a key"):
        run_sweep(fake_evaluate([]), sweep_configs(["tome"], [0.6]), tmp_path, progress=None)


def test_weights_fingerprint_follows_the_weights():
    a, b = make_vit(), make_vit()
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.head.bias[0] += 1e-3
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(make_vit().to(torch.bfloat16)) != weights_fingerprint(a)


def test_sweep_command_refuses_another_limit_and_reuses_the_same(tmp_path, capsys, monkeypatch):
    from tokenreduce.cli import main
    from tokenreduce.eval import accuracy

    calls = []
    real = accuracy.evaluate_reference

    def spy(configs, **kwargs):
        calls.append([c.label for c in configs])
        return real(configs, **kwargs)

    monkeypatch.setattr(accuracy, "evaluate_reference", spy)
    out = tmp_path / "sweep"
    args = ["sweep", "--methods", "tome", "--budgets", "0.6", "--batch-size", "10", "--repeats", "1",
            "--no-progress", "--out", str(out)]
    assert main([*args, "--limit", "20"]) == 0
    assert calls == [["unreduced"], ["tome@0.6"]]
    capsys.readouterr()

    assert main([*args, "--limit", "30"]) == 2
    err = capsys.readouterr().err
    assert "limit: 20 there, 30 now" in err and "--overwrite" in err and "--out" in err
    assert len(calls) == 2 and [r["samples"] for r in read_results(out)] == [20, 20]  # nothing evaluated

    assert main([*args, "--limit", "20"]) == 0
    assert len(calls) == 2  # same arguments: the cells are reused, nothing evaluated

    assert main([*args, "--limit", "30", "--overwrite"]) == 0
    assert len(calls) == 4 and [r["samples"] for r in read_results(out)] == [30, 30]


# -- matplotlib is optional ---------------------------------------------------------------------------------


def test_sweep_without_matplotlib_writes_tables_and_says_so_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    rows = run_sweep(fake_evaluate([]), sweep_configs(["tome"], [1.0, 0.6]), tmp_path, progress=None)
    assert len(rows) == 3
    assert len(json.loads((tmp_path / "sweep.json").read_text())) == 3
    assert len((tmp_path / "sweep.csv").read_text().splitlines()) == 4
    assert not list(tmp_path.glob("*.png"))
    err = capsys.readouterr().err
    assert err.count('pip install "tokenreduce[plot]"') == 1


def test_importing_tokenreduce_does_not_import_matplotlib():
    code = ("import sys, tokenreduce, tokenreduce.cli, tokenreduce.eval.sweep, tokenreduce.viz; "
            "print('matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
