"""Do the saved GMACs turn into time on a Hugging Face ViT?  Speed-up ÷ GMACs ratio, reduced vs unreduced.

One ``transformers`` ``ViTForImageClassification`` the size of DeiT-S (width 384, 12 layers, 6
heads, 224², patch 16; built from a config object with random weights: nothing is downloaded),
fp32 on the CPU with the model's SDPA attention.  For every method at ``--budget`` (default 0.6)
it prints the GMACs ratio, the measured speed-up at batch 32 (throughput) and at batch 1
(latency), and the efficiency = speed-up × GMACs ratio (1.0: the time saved equals the GMACs
saved), with the project's protocol (:func:`tokenreduce.eval.throughput.compare_throughput`):
the reduced model and a copy of the unreduced one (same weights, same attention kernel) timed
alternately in one process, medians of repeats.  ``ceil.`` times, in the same loop, a copy that
reaches the method's token counts by slicing (no method work): the efficiency the schedule itself
allows on this hardware.

    python benchmarks/hf_speed.py                                   # tome, evit, ppt at 0.6, ~5 min on 2 cores
    python benchmarks/hf_speed.py --methods tome --budget 0.5 --json hf_speed.json
    python benchmarks/hf_speed.py --attn eager                      # the eager attention implementation
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from tokenreduce.eval.throughput import compare_throughput


def deit_small_sized_vit(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """An HF ViT with DeiT-S's shape (random weights), in eval mode."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=224, patch_size=16, num_labels=1000, layer_norm_eps=1e-6,
                       attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return ViTForImageClassification(config).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["tome", "evit", "ppt"])
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--no-ceiling", action="store_true", help="skip the schedule-only copy")
    parser.add_argument("--json", help="write all rows here")
    args = parser.parse_args(argv)

    import transformers

    torch.set_num_threads(args.threads)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# HF ViTForImageClassification (DeiT-S shape), fp32, cpu, attn={args.attn}, {machine}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    big_label = f"bs{args.batch_size} speed-up"
    print(f"{'method':<8} {'setting':<30} {'GMACs ratio':>11} {'ideal':>6} {big_label:>13} "
          f"{'eff.':>5} {'ceil.':>5} {'bs1 speed-up':>12} {'eff.':>5} {'ceil.':>5}")
    rows = []
    for method in args.methods:
        result = {}
        for bs, repeats in ((args.batch_size, args.repeats), (1, args.latency_repeats)):
            result[bs] = compare_throughput(
                deit_small_sized_vit(args.attn), method, budget=args.budget, batch_size=bs, img_size=224,
                repeats=repeats, warmup=1, progress=False, ceiling=not args.no_ceiling,
            )
        big, one = result[args.batch_size], result[1]
        knob = next((f"{k}={v}" for k, v in one["params"].items() if k in ("r", "keep_rate")), "")
        print(f"{method:<8} {f'budget={args.budget} ({knob})':<30} {one['gmacs_ratio']:>11.3f} "
              f"{one['ideal_speedup']:>5.2f}x {big['speedup']:>12.2f}x {big['efficiency']:>5.2f} {_ceil(big)} "
              f"{one['speedup']:>11.2f}x {one['efficiency']:>5.2f} {_ceil(one)}")
        sys.stdout.flush()
        rows.append({"method": method, "budget": args.budget, "throughput": big, "latency": one})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "transformers": transformers.__version__, "rows": rows}, f, indent=2)
    return 0


def _ceil(row: dict) -> str:
    return "-".rjust(5) if row["ceiling_efficiency"] is None else f"{row['ceiling_efficiency']:>5.2f}"


if __name__ == "__main__":
    sys.exit(main())
