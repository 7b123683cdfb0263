"""The efficiency table shared by the per-family speed benchmarks (``eva_speed.py``, ``hf_speed.py``):
each method at one budget, reduced vs unreduced timed alternately in one process
(:func:`tokenreduce.eval.throughput.compare_throughput`), at a large batch and at batch 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from tokenreduce.eval.throughput import compare_throughput

KNOBS = ("r", "keep_rate", "p")


def add_arguments(parser: argparse.ArgumentParser, methods: list[str]) -> None:
    """The flags every family benchmark takes."""
    parser.add_argument("--methods", nargs="+", default=methods)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-ceiling", action="store_true", help="skip the schedule-only copy")
    parser.add_argument("--trials", type=int, default=1,
                        help="independent batch-1 comparisons per method (fresh copies, each its own alternating "
                        "loop); the row is the median one, with the range of all")
    parser.add_argument("--only-latency", action="store_true", help="batch 1 only")
    parser.add_argument("--json", help="write all rows here")


def efficiency_rows(make_model: Callable[[], nn.Module], args: argparse.Namespace, **compare: Any) -> list[dict]:
    """Print one line per method (GMACs ratio, speed-up, efficiency and ceiling at ``--batch-size`` and
    at batch 1) and return the rows; ``make_model`` gives a fresh unreduced model for every run."""
    big_label = f"bs{args.batch_size} speed-up"
    print(f"{'method':<8} {'setting':<30} {'GMACs ratio':>11} {'ideal':>6} {big_label:>13} "
          f"{'eff.':>5} {'ceil.':>5} {'bs1 speed-up':>12} {'eff.':>5} {'ceil.':>5}")
    rows = []
    sizes = [(1, args.latency_repeats)] if args.only_latency else [(args.batch_size, args.repeats),
                                                                   (1, args.latency_repeats)]
    for method in args.methods:
        result, trials = {}, []
        for bs, repeats in sizes:
            runs = [compare_throughput(make_model(), method, budget=args.budget, batch_size=bs, repeats=repeats,
                                       warmup=1, progress=False, ceiling=not args.no_ceiling, **compare)
                    for _ in range(args.trials if bs == 1 else 1)]
            runs.sort(key=lambda run: run["efficiency"])
            result[bs] = runs[len(runs) // 2]
            if bs == 1:
                trials = runs
        big, one = result.get(args.batch_size) if not args.only_latency else None, result[1]
        knob = next((f"{k}={v}" for k, v in one["params"].items() if k in KNOBS), "")
        throughput = (f"{big['speedup']:>12.2f}x {big['efficiency']:>5.2f} {_ceil(big)}" if big
                      else f"{'-':>13} {'-':>5} {'-':>5}")
        spread = (f"  [{trials[0]['efficiency']:.2f}-{trials[-1]['efficiency']:.2f} over {len(trials)} trials]"
                  if len(trials) > 1 else "")
        print(f"{method:<8} {f'budget={args.budget} ({knob})':<30} {one['gmacs_ratio']:>11.3f} "
              f"{one['ideal_speedup']:>5.2f}x {throughput} "
              f"{one['speedup']:>11.2f}x {one['efficiency']:>5.2f} {_ceil(one)}{spread}")
        sys.stdout.flush()
        rows.append({"method": method, "budget": args.budget, "throughput": big, "latency": one,
                     "latency_trials": [(run["efficiency"], run["ceiling_efficiency"]) for run in trials]})
    return rows


def _ceil(row: dict) -> str:
    return "-".rjust(5) if row.get("ceiling_efficiency") is None else f"{row['ceiling_efficiency']:>5.2f}"
