"""Top-1 of the reference model in fp32 and under bf16 autocast, unreduced and under each method.

    python benchmarks/bf16_accuracy.py [--limit N]
"""

from __future__ import annotations

import argparse
import sys

import torch

import tokenreduce as tr
from tokenreduce.models.reference import load_reference_model, load_reference_testset, preprocess

METHODS = [None, ("tome", {"r": 4}), ("evit", {}), ("ppt", {"threshold": 2e-3}), ("tps", {}), ("bat", {}),
           ("random", {})]


def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> float:
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(x), 500):
            correct += int((model(x[i : i + 500]).argmax(-1) == y[i : i + 500]).sum())
    return correct / len(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    model = load_reference_model()
    images, labels = load_reference_testset(args.limit)
    x = preprocess(images)
    worst = 0.0
    print(f"{'method':<10} {'fp32':>7} {'bf16':>7} {'diff':>6}")
    for entry in METHODS:
        name = "unreduced"
        tr.remove(model)
        if entry is not None:
            name, params = entry
            tr.apply(model, name, **params)
        a, b = top1(model, x, labels, False), top1(model, x, labels, True)
        worst = max(worst, abs(a - b))
        print(f"{name:<10} {100 * a:6.2f}% {100 * b:6.2f}% {100 * (b - a):+5.2f}")
    print(f"largest difference: {100 * worst:.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
