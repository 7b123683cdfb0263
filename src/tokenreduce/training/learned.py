"""Training tasks of the learned methods (LTMP, DynamicViT, dTPS, Cropr) for the engine.

Each task trains only the reducer's parameters unless ``finetune=True`` (then the
backbone too, at the method's backbone learning-rate scale).  Losses, optimisers
and learning rates follow specs/methods.md:

* LTMP (§7.2): ``CE + λ·(FLOPs_ratio − target)²``, λ = 10; SGD without momentum or
  weight decay; learning rates 5e-3 (merge thresholds) and 5e-6 (prune
  thresholds); thresholds clamped to [0, 1] after every step.
* DynamicViT / dTPS (§3, §5.3): ``CE + 2·Σ_k mean_b (keep_k − ρ^k)² / K
  + 0.5·KL(student ‖ teacher) + 0.5·MSE(kept tokens, teacher tokens)``; the teacher is
  the same model with reduction switched off; AdamW lr 1e-3 for the predictors,
  backbone ×0.01.
* Cropr (§8): the auxiliary heads' cross-entropies (plus the main one when the
  backbone is fine-tuned); AdamW lr 1e-3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import unreduced
from ..methods.base import Reducer
from ..methods.ltmp import ltmp_loss

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

    optimizer = "adamw"
    lr = 1e-3
    backbone_lr_scale = 0.01

    def __init__(self, reducer: Reducer, transform: Transform | None = None, finetune: bool = False) -> None:
        if reducer.module is None:
            raise ValueError(f"{reducer.name} has no learned parameters to train")
        self.reducer = reducer
        self.transform = transform
        self.finetune = finetune

    # -- what the engine asks -----------------------------------------------------------
    def trainable_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        params = list(self.reducer.module.parameters())
        if self.finetune:
            params += list(model.parameters())
        return params

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimiser groups with an ``lr_scale`` relative to the run's base learning rate."""
        groups: list[dict[str, Any]] = [{"params": list(self.reducer.module.parameters()), "lr_scale": 1.0}]
        if self.finetune:
            groups.append({"params": list(model.parameters()), "lr_scale": self.backbone_lr_scale})
        return groups

    def state_dict(self) -> dict[str, Tensor]:
        return self.reducer.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.reducer.module.load_state_dict(state)

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step."""

    def _images(self, batch: Any) -> tuple[Tensor, Tensor]:
        images, labels = batch
        if self.transform is not None:
            images = self.transform(images)
        return images, labels

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError


class LTMPTask(ReducerTask):
    """LTMP thresholds against the FLOPs-ratio target."""

    optimizer = "sgd"
    lr = 5e-3
    prune_lr_scale = 1e-3  # 5e-6 / 5e-3
    backbone_lr_scale = 1e-3

    def __init__(self, reducer: Reducer, transform: Transform | None = None, finetune: bool = False,
                 reg_scale: float = 10.0) -> None:
        super().__init__(reducer, transform, finetune)
        self.reg_scale = reg_scale

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        module = self.reducer.module
        groups = [
            {"params": [module.merge_threshold], "lr_scale": 1.0},
            {"params": [module.prune_threshold], "lr_scale": self.prune_lr_scale},
        ]
        if self.finetune:
            groups.append({"params": list(model.parameters()), "lr_scale": self.backbone_lr_scale})
        return groups

    def after_step(self, model: nn.Module) -> None:
        self.reducer.module.clamp_()

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        images, labels = self._images(batch)
        logits = model(images)
        ctx = _unwrap(model)._tr_ctx
        loss, ratio = ltmp_loss(
            logits, labels, ctx.records, self.reducer.info, ctx.num_tokens_in, self.reducer.params.target,
            self.reg_scale,
        )
        return loss, {"gmacs_ratio": float(ratio.detach()), "train_acc": _accuracy(logits, labels)}


def _gmacs_ratio(model: nn.Module) -> float:
    from ..stats import collect_stats

    return collect_stats(_unwrap(model)._tr_ctx).ratio


class DynamicViTTask(ReducerTask):
    """Predictors of DynamicViT or dTPS with ratio, logit-distillation and token-distillation losses."""

    ratio_weight = 2.0
    distill_weight = 0.5

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        images, labels = self._images(batch)
        bare = _unwrap(model)
        captured: dict[str, Tensor] = {}
        hook = bare.norm.register_forward_hook(lambda mod, args, out: captured.__setitem__("feats", out))
        try:
            logits = model(images)  # through any DDP / compile wrapper
        finally:
            hook.remove()
        feats = captured["feats"]  # B×N×C final tokens (before pooling)
        ctx = bare._tr_ctx
        reducer, p = self.reducer, self.reducer.info.num_prefix
        with torch.no_grad(), unreduced(bare):
            teacher_feats = bare.forward_features(images)
            teacher_logits = bare.forward_head(teacher_feats)
        n_patches = ctx.num_tokens_in - p
        ratio_terms = []
        for stage, block in enumerate(reducer.layers):
            kept = (ctx.records[block][0] - p) / n_patches  # B: live patch fraction entering the stage's block
            ratio_terms.append(((kept - reducer.keep_rate ** (stage + 1)) ** 2).mean())
        ratio_loss = torch.stack(ratio_terms).mean()
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), reduction="batchmean",
                      log_target=True)
        mask = ctx.mask[:, p:] if ctx.mask is not None else torch.ones_like(feats[:, p:, :1])
        token_mse = (((feats[:, p:] - teacher_feats[:, p:]) ** 2) * mask).sum() / (mask.sum() * feats.shape[-1])
        loss = F.cross_entropy(logits, labels) + self.ratio_weight * ratio_loss
        loss = loss + self.distill_weight * kl + self.distill_weight * token_mse
        keep = float(ctx.records[reducer.layers[-1]][0].detach().float().mean()) if reducer.layers else 0.0
        return loss, {"ratio_loss": float(ratio_loss.detach()), "last_stage_tokens": keep,
                      "gmacs_ratio": _gmacs_ratio(model), "train_acc": _accuracy(logits, labels)}


class CroprTask(ReducerTask):
    """Cropr scorer queries through their auxiliary heads."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        images, labels = self._images(batch)
        logits = model(images)
        aux = self.reducer.aux_logits
        aux_loss = torch.stack([F.cross_entropy(a, labels) for a in aux]).sum()
        loss = aux_loss + F.cross_entropy(logits, labels) if self.finetune else aux_loss
        return loss, {"aux_loss": float(aux_loss.detach()) / max(len(aux), 1), "gmacs_ratio": _gmacs_ratio(model),
                      "train_acc": _accuracy(logits, labels)}


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return float((logits.argmax(-1) == labels).float().mean())


TASKS: dict[str, type[ReducerTask]] = {"ltmp": LTMPTask, "dynamicvit": DynamicViTTask, "tps": DynamicViTTask,
                                        "cropr": CroprTask}


def task_for(reducer: Reducer, **kwargs: Any) -> ReducerTask:
    """The training task of a learned reducer."""
    if reducer.module is None or reducer.name not in TASKS:
        raise ValueError(f"{reducer.name} {reducer.config()} has nothing to train; learned methods: "
                         f"ltmp, cropr, dynamicvit, tps (variant='dtps')")
    return TASKS[reducer.name](reducer, **kwargs)


def train_reducer(
    model: nn.Module,
    method: str,
    train_data: Any,
    *,
    out_dir: str,
    epochs: int = 1,
    batch_size: int = 128,
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
    progress: bool = True,
    seed: int = 0,
    **params: Any,
) -> dict[str, Any]:
    """Train a learned method's parameters on ``train_data`` and write them as a reducer checkpoint.

    Args:
        model: a timm ViT (the method is applied to it with ``params``).
        method: ``ltmp``, ``cropr``, ``dynamicvit`` or ``tps`` (with ``variant="dtps"``).
        train_data: a map-style dataset of ``(image, label)``.
        out_dir: run folder: the resumable engine checkpoint, the metrics log and
            ``reducer.safetensors`` (load it with ``tr.apply(model, method, checkpoint=...)``).
        lr: base learning rate (default: the method's, see the module docstring).
        finetune: train the backbone too (at the method's backbone lr scale).
        max_steps: stop early (checkpointed; ``resume=True`` continues).
        transform: applied to every image batch before the forward (augmentation).
        warmup_fraction: share of the steps used for linear warm-up (default: 0 for
            LTMP, 1/6 otherwise, as the papers' 5 of 30 epochs).
        amp: bf16 autocast for the forward and loss (weights, gradients and optimiser
            state stay fp32); ``None``: on for a GPU, off for a CPU.  On a CPU with
            native bf16 a training step of the shipped learned methods is 1.2–1.4× faster
            (``benchmarks/reducer_train_speed.py``).  Recorded in the checkpoint.

    Returns:
        ``{"checkpoint": path, "result": TrainResult}``.
    """
    from ..api import apply
    from ..checkpoint import save_reducer
    from .engine import TrainConfig, _dist_info, precision_label, train

    apply(model, method, **params)
    reducer = model._tr_ctx.reducer
    task = task_for(reducer, transform=transform, finetune=finetune)
    n = len(train_data)
    _, world = _dist_info()
    total = max(1, (n // world) // batch_size) * epochs
    if warmup_fraction is None:
        warmup_fraction = 0.0 if task.optimizer == "sgd" else 1.0 / 6.0
    base_lr = task.lr if lr is None else lr
    use_amp = amp if amp is not None else torch.device(device).type == "cuda"
    precision = precision_label(use_amp)
    config = TrainConfig(
        out_dir=out_dir, epochs=epochs, batch_size=batch_size, lr=base_lr, min_lr=base_lr * 1e-3,
        weight_decay=0.0 if task.optimizer == "sgd" else 0.05, warmup_steps=int(total * warmup_fraction),
        grad_clip=None if task.optimizer == "sgd" else 1.0, seed=seed, checkpoint_every=checkpoint_every,
        log_every=log_every,
        resume=resume, stop_at_step=max_steps, device=device, progress=progress, amp=use_amp,
        extra={"method": method, "params": reducer.config(), "finetune": finetune, "precision": precision},
    )
    result = train(model, task, train_data, config)
    rank, _ = _dist_info()
    path = f"{out_dir}/reducer.safetensors"
    if rank == 0:
        save_reducer(reducer, path, extra={"steps": result.step, "finetune": finetune, "precision": precision})
    return {"checkpoint": path, "result": result}
