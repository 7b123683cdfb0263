"""Throughput and latency of a model, reduced vs unreduced, measured side by side.

Protocol (following ToMe's benchmark and DynamicViT's): ``eval()``, ``no_grad``,
a fixed random input, warm-up iterations discarded, then ``repeats`` timed
forwards.  The reduced and the unreduced model are timed alternately, one forward
each in turn, so drift in machine load hits both equally; results are medians.
On CUDA the timing uses events and synchronises around every timed call.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..api import apply, gmacs, last_forward, reducer, stats
from ..models import adapter_for
from .ceiling import schedule_only_model


@dataclass(frozen=True)
class TimingResult:
    """Seconds per forward of one model at one batch size."""

    batch_size: int
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.median

    def percentile(self, q: float) -> float:
        """Latency percentile ``q`` in [0, 100] (nearest rank), seconds."""
        ordered = sorted(self.seconds)
        rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
        return ordered[rank]


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if dtype == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    raise ValueError(f"dtype must be fp32, bf16 or fp16, got {dtype!r}")


def _timer(model: nn.Module, x: torch.Tensor, dtype: str) -> Callable[[], float]:
    device = x.device

    def run_once() -> float:
        with torch.no_grad(), _autocast(device, dtype):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                model(x)
                end.record()
                torch.cuda.synchronize(device)
                return start.elapsed_time(end) / 1e3
            return wall_clock(lambda: model(x))()

    return run_once


def interleaved_seconds(
    runs: dict[str, Callable[[], float]],
    repeats: int,
    *,
    warmup: int = 0,
    alternate_order: bool = False,
    progress: bool = False,
    desc: str = "timing",
) -> dict[str, list[float]]:
    """Seconds of every run, the runs taking turns: the one timing loop of the project.

    Each run is a zero-argument callable that does its work once and returns the seconds it took
    (so a CUDA run can time itself with events).  ``warmup`` untimed rounds come first; then
    ``repeats`` rounds call every run once, in turn, so slow drifts of a shared machine hit all
    of them alike (``alternate_order``: the order reverses every other round).

    Returns:
        name → the ``repeats`` timings, in order.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    items = list(runs.items())
    for i in tqdm(range(repeats), desc=desc, disable=not progress, leave=False):
        for name, run in items[::-1] if alternate_order and i % 2 else items:
            seconds[name].append(run())
    return seconds


def paired_speedup(base_seconds: list[float], reduced_seconds: list[float]) -> float:
    """Speed-up of a reduced model over its base from alternate timings: the median, over rounds,
    of ``base_i / reduced_i``.

    The two timings of a round are taken back to back, so load that drifts on a shared machine
    cancels in each ratio, where a ratio of two medians can pair a fast round of one with a slow
    round of the other.
    """
    if len(base_seconds) != len(reduced_seconds) or not base_seconds:
        raise ValueError("paired_speedup needs the same number (≥ 1) of timings of both models")
    return statistics.median(b / r for b, r in zip(base_seconds, reduced_seconds, strict=True))


def wall_clock(fn: Callable[[], Any]) -> Callable[[], float]:
    """``fn`` as a run for :func:`interleaved_seconds`: calls it and returns the wall-clock seconds."""

    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def time_forward(
    models: dict[str, nn.Module],
    batch_size: int,
    img_size: int | tuple[int, int],
    *,
    repeats: int = 10,
    warmup: int = 2,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "timing",
    channels: int = 3,
) -> dict[str, TimingResult]:
    """Time several models on the same input, interleaved.

    Args:
        models: name → model, all already on ``device`` and in eval mode.
        batch_size: images per forward.
        img_size: input height/width; channels: input channels.
        repeats: timed forwards per model; warmup: untimed forwards per model first.
        dtype: ``fp32``, ``bf16`` or ``fp16`` (autocast).

    Returns:
        name → :class:`TimingResult`.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("repeats and batch_size must be >= 1 and warmup >= 0")
    device = torch.device(device)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, channels, h, w, generator=gen).to(device)
    timers = {name: _timer(m, x, dtype) for name, m in models.items()}
    seconds = interleaved_seconds(timers, repeats, warmup=warmup, progress=progress, desc=desc)
    return {name: TimingResult(batch_size, s) for name, s in seconds.items()}


RECOMPILE_LIMIT = "recompile_limit"  # dynamo's name since torch 2.6 (before: ``cache_size_limit``)


def allow_many_compiled_models() -> None:
    """Let one process ``torch.compile`` dozens of models, each with its own static-shape graph.

    Every timm ViT shares the same ``forward`` code, and dynamo's recompile limit (8 per code
    object) would otherwise send every model after the 8th back to eager, silently.
    Automatic dynamic shapes are turned off as well, so a model whose shapes differ from
    the previous one's gets a static graph, as it would deployed alone.  Process-wide.
    """
    config = torch._dynamo.config
    limit = RECOMPILE_LIMIT if hasattr(config, RECOMPILE_LIMIT) else "cache_size_limit"  # torch < 2.6 name
    setattr(config, limit, max(getattr(config, limit), 1024))
    config.automatic_dynamic_shapes = False


def _latency_ms(timing: TimingResult) -> dict[str, float]:
    return {"p50": timing.median * 1e3, "p90": timing.percentile(90) * 1e3}


def compare_throughput(
    model: nn.Module,
    method: str,
    params: dict[str, Any] | None = None,
    *,
    budget: float | None = None,
    batch_size: int = 32,
    img_size: int | None = None,
    repeats: int = 10,
    warmup: int = 2,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    progress: bool = True,
    compile: bool = False,
    ceiling: bool = False,
    baseline: nn.Module | None = None,
) -> dict[str, Any]:
    """Images/s of ``model`` with and without ``method``, measured in one process.

    With ``ceiling`` (fixed-schedule methods), a third copy that reaches the same
    token counts by slicing (:mod:`tokenreduce.eval.ceiling`) is timed in the same
    loop; ``ceiling_efficiency`` is what the schedule allows on this hardware
    before any of the method's own work: its speed-up times the GMACs it runs (the
    method's without its own modules, ``ceiling_gmacs_ratio``).

    The unreduced model is a deep copy of ``model`` (same weights, same attention
    kernel).  ``model`` itself is left with the method applied.  With ``compile``
    both are wrapped in ``torch.compile`` (compilation happens during warm-up,
    which is then at least one forward).

    ``baseline``, when given, is timed as the unreduced model as it is (not copied,
    not compiled again): pass one prepared runner, e.g. ``torch.compile(copy)`` of
    an unreduced model with the same architecture, to share it across many calls
    (compiling is the slow part of a compiled benchmark on a CPU).  It must be on
    ``device`` and in eval mode.

    Returns:
        A JSON-friendly dict with both throughputs, the speed-up, both GMACs and
        the efficiency (speed-up divided by the GMACs ratio's inverse).
    """
    if baseline is not None and baseline.training:
        raise ValueError("compare_throughput: baseline must be in eval mode")
    params = dict(params or {})
    model = model.eval().to(device)
    base = copy.deepcopy(model)
    apply(model, method, budget=budget, **params)
    channels, *size = adapter_for(model).input_size(model)
    if img_size is None:
        img_size = tuple(size)
    runners: dict[str, nn.Module] = {"unreduced": base if baseline is None else baseline, "reduced": model}
    if ceiling:
        applied = reducer(model)
        runners["schedule"] = schedule_only_model(copy.deepcopy(base), applied.schedule(applied.info.num_tokens))
    if compile:  # a shared baseline is already prepared: timed as it is
        runners = {name: m if m is baseline else torch.compile(m) for name, m in runners.items()}
        warmup = max(warmup, 1)
    timings = time_forward(
        runners,
        batch_size,
        img_size,
        repeats=repeats,
        warmup=warmup,
        dtype=dtype,
        device=device,
        progress=progress,
        desc=f"{method} bs={batch_size} {dtype}",
        channels=channels,
    )
    red_stats = stats(model)
    base_ips, red_ips = timings["unreduced"].images_per_second, timings["reduced"].images_per_second
    speedup = red_ips / base_ips
    gmacs_ratio = red_stats.gmacs / red_stats.gmacs_unreduced
    # the slicing copy runs the schedule's blocks only, not the method's own modules (DynamicViT's
    # predictors, Cropr's scorers): its efficiency is taken at the GMACs it runs
    applied = reducer(model)
    own_gmacs = applied.extra_macs(last_forward(model).num_tokens_in) / 1e9
    ceiling_ratio = (red_stats.gmacs - own_gmacs) / red_stats.gmacs_unreduced
    return {
        "method": method,
        "params": red_stats.params,
        "batch_size": batch_size,
        "dtype": dtype,
        "compiled": compile,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "shared_baseline": baseline is not None,
        "gmacs_unreduced": gmacs(base),
        "gmacs_reduced": red_stats.gmacs,
        "gmacs_ratio": gmacs_ratio,
        "images_per_s_unreduced": base_ips,
        "images_per_s_reduced": red_ips,
        "speedup": speedup,
        "ideal_speedup": 1.0 / gmacs_ratio,
        "efficiency": speedup * gmacs_ratio,
        "ceiling_speedup": timings["schedule"].images_per_second / base_ips if ceiling else None,
        "ceiling_gmacs_ratio": ceiling_ratio if ceiling else None,
        "ceiling_efficiency": timings["schedule"].images_per_second / base_ips * ceiling_ratio if ceiling else None,
        "latency_ms_unreduced": _latency_ms(timings["unreduced"]),
        "latency_ms_reduced": _latency_ms(timings["reduced"]),
        "timings": {k: asdict(v) for k, v in timings.items()},
    }
