#!/usr/bin/env python
# ruff: noqa: E402  (OMP_WAIT_POLICY is set before torch is imported)
"""Fine-tune the bundled reference model with every method under its paper's recipe, and tabulate the gain.

For each method at ``--budget`` (default 0.6): the off-the-shelf top-1 on the bundled 10k test set
(a learned method with its shipped reducer, trained on the frozen backbone), then a fine-tune of the
backbone with the reduction on under the method's paper recipe (``tokenreduce.train(...,
recipe="paper")``) on the 60,000 Fashion-MNIST training images, shortened to ``--minutes-per-method``
of wall clock, then the fine-tuned top-1.  The recipe keeps its shape when shortened: every epoch
takes fewer steps (``epoch_steps``), so warm-up, cosine and EViT's keep-rate hold stay where the
paper puts them in the run.  Steps take the recipe's batch, or ``--batch-size`` images when that is
smaller (a short run then makes many small steps rather than a few of the paper's 1024-image ones); a
recipe with more epochs than the budget has steps runs one step per epoch at a smaller batch still.
The learning rate follows the batch as the recipe scales it.  ``--set KEY=VALUE`` overrides a value of
every method's recipe.

Resumable per method: a method with ``OUT/<method>/result.json`` is skipped, and an interrupted
fine-tune continues from its checkpoint with the plan it started with.  Writes
``OUT/finetune_table.json`` and prints the table.

OpenMP threads sleep instead of spinning while they wait (``OMP_WAIT_POLICY=PASSIVE`` unless the
environment sets it): on a machine whose cores other jobs share, spinning threads make a training
step tens of times slower, and the timing probe would plan a run far shorter than the budget allows.

    python scripts/finetune_table.py --out results/finetune_table            # every method, 5 min each
    python scripts/finetune_table.py --methods evit tome --minutes-per-method 0.2 --limit 500
    python scripts/finetune_table.py --methods tome tps --budget 1 --plan-from results/finetune_table \
        --out results/finetune_control      # the unreduced model under the same recipes and steps
    python scripts/finetune_table.py --methods evit --batch-size 128 --epoch-steps 148   # a fixed plan, no probe
    python scripts/finetune_table.py --methods bat cropr --batch-size 128 --total-steps 2550 --no-mixing \
        --peak-lr 5e-4      # every method 2,550 steps at one peak rate, without mixup, cutmix, label smoothing
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime (see the docstring)

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

import tokenreduce as tr
from tokenreduce.cli.options import fraction, parse_param, positive_float, positive_int
from tokenreduce.eval.accuracy import Config, evaluate_reference, reference_checkpoint
from tokenreduce.methods import REGISTRY, get_method
from tokenreduce.models.reference import load_fashion_mnist, load_reference_model
from tokenreduce.threads import set_threads
from tokenreduce.training.recipes import Recipe, resolve_recipe
from tokenreduce.training.reference import DEFAULT_DATA, reference_augmentation

PROBE_STEPS = 3
PROBE_BATCH = 128  # images per probe step (or the recipe's batch when smaller): the cost per image
NO_MIXING = {"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0}  # --no-mixing
PEAK_KEYS = ("lr", "backbone_lr_scale")  # what --peak-lr sets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune_table.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=sorted(REGISTRY), metavar="NAME", help="methods to fine-tune")
    p.add_argument("--budget", type=fraction, default=0.6, help="fraction of the unreduced GMACs kept")
    p.add_argument("--minutes-per-method", type=positive_float, default=5.0,
                   help="wall-clock budget of each fine-tune (the timing probe included)")
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="folder of the Fashion-MNIST idx files")
    p.add_argument("--out", default="results/finetune_table", help="results folder (one sub-folder per method)")
    p.add_argument("--limit", type=positive_int, help="evaluate on the first N test images only")
    p.add_argument("--fresh-reducers", action="store_true",
                   help="start learned methods from fresh parameters, as the papers do, instead of the shipped ones")
    p.add_argument("--batch-size", type=positive_int,
                   help="images per step, when the recipe's batch is larger: a short run gets more optimiser steps "
                   "(the learning rate follows the batch as the recipe scales it; default: the recipe's batch)")
    p.add_argument("--set", dest="recipe_set", action="append", type=parse_param, default=[], metavar="KEY=VALUE",
                   help="override a value of every method's recipe (e.g. lr=1e-3), as `tokenreduce train --set`")
    p.add_argument("--plan-from", metavar="DIR",
                   help="take each method's steps and batch from an earlier run's DIR/<method>/plan.json instead of "
                        "timing a probe: a control at --budget 1 (the unreduced model under the same recipe) then "
                        "makes the same steps")
    p.add_argument("--epoch-steps", type=positive_int,
                   help="optimiser steps per epoch of the recipe, at --batch-size (or the recipe's batch), instead of "
                        "as many as --minutes-per-method fits: the same run on any machine")
    p.add_argument("--total-steps", type=positive_int,
                   help="optimiser steps of the whole run: each method makes total // (its recipe's epochs) steps per "
                        "epoch (recipes of 30 and 50 epochs then train the same steps); like --epoch-steps, no probe")
    p.add_argument("--peak-lr", type=positive_float, metavar="RATE",
                   help="one peak learning rate for every method and parameter, at the run's batch: sets each "
                        "recipe's lr (scaled back to its lr_batch) and backbone_lr_scale=1 (under layer decay the "
                        "top block peaks at RATE, lower blocks lower)")
    p.add_argument("--no-mixing", action="store_true",
                   help="no mixup, cutmix or label smoothing (--set mixup=0 --set cutmix=0 --set label_smoothing=0; "
                        "an explicit --set of one of them wins)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def evaluate(model: torch.nn.Module, config: Config, limit: int | None, progress: bool) -> dict[str, Any]:
    """One row of the bundled test-set evaluation (top-1, GMACs)."""
    rows = evaluate_reference([config], model=model, limit=limit, repeats=1, progress=progress)
    row = rows[0]
    if "skipped" in row:
        raise RuntimeError(f"{config.label}: {row['skipped']}")
    return row


def start_params(method: str, budget: float, fresh: bool) -> dict[str, Any]:
    """The method's parameters for the off-the-shelf row and the start of the fine-tune."""
    cls, _ = get_method(method).resolve({})
    if cls.learned and not fresh:
        shipped = reference_checkpoint(method, {}, budget)
        if shipped is None:
            raise RuntimeError(f"no shipped reducer for {method}; use --fresh-reducers")
        return {"checkpoint": shipped}
    return {"untrained": True} if cls.learned else {}


def run_batch(recipe: Recipe, args: argparse.Namespace) -> int:
    """Images per step of a fixed plan: ``--batch-size``, or the recipe's batch when that is smaller."""
    return min(recipe.batch_size, args.batch_size or recipe.batch_size)


def recipe_overrides(method: str, args: argparse.Namespace, batch: int | None = None) -> dict[str, Any]:
    """What overrides ``method``'s paper recipe in this run: ``--no-mixing``, then ``--set``, then the rate
    ``--peak-lr`` gives at ``batch`` images per step (the recipe's lr scaled back to its ``lr_batch``)."""
    overrides = (NO_MIXING if args.no_mixing else {}) | dict(args.recipe_set)
    if args.peak_lr is None:
        return overrides
    recipe = resolve_recipe("paper", get_method(method).resolve({})[0], overrides)
    if batch is None:
        batch = run_batch(recipe, args)
    lr = args.peak_lr if recipe.lr_batch is None else args.peak_lr * recipe.lr_batch / batch
    return overrides | {"lr": lr, "backbone_lr_scale": 1.0}


def earlier_plan(args: argparse.Namespace, method: str) -> Path:
    """``--plan-from``'s plan for ``method``: DIR/<method>/plan.json."""
    return Path(args.plan_from) / method / "plan.json"


def plan_run(method: str, folder: Path, data: TensorDataset, params: dict[str, Any], args: argparse.Namespace,
             ) -> dict[str, Any]:
    """Time a few steps, then choose the steps per epoch at ``--batch-size`` (the recipe's batch when smaller; a
    smaller one still when not every epoch gets a step) that fit."""
    plan_path = folder / "plan.json"
    if plan_path.is_file():
        return json.loads(plan_path.read_text())
    if args.plan_from is not None:  # the same steps as an earlier run (e.g. a control at --budget 1)
        plan_path.write_text(earlier_plan(args, method).read_text())
        return json.loads(plan_path.read_text())
    recipe = resolve_recipe("paper", get_method(method).resolve({})[0], recipe_overrides(method, args))
    batch = run_batch(recipe, args)
    if args.epoch_steps is not None or args.total_steps is not None:  # a fixed plan: no probe
        epoch_steps = args.epoch_steps or args.total_steps // recipe.epochs
        given = f"--epoch-steps {args.epoch_steps}" if args.epoch_steps else f"--total-steps {args.total_steps}"
        if epoch_steps < 1:
            raise SystemExit(f"finetune_table.py: {given} gives {method}'s {recipe.epochs} epochs no step each")
        if epoch_steps * batch > len(data):
            raise SystemExit(f"finetune_table.py: {given} makes {epoch_steps} steps per epoch x batch {batch}, more "
                             f"than the {len(data)} training images")
        plan = {"batch_size": batch, "epoch_steps": epoch_steps, "recipe": recipe.name, "epochs": recipe.epochs}
        plan_path.write_text(json.dumps(plan, indent=2))
        return plan
    start = time.perf_counter()
    probe = folder / "probe"
    probe_batch = min(PROBE_BATCH, recipe.batch_size)
    tr.train(load_reference_model(), method, data, out_dir=str(probe), recipe="paper", budget=args.budget,
             batch_size=probe_batch, transform=reference_augmentation(), max_steps=PROBE_STEPS, log_every=1,
             progress=False, checkpoint_every=10**9, seed=args.seed, **recipe_overrides(method, args, probe_batch),
             **params)
    steps = [json.loads(line) for line in (probe / "metrics.jsonl").read_text().splitlines()]
    rates = [s["images_per_s"] for s in steps if s["event"] == "step"][1:]  # the first step pays the warm-up
    seconds_per_image = 1.0 / statistics.median(rates)
    left = args.minutes_per_method * 60.0 - (time.perf_counter() - start)
    images = max(left, 0.0) * 0.9 / seconds_per_image  # 10% for checkpoints and the EMA
    fit = int(images // batch)
    if fit >= recipe.epochs:
        plan = {"batch_size": batch, "epoch_steps": min(fit // recipe.epochs, len(data) // batch)}
    else:  # one step per epoch, at the batch that fits
        batch = max(2, int(images // recipe.epochs) // 2 * 2)
        plan = {"batch_size": batch, "epoch_steps": 1}
    plan |= {"recipe": recipe.name, "epochs": recipe.epochs, "seconds_per_image": seconds_per_image}
    plan_path.write_text(json.dumps(plan, indent=2))
    return plan


def run_method(method: str, data: TensorDataset, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    folder = out / method
    result_path = folder / "result.json"
    if result_path.is_file():
        print(f"{method}: done earlier ({result_path})", file=sys.stderr)
        return json.loads(result_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    params = start_params(method, args.budget, args.fresh_reducers)
    shelf_params = {k: v for k, v in params.items() if k != "untrained"}
    base = load_reference_model()
    shelf = evaluate(base, Config(method, shelf_params, args.budget), args.limit, progress)
    plan = plan_run(method, folder, data, params, args)
    run = folder / "run"
    resume = (run / "checkpoint.pt").is_file()
    print(f"{method}: recipe {plan['recipe']}, {plan['epochs']} epochs x {plan['epoch_steps']} steps at batch "
          f"{plan['batch_size']}" + (" (resuming)" if resume else ""), file=sys.stderr)
    model = load_reference_model()
    start = time.perf_counter()
    out_files = tr.train(model, method, data, out_dir=str(run), recipe="paper", budget=args.budget,
                         batch_size=plan["batch_size"], epoch_steps=plan["epoch_steps"], resume=resume,
                         transform=reference_augmentation(), progress=progress, seed=args.seed,
                         checkpoint_every=50, **recipe_overrides(method, args, plan["batch_size"]), **params)
    minutes = out_files["result"].wall_time_s / 60.0
    tr.remove(model)
    tuned = evaluate(model, Config(method, {"checkpoint": out_files["checkpoint"]}), args.limit, progress)
    result = {
        "method": method, "budget": args.budget, "recipe": out_files["recipe"],
        "off_the_shelf_top1": shelf["top1"], "finetuned_top1": tuned["top1"],
        "gmacs_off_the_shelf": shelf["gmacs"], "gmacs": tuned["gmacs"], "gmacs_unreduced": tuned["gmacs_unreduced"],
        "minutes": minutes, "wall_minutes_with_probe": (time.perf_counter() - start) / 60.0,
        "steps": out_files["result"].step, "plan": plan, "start": "fresh" if args.fresh_reducers else "shipped",
        "samples": tuned["samples"], "model": out_files["model"], "reducer": out_files["checkpoint"],
    }
    result_path.write_text(json.dumps(result, indent=2))
    return result


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<11} {'recipe':<11} {'off-the-shelf':>13} {'fine-tuned':>10} {'gain':>7} {'GMACs':>7} "
             f"{'ratio':>6} {'minutes':>7}"]
    for r in rows:
        gain = 100 * (r["finetuned_top1"] - r["off_the_shelf_top1"])
        lines.append(f"{r['method']:<11} {r['recipe']['name']:<11} {100 * r['off_the_shelf_top1']:>12.2f}% "
                     f"{100 * r['finetuned_top1']:>9.2f}% {gain:>+7.2f} {r['gmacs']:>7.4f} "
                     f"{r['gmacs'] / r['gmacs_unreduced']:>6.2f} {r['minutes']:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plans = [f"--{name.replace('_', '-')}" for name in ("plan_from", "epoch_steps", "total_steps")
             if getattr(args, name) is not None]
    if len(plans) > 1:
        raise SystemExit(f"finetune_table.py: give only one of {' and '.join(plans)}")
    both = [key for key, _ in args.recipe_set if key in PEAK_KEYS]
    if args.peak_lr is not None and both:
        raise SystemExit(f"finetune_table.py: --peak-lr sets {' and '.join(PEAK_KEYS)}; drop --set {both[0]}")
    for name in args.methods:
        get_method(name)
        if args.plan_from is not None and not earlier_plan(args, name).is_file():
            raise SystemExit(f"finetune_table.py: --plan-from: {earlier_plan(args, name)} not found")
    if args.threads:
        set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_fashion_mnist(args.data_dir, "train")
    data = TensorDataset(images, labels)
    unreduced = evaluate(load_reference_model(), Config(None), args.limit, not args.no_progress)
    rows = [run_method(name, data, args, out) for name in args.methods]
    table = {"budget": args.budget, "minutes_per_method": args.minutes_per_method, "limit": args.limit,
             "peak_lr": args.peak_lr, "no_mixing": args.no_mixing,
             "unreduced_top1": unreduced["top1"], "gmacs_unreduced": unreduced["gmacs"], "rows": rows}
    (out / "finetune_table.json").write_text(json.dumps(table, indent=2))
    print(f"reference model, budget {args.budget:g}, unreduced top-1 {100 * unreduced['top1']:.2f}% "
          f"({unreduced['samples']} test images)")
    print(format_rows(rows))
    print(f"wrote {out / 'finetune_table.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
