"""``tokenreduce evaluate --task segmentation``: mIoU, pixel accuracy, GMACs and speed of every method on a
segmenter (default: the bundled reference segmenter on the bundled Fashion-MNIST mosaics)."""

from __future__ import annotations

import argparse
from typing import Any

from .options import check_output, data_dir


def cmd_evaluate_segmentation(args: argparse.Namespace) -> int:
    """The segmentation branch of ``tokenreduce evaluate``."""
    from ..distributed import init_distributed_from_env
    from ..eval.accuracy import Config
    from .commands import check_method_names, finish_evaluation

    if args.model not in (None, "reference") or args.pretrained:
        raise ValueError("--task segmentation evaluates a segmenter trained by the project: give its weights with "
                         "--checkpoint (default: the bundled reference segmenter), not --model/--pretrained")
    data = data_dir(args, must_exist=False)  # the data set's loader names the layout it needs
    params = dict(args.param or [])
    if params and not args.method:
        raise ValueError("--param needs --method")
    check_method_names(args.method or [])
    out = check_output(args.json, "--json")
    rank, world = init_distributed_from_env()
    from ..dense.evaluate import (
        DEFAULT_BUDGET,
        evaluate_reference_segmenter,
        evaluate_segmentation_folder,
        format_segmentation_table,
    )

    budget = DEFAULT_BUDGET if args.budget is None else args.budget
    configs = None
    if args.method:
        configs = [Config(None)] + [Config(name, params, args.budget) for name in args.method]
    common = dict(configs=configs, budgets=(budget,), limit=args.limit, repeats=args.repeats,
                  restore=args.restore, progress=not args.no_progress, device=args.device, seeds=args.seeds,
                  checkpoint=args.checkpoint)
    if data is None:
        result = evaluate_reference_segmenter(batch_size=args.batch_size or 100, **common)
    else:
        result = evaluate_segmentation_folder(data, batch_size=args.batch_size or 16, **common)
    result["world_size"] = world
    if rank != 0:
        return 0
    print(f"{result['model']} on {result['data']}: {result['samples']} images scored, "
          f"{len(result['skipped_images'])} unreadable skipped, {world} process(es), restore={result['restore']}")
    print(format_segmentation_table(result["rows"]))
    for err in result["skipped_images"]:
        print(f"  skipped: {err}")
    return finish_evaluation(args, result, out)


def cmd_sweep_segmentation(args: argparse.Namespace) -> int:
    """The segmentation branch of ``tokenreduce sweep``: mIoU against GMACs and images/s, resumable."""
    from pathlib import Path

    from ..dense.evaluate import evaluate_reference_segmenter, evaluate_segmentation_folder, format_segmentation_table
    from ..dense.segmenter import load_reference_segmenter
    from ..eval.sweep import plot_names, plotting_available, run_sweep, sweep_configs, sweep_context
    from ..methods import REGISTRY
    from .commands import check_method_names
    from .options import check_writable_folder

    if args.model not in (None, "reference") or args.pretrained:
        raise ValueError("--task segmentation sweeps a segmenter trained by the project: give its weights with "
                         "--checkpoint (default: the bundled reference segmenter), not --model/--pretrained")
    data = data_dir(args, must_exist=False)  # the data set's loader names the layout it needs
    check_method_names(args.methods or [])
    check_writable_folder(Path(args.out), "--out")
    model = load_reference_segmenter(args.checkpoint)
    extra: dict[str, dict] = {}
    if args.methods:
        methods = list(args.methods)
    else:  # training-free methods, and learned ones with a reducer shipped for the reference segmenter
        methods = []
        for name, cls in sorted(REGISTRY.items()):
            if "segmentation" not in cls.tasks:
                continue
            shipped = cls.shipped_segmentation_checkpoint({}, None) if cls.learned and args.checkpoint is None else None
            if not cls.learned or (cls.budget_sets_schedule and shipped is not None):
                methods.append(name)
            if shipped is not None:
                extra[name] = {"checkpoint": str(shipped)}
    configs = sweep_configs(methods, args.budgets, extra)
    progress = not args.no_progress
    batch_size = args.batch_size or (100 if data is None else 16)
    context = sweep_context(model, model_name=f"segmenter:{args.checkpoint or 'reference'}", data=data,
                            limit=args.limit, seeds=args.seeds, batch_size=batch_size, precision="fp32",
                            device=args.device)
    context["restore"] = args.restore
    common = dict(limit=args.limit, batch_size=batch_size, repeats=args.repeats, restore=args.restore,
                  progress=progress, device=args.device, seeds=args.seeds, model=model)

    def evaluate(cfgs: list) -> list[dict]:
        if data is None:
            return evaluate_reference_segmenter(cfgs, **common)["rows"]
        return evaluate_segmentation_folder(data, cfgs, **common)["rows"]

    rows = run_sweep(evaluate, configs, args.out, context=context, overwrite=args.overwrite, metric="miou")
    print(format_segmentation_table(rows))
    written = ["sweep.csv", "sweep.json", *(plot_names("miou") if plotting_available() else ())]
    print(f"wrote {args.out}/{', '.join(written)}")
    return 0


def visualize_segmentation_sheet(args: argparse.Namespace, params: dict) -> Any:
    """The picture of ``tokenreduce visualize --task segmentation``: an evaluation mosaic (``--index``) or IMAGE."""
    import numpy as np
    import torch

    from ..dense.mosaic import CANVAS, mosaic_testset, preprocess
    from ..dense.segmenter import load_reference_segmenter
    from ..viz import visualize_segmentation

    if args.model not in (None, "reference") or args.pretrained:
        raise ValueError("--task segmentation draws a segmenter trained by the project: give its weights with "
                         "--checkpoint (default: the bundled reference segmenter), not --model/--pretrained")
    segmenter = load_reference_segmenter(args.checkpoint)
    target = None
    if args.image is None:
        canvas, labels = mosaic_testset()
        if not 0 <= args.index < len(canvas):
            raise ValueError(f"--index {args.index} is outside the {len(canvas)} evaluation mosaics")
        image, target = canvas[args.index], labels[args.index]
    else:
        from ..images import load_image

        gray = load_image(args.image, 1).resize((CANVAS, CANVAS))
        image = torch.from_numpy(np.asarray(gray).copy())
    return visualize_segmentation(segmenter, preprocess(image.unsqueeze(0)), args.method, target=target, **params)
