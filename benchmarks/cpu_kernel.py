"""The fused CPU kernels against the PyTorch ops, side by side in one process.

For every fixed-schedule method with a fused step (ToMe, PPT and BAT merge with bipartite
matching; eTPS and dTPS squeeze), at its default and at ``--budget``, this times the unreduced
DeiT-S and the reduced model with the kernels on and off
(``tokenreduce.ops.cpu_kernels.set_cpu_kernels``), the three taking turns forward after forward,
and prints medians, the kernel's speed-up over the PyTorch ops, and both efficiencies (speed-up
over the unreduced model × GMACs ratio).

    python benchmarks/cpu_kernel.py                          # batch 1 and 32, ~10 minutes on 2 cores
    python benchmarks/cpu_kernel.py --batch-sizes 1 --repeats 101 --methods tome
    python benchmarks/cpu_kernel.py --op-only                # the merge steps alone (ToMe, ToMe for SD), tight loop
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable

import timm
import torch

import tokenreduce as tr
from tokenreduce.eval.throughput import interleaved_seconds, wall_clock
from tokenreduce.ops import cpu_kernels
from tokenreduce.ops.merge import bipartite_merge
from tokenreduce.ops.unmerge import window_groups
from tokenreduce.state import TokenState
from tokenreduce.threads import set_threads

KERNEL_METHODS = ("tome", "ppt", "bat", "tps", "dtps")
"""The fixed-schedule methods with a fused step: bipartite merging (ToMe, PPT, BAT) and the squeeze (eTPS, dTPS)."""


def median_seconds(runs: list[tuple[str, Callable[[], object], str]], repeats: int) -> dict[str, float]:
    """Median seconds of each ``(name, call, kernel mode)``, the calls taking turns (order flipped every round)."""
    def run(call: Callable[[], object], mode: str) -> Callable[[], float]:
        timed = wall_clock(call)

        def in_mode() -> float:
            cpu_kernels.set_cpu_kernels(mode)  # untimed: the mode switch is not the op's cost
            return timed()

        return in_mode

    with torch.inference_mode():
        times = interleaved_seconds({name: run(call, mode) for name, call, mode in runs}, repeats, warmup=1,
                                    alternate_order=True)
    return {name: statistics.median(values) for name, values in times.items()}


def time_alternating(model_base, model_reduced, images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per forward of the unreduced model and the reduced one, kernel on and off."""
    return median_seconds(
        [("base", lambda: model_base(images), "on"), ("on", lambda: model_reduced(images), "on"),
         ("off", lambda: model_reduced(images), "off")],
        repeats,
    )


def time_merge_step(batch_size: int, num_tokens: int, r: int, repeats: int) -> dict[str, float]:
    """Median seconds of one ToMe merge step (DeiT-S widths: C = 384, head dim 64), kernel on and off."""
    g = torch.Generator().manual_seed(0)
    state = TokenState(
        torch.randn(batch_size, num_tokens, 384, generator=g), torch.rand(batch_size, num_tokens, 1, generator=g) + 1
    )
    keys = torch.randn(batch_size, num_tokens, 64, generator=g)
    return median_seconds([(mode, lambda: bipartite_merge(state, keys, r), mode) for mode in ("on", "off")], repeats)


def time_group_rows(batch_size: int, r: int, repeats: int) -> dict[str, float]:
    """Median seconds of ToMe for SD's merge into group means and its unmerge into the stream (DeiT-S: 197
    tokens, C = 384, a 14×14 grid, stride 2), kernel on and off; the groups are found once, outside the loop."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 197, 384, generator=g)
    with torch.inference_mode():
        groups = window_groups(x, r, 1, (14, 14), 2)
    y = torch.randn(batch_size, groups.num_merged, 384, generator=g)
    runs = [(f"{name} {mode}", call, mode) for mode in ("on", "off")
            for name, call in (("merge", lambda: groups.merge(x)), ("unmerge", lambda: groups.unmerge_add(x, y)))]
    return median_seconds(runs, repeats)


def op_only(threads: int) -> None:
    print(f"# one merge step (C = 384, keys 64-d, sizes carried), fp32, cpu, {threads} threads, tight loop")
    print(f"{'bs':>3} {'tokens':>6} {'r':>3} {'kernel':>9} {'torch ops':>9} {'kernel gain':>11}")
    for batch_size, num_tokens, r in ((1, 197, 13), (1, 197, 59), (32, 197, 13), (32, 100, 40), (32, 53, 13)):
        t = time_merge_step(batch_size, num_tokens, r, 301 if batch_size == 1 else 61)
        print(f"{batch_size:>3} {num_tokens:>6} {r:>3} {t['on'] * 1e6:>7.0f}µs {t['off'] * 1e6:>7.0f}µs "
              f"{t['off'] / t['on']:>10.2f}x")
    print(f"\n# ToMe for SD's merge into group means and unmerge into the stream (197 tokens, C = 384), fp32, cpu, "
          f"{threads} threads, tight loop")
    print(f"{'bs':>3} {'r':>3} {'step':>8} {'kernel':>9} {'torch ops':>9} {'kernel gain':>11}")
    for batch_size, r in ((1, 92), (32, 92)):
        t = time_group_rows(batch_size, r, 301 if batch_size == 1 else 61)
        for step in ("merge", "unmerge"):
            on, off = t[f"{step} on"], t[f"{step} off"]
            print(f"{batch_size:>3} {r:>3} {step:>8} {on * 1e6:>7.0f}µs {off * 1e6:>7.0f}µs {off / on:>10.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--methods", nargs="+", default=list(KERNEL_METHODS), choices=KERNEL_METHODS)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=None, help="default: 51 at batch 1, 7 above")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--op-only", action="store_true", help="time the merge steps alone for a few shapes")
    args = parser.parse_args(argv)

    set_threads(args.threads)
    cpu_kernels.set_cpu_kernels("on")  # build now (or fail loudly), not inside a timed forward
    if args.op_only:
        op_only(args.threads)
        cpu_kernels.set_cpu_kernels("auto")
        return 0
    network = timm.create_model(args.model, pretrained=False).eval()
    full_gmacs = tr.gmacs(network)
    print(f"# {args.model}, fp32, cpu, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'method':<6} {'setting':<14} {'bs':>3} {'GMACs ratio':>11} {'unreduced':>10} {'kernel':>9} "
          f"{'torch ops':>9} {'kernel gain':>11} {'eff. kernel':>11} {'eff. ops':>8}")
    for method in args.methods:
        for budget in (None, args.budget):
            budget_kw = {} if budget is None else {"budget": budget}
            reduced = tr.apply(copy.deepcopy(network), method, untrained=True, **budget_kw)
            ratio = tr.gmacs(network, method, **({} if budget is None else {"budget": budget})) / full_gmacs
            for batch_size in args.batch_sizes:
                repeats = args.repeats or (51 if batch_size == 1 else 7)
                images = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
                t = time_alternating(network, reduced, images, repeats)
                setting = "default" if budget is None else f"budget={budget}"
                print(f"{method:<6} {setting:<14} {batch_size:>3} {ratio:>11.3f} {t['base'] * 1e3:>8.1f}ms "
                      f"{t['on'] * 1e3:>7.1f}ms {t['off'] * 1e3:>7.1f}ms {t['off'] / t['on']:>10.3f}x "
                      f"{t['base'] / t['on'] * ratio:>11.2f} {t['base'] / t['off'] * ratio:>8.2f}")
                sys.stdout.flush()
    cpu_kernels.set_cpu_kernels("auto")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
