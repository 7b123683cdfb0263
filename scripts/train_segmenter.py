#!/usr/bin/env python
"""Train the bundled reference segmenter on Fashion-MNIST mosaics (a maintainer's tool).

Reads the Fashion-MNIST training items (``apt-get install dataset-fashion-mnist``), starts the
backbone from the bundled reference classifier and exports ``segmenter_vit.safetensors`` +
``segmenter_vit.json`` into ``--out``.  The defaults are the shipped recipe.  ``--stop-at-step``
ends a session early with a checkpoint; ``--resume`` continues it exactly.

``--cropr WEIGHTS`` fine-tunes a trained segmenter end to end with Token Cropr (segmentation form,
one query per patch, per-query auxiliary heads, last-layer fusion, p curriculum over the first half)
at ``--budget`` of the unreduced GMACs, and exports ``segmenter_cropr.safetensors`` +
``cropr_seg.safetensors`` (the reducer, naming the weights it was trained with).  ``--cropr-init REDUCER``
continues from such a reducer (with ``--cropr`` the weights it was trained with; usually ``--curriculum 0``).

    OMP_WAIT_POLICY=PASSIVE python scripts/train_segmenter.py --out runs/segmenter
    OMP_WAIT_POLICY=PASSIVE python scripts/train_segmenter.py --cropr runs/segmenter/segmenter_vit.safetensors \
        --out runs/cropr_segmenter --epochs 2 --lr 3e-4
"""

from __future__ import annotations

import argparse
import json

from tokenreduce.cli.options import positive_float, positive_int
from tokenreduce.training.reference import DEFAULT_DATA, command_line
from tokenreduce.training.segmentation import train_cropr_segmenter, train_reference_segmenter


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
    p.add_argument("--decoder", choices=("bilinear", "subpixel"),
                   help="per-patch logits upsampled bilinearly (Segmenter; the default), or each patch's own pixels; "
                   "with --cropr: switch the weights' decoder (a bilinear head starts a subpixel one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--stop-at-step", type=positive_int, help="end early with a checkpoint (resumable)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--cropr", metavar="WEIGHTS", help="fine-tune these segmenter weights end to end with Cropr")
    p.add_argument("--budget", type=positive_float, default=0.6, help="with --cropr: fraction of the GMACs kept")
    p.add_argument("--curriculum", type=float, default=0.5, help="with --cropr: fraction of steps p rises over")
    p.add_argument("--cropr-init", metavar="REDUCER",
                   help="with --cropr: continue from this trained Cropr reducer (trained with those weights)")
    args = p.parse_args(argv)
    if args.cropr:
        summary = train_cropr_segmenter(
            args.cropr, args.data_dir, args.out, budget=args.budget, epochs=args.epochs, lr=args.lr,
            canvases_per_batch=args.canvases_per_batch, curriculum=args.curriculum, seed=args.seed,
            reducer_init=args.cropr_init, decoder=args.decoder,
            threads=args.threads, stop_at_step=args.stop_at_step, resume=args.resume, command=command_line(),
        )
        print(json.dumps({k: summary[k] for k in ("complete", "params", "eval") if k in summary}, indent=2))
        return 0
    info = train_reference_segmenter(
        args.data_dir, args.out, epochs=args.epochs, canvases_per_batch=args.canvases_per_batch, lr=args.lr,
        seed=args.seed, init=None if args.init == "none" else args.init, decoder=args.decoder or "bilinear",
        threads=args.threads,
        stop_at_step=args.stop_at_step, resume=args.resume, compile=not args.no_compile, command=command_line(),
    )
    print(json.dumps({k: info[k] for k in ("complete", "eval") if k in info}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
