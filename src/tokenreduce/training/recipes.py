"""Fine-tuning recipes: what each paper's official script sets, as data.

A :class:`Recipe` is a frozen dataclass holding everything a fine-tune of the backbone
with the reduction on needs: optimiser, learning rate and its batch-size scaling,
warm-up and schedule, epochs, layer-wise decay, weight decay, drop path, label
smoothing, mixup / cutmix, clipping, EMA, loss weights, which parameters train at
which rate, and EViT's keep-rate warm-up.  :data:`RECIPES` holds one per paper (plus a
generic DeiT fine-tune); :func:`resolve_recipe` picks one by name (``"paper"``: the
method's own, named by its reducer class's ``recipe`` attribute) and applies overrides.

Where a paper's script does not publish a value, the recipe says so in its ``notes``
and the value chosen is documented there (docs/training.md#fine-tuning-recipes has the
table with sources).

Learning rates are peak rates at ``lr_batch`` images per optimiser step: a run with
another global batch scales them linearly (``lr × global batch / lr_batch``), as the
official scripts do; ``lr_batch=None`` means the script uses its rate as given.  The
schedule is a linear warm-up from 0 followed by a cosine decay to ``min_lr``, both per
step (:func:`tokenreduce.training.engine.warmup_cosine`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..methods.base import Check, Params, boolean, checked, int_at_least, one_of, optional

DEIT_AUGMENT = "rand-m9-mstd0.5-inc1"
"""timm's RandAugment policy of the DeiT family of scripts."""


def _number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A number in the interval (``low_open`` / ``high_open``: without that end)."""

    def check(key: str, value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
        if ok:
            v = float(value)
            ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            raise ValueError(f"{key} must be a number in {left}{low:g}, {high:g}{right}, got {value!r}")
        return float(value)

    return check


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _optimizer(key: str, value: Any) -> str:
    """A lower-case name; whether timm knows it is checked when an override names one (:func:`resolve_recipe`),
    as importing ``timm.optim`` changes process-wide torch settings and this module must not at import."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a timm optimizer name (timm.optim.list_optimizers()), got {value!r}")
    return value.lower()


def _notes(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a sequence of strings, got {value!r}")
    return tuple(value)


def _required(check: Check) -> Any:
    """A dataclass field without a default whose value ``check`` validates (each recipe gives it)."""
    return field(metadata={"check": check})


_default = checked


NONNEGATIVE = _number(0.0)
POSITIVE = _number(0.0, low_open=True)
UNIT = _number(0.0, 1.0)
UNIT_OPEN = _number(0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class Recipe(Params):
    """One paper's fine-tuning recipe (every field can be overridden; see :func:`resolve_recipe`).

    Attributes:
        name: the registry name.
        paper: the paper the values come from.
        source: the official files the values were read from.
        epochs: epochs over the training set.
        batch_size: the official run's global batch (images per optimiser step, all processes).
        lr: peak learning rate at ``lr_batch`` images per step.
        lr_batch: linear scaling reference (``None``: the rate is used as given, whatever the batch).
        min_lr: the rate the cosine ends at (never above the scaled peak).
        warmup_epochs: linear warm-up from 0, in epochs.
        optimizer: a timm optimiser name (``timm.optim.create_optimizer_v2``'s ``opt``).
        momentum: SGD-family momentum (unused by AdamW).
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        filter_bias_and_bn: no weight decay on 1-D parameters (biases, norms) and on the model's
            ``no_weight_decay()`` names (position embedding, class token), as timm does.
        layer_decay: layer-wise learning-rate decay (timm's ``layer_decay``; ``None``: off).
        backbone_lr_scale: the model's own parameters train at this fraction of the rate of a
            learned reducer's parameters (DynamicViT / dTPS: 0.01).
        clip_grad: gradient-norm clipping (``None``: off).
        ema_decay: an exponential moving average of the weights (``timm.utils.ModelEmaV3``) is kept
            and written as ``model_ema.safetensors`` (``None``: none).
        drop_path: stochastic depth, linearly increasing over the blocks up to this rate.
        drop_path_last_block: the last block gets its drop path too (Cropr: off).
        train_mode: the model runs in training mode; ``False`` keeps it in eval mode as DeiT-derived
            fine-tunes do (drop path and dropout then never act).
        label_smoothing: of the cross-entropy (folded into the soft targets when mixing).
        mixup, cutmix: timm ``Mixup`` alphas (both 0: no mixing).
        mixup_prob, mixup_switch_prob, mixup_mode: timm ``Mixup``'s ``prob``, ``switch_prob``, ``mode``.
        auto_augment, reprob, color_jitter: the ImageFolder pipeline (timm ``create_transform``'s
            ``auto_augment``, ``re_prob``, ``color_jitter``; ``None`` / 0: off).
        distill_weight: weight of the distillation from the unreduced model (DynamicViT / dTPS: logits
            and final tokens; other methods: logits only); ``None``: the method's own default.
        ratio_weight: weight of the method's budget loss (DynamicViT / dTPS keep-ratio loss, LTMP's
            GMACs term); ``None``: the method's own default.
        aux_weight: weight of Cropr's auxiliary-head losses; ``None``: 1.
        keep_rate_hold_epochs: epochs at keep rate 1 before the reduction starts (EViT).
        keep_rate_shrink_epochs: epochs of cosine decay of the keep rate from 1 to the target after
            the hold (EViT's from-scratch schedule; 0: a step to the target).
        notes: values the official code does not publish, and what was chosen.
    """

    name: str = _required(_text)
    paper: str = _required(_text)
    source: str = _required(_text)
    epochs: int = _required(int_at_least(1))
    batch_size: int = _required(int_at_least(1))
    lr: float = _required(POSITIVE)
    lr_batch: int | None = _required(optional(int_at_least(1)))
    min_lr: float = _required(NONNEGATIVE)
    warmup_epochs: float = _required(NONNEGATIVE)
    optimizer: str = _default("adamw", _optimizer)
    momentum: float = _default(0.9, UNIT_OPEN)
    weight_decay: float = _default(0.05, NONNEGATIVE)
    filter_bias_and_bn: bool = _default(True, boolean)
    layer_decay: float | None = _default(None, optional(_number(0.0, 1.0, low_open=True)))
    backbone_lr_scale: float = _default(1.0, NONNEGATIVE)
    clip_grad: float | None = _default(None, optional(POSITIVE))
    ema_decay: float | None = _default(None, optional(_number(0.0, 1.0, low_open=True, high_open=True)))
    drop_path: float = _default(0.0, UNIT_OPEN)
    drop_path_last_block: bool = _default(True, boolean)
    train_mode: bool = _default(True, boolean)
    label_smoothing: float = _default(0.1, UNIT_OPEN)
    mixup: float = _default(0.8, NONNEGATIVE)
    cutmix: float = _default(1.0, NONNEGATIVE)
    mixup_prob: float = _default(1.0, UNIT)
    mixup_switch_prob: float = _default(0.5, UNIT)
    mixup_mode: str = _default("batch", one_of("batch", "pair", "elem"))
    auto_augment: str | None = _default(DEIT_AUGMENT, optional(_text))
    reprob: float = _default(0.25, UNIT)
    color_jitter: float | None = _default(0.4, optional(NONNEGATIVE))
    distill_weight: float | None = _default(None, optional(NONNEGATIVE))
    ratio_weight: float | None = _default(None, optional(NONNEGATIVE))
    aux_weight: float | None = _default(None, optional(NONNEGATIVE))
    keep_rate_hold_epochs: float = _default(0.0, NONNEGATIVE)
    keep_rate_shrink_epochs: float = _default(0.0, NONNEGATIVE)
    notes: tuple[str, ...] = _default((), _notes)

    def __post_init__(self) -> None:
        super().__post_init__()  # every field's validator
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs:g}) exceeds epochs ({self.epochs}); override "
                             "warmup_epochs too, or shorten the epochs with epoch_steps instead")

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup or cutmix on; the loss then takes soft targets)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    def peak_lr(self, global_batch: int) -> float:
        """The peak learning rate at ``global_batch`` images per step (linearly scaled when ``lr_batch`` is set)."""
        return self.lr if self.lr_batch is None else self.lr * global_batch / self.lr_batch

    def to_dict(self) -> dict[str, Any]:
        """The values, JSON-friendly (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def summary(self, global_batch: int | None = None) -> str:
        """One line: the schedule, the optimiser and the regularisation."""
        batch = self.batch_size if global_batch is None else global_batch
        scaling = f" per {self.lr_batch} images" if self.lr_batch else ""
        parts = [
            f"recipe {self.name}: {self.epochs} epochs at batch {batch}",
            f"{self.optimizer} lr {self.lr:g}{scaling} (peak {self.peak_lr(batch):.3g}), "
            f"{self.warmup_epochs:g} warm-up epochs, cosine to {self.min_lr:g}",
            f"weight decay {self.weight_decay:g}",
        ]
        if self.layer_decay is not None:
            parts.append(f"layer decay {self.layer_decay:g}")
        if self.backbone_lr_scale != 1.0:
            parts.append(f"backbone lr x{self.backbone_lr_scale:g}")
        parts.append(f"drop path {self.drop_path:g}" + ("" if self.train_mode else " (eval mode: off)"))
        parts.append(f"smoothing {self.label_smoothing:g}, mixup {self.mixup:g}, cutmix {self.cutmix:g}")
        parts.append("no clipping" if self.clip_grad is None else f"clip {self.clip_grad:g}")
        if self.ema_decay is not None:
            parts.append(f"EMA {self.ema_decay:g}")
        if self.keep_rate_hold_epochs or self.keep_rate_shrink_epochs:
            parts.append(f"keep rate 1 for {self.keep_rate_hold_epochs:g} epochs, then over "
                         f"{self.keep_rate_shrink_epochs:g} to the target")
        return "; ".join(parts)


def keep_rate_at(step: int, steps_per_epoch: int, target: float, hold_epochs: float, shrink_epochs: float) -> float:
    """EViT's keep-rate warm-up at optimiser ``step`` (0-based).

    Keep rate 1 for the first ``hold_epochs`` epochs; then a cosine from 1 down to ``target``
    over ``shrink_epochs`` epochs, advanced every step; ``target`` afterwards (at once when
    ``shrink_epochs`` is 0).
    """
    hold = round(hold_epochs * steps_per_epoch)
    shrink = round(shrink_epochs * steps_per_epoch)
    if step < hold:
        return 1.0
    if step >= hold + shrink:
        return target
    progress = (step - hold) / shrink
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * progress))


_DEIT_FAMILY = dict(optimizer="adamw", label_smoothing=0.1, mixup=0.8, cutmix=1.0, auto_augment=DEIT_AUGMENT,
                    reprob=0.25)

RECIPES: dict[str, Recipe] = {}
"""The recipes by name."""


def register(recipe: Recipe) -> Recipe:
    """Add ``recipe`` to :data:`RECIPES` (refusing a second one of the same name)."""
    if recipe.name in RECIPES or recipe.name == "paper":
        raise ValueError(f"a recipe named {recipe.name!r} exists already")
    RECIPES[recipe.name] = recipe
    return recipe


register(Recipe(
    name="deit", paper="DeiT (Touvron et al., ICML 2021), fine-tuning",
    source="facebookresearch/deit README_deit.md (the 30-epoch fine-tune command) and main.py defaults",
    epochs=30, batch_size=512, lr=5e-6, lr_batch=512, min_lr=5e-6, warmup_epochs=5, weight_decay=1e-8,
    ema_decay=0.99996, drop_path=0.1, train_mode=False, color_jitter=0.4, **_DEIT_FAMILY,
    notes=("DeiT's fine-tuning command (224 -> 384 px) is the generic recipe: constant rate after the warm-up "
           "(min-lr = lr), model kept in eval mode as DeiT's main.py does for --finetune",
           "repeated augmentation (RASampler) is not reproduced"),
))

register(Recipe(
    name="evit", paper="EViT (Liang et al., ICLR 2022)",
    source="youweiliang/evit finetune.sh, main.py, engine.py, helpers.py",
    epochs=30, batch_size=1024, lr=2e-5, lr_batch=512, min_lr=2e-6, warmup_epochs=0, weight_decay=1e-6,
    ema_decay=0.99996, drop_path=0.1, train_mode=False, color_jitter=0.4, keep_rate_hold_epochs=10,
    keep_rate_shrink_epochs=0, **_DEIT_FAMILY,
    notes=("finetune.sh sets shrink_epochs 0 and leaves shrink_start_epoch at 10: keep rate 1 for 10 epochs, "
           "then the target; the from-scratch script decays it by a cosine over 100 epochs "
           "(keep_rate_shrink_epochs=100 of 300 epochs)",
           "the model stays in eval mode during the fine-tune (DeiT's main.py), so drop path never acts",
           "repeated augmentation (RASampler) is not reproduced"),
))

register(dataclasses.replace(  # BAT's logs show EViT's fine-tune: EViT's recipe under BAT's name
    RECIPES["evit"],
    name="bat", paper="BAT, Beyond Attentive Tokens (Long et al., CVPR 2023)",
    source="BWLONG/BeyondAttentiveTokens log/Ours-0.2..0.6.log (no training code is published)",
    notes=("the logs show EViT's fine-tune (1251 steps per epoch = batch 1024, lr 4e-5 without warm-up, cosine "
           "to 2e-6 over 30 epochs); everything else is EViT's script, assumed, keep-rate hold included",),
))

register(Recipe(
    name="tome", paper="ToMe (Bolya et al., ICLR 2023), trained with ToMe on MAE models",
    source="facebookresearch/ToMe README (fine-tunes with the MAE codebase); facebookresearch/mae FINETUNE.md "
    "(ViT-B) and main_finetune.py defaults",
    epochs=100, batch_size=1024, lr=5e-4, lr_batch=256, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
    layer_decay=0.65, drop_path=0.1, color_jitter=None, **_DEIT_FAMILY,
    notes=("MAE's ViT-B fine-tune; ViT-L/H use 50 epochs, lr 1e-3 per 256, layer decay 0.75, drop path 0.2/0.3",
           "ToMe trains MAE models without proportional attention: pass prop_attn=False for them"),
))

register(Recipe(
    name="ppt", paper="PPT (Wu et al., 2023)",
    source="xjwu1024/PPT README (fine-tune command); its main.py is DeiT's, whose defaults are assumed",
    epochs=30, batch_size=1024, lr=1e-5, lr_batch=512, min_lr=1e-5, warmup_epochs=5, weight_decay=0.05,
    ema_decay=0.99996, drop_path=0.1, train_mode=True, color_jitter=0.4, **_DEIT_FAMILY,
    notes=("the README gives 30 epochs, 4 x 256 images, lr 1e-5 (DeiT's scaling per 512) and threshold 6e-5; "
           "the rest are DeiT main.py defaults (PPT's training script is not in the stored repository)",
           "the command starts with --resume, not --finetune, so the model trains in training mode",
           "PPT's fine-tuned threshold is 6e-5 (pass threshold=6e-5)",
           "repeated augmentation (RASampler) is not reproduced"),
))

register(Recipe(
    name="tps", paper="TPS, eTPS variant (Wei et al., CVPR 2023)",
    source="megvii-research/TPS-CVPR2023 torch_codebase/scripts/deit/dtps_deit_s_30e.sh, config.py (no eTPS "
    "script is published)",
    epochs=30, batch_size=1024, lr=2.5e-4, lr_batch=1024, min_lr=1e-5, warmup_epochs=5, weight_decay=0.05,
    ema_decay=0.99996, drop_path=0.0, color_jitter=0.3, **_DEIT_FAMILY,
    notes=("eTPS's training is not published: the PyTorch dTPS script's optimisation and augmentation are used, "
           "and like it (backbone_freeze_epochs -1) every parameter trains at the base rate",
           "no distillation (the DeiT-S dTPS script distils; set distill_weight for a logit distillation)",
           "repeated augmentation (RASampler) is not reproduced"),
))

register(Recipe(
    name="dtps", paper="TPS, dTPS variant (Wei et al., CVPR 2023)",
    source="megvii-research/TPS-CVPR2023 megengine_codebase/scripts/finetune_dtps_deit_s.sh, train.py, utils.py",
    epochs=30, batch_size=1024, lr=2.5e-4, lr_batch=1024, min_lr=1e-5, warmup_epochs=5, weight_decay=0.05,
    filter_bias_and_bn=False, backbone_lr_scale=0.01, drop_path=0.0, color_jitter=0.3, ratio_weight=2.0,
    distill_weight=0.5, **_DEIT_FAMILY,
    notes=("the MegEngine scripts use 128 x 8 images at 2.5e-4 and 64 x 8 at 1.25e-4: linear scaling per 1024",
           "weight decay on every parameter (MegEngine's get_param_groups)",
           "the PyTorch port trains every parameter at the base rate (backbone_freeze_epochs -1 disables the "
           "scale); the MegEngine scale 0.01 is used here",
           "DeiT-T trains without distillation (distill_weight=0)",
           "the warm-up starts at 0, not the scripts' 1e-6",
           "repeated augmentation (RASampler) is not reproduced"),
))

register(Recipe(
    name="dynamicvit", paper="DynamicViT (Rao et al., NeurIPS 2021)",
    source="raoyongming/DynamicViT README (DeiT-S command), main.py, optim_factory.py, utils.py, losses.py",
    epochs=30, batch_size=1024, lr=1e-3, lr_batch=None, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
    backbone_lr_scale=0.01, ema_decay=0.9999, drop_path=0.0, color_jitter=0.4, ratio_weight=2.0,
    distill_weight=0.5, **_DEIT_FAMILY,
    notes=("DeiT-S values; DeiT-B uses ratio_weight=5 and drop_path=0.2",
           "main.py does not scale the rate with the batch (8 x 128 images at 1e-3)"),
))

register(Recipe(
    name="cropr", paper="Token Cropr (Bergner et al., CVPR 2025)",
    source="benbergner/cropr cls/main.py, cls/utils.py, cls/engine.py, cls/vision_transformer.py, "
    "cls/CLASSIFICATION.md",
    epochs=50, batch_size=1024, lr=1e-3, lr_batch=256, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
    layer_decay=0.75, drop_path=0.2, drop_path_last_block=False, color_jitter=None, aux_weight=1.0,
    **_DEIT_FAMILY,
    notes=("ViT-L values (512 x 2 accumulated images); the Cropr modules train at the top layer's rate (scale 1)",
           "no DeiT-size recipe is published"),
))

register(Recipe(
    name="ltmp", paper="LTMP (Bonnaerens & Dambre, TMLR 2023)",
    source="Mxbonn/ltmp tools/train.py (timm's train.py) and the README reproduction command",
    epochs=1, batch_size=128, lr=5e-3, lr_batch=None, min_lr=5e-3, warmup_epochs=0, optimizer="momentum",
    momentum=0.0, weight_decay=0.0, backbone_lr_scale=1e-3, drop_path=0.0, label_smoothing=0.1, mixup=0.0,
    cutmix=0.0, auto_augment=None, reprob=0.0, color_jitter=0.4, ratio_weight=10.0,
    notes=("the thresholds train at 5e-3 (merge) and 5e-6 (prune), constant over the one epoch; norms stay frozen",
           "the backbone's rate (the script's optional third --lr) is not published: 1e-3 x 5e-3 is used"),
))


def recipe_names() -> list[str]:
    """Names of the registered recipes, sorted."""
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe registered under ``name``.

    Raises:
        ValueError: unknown name; the message lists the recipes.
    """
    if not isinstance(name, str) or name.lower() not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(recipe_names())}, or 'paper' "
                         "(the method's own)")
    return RECIPES[name.lower()]


def recipe_fields() -> list[str]:
    """The names of the values a recipe sets (what overrides may name)."""
    return [f.name for f in dataclasses.fields(Recipe) if f.name not in ("name", "paper", "source")]


def resolve_recipe(recipe: str | Recipe, method: Any = None, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """The recipe to train with: ``recipe`` (a name, ``"paper"``, or a :class:`Recipe`) with ``overrides``.

    Args:
        recipe: a registered name, ``"paper"`` for ``method``'s own (its reducer class's
            ``recipe`` attribute), or a :class:`Recipe`.
        method: the method's reducer class (needed for ``"paper"``).
        overrides: values replacing the recipe's (:func:`recipe_fields` names).

    Raises:
        TypeError: an override names no recipe value (the message lists them).
        ValueError: unknown recipe, or a value out of range.
    """
    if isinstance(recipe, str) and recipe.lower() == "paper":
        if method is None:
            raise ValueError("recipe 'paper' needs the method whose paper's recipe it is")
        recipe = method.recipe
    base = recipe if isinstance(recipe, Recipe) else get_recipe(recipe)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(recipe_fields()))
    if unknown:
        raise TypeError(f"unknown recipe value(s) {', '.join(unknown)}; a recipe sets: {', '.join(recipe_fields())}")
    if "optimizer" in overrides:
        from timm.optim import list_optimizers

        if str(overrides["optimizer"]).lower() not in list_optimizers():
            raise ValueError(f"recipe {base.name}: optimizer must be a timm optimizer name "
                             f"(timm.optim.list_optimizers()), got {overrides['optimizer']!r}")
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as err:
        raise ValueError(f"recipe {base.name}: {err}") from None
