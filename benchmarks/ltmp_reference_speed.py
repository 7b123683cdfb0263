"""LTMP on the bundled reference model, round by round: how much of its evaluate speed-up is the process?

The main job (``tokenreduce evaluate``) times LTMP's shipped reducers against the unreduced reference
model on the first 250 test images.  This script does the same in a fresh process, printing every
round: the milliseconds of each model's forward, the minor page faults it took (``ru_minflt``), and
that round's ratio; then the median ratio (the evaluate protocol) and each model's range.  Run it in a
few processes to see how much the level moves between them.

    python benchmarks/ltmp_reference_speed.py                 # target 0.75, 15 rounds
    python benchmarks/ltmp_reference_speed.py --target 0.6
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time

import torch

import tokenreduce as tr
from tokenreduce.eval.throughput import paired_speedup
from tokenreduce.methods.ltmp import LTMP
from tokenreduce.models.reference import load_reference_model, load_reference_testset, preprocess


def timed(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, int]:
    """Seconds of one forward and the minor page faults the process took meanwhile."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.75, help="the shipped reducer's training target")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    images, _ = load_reference_testset(limit=args.batch_size)
    x = preprocess(images)
    base = load_reference_model().eval()
    reduced = tr.apply(load_reference_model().eval(), "ltmp",
                       checkpoint=LTMP.shipped_checkpoint({"target": args.target}))
    print(f"# reference model, LTMP target {args.target}, batch {args.batch_size}, fp32, {platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__}")
    seconds: dict[str, list[float]] = {"unreduced": [], "ltmp": []}
    with torch.no_grad():
        base(x), reduced(x)  # warm-up
        print(f"GMACs ratio {tr.stats(reduced).gmacs / tr.stats(reduced).gmacs_unreduced:.2f}")
        print("round  unreduced ms  faults   ltmp ms  faults  ratio")
        for i in range(args.rounds):
            order = [("unreduced", base), ("ltmp", reduced)]
            row = {name: timed(model, x) for name, model in (order if i % 2 == 0 else order[::-1])}
            for name, (s, _) in row.items():
                seconds[name].append(s)
            (sb, fb), (sr, fr) = row["unreduced"], row["ltmp"]
            print(f"{i:5d}  {1e3 * sb:12.0f}  {fb:6d}  {1e3 * sr:8.0f}  {fr:6d}  {sb / sr:5.2f}")
    for name, values in seconds.items():
        print(f"{name}: median {1e3 * statistics.median(values):.0f} ms, range {1e3 * min(values):.0f}-"
              f"{1e3 * max(values):.0f} ms")
    print(f"speed-up (median of the rounds' ratios): {paired_speedup(seconds['unreduced'], seconds['ltmp']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
