"""What ``torch.set_num_threads`` does to ATen's CPU flash attention, and what ``tokenreduce.threads.set_threads`` does.

Each column is a fresh interpreter (thread settings are process-wide): the default process, one that
called ``torch.set_num_threads(n)``, and one that called ``set_threads(n)``, with ``n`` the count the
process already has unless ``--threads`` says otherwise.  Each times ``F.scaled_dot_product_attention``
at a few shapes and the bundled reference model's forward at batch 250; milliseconds per call, medians.
The processes keep the memory glibc frees (``GLIBC_TUNABLES``, :data:`SETTLED_HEAP`), so page faults do
not blur the model's row.

    python benchmarks/set_threads.py
    python benchmarks/set_threads.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F
from flash_lengths import median_ms  # this folder is on sys.path when a script in it runs

from tokenreduce.models.reference import load_reference_model, load_reference_testset, preprocess
from tokenreduce.threads import set_threads

SETTLED_HEAP = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
"""glibc keeps freed memory: no page faults from returned blocks in any forward, which otherwise move a fresh
process's model times by tens of per cent (docs/deployment.md, the memory allocator)."""

MODES = ("default", "torch.set_num_threads", "set_threads")


def measure(mode: str, threads: int, shapes: list[list[int]], repeats: int) -> dict[str, float]:
    """In this process: set the threads as ``mode`` says, then the milliseconds of each shape's attention and
    of the reference model's forward at batch 250."""
    if mode == "torch.set_num_threads":
        torch.set_num_threads(threads)
    elif mode == "set_threads":
        set_threads(threads)
    result: dict[str, float] = {}
    with torch.no_grad():
        for b, h, n, d in shapes:
            qkv = [torch.randn(b, h, n, d) for _ in range(3)]
            result[f"sdpa {b}x{h}x{n}x{d}"] = median_ms(lambda qkv=qkv: F.scaled_dot_product_attention(*qkv), repeats)
        model = load_reference_model().eval()
        x = preprocess(load_reference_testset(limit=250)[0])
        result["reference model, batch 250"] = median_ms(lambda: model(x), repeats)
    result["threads"] = torch.get_num_threads()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="the count the second and third processes set (default: the current one)")
    parser.add_argument("--shapes", nargs="+", default=["250,4,64,16", "250,4,32,16", "32,6,197,64", "1,6,197,64"],
                        help="batch,heads,tokens,head_dim")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # one column, in this process
    args = parser.parse_args(argv)
    shapes = [[int(v) for v in s.split(",")] for s in args.shapes]
    if args.child:
        print(json.dumps(measure(args.child, args.threads, shapes, args.repeats)))
        return 0
    results = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--threads", str(args.threads), "--repeats",
                              str(args.repeats), "--shapes", *args.shapes], capture_output=True, text=True, check=True,
                             env={**os.environ, "GLIBC_TUNABLES": SETTLED_HEAP})
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"# {platform.machine()}, torch {torch.__version__}; ms per call, medians of {args.repeats}; "
          f"threads: " + ", ".join(f"{m} {results[m]['threads']}" for m in MODES))
    print(f"{'':30s}" + "".join(f"{m:>24s}" for m in MODES))
    for key in results["default"]:
        if key != "threads":
            print(f"{key:30s}" + "".join(f"{results[m][key]:24.2f}" for m in MODES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
