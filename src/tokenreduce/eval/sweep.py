"""Methods × budgets sweeps: resumable results, CSV/JSON, and trade-off plots.

Every finished cell is appended as one JSON line to ``results.jsonl`` (flushed and
fsync'ed), so an interrupted sweep loses at most the cell it was running; a
restarted sweep skips the cells already there.  Each cell carries its key
(``cache_key``): everything that determines it — model name and weights
fingerprint, data, limit, batch size, precision, device type, method, parameters,
budget, seeds and library version (:func:`sweep_context`, :func:`cell_key`).  A
cell is reused only under the same key; a folder holding cells of other settings
is refused (:class:`SweepMismatch`) unless the sweep starts over (``overwrite``).

At the end the rows are written as ``sweep.csv`` and ``sweep.json`` (atomically)
and plotted: ``top1_vs_gmacs.png`` and ``top1_vs_throughput.png``, each with the
Pareto front marked, the unreduced model as a reference point, and the 95%
interval of every accuracy as an error bar.  The plots need matplotlib, an
optional extra (``pip install "tokenreduce[plot]"``): it is imported only when
plotting, and without it the sweep writes its tables and says so once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .accuracy import DEFAULT_SEEDS, UNREDUCED, Config, seed_list

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import nn

DEFAULT_BUDGETS = (1.0, 0.8, 0.7, 0.6, 0.5, 0.4)
RESULTS = "results.jsonl"
TABLES = ("sweep.csv", "sweep.json")
PLOTS = ("top1_vs_gmacs.png", "top1_vs_throughput.png")
METRIC_LABELS = {"top1": "top-1 (%)", "miou": "mIoU (%)"}
"""The quality metrics a sweep can plot (``top1`` for classification, ``miou`` for segmentation)."""


def plot_names(metric: str = "top1") -> tuple[str, str]:
    """The two plot files of a sweep on ``metric``: ``<metric>_vs_gmacs.png`` and ``<metric>_vs_throughput.png``."""
    return f"{metric}_vs_gmacs.png", f"{metric}_vs_throughput.png"

PLOT_INSTALL = 'pip install "tokenreduce[plot]"'
CSV_COLUMNS = (
    "label", "method", "budget", "params", "top1", "top1_ci95_lo", "top1_ci95_hi", "top1_std", "seeds",
    "top5", "top5_ci95_lo", "top5_ci95_hi", "delta_top1", "gmacs", "gmacs_unreduced",
    "images_per_s", "images_per_s_unreduced", "speedup", "samples", "skipped",
)
SEGMENTATION_CSV_COLUMNS = (
    "label", "method", "budget", "params", "miou", "miou_ci95_lo", "miou_ci95_hi", "miou_std", "seeds",
    "miou_foreground", "pixel_accuracy", "delta_miou", "gmacs", "gmacs_unreduced", "images_per_s",
    "images_per_s_unreduced", "speedup", "images", "skipped",
)
"""``sweep.csv``'s columns; an interval ``top1_ci95 = [lo, hi]`` is split into ``top1_ci95_lo`` / ``_hi``."""
CELL_FIELDS = ("label", "method", "params", "budget", "seeds")
"""The fields of a cell's key that belong to its configuration (the others describe the whole sweep)."""


class PlotsUnavailable(ImportError):
    """The plots need matplotlib, which is not installed (``pip install "tokenreduce[plot]"``)."""


class SweepMismatch(ValueError):
    """The results folder holds cells computed with other settings than the sweep asked for."""


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
    training-free classification method, and every learned method whose budget sets its schedule and whose reducer is
    shipped for that model (run from its checkpoint)."""
    from ..methods import REGISTRY

    names, extra = [], {}
    for name, cls in sorted(REGISTRY.items()):
        if "classification" not in cls.tasks:
            continue
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


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples → lists, paths → strings), for comparing keys."""
    return json.loads(json.dumps(value, default=str))


def weights_fingerprint(model: nn.Module) -> str:
    """A digest of ``model``'s ``state_dict`` (names, dtypes, shapes and values): equal weights, equal digest.

    Reads every tensor once (about a second per GB on a CPU).
    """
    import torch

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


def sweep_context(
    model: nn.Module,
    *,
    model_name: str,
    data: str | Path | None,
    limit: int | None,
    seeds: int = DEFAULT_SEEDS,
    batch_size: int | None = None,
    precision: str = "fp32",
    device: str = "cpu",
    model_kwargs: dict[str, Any] | None = None,
    img_size: int | None = None,
) -> dict[str, Any]:
    """The settings shared by every cell of a sweep, as stored in each cell's key.

    Args:
        model: the unreduced model; its weights enter as :func:`weights_fingerprint`.
        model_name: its name (``reference``, a timm name).
        data: the ImageFolder evaluated (resolved to an absolute path), ``None`` for the bundled test set.
        limit: images evaluated (``None``: all).
        seeds: seeds a seeded method runs over (enters only the keys of the cells it applies to).
        batch_size: images per forward (random pruning's choice depends on an image's place in its batch).
        precision: ``fp32`` or the autocast dtype.
        device: the torch device; only its type (cpu, cuda, mps) enters, as images/s depend on it.
        model_kwargs, img_size: the model's construction arguments beyond its name.
    """
    from .. import __version__

    return {
        "version": __version__,
        "model": model_name,
        "weights": weights_fingerprint(model),
        "model_kwargs": _jsonable(dict(model_kwargs or {})),
        "img_size": img_size,
        "data": "bundled" if data is None else str(Path(data).resolve()),
        "limit": limit,
        "batch_size": batch_size,
        "precision": precision,
        "device": str(device).split(":")[0],
        "seeds": seeds,
    }


def cell_key(config: Config, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything that determines one cell: the sweep's ``context`` (:func:`sweep_context`; the library
    version is always added) and the config's label, method, parameters and budget.  ``seeds`` is the
    number of seeds the cell runs over, ``None`` for a cell run once (not a seeded method, or its
    parameters fix the seed)."""
    from .. import __version__

    context = {"version": __version__, **(context or {})}
    run_seeds = seed_list(config, context.get("seeds", DEFAULT_SEEDS))
    return _jsonable({
        **context,
        "label": config.label,
        "method": config.method or UNREDUCED,
        "params": config.params,
        "budget": config.budget,
        "seeds": None if run_seeds is None else len(run_seeds),
    })


def _show(value: Any) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def key_differences(stored: dict[str, Any] | None, wanted: dict[str, Any], *, cell: bool) -> list[str]:
    """``"limit: 40 there, 20 now"`` for every field a cached cell's ``stored`` key differs from ``wanted`` in
    (``cell``: its configuration's fields too, else only the sweep-wide ones)."""
    if stored is None:
        return ["cells without a key (written by an older tokenreduce)"]
    fields = [k for k in dict.fromkeys([*wanted, *stored]) if cell or k not in CELL_FIELDS]
    return [f"{k}: {_show(stored.get(k))} there, {_show(wanted.get(k))} now" for k in fields
            if stored.get(k) != wanted.get(k)]


def check_cached(rows: list[dict[str, Any]], keys: dict[str, dict[str, Any]], out_dir: Path) -> None:
    """Refuse to reuse ``out_dir`` when any cached cell was computed under other settings.

    Every cached cell must share the sweep-wide settings of ``keys`` (model, weights, data, limit, ...);
    a cached cell with the label of a wanted cell must also have that cell's configuration (method,
    parameters, budget, seeds).

    Raises:
        SweepMismatch: naming what differs and how to go on.
    """
    if not rows or not keys:
        return
    sweep_wide = next(iter(keys.values()))
    diffs: list[str] = []
    for row in rows:
        stored, wanted = row.get("cache_key"), keys.get(row.get("label"))
        found = key_differences(stored, sweep_wide, cell=False)
        if wanted is not None and stored is not None:
            found += [f"{row['label']} {d}" for d in key_differences(stored, wanted, cell=True)
                      if d.split(":")[0] in CELL_FIELDS]
        diffs += [d for d in found if d not in diffs]
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise SweepMismatch(
            f"{out_dir} holds sweep cells computed with other settings ({shown}); reusing them would mix "
            "results. Choose another output folder (--out), or start over there with --overwrite"
        )


def clear_results(out_dir: str | Path) -> None:
    """Remove a sweep's files from ``out_dir`` (cells, tables, plots): a fresh start."""
    for name in (RESULTS, *TABLES, *PLOTS):
        (Path(out_dir) / name).unlink(missing_ok=True)


def run_sweep(
    evaluate: Callable[[list[Config]], list[dict[str, Any]]],
    configs: list[Config],
    out_dir: str | Path,
    *,
    progress: Callable[[str], None] | None = print,
    context: dict[str, Any] | None = None,
    overwrite: bool = False,
    metric: str = "top1",
) -> list[dict[str, Any]]:
    """Evaluate the configs not yet in ``out_dir``, one at a time, appending each result.

    Args:
        evaluate: evaluates a list of configs and returns one row per config (as
            :func:`tokenreduce.eval.accuracy.evaluate_configs` does).
        configs: the cells, unreduced first.
        context: the settings shared by every cell (:func:`sweep_context`); with the config, each cell's
            key (:func:`cell_key`), stored with the cell as ``cache_key``.
        overwrite: discard whatever ``out_dir`` holds and start fresh.
        metric: the rows' quality metric (:data:`METRIC_LABELS`): ``top1``, or ``miou`` for segmentation.

    Returns:
        All rows (earlier and new), in ``configs`` order, with ``delta_<metric>`` filled in.

    Raises:
        SweepMismatch: ``out_dir`` holds cells computed under another key (and not ``overwrite``),
            before anything is evaluated.
    """
    out_dir = Path(out_dir)
    if overwrite:
        clear_results(out_dir)
    keys = {c.label: cell_key(c, context) for c in configs}
    cached = read_results(out_dir)
    check_cached(cached, keys, out_dir)
    done = {row["label"]: row for row in cached}
    for i, config in enumerate(configs):
        if config.label in done:
            continue
        if progress:
            progress(f"[{i + 1}/{len(configs)}] {config.label}")
        (row,) = evaluate([config])
        row = {**row, "cache_key": keys[config.label]}
        append_result(out_dir, row)
        done[config.label] = row
    rows = [done[c.label] for c in configs]
    base = next((r for r in rows if r["method"] == UNREDUCED and metric in r), None)
    for row in rows:
        if base is not None and metric in row:
            row[f"delta_{metric}"] = row[metric] - base[metric]
    write_tables(rows, out_dir, metric)
    try:
        plot_tradeoffs(rows, out_dir, metric)
    except PlotsUnavailable as err:
        print(f"note: {err}; wrote {out_dir / TABLES[0]} and {TABLES[1]} without plots", file=sys.stderr)
    return rows


def write_tables(rows: list[dict[str, Any]], out_dir: str | Path, metric: str = "top1") -> None:
    """``sweep.json`` and ``sweep.csv`` (atomic writes)."""
    out_dir = Path(out_dir)
    _atomic_write(out_dir / "sweep.json", json.dumps(rows, indent=2))
    buf = io.StringIO()
    columns = SEGMENTATION_CSV_COLUMNS if metric == "miou" else CSV_COLUMNS
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()}
        for name in ("top1_ci95", "top5_ci95", "miou_ci95"):
            if row.get(name):
                flat[f"{name}_lo"], flat[f"{name}_hi"] = row[name]
        writer.writerow(flat)
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


def _figure_class() -> type[Figure]:
    """matplotlib's ``Figure`` (imported here only: matplotlib is the optional extra ``tokenreduce[plot]``).

    Raises:
        PlotsUnavailable: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401  (the package first: a cached submodule would hide its absence)
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotsUnavailable(f"the plots need matplotlib: {PLOT_INSTALL}") from err
    return Figure


def plotting_available() -> bool:
    """Whether matplotlib can be imported (the plots can be drawn)."""
    try:
        _figure_class()
    except PlotsUnavailable:
        return False
    return True


def _interval_bars(ax: Any, rows: list[dict[str, Any]], x_key: str, color: Any, gid: str, metric: str = "top1") -> None:
    """Error bars of the rows' 95% intervals of ``metric`` (``<metric>_ci95``, percent), every artist tagged ``gid``."""
    ci = f"{metric}_ci95"
    with_ci = [r for r in rows if r.get(ci) and None not in r[ci] and r[ci][0] == r[ci][0]]  # no NaN bounds
    if not with_ci:
        return
    y = [100 * r[metric] for r in with_ci]
    low = [max(0.0, yi - 100 * r[ci][0]) for yi, r in zip(y, with_ci, strict=True)]
    high = [max(0.0, 100 * r[ci][1] - yi) for yi, r in zip(y, with_ci, strict=True)]
    bars = ax.errorbar([r[x_key] for r in with_ci], y, yerr=[low, high], fmt="none", ecolor=color, capsize=3,
                       alpha=0.6, elinewidth=1)
    for artist in bars.get_children():
        artist.set_gid(gid)


def tradeoff_figure(rows: list[dict[str, Any]], x_key: str, *, lower_x_is_better: bool, xlabel: str,
                    metric: str = "top1") -> Figure:
    """``metric`` (top-1 by default, or mIoU) against ``x_key``, one marker series per method, Pareto front as a
    line, unreduced as a star, and each point's 95% interval (``<metric>_ci95``, where the row has one) as an
    error bar.

    Artists are tagged (``get_gid``): ``method:NAME``, ``unreduced``, ``pareto``, and ``ci:NAME`` /
    ``ci:unreduced`` for the error bars.  The figure is not registered with pyplot (nothing to close).

    Raises:
        PlotsUnavailable: matplotlib is not installed.
    """
    fig = _figure_class()(figsize=(7, 4.5))
    ax = fig.subplots()
    done = [r for r in rows if metric in r and r.get(x_key) is not None]
    for method in sorted({r["method"] for r in done if r["method"] != UNREDUCED}):
        mine = sorted((r for r in done if r["method"] == method), key=lambda r: r[x_key])
        (line,) = ax.plot([r[x_key] for r in mine], [100 * r[metric] for r in mine], "o-", label=method, alpha=0.8,
                          gid=f"method:{method}")
        _interval_bars(ax, mine, x_key, line.get_color(), f"ci:{method}", metric)
    base = [r for r in done if r["method"] == UNREDUCED]
    if base:
        ax.plot([base[0][x_key]], [100 * base[0][metric]], "k*", markersize=14, label="unreduced", gid="unreduced")
        _interval_bars(ax, base[:1], x_key, "k", "ci:unreduced", metric)
    points = [(r[x_key], 100 * r[metric]) for r in done]
    front = pareto_front(points, lower_x_is_better=lower_x_is_better)
    if front:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="grey", linewidth=2,
                label="Pareto front", gid="pareto", zorder=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{METRIC_LABELS[metric]}, bars: 95% interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def plot_tradeoffs(rows: list[dict[str, Any]], out_dir: str | Path, metric: str = "top1") -> list[Path]:
    """Write the two trade-off plots of ``metric`` (:func:`plot_names`); returns their paths.

    Raises:
        PlotsUnavailable: matplotlib is not installed (nothing written).
    """
    _figure_class()
    out_dir = Path(out_dir)
    paths = []
    names = plot_names(metric)
    for name, key, lower, label in (
        (names[0], "gmacs", True, "GMACs per image"),
        (names[1], "images_per_s", False, "images / s (measured)"),
    ):
        fig = tradeoff_figure(rows, key, lower_x_is_better=lower, xlabel=label, metric=metric)
        fig.savefig(out_dir / name, dpi=120)
        paths.append(out_dir / name)
    return paths
