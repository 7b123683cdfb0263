"""``tokenreduce export``: a reduced model as an ONNX file, verified in ONNX Runtime before it is kept.

    tokenreduce export --method tome --out tome.onnx                       # the bundled reference model
    tokenreduce export --format onnx --model deit_small_patch16_224 --pretrained --method evit --out evit.onnx

The model and method flags are the other commands' (:mod:`.options`); a learned method takes its
trained parameters with ``--param checkpoint=PATH`` (on the bundled reference model the shipped ones
by default).  See :func:`tokenreduce.export_onnx` for what is exported and how it is checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.loading import REFERENCE_NAME
from .options import common_options, free_path, method_options, model_options, output_options, positive_int

FORMATS = ("onnx",)
CALIBRATION_IMAGES = 256
"""Bundled test images a default tuned for another model (PPT's threshold) is calibrated on, for the reference model."""


def add_export(sub: argparse._SubParsersAction) -> None:
    """Register the ``export`` subcommand."""
    p = sub.add_parser(
        "export",
        parents=[
            model_options(None, help_default="the bundled reference model"),
            method_options(multiple=False, default=None, help="method name (default: none, the unreduced model)"),
            output_options("--out", "model.onnx", what="the ONNX model"),
            common_options(),
        ],
        help="export a reduced model to ONNX (dynamic batch), verified against PyTorch in ONNX Runtime",
        description="Export the model with the method applied to an ONNX file with a dynamic batch axis and a fixed "
        "image size, then run it in ONNX Runtime on the example images and a second batch size and keep it only if "
        "its outputs match PyTorch's within --atol.  PPT exports both branches with a per-image select, LTMP its "
        "padded form.  Needs pip install \"tokenreduce[onnx]\".",
    )
    p.add_argument("--format", choices=FORMATS, default="onnx", help="(default: %(default)s)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=2, metavar="N",
                   help="example images traced and verified (the bundled test images for the reference model, "
                   "else random ones; default: %(default)s)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis to --batch-size")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest |ONNX Runtime - PyTorch| accepted on any output (default: %(default)g)")
    p.add_argument("--opset", type=positive_int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--provider", default="CPUExecutionProvider",
                   help="ONNX Runtime execution provider that verifies the file (default: %(default)s)")
    p.set_defaults(func=cmd_export)


def _example(model: nn.Module, name: str, batch_size: int) -> Tensor | None:
    """The bundled test images for the reference model; ``None`` (random images) for any other."""
    if name != REFERENCE_NAME:
        return None
    from ..models.reference import load_reference_testset, preprocess

    images, _ = load_reference_testset(batch_size)
    return preprocess(images)


def cmd_export(args: argparse.Namespace) -> int:
    """Export ``--model`` with ``--method`` applied to ``--out``; returns the exit status."""
    from ..api import apply, reducer
    from ..eval.accuracy import Config, reference_checkpoint
    from ..export import OnnxExportError, export_onnx, require_onnx
    from .commands import check_configs, check_method_names, model_from_args
    from .options import check_output

    try:
        require_onnx()
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = check_output(args.out, "--out", suffixes={".onnx"})
    if out is None:
        raise ValueError("--out: give the .onnx file to write")
    name = args.model or REFERENCE_NAME
    params = dict(args.param or [])
    if args.method is None and (params or args.budget is not None):
        raise ValueError("--param/--budget need --method")
    if args.method is not None:
        check_method_names([args.method])
    model = model_from_args(args, name)
    if args.method is not None:
        shipped = reference_checkpoint(args.method, params, args.budget) if name == REFERENCE_NAME else None
        if shipped and "checkpoint" not in params:
            params["checkpoint"] = shipped
            print(f"{args.method}: the shipped reducer {Path(shipped).name}")
        check_configs(model, [Config(args.method, params, args.budget)])
        apply(model, args.method, budget=args.budget, **params)
    example = _example(model, name, args.batch_size)
    if args.method is not None and reducer(model).needs_calibration(params):
        images = _example(model, name, CALIBRATION_IMAGES)
        if images is None:
            images = torch.randn(args.batch_size, *_input_size(model), generator=torch.Generator().manual_seed(0))
        value = reducer(model).calibrate(model, images.to(args.device), args.budget, params)
        shown = ", ".join(f"{v:.3g}" for v in (value if isinstance(value, (tuple, list)) else (value,)))
        print(f"{args.method}: calibrated to {shown} on {len(images)} images (its default was tuned for another model)")
    shape = None if example is not None else (args.batch_size, *_input_size(model))
    target = out if args.overwrite else free_path(out)
    try:
        result = export_onnx(model, target, shape, example=example, dynamic_batch=not args.static_batch,
                             atol=args.atol, opset=args.opset, provider=args.provider)
    except OnnxExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    note = f" ({out} exists, kept; --overwrite replaces it)" if target != out else ""
    batch = "dynamic batch" if result.dynamic_batch else "static batch"
    shape_text = "×".join(str(s) for s in result.input_shape[1:])
    checks = ", ".join(f"{d:.2g} at batch {b}" for b, d in result.max_abs_diff.items())
    print(f"wrote {result.path}{note}")
    print(f"  {args.method or 'unreduced'} on {name}: {result.form}; input N×{shape_text} ({batch})")
    print(f"  ONNX Runtime ({result.provider}) vs PyTorch, max |difference|: {checks} (atol {args.atol:g})")
    return 0


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    from ..models import adapter_for

    return adapter_for(model).input_size(model)
