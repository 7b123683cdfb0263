"""How the CPU's fused attention kernel times with the sequence length: why padded batches are cut to multiples
of the CPU's vector width (``tokenreduce.ops.attention.flash_multiple``: 8 with AVX2, 16 with AVX-512).

For each shape (batch, heads, head dim) and length N this times ``F.scaled_dot_product_attention`` with a
float key bias (as a padded batch runs it) at N and with the keys, values and queries padded to the next
multiple of 8 and of 16 (the extra keys masked with −inf), and the explicit softmax form (``baddbmm``, softmax,
``bmm``) at N; medians of repeats, milliseconds per call, all in one process.

    python benchmarks/flash_lengths.py
    python benchmarks/flash_lengths.py --shapes 250,4,16 --lengths 24 47 48 63 64 65
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tokenreduce.ops.attention import flash_multiple
from tokenreduce.threads import set_threads


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def row(b: int, h: int, d: int, n: int, repeats: int) -> tuple[float, float, float, float]:
    """Milliseconds of the fused kernel at N, at N padded to a multiple of 8 and of 16, and of the explicit
    form at N."""
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    bias = torch.randn(b, 1, 1, n)

    def padded(multiple: int) -> Callable[[], torch.Tensor]:
        m = -(-n // multiple) * multiple
        qp, kp, vp = (F.pad(t, (0, 0, 0, m - n)) for t in (q, k, v))
        bias_p = F.pad(bias, (0, m - n), value=-float("inf"))
        return lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=bias_p)

    def explicit() -> torch.Tensor:
        logits = torch.baddbmm(bias.expand(b, h, 1, n).reshape(b * h, 1, n), q.reshape(b * h, n, d),
                               k.reshape(b * h, n, d).transpose(1, 2), alpha=d ** -0.5)
        return torch.bmm(logits.softmax(dim=-1), v.reshape(b * h, n, d))

    return (median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), repeats),
            median_ms(padded(8), repeats), median_ms(padded(16), repeats), median_ms(explicit, repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["250,4,16", "32,6,64"], help="batch,heads,head_dim")
    parser.add_argument("--lengths", nargs="+", type=int, default=[24, 31, 32, 40, 47, 48, 56, 63, 64, 65, 100, 197])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    print(f"# {platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), {args.threads} threads, torch "
          f"{torch.__version__}; ms per call, medians; padded batches here use multiples of {flash_multiple()}")
    print(f"{'B,H,d':>10s} {'N':>4s} {'fused at N':>11s} {'fused at 8k':>12s} {'fused at 16k':>13s} {'explicit':>9s}")
    for shape in args.shapes:
        b, h, d = (int(v) for v in shape.split(","))
        for n in args.lengths:
            fused, at_8, at_16, explicit = row(b, h, d, n, args.repeats)
            print(f"{shape:>10s} {n:4d} {fused:11.2f} {at_8:12.2f} {at_16:13.2f} {explicit:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
