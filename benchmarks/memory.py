"""Peak memory of a forward pass, reduced vs unreduced.

CPU: resident-set sizes are too noisy to compare (allocator caching), so this
counts the heap bytes in use (glibc ``mallinfo2``: ``uordblks + hblkhd``) after
every aten op of the forward, with a ``TorchDispatchMode``, and reports the peak
above the bytes in use before the forward.  The count is deterministic; it
misses only scratch memory inside an op, which is the same kernel for both
models.  Run with one thread so that every allocation lands in the counted arena.
CUDA: ``torch.cuda.max_memory_allocated`` during the forward.

    python benchmarks/memory.py                     # DeiT-S, batch 32, every training-free method
    python benchmarks/memory.py --methods tome --budget 0.6 --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import sys

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tokenreduce as tr
from tokenreduce.threads import set_threads


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakHeap(TorchDispatchMode):
    """Tracks the peak of :func:`heap_in_use` after every aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use())
        return out


def forward_peak_mib(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        model(x)  # warm-up: lazily created buffers are not the forward's
        if x.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(x)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        base = heap_in_use()
        with PeakHeap() as tracker:
            model(x)
        return (tracker.peak - base) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--methods", nargs="+", default=["tome", "evit", "random", "ppt", "tps", "bat", "ltmp",
                                                        "dynamicvit", "cropr"])
    parser.add_argument("--budget", type=float, default=None, help="apply every method at this budget")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    set_threads(1)
    model = timm.create_model(args.model, pretrained=False).eval().to(args.device)
    x = torch.randn(args.batch_size, 3, *model.patch_embed.img_size, device=args.device)
    base = forward_peak_mib(model, x)
    print(f"# {args.model}, batch {args.batch_size}, {args.device}: peak memory of one no-grad forward")
    print(f"{'unreduced':<12} {base:8.1f} MiB")
    worst = 0.0
    for method in args.methods:
        tr.apply(model, method, untrained=True, **({} if args.budget is None else {"budget": args.budget}))
        peak = forward_peak_mib(model, x)
        worst = max(worst, peak / base)
        print(f"{method:<12} {peak:8.1f} MiB  ({peak / base:.3f}x unreduced)")
        tr.remove(model)
    print(f"largest ratio: {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
