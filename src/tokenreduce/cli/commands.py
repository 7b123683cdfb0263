"""The commands: one function per command, taking the parsed arguments and returning the exit status.

Every command checks everything it can before the work starts — the method names,
their parameters and budget (each configuration's reducer is built on the model
once), the model and its checkpoint, where the results will be written — so that a
mistake costs seconds, not a finished evaluation.  User errors are raised as
exceptions and reported once by :func:`tokenreduce.cli.main`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import apply, remove
from ..eval.accuracy import Config
from ..methods import get_method
from ..models import adapter_for, model_info, timm_data_config
from ..models.loading import REFERENCE_NAME, load_model
from .options import (
    amp_dtype,
    check_output,
    check_writable_folder,
    data_dir,
    deprecated,
    is_rank_zero,
    write_output,
    write_text_output,
)

DEFAULT_MODEL = "deit_small_patch16_224"
"""``benchmark``'s model (random weights are fine for speed)."""


# -- shared steps -------------------------------------------------------------------------------------


def model_from_args(args: argparse.Namespace, name: str) -> nn.Module:
    """The model the flags describe (``--model``, ``--pretrained``, ``--checkpoint``, ...), on ``--device``."""
    return load_model(
        name,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        use_ema=args.use_ema,
        img_size=args.img_size,
        model_kwargs=dict(args.model_kwargs),
        device=args.device,
    )


def check_method_names(names: list[str]) -> None:
    """Every name is a method (a data folder swallowed by ``--method A B DIR`` gets a hint)."""
    for name in names:
        try:
            get_method(name)
        except ValueError as err:
            if Path(name).is_dir():
                hint = f"{name} is a folder: put DATA_DIR before --method, or use --data-dir"
                raise ValueError(f"{err} ({hint})") from None
            raise


def check_configs(model: nn.Module, configs: list[Config], *, need_trained: bool = True) -> None:
    """Build every configuration's reducer on ``model`` once (then remove it), before any work.

    A bad method, parameter or budget stops the command here with the library's
    message, which names the value and what is accepted.

    Args:
        need_trained: a learned method must come with its trained parameters
            (``--param checkpoint=PATH``, or ``--param untrained=True`` on purpose);
            off for ``train``, which trains them.

    Raises:
        ValueError, TypeError: the first configuration that cannot be built.
    """
    for config in configs:
        if config.method is None:
            continue
        params = dict(config.params)
        try:
            cls = get_method(config.method)
            if hasattr(cls, "resolve"):  # a parameter may select another class (tps variant=dtps -> dtps)
                cls, _ = cls.resolve(dict(params))
            if cls.learned and "checkpoint" not in params and not params.get("untrained"):
                if need_trained:
                    raise ValueError(
                        f"{config.method} is a learned method: give its trained parameters with --param "
                        "checkpoint=PATH (train them with `tokenreduce train`), or --param untrained=True for "
                        "freshly initialised ones (meaningless outputs; for timing only)"
                    )
                params["untrained"] = True
            apply(model, config.method, budget=config.budget, **params)
        except (ValueError, TypeError) as err:
            message = str(err) if str(err).startswith(config.method) else f"{config.method}: {err}"
            raise (TypeError if isinstance(err, TypeError) else ValueError)(message) from None
        finally:
            remove(model)


def autocast(device: str, dtype: str | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` (``bf16`` / ``fp16``) on ``device``'s type; ``None``: nothing (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type,
                          dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def precision_label(dtype: str | None) -> str:
    return "fp32" if dtype is None else f"{dtype} autocast (fp32 weights)"


# -- benchmark ----------------------------------------------------------------------------------------


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


def benchmark_dtypes(args: argparse.Namespace) -> list[str]:
    """The precisions to time: ``--amp``/``--amp-dtype``, or the deprecated ``--dtype`` list."""
    if args.dtype:
        if args.amp is not None:
            raise ValueError("give --amp / --amp-dtype or the deprecated --dtype, not both")
        deprecated("--dtype", "--amp --amp-dtype bfloat16|float16 (default without --amp: fp32)")
        return list(dict.fromkeys(args.dtype))
    return [amp_dtype(args) or "fp32"]


def cmd_benchmark(args: argparse.Namespace) -> int:
    """Images/s and latency of the reduced vs the unreduced model."""
    from ..eval import throughput

    dtypes = benchmark_dtypes(args)
    out = check_output(args.json, "--json")
    check_method_names(args.method)
    params = dict(args.param or [])
    model = model_from_args(args, args.model)
    check_configs(model, [Config(name, params, args.budget) for name in args.method])
    if args.compile:
        throughput.allow_many_compiled_models()
    rows = []
    for method in args.method:
        for dtype in dtypes:
            for batch_size in args.batch_size:
                row = throughput.compare_throughput(
                    model,
                    method,
                    params,
                    budget=args.budget,
                    batch_size=batch_size,
                    repeats=args.repeats,
                    warmup=args.warmup,
                    dtype=dtype,
                    device=args.device,
                    progress=not args.no_progress,
                    compile=bool(args.compile),
                )
                remove(model)
                rows.append({**row, "model": args.model})
    _print_table(rows)
    if out:
        write_text_output(out, json.dumps(rows, indent=2), overwrite=args.overwrite)
    return 0


# -- evaluate -----------------------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Accuracy, GMACs and images/s of the unreduced model and every configuration."""
    if getattr(args, "task", "classification") == "segmentation":
        from .segmentation import cmd_evaluate_segmentation

        return cmd_evaluate_segmentation(args)
    from ..distributed import init_distributed_from_env
    from ..eval.accuracy import (
        DEFAULT_BUDGETS,
        FINETUNED_DIR,
        default_configs,
        evaluate_reference,
        finetuned_configs,
        format_table,
        reference_checkpoint,
        reference_configs,
    )
    from ..eval.imagefolder import evaluate_imagefolder

    data = data_dir(args)
    params = dict(args.param or [])
    if params and not args.method:
        raise ValueError("--param needs --method")
    check_method_names(args.method or [])
    if data is None and (args.model not in (None, REFERENCE_NAME) or args.pretrained):
        raise ValueError("--model/--pretrained need --data-dir DIR (the bundled test set is the reference model's)")
    out = check_output(args.json, "--json")
    dtype = amp_dtype(args)
    rank, world = init_distributed_from_env()
    model = model_from_args(args, args.model or REFERENCE_NAME)

    if args.method:
        configs = [Config(None)]
        for name in args.method:
            # on the reference model a learned method runs from its shipped reducer unless given one
            shipped = reference_checkpoint(name, params, args.budget) if data is None else None
            if shipped and "checkpoint" not in params:
                label = f"{Config(name, params, args.budget).label} [{Path(shipped).stem}]"
                configs.append(Config(name, {**params, "checkpoint": shipped}, args.budget, label=label))
            else:
                configs.append(Config(name, params, args.budget))
        check_configs(model, configs)
    else:  # every method at each budget (its paper default where it fits the model)
        budgets = DEFAULT_BUDGETS if args.budget is None else (args.budget,)
        configs = reference_configs(budgets) if data is None else default_configs(model_info(model), budgets)
    finetuned = args.finetuned
    if finetuned is None and data is None and not args.method and Path(FINETUNED_DIR).is_dir():
        finetuned = FINETUNED_DIR
    if finetuned is not None:
        extra = finetuned_configs(finetuned)
        print(f"fine-tuned models in {finetuned}: {len(extra)}", file=sys.stderr)
        configs += extra

    with autocast(args.device, dtype):
        if data is None:
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
                    progress=not args.no_progress,
                    model=model,
                    device=args.device,
                    seeds=args.seeds,
                ),
            }
        else:
            result = evaluate_imagefolder(
                args.model or REFERENCE_NAME,
                data,
                configs=configs,
                crop_pct=args.crop_pct,
                limit=args.limit,
                batch_size=args.batch_size or 64,
                workers=args.workers,
                repeats=args.repeats,
                device=args.device,
                progress=not args.no_progress,
                model=model,
                seeds=args.seeds,
            )
    result["world_size"] = world
    result["precision"] = precision_label(dtype)
    if rank != 0:
        return 0
    print(f"{result['model']} on {result['data']}: {result['samples']} images scored, "
          f"{len(result['skipped_images'])} unreadable skipped, {world} process(es)")
    print(format_table(result["rows"]))
    if result["skipped_images"]:
        print(f"skipped {len(result['skipped_images'])} unreadable image(s), not counted:")
        for err in result["skipped_images"]:
            print(f"  {err}")
    return finish_evaluation(args, result, out)


def finish_evaluation(args: argparse.Namespace, result: dict[str, Any], out: Path | None) -> int:
    """Refuse a run whose requested methods did not all run (exit 2, nothing written); else write ``out``."""
    failed = [r for r in result["rows"] if "skipped" in r] if args.method else []  # asked for: must run
    if failed:
        for r in failed:
            print(f"error: {r['label']}: {r['skipped']}", file=sys.stderr)
        print("error: not all requested methods ran; no results file written", file=sys.stderr)
        return 2
    if out:
        write_text_output(out, json.dumps(result, indent=2), overwrite=args.overwrite)
    return 0


# -- sweep --------------------------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    """Methods x budgets, resumable; CSV/JSON and trade-off plots."""
    if getattr(args, "task", "classification") == "segmentation":
        from .segmentation import cmd_sweep_segmentation

        return cmd_sweep_segmentation(args)
    from ..eval.accuracy import evaluate_reference, format_table
    from ..eval.imagefolder import evaluate_imagefolder
    from ..eval.sweep import (
        PLOTS,
        TABLES,
        plotting_available,
        reference_sweep_methods,
        run_sweep,
        sweep_configs,
        sweep_context,
    )
    from ..methods import REGISTRY

    data = data_dir(args)
    check_method_names(args.methods or [])
    if data is None and (args.model != REFERENCE_NAME or args.pretrained):
        raise ValueError("--model/--pretrained need --data-dir DIR (the bundled test set is the reference model's)")
    check_writable_folder(Path(args.out), "--out")
    dtype = amp_dtype(args)
    model = model_from_args(args, args.model)

    extra: dict[str, dict] = {}
    if args.methods:
        methods = list(args.methods)
    elif data is None:  # the reference model: the learned methods it ships reducers for too
        methods, extra = reference_sweep_methods()
    else:
        methods = [m for m, cls in sorted(REGISTRY.items()) if not cls.learned]
    configs = sweep_configs(methods, args.budgets, extra)

    progress = not args.no_progress
    batch_size = args.batch_size or (250 if data is None else 64)
    context = sweep_context(model, model_name=args.model, data=data, limit=args.limit, seeds=args.seeds,
                            batch_size=batch_size, precision=precision_label(dtype), device=args.device,
                            model_kwargs=dict(args.model_kwargs), img_size=args.img_size)
    if data is None:
        def evaluate(cfgs: list[Config]) -> list[dict[str, Any]]:
            return evaluate_reference(cfgs, limit=args.limit, batch_size=batch_size, repeats=args.repeats,
                                      progress=progress, model=model, device=args.device, seeds=args.seeds)
    else:
        def evaluate(cfgs: list[Config]) -> list[dict[str, Any]]:
            return evaluate_imagefolder(args.model, data, configs=cfgs, limit=args.limit,
                                        batch_size=batch_size, workers=args.workers,
                                        repeats=args.repeats, device=args.device, progress=progress,
                                        model=model, seeds=args.seeds)["rows"]
    with autocast(args.device, dtype):
        rows = run_sweep(evaluate, configs, args.out, context=context, overwrite=args.overwrite)
    print(format_table(rows))
    written = [*TABLES, *PLOTS] if plotting_available() else list(TABLES)
    print(f"wrote {args.out}/{', '.join(written)}")
    return 0


# -- train --------------------------------------------------------------------------------------------

FASHION_MNIST_TRAIN = "train-images-idx3-ubyte.gz"


def train_amp(args: argparse.Namespace) -> bool | None:
    """bf16 autocast on / off / ``None`` (auto: on for a GPU); the deprecated ``--precision`` too."""
    if args.precision is not None:
        if args.amp is not None:
            raise ValueError("give --amp / --no-amp or the deprecated --precision, not both")
        deprecated("--precision", "--amp (bf16 autocast) or --no-amp (fp32)")
        return {"auto": None, "fp32": False, "bf16": True}[args.precision]
    if args.amp_dtype != "bfloat16":
        raise ValueError(f"train autocasts to bfloat16 only (--amp-dtype {args.amp_dtype} would need loss scaling)")
    return args.amp


def training_data(args: argparse.Namespace, model: nn.Module, name: str, data: str | None,
                  recipe: Any = None) -> tuple[Any, Any]:
    """``(dataset, batch transform)``: Fashion-MNIST idx files for the reference model, else an ImageFolder.

    With a fine-tuning ``recipe`` the Fashion-MNIST images get the reference model's own training augmentation
    (shifts and flips), and an ImageFolder the recipe's (RandAugment, random erasing, colour jitter, through
    timm's ``create_transform``).
    """
    from torch.utils.data import TensorDataset

    folder = Path(data) if data else None
    fashion_mnist = folder is None or (folder / FASHION_MNIST_TRAIN).is_file()
    if name == REFERENCE_NAME and not fashion_mnist and not (folder / "train").is_dir():
        fashion_mnist = True  # neither layout: the missing idx files are the likelier intent; say how to get them
    if fashion_mnist:
        from ..models.reference import load_fashion_mnist, preprocess
        from ..training.reference import DEFAULT_DATA

        images, labels = load_fashion_mnist(folder or DEFAULT_DATA, "train")
        if recipe is not None:
            from ..training.reference import reference_augmentation

            return TensorDataset(images, labels), reference_augmentation()
        return TensorDataset(images, labels), preprocess
    import timm.data

    cfg = timm_data_config(model)
    augment = {} if recipe is None else dict(auto_augment=recipe.auto_augment, re_prob=recipe.reprob,
                                             re_mode="pixel", color_jitter=recipe.color_jitter or 0.0)
    dataset = timm.data.create_dataset("", root=str(folder), split="train",
                                       transform=timm.data.create_transform(**cfg, is_training=True, **augment))
    if len(dataset) == 0:
        raise ValueError(f"no images found under {folder} (expected DIR/train/<class>/<image>)")
    return dataset, None


def check_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """A run folder holding another run is continued (``--resume``) or started over (``--overwrite``), never
    reused silently; with ``--overwrite`` the old run's files (checkpoint, metrics log, trained reducer and
    backbone) are removed (rank 0)."""
    from ..training.engine import CHECKPOINT_NAME, METRICS_NAME

    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it over: give one")
    check_writable_folder(out, "--out")
    names = (CHECKPOINT_NAME, METRICS_NAME, "reducer.safetensors", "model.safetensors", "model_ema.safetensors")
    earlier = [out / name for name in names if (out / name).exists()]
    if not earlier or resume:
        return
    if not overwrite:
        raise ValueError(f"--out {out} holds another run ({earlier[0].name}): --resume continues it, "
                         "--overwrite starts over, or choose another --out")
    if is_rank_zero():
        for path in earlier:
            path.unlink()


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe values ``train``'s flags set: ``--set KEY=VALUE`` and the timm-named flags (these win)."""
    from . import RECIPE_FLAGS

    overrides = dict(args.recipe_set or [])
    flags = {key: getattr(args, f"recipe_{key}") for _, key, _ in RECIPE_FLAGS}
    overrides |= {key: value for key, value in flags.items() if value is not None}
    if args.epoch_steps is not None and args.recipe is None:
        raise ValueError("--epoch-steps shortens a --recipe run")
    if overrides and args.recipe is None:
        raise ValueError(f"{', '.join(sorted(overrides))}: recipe values need --recipe NAME (or --recipe paper)")
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    """Train a learned method's parameters (OUT/reducer.safetensors), or fine-tune the backbone under a recipe
    (OUT/model.safetensors too)."""
    from ..training.engine import TrainingInterrupted
    from ..training.learned import train_reducer
    from ..training.recipes import resolve_recipe

    data = data_dir(args)
    if args.fashion_mnist:
        deprecated("--fashion-mnist", "--data-dir")
        if data and data != args.fashion_mnist:
            raise ValueError("give the data folder once: --data-dir or the deprecated --fashion-mnist")
        data = args.fashion_mnist
    amp = train_amp(args)
    name = args.model or REFERENCE_NAME
    if name != REFERENCE_NAME and data is None:
        raise ValueError("--model NAME needs --data-dir DIR (the default data, Fashion-MNIST, is the reference "
                         "model's)")
    check_method_names([args.method])
    params = dict(args.param or [])
    overrides = recipe_overrides(args)
    recipe = None
    if args.recipe is not None:  # checked before the model loads
        given = {"epochs": args.epochs, "lr": args.lr, "distill_weight": args.distill_weight,
                 "label_smoothing": args.label_smoothing}
        cls, _ = get_method(args.method).resolve(dict(params))
        recipe = resolve_recipe(args.recipe, cls, overrides | {k: v for k, v in given.items() if v is not None})
        if args.finetune:
            raise ValueError("--recipe fine-tunes the backbone already; --finetune is the reducer task's own rate")
    check_run_folder(Path(args.out), resume=args.resume, overwrite=args.overwrite)
    model = model_from_args(args, name)
    check_configs(model, [Config(args.method, params, args.budget)], need_trained=False)
    if args.budget is not None:  # resolves the method's main knob, as tokenreduce.apply(budget=...) does
        params["budget"] = args.budget
    dataset, transform = training_data(args, model, name, data, recipe)
    if recipe is not None and is_rank_zero():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        print(recipe.summary(None if args.batch_size is None else args.batch_size * world), file=sys.stderr)
    try:
        out = train_reducer(
            model, args.method, dataset, out_dir=args.out, recipe=recipe, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, finetune=args.finetune, resume=args.resume,
            checkpoint_every=args.checkpoint_every, max_steps=args.max_steps, epoch_steps=args.epoch_steps,
            transform=transform, device=args.device, progress=not args.no_progress, amp=amp,
            distill_weight=args.distill_weight, label_smoothing=args.label_smoothing, workers=args.workers,
            **params,
        )
    except TrainingInterrupted as stop:  # checkpointed at the step it stopped at
        print(f"interrupted ({stop}); continue with the same command plus --resume: "
              f"tokenreduce train ... --out {args.out} --resume", file=sys.stderr)
        return 128 + stop.signum
    result = out["result"]
    print(f"{args.method}: {result.step}/{result.total_steps} steps in {result.wall_time_s:.0f} s; "
          f"last metrics {json.dumps({k: round(v, 4) for k, v in result.last_metrics.items()})}")
    if not out["complete"]:
        print(f"wrote {out['checkpoint']} after {result.step} of {result.total_steps} steps: INCOMPLETE (--max-steps); "
              f"the same command with --resume and without --max-steps finishes it")
    else:
        print(f"wrote {out['checkpoint']} (load with tokenreduce.apply(model, {args.method!r}, checkpoint=...))")
    if "model" in out:
        print(f"wrote {out['model']} (the fine-tuned backbone: pass it as --checkpoint with the reducer)")
    if "ema" in out:
        print(f"wrote {out['ema']} (the EMA of the fine-tuned weights)")
    if recipe is not None:
        model_flag = "" if name == REFERENCE_NAME else f" --model {name} --data-dir DIR"
        print(f"evaluate with: tokenreduce evaluate{model_flag} --checkpoint {out['model']} --method {args.method} "
              f"--param checkpoint={out['checkpoint']}")
    return 0


# -- visualize ----------------------------------------------------------------------------------------


def cmd_visualize(args: argparse.Namespace) -> int:
    """One image → a PNG of the tokens kept, merged and pruned at every reduction stage."""
    from PIL import Image

    from ..images import load_image
    from ..viz import visualize

    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    out = check_output(args.out, "--out", suffixes=writable, suffix_hint="an image extension (.png, .jpg, ...)")
    check_method_names([args.method])
    params = dict(args.param or [])
    if args.budget is not None:
        params["budget"] = args.budget
    if getattr(args, "task", "classification") == "segmentation":
        from .segmentation import visualize_segmentation_sheet

        sheet = visualize_segmentation_sheet(args, params)
        if out:
            written = write_output(out, sheet.save, overwrite=args.overwrite)
            print(f"  {written.name}: {sheet.size[0]}x{sheet.size[1]}, input + one panel per reduction stage + masks")
        return 0
    if args.image is None:
        raise ValueError("visualize needs an IMAGE (only --task segmentation has a default one)")
    model = model_from_args(args, args.model or REFERENCE_NAME)
    check_configs(model, [Config(args.method, {k: v for k, v in params.items() if k != "budget"}, args.budget)])
    channels = adapter_for(model).input_size(model)[0]
    img = load_image(args.image, channels)  # 16-bit / float images by their range
    if channels == 1:
        import numpy as np

        from ..models.reference import preprocess

        gray = img.resize((28, 28))
        x = preprocess(torch.from_numpy(np.asarray(gray).copy()).unsqueeze(0))
    else:
        import timm.data

        x = timm.data.create_transform(**timm_data_config(model))(img).unsqueeze(0)
    sheet = visualize(model, x, args.method, **params)
    if out:
        written = write_output(out, sheet.save, overwrite=args.overwrite)
        print(f"  {written.name}: {sheet.size[0]}x{sheet.size[1]}, input + one panel per reduction stage")
    return 0
