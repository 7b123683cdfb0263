"""A small, generic training loop.

One loop for every training job in the project: the reference model's
classification training now, learned token-reduction methods later.  What is
trained and which loss is minimised come from a :class:`~.tasks.Task`; the loop
owns the rest:

- AdamW (or SGD, per task; parameter groups with their own learning-rate scale)
  with a linear warm-up then cosine decay, optional gradient clipping;
- deterministic epoch order (a permutation seeded by ``seed + epoch``), sharded
  across ranks when launched by ``torchrun`` (DDP; ``gloo`` on CPU, ``nccl`` on GPU);
- a tqdm progress bar with loss and throughput, a JSON-lines metrics log;
- checkpoints every ``checkpoint_every`` steps and at the end, written atomically
  and holding model / optimizer / scheduler / step / RNG state, so that
  ``resume=True`` continues exactly where the run stopped (same parameters, bit
  for bit, as a run that never stopped); ``resume=True`` without a checkpoint is
  refused, and temporary files an interrupted checkpoint write left behind are
  removed when a run starts in the folder;
- SIGINT (Ctrl-C) and SIGTERM end the run cleanly: the step in progress finishes,
  the checkpoint is written at that step and :class:`TrainingInterrupted` (a
  ``KeyboardInterrupt``) is raised.  Further signals meanwhile are ignored (the
  atomic write keeps the previous checkpoint intact even under SIGKILL).  Under
  ``torchrun`` the ranks agree on the step to stop at.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..distributed import init_distributed_from_env
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .tasks import Task

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


def precision_label(amp: bool) -> str:
    """How a run's arithmetic is described in its records (``TrainConfig.amp`` resolved)."""
    return "bf16 autocast (fp32 weights)" if amp else "fp32"


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of one training run.

    ``batch_size`` is per process; the global batch is ``batch_size × world_size``.
    ``stop_at_step`` ends the run early (with a checkpoint) without changing the
    schedule, which is always laid out for ``epochs`` full epochs.  ``extra`` describes
    the run (e.g. the method and its parameters) and is saved with every checkpoint;
    ``resume`` refuses a checkpoint whose ``extra`` differs.  ``epoch_steps`` caps the steps of
    an epoch (a shortened run: each epoch takes the first batches of its own seeded order, so
    the epochs still see different samples).
    """

    out_dir: str
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    resume: bool = False
    stop_at_step: int | None = None
    compile: bool = False
    amp: bool | None = None  # bf16 autocast; None = on when training on a GPU
    num_workers: int = 0
    device: str = "cpu"
    progress: bool = True
    epoch_steps: int | None = None  # at most this many steps per epoch (None: the whole dataset)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a run ended with."""

    step: int
    total_steps: int
    wall_time_s: float
    last_metrics: dict[str, float]
    evals: list[dict[str, Any]]
    checkpoint: str

    @property
    def complete(self) -> bool:
        """Whether the run reached its last step (``False``: cut short by ``stop_at_step``; resumable)."""
        return self.step >= self.total_steps


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM, after writing its checkpoint at ``step``.

    Attributes:
        signum: the signal; step / total_steps: where the run stopped; checkpoint: its path.
    """

    def __init__(self, signum: int, step: int, total_steps: int, checkpoint: str) -> None:
        self.signum, self.step, self.total_steps, self.checkpoint = signum, step, total_steps, checkpoint
        super().__init__(
            f"{signal.Signals(signum).name}: training stopped at step {step}/{total_steps}, "
            f"checkpoint {checkpoint} written"
        )


class _StopSignals:
    """While active: SIGINT / SIGTERM are noted (the first one's number) instead of raising.

    Only the main thread can install signal handlers; elsewhere the signals keep their handlers.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def remove_orphaned_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files (``.NAME.*.tmp``) that an atomic write of ``NAME`` killed mid-way left in
    ``folder`` (see :func:`~.checkpoint.save_checkpoint`, :func:`tokenreduce.checkpoint.atomic_save_file`).

    Only those names' temporaries are touched; returns the paths removed.
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's batches of sample indices for one epoch (drop-last; every rank gets as many).

    The order is a permutation seeded by ``seed + epoch``, so it can be rebuilt on resume.
    """
    gen = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=gen)
    per_rank = n // world
    mine = perm[rank::world][:per_rank]
    steps = per_rank // batch_size
    return [mine[i * batch_size : (i + 1) * batch_size].tolist() for i in range(steps)]


def warmup_cosine(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Learning rate at ``step``: linear warm-up from ~0 to ``base_lr``, then cosine to ``min_lr``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, NumPy and Python RNG states (NumPy's and Python's draw timm's mixup / cutmix
    and augmentations), in types a ``weights_only`` load reads back."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)}
    version, internal, gauss_next = random.getstate()
    state["python"] = {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:  # checkpoints written before NumPy's state was saved lack it
        np_state = state["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["gauss"]))
    if "python" in state:
        py_state = state["python"]
        random.setstate((py_state["version"], tuple(py_state["internal"].tolist()), py_state["gauss_next"]))


def build_optimizer(task: Task, model: nn.Module, trainable: list[nn.Parameter], config: TrainConfig):
    """AdamW (weight decay on ≥2-D tensors except ``model.no_weight_decay()``) or SGD, as the task asks.

    A task may define ``param_groups(model)`` (dicts with ``params`` and an ``lr_scale``
    relative to ``config.lr``) and ``optimizer`` (``"adamw"`` or ``"sgd"``), or build the whole
    optimizer itself with ``make_optimizer(model, trainable, config)`` (each group's ``lr`` at its
    peak; the schedule scales them all by the same factor).
    """
    if hasattr(task, "make_optimizer"):
        return task.make_optimizer(model, trainable, config)
    groups = task.param_groups(model) if hasattr(task, "param_groups") else [{"params": trainable, "lr_scale": 1.0}]
    kind = getattr(task, "optimizer", "adamw")
    # no weight decay on what the model names either (timm: pos_embed, cls_token, ...)
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    skip_ids = {id(p) for name, p in model.named_parameters() if name in skip}
    param_groups = []
    for group in groups:
        lr = config.lr * group.get("lr_scale", 1.0)
        params = list(group["params"])
        if kind == "sgd":
            param_groups.append({"params": params, "lr": lr, "weight_decay": 0.0})
            continue
        decay = [p for p in params if p.ndim >= 2 and id(p) not in skip_ids]
        no_decay = [p for p in params if p.ndim < 2 or id(p) in skip_ids]
        param_groups += [
            {"params": decay, "lr": lr, "weight_decay": config.weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
    param_groups = [g for g in param_groups if g["params"]]
    if kind == "sgd":
        return torch.optim.SGD(param_groups, lr=config.lr, momentum=0.0)
    if kind != "adamw":
        raise ValueError(f"unknown optimizer {kind!r}; use 'adamw' or 'sgd'")
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas)


def train(
    model: nn.Module,
    task: Task,
    dataset: Dataset,
    config: TrainConfig,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``dataset`` with ``task``'s loss.

    Args:
        model: the bare model (not wrapped); it is moved to ``config.device``.
        task: trainable parameters and the loss of ``(model, batch)``.
        dataset: a map-style dataset; batches are collated by the default collate.
        config: see :class:`TrainConfig`.
        evaluate: called on rank 0 at the end of every epoch with the model in eval
            mode under ``no_grad``; its dict is logged (``event: "eval"``).

    Returns:
        A :class:`TrainResult`; the model holds the trained weights.

    Raises:
        CheckpointError: ``resume=True`` and there is no checkpoint in ``out_dir``, or it is
            corrupted, or it belongs to another configuration (different number of steps or world
            size, a different ``config.extra``, or parameters that do not fit the model or task).
        TrainingInterrupted: SIGINT or SIGTERM stopped the run; its checkpoint is written
            (``resume=True`` continues it).
    """
    rank, world = init_distributed_from_env()
    device = torch.device(config.device)
    out = Path(config.out_dir)
    ckpt_path = out / CHECKPOINT_NAME
    if config.resume and not ckpt_path.is_file():
        raise CheckpointError(
            f"no checkpoint to resume in {out} ({CHECKPOINT_NAME} is missing: the run there, if any, stopped "
            "before its first checkpoint); start the run over instead of resuming"
        )
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temporaries(out, [CHECKPOINT_NAME])

    n = len(dataset)  # type: ignore[arg-type]
    steps_per_epoch = (n // world) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"dataset of {n} samples is smaller than one batch ({config.batch_size} × {world} processes)")
    if config.epoch_steps is not None:
        if config.epoch_steps < 1:
            raise ValueError(f"epoch_steps must be >= 1, got {config.epoch_steps}")
        steps_per_epoch = min(steps_per_epoch, config.epoch_steps)
    total_steps = steps_per_epoch * config.epochs
    stop = total_steps if config.stop_at_step is None else min(total_steps, config.stop_at_step)

    model.to(device)
    trainable = list(task.trainable_parameters(model))
    if not trainable:
        raise ValueError("the task returned no trainable parameters")
    trainable_ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable_ids)
    optimizer = build_optimizer(task, model, trainable, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, total_steps, config.warmup_steps, config.lr, config.min_lr) / config.lr,
    )
    # parameters the model does not own (a learned reducer's): DDP cannot see them, so their
    # gradients are averaged over ranks explicitly after every backward
    model_ids = {id(p) for p in model.parameters()}
    outside = [p for p in trainable if id(p) not in model_ids]

    step, wall_before, evals = 0, 0.0, []
    torch.manual_seed(config.seed + rank)
    np.random.seed(config.seed + rank)  # timm's mixup / cutmix and augmentations draw from NumPy and Python
    random.seed(config.seed + rank)
    if config.resume:
        state = load_checkpoint(ckpt_path)
        if state.get("total_steps") != total_steps or state.get("world_size") != world:
            raise CheckpointError(
                f"checkpoint {ckpt_path} is from another run: {state.get('total_steps')} steps on "
                f"{state.get('world_size')} processes, this run has {total_steps} steps on {world}"
            )
        saved_extra = state.get("config", {}).get("extra", {})
        differ = sorted(k for k in set(saved_extra) | set(config.extra) if saved_extra.get(k) != config.extra.get(k))
        if differ:  # e.g. another method or other method parameters (TrainConfig.extra describes the run)
            raise CheckpointError(
                f"checkpoint {ckpt_path} is from another run: "
                + "; ".join(f"{k}: {saved_extra.get(k)!r} there, {config.extra.get(k)!r} here" for k in differ)
            )
        try:
            model.load_state_dict(state["model"])
            if hasattr(task, "load_state_dict") and "task" in state:
                task.load_state_dict(state["task"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as err:  # parameters of another shape or number
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit this run's model or task: {err}") from None
        step, wall_before, evals = state["step"], state["wall_time_s"], list(state.get("evals", []))
        _set_rng_state(state["rng"][rank])

    run_model: nn.Module = model
    if world > 1 and any(p.requires_grad for p in model.parameters()):
        ids = [device.index] if device.type == "cuda" else None
        run_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    eval_model: nn.Module = model
    if config.compile:
        run_model = torch.compile(run_model)
        eval_model = torch.compile(model)

    use_amp = config.amp if config.amp is not None else device.type == "cuda"
    metrics_path = out / METRICS_NAME
    t_start = time.perf_counter()

    def log(record: dict[str, Any]) -> None:
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    saved_step = -1

    def checkpoint() -> None:
        nonlocal saved_step
        saved_step = step
        rng = [_rng_state()]
        if world > 1:
            rng = [None] * world
            dist.all_gather_object(rng, _rng_state())
        if rank == 0:
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "task": task.state_dict() if hasattr(task, "state_dict") else {},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "total_steps": total_steps,
                    "world_size": world,
                    "rng": rng,
                    "wall_time_s": wall_before + time.perf_counter() - t_start,
                    "evals": evals,
                    "config": {k: v for k, v in asdict(config).items() if k != "extra"} | {"extra": config.extra},
                },
                ckpt_path,
            )
        if world > 1:
            dist.barrier()

    def stop_signal(signum: int) -> int:
        """The signal asking the run to stop (0: none): the highest any rank received."""
        if world > 1:
            on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([signum], device=on)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    if step == 0:
        log({"event": "start", "total_steps": total_steps, "world_size": world, "config": asdict(config)})
    else:
        log({"event": "resume", "step": step})

    bar = tqdm(total=stop, initial=step, desc="train", disable=not config.progress or rank != 0, dynamic_ncols=True)
    last: dict[str, float] = {}
    batches: Iterator[Any] | None = None
    model.train()
    window_t, window_n = time.perf_counter(), 0
    signum = 0
    with _StopSignals() as signals:
        while step < stop:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if batches is None or in_epoch == 0:
                order = epoch_batches(n, config.batch_size, config.seed, epoch, rank, world)[in_epoch:]
                # an own generator: creating a loader iterator must not draw from the global RNG,
                # or a resumed run (which creates one mid-epoch) would drift from an uninterrupted one
                gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
                loader = DataLoader(dataset, batch_sampler=order, num_workers=config.num_workers, generator=gen)
                batches = iter(loader)
            try:
                batch = _to_device(next(batches), device)
            except Exception:
                if not signals.signum:
                    raise
                signum = signals.signum  # Ctrl-C stops the loader's worker processes too: stop as asked
                break
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, extras = task.loss(run_model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                for p in outside:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            if hasattr(task, "after_step"):
                task.after_step(model)
            scheduler.step()
            step += 1
            window_n += config.batch_size * world

            if step % config.log_every == 0 or step == stop:
                now = time.perf_counter()
                last = {"loss": loss.item(), **extras, "lr": optimizer.param_groups[0]["lr"]}
                last["images_per_s"] = window_n / max(now - window_t, 1e-9)
                window_t, window_n = now, 0
                log({"event": "step", "step": step, "epoch": epoch, **last})
                postfix = {"loss": f"{last['loss']:.3f}", "img_s": f"{last['images_per_s']:.0f}"}
                if "gmacs_ratio" in last:
                    postfix["gmacs"] = f"{last['gmacs_ratio']:.3f}"
                bar.set_postfix(postfix, refresh=False)
            bar.update(1)

            if evaluate is not None and step % steps_per_epoch == 0:
                if rank == 0:
                    model.eval()
                    with torch.no_grad():
                        result = {"event": "eval", "step": step, "epoch": epoch + 1, **evaluate(eval_model)}
                    model.train()
                    evals.append(result)
                    log(result)
                    bar.write(json.dumps(result))
                if world > 1:
                    dist.barrier()
            if step % config.checkpoint_every == 0 or step == stop:
                checkpoint()
            if step < stop:  # a signal at the last step ends the run normally
                signum = stop_signal(signals.signum)
                if signum:
                    break
        if signum:  # stop resumably: the checkpoint at this step, then the exception
            if saved_step != step:
                checkpoint()
            bar.close()
            model.eval()
            log({"event": "interrupted", "step": step, "signal": signal.Signals(signum).name})
            raise TrainingInterrupted(signum, step, total_steps, str(ckpt_path))
    bar.close()
    model.eval()
    wall = wall_before + time.perf_counter() - t_start
    log({"event": "end", "step": step, "wall_time_s": wall, "complete": step >= total_steps})
    return TrainResult(step, total_steps, wall, last, evals, str(ckpt_path))
