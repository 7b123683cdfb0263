"""The ``tokenreduce`` command line."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "deit_small_patch16_224"


def parse_param(text: str) -> tuple[str, Any]:
    """``"r=13"`` → ``("r", 13)``; values are Python literals (``layers=3,6,9`` → a tuple), else strings."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param expects NAME=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(value, list):
        value = tuple(value)
    return key.strip(), value


def load_model(name: str, pretrained: bool, checkpoint: str | None = None, img_size: int | None = None):
    """A timm model by name (random weights unless ``pretrained`` or ``checkpoint``)."""
    import timm

    kwargs: dict[str, Any] = {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:  # unknown model names
        raise SystemExit(f"error: {err}") from None
    if checkpoint:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(checkpoint))
    return model.eval()


def _print_table(rows: list[dict[str, Any]]) -> None:
    if rows:
        print(f"# {rows[0]['model']} on {rows[0]['device']}, {rows[0]['threads']} threads")
    header = f"{'method':<10} {'bs':>4} {'dtype':>5} {'GMACs':>13} {'img/s base':>11} {'img/s red.':>11} "
    header += f"{'speed-up':>8} {'ideal':>6} {'eff.':>5} {'latency p50/p90 ms (base | red.)':>34}"
    print(header)
    for r in rows:
        lb, lr = r["latency_ms_unreduced"], r["latency_ms_reduced"]
        print(
            f"{r['method']:<10} {r['batch_size']:>4} {r['dtype']:>5} "
            f"{r['gmacs_unreduced']:>5.2f}->{r['gmacs_reduced']:<6.2f} {r['images_per_s_unreduced']:>11.1f} "
            f"{r['images_per_s_reduced']:>11.1f} {r['speedup']:>7.2f}x {r['ideal_speedup']:>5.2f}x "
            f"{r['efficiency']:>5.2f} {lb['p50']:>9.1f}/{lb['p90']:<7.1f}| {lr['p50']:>7.1f}/{lr['p90']:<7.1f}"
        )


def cmd_benchmark(args: argparse.Namespace) -> int:
    import torch

    from .eval.throughput import allow_many_compiled_models, compare_throughput

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        allow_many_compiled_models()
    params = dict(args.param or [])
    rows = []
    for method in args.method:
        for dtype in args.dtype:
            for bs in args.batch_size:
                model = load_model(args.model, args.pretrained, args.checkpoint, args.img_size)
                try:
                    row = compare_throughput(
                        model,
                        method,
                        params,
                        budget=args.budget,
                        batch_size=bs,
                        repeats=args.repeats,
                        warmup=args.warmup,
                        dtype=dtype,
                        device=args.device,
                        compile=args.compile,
                    )
                except (ValueError, TypeError) as err:
                    print(f"error: {err}", file=sys.stderr)
                    return 2
                row["model"] = args.model
                rows.append(row)
    _print_table(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .eval.accuracy import (
        Config,
        default_configs,
        evaluate_reference,
        format_table,
        init_distributed_from_env,
        reference_checkpoint,
        reference_configs,
    )
    from .eval.imagefolder import REFERENCE_NAME, evaluate_imagefolder

    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = init_distributed_from_env()
    params = dict(args.param or [])
    from .methods import get_method

    try:
        for name in args.method or []:
            get_method(name)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.method:
        configs = [Config(None)]
        for name in args.method:
            # on the reference model a learned method runs from its shipped reducer unless given one
            shipped = reference_checkpoint(name, params, args.budget) if args.data is None else None
            if shipped and "checkpoint" not in params:
                label = f"{Config(name, params, args.budget).label} [{Path(shipped).stem}]"
                configs.append(Config(name, {**params, "checkpoint": shipped}, args.budget, label=label))
            else:
                configs.append(Config(name, params, args.budget))
    elif params:
        print("error: --param needs --method", file=sys.stderr)
        return 2
    else:
        budget = 0.6 if args.budget is None else args.budget
        configs = reference_configs(budget) if args.data is None else default_configs(budget)
    try:
        if args.data is None:
            if args.model not in (None, REFERENCE_NAME) or args.pretrained:
                raise ValueError("--model/--pretrained need --data DIR (the bundled test set is the reference model's)")
            result = {
                "model": REFERENCE_NAME,
                "data": "bundled Fashion-MNIST test set",
                "samples": 10000 if args.limit is None else min(args.limit, 10000),
                "skipped_images": [],
                "rows": evaluate_reference(
                    configs,
                    limit=args.limit,
                    batch_size=args.batch_size or 250,
                    repeats=args.repeats,
                    checkpoint=args.checkpoint,
                    progress=not args.no_progress,
                ),
            }
        else:
            result = evaluate_imagefolder(
                args.model or REFERENCE_NAME,
                args.data,
                configs=configs,
                pretrained=args.pretrained,
                checkpoint=args.checkpoint,
                crop_pct=args.crop_pct,
                limit=args.limit,
                batch_size=args.batch_size or 64,
                workers=args.workers,
                repeats=args.repeats,
                device=args.device,
                progress=not args.no_progress,
            )
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result["world_size"] = world
    if rank != 0:
        return 0
    print(f"{result['model']} on {result['data']}: {result['samples']} images, {world} process(es)")
    print(format_table(result["rows"]))
    if result["skipped_images"]:
        print(f"skipped {len(result['skipped_images'])} unreadable image(s), not counted:")
        for err in result["skipped_images"]:
            print(f"  {err}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if args.method:  # what was asked for explicitly must run
        failed = [r for r in result["rows"] if "skipped" in r]
        for r in failed:
            print(f"error: {r['label']}: {r['skipped']}", file=sys.stderr)
        return 2 if failed else 0
    return 0


def cmd_train_reference(args: argparse.Namespace) -> int:
    from .training.checkpoint import CheckpointError
    from .training.reference import command_line, train_reference

    try:
        info = train_reference(
            args.data,
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
            amp=not args.fp32,
            resume=args.resume,
            threads=args.threads,
            command=command_line(),
        )
    except (FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"test top-1 {info['test_top1']:.4f}; wrote {args.out}/reference_vit.safetensors and reference_vit.json")
    return 0


def _reference_or_timm(args: argparse.Namespace):
    from .eval.imagefolder import REFERENCE_NAME, load_timm_model

    return load_timm_model(args.model or REFERENCE_NAME, args.pretrained, args.checkpoint)


def cmd_train(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import TensorDataset

    from .training.learned import train_reducer

    if args.threads:
        torch.set_num_threads(args.threads)
    params = dict(args.param or [])
    try:
        model = _reference_or_timm(args)
        if args.data is None:
            if args.model not in (None, "reference"):
                raise ValueError("--model needs --data DIR (the default data is the reference model's Fashion-MNIST)")
            from .models.reference import load_fashion_mnist, preprocess

            images, labels = load_fashion_mnist(args.fashion_mnist, "train")
            dataset, transform = TensorDataset(images, labels), preprocess
        else:
            import timm.data

            cfg = timm.data.resolve_data_config({}, model=model)
            dataset = timm.data.create_dataset("", root=args.data, split="train",
                                               transform=timm.data.create_transform(**cfg, is_training=True))
            if len(dataset) == 0:
                raise ValueError(f"no images found under {args.data}")
            transform = None
        out = train_reducer(
            model, args.method, dataset, out_dir=args.out, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, finetune=args.finetune, resume=args.resume, checkpoint_every=args.checkpoint_every,
            max_steps=args.max_steps, transform=transform, device=args.device, progress=not args.no_progress,
            amp={"auto": None, "fp32": False, "bf16": True}[args.precision], distill_weight=args.distill_weight,
            label_smoothing=args.label_smoothing, **params,
        )
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = out["result"]
    print(f"{args.method}: {result.step}/{result.total_steps} steps in {result.wall_time_s:.0f} s; "
          f"last metrics {json.dumps({k: round(v, 4) for k, v in result.last_metrics.items()})}")
    print(f"wrote {out['checkpoint']} (load with tokenreduce.apply(model, {args.method!r}, checkpoint=...))")
    if "model" in out:
        print(f"wrote {out['model']} (the fine-tuned backbone: pass it as --checkpoint with the reducer)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .eval.accuracy import evaluate_reference
    from .eval.imagefolder import evaluate_imagefolder
    from .eval.sweep import run_sweep, sweep_configs
    from .methods import REGISTRY, get_method

    try:
        for name in args.methods or []:
            get_method(name)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    methods = args.methods or [m for m, cls in sorted(REGISTRY.items()) if not cls.learned]
    extra: dict[str, dict] = {}
    if args.data is None and not args.methods:  # the reference model: add the learned methods it ships
        from .models.reference import shipped_reducers

        shipped = {k: str(v) for k, v in shipped_reducers().items()}
        for name in ("dynamicvit", "cropr"):  # budget-resolvable learned methods (LTMP's counts are data-driven)
            if name in shipped:
                methods.append(name)
                extra[name] = {"checkpoint": shipped[name]}
        if "dtps" in shipped:
            extra["tps:tps-dtps"] = {"variant": "dtps", "checkpoint": shipped["dtps"]}
    configs = sweep_configs(methods, args.budgets, extra)
    if args.data is None:
        def evaluate(cfgs):
            return evaluate_reference(cfgs, limit=args.limit, repeats=args.repeats, progress=not args.no_progress)
    else:
        def evaluate(cfgs):
            return evaluate_imagefolder(args.model, args.data, configs=cfgs, pretrained=args.pretrained,
                                        checkpoint=args.checkpoint, limit=args.limit, repeats=args.repeats,
                                        progress=not args.no_progress)["rows"]
    try:
        rows = run_sweep(evaluate, configs, args.out)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .eval.accuracy import format_table

    print(format_table(rows))
    print(f"wrote {args.out}/sweep.csv, sweep.json, top1_vs_gmacs.png, top1_vs_throughput.png")
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from PIL import Image

    from .viz import visualize

    params = dict(args.param or [])
    try:
        model = _reference_or_timm(args)
        with Image.open(args.image) as img:
            if model.patch_embed.proj.in_channels == 1:
                import numpy as np
                import torch

                from .models.reference import preprocess

                gray = img.convert("L").resize((28, 28))
                x = preprocess(torch.from_numpy(np.asarray(gray).copy()).unsqueeze(0))
            else:
                import timm.data

                cfg = timm.data.resolve_data_config({}, model=model)
                x = timm.data.create_transform(**cfg)(img.convert("RGB")).unsqueeze(0)
        sheet = visualize(model, x, args.method, **params)
    except (FileNotFoundError, ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({sheet.size[0]}x{sheet.size[1]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenreduce", description="Token reduction for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser(
        "benchmark",
        help="images/s and latency of reduced vs unreduced models, measured in one process",
        description="Throughput of the reduced and the unreduced model, timed alternately in one process "
        "(warm-up discarded, medians of repeats).",
    )
    bench.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    bench.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs internet)")
    bench.add_argument("--checkpoint", help="safetensors state dict for the model")
    bench.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    bench.add_argument("--method", nargs="+", default=["tome"], help="method name(s)")
    bench.add_argument("--param", action="append", type=parse_param, metavar="NAME=VALUE", help="method parameter")
    bench.add_argument("--budget", type=float, help="fraction of the unreduced GMACs to keep")
    bench.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32])
    bench.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"],
                       help="fp32, and/or autocast to bf16 / fp16")
    bench.add_argument("--repeats", type=int, default=10, help="timed forwards per model (median reported)")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--compile", action="store_true",
                       help="torch.compile both models (compiled during warm-up, untimed; minutes per model on a CPU)")
    bench.add_argument("--json", help="write the results as JSON here")
    bench.set_defaults(func=cmd_benchmark)

    ev = sub.add_parser(
        "evaluate",
        help="top-1/top-5, GMACs and images/s of every method (default: bundled reference model, offline)",
        description="Accuracy under token reduction.  With no arguments: the bundled Fashion-MNIST reference ViT "
        "on the bundled 10k test set, unreduced and under every method (its defaults and --budget, default 0.6). "
        "With --data DIR: an ImageFolder (ImageNet validation layout) through timm's data pipeline with the "
        "model's own data config.  Runs under torchrun (each sample counted once, counts all-reduced).",
    )
    ev.add_argument("--model", help="timm model name, or 'reference' (default: the bundled reference model)")
    ev.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs internet)")
    ev.add_argument("--checkpoint", help="safetensors state dict for the model")
    ev.add_argument("--data", help="ImageFolder root: DIR/<class>/<image> (ImageNet validation layout)")
    ev.add_argument("--crop-pct", type=float, help="override the model's crop_pct")
    ev.add_argument("--method", nargs="+", help="method name(s) (default: every method, defaults and --budget)")
    ev.add_argument("--param", action="append", type=parse_param, metavar="NAME=VALUE", help="method parameter")
    ev.add_argument("--budget", type=float, help="fraction of the unreduced GMACs to keep (default run: 0.6)")
    ev.add_argument("--limit", type=int, help="evaluate N images only")
    ev.add_argument("--batch-size", type=int, help="images per forward (default 250 reference, 64 ImageFolder)")
    ev.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    ev.add_argument("--repeats", type=int, default=5, help="timed forwards per model for images/s")
    ev.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", default="results/evaluate.json", help="write the results here ('' to skip)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_evaluate)

    tref = sub.add_parser(
        "train-reference",
        help="train the bundled reference ViT on Fashion-MNIST (the shipped recipe: ~1 hour on 2 CPU cores)",
        description="Train the reference model from the original Fashion-MNIST idx files and export "
        "reference_vit.safetensors + reference_vit.json into --out. The defaults are the shipped recipe "
        "(32 epochs, bf16 autocast). --init starts a second phase from earlier weights.",
    )
    tref.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="folder of the gzipped idx files")
    tref.add_argument("--out", default="runs/reference", help="run folder (checkpoint, metrics.jsonl, export)")
    tref.add_argument("--epochs", type=int, default=32)
    tref.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    tref.add_argument("--batch-size", type=int, default=128)
    tref.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms/biases)")
    tref.add_argument("--label-smoothing", type=float, default=0.0)
    tref.add_argument("--embed-dim", type=int, help="model width (default 64; --init keeps the init's)")
    tref.add_argument("--shift", type=int, default=1, help="random translation augmentation, max pixels")
    tref.add_argument("--warmup", type=float, default=1.0, help="linear warm-up, epochs")
    tref.add_argument("--init", help="start from these weights (a second phase) instead of random ones")
    tref.add_argument("--seed", type=int, default=0)
    tref.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    tref.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    tref.add_argument("--no-compile", action="store_true", help="do not torch.compile the model (slower)")
    tref.add_argument(
        "--fp32", action="store_true", help="train in fp32 instead of bf16 autocast (slower on CPUs with AVX512-BF16)"
    )
    tref.set_defaults(func=cmd_train_reference)

    tr_ = sub.add_parser(
        "train",
        help="train a learned method (ltmp, cropr, dynamicvit, tps variant=dtps)",
        description="Train a learned method's parameters (backbone frozen unless --finetune) and write "
        "OUT/reducer.safetensors.  Default: the bundled reference model on the Fashion-MNIST training set "
        "(Debian package dataset-fashion-mnist).  Resumable (--resume); runs under torchrun.",
    )
    tr_.add_argument("--method", required=True)
    tr_.add_argument("--param", action="append", type=parse_param, metavar="NAME=VALUE", help="method parameter")
    tr_.add_argument("--model", help="timm model name, or 'reference' (default)")
    tr_.add_argument("--pretrained", action="store_true")
    tr_.add_argument("--checkpoint", help="safetensors state dict for the model")
    tr_.add_argument("--data", help="ImageFolder root with a train/ split (timm's data pipeline, with augmentation)")
    tr_.add_argument("--fashion-mnist", default="/usr/share/datasets/fashion-mnist", help="idx folder (default data)")
    tr_.add_argument("--out", required=True, help="run folder")
    tr_.add_argument("--epochs", type=int, default=1)
    tr_.add_argument("--batch-size", type=int, default=128)
    tr_.add_argument("--lr", type=float, help="base learning rate (default: the method's)")
    tr_.add_argument("--finetune", action="store_true", help="train the backbone too")
    tr_.add_argument("--resume", action="store_true")
    tr_.add_argument("--max-steps", type=int, help="stop after this many steps (resumable)")
    tr_.add_argument("--checkpoint-every", type=int, default=200)
    tr_.add_argument("--threads", type=int)
    tr_.add_argument("--device", default="cpu")
    tr_.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                     help="bf16: autocast (fp32 weights), 1.2-1.4x faster on CPUs with AVX512-BF16; "
                     "auto: bf16 on a GPU, fp32 on a CPU")
    tr_.add_argument("--distill-weight", type=float,
                     help="dynamicvit / tps dtps: weight of the logit and token distillation (default 0.5; 0: off)")
    tr_.add_argument("--label-smoothing", type=float, help="ltmp: label smoothing of the cross-entropy (default 0.1)")
    tr_.add_argument("--no-progress", action="store_true")
    tr_.set_defaults(func=cmd_train)

    sw = sub.add_parser(
        "sweep",
        help="methods x budgets -> CSV/JSON + accuracy-vs-GMACs and accuracy-vs-images/s plots",
        description="Evaluate every method at every budget (resumable: finished cells are skipped), then write "
        "sweep.csv, sweep.json and two PNG plots with the Pareto front and the unreduced model.",
    )
    sw.add_argument("--methods", nargs="+", help="default: every training-free method")
    sw.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.8, 0.7, 0.6, 0.5, 0.4])
    sw.add_argument("--model", default="reference")
    sw.add_argument("--pretrained", action="store_true")
    sw.add_argument("--checkpoint")
    sw.add_argument("--data", help="ImageFolder root (default: the bundled test set)")
    sw.add_argument("--limit", type=int)
    sw.add_argument("--repeats", type=int, default=3)
    sw.add_argument("--out", default="results/sweep")
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(func=cmd_sweep)

    vz = sub.add_parser(
        "visualize",
        help="image -> PNG of kept / merged / pruned tokens per reduction stage",
        description="One panel per reduction stage: kept patches as they are, pruned patches grey, "
        "merged groups in one colour each.",
    )
    vz.add_argument("image")
    vz.add_argument("--method", default="tome")
    vz.add_argument("--param", action="append", type=parse_param, metavar="NAME=VALUE")
    vz.add_argument("--model", help="timm model name, or 'reference' (default)")
    vz.add_argument("--pretrained", action="store_true")
    vz.add_argument("--checkpoint")
    vz.add_argument("--out", default="results/tokens.png")
    vz.set_defaults(func=cmd_visualize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
