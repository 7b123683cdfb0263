"""Methods × budgets sweeps: resumable results, CSV/JSON, and trade-off plots.

Every finished cell is appended as one JSON line to ``results.jsonl`` (flushed and
fsync'ed), so an interrupted sweep loses at most the cell it was running; a
restarted sweep skips the cells already there.  At the end the rows are written
as ``sweep.csv`` and ``sweep.json`` (atomically) and plotted:
``top1_vs_gmacs.png`` and ``top1_vs_throughput.png``, each with the Pareto front
marked and the unreduced model as a reference point.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .accuracy import UNREDUCED, Config  # noqa: E402

DEFAULT_BUDGETS = (1.0, 0.8, 0.7, 0.6, 0.5, 0.4)
RESULTS = "results.jsonl"
CSV_COLUMNS = (
    "label", "method", "budget", "params", "top1", "top5", "delta_top1", "gmacs", "gmacs_unreduced",
    "images_per_s", "images_per_s_unreduced", "speedup", "samples", "skipped",
)


def sweep_configs(
    methods: Iterable[str], budgets: Iterable[float], params: dict[str, dict[str, Any]] | None = None
) -> list[Config]:
    """The unreduced model, then every method at every budget.

    Args:
        params: extra parameters per method name (e.g. a learned method's ``checkpoint``); a key
            ``"name:label"`` adds a second series of ``name`` labelled ``label`` with those parameters.
    """
    configs = [Config(None)]
    for m in methods:
        configs += [Config(m, dict((params or {}).get(m, {})), budget=b) for b in budgets]
    for key, extra in (params or {}).items():
        if ":" in key:
            name, label = key.split(":", 1)
            configs += [Config(name, dict(extra), budget=b, label=f"{label}@{b:g}") for b in budgets]
    return configs


def reference_sweep_methods() -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Methods of a default sweep on the bundled reference model, and their extra parameters: every
    training-free method, and every learned method whose budget sets its schedule and whose reducer is
    shipped for that model (run from its checkpoint)."""
    from ..methods import REGISTRY

    names, extra = [], {}
    for name, cls in sorted(REGISTRY.items()):
        if not cls.learned:
            names.append(name)
        elif cls.budget_sets_schedule and (checkpoint := cls.shipped_checkpoint({}, None)) is not None:
            names.append(name)
            extra[name] = {"checkpoint": str(checkpoint)}
    return names, extra


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Rows already in ``results.jsonl`` (a torn last line from a crash is ignored)."""
    path = Path(out_dir) / RESULTS
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_result(out_dir: str | Path, row: dict[str, Any]) -> None:
    """Append one row durably."""
    path = Path(out_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_sweep(
    evaluate: Callable[[list[Config]], list[dict[str, Any]]],
    configs: list[Config],
    out_dir: str | Path,
    *,
    progress: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Evaluate the configs not yet in ``out_dir``, one at a time, appending each result.

    Args:
        evaluate: evaluates a list of configs and returns one row per config (as
            :func:`tokenreduce.eval.accuracy.evaluate_configs` does).
        configs: the cells, unreduced first.

    Returns:
        All rows (earlier and new), in ``configs`` order, with ``delta_top1`` filled in.
    """
    out_dir = Path(out_dir)
    done = {row["label"]: row for row in read_results(out_dir)}
    for i, config in enumerate(configs):
        if config.label in done:
            continue
        if progress:
            progress(f"[{i + 1}/{len(configs)}] {config.label}")
        (row,) = evaluate([config])
        append_result(out_dir, row)
        done[config.label] = row
    rows = [done[c.label] for c in configs]
    base = next((r for r in rows if r["method"] == UNREDUCED and "top1" in r), None)
    for row in rows:
        if base is not None and "top1" in row:
            row["delta_top1"] = row["top1"] - base["top1"]
    write_tables(rows, out_dir)
    plot_tradeoffs(rows, out_dir)
    return rows


def write_tables(rows: list[dict[str, Any]], out_dir: str | Path) -> None:
    """``sweep.json`` and ``sweep.csv`` (atomic writes)."""
    out_dir = Path(out_dir)
    _atomic_write(out_dir / "sweep.json", json.dumps(rows, indent=2))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()})
    _atomic_write(out_dir / "sweep.csv", buf.getvalue())


def pareto_front(points: list[tuple[float, float]], *, lower_x_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (y = accuracy, higher is better).

    Returned in increasing x order.
    """
    sign = 1.0 if lower_x_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (sign * points[i][0], -points[i][1]))
    front, best_y = [], float("-inf")
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def tradeoff_figure(rows: list[dict[str, Any]], x_key: str, *, lower_x_is_better: bool, xlabel: str) -> Figure:
    """Top-1 against ``x_key``, one marker series per method, Pareto front as a line, unreduced as a star."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if "top1" in r and r.get(x_key) is not None]
    for method in sorted({r["method"] for r in done if r["method"] != UNREDUCED}):
        pts = sorted((r[x_key], 100 * r["top1"]) for r in done if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method, alpha=0.8, gid=f"method:{method}")
    base = [r for r in done if r["method"] == UNREDUCED]
    if base:
        ax.plot([base[0][x_key]], [100 * base[0]["top1"]], "k*", markersize=14, label="unreduced", gid="unreduced")
    points = [(r[x_key], 100 * r["top1"]) for r in done]
    front = pareto_front(points, lower_x_is_better=lower_x_is_better)
    if front:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="grey", linewidth=2,
                label="Pareto front", gid="pareto", zorder=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def plot_tradeoffs(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write the two trade-off plots; returns their paths."""
    out_dir = Path(out_dir)
    paths = []
    for name, key, lower, label in (
        ("top1_vs_gmacs.png", "gmacs", True, "GMACs per image"),
        ("top1_vs_throughput.png", "images_per_s", False, "images / s (measured)"),
    ):
        fig = tradeoff_figure(rows, key, lower_x_is_better=lower, xlabel=label)
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths
