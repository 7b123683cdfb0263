"""Where does a method's batch-1 time go, beyond what its token counts cost?  An op profile against the ceiling.

For each method at ``--budget`` on DeiT-S (random weights, 224², CPU, fp32, batch 1), three models
are timed alternately in one process (medians of ``--repeats``): the unreduced model, the reduced
one, and the ceiling, a copy that reaches the same token counts by slicing
(:mod:`tokenreduce.eval.ceiling`).  Then the reduced model and the ceiling are profiled
(``torch.profiler``, ``--profile-forwards`` forwards each) and the script prints, per forward:

* the efficiency (speed-up × GMACs ratio) of the method and of the ceiling, and their gap;
* the ATen ops each runs and their total self time, and the difference;
* the ops whose self time grows most from the ceiling to the method (count and µs per forward).

The difference in op count times the per-op fixed cost of this machine is what the method's own
work costs at batch 1; it is the evidence behind the batch-1 gaps in docs/benchmarks.md.

    python benchmarks/latency_profile.py                         # every fixed-schedule method, ~4 min on 2 cores
    python benchmarks/latency_profile.py --methods tome tps --top 12
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import tokenreduce as tr
from tokenreduce.eval.ceiling import schedule_only_model
from tokenreduce.methods import get_method
from tokenreduce.threads import set_threads

DATA_DEPENDENT = {"ltmp"}  # no schedule, so no ceiling (benchmarks/ltmp_speed.py)


def op_profile(run: Callable[[], object], forwards: int) -> dict[str, tuple[float, float]]:
    """ATen op name → (calls, self CPU µs) per forward, over ``forwards`` forwards."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(forwards):
            run()
    return {e.key: (e.count / forwards, e.self_cpu_time_total / forwards) for e in prof.key_averages()}


def profile_difference(
    own: dict[str, tuple[float, float]], base: dict[str, tuple[float, float]], top: int
) -> tuple[list[float], list[float], str]:
    """Two :func:`op_profile` results side by side: ops per forward and self ms of each, and the ``top`` ops
    whose self time grows most from ``base`` to ``own`` as "name +calls/µs" (per forward)."""
    calls = [sum(c for c, _ in p.values()) for p in (own, base)]
    self_ms = [sum(t for _, t in p.values()) / 1e3 for p in (own, base)]
    grown = sorted(((own[k][1] - base.get(k, (0, 0))[1], k) for k in own), reverse=True)[:top]
    detail = ", ".join(f"{k.removeprefix('aten::')} {own[k][0] - base.get(k, (0, 0))[0]:+.0f}/{d:.0f}"
                       for d, k in grown if d > 0)
    return calls, self_ms, detail


def alternate_medians(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Milliseconds per forward of every model, taking turns; medians."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(x)
            seconds[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every fixed-schedule method")
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=31, help="timed forwards per model (medians)")
    parser.add_argument("--profile-forwards", type=int, default=10)
    parser.add_argument("--top", type=int, default=6, help="ops listed per method")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    set_threads(args.threads)
    torch.manual_seed(0)
    network = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(1, 3, *network.patch_embed.img_size)
    methods = args.methods or [m for m in tr.methods() if m not in DATA_DEPENDENT]
    print(f"# {args.model}, batch 1, fp32, {platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'method':<11} {'eff.':>5} {'ceil.':>5} {'gap':>5} {'ops/fwd':>8} {'ceil.':>6} {'extra':>6} "
          f"{'self ms':>8} {'ceil.':>6} {'extra':>6}  largest extra self time (calls, µs per forward)")
    with torch.inference_mode():
        for method in methods:
            learned = get_method(method).resolve({})[0].learned
            reduced = tr.apply(copy.deepcopy(network), method, budget=args.budget, untrained=learned)
            handle = tr.reducer(reduced)
            ceiling = schedule_only_model(copy.deepcopy(network), handle.schedule(handle.info.num_tokens))
            models = {"unreduced": network, "reduced": reduced, "ceiling": ceiling}
            for model in models.values():
                for _ in range(3):
                    model(x)
            ms = alternate_medians(models, x, args.repeats)
            stats = tr.stats(reduced)
            ratio = stats.gmacs / stats.gmacs_unreduced
            own_gmacs = handle.extra_macs(tr.last_forward(reduced).num_tokens_in) / 1e9  # its scorers, predictors
            ceiling_ratio = (stats.gmacs - own_gmacs) / stats.gmacs_unreduced
            eff = ms["unreduced"] / ms["reduced"] * ratio
            ceil_eff = ms["unreduced"] / ms["ceiling"] * ceiling_ratio
            own = op_profile(lambda model=reduced: model(x), args.profile_forwards)
            base = op_profile(lambda model=ceiling: model(x), args.profile_forwards)
            calls, self_ms, detail = profile_difference(own, base, args.top)
            print(f"{method:<11} {eff:>5.2f} {ceil_eff:>5.2f} {ceil_eff - eff:>5.2f} {calls[0]:>8.0f} {calls[1]:>6.0f} "
                  f"{calls[0] - calls[1]:>+6.0f} {self_ms[0]:>8.1f} {self_ms[1]:>6.1f} {self_ms[0] - self_ms[1]:>+6.1f}"
                  f"  {detail}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
