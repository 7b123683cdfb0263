"""LTMP's batched inference on DeiT-S: does the GMACs it saves turn into time?

LTMP's token counts depend on the images and on its thresholds, so it is not in
``speed.py``.  Here DeiT-S (random weights, 224², fp32, CPU) runs on synthetic
images whose redundancy differs from image to image: white noise blurred with a
per-image Gaussian of σ drawn uniformly from [0, ``--max-sigma``] pixels.  A blurry
image has many near-identical patches and merges a lot, a sharp one merges little,
so the batch's per-image counts spread the way they do on real data, and the
padded batch pays for it.

For each target GMACs ratio, one merge threshold for all blocks (prune threshold
0) is found by bisection so that the batch's mean GMACs per image hits the target.
Then the reduced model is timed against the unreduced one on the same batch,
alternately; a speed-up is the median over rounds of the ratio of the two
back-to-back timings (load that drifts on a shared machine cancels in each
round).  Efficiency = speed-up × GMACs ratio, where the ratio is the *mean over
the images* (what the method saves), not the padded count the batch actually
ran (what the padding costs is part of the result).

At batch 1 the row also gives the *ceiling*: the same model following the
median image's per-block token counts by slicing alone
(:mod:`tokenreduce.eval.ceiling`, no scoring or merging), timed in the same
rounds.  Its efficiency is what those counts allow on this CPU (GEMMs with fewer
rows run at lower FLOP rates); the gap to it is LTMP's own work.

    python benchmarks/ltmp_speed.py                      # targets 0.75 and 0.6, batch 32 and 1
    python benchmarks/ltmp_speed.py --targets 0.6 --batch-size 64
    python benchmarks/ltmp_speed.py --prune-threshold 1e-12   # the explicit attention in every block
    python benchmarks/ltmp_speed.py --profile 10              # where batch-1 time goes, against the ceiling

``--profile N`` follows every row with a batch-1 profile of N forwards of LTMP and of its ceiling: the
ATen ops each runs per forward and their self time, the wall time of LTMP's own step (similarities and
the merge/prune, timed around the reducer's ``reduce``), and the ops whose self time grows most.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import timm
import torch
import torch.nn.functional as F
from latency_profile import op_profile, profile_difference  # a sibling script (benchmarks/ is the script's path)

import tokenreduce as tr
from tokenreduce.eval.accuracy import paired_speedups
from tokenreduce.eval.ceiling import schedule_only_model
from tokenreduce.threads import set_threads


def blurred_noise(batch: int, size: int, max_sigma: float, seed: int = 0) -> torch.Tensor:
    """B×3×size×size white noise, image ``i`` blurred with σ_i ~ U[0, max_sigma], standardised per image."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    sigmas = torch.rand(batch, generator=gen) * max_sigma
    out = []
    for image, sigma in zip(images, sigmas.tolist(), strict=True):
        if sigma > 0.3:
            radius = math.ceil(3 * sigma)
            taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
            kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
            kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
            image = F.conv2d(F.pad(image[None], (radius, radius, 0, 0), mode="reflect"), kernel, groups=3)
            image = F.conv2d(F.pad(image, (0, 0, radius, radius), mode="reflect"), kernel.mT, groups=3)[0]
        out.append((image - image.mean()) / image.std().clamp_min(1e-6))
    return torch.stack(out)


def reduced_ratio(model: torch.nn.Module, images: torch.Tensor, threshold: float,
                  prune: float = 0.0) -> tuple[float, list[float]]:
    """Mean GMACs ratio over ``images`` and the per-image final token counts at one merge threshold."""
    tr.apply(model, "ltmp", untrained=True, merge_threshold=threshold, prune_threshold=prune)
    ratios, finals = [], []
    with torch.no_grad():
        for image in images.split(1):  # one at a time: per-image counts, no padding
            model(image)
            s = tr.stats(model)
            ratios.append(s.ratio)
            finals.append(s.blocks[-1].tokens_out)
    return sum(ratios) / len(ratios), finals


def find_threshold(model: torch.nn.Module, images: torch.Tensor, target: float, steps: int,
                   prune: float = 0.0) -> tuple[float, float]:
    """Bisection on the merge threshold (higher threshold: fewer merges, higher ratio)."""
    low, high = -1.0, 1.0
    best = (high, 1.0)
    for _ in range(steps):
        mid = (low + high) / 2
        ratio, _ = reduced_ratio(model, images, mid, prune)
        if abs(ratio - target) < abs(best[1] - target):
            best = (mid, ratio)
        if ratio > target:
            high = mid
        else:
            low = mid
    return best


def step_milliseconds(model: torch.nn.Module, x: torch.Tensor, forwards: int) -> float:
    """Wall milliseconds per forward spent inside the reducer's ``reduce`` (LTMP's similarities and merge/prune)."""
    reducer = tr.reducer(model)
    real = reducer.reduce
    spent: list[float] = []

    def timed(*args):
        start = time.perf_counter()
        out = real(*args)
        spent.append(time.perf_counter() - start)
        return out

    reducer.reduce = timed  # an instance attribute shadows the method for these forwards only
    try:
        for _ in range(forwards):
            model(x)
    finally:
        del reducer.reduce
    return 1e3 * sum(spent) / forwards


def print_profile(reduced: torch.nn.Module, ceiling: torch.nn.Module, x: torch.Tensor, forwards: int,
                  top: int = 8) -> None:
    """Batch-1 op profile of LTMP against its ceiling, per forward (see the module note)."""
    own = op_profile(lambda: reduced(x), forwards)
    base = op_profile(lambda: ceiling(x), forwards)
    calls, self_ms, detail = profile_difference(own, base, top)
    print(f"#   batch 1 profile: ops per forward {calls[0]:.0f} (ceiling {calls[1]:.0f}), self ms {self_ms[0]:.1f} "
          f"(ceiling {self_ms[1]:.1f}), LTMP's step {step_milliseconds(reduced, x, forwards):.2f} ms per forward")
    print(f"#   largest extra self time (calls, µs per forward): {detail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.75, 0.6])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--latency-repeats", type=int, default=21)
    parser.add_argument("--max-sigma", type=float, default=6.0)
    parser.add_argument("--bisection-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prune-threshold", type=float, default=0.0,
                        help="every block's prune threshold: 0 keeps the fused attention kernel; any positive value "
                             "(1e-12 prunes next to nothing) runs the explicit attention pruning needs")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after every row, profile N batch-1 forwards of LTMP and of its ceiling")
    args = parser.parse_args(argv)
    if any(not 0 < t < 1 for t in args.targets):
        parser.error("--targets must be in (0, 1)")

    set_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    reduced = timm.create_model(args.model, pretrained=False).eval()
    reduced.load_state_dict(base.state_dict())
    sliced = timm.create_model(args.model, pretrained=False).eval()
    sliced.load_state_dict(base.state_dict())
    size = base.patch_embed.img_size[0]
    images = blurred_noise(args.batch_size, size, args.max_sigma)
    print(f"# {args.model}, fp32, cpu, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"# images: white noise blurred with sigma ~ U[0, {args.max_sigma}] px; batch {args.batch_size}; "
          f"prune threshold {args.prune_threshold:g}")
    print(f"{'target':>6} {'threshold':>9} {'GMACs ratio':>11} {'final tokens min/med/max':>24} "
          f"{'bs speed-up':>11} {'eff.':>5} {'bs1 speed-up':>12} {'eff.':>5} {'ceiling eff.':>12}")
    for target in args.targets:
        threshold, ratio = find_threshold(reduced, images, target, args.bisection_steps, args.prune_threshold)
        _, finals = reduced_ratio(reduced, images, threshold, args.prune_threshold)
        by_count = sorted(range(len(finals)), key=finals.__getitem__)
        low, mid, high = (finals[by_count[i]] for i in (0, len(finals) // 2, -1))
        spread = f"{low:.0f}/{mid:.0f}/{high:.0f}"
        batch_speedup = paired_speedups({"base": base, "reduced": reduced}, images, "base",
                                        repeats=args.repeats)["reduced"]
        # batch 1: the median image of the batch (by final count), so the row is typical
        median_image = images[by_count[len(finals) // 2]][None]
        with torch.no_grad():
            reduced(median_image)
        one_stats = tr.stats(reduced)
        one_ratio = one_stats.ratio
        counts = [(round(b.tokens_in), round(b.tokens_out)) for b in one_stats.blocks]
        if tr.is_reduced(sliced):
            tr.remove(sliced)
        schedule_only_model(sliced, counts)
        one_speedups = paired_speedups({"base": base, "reduced": reduced, "ceiling": sliced}, median_image, "base",
                                       repeats=args.latency_repeats)
        one_speedup, ceiling = one_speedups["reduced"], one_speedups["ceiling"] * one_ratio
        print(f"{target:>6.2f} {threshold:>9.4f} {ratio:>11.3f} {spread:>24} {batch_speedup:>10.2f}x "
              f"{batch_speedup * ratio:>5.2f} {one_speedup:>11.2f}x {one_speedup * one_ratio:>5.2f} {ceiling:>12.2f}")
        if args.profile:
            with torch.no_grad():
                print_profile(reduced, sliced, median_image, args.profile)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
