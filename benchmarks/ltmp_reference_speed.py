"""LTMP on the bundled reference model, round by round: how much of its evaluate speed-up is the process?

The main job (``tokenreduce evaluate``) times LTMP's shipped reducers against the unreduced reference
model on the first 250 test images.  This script does the same in a fresh process, printing every
round: the milliseconds of each model's forward, the minor page faults it took (``ru_minflt``), and
that round's ratio; then the median ratio (the evaluate protocol) and each model's range.  Run it in a
few processes to see how much the level moves between them.

    python benchmarks/ltmp_reference_speed.py                 # target 0.75, 15 rounds
    python benchmarks/ltmp_reference_speed.py --target 0.6
    python benchmarks/ltmp_reference_speed.py --profile 3     # then where each model's time goes, op by op
    python benchmarks/ltmp_reference_speed.py --exact         # also LTMP with the exact received attention
    python benchmarks/ltmp_reference_speed.py --padding 16    # also LTMP padding its batches to multiples of 16
    python benchmarks/ltmp_reference_speed.py --one-bucket    # also LTMP's attention in one bucket (padded)
    python benchmarks/ltmp_reference_speed.py --padded-stream # also LTMP with the stream padded between blocks
    python benchmarks/ltmp_reference_speed.py --lengths       # each block's live counts and padded length

``--first-run N`` first runs N test images through LTMP, as ``evaluate`` scores the test set before it
times a row, and prints LTMP's forward before and after that pass (glibc's heap fragments under LTMP's
batch-dependent tensor sizes; run it under ``LD_PRELOAD=...libtcmalloc_minimal.so.4`` to compare).

``--exact`` times a third model in the same rounds: LTMP computing every received attention with the
explicit softmax (no fused kernel and bound, ``tokenreduce.ops.received``), as before that path existed.

``--padding M`` times LTMP a third way in the same rounds: its padded batches (and ragged chunks) rounded
up to multiples of ``M`` instead of this CPU's ``tokenreduce.ops.attention.flash_multiple()``, and prints
how much faster the library's padding is than that.

``--one-bucket`` times LTMP a third way in the same rounds: every batch's attention in one bucket at the
longest image's length (``tokenreduce.ops.buckets.BUCKET_OVERHEAD`` infinite), as before length buckets; the
outputs are the same.  ``--padded-stream`` times LTMP with the stream kept padded (B×N×C) between blocks,
gathering the live rows for every per-token layer and scattering them back, as before the packed stream (a
forward hook on a block forces it); the outputs are the same.

``--profile N`` times N more forwards of each model under ``torch.profiler`` and prints the
milliseconds per forward of the ops that take the most time in either model, side by side: the
matrix products against the attention and the bookkeeping around them.

``--lengths`` prints, per block, the live tokens of the batch's images (mean, quartiles, longest) and the
padded length the block's attention runs at (the longest image's count after the previous block, rounded
up to a multiple of ``flash_multiple()``: 8 with AVX2, 16 with AVX-512): where the padding, not the live
count, sets the attention's work.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
import unittest.mock
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import tokenreduce as tr
import tokenreduce.methods.ltmp as ltmp_module
import tokenreduce.ops.attention as attention_ops
import tokenreduce.ops.buckets as bucket_ops
from tokenreduce.eval.throughput import paired_speedup
from tokenreduce.methods.ltmp import LTMP, padded_length
from tokenreduce.models.reference import load_reference_model, load_reference_testset, preprocess
from tokenreduce.threads import set_threads


def timed(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, int]:
    """Seconds of one forward and the minor page faults the process took meanwhile."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def op_milliseconds(model: torch.nn.Module, x: torch.Tensor, forwards: int) -> dict[str, float]:
    """Self CPU milliseconds per forward of every op ``model`` runs on ``x`` (``torch.profiler``)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(forwards):
            model(x)
    return {e.key: e.self_cpu_time_total / 1e3 / forwards for e in prof.key_averages()}


def print_profile(models: dict[str, torch.nn.Module], x: torch.Tensor, forwards: int, top: int = 16) -> None:
    """The ``top`` ops by time in any of ``models``, ms per forward side by side, and each model's total."""
    per_model = {name: op_milliseconds(model, x, forwards) for name, model in models.items()}
    ops = sorted({op for ms in per_model.values() for op in ms}, key=lambda op: -max(m.get(op, 0.0) for m in
                                                                                      per_model.values()))
    print(f"\nself CPU ms per forward ({forwards} forwards each, torch.profiler)")
    print(f"{'op':42s}" + "".join(f"{name:>11s}" for name in per_model))
    for op in ops[:top]:
        print(f"{op[:42]:42s}" + "".join(f"{ms.get(op, 0.0):11.1f}" for ms in per_model.values()))
    print(f"{'other ops':42s}" + "".join(f"{sum(v for k, v in ms.items() if k not in ops[:top]):11.1f}"
                                         for ms in per_model.values()))
    print(f"{'total':42s}" + "".join(f"{sum(ms.values()):11.1f}" for ms in per_model.values()))


def exact_attention(model: torch.nn.Module) -> Callable[[torch.Tensor], object]:
    """``model``'s forward with every received attention computed exactly (the explicit softmax), for an A/B
    against the fused kernel and its bound in the same process."""

    def forward(x: torch.Tensor) -> object:
        with unittest.mock.patch.object(attention_ops, "received_floor_applies", lambda *args: False):
            return model(x)

    return forward


def padded_to(model: torch.nn.Module, multiple: int) -> Callable[[torch.Tensor], object]:
    """``model``'s forward with LTMP's padded batches rounded up to multiples of ``multiple``, for an A/B against
    the library's padding (``flash_multiple()``) in the same process; the outputs are the same."""

    def forward(x: torch.Tensor) -> object:
        with unittest.mock.patch.object(ltmp_module, "flash_multiple", lambda: multiple), \
                unittest.mock.patch.object(attention_ops, "flash_multiple", lambda: multiple):
            return model(x)

    return forward


def one_bucket(model: torch.nn.Module) -> Callable[[torch.Tensor], object]:
    """``model``'s forward with every padded batch's attention in one bucket (the padded layout), for an A/B
    against the length buckets in the same process; the outputs are the same."""

    def forward(x: torch.Tensor) -> object:
        with unittest.mock.patch.object(bucket_ops, "BUCKET_OVERHEAD", float("inf")):
            return model(x)

    return forward


def padded_stream(model: torch.nn.Module) -> Callable[[torch.Tensor], object]:
    """``model``'s forward with the stream padded between blocks (a forward hook on the first block turns the
    packed stream off), for an A/B against the packed stream in the same process; the outputs are the same."""

    def forward(x: torch.Tensor) -> object:
        handle = model.blocks[0].register_forward_hook(lambda module, args, out: None)
        try:
            return model(x)
        finally:
            handle.remove()

    return forward


def print_lengths(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Per block of one forward of ``x``: the live tokens entering its attention (mean, quartiles, longest
    image) and the padded length the batch runs at there."""
    model(x)
    batch, tokens = x.shape[0], tr.last_forward(model).num_tokens_in
    print("block  live tokens: mean   min    q1   med    q3   max  padded length")
    padded = tokens
    for block, (entering, leaving) in enumerate(tr.last_forward(model).block_tokens):
        counts = torch.as_tensor(entering, dtype=torch.float32).expand(batch)
        q = torch.quantile(counts, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])).tolist()
        print(f"{block:5d}  {counts.mean():17.1f}" + "".join(f"{v:6.0f}" for v in q) + f"  {padded:13d}")
        longest = int(torch.as_tensor(leaving).max())
        padded = padded_length(longest, tokens, batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.75, help="the shipped reducer's training target")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then profile N forwards of each model and print the ops side by side")
    parser.add_argument("--exact", action="store_true",
                        help="also time LTMP with the exact received attention (explicit softmax) in the same rounds")
    parser.add_argument("--padding", type=int, default=0, metavar="M",
                        help="also time LTMP padding its batches to multiples of M in the same rounds")
    parser.add_argument("--one-bucket", action="store_true",
                        help="also time LTMP with every batch's attention in one bucket in the same rounds")
    parser.add_argument("--padded-stream", action="store_true",
                        help="also time LTMP with the stream padded between blocks in the same rounds")
    parser.add_argument("--first-run", type=int, default=0, metavar="N",
                        help="first run N test images through LTMP and print its forward before and after")
    parser.add_argument("--lengths", action="store_true",
                        help="print each block's live token counts and the padded length its attention runs at")
    args = parser.parse_args(argv)

    set_threads(args.threads)
    images, _ = load_reference_testset(limit=max(args.batch_size, args.first_run))
    x = preprocess(images[:args.batch_size])
    base = load_reference_model().eval()
    reduced = tr.apply(load_reference_model().eval(), "ltmp",
                       checkpoint=LTMP.shipped_checkpoint({"target": args.target}))
    print(f"# reference model, LTMP target {args.target}, batch {args.batch_size}, fp32, {platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__}")
    models: dict[str, Callable[[torch.Tensor], object]] = {"unreduced": base, "ltmp": reduced}
    if args.exact:
        models["ltmp exact"] = exact_attention(reduced)
    padded_name = f"ltmp padded to {args.padding}"
    if args.padding:
        models[padded_name] = padded_to(reduced, args.padding)
    if args.one_bucket:
        models["ltmp one bucket"] = one_bucket(reduced)
    if args.padded_stream:
        models["ltmp padded stream"] = padded_stream(reduced)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model(x)
        print(f"GMACs ratio {tr.stats(reduced).gmacs / tr.stats(reduced).gmacs_unreduced:.2f}")
        if args.lengths:
            print_lengths(reduced, x)
        if args.first_run:
            before = statistics.median(timed(reduced, x)[0] for _ in range(7))
            for start in range(0, args.first_run, args.batch_size):
                reduced(preprocess(images[start:start + args.batch_size]))
            after = statistics.median(timed(reduced, x)[0] for _ in range(7))
            print(f"ltmp forward before / after {args.first_run} images: {1e3 * before:.0f} / {1e3 * after:.0f} ms "
                  f"({after / before:.2f}x)")
        print("round" + "".join(f"{name + ' ms':>16s}  faults" for name in models) + "  ratio")
        for i in range(args.rounds):
            order = list(models.items())
            row = {name: timed(model, x) for name, model in (order if i % 2 == 0 else order[::-1])}
            for name, (s, _) in row.items():
                seconds[name].append(s)
            print(f"{i:5d}" + "".join(f"{1e3 * row[name][0]:16.0f}  {row[name][1]:6d}" for name in models)
                  + f"  {row['unreduced'][0] / row['ltmp'][0]:5.2f}")
    for name, values in seconds.items():
        print(f"{name}: median {1e3 * statistics.median(values):.0f} ms, range {1e3 * min(values):.0f}-"
              f"{1e3 * max(values):.0f} ms")
    for name in models:
        if name != "unreduced":
            print(f"{name} speed-up (median of the rounds' ratios): "
                  f"{paired_speedup(seconds['unreduced'], seconds[name]):.2f}x")
    for name, what in (("ltmp one bucket", "length buckets"), ("ltmp padded stream", "the packed stream")):
        if name in models:
            print(f"ltmp against {name}: {paired_speedup(seconds[name], seconds['ltmp']):.3f}x ({what})")
    if args.padding:
        print(f"ltmp (multiples of {attention_ops.flash_multiple()}) against {padded_name}: "
              f"{paired_speedup(seconds[padded_name], seconds['ltmp']):.3f}x")
    if args.profile:
        with torch.no_grad():
            print_profile({"unreduced": base, "ltmp": reduced}, x, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
