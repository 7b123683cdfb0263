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
    header = f"{'method':<10} {'bs':>4} {'dtype':>5} {'GMACs':>13} {'img/s base':>11} {'img/s red.':>11} "
    header += f"{'speed-up':>8} {'ideal':>6} {'eff.':>5}"
    print(header)
    for r in rows:
        print(
            f"{r['method']:<10} {r['batch_size']:>4} {r['dtype']:>5} "
            f"{r['gmacs_unreduced']:>5.2f}->{r['gmacs_reduced']:<6.2f} {r['images_per_s_unreduced']:>11.1f} "
            f"{r['images_per_s_reduced']:>11.1f} {r['speedup']:>7.2f}x {r['ideal_speedup']:>5.2f}x "
            f"{r['efficiency']:>5.2f}"
        )


def cmd_benchmark(args: argparse.Namespace) -> int:
    import torch

    from .eval.throughput import compare_throughput

    if args.threads:
        torch.set_num_threads(args.threads)
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
    bench.add_argument("--batch-size", type=int, nargs="+", default=[32])
    bench.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    bench.add_argument("--repeats", type=int, default=10, help="timed forwards per model (median reported)")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--json", help="write the results as JSON here")
    bench.set_defaults(func=cmd_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
