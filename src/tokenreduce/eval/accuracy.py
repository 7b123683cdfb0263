"""Accuracy under token reduction: top-1 / top-5, GMACs and images/s, reduced vs unreduced.

Two entry points:

- :func:`evaluate_reference` — the bundled Fashion-MNIST ViT on the bundled 10k
  test set, for the unreduced model and every method (its default where it applies,
  and a common ``budget``).  Offline, CPU-only, nothing downloaded.
- :func:`evaluate_imagefolder` — any timm model on an ImageFolder (ImageNet
  validation layout) read with timm's transforms and the model's own data config.

Both run under ``torchrun``: every rank evaluates a disjoint shard (sample ``i``
goes to rank ``i mod world``; no padding, so every sample is counted exactly once)
and the counts are summed with ``all_reduce``.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..api import apply, gmacs, methods, reducer, remove, stats
from ..distributed import rank_world
from ..methods import get_method
from ..methods.base import ModelInfo
from ..models import model_info
from ..training.tasks import logits_of
from .throughput import TimingResult, _timer, interleaved_seconds, paired_speedup

Score = TypeVar("Score")

UNREDUCED = "unreduced"


@dataclass
class Counts:
    """Correct predictions and samples seen; GMACs summed over images (from each forward's stats)."""

    correct1: int = 0
    correct5: int = 0
    total: int = 0
    gmacs_sum: float = 0.0

    def add(self, logits: Tensor, labels: Tensor, gmacs_per_image: float) -> None:
        """Count one batch: ``logits`` B×K, ``labels`` B."""
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # B×k
        hit = top == labels[:, None]
        self.correct1 += int(hit[:, 0].sum())
        self.correct5 += int(hit.any(-1).sum())
        self.total += int(labels.numel())
        self.gmacs_sum += gmacs_per_image * labels.numel()

    def all_reduce(self) -> Counts:
        """Sum the counts over all ranks (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        t = torch.tensor([self.correct1, self.correct5, self.total, self.gmacs_sum], dtype=torch.float64)
        dist.all_reduce(t)
        return Counts(int(t[0]), int(t[1]), int(t[2]), float(t[3]))

    @property
    def top1(self) -> float:
        return self.correct1 / self.total if self.total else float("nan")

    @property
    def top5(self) -> float:
        return self.correct5 / self.total if self.total else float("nan")

    @property
    def gmacs(self) -> float:
        return self.gmacs_sum / self.total if self.total else float("nan")


@dataclass
class Config:
    """One row of an evaluation: a method (``None``: unreduced) with parameters and/or a budget.

    ``weights``: a state dict (safetensors) the model runs this row with instead of its own, e.g. a backbone
    fine-tuned with the reduction on (:func:`finetuned_configs`); the model gets its own weights back after.
    """

    method: str | None
    params: dict[str, Any] = field(default_factory=dict)
    budget: float | None = None
    label: str = ""
    weights: str | None = None

    def __post_init__(self) -> None:
        if not self.label:
            if self.method is None:
                self.label = UNREDUCED
            elif self.budget is not None:
                self.label = f"{self.method}@{self.budget:g}"
            else:
                extra = ",".join(f"{k}={v}" for k, v in self.params.items())
                self.label = f"{self.method}" + (f"({extra})" if extra else " (default)")


Z95 = 1.959964
"""The standard normal quantile of a two-sided 95% interval."""

DEFAULT_SEEDS = 3
"""Seeds a seeded method is evaluated over by default (0, 1, 2)."""


def wilson_interval(correct: float, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``correct / total`` (fractions, not percent).

    ``p̂ = correct/total``; centre ``(p̂ + z²/2n) / (1 + z²/n)``, half-width
    ``z/(1 + z²/n) · sqrt(p̂(1−p̂)/n + z²/4n²)``.  Unlike the normal (Wald) interval it stays
    inside [0, 1] and is not empty at 0 or ``total`` correct.  ``correct`` may be a mean
    count (a mean over seeds), then it is the interval of that mean accuracy's counts.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when ``total`` is 0.

    Raises:
        ValueError: ``correct`` outside ``[0, total]`` or ``total`` negative.
    """
    if total < 0 or not 0 <= correct <= total:
        raise ValueError(f"wilson_interval needs 0 <= correct <= total, got correct={correct}, total={total}")
    if total == 0:
        return float("nan"), float("nan")
    p = correct / total
    z2n = z * z / total
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / total + z2n / (4 * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def seed_list(config: Config, seeds: int = DEFAULT_SEEDS) -> list[int] | None:
    """The seeds ``config`` is evaluated over: ``[0, …, seeds − 1]`` for a seeded method
    (:attr:`~tokenreduce.methods.base.Reducer.seed_param`) whose parameters do not fix the seed,
    else ``None`` (one run).

    Raises:
        ValueError: ``seeds`` below 1.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if config.method is None:
        return None
    try:
        cls, _ = get_method(config.method).resolve(dict(config.params))
    except (ValueError, TypeError):  # a bad config: skip_reason reports it
        return None
    if cls.seed_param is None or cls.seed_param in config.params:
        return None
    return list(range(seeds))


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """This rank's samples: ``rank, rank + world, ...`` — disjoint, covering ``range(n)`` once, no padding."""
    return list(range(rank, n, world))


@torch.no_grad()
def count_correct(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device | str = "cpu",
    reduced: bool = False,
    progress: bool = True,
    desc: str = "eval",
    total: int | None = None,
) -> Counts:
    """Top-1/top-5 counts of ``model`` over ``batches`` of (images B×C×H×W, labels B) on this rank.

    With ``reduced`` the GMACs of every forward come from :func:`tokenreduce.stats`,
    otherwise from the analytic unreduced count.
    """
    counts = Counts()
    base_gmacs = None if reduced else gmacs(model)
    rank, _ = rank_world()
    for images, labels in tqdm(batches, desc=desc, total=total, disable=not progress or rank != 0, leave=False):
        images, labels = images.to(device), labels.to(device)
        logits = logits_of(model(images))
        per_image = stats(model).gmacs if reduced else base_gmacs
        counts.add(logits.float(), labels, per_image)
    return counts


def _alternate_seconds(models: dict[str, nn.Module], x: Tensor, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per forward of every model on ``x``, the models taking turns (order alternating per round)."""
    timers = {name: _timer(m, x, "fp32") for name, m in models.items()}
    return interleaved_seconds(timers, repeats, warmup=warmup, alternate_order=True)  # no model always first


def time_models(models: dict[str, nn.Module], x: Tensor, *, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Images/s of several models on the same batch ``x`` (B×C×H×W), timed alternately; medians.

    Uses the timer of :mod:`tokenreduce.eval.throughput` (the same protocol as
    ``tokenreduce benchmark``) but on a real batch, so data-dependent methods see
    real images.
    """
    seconds = _alternate_seconds(models, x, repeats, warmup)
    return {name: TimingResult(x.shape[0], s).images_per_second for name, s in seconds.items()}


def paired_speedups(models: dict[str, nn.Module], x: Tensor, base: str, *, repeats: int = 9,
                    warmup: int = 1) -> dict[str, float]:
    """Speed-up of every model in ``models`` over ``models[base]`` on the batch ``x`` (B×C×H×W), timed
    alternately: the median over rounds of the per-round ratio (:func:`~.throughput.paired_speedup`).

    Raises:
        KeyError: ``base`` is not one of ``models``.
    """
    if base not in models:
        raise KeyError(f"paired_speedups: the base {base!r} is not one of the models {sorted(models)}")
    seconds = _alternate_seconds(models, x, repeats, warmup)
    return {name: paired_speedup(seconds[base], s) for name, s in seconds.items() if name != base}


def time_against(base: nn.Module, reduced: nn.Module, x: Tensor, *, repeats: int = 9,
                 warmup: int = 1) -> dict[str, float]:
    """Images/s of ``base`` and ``reduced`` on the batch ``x`` (B×C×H×W), timed alternately (medians),
    and the speed-up as the median of the per-round ratios (:func:`~.throughput.paired_speedup`).

    Returns:
        ``{"unreduced": images/s, "reduced": images/s, "speedup": ratio}``.
    """
    seconds = _alternate_seconds({"unreduced": base, "reduced": reduced}, x, repeats, warmup)
    ips = {name: TimingResult(x.shape[0], s).images_per_second for name, s in seconds.items()}
    return {**ips, "speedup": paired_speedup(seconds["unreduced"], seconds["reduced"])}


def skip_reason(model: nn.Module, config: Config) -> str | None:
    """Why ``config`` cannot run on ``model`` (``None``: it can).  Never raises for a bad method config."""
    if config.method is None:
        return None
    try:
        cls, _ = get_method(config.method).resolve(config.params)
    except ValueError as err:
        return str(err)
    if cls.learned and "checkpoint" not in config.params:
        return "learned method: needs trained parameters (checkpoint=PATH); none are shipped for this model"
    try:
        apply(model, config.method, budget=config.budget, **config.params)
    except (ValueError, TypeError) as err:
        return f"cannot run on this model: {err}"
    finally:
        remove(model)
    return None


def evaluate_configs(
    model: nn.Module,
    configs: list[Config],
    make_batches: Any,
    *,
    timing_batch: Tensor,
    num_batches: int | None = None,
    device: torch.device | str = "cpu",
    repeats: int = 9,
    progress: bool = True,
    seeds: int = DEFAULT_SEEDS,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` under every config; one JSON-friendly row per config.

    A config of a seeded method (:attr:`~tokenreduce.methods.base.Reducer.seed_param`, e.g.
    ``random``) whose parameters do not fix the seed is evaluated once per seed ``0 … seeds−1``
    (:func:`seed_list`): one seed cannot rank methods closer than the spread between seeds.

    Args:
        model: eval-mode timm ViT, already on ``device``; left unreduced at the end.
        configs: the rows; a config that cannot run becomes a row with ``skipped``.
        make_batches: zero-argument callable returning a fresh iterable of
            (images B×C×H×W, labels B) — this rank's shard.
        timing_batch: the batch (B×C×H×W) on which images/s are measured.
        repeats: timed forwards per model for images/s (medians).
        seeds: seeds a seeded method is evaluated over (default 3: 0, 1, 2).

    Returns:
        Rows with ``label, method, params, budget, top1, top5, top1_ci95, top5_ci95,
        correct1, correct5, samples, gmacs, gmacs_analytic, images_per_s, speedup,
        delta_top1`` (``skipped`` instead when the config cannot run).  Counts are summed
        over ranks.  ``top1_ci95`` / ``top5_ci95`` are 95% Wilson score intervals
        (:func:`wilson_interval`, fractions), binomial over the ``samples`` images scored.

        A seeded row also has ``seeds`` (the list run), ``top1_per_seed`` and ``top5_per_seed``,
        and ``top1_std`` (sample standard deviation over seeds; ``None`` for one seed); its
        ``top1`` / ``top5`` are the means over seeds, ``correct1`` / ``correct5`` the mean
        counts, and its intervals are those of the mean accuracy's counts (mean correct over
        seeds, same total) — they describe the sampling of the images, not the spread over
        seeds.  Its ``params`` leave out the seed; GMACs and images/s are the seed-0 run's
        (the seed changes which tokens go, not how many).
    """
    remove(model)
    base = copy.deepcopy(model)
    timing_batch = timing_batch.to(device)
    rows: list[dict[str, Any]] = []
    base_top1: float | None = None
    base_gmacs = gmacs(model)
    for config in configs:
        row: dict[str, Any] = {"label": config.label, "method": config.method or UNREDUCED, "budget": config.budget}
        reason = skip_reason(model, config)
        if reason is not None:
            rows.append({**row, "params": config.params, "skipped": reason})
            continue
        if config.weights is not None:
            row["weights"] = config.weights
        with row_weights(model, config.weights):
            rows.append(_evaluate_row(model, base, config, row, make_batches, timing_batch, num_batches, device,
                                      repeats, progress, seeds, base_gmacs))
        if config.method is None:
            base_top1 = rows[-1]["top1"]
    for row in rows:
        if "top1" in row and base_top1 is not None:
            row["delta_top1"] = row["top1"] - base_top1
    return rows


@contextmanager
def row_weights(
    model: nn.Module, path: str | Path | None, load: Callable[[nn.Module, str | Path], None] | None = None
) -> Iterator[None]:
    """Run a row with the weights in ``path`` (``None``: the model's own), restoring the model's own after.

    ``load(model, path)`` reads them in (default: :func:`~tokenreduce.models.loading.load_weights`, strict).
    """
    if path is None:
        yield
        return
    if load is None:
        from ..models.loading import load_weights

        def load(target: nn.Module, source: str | Path) -> None:
            load_weights(target, source, name="the evaluated model")

    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    load(model, path)
    try:
        yield
    finally:
        model.load_state_dict(own)


@dataclass
class ConfigRuns(Generic[Score]):
    """What :func:`run_config` measured for one config.

    Attributes:
        scores: one score per seed run (one in all for an unseeded config), in seed order.
        seeds: the seeds run (:func:`seed_list`), or ``None`` for one unseeded run.
        params: the first run's resolved parameters (``{}`` unreduced), without the seed of a seeded config.
        gmacs_analytic: the first run's GMACs by formula (plus the caller's extra), or ``None`` when the
            counts are data-dependent (LTMP).
        images_per_s: ``{"unreduced": …, "reduced": …, "speedup": …}`` from the first run, timed
            alternately (:func:`time_against`).
    """

    scores: list[Score]
    seeds: list[int] | None
    params: dict[str, Any]
    gmacs_analytic: float | None
    images_per_s: dict[str, float]

    def common_fields(self, unreduced_gmacs: float) -> dict[str, Any]:
        """The row fields every evaluation reports alike: params, GMACs and speed."""
        ips = self.images_per_s
        return {"params": self.params, "gmacs_analytic": self.gmacs_analytic, "gmacs_unreduced": unreduced_gmacs,
                "images_per_s": ips["reduced"], "images_per_s_unreduced": ips["unreduced"],
                "speedup": ips["speedup"]}


def run_config(
    config: Config, row: dict[str, Any], *, target: nn.Module, timed: nn.Module, base: nn.Module,
    score: Callable[[str], Score], timing_batch: Tensor, repeats: int, seeds: int, unreduced_gmacs: float,
    extra_gmacs: float = 0.0, apply_kwargs: dict[str, Any] | None = None,
) -> ConfigRuns[Score]:
    """One evaluation row's runs: ``config``'s method applied to ``target`` once per seed (:func:`seed_list`),
    each run scored by ``score(description)``; the first run's GMACs and speed.

    Args:
        config: the row's method, parameters and budget (``method=None``: the unreduced model).
        row: the row being built; a calibrated default is recorded in it (``calibrated``).
        target: the module the method is applied to (the model, or a segmenter's backbone); left unreduced.
        timed: the model timed against ``base`` (the one ``target`` is part of); ``base``: an unreduced copy.
        score: scores the currently applied run over the data; its argument labels the progress bar.
        timing_batch: B×C×H×W on which images/s are measured (and calibration, where a default needs it).
        repeats: timed forwards per model (medians); seeds: seeds a seeded method is run over.
        unreduced_gmacs: the unreduced model's GMACs (the unreduced row's analytic count).
        extra_gmacs: GMACs outside ``target`` that every run adds (a segmenter's decoder).
        apply_kwargs: further :func:`~tokenreduce.apply` arguments (``restore=``).
    """
    run_seeds = seed_list(config, seeds)
    seed_param = get_method(config.method).resolve(dict(config.params))[0].seed_param if run_seeds else None
    scores: list[Score] = []
    params: dict[str, Any] = {}
    analytic: float | None = unreduced_gmacs
    ips: dict[str, float] = {}
    for seed in run_seeds or [None]:
        run_params = dict(config.params) if seed is None else {**config.params, seed_param: seed}
        try:
            if config.method is not None:
                apply(target, config.method, budget=config.budget, **(apply_kwargs or {}), **run_params)
                applied = reducer(target)
                if applied.needs_calibration(run_params):
                    # a default tuned for another model (PPT's τ): calibrated on the timing batch
                    value = applied.calibrate(target, timing_batch, config.budget, run_params)
                    row["calibrated"] = list(value) if isinstance(value, tuple) else value
            scores.append(score(config.label if seed is None else f"{config.label} seed {seed}"))
            if len(scores) == 1:  # schedule, GMACs and speed: the first (seed-0) run's
                if config.method is None:  # one model: its speed-up is 1 by definition
                    one = time_models({"m": base}, timing_batch, repeats=repeats)["m"]
                    ips = {"unreduced": one, "reduced": one, "speedup": 1.0}
                else:
                    params = stats(target).params
                    try:
                        analytic = gmacs(target, config.method, **_analytic_params(config.method, params))
                        analytic += extra_gmacs
                    except NotImplementedError:  # data-dependent counts (LTMP): only the measured GMACs exist
                        analytic = None
                    ips = time_against(base, timed, timing_batch, repeats=repeats)
        finally:
            remove(target)
    if run_seeds:
        params = {k: v for k, v in params.items() if k != seed_param}
    return ConfigRuns(scores, run_seeds, params, analytic, ips)


def _evaluate_row(
    model: nn.Module, base: nn.Module, config: Config, row: dict[str, Any], make_batches: Any, timing_batch: Tensor,
    num_batches: int | None, device: torch.device | str, repeats: int, progress: bool, seeds: int,
    base_gmacs: float,
) -> dict[str, Any]:
    """One row of :func:`evaluate_configs` (accuracy over every seed, GMACs and speed of the first)."""

    def score(desc: str) -> Counts:
        return count_correct(model, make_batches(), device=device, reduced=config.method is not None,
                             progress=progress, desc=desc, total=num_batches).all_reduce()

    measured = run_config(config, row, target=model, timed=model, base=base, score=score, timing_batch=timing_batch,
                          repeats=repeats, seeds=seeds, unreduced_gmacs=base_gmacs)
    runs = measured.scores
    first = runs[0]
    correct1 = sum(c.correct1 for c in runs) / len(runs)
    correct5 = sum(c.correct5 for c in runs) / len(runs)
    row.update(
        top1=correct1 / first.total if first.total else float("nan"),
        top5=correct5 / first.total if first.total else float("nan"),
        top1_ci95=list(wilson_interval(correct1, first.total)),
        top5_ci95=list(wilson_interval(correct5, first.total)),
        correct1=correct1,
        correct5=correct5,
        samples=first.total,
        gmacs=first.gmacs,
        **measured.common_fields(base_gmacs),
    )
    if measured.seeds:
        per_seed1 = [c.top1 for c in runs]
        row.update(
            seeds=measured.seeds,
            top1_per_seed=per_seed1,
            top5_per_seed=[c.top5 for c in runs],
            top1_std=statistics.stdev(per_seed1) if len(runs) > 1 else None,
        )
    return row


def _analytic_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Resolved parameters as :func:`tokenreduce.gmacs` takes them (lists → tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


DEFAULT_BUDGETS = (0.75, 0.6)
"""The budgets of a default evaluation: every method at each, its paper default only where it fits."""


def default_configs(
    info: ModelInfo, budgets: Iterable[float] = DEFAULT_BUDGETS, *, shipped: bool = False,
    names: Iterable[str] | None = None, task: str = "classification",
) -> list[Config]:
    """The unreduced model, then every method's default-evaluation rows for ``task``
    (:meth:`~tokenreduce.methods.base.Reducer.evaluation_rows`) on a model described by ``info``.

    With ``shipped`` (the bundled reference model) learned methods run from the reducer checkpoints
    shipped for it; a learned method without one stays in the table as skipped.
    """
    budgets = tuple(budgets)
    configs = [Config(None)]
    for name in names if names is not None else methods():
        cls = get_method(name)
        for label, params, budget in cls.evaluation_rows(info, budgets, task):
            checkpoint = cls.shipped_checkpoint(params, budget) if shipped and cls.learned else None
            if checkpoint is not None:
                params = {**params, "checkpoint": str(checkpoint)}
                label = f"{label} [{checkpoint.stem}]"
            configs.append(Config(name, params, budget, label=label))
    return configs


def reference_configs(budgets: float | Iterable[float] = DEFAULT_BUDGETS) -> list[Config]:
    """:func:`default_configs` for the bundled reference model, with its shipped learned reducers."""
    from ..models.reference import build_reference_model

    with torch.device("meta"):
        info = model_info(build_reference_model())
    return default_configs(info, (budgets,) if isinstance(budgets, (int, float)) else budgets, shipped=True)


FINETUNED_DIR = "results/finetune_table"
"""Where ``scripts/finetune_table.py`` writes its fine-tuned models (``tokenreduce evaluate`` lists them if present)."""


def finetuned_configs(folder: str | Path) -> list[Config]:
    """One row per fine-tuned model under ``folder``: every ``<name>/run/`` or ``<name>/`` sub-folder that holds
    ``model.safetensors`` + ``reducer.safetensors`` (what ``tokenreduce train --recipe`` and
    ``scripts/finetune_table.py`` write), run with its own weights and its reducer, labelled
    ``"<method> fine-tuned [<name>]"``; in name order.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
    """
    from ..checkpoint import read_reducer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"fine-tuned models folder {folder} not found")
    configs = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for run in (sub / "run", sub):
            weights, reducer_file = run / "model.safetensors", run / "reducer.safetensors"
            if weights.is_file() and reducer_file.is_file():
                method = read_reducer(reducer_file)[0]["method"]
                configs.append(Config(method, {"checkpoint": str(reducer_file)}, label=f"{method} fine-tuned "
                                      f"[{sub.name}]", weights=str(weights)))
                break
    return configs


def reference_checkpoint(method: str, params: dict[str, Any], budget: float | None = None) -> str | None:
    """The reducer checkpoint shipped for ``method`` on the reference model, or ``None`` (none needed / none
    shipped); the method's class decides which (:meth:`~tokenreduce.methods.base.Reducer.shipped_checkpoint`)."""
    cls, params = get_method(method).resolve(params)
    path = cls.shipped_checkpoint(params, budget) if cls.learned else None
    return None if path is None else str(path)


def batched(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive batches of (``x`` N×..., ``y`` N)."""
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def evaluate_reference(
    configs: list[Config] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 250,
    repeats: int = 9,
    checkpoint: str | None = None,
    progress: bool = True,
    model: nn.Module | None = None,
    device: torch.device | str = "cpu",
    seeds: int = DEFAULT_SEEDS,
) -> list[dict[str, Any]]:
    """Evaluate the bundled reference model on the bundled Fashion-MNIST test set.

    Args:
        configs: rows to evaluate (default: :func:`default_configs`).
        limit: evaluate the first ``limit`` test images only.
        batch_size: images per forward; the first batch is also the timing batch.
        checkpoint: another safetensors state dict for the reference architecture.
        model: the reference model already loaded (then ``checkpoint`` is not used).
        device: where the model runs.
        seeds: seeds a seeded method is evaluated over (:func:`evaluate_configs`).
    """
    from ..models.reference import load_reference_model, load_reference_testset, preprocess

    rank, world = rank_world()
    model = (load_reference_model(checkpoint) if model is None else model).to(device)
    images, labels = load_reference_testset(limit)
    x = preprocess(images)  # N×1×32×32
    mine = torch.tensor(shard_indices(len(x), rank, world), dtype=torch.long)
    xs, ys = x[mine], labels[mine]
    return evaluate_configs(
        model,
        configs if configs is not None else reference_configs(),
        lambda: batched(xs, ys, batch_size),
        timing_batch=x[:batch_size],
        num_batches=math.ceil(len(xs) / batch_size),
        device=device,
        repeats=repeats,
        progress=progress,
        seeds=seeds,
    )


def _percent_interval(interval: list[float] | None) -> str:
    """``[88.1, 89.4]`` (percent) or ``""`` when the row has no interval."""
    if not interval or any(v is None or math.isnan(v) for v in interval):
        return ""
    return f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A readable table: method, top-1 with its 95% interval, change vs unreduced, top-5, GMACs, images/s,
    speed-up.

    A row evaluated over several seeds shows its top-1 as mean ± sample std over the seeds
    (``83.50±0.90%``); the ``95% CI`` column is the Wilson score interval of top-1, binomial over
    the images scored (of the mean counts for a seeded row).
    """
    width = max([20, *(len(r["label"]) for r in rows)])
    head = f"{'method':<{width}} {'top-1':>13} {'95% CI':>14} {'Δ top-1':>8} {'top-5':>7} {'GMACs':>9} {'ratio':>6} "
    head += f"{'img/s':>8} {'speed-up':>8}"
    lines = [head, "-" * len(head)]
    seeded: set[int] = set()
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['label']:<{width}} skipped: {r['skipped']}")
            continue
        ratio = r["gmacs"] / r["gmacs_unreduced"]
        top1 = f"{100 * r['top1']:.2f}"
        if r.get("top1_std") is not None:
            top1 += f"±{100 * r['top1_std']:.2f}"
            seeded.add(len(r["seeds"]))
        lines.append(
            f"{r['label']:<{width}} {top1 + '%':>13} {_percent_interval(r.get('top1_ci95')):>14} "
            f"{100 * r.get('delta_top1', 0.0):>+8.2f} {100 * r['top5']:>6.2f}% {r['gmacs']:>9.4f} {ratio:>6.2f} "
            f"{r['images_per_s']:>8.0f} {r['speedup']:>7.2f}x"
        )
    if seeded:
        counts = "/".join(str(n) for n in sorted(seeded))
        lines.append(f"±: mean ± sample std over {counts} seeds (seeds 0, 1, ...); 95% CI: Wilson score interval "
                     "over the images scored")
    return "\n".join(lines)
