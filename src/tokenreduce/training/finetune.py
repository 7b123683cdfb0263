"""Fine-tuning the backbone with the reduction on, under a paper's recipe (:mod:`.recipes`).

:func:`finetune` applies a method to the model, builds a :class:`FinetuneTask` from the
recipe and runs the project's engine (exact resume, ``torchrun``, checkpoints).  The
training parts are timm's: ``timm.data.Mixup`` for mixup / cutmix,
``timm.loss.SoftTargetCrossEntropy`` / ``LabelSmoothingCrossEntropy``,
``timm.optim.create_optimizer_v2`` with ``layer_decay``, ``timm.utils.ModelEmaV3`` and
``timm.layers.DropPath``; the schedule is the engine's per-step warm-up and cosine.

What a recipe cannot hold lives with the method: a learned method's losses are its
training task's (:mod:`.learned`: DynamicViT's and dTPS's ratio and distillation terms,
Cropr's detached auxiliary heads, LTMP's GMACs term and threshold rates), with the
recipe's weights; a training-free method trains on the classification loss, plus a
logit distillation from the unreduced model when the recipe sets ``distill_weight``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..api import stats
from ..methods.base import Reducer
from .learned import ReducerTask, _accuracy, _frozen_copy, _unwrap, logit_distillation
from .recipes import Recipe, keep_rate_at, resolve_recipe
from .tasks import logits_of

Transform = Callable[[Tensor], Tensor]


def classification_criterion(recipe: Recipe) -> nn.Module:
    """timm's loss for the recipe: soft-target cross-entropy when batches are mixed (the label smoothing is in
    the mixed targets), label-smoothing cross-entropy otherwise, or the plain one without smoothing."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if recipe.mixes:
        return SoftTargetCrossEntropy()
    if recipe.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=recipe.label_smoothing)
    return nn.CrossEntropyLoss()


def mixup_of(recipe: Recipe, num_classes: int) -> Any:
    """``timm.data.Mixup`` with the recipe's values, or ``None`` when the recipe does not mix."""
    if not recipe.mixes:
        return None
    if num_classes < 1:
        raise ValueError(f"recipe {recipe.name} mixes batches (mixup {recipe.mixup:g}, cutmix {recipe.cutmix:g}), "
                         "which needs a classifier's number of classes; set mixup=0 and cutmix=0")
    from timm.data import Mixup

    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
                 switch_prob=recipe.mixup_switch_prob, mode=recipe.mixup_mode, label_smoothing=recipe.label_smoothing,
                 num_classes=num_classes)


def set_drop_path(model: nn.Module, rate: float, last_block: bool = True) -> Callable[[], None]:
    """Give the blocks stochastic depth increasing linearly from 0 to ``rate`` (timm's ``DropPath``; the last
    block 0 when ``last_block`` is false, as Cropr does); returns the function that puts the old modules back.

    Raises:
        ValueError: ``rate`` > 0 on a family whose blocks have no drop-path slot (e.g. Hugging Face ViT).
    """
    from timm.layers import DropPath

    from ..models import adapter_for

    blocks = list(adapter_for(model).blocks(_unwrap(model)))
    slots = [[name for name in ("drop_path1", "drop_path2", "drop_path") if hasattr(b, name)] for b in blocks]
    if not all(slots):
        if rate > 0:
            raise ValueError(f"drop path {rate:g}: the blocks of {type(model).__name__} have no drop-path slot; "
                             "override drop_path=0")
        return lambda: None
    depth = len(blocks)
    rates = [rate * i / max(depth - 1, 1) for i in range(depth)]
    if not last_block:
        rates[-1] = 0.0
    previous = [(b, name, getattr(b, name)) for b, names in zip(blocks, slots, strict=True) for name in names]
    for block, names, r in zip(blocks, slots, rates, strict=True):
        for name in names:
            setattr(block, name, DropPath(r) if r > 0 else nn.Identity())

    def restore() -> None:
        for block, name, module in previous:
            setattr(block, name, module)

    return restore


class FinetuneTask:
    """The engine's task for a recipe fine-tune: backbone and learned reducer, the recipe's loss and optimiser.

    Args:
        reducer: the applied reducer.
        recipe: the resolved recipe.
        method_task: a learned method's training task (built with ``finetune=True``), whose ``objective``
            gives the loss; ``None`` for a training-free method.
        transform: applied to every image batch before mixing.
        steps_per_epoch: the run's steps per epoch (the keep-rate warm-up is laid out in epochs).
    """

    def __init__(self, reducer: Reducer, recipe: Recipe, method_task: ReducerTask | None, *,
                 transform: Transform | None, steps_per_epoch: int) -> None:
        self.reducer = reducer
        self.recipe = recipe
        self.method_task = method_task
        self.transform = transform
        self.steps_per_epoch = steps_per_epoch
        self.criterion = classification_criterion(recipe)
        self.mixup = mixup_of(recipe, reducer.info.num_classes)
        if method_task is not None:
            method_task.criterion = self.criterion
        self.distill_weight = 0.0 if method_task is not None else float(recipe.distill_weight or 0.0)
        self.target_keep_rate = getattr(reducer, "keep_rate", None)
        self.warms_keep_rate = bool(recipe.keep_rate_hold_epochs or recipe.keep_rate_shrink_epochs)
        if self.warms_keep_rate and self.target_keep_rate is None:
            raise ValueError(f"recipe {recipe.name}'s keep-rate warm-up needs a method with a keep rate, not "
                             f"{reducer.name}; override keep_rate_hold_epochs=0 and keep_rate_shrink_epochs=0")
        self.step = 0
        self.ema: Any = None
        self._teacher: nn.Module | None = None

    # -- what the engine asks -----------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Before training (and before a resume loads weights): the fixed unreduced teacher, if one is needed."""
        if self.method_task is not None:
            self.method_task.prepare(model)
        elif self.distill_weight > 0:
            self._teacher = _frozen_copy(_unwrap(model))

    def backbone_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The model's parameters that train (a learned method's task may keep some frozen: LTMP's norms)."""
        if self.method_task is not None:
            return self.method_task.backbone_parameters(model)
        return list(model.parameters())

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The backbone's and the reducer's parameters.  Called once, on the bare model on its device: the
        EMA copy is taken here."""
        if self.recipe.ema_decay is not None and self.ema is None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=self.recipe.ema_decay)
        params = self.backbone_parameters(model)
        if self.reducer.module is not None:
            params += list(self.reducer.module.parameters())
        return params

    def make_optimizer(self, model: nn.Module, trainable: list[nn.Parameter], config: Any) -> torch.optim.Optimizer:
        """timm's optimiser over the backbone (weight-decay filter, layer decay) at ``backbone_lr_scale``, plus the
        reducer's groups at their own scales; every group's ``lr`` is its peak rate."""
        from timm.optim import create_optimizer_v2

        r = self.recipe
        optimizer = create_optimizer_v2(model, opt=r.optimizer, lr=config.lr, weight_decay=r.weight_decay,
                                        momentum=r.momentum, filter_bias_and_bn=r.filter_bias_and_bn,
                                        layer_decay=r.layer_decay)
        for group in optimizer.param_groups:
            group["lr_scale"] = group.get("lr_scale", 1.0) * r.backbone_lr_scale
            group["lr"] = config.lr * group["lr_scale"]
        if self.method_task is not None:
            for group in self.method_task.reducer_param_groups():
                params = list(group["params"])
                split = ([p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1])
                if not r.filter_bias_and_bn:
                    split = (params, [])
                for decayed, members in zip((True, False), split, strict=True):
                    if members:
                        optimizer.add_param_group({"params": members, "lr": config.lr * group["lr_scale"],
                                                   "lr_scale": group["lr_scale"],
                                                   "weight_decay": r.weight_decay if decayed else 0.0})
        return optimizer

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        images, labels = batch
        if self.transform is not None:
            images = self.transform(images)
        if not self.recipe.train_mode:
            model.eval()  # DeiT-derived fine-tunes: no drop path, no dropout
        metrics: dict[str, float] = {}
        if self.warms_keep_rate:
            self.reducer.keep_rate = self.keep_rate()
            metrics["keep_rate"] = self.reducer.keep_rate
        targets = labels
        if self.mixup is not None:
            if images.shape[0] % 2:
                raise ValueError(f"mixup / cutmix pair the images of a batch: the batch per process must be even, "
                                 f"got {images.shape[0]}")
            images, targets = self.mixup(images, labels)
        if self.method_task is not None:
            loss, extras = self.method_task.objective(model, images, targets)
            return loss, metrics | extras
        logits = logits_of(model(images))
        loss = self.criterion(logits, targets)
        if self.distill_weight > 0:
            with torch.no_grad():
                teacher = self._teacher.to(images.device)
                teacher_logits = logits_of(teacher(images))
            kl = logit_distillation(logits, teacher_logits)
            loss = loss + self.distill_weight * kl
            metrics["logit_kl"] = float(kl.detach())
        metrics["gmacs_ratio"] = stats(_unwrap(model)).ratio
        return loss, metrics | {"train_acc": _accuracy(logits, targets)}

    def after_step(self, model: nn.Module) -> None:
        if self.method_task is not None:
            self.method_task.after_step(model)
        if self.ema is not None:
            self.ema.update(model)
        self.step += 1

    def keep_rate(self, step: int | None = None) -> float:
        """The keep rate the recipe's warm-up gives at ``step`` (default: the current one)."""
        r = self.recipe
        return keep_rate_at(self.step if step is None else step, self.steps_per_epoch, self.target_keep_rate,
                            r.keep_rate_hold_epochs, r.keep_rate_shrink_epochs)

    def finish(self) -> None:
        """After training: the reducer back at its target keep rate."""
        if self.warms_keep_rate:
            self.reducer.keep_rate = self.target_keep_rate

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step}
        if self.reducer.module is not None:
            state["reducer"] = self.reducer.module.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        if self.reducer.module is not None:
            self.reducer.module.load_state_dict(state["reducer"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])


def finetune(
    model: nn.Module,
    method: str,
    train_data: Any,
    *,
    recipe: str | Recipe,
    out_dir: str,
    overrides: dict[str, Any] | None = None,
    batch_size: int | None = None,
    resume: bool = False,
    checkpoint_every: int = 200,
    log_every: int = 10,
    max_steps: int | None = None,
    epoch_steps: int | None = None,
    transform: Transform | None = None,
    device: str = "cpu",
    amp: bool | None = None,
    progress: bool = True,
    seed: int = 0,
    workers: int = 0,
    **params: Any,
) -> dict[str, Any]:
    """Fine-tune ``model``'s backbone with ``method``'s reduction on, under ``recipe`` (``tr.train(..., recipe=)``).

    Args:
        model: the model (the method is applied to it with ``params``; a learned method starts from fresh
            parameters unless ``checkpoint=PATH`` is among them).
        method: any method.
        train_data: a map-style dataset of ``(image, label)``.
        recipe: a recipe name, ``"paper"`` (the method's own), or a :class:`~.recipes.Recipe`.
        out_dir: run folder.
        overrides: recipe values to replace (:func:`~.recipes.recipe_fields`).
        batch_size: images per step and process (default: the recipe's global batch divided by the processes);
            the learning rate follows the global batch as the recipe scales it.
        max_steps, epoch_steps, resume, checkpoint_every, log_every, device, amp, progress, seed, workers: as
            :func:`~.learned.train_reducer`.
        transform: applied to every image batch before mixing (augmentation of tensor datasets; an ImageFolder's
            augmentation is in its own pipeline).

    Returns:
        ``{"checkpoint": OUT/reducer.safetensors, "model": OUT/model.safetensors, "result": TrainResult,
        "complete": bool, "recipe": the resolved recipe as a dict}``, plus ``"ema"``
        (``OUT/model_ema.safetensors``) when the recipe keeps an EMA.  The reducer file holds the method and its
        parameters (and a learned method's tensors); the model file is the fine-tuned state dict, which
        ``tokenreduce evaluate --checkpoint`` loads.

    Raises:
        ValueError: an unknown recipe or a bad value; a recipe the method cannot train with (a keep-rate warm-up
            without a keep rate, eval mode for a learned method, a loss weight the method has no term for).
        TypeError: an override that names no recipe value.
    """
    from ..api import apply
    from ..api import reducer as applied_reducer
    from ..checkpoint import atomic_save_file, save_reducer
    from ..distributed import init_distributed_from_env
    from ..methods import REGISTRY, get_method
    from .engine import TrainConfig, precision_label, remove_orphaned_temporaries, train

    cls, _ = get_method(method).resolve(dict(params))
    resolved = resolve_recipe(recipe, cls, overrides)
    task_cls = cls.training_task()
    given_weights = {name: getattr(resolved, name) for name in ("ratio_weight", "aux_weight")
                     if getattr(resolved, name) is not None}
    for name in given_weights:  # checked before the model is touched
        if task_cls is None or name not in task_cls.loss_weights:
            users = [m for m, c in sorted(REGISTRY.items())
                     if c.training_task() and name in c.training_task().loss_weights]
            raise ValueError(f"{name} weighs a loss term of {', '.join(users)} only, not {cls.name}; override "
                             f"{name}=None")
    if task_cls is not None and not resolved.train_mode:
        raise ValueError(f"recipe {resolved.name} keeps the model in eval mode, in which {cls.name} cannot train its "
                         "parameters; override train_mode=True")
    rank, world = init_distributed_from_env()
    if batch_size is None:
        if resolved.batch_size % world:
            raise ValueError(f"recipe {resolved.name}'s batch of {resolved.batch_size} does not split over {world} "
                             "processes; give batch_size (per process)")
        batch_size = resolved.batch_size // world
    resolved = resolve_recipe(resolved, cls, {"batch_size": batch_size * world})  # the global batch it runs at

    if cls.learned and "checkpoint" not in params:
        params = {**params, "untrained": True}
    apply(model, method, **params)
    reducer = applied_reducer(model)
    method_task = None
    if task_cls is not None:
        weights = {name: getattr(resolved, name) for name in task_cls.loss_weights
                   if getattr(resolved, name) is not None}
        method_task = task_cls(reducer, finetune=True, **weights)
        if "label_smoothing" in task_cls.options:  # recorded as LTMP's option; the criterion is the recipe's
            method_task.label_smoothing = resolved.label_smoothing
    n = len(train_data)
    steps_per_epoch = (n // world) // batch_size
    if epoch_steps is not None:
        steps_per_epoch = min(steps_per_epoch, epoch_steps)
    task = FinetuneTask(reducer, resolved, method_task, transform=transform, steps_per_epoch=max(steps_per_epoch, 1))
    task.prepare(model)
    peak = resolved.peak_lr(batch_size * world)
    use_amp = amp if amp is not None else torch.device(device).type == "cuda"
    precision = precision_label(use_amp)
    record = {"method": cls.name, "params": reducer.config(), "finetune": True, "precision": precision,
              "recipe": resolved.to_dict()}
    config = TrainConfig(
        out_dir=out_dir, epochs=resolved.epochs, batch_size=batch_size, lr=peak, min_lr=min(resolved.min_lr, peak),
        weight_decay=resolved.weight_decay, warmup_steps=round(resolved.warmup_epochs * max(steps_per_epoch, 1)),
        grad_clip=resolved.clip_grad, seed=seed, checkpoint_every=checkpoint_every, log_every=log_every,
        resume=resume, stop_at_step=max_steps, device=device, progress=progress, amp=use_amp, num_workers=workers,
        epoch_steps=epoch_steps, extra=record,
    )
    if rank == 0:  # what a kill during an earlier run's final writes left behind
        remove_orphaned_temporaries(out_dir, ["reducer.safetensors", "model.safetensors", "model_ema.safetensors"])
    restore_drop_path = (set_drop_path(model, resolved.drop_path, resolved.drop_path_last_block)
                         if resolved.train_mode else lambda: None)  # in eval mode drop path never acts
    try:
        result = train(model, task, train_data, config)
    finally:
        restore_drop_path()
        task.finish()
    out: dict[str, Any] = {"checkpoint": f"{out_dir}/reducer.safetensors", "model": f"{out_dir}/model.safetensors",
                           "result": result, "complete": result.complete, "recipe": resolved.to_dict()}
    if task.ema is not None:
        out["ema"] = f"{out_dir}/model_ema.safetensors"
    if rank == 0:
        extra = {"steps": result.step, "total_steps": result.total_steps, "complete": result.complete,
                 "finetune": True, "precision": precision, "recipe": resolved.to_dict()}
        save_reducer(reducer, out["checkpoint"], extra=extra)
        meta = {"tokenreduce": json.dumps({"method": cls.name, "params": reducer.config()} | extra)}
        weights = [(out["model"], _unwrap(model))] + ([(out["ema"], task.ema.module)] if task.ema is not None else [])
        for path, module in weights:
            state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            atomic_save_file(state, path, meta)
    return out
