"""Speed of the reduced reference segmenter: where ToMe for SD's time goes next to ToMe's.

The bundled reference segmenter (197 tokens, width 64, fp32, eval) on a batch of evaluation mosaics,
unreduced and reduced by each configuration with ``restore="frozen"``; the forwards take turns in one
process (:func:`tokenreduce.eval.throughput.interleaved_seconds`) and the speed-ups are ratios of
medians.  With ``--profile N`` the op profile of N forwards of every model is printed side by side,
with the time outside the model's own ops (matching, merging, unmerging, copies and adds); the fused
CPU kernels' calls are not ATen ops and are missing from it (the speed-ups include them).
The GMACs ratio is the backbone's.

    python benchmarks/segmenter_speed.py                      # tomesd and tome (decreasing) at 0.6
    python benchmarks/segmenter_speed.py --profile 3 --batch-size 100
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

import tokenreduce as tr
from tokenreduce.dense.mosaic import mosaic_testset, preprocess
from tokenreduce.dense.segmenter import load_reference_segmenter
from tokenreduce.eval.throughput import interleaved_seconds, wall_clock
from tokenreduce.threads import set_threads

CONFIGS = {
    "tomesd@0.6": ("tomesd", {"budget": 0.6}),
    "tome@0.6 decreasing": ("tome", {"budget": 0.6, "inflection": -1.0}),
}
MODEL_OPS = {"aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::gelu",
             "aten::native_layer_norm", "aten::mkldnn_convolution", "aten::upsample_bilinear2d"}
"""Ops the unreduced segmenter runs too (matrix products, attention, activations, norms, patch embedding,
upsampling); the rest (residual adds, copies, the reductions' matching, merging and unmerging) is
bookkeeping, printed for the unreduced model too."""


def op_seconds(model: torch.nn.Module, images: torch.Tensor, forwards: int) -> dict[str, float]:
    """Self CPU seconds per forward of every op."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(forwards):
            model(images)
    return {e.key: e.self_cpu_time_total / 1e6 / forwards for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (medians over them)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N forwards of each model")
    args = parser.parse_args()
    if args.threads:
        set_threads(args.threads)
    canvas, _ = mosaic_testset(args.batch_size)
    images = preprocess(canvas)
    base = load_reference_segmenter().eval()
    models = {"unreduced": base}
    ratios = {"unreduced": 1.0}
    for label, (method, params) in CONFIGS.items():
        model = copy.deepcopy(base)
        tr.apply(model.backbone, method, restore="frozen", **params)
        models[label] = model
        ratios[label] = tr.gmacs(base.backbone, method, **params) / tr.gmacs(base.backbone)
    print(f"reference segmenter, batch {args.batch_size}, fp32, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    with torch.inference_mode():
        seconds = interleaved_seconds({k: wall_clock(lambda m=m: m(images)) for k, m in models.items()},
                                      args.repeats, warmup=1, alternate_order=True)
        unreduced = statistics.median(seconds["unreduced"])
        print(f"{'model':22s} {'ms':>8s} {'GMACs ratio':>12s} {'speed-up':>9s} {'efficiency':>11s}")
        for label, times in seconds.items():
            speedup = unreduced / statistics.median(times)
            print(f"{label:22s} {statistics.median(times) * 1e3:8.1f} {ratios[label]:12.2f} {speedup:8.2f}x "
                  f"{speedup * ratios[label]:11.2f}")
        if args.profile:
            profiles = {k: op_seconds(m, images, args.profile) for k, m in models.items()}
            ops = sorted({op for p in profiles.values() for op in p}, key=lambda op: -max(p.get(op, 0.0)
                                                                                          for p in profiles.values()))
            print(f"\nself CPU ms per forward ({args.profile} forwards)")
            print(f"{'op':52s}" + "".join(f"{k[:20]:>22s}" for k in profiles))
            for op in ops[:20]:
                print(f"{op[:52]:52s}" + "".join(f"{p.get(op, 0.0) * 1e3:22.1f}" for p in profiles.values()))
            print(f"{'total':52s}" + "".join(f"{sum(p.values()) * 1e3:22.1f}" for p in profiles.values()))
            print(f"{'bookkeeping (ops outside the model ops)':52s}" + "".join(
                f"{sum(v for op, v in p.items() if op not in MODEL_OPS) * 1e3:22.1f}" for p in profiles.values()))


if __name__ == "__main__":
    main()
