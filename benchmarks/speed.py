"""Do the saved GMACs turn into time?  Speed-up vs GMACs ratio for every method.

For DeiT-S (random weights, 224², CPU, fp32 by default) and every method at its
default and at ``--budget`` (0.6), this prints the GMACs ratio, the measured
speed-up at batch 32 (throughput) and at batch 1 (latency), and the efficiency =
speed-up × GMACs ratio (1.0 means the time saved equals the GMACs saved).  Each
row is measured in one process against a copy of the unreduced model with the
same attention kernel, the two timed alternately, medians of repeats.  The
``ceil.`` columns time, in the same loop, a copy that reaches the method's token
counts by slicing (no method work at all): the efficiency the schedule itself
allows on this hardware, so ``ceil. − eff.`` is what the method's own ops cost.

    python benchmarks/speed.py                       # all methods, ~10 minutes on 2 cores
    python benchmarks/speed.py --methods tome evit --repeats 5 --json speed.json
    python benchmarks/speed.py --compile --only-latency --methods tome   # torch.compile'd models (compiled in warm-up)
    python benchmarks/speed.py --compile --only-latency --no-ceiling     # every method compiled, ~1.5 min per row

With ``--compile`` the unreduced model is compiled once per batch size and shared by
all rows (it is the same graph every time), each model keeps its own static-shape
graph (dynamo's automatic dynamic shapes are off, and its recompile limit is raised
so that many models in one process never fall back to eager).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys

import timm
import torch

import tokenreduce as tr
from tokenreduce.eval.throughput import allow_many_compiled_models, compare_throughput
from tokenreduce.methods import get_method
from tokenreduce.ops import cpu_kernels
from tokenreduce.threads import set_threads

DATA_DEPENDENT = {"ltmp"}  # its counts depend on trained thresholds and the images: timed on real data instead


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every fixed-schedule method")
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (compiled in warm-up)")
    parser.add_argument("--only-latency", action="store_true", help="batch 1 only (skip the --batch-size columns)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the schedule-only copy")
    parser.add_argument("--json", help="write all rows here")
    parser.add_argument("--cpu-kernels", choices=["auto", "on", "off"], default="auto",
                        help="the fused CPU merge kernel (tokenreduce.ops.cpu_kernels); default: the library's")
    args = parser.parse_args(argv)

    set_threads(args.threads)
    if args.compile:
        allow_many_compiled_models()
    ceiling = not args.no_ceiling
    network = timm.create_model(args.model, pretrained=False).eval()
    baselines: dict[int, torch.nn.Module] = {}  # compiled unreduced model per batch size, shared by all rows
    methods = args.methods or [m for m in tr.methods() if m not in DATA_DEPENDENT]
    cpu_kernels.set_cpu_kernels(args.cpu_kernels)  # "on" / "auto" build it here, outside the timed loops
    on_cpu = torch.device(args.device).type == "cpu"
    merge_path = "fused CPU merge kernel" if on_cpu and cpu_kernels.load_cpu_kernels() else "PyTorch merge ops"
    print(f"# {args.model}, {args.dtype}, {args.device}, {machine()}, {merge_path}")
    print(f"{'method':<10} {'setting':<30} {'GMACs ratio':>11} {'ideal':>6} {'bs32 speed-up':>13} {'eff.':>5} "
          f"{'ceil.':>5} {'bs1 speed-up':>12} {'eff.':>5} {'ceil.':>5}")
    rows = []
    for method in methods:
        for setting in ("default", f"budget={args.budget}"):
            budget = None if setting == "default" else args.budget
            result = {}
            sizes = [(1, args.latency_repeats)]
            if not args.only_latency:
                sizes.insert(0, (args.batch_size, args.repeats))
            for bs, repeats in sizes:
                model = copy.deepcopy(network)
                if args.compile and bs not in baselines:
                    baselines[bs] = torch.compile(copy.deepcopy(network).to(args.device))
                try:
                    result[bs] = compare_throughput(
                        model, method, params=untrained_if_learned(method), budget=budget, batch_size=bs,
                        repeats=repeats, warmup=1,
                        dtype=args.dtype, device=args.device, progress=False, compile=args.compile,
                        ceiling=ceiling, baseline=baselines.get(bs),
                    )
                except ValueError as err:
                    print(f"{method:<10} {setting:<30} skipped: {err}")
                    break
            if len(result) < len(sizes):
                continue
            big, one = result.get(args.batch_size), result[1]
            label = setting if budget is None else f"{setting} ({_knob(one['params'])})"
            throughput = (
                f"{big['speedup']:>12.2f}x {big['efficiency']:>5.2f} {_ceil(big)}"
                if big else f"{'-':>13} {'-':>5} {'-':>5}"
            )
            print(f"{method:<10} {label:<30} {one['gmacs_ratio']:>11.3f} {one['ideal_speedup']:>5.2f}x "
                  f"{throughput} {one['speedup']:>11.2f}x {one['efficiency']:>5.2f} {_ceil(one)}")
            sys.stdout.flush()
            rows.append({"method": method, "setting": setting, "throughput": big, "latency": one})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=2)
    return 0


def untrained_if_learned(method: str) -> dict:
    """``{"untrained": True}`` for a learned method (random weights: its parameters do not change its speed)."""
    return {"untrained": True} if get_method(method).resolve({})[0].learned else {}


def _ceil(row: dict) -> str:
    return "-".rjust(5) if row["ceiling_efficiency"] is None else f"{row['ceiling_efficiency']:>5.2f}"


def _knob(params: dict) -> str:
    for key in ("r", "keep_rate", "p"):
        if key in params:
            return f"{key}={params[key]}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
