"""Do the saved GMACs turn into time on a Hugging Face ViT?  Speed-up ÷ GMACs ratio, reduced vs unreduced.

One ``transformers`` ``ViTForImageClassification`` the size of DeiT-S (width 384, 12 layers, 6
heads, 224², patch 16; built from a config object with random weights: nothing is downloaded),
fp32 on the CPU with the model's SDPA attention.  For every method at ``--budget`` (default 0.6)
it prints the GMACs ratio, the measured speed-up at batch 32 (throughput) and at batch 1
(latency), and the efficiency = speed-up × GMACs ratio (1.0: the time saved equals the GMACs
saved), with the project's protocol (:func:`tokenreduce.eval.throughput.compare_throughput`):
the reduced model and a copy of the unreduced one (same weights, same attention kernel) timed
alternately in one process, medians of repeats.  ``ceil.`` times, in the same loop, a copy that
reaches the method's token counts by slicing (no method work): the efficiency the schedule itself
allows on this hardware.

    python benchmarks/hf_speed.py                                   # tome, evit, ppt at 0.6, ~5 min on 2 cores
    python benchmarks/hf_speed.py --methods tome --budget 0.5 --json hf_speed.json
    python benchmarks/hf_speed.py --attn eager                      # the eager attention implementation
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from _family_speed import add_arguments, efficiency_rows

from tokenreduce.threads import set_threads


def deit_small_sized_vit(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """An HF ViT with DeiT-S's shape (random weights), in eval mode."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=224, patch_size=16, num_labels=1000, layer_norm_eps=1e-6,
                       attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return ViTForImageClassification(config).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, ["tome", "evit", "ppt"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args(argv)

    import transformers

    set_threads(args.threads)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# HF ViTForImageClassification (DeiT-S shape), fp32, cpu, attn={args.attn}, {machine}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    rows = efficiency_rows(lambda: deit_small_sized_vit(args.attn), args, img_size=224)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "transformers": transformers.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
