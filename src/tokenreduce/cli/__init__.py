"""The ``tokenreduce`` command line.

``tokenreduce evaluate | benchmark | sweep | visualize | train``; ``tokenreduce
COMMAND --help`` for each.  The flags follow timm's ``validate.py`` and ``train.py``
(:mod:`.options`); the commands are in :mod:`.commands`.  Run as ``tokenreduce ...``
or ``python -m tokenreduce.cli ...`` (e.g. under ``torchrun``).
"""

from __future__ import annotations

import argparse
import sys

from ..models.loading import ModelLoadError, load_model
from ..threads import set_threads
from ..training.recipes import recipe_names
from .commands import (
    DEFAULT_MODEL,
    cmd_benchmark,
    cmd_evaluate,
    cmd_sweep,
    cmd_train,
    cmd_visualize,
)
from .export import add_export
from .options import (
    amp_options,
    common_options,
    data_options,
    fraction,
    method_options,
    model_options,
    nonnegative_int,
    output_options,
    parse_param,
    positive_float,
    positive_int,
    resolve_device,
)

__all__ = ["DEFAULT_MODEL", "build_parser", "load_model", "main", "parse_param"]

DEFAULT_BUDGETS = (1.0, 0.8, 0.7, 0.6, 0.5, 0.4)
RECIPE_FLAGS = (
    ("--weight-decay", "weight_decay", float), ("--min-lr", "min_lr", float),
    ("--warmup-epochs", "warmup_epochs", float), ("--layer-decay", "layer_decay", float),
    ("--drop-path", "drop_path", float), ("--mixup", "mixup", float), ("--cutmix", "cutmix", float),
    ("--clip-grad", "clip_grad", float), ("--model-ema-decay", "ema_decay", float),
    ("--ratio-weight", "ratio_weight", float),
)
"""``train``'s timm-named flags for recipe values: (flag, recipe value, type); ``--set`` reaches every value."""
SEEDS_HELP = ("a seeded method (random) whose seed is not set with --param runs with seeds 0..N-1 and is "
              "reported as mean ± std (default: %(default)s)")


def package_version() -> str:
    """The installed distribution's version (the package's ``__version__`` when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokenreduce")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        parents=[
            model_options(DEFAULT_MODEL, help_default=f"{DEFAULT_MODEL}, random weights"),
            method_options(multiple=True, default=["tome"], help="method name(s) (default: tome)"),
            amp_options(default_help="off (fp32)"),
            output_options("--json", None, what="the rows as JSON"),
            common_options(),
        ],
        help="images/s and latency of reduced vs unreduced models, measured in one process",
        description="Throughput of the reduced and the unreduced model, timed alternately in one process "
        "(warm-up discarded, medians of repeats), for every method and batch size.",
    )
    p.add_argument("-b", "--batch-size", type=positive_int, nargs="+", default=[1, 8, 32], metavar="N",
                   help="batch size(s) (default: 1 8 32)")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed forwards per model (default: %(default)s)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed forwards first (default: %(default)s)")
    p.add_argument("--compile", "--torchcompile", dest="compile", nargs="?", const="inductor", choices=["inductor"],
                   metavar="BACKEND", help="torch.compile both models (inductor; compiled during warm-up, untimed; "
                   "minutes per model on a CPU)")
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16", "fp16"], help=argparse.SUPPRESS)  # deprecated
    p.set_defaults(func=cmd_benchmark)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        parents=[
            data_options(batch_default=None, batch_help="images per forward (default: 250 on the bundled test set, "
                         "64 on an ImageFolder)",
                         data_help="ImageFolder root DIR/<class>/<image> (ImageNet validation layout); "
                         "default: the bundled Fashion-MNIST test set"),
            model_options(None, help_default="the bundled reference model"),
            method_options(multiple=True, default=None,
                           help="method name(s) (default: every method at budgets 0.75 and 0.6, or at --budget, "
                           "and at its paper defaults where they fit the model)"),
            amp_options(default_help="off (fp32)"),
            output_options("--json", "results/evaluate.json", what="the results as JSON"),
            common_options(),
        ],
        help="top-1/top-5, GMACs and images/s of every method (default: bundled reference model, offline)",
        description="Accuracy under token reduction.  With no arguments: the bundled Fashion-MNIST reference ViT "
        "on the bundled 10k test set, unreduced and under every method at budgets 0.75 and 0.6 (or --budget), "
        "and at its paper defaults where the model has the token grid they were set for. "
        "With DATA_DIR: an ImageFolder (ImageNet validation layout) through timm's data pipeline with the "
        "model's own data config.  Methods, parameters, budget, model, checkpoint and output are checked before "
        "any work.  Runs under torchrun (each sample counted once, counts all-reduced).",
    )
    p.add_argument("--crop-pct", type=fraction, metavar="F", help="override the model's crop_pct")
    p.add_argument("--limit", type=positive_int, metavar="N", help="evaluate N images only (a fixed-seed sample)")
    p.add_argument("--repeats", type=positive_int, default=9,
                   help="timed forwards per model for images/s (default: %(default)s)")
    p.add_argument("--seeds", type=positive_int, default=3, metavar="N", help=SEEDS_HELP)
    p.add_argument("--finetuned", metavar="DIR",
                   help="also evaluate the fine-tuned models in DIR (sub-folders with model.safetensors + "
                   "reducer.safetensors, as scripts/finetune_table.py and train --recipe write them), each with its "
                   "own weights (default on the bundled test set: results/finetune_table when it exists)")
    p.add_argument("--task", choices=("classification", "segmentation"), default="classification",
                   help="segmentation: mIoU of a segmenter trained by the project (default: the bundled reference "
                   "segmenter on the bundled mosaics; DATA_DIR: a set in the ADE20k layout, images/ + annotations/) "
                   "at --budget (default 0.6) with the full token grid restored (default: %(default)s)")
    p.add_argument("--restore", choices=("frozen", "fusion"), default="frozen",
                   help="with --task segmentation: how pruned tokens come back for the decoder, frozen as pruned or "
                   "rejoining before the last block (default: %(default)s)")
    p.set_defaults(func=cmd_evaluate)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        parents=[
            data_options(batch_default=None, batch_help="images per forward (default: 250 on the bundled test set, "
                         "64 on an ImageFolder)",
                         data_help="ImageFolder root (default: the bundled Fashion-MNIST test set)"),
            model_options("reference", help_default="reference"),
            amp_options(default_help="off (fp32)"),
            common_options(),
        ],
        help="methods x budgets -> CSV/JSON + accuracy-vs-GMACs and accuracy-vs-images/s plots",
        description="Evaluate every method at every budget (resumable: finished cells in OUT/results.jsonl are "
        "skipped when model, weights, data, limit, batch size, precision, device, seeds and version match; another "
        "sweep's folder is refused unless --overwrite), then write sweep.csv, sweep.json and two PNG plots with "
        "the Pareto front, the unreduced model and 95% intervals (the plots need pip install \"tokenreduce[plot]\").",
    )
    p.add_argument("--methods", "--method", dest="methods", nargs="+", metavar="NAME",
                   help="default: every training-free method (plus the learned ones shipped for the reference model)")
    p.add_argument("--budgets", nargs="+", type=fraction, default=list(DEFAULT_BUDGETS), metavar="F",
                   help="fractions of the unreduced GMACs, each in (0, 1] (default: 1 0.8 0.7 0.6 0.5 0.4)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="evaluate N images only")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed forwards per model (default: %(default)s)")
    p.add_argument("--out", default="results/sweep", metavar="DIR", help="results folder (default: %(default)s)")
    p.add_argument("--seeds", type=positive_int, default=3, metavar="N", help=SEEDS_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="start over: discard the cells, tables and plots already in --out (a folder holding "
                   "cells of other settings is refused without it)")
    p.add_argument("--task", choices=("classification", "segmentation"), default="classification",
                   help="segmentation: mIoU of a segmenter trained by the project against GMACs and images/s "
                   "(default: the bundled reference segmenter on the bundled mosaics) (default: %(default)s)")
    p.add_argument("--restore", choices=("frozen", "fusion"), default="frozen",
                   help="with --task segmentation: how pruned tokens come back for the decoder (default: %(default)s)")
    p.set_defaults(func=cmd_sweep, interrupted="interrupted: finished cells are kept in --out/results.jsonl; "
                   "rerun the same command to continue")


def _add_visualize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize",
        parents=[
            model_options(None, help_default="the bundled reference model"),
            method_options(multiple=False, default="tome", help="method name (default: tome)"),
            output_options("--out", "results/tokens.png", what="the picture"),
            common_options(),
        ],
        help="image -> PNG of kept / merged / pruned tokens per reduction stage",
        description="One panel per reduction stage: kept patches as they are, pruned patches grey, "
        "merged groups in one colour each.",
    )
    p.add_argument("image", nargs="?", help="the input image (any format PIL reads); optional with --task "
                   "segmentation (default: an evaluation mosaic, --index)")
    p.add_argument("--task", choices=("classification", "segmentation"), default="classification",
                   help="segmentation: the reference segmenter's token maps beside its predicted mask and the truth "
                   "(default: %(default)s)")
    p.add_argument("--index", type=int, default=0, metavar="N",
                   help="with --task segmentation and no IMAGE: the N-th evaluation mosaic (default: %(default)s)")
    p.set_defaults(func=cmd_visualize)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        parents=[
            data_options(batch_default=None, batch_help="images per step and process (default: 128, or the "
                         "recipe's batch divided by the processes)",
                         data_help="a folder of the Fashion-MNIST idx files (reference model; default "
                         "/usr/share/datasets/fashion-mnist), or an ImageFolder root with a train/ split"),
            model_options(None, help_default="the bundled reference model"),
            method_options(multiple=False, default=None, required=True,
                           help="ltmp, cropr, dynamicvit, dtps; with --recipe, any method"),
            amp_options(default_help="on for a GPU, off for a CPU (bfloat16 only)"),
            common_options(),
        ],
        help="train a learned method, or fine-tune a model with any method under its paper's recipe",
        description="Without --recipe: train a learned method's parameters (backbone frozen unless --finetune) and "
        "write OUT/reducer.safetensors.  With --recipe: fine-tune the backbone with the method's reduction on under "
        "a paper's recipe (optimiser, schedule, layer decay, mixup/cutmix, smoothing, drop path, EMA, losses) and "
        "write OUT/model.safetensors and OUT/reducer.safetensors.  Default: the bundled reference model on the "
        "Fashion-MNIST training set (apt-get install dataset-fashion-mnist, or --data-dir a folder of the idx "
        "files).  Resumable (--resume); runs under torchrun.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (checkpoint, metrics, reducer)")
    p.add_argument("--recipe", metavar="NAME", choices=["paper", *recipe_names()],
                   help="fine-tune the backbone under this recipe: paper (the method's own), "
                   f"{', '.join(recipe_names())} (docs/training.md#fine-tuning-recipes)")
    p.add_argument("--set", dest="recipe_set", action="append", type=parse_param, metavar="KEY=VALUE",
                   help="override a recipe value, e.g. layer_decay=0.75, mixup=0, ratio_weight=5 (repeatable)")
    p.add_argument("--epochs", type=positive_int, help="(default: 1, or the recipe's)")
    p.add_argument("--lr", type=positive_float, help="base learning rate (default: the method's, or the recipe's)")
    for flag, key, kind in RECIPE_FLAGS:
        p.add_argument(flag, dest=f"recipe_{key}", type=kind, metavar="X", help=f"with --recipe: its {key}")
    p.add_argument("--epoch-steps", type=positive_int, metavar="N",
                   help="at most N steps per epoch (a shortened run with the schedule's shape)")
    p.add_argument("--finetune", action="store_true",
                   help="without --recipe: train the backbone too, at the method's backbone rate")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds another run (its checkpoint and log are removed)")
    p.add_argument("--max-steps", type=positive_int, metavar="N", help="stop after N steps (resumable)")
    p.add_argument("--checkpoint-every", type=positive_int, default=200, metavar="N",
                   help="steps between checkpoints (default: %(default)s)")
    p.add_argument("--distill-weight", type=float,
                   help="dynamicvit / dtps: weight of the logit and token distillation (default 0.5; 0: off); with "
                   "--recipe, any method (training-free ones: logits only)")
    p.add_argument("--label-smoothing", "--smoothing", type=float,
                   help="ltmp: label smoothing of the cross-entropy (default 0.1); with --recipe, any method")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help=argparse.SUPPRESS)  # deprecated: --amp
    p.add_argument("--fashion-mnist", help=argparse.SUPPRESS)  # deprecated: --data-dir
    p.set_defaults(func=cmd_train, interrupted="interrupted")


def build_parser() -> argparse.ArgumentParser:
    """The ``tokenreduce`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="tokenreduce",
        description="Token reduction (pruning, merging) for timm Vision Transformers: accuracy, speed, pictures, "
        "training of the learned methods.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_evaluate(sub)
    _add_benchmark(sub)
    _add_sweep(sub)
    _add_visualize(sub)
    _add_train(sub)
    add_export(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..training.checkpoint import CheckpointError

    return (ValueError, TypeError, OSError, ModelLoadError, CheckpointError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 a usage error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or argparse's own error message
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    finished = False
    try:
        args.device = resolve_device(args.device)
        if args.threads:
            set_threads(args.threads)
        status = args.func(args)
        finished = True
        return status
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(getattr(args, "interrupted", "interrupted: no results file written"), file=sys.stderr)
        return 130
    finally:
        from ..distributed import shutdown_distributed

        shutdown_distributed(wait=finished)
