"""Do the saved GMACs turn into time on a rotary-position ViT?  EVA-02-S, reduced vs unreduced.

One timm ``Eva`` model of EVA-02-S's size (``eva02_small_patch14_224``: 224², 14-px patches, 257
tokens, width 384, 12 blocks, SwiGLU, rotary positions; random weights) on the CPU in fp32.  For each
method at ``--budget`` (fraction of the unreduced GMACs) this prints the GMACs ratio, the measured
speed-up at batch 32 (throughput) and at batch 1 (latency), and the efficiency = speed-up × GMACs
ratio (1.0: the time saved equals the GMACs saved).  The reduced model, a copy of the unreduced one
and (``ceil.``) a copy that reaches the method's token counts by slicing are timed alternately in one
process, medians of repeats (:func:`tokenreduce.eval.throughput.compare_throughput`); ``ceil. −
eff.`` is what the method's own work costs, the rotary rows gathered for the reduced tokens included.

    python benchmarks/eva_speed.py                          # tome and evit at budget 0.6, about 5.5 minutes on 2 cores
    python benchmarks/eva_speed.py --methods tome --budget 0.5 --repeats 7 --json eva_speed.json
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
from tokenreduce.eval.throughput import compare_throughput
from tokenreduce.ops import cpu_kernels

MODEL = "eva02_small_patch14_224"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="a timm Eva architecture (random weights)")
    parser.add_argument("--methods", nargs="+", default=["tome", "evit"])
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write all rows here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    network = timm.create_model(args.model, pretrained=False).eval()
    if tr.models.adapter_for(network).name != "timm-eva":
        parser.error(f"{args.model} is not a timm Eva model")
    merge_path = "fused CPU merge kernel" if cpu_kernels.load_cpu_kernels() else "PyTorch merge ops"
    print(f"# {args.model} (random weights), fp32, cpu, {machine()}, {merge_path}")
    print(f"# unreduced: {tr.gmacs(network):.3f} GMACs/image, {network.patch_embed.num_patches + 1} tokens")
    big_label = f"bs{args.batch_size} speed-up"
    print(f"{'method':<8} {'setting':<22} {'GMACs ratio':>11} {'ideal':>6} {big_label:>13} "
          f"{'eff.':>5} {'ceil.':>5} {'bs1 speed-up':>12} {'eff.':>5} {'ceil.':>5}")
    rows = []
    for method in args.methods:
        result = {}
        for bs, repeats in ((args.batch_size, args.repeats), (1, args.latency_repeats)):
            result[bs] = compare_throughput(
                copy.deepcopy(network), method, budget=args.budget, batch_size=bs, repeats=repeats, warmup=1,
                progress=False, ceiling=True,
            )
        big, one = result[args.batch_size], result[1]
        label = f"budget={args.budget} ({_knob(one['params'])})"
        print(f"{method:<8} {label:<22} {one['gmacs_ratio']:>11.3f} {one['ideal_speedup']:>5.2f}x "
              f"{big['speedup']:>12.2f}x {big['efficiency']:>5.2f} {big['ceiling_efficiency']:>5.2f} "
              f"{one['speedup']:>11.2f}x {one['efficiency']:>5.2f} {one['ceiling_efficiency']:>5.2f}")
        sys.stdout.flush()
        rows.append({"method": method, "budget": args.budget, "throughput": big, "latency": one})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "machine": machine(), "rows": rows}, f, indent=2)
    return 0


def _knob(params: dict) -> str:
    for key in ("r", "keep_rate", "p"):
        if key in params:
            return f"{key}={params[key]}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
