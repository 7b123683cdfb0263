"""Do the saved GMACs turn into time on a rotary-position ViT?  EVA-02-S, reduced vs unreduced.

One timm ``Eva`` model of EVA-02-S's size (``eva02_small_patch14_224``: 224², 14-px patches, 257
tokens, width 384, 12 blocks, SwiGLU, rotary positions; random weights) on the CPU in fp32.  For each
method at ``--budget`` (fraction of the unreduced GMACs) this prints the GMACs ratio, the measured
speed-up at batch 32 (throughput) and at batch 1 (latency), and the efficiency = speed-up × GMACs
ratio (1.0: the time saved equals the GMACs saved).  The reduced model, a copy of the unreduced one
and (``ceil.``) a copy that reaches the method's token counts by slicing are timed alternately in one
process, medians of repeats (:func:`tokenreduce.eval.throughput.compare_throughput`); ``ceil. −
eff.`` is what the method's own work costs, the rotary rows gathered for the reduced tokens included.

    python benchmarks/eva_speed.py                          # tome and evit at budget 0.6, about 5.5 minutes on 2 cores
    python benchmarks/eva_speed.py --methods tome --budget 0.5 --repeats 7 --json eva_speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys

import timm
import torch
from _family_speed import add_arguments, efficiency_rows

import tokenreduce as tr
from tokenreduce.ops import cpu_kernels
from tokenreduce.threads import set_threads

MODEL = "eva02_small_patch14_224"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="a timm Eva architecture (random weights)")
    add_arguments(parser, ["tome", "evit"])
    args = parser.parse_args(argv)

    set_threads(args.threads)
    torch.manual_seed(0)
    network = timm.create_model(args.model, pretrained=False).eval()
    if tr.models.adapter_for(network).name != "timm-eva":
        parser.error(f"{args.model} is not a timm Eva model")
    merge_path = "fused CPU merge kernel" if cpu_kernels.load_cpu_kernels() else "PyTorch merge ops"
    print(f"# {args.model} (random weights), fp32, cpu, {machine()}, {merge_path}")
    print(f"# unreduced: {tr.gmacs(network):.3f} GMACs/image, {network.patch_embed.num_patches + 1} tokens")
    rows = efficiency_rows(lambda: copy.deepcopy(network), args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "machine": machine(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
