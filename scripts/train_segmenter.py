#!/usr/bin/env python
"""Train the bundled reference segmenter on Fashion-MNIST mosaics (a maintainer's tool).

Reads the Fashion-MNIST training items (``apt-get install dataset-fashion-mnist``), starts the
backbone from the bundled reference classifier and exports ``segmenter_vit.safetensors`` +
``segmenter_vit.json`` into ``--out``.  The defaults are the shipped recipe.  ``--stop-at-step``
ends a session early with a checkpoint; ``--resume`` continues it exactly.

    OMP_WAIT_POLICY=PASSIVE python scripts/train_segmenter.py --out runs/segmenter
"""

from __future__ import annotations

import argparse
import json

from tokenreduce.cli.options import positive_float, positive_int
from tokenreduce.training.reference import DEFAULT_DATA, command_line
from tokenreduce.training.segmentation import train_reference_segmenter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train_segmenter.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="folder of the gzipped idx files")
    p.add_argument("--out", default="runs/segmenter")
    p.add_argument("--epochs", type=positive_int, default=8, help="passes over the 60k training items")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("-b", "--canvases-per-batch", type=positive_int, default=32)
    p.add_argument("--init", default="classifier",
                   help="'classifier' (the bundled reference classifier), 'none', or a segmenter safetensors file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--stop-at-step", type=positive_int, help="end early with a checkpoint (resumable)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    info = train_reference_segmenter(
        args.data_dir, args.out, epochs=args.epochs, canvases_per_batch=args.canvases_per_batch, lr=args.lr,
        seed=args.seed, init=None if args.init == "none" else args.init, threads=args.threads,
        stop_at_step=args.stop_at_step, resume=args.resume, compile=not args.no_compile, command=command_line(),
    )
    print(json.dumps({k: info[k] for k in ("complete", "eval") if k in info}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
