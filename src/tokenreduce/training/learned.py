"""Training tasks of the learned methods (LTMP, DynamicViT, dTPS, Cropr) for the engine.

Each task trains only the reducer's parameters unless ``finetune=True`` (then the
backbone too, at the method's backbone learning-rate scale).  Losses, optimisers
and learning rates follow docs/methods.md (each method's section):

* LTMP (docs/methods.md#ltmp): ``CE_ls + λ·(FLOPs_ratio − target)²``, λ = 10, CE with label
  smoothing 0.1 (timm's default in the official tools/train.py); SGD without momentum
  or weight decay; learning rates 5e-3 (merge thresholds) and 5e-6 (prune
  thresholds), constant (the official run is 1 epoch of timm's per-epoch cosine, so
  the rate never moves); thresholds clamped to [0, 1] after every step.  With
  ``finetune=True`` parameters whose name contains ``norm`` stay frozen, as there.
* DynamicViT / dTPS (docs/methods.md#dynamicvit, #tps-etps-and-dtps): ``CE + 2·Σ_k mean_b (keep_k − ρ^k)² / K
  + 0.5·KL(student ‖ teacher) + 0.5·token distillation``, the token term over the
  final patch tokens still live (selected by the detached mask): MSE for DynamicViT,
  KL of the channel softmaxes for dTPS (TPS's DeiT-S script); ``distill_weight=0``
  drops both distillation terms (TPS's DeiT-T script).  The teacher is the unreduced
  model in eval mode: the same model with reduction switched off, or, when the
  backbone is fine-tuned, a frozen copy taken before training.  AdamW lr 1e-3 for
  the predictors, backbone ×0.01.  Not reproduced: the papers' label smoothing and
  mixup (pass ``transform=`` for augmentation).
* Cropr (docs/methods.md#token-cropr): the auxiliary heads' cross-entropies (plus the main one when the
  backbone is fine-tuned); AdamW lr 1e-3.

The same tasks compute the losses of a paper-recipe fine-tune (:mod:`.finetune`): there the batch
may be mixed (soft targets), ``criterion`` is the recipe's (timm's soft-target or label-smoothing
cross-entropy) and the loss weights are the recipe's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import last_forward, stats, unreduced
from ..methods.base import Reducer
from ..methods.ltmp import flops_ratio
from .tasks import logits_of

Transform = Callable[[Tensor], Tensor]


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


class ReducerTask:
    """Shared plumbing: trainable parameters, optimiser groups, checkpointable state."""

    options: tuple[str, ...] = ()  # the task options (TASK_OPTIONS) this task takes
    loss_weights: tuple[str, ...] = ()  # the recipe loss weights (ratio_weight, distill_weight, aux_weight) it takes
    optimizer = "adamw"
    lr = 1e-3
    min_lr_scale = 1e-3  # the cosine schedule ends at lr × this (1.0: constant learning rate)
    backbone_lr_scale = 0.01

    def __init__(self, reducer: Reducer, transform: Transform | None = None, finetune: bool = False) -> None:
        if reducer.module is None:
            raise ValueError(f"{reducer.name} has no learned parameters to train")
        self.reducer = reducer
        self.transform = transform
        self.finetune = finetune
        self.criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
        """The classification loss of ``(logits, targets)``; targets are class indices or, for a mixed batch,
        B×classes probabilities."""

    # -- what the engine asks -----------------------------------------------------------
    def backbone_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The model's parameters trained with ``finetune=True`` (all of them here)."""
        return list(model.parameters())

    def trainable_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        params = list(self.reducer.module.parameters())
        if self.finetune:
            params += self.backbone_parameters(model)
        return params

    def reducer_param_groups(self) -> list[dict[str, Any]]:
        """The reducer's parameters in optimiser groups, each with an ``lr_scale`` relative to the base rate."""
        return [{"params": list(self.reducer.module.parameters()), "lr_scale": 1.0}]

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimiser groups with an ``lr_scale`` relative to the run's base learning rate."""
        groups = self.reducer_param_groups()
        if self.finetune:
            groups.append({"params": self.backbone_parameters(model), "lr_scale": self.backbone_lr_scale})
        return groups

    def state_dict(self) -> dict[str, Tensor]:
        return self.reducer.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.reducer.module.load_state_dict(state)

    def prepare(self, model: nn.Module) -> None:
        """Called once with the model before training starts (and before a resume loads weights)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step."""

    def _images(self, batch: Any) -> tuple[Tensor, Tensor]:
        images, labels = batch
        if self.transform is not None:
            images = self.transform(images)
        return images, labels

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        images, labels = self._images(batch)
        return self.objective(model, images, labels)

    def objective(self, model: nn.Module, images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The loss and metrics of one batch of (transformed, possibly mixed) images and their targets."""
        raise NotImplementedError


class LTMPTask(ReducerTask):
    """LTMP thresholds against the FLOPs-ratio target (official ``tools/train.py`` recipe).

    The learning rate is constant (``min_lr_scale = 1``): the official run is one epoch
    of timm's cosine schedule stepped per epoch, which keeps the base rate throughout.
    With ``finetune=True`` the backbone trains too, except the parameters whose name
    contains ``norm`` (all LayerNorms, q/k-norms), which the official script always freezes.

    Args:
        reg_scale: λ, the weight of ``(FLOPs_ratio − target)²`` (10 in the paper).
        label_smoothing: of the cross-entropy (0.1: timm's ``--smoothing`` default, which
            the official script uses).
    """

    options = ("label_smoothing",)
    loss_weights = ("ratio_weight",)
    optimizer = "sgd"
    lr = 5e-3
    min_lr_scale = 1.0
    prune_lr_scale = 1e-3  # 5e-6 / 5e-3
    backbone_lr_scale = 1e-3

    def __init__(self, reducer: Reducer, transform: Transform | None = None, finetune: bool = False,
                 reg_scale: float = 10.0, label_smoothing: float = 0.1, ratio_weight: float | None = None) -> None:
        super().__init__(reducer, transform, finetune)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.reg_scale = reg_scale if ratio_weight is None else ratio_weight  # a recipe's name for λ
        self.label_smoothing = label_smoothing
        self.criterion = functools.partial(F.cross_entropy, label_smoothing=label_smoothing)

    def backbone_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The model's parameters fine-tuned with ``finetune=True``: all but the norms'."""
        return [p for name, p in model.named_parameters() if "norm" not in name]

    def reducer_param_groups(self) -> list[dict[str, Any]]:
        module = self.reducer.module
        return [
            {"params": [module.merge_threshold], "lr_scale": 1.0},
            {"params": [module.prune_threshold], "lr_scale": self.prune_lr_scale},
        ]

    def after_step(self, model: nn.Module) -> None:
        self.reducer.module.clamp_()

    def objective(self, model: nn.Module, images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
        logits = logits_of(model(images))
        record = last_forward(_unwrap(model))
        ratio = flops_ratio(record.block_tokens, self.reducer.info, record.num_tokens_in).to(logits.device)
        loss = self.criterion(logits, targets) + self.reg_scale * (ratio - self.reducer.params.target) ** 2
        return loss, {"gmacs_ratio": float(ratio.detach()), "train_acc": _accuracy(logits, targets)}


def _gmacs_ratio(model: nn.Module) -> float:
    return stats(_unwrap(model)).ratio


class DynamicViTTask(ReducerTask):
    """Predictors of DynamicViT with ratio, logit-distillation and token-distillation losses.

    The teacher is the unreduced model in eval mode (no dropout or drop-path), as the
    papers' separate pretrained teacher: with the backbone frozen it is the same model
    with reduction switched off; with ``finetune=True`` it is a frozen copy taken before
    the first step, so it does not drift with the student.

    Args:
        distill_weight: weight of each distillation term (logits and tokens); 0 turns
            distillation off (TPS's DeiT-T recipe).
    """

    options = ("distill_weight",)
    loss_weights = ("ratio_weight", "distill_weight")
    ratio_weight = 2.0
    distill_weight = 0.5
    token_loss = "mse"  # DynamicViT's losses.py; dTPS uses "kl"

    def __init__(self, reducer: Reducer, transform: Transform | None = None, finetune: bool = False,
                 distill_weight: float | None = None, ratio_weight: float | None = None) -> None:
        super().__init__(reducer, transform, finetune)
        for name, value in (("distill_weight", distill_weight), ("ratio_weight", ratio_weight)):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"{name} must be a number >= 0, got {value!r}")
                setattr(self, name, float(value))
        self._frozen_teacher: nn.Module | None = None

    def prepare(self, model: nn.Module) -> None:
        if self.finetune and self.distill_weight > 0:
            self._frozen_teacher = _frozen_copy(_unwrap(model))

    def teacher_outputs(self, bare: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(B×N×C final tokens, B×classes logits)`` of the unreduced teacher, in eval mode, without gradients."""
        with torch.no_grad():
            if self.finetune:
                if self._frozen_teacher is None:  # not prepared by train_reducer: copy before the first step
                    self.prepare(bare)
                teacher = self._frozen_teacher.to(images.device)  # prepared before the model moved, maybe
                return features_and_logits(teacher, teacher, images)
            modes = {m: m.training for m in bare.modules()}
            bare.eval()
            try:
                with unreduced(bare):
                    return features_and_logits(bare, bare, images)
            finally:
                for m, mode in modes.items():
                    m.training = mode

    def objective(self, model: nn.Module, images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
        bare = _unwrap(model)
        feats, logits = features_and_logits(model, bare, images)  # through any DDP / compile wrapper
        record = last_forward(bare)
        reducer, p = self.reducer, self.reducer.info.num_prefix
        n_patches = record.num_tokens_in - p
        ratio_terms = []
        for stage, block in enumerate(reducer.layers):
            kept = (record.block_tokens[block][0] - p) / n_patches  # B: live patch fraction entering the stage's block
            ratio_terms.append(((kept - reducer.keep_rate ** (stage + 1)) ** 2).mean())
        ratio_loss = torch.stack(ratio_terms).mean()
        loss = self.criterion(logits, targets) + self.ratio_weight * ratio_loss
        metrics = {"ratio_loss": float(ratio_loss.detach())}
        if self.distill_weight > 0:
            teacher_feats, teacher_logits = self.teacher_outputs(bare, images)
            kl = logit_distillation(logits, teacher_logits)
            mask = record.mask[:, p:] if record.mask is not None else torch.ones_like(feats[:, p:, :1])
            tokens = token_distillation(feats[:, p:], teacher_feats[:, p:], mask, self.token_loss)
            loss = loss + self.distill_weight * (kl + tokens)
            metrics.update(logit_kl=float(kl.detach()), token_loss=float(tokens.detach()))
        keep = float(record.block_tokens[reducer.layers[-1]][0].detach().float().mean()) if reducer.layers else 0.0
        metrics.update(last_stage_tokens=keep, gmacs_ratio=_gmacs_ratio(model), train_acc=_accuracy(logits, targets))
        return loss, metrics


class DTPSTask(DynamicViTTask):
    """dTPS: DynamicViT's losses with TPS's token distillation (KL of the channel softmaxes)."""

    token_loss = "kl"


def features_and_logits(model: nn.Module, bare: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(B×N×C final tokens, B×classes logits)`` of one forward of ``model`` (``bare``: the model under
    any DDP / compile wrapper), the tokens read where its family's adapter says they are final."""
    from ..models import adapter_for

    captured: dict[str, Tensor] = {}

    def keep(module: nn.Module, args: Any, out: Any) -> None:
        captured["feats"] = out[0] if isinstance(out, tuple) else out

    hook = adapter_for(bare).final_tokens_module(bare).register_forward_hook(keep)
    try:
        logits = logits_of(model(images))
    finally:
        hook.remove()
    return captured["feats"], logits


def logit_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """``KL(teacher ‖ student)`` of the class distributions, averaged over the batch (DynamicViT's and TPS's
    logit distillation; ``teacher`` carries no gradient)."""
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="batchmean", log_target=True)


def _frozen_copy(model: nn.Module) -> nn.Module:
    """An unreduced, eval-mode, gradient-free copy of a (reduced) model: a fixed teacher."""
    from ..api import remove

    copy = remove(deepcopy(model))
    copy.eval()
    copy.requires_grad_(False)
    return copy


class CroprTask(ReducerTask):
    """Cropr scorer queries through their auxiliary heads.

    Args:
        aux_weight: weight of the auxiliary heads' summed losses (1, as the official code).
    """

    loss_weights = ("aux_weight",)

    def __init__(self, reducer: Reducer, transform: Transform | None = None, finetune: bool = False,
                 aux_weight: float | None = None) -> None:
        super().__init__(reducer, transform, finetune)
        self.aux_weight = 1.0 if aux_weight is None else float(aux_weight)

    def objective(self, model: nn.Module, images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
        logits = logits_of(model(images))
        aux = self.reducer.aux_logits
        aux_loss = torch.stack([self.criterion(a, targets) for a in aux]).sum()
        loss = self.aux_weight * aux_loss
        if self.finetune:
            loss = loss + self.criterion(logits, targets)
        return loss, {"aux_loss": float(aux_loss.detach()) / max(len(aux), 1), "gmacs_ratio": _gmacs_ratio(model),
                      "train_acc": _accuracy(logits, targets)}


def token_distillation(student: Tensor, teacher: Tensor, mask: Tensor, kind: str = "mse") -> Tensor:
    """Distillation of the final patch tokens that are still live, against the teacher's.

    The mask only selects tokens: it is detached, so no gradient reaches the predictors
    through it (as in DynamicViT's and TPS's losses, which index with the decision).

    * ``"mse"`` (DynamicViT): mean squared error over the live tokens and channels.
    * ``"kl"`` (TPS): KL divergence between the channel softmaxes of each live token,
      ``Σ_c p_t log(p_t / p_s)``, averaged over the live tokens.

    Args:
        student, teacher: B×M×C patch tokens (after the final norm).
        mask: B×M×1 live-token mask (0/1).
        kind: ``"mse"`` or ``"kl"``.

    Returns:
        A scalar; 0 when no token is live.
    """
    mask = mask.detach().to(student.dtype)
    live = mask.sum()
    if kind == "mse":
        per_token = ((student - teacher) ** 2).mean(dim=-1, keepdim=True)
    elif kind == "kl":
        log_t = F.log_softmax(teacher.float(), dim=-1)
        per_token = (log_t.exp() * (log_t - F.log_softmax(student.float(), dim=-1))).sum(dim=-1, keepdim=True)
    else:
        raise ValueError(f"token distillation must be 'mse' or 'kl', got {kind!r}")
    return (per_token * mask).sum() / live.clamp_min(1.0)


def _accuracy(logits: Tensor, targets: Tensor) -> float:
    """Top-1 agreement with the labels (with the most likely class of soft targets)."""
    with torch.no_grad():
        labels = targets.argmax(-1) if targets.ndim > 1 else targets
        return float((logits.argmax(-1) == labels).float().mean())


TASK_OPTIONS = ("distill_weight", "label_smoothing")
"""Task options :func:`train_reducer` passes through; each task class lists those it takes in ``options``."""


def learned_methods() -> list[str]:
    """Names of the methods with a training task."""
    from ..methods import REGISTRY

    return sorted(name for name, cls in REGISTRY.items() if cls.training_task() is not None)


def task_for(reducer: Reducer, **kwargs: Any) -> ReducerTask:
    """The training task of a learned reducer (its class's :meth:`~tokenreduce.methods.base.Reducer.training_task`)."""
    task = type(reducer).training_task()
    if reducer.module is None or task is None:
        raise ValueError(f"{reducer.name} {reducer.config()} has nothing to train; learned methods: "
                         f"{', '.join(learned_methods())}")
    return task(reducer, **kwargs)


def train_reducer(
    model: nn.Module,
    method: str,
    train_data: Any,
    *,
    out_dir: str,
    recipe: Any = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    finetune: bool = False,
    resume: bool = False,
    checkpoint_every: int = 200,
    log_every: int = 10,
    max_steps: int | None = None,
    transform: Transform | None = None,
    warmup_fraction: float | None = None,
    device: str = "cpu",
    amp: bool | None = None,
    distill_weight: float | None = None,
    label_smoothing: float | None = None,
    progress: bool = True,
    seed: int = 0,
    workers: int = 0,
    epoch_steps: int | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Train a learned method's parameters on ``train_data`` and write them as a reducer checkpoint, or, with
    ``recipe=``, fine-tune the backbone with any method's reduction on under a paper's recipe.

    Args:
        model: a timm ViT (the method is applied to it with ``params``).
        method: a learned method: ``ltmp``, ``cropr``, ``dynamicvit`` or ``dtps``; with ``recipe``, any method.
        train_data: a map-style dataset of ``(image, label)``.
        out_dir: run folder: the resumable engine checkpoint, the metrics log and
            ``reducer.safetensors`` (load it with ``tr.apply(model, method, checkpoint=...)``).
        recipe: fine-tune the backbone with the reduction on under this recipe
            (:mod:`tokenreduce.training.recipes`: a name, ``"paper"`` for the method's own, or a
            ``Recipe``); keyword arguments named after recipe values (``mixup=0``, ``layer_decay=0.75``,
            ...) override it, as do ``epochs``, ``batch_size``, ``lr``, ``distill_weight`` and
            ``label_smoothing``.  See :func:`tokenreduce.training.finetune.finetune`.
        epochs: epochs over ``train_data`` (default 1, or the recipe's).
        batch_size: images per step and process (default 128, or the recipe's global batch divided
            by the processes).
        lr: base learning rate (default: the method's, see the module docstring).
        finetune: train the backbone too (at the method's backbone lr scale).
        max_steps: stop early (checkpointed; ``resume=True`` continues).  The reducer is written
            all the same, marked incomplete: ``"complete": false`` and ``"steps"`` / ``"total_steps"``
            in its metadata's ``extra`` and in the returned dict.
        transform: applied to every image batch before the forward (augmentation).
        warmup_fraction: share of the steps used for linear warm-up (default: 0 for
            LTMP, 1/6 otherwise, as the papers' 5 of 30 epochs).
        amp: bf16 autocast for the forward and loss (weights, gradients and optimiser
            state stay fp32); ``None``: on for a GPU, off for a CPU.  On a CPU with
            native bf16 a training step of the shipped learned methods is 1.2–1.4× faster
            (``benchmarks/reducer_train_speed.py``).  Recorded in the checkpoint.
        distill_weight: DynamicViT / dTPS only: weight of the logit and token
            distillation terms (default 0.5, the DeiT-S recipes; TPS trains DeiT-T with 0).
        label_smoothing: LTMP only: label smoothing of its cross-entropy (default 0.1, the
            official training script's).
        workers: data-loading worker processes (the DataLoader's ``num_workers``).
        epoch_steps: at most this many steps per epoch (a shortened run with the full schedule's shape).

    Returns:
        ``{"checkpoint": path, "result": TrainResult, "complete": bool}`` (``complete``: the run
        reached its last step, not only ``max_steps``), plus ``"model"``: the path of the
        fine-tuned backbone's state dict (``OUT/model.safetensors``) when ``finetune=True``.

    Raises:
        tokenreduce.training.engine.TrainingInterrupted: SIGINT / SIGTERM stopped the run after
            checkpointing it (``resume=True`` continues); no reducer file is written.
        tokenreduce.training.CheckpointError: ``resume=True`` without a checkpoint in ``out_dir``,
            or with a corrupted or foreign one.
    """
    from ..api import apply
    from ..api import reducer as applied_reducer
    from ..checkpoint import atomic_save_file, save_reducer
    from ..distributed import init_distributed_from_env
    from ..methods import REGISTRY, get_method
    from .engine import TrainConfig, precision_label, remove_orphaned_temporaries, train
    from .recipes import recipe_fields

    overrides = {name: params.pop(name) for name in list(params) if name in recipe_fields()}
    if recipe is not None:
        from .finetune import finetune as finetune_with_recipe

        if warmup_fraction is not None:
            raise ValueError("warmup_fraction does not apply with a recipe; override warmup_epochs instead")
        given = {"epochs": epochs, "lr": lr, "distill_weight": distill_weight, "label_smoothing": label_smoothing}
        overrides |= {k: v for k, v in given.items() if v is not None}
        return finetune_with_recipe(
            model, method, train_data, recipe=recipe, out_dir=out_dir, overrides=overrides, batch_size=batch_size,
            resume=resume, checkpoint_every=checkpoint_every, log_every=log_every, max_steps=max_steps,
            epoch_steps=epoch_steps, transform=transform, device=device, amp=amp, progress=progress, seed=seed,
            workers=workers, **params,
        )
    if overrides:
        raise ValueError(f"{', '.join(sorted(overrides))} set a fine-tuning recipe's values: pass recipe=... "
                         "(a recipe name, or 'paper' for the method's own)")
    epochs = 1 if epochs is None else epochs
    batch_size = 128 if batch_size is None else batch_size
    cls, _ = get_method(method).resolve(params)
    task_cls = cls.training_task()
    if task_cls is None:
        raise ValueError(f"{cls.name} has nothing to train; learned methods: {', '.join(learned_methods())}")
    options = {name: value for name, value in (("distill_weight", distill_weight),
                                               ("label_smoothing", label_smoothing)) if value is not None}
    for name in options:  # checked before the model is touched
        if name not in task_cls.options:
            users = [m for m, c in sorted(REGISTRY.items()) if c.training_task() and name in c.training_task().options]
            raise ValueError(f"{name} applies to {', '.join(users)} only, not {cls.name}")
    apply(model, method, untrained=True, **params)
    reducer = applied_reducer(model)
    task = task_for(reducer, transform=transform, finetune=finetune, **options)
    task.prepare(model)
    task_options = {name: getattr(task, name) for name in task_cls.options}  # as used, defaults included
    n = len(train_data)
    _, world = init_distributed_from_env()
    per_epoch = max(1, (n // world) // batch_size)
    total = (per_epoch if epoch_steps is None else min(per_epoch, epoch_steps)) * epochs
    if warmup_fraction is None:
        warmup_fraction = 0.0 if task.optimizer == "sgd" else 1.0 / 6.0
    base_lr = task.lr if lr is None else lr
    use_amp = amp if amp is not None else torch.device(device).type == "cuda"
    precision = precision_label(use_amp)
    config = TrainConfig(
        out_dir=out_dir, epochs=epochs, batch_size=batch_size, lr=base_lr, min_lr=base_lr * task.min_lr_scale,
        weight_decay=0.0 if task.optimizer == "sgd" else 0.05, warmup_steps=int(total * warmup_fraction),
        grad_clip=None if task.optimizer == "sgd" else 1.0, seed=seed, checkpoint_every=checkpoint_every,
        log_every=log_every,
        resume=resume, stop_at_step=max_steps, device=device, progress=progress, amp=use_amp, num_workers=workers,
        extra={"method": cls.name, "params": reducer.config(), "finetune": finetune, "precision": precision}
        | task_options, epoch_steps=epoch_steps,
    )
    rank, _ = init_distributed_from_env()
    if rank == 0:  # what a kill during an earlier run's final writes left behind
        remove_orphaned_temporaries(out_dir, ["reducer.safetensors", "model.safetensors"])
    result = train(model, task, train_data, config)
    path = f"{out_dir}/reducer.safetensors"
    out: dict[str, Any] = {"checkpoint": path, "result": result, "complete": result.complete}
    if finetune:  # the reducer is only meaningful with the backbone it was trained with
        out["model"] = f"{out_dir}/model.safetensors"
    if rank == 0:
        extra = {"steps": result.step, "total_steps": result.total_steps, "complete": result.complete}
        save_reducer(reducer, path, extra=extra | {"finetune": finetune, "precision": precision} | task_options)
        if finetune:
            state = _unwrap(model).state_dict()
            atomic_save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, out["model"])
    return out
