"""Training throughput of the learned methods on the reference model: fp32 vs bf16 autocast.

``tokenreduce train --precision bf16`` (``train_reducer(..., amp=True)``) runs the
forward and the loss under bf16 autocast; weights, gradients and optimiser state stay
fp32.  For every learned method (as shipped: LTMP at targets 0.75, DynamicViT, dTPS,
Cropr p=4) this builds two copies of the reduced reference model with the same initial
parameters, times full training steps of the method's own task (loss, backward,
optimiser step, the task's after-step hook) on one Fashion-MNIST-sized random batch,
the two precisions taking turns round after round, and prints median images/s and the
ratio.  Eager, as ``tokenreduce train`` runs.

    python benchmarks/reducer_train_speed.py               # ~3 min on 2 cores
    python benchmarks/reducer_train_speed.py --methods ltmp --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from _rounds import median_rates

import tokenreduce as tr
from tokenreduce.models.reference import build_reference_model
from tokenreduce.threads import set_threads
from tokenreduce.training.learned import task_for

METHODS = {  # label → (method, params), the shipped reducers' settings
    "ltmp (target 0.75)": ("ltmp", {"target": 0.75}),
    "dynamicvit": ("dynamicvit", {}),
    "tps dtps": ("tps", {"variant": "dtps"}),
    "cropr p=4": ("cropr", {"p": 4}),
}


def _stepper(model: torch.nn.Module, label: str, amp: bool, batch: tuple[torch.Tensor, torch.Tensor]):
    method, params = METHODS[label]
    tr.apply(model, method, untrained=True, **params)
    task = task_for(tr.reducer(model))
    groups = [{"params": g["params"], "lr": 1e-3 * g["lr_scale"]} for g in task.param_groups(model)]
    optimizer = torch.optim.SGD(groups) if task.optimizer == "sgd" else torch.optim.AdamW(groups)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _ = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        task.after_step(model)

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS), metavar="LABEL")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per precision (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    set_threads(args.threads)
    torch.manual_seed(0)
    base = build_reference_model().train()
    batch = (torch.randn(args.batch_size, 1, 32, 32), torch.randint(0, 10, (args.batch_size,)))
    print(f"# reference ViT, learned-method training step, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, eager, torch {torch.__version__}")
    print(f"{'method':<20} {'fp32 img/s':>10} {'bf16 img/s':>10} {'bf16 / fp32':>11}")
    for label in args.methods:
        steppers = []
        for amp in (False, True):
            torch.manual_seed(0)  # same reducer initialisation for both precisions
            steppers.append(_stepper(copy.deepcopy(base), label, amp, batch))
        for step in steppers:  # warm-up, untimed
            step()
        fp32, bf16 = median_rates(steppers, args.rounds, args.steps, args.batch_size)
        print(f"{label:<20} {fp32:>10.0f} {bf16:>10.0f} {bf16 / fp32:>10.2f}x")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
