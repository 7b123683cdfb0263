"""PPT with mixed batches: does a batch whose images take different branches cost more than one whose
images all pool or all prune?

PPT pools (ToMe's merge) or prunes (top scores) each image at its reduction blocks, by the variance of
its token scores.  A mixed batch computes both candidates for every image and selects per image; a batch
whose images all take one branch computes only that branch.  DeiT-S (random weights, fp32, CPU) runs one
batch of images three times, with the variance threshold set so that every image pools (τ = ∞), every
image prunes (τ = 0), or half of them pool (τ from :func:`tokenreduce.calibrate`).  PPT removes the same
number of tokens either way, so the GMACs are the same; each setting is timed against the unreduced
model, all four alternately in one process (medians), and efficiency = speed-up × GMACs ratio.

    python benchmarks/ppt_mixed.py                 # batch 32, budget 0.6
    python benchmarks/ppt_mixed.py --batch-size 8 --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys

import timm
import torch

import tokenreduce as tr
from tokenreduce.eval.accuracy import time_models
from tokenreduce.threads import set_threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    set_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    size = base.patch_embed.img_size[0]
    images = torch.randn(args.batch_size, 3, size, size)
    models = {"unreduced": base}
    for name in ("all pool", "all prune", "mixed"):
        models[name] = copy.deepcopy(base)
    tr.apply(models["all pool"], "ppt", budget=args.budget, threshold=float("inf"))
    tr.apply(models["all prune"], "ppt", budget=args.budget, threshold=0.0)
    tau = tr.calibrate(models["mixed"], "ppt", images, pool_fraction=0.5, budget=args.budget)
    reducer = tr.reducer(models["mixed"])
    reducer.start_recording()
    with torch.no_grad():
        models["mixed"](images)
    variances = reducer.stop_recording()
    pooled = [int((variances[b] < t).sum()) for b, t in zip(reducer.layers, tau, strict=True)]
    ratio = tr.stats(models["mixed"]).ratio
    print(f"# {args.model}, fp32, cpu, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; batch {args.batch_size}, budget {args.budget}")
    print(f"# mixed: images pooled at blocks {list(reducer.layers)}: {pooled} of {args.batch_size}")
    ips = time_models(models, images, repeats=args.repeats)
    print(f"{'batch':>10} {'GMACs ratio':>11} {'speed-up':>9} {'eff.':>5}")
    for name in ("all pool", "all prune", "mixed"):
        speedup = ips[name] / ips["unreduced"]
        print(f"{name:>10} {ratio:>11.3f} {speedup:>8.2f}x {speedup * ratio:>5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
