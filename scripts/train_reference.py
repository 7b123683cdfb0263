#!/usr/bin/env python
"""Train the bundled reference ViT on Fashion-MNIST (a maintainer's tool; formerly ``tokenreduce train-reference``).

Trains from the original Fashion-MNIST idx files (``apt-get install dataset-fashion-mnist``)
and exports ``reference_vit.safetensors`` + ``reference_vit.json`` into ``--out``.  The
defaults are the shipped recipe (32 epochs, bf16 autocast, about an hour on 2 CPU cores);
copy the two files into ``src/tokenreduce/data/`` to ship them, then retrain the shipped
reducers with ``scripts/train_reference_reducers.sh``.

    OMP_WAIT_POLICY=PASSIVE python scripts/train_reference.py --out runs/reference
"""

from __future__ import annotations

import argparse
import sys

from tokenreduce.cli.options import positive_float, positive_int
from tokenreduce.training.reference import DEFAULT_DATA, command_line, train_reference


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_reference.py",
        description="Train the reference ViT from the Fashion-MNIST idx files and export reference_vit.safetensors "
        "+ reference_vit.json into --out.  The defaults are the shipped recipe (32 epochs, bf16 autocast).  "
        "--init starts a second phase from earlier weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", nargs="?", metavar="DATA_DIR", help="folder of the gzipped idx files (or --data-dir)")
    p.add_argument("--data-dir", "--data", dest="data_dir", help=f"folder of the gzipped idx files ({DEFAULT_DATA})")
    p.add_argument("--out", default="runs/reference", help="run folder (checkpoint, metrics.jsonl, export)")
    p.add_argument("--epochs", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("-b", "--batch-size", type=positive_int, default=128)
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms/biases)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--embed-dim", type=positive_int, help="model width (default 64; --init keeps the init's)")
    p.add_argument("--shift", type=int, default=1, help="random translation augmentation, max pixels")
    p.add_argument("--warmup", type=float, default=1.0, help="linear warm-up, epochs")
    p.add_argument("--init", help="start from these weights (a second phase) instead of random ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the model (slower)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast (fp32 weights); --no-amp trains in fp32 (for CPUs without native bf16)")
    p.add_argument("--fp32", action="store_true", help=argparse.SUPPRESS)  # deprecated spelling of --no-amp
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data and args.data_dir and args.data != args.data_dir:
        print("error: give the data folder once (DATA_DIR or --data-dir)", file=sys.stderr)
        return 2
    if args.fp32:
        print("note: --fp32 is deprecated; use --no-amp", file=sys.stderr)
    try:
        info = train_reference(
            args.data or args.data_dir or DEFAULT_DATA,
            args.out,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            label_smoothing=args.label_smoothing,
            embed_dim=args.embed_dim,
            max_shift=args.shift,
            warmup_epochs=args.warmup,
            init=args.init,
            seed=args.seed,
            compile=not args.no_compile,
            amp=args.amp and not args.fp32,
            resume=args.resume,
            threads=args.threads,
            command=command_line(),
        )
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"test top-1 {info['test_top1']:.4f}; wrote {args.out}/reference_vit.safetensors and reference_vit.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
