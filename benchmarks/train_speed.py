"""Training throughput of the reference model: fused vs unfused attention, fp32 vs bf16 autocast.

``scripts/train_reference.py`` trains with timm's attention unfused and under bf16 autocast.
This script backs that choice: it builds one reference model per setting (same initial
weights, compiled like the real run), times full training steps (forward, backward,
gradient clipping, AdamW) on random batches, the settings taking turns round after
round, and prints the median images/s of each and its ratio to fp32 with fused SDPA.

    python benchmarks/train_speed.py                 # ~4 min on 2 cores (mostly compilation)
    python benchmarks/train_speed.py --no-compile --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from _rounds import median_rates

from tokenreduce.models.reference import build_reference_model
from tokenreduce.threads import set_threads
from tokenreduce.training.reference import unfused_attention

SETTINGS = [  # (label, bf16 autocast, fused attention)
    ("fp32, fused SDPA", False, True),
    ("fp32, unfused", False, False),
    ("bf16, fused SDPA", True, True),
    ("bf16, unfused (train_reference.py)", True, False),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per setting (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="eager models (train_reference.py compiles)")
    args = parser.parse_args(argv)

    set_threads(args.threads)
    torch.manual_seed(0)
    base = build_reference_model().train()
    images = torch.randn(args.batch_size, 1, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))

    runners = []
    for _, amp, fused in SETTINGS:
        model = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        forward = model if args.no_compile else torch.compile(model)

        def step(model=model, optimizer=optimizer, forward=forward, amp=amp, fused=fused) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                if fused:
                    loss = F.cross_entropy(forward(images), labels)
                else:
                    with unfused_attention(model):
                        loss = F.cross_entropy(forward(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        for _ in range(3):  # compilation and warm-up, untimed
            step()
        runners.append(step)

    medians = median_rates(runners, args.rounds, args.steps, args.batch_size)
    print(f"# reference ViT training step, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{'eager' if args.no_compile else 'torch.compile'}, torch {torch.__version__}")
    print(f"{'setting':<32} {'images/s':>9} {'vs fp32 fused':>13}")
    for (label, _, _), rate in zip(SETTINGS, medians, strict=True):
        print(f"{label:<32} {rate:>9.0f} {rate / medians[0]:>12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
