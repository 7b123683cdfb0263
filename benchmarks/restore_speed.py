"""What token restoration costs: a reduced DeiT-S with and without ``restore="frozen"``.

For each method, two copies of one randomly initialised DeiT-S (timm ``deit_small_patch16_224``,
``pretrained=False``, fp32, eval, 224²) are reduced the same way, one with ``restore="frozen"``; their
``forward_features`` on the same batch are timed in one process, taking turns
(:func:`tokenreduce.eval.throughput.interleaved_seconds`), and the medians compared.  The overhead is
``restored / reduced − 1``: the owner-map bookkeeping at every reduction, the archive of pruned
tokens, the final gather to B×N0×C and the final norm on N0 instead of N tokens.  Goal: at most 5 %.

Cropr runs with its default last-layer fusion, which tracks the owner map without ``restore`` too;
its overhead is only the final gather (and the order it restores).

    python benchmarks/restore_speed.py                                   # tome, evit, ppt, cropr at batch 32
    python benchmarks/restore_speed.py --methods tome evit --repeats 5 --batch-size 8
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import timm
import torch

import tokenreduce as tr
from tokenreduce.eval.throughput import interleaved_seconds, wall_clock
from tokenreduce.threads import set_threads

METHODS = ("tome", "evit", "ppt", "cropr")


def cpu_clock(fn: Callable[[], object]) -> Callable[[], float]:
    """``fn`` as a run for :func:`interleaved_seconds` that returns the CPU seconds this process spent in it
    (all threads): less sensitive than wall-clock time to other processes sharing the cores."""

    def run() -> float:
        start = time.process_time()
        fn()
        return time.process_time() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=tr.methods())
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians over them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall-clock seconds, or this process's CPU seconds (steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        set_threads(args.threads)

    torch.manual_seed(0)
    base = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    images = torch.randn(args.batch_size, 3, 224, 224)
    print(f"DeiT-S (random weights), batch {args.batch_size}, fp32, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; medians of {args.repeats} interleaved rounds, {args.clock} seconds")
    print(f"{'method':8s} {'reduced s':>10s} {'restored s':>11s} {'overhead':>9s}")
    for method in args.methods:
        params = {"untrained": True} if method == "cropr" else {}
        reduced = tr.apply(copy.deepcopy(base), method, **params)
        restored = tr.apply(copy.deepcopy(base), method, restore="frozen", **params)
        with torch.inference_mode():
            assert restored.forward_features(images).shape[1] == 197
            timer = wall_clock if args.clock == "wall" else cpu_clock
            times = interleaved_seconds(
                {"reduced": timer(lambda m=reduced: m.forward_features(images)),
                 "restored": timer(lambda m=restored: m.forward_features(images))},
                args.repeats, warmup=args.warmup, alternate_order=True,
            )
        a, b = statistics.median(times["reduced"]), statistics.median(times["restored"])
        print(f"{method:8s} {a:10.3f} {b:11.3f} {b / a - 1:+9.1%}", flush=True)


if __name__ == "__main__":
    main()
