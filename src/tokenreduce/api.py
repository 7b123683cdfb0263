"""The public API.

* :func:`apply` / :func:`remove` / :func:`unreduced`: reduce a model in place, undo it, or pause it;
* :func:`methods`, :func:`gmacs`: what is available and what it costs;
* introspection of a reduced model: :func:`is_reduced`, :func:`reducer` (the applied
  reducer: ``.name``, ``.config()``, ``.info``, ``.module`` — the learned parameters),
  :func:`last_forward` (the record of the last forward) and :func:`stats` (its summary).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from .checkpoint import check_compatible, load_into, read_reducer
from .methods import available_methods, get_method
from .methods.base import Reducer
from .models import adapter_for, context_of, is_patched, patch, unpatch
from .stats import LastForward, ReductionStats, collect_stats

M = TypeVar("M", bound=nn.Module)

RESTORE_MODES = ("frozen", "fusion")
"""The values of :func:`apply`'s ``restore`` besides ``None``."""


def methods() -> list[str]:
    """Names of the available methods."""
    return available_methods()


def apply(
    model: M,
    method: str,
    *,
    budget: float | None = None,
    checkpoint: str | Path | None = None,
    trace_source: bool = False,
    untrained: bool = False,
    restore: str | None = None,
    **params: Any,
) -> M:
    """Make ``model`` reduce its tokens with ``method``, in place.

    Args:
        model: a live timm ``VisionTransformer`` (weights are not copied; its
            ``state_dict()`` is unchanged).
        method: one of :func:`methods`.
        budget: fraction of the unreduced GMACs to keep; resolves the method's main
            knob (e.g. ToMe's ``r``) to the closest schedule that does not exceed it.
        checkpoint: a learned method's trained parameters (safetensors written by
            training); its saved parameters are the defaults, ``params`` override them.
            A training-free method's checkpoint (written by a fine-tune) holds its
            parameters only.
        trace_source: track which original patches every token stands for
            (needed for token maps; costs B×N×N memory).
        untrained: allow a learned method without ``checkpoint``: its parameters
            are freshly initialised (to be trained, e.g. by :func:`tokenreduce.train`).
        restore: give the full token grid back (dense prediction; docs/methods.md#token-restoration):

            * ``None`` (default): no restoration, today's classification behaviour, at no cost;
            * ``"frozen"``: after the last block the tokens are restored to B×N0×C in the original
              order (prefix tokens first, as the stock model orders them), so ``forward_features``
              returns B×N0×C and the final norm and head see the full grid.  A patch merged, pooled,
              squeezed or clustered into a token gets that token's final feature; a pruned patch gets
              its own feature frozen at the block that pruned it;
            * ``"fusion"``: last-layer fusion (Token Cropr's) for any pruning method: the pruned tokens
              rejoin, frozen as they were when pruned (with their own sizes and rotary positions),
              before the last block, which runs on them; then the original order is restored as with
              ``"frozen"``.

            With either mode timm's ``forward_intermediates`` / ``get_intermediate_layers`` return the
            restored grid at every requested block (without it they refuse).  The choice is recorded
            as ``tokenreduce.reducer(model).restore``.  The GMACs of ``budget`` are those of the
            reduced schedule; ``"fusion"`` adds its last block's rejoined tokens (counted by
            :func:`tokenreduce.stats`).
        **params: the method's parameters under their official names
            (``r``, ``keep_rate``, ``layers``, ...); defaults are the papers'.

    Returns:
        ``model`` itself.  Applying again replaces the previous method.

    A learned method's parameters (``tokenreduce.reducer(model).module``) are put on the
    model's device and floating-point dtype, and then follow the model as a submodule's
    would (``model.to(...)``, ``.half()``, ``.bfloat16()``, ``.cuda()``, ``.cpu()``).  They are
    not the model's: ``model.parameters()`` and ``model.state_dict()`` stay the stock
    model's; train and save them through ``tokenreduce.reducer(model).module``.

    Raises:
        ValueError: unknown method, bad parameter value, unreachable budget, a
            learned method with neither ``checkpoint`` nor ``untrained=True``, or an
            unknown ``restore`` mode.
        TypeError: unknown parameter name or unsupported model.
    """
    if restore is not None and restore not in RESTORE_MODES:
        raise ValueError(f"restore must be None or one of {', '.join(map(repr, RESTORE_MODES))}, got {restore!r}")
    cls, params = get_method(method).resolve(params)
    if is_patched(model):
        unpatch(model)
    adapter = adapter_for(model)
    grid_reason = adapter.grid_reason(model)
    if grid_reason is not None and restore is None and not cls.keeps_grid:
        raise ValueError(f"{type(model).__name__} can only be reduced with the full token grid restored "
                         f"({grid_reason}): pass restore='frozen' (or 'fusion')")
    info = adapter.model_info(model)
    if checkpoint is not None:
        meta, tensors = read_reducer(checkpoint)
        check_compatible(meta, cls.name, info, checkpoint)
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
        if budget is not None:  # the budget re-resolves the knob the checkpoint was trained with
            saved.pop(cls.knob, None)
        reducer = cls.create(info, budget=budget, **{**saved, **params})
        if reducer.module is not None:
            load_into(reducer, meta, tensors, checkpoint)
        elif tensors:
            raise ValueError(f"{cls.name} {reducer.config()} has no learned parameters to load from a checkpoint")
        # else: a training-free method's record (e.g. of a fine-tuned backbone): its parameters only
    else:
        reducer = cls.create(info, budget=budget, **params)  # validates the parameters first
        if cls.learned and not untrained:
            raise ValueError(
                f"{cls.name} is a learned method: pass checkpoint=PATH with its trained parameters, or "
                "untrained=True to start from freshly initialised ones (e.g. to train them); untrained, its output "
                "is not meaningful"
            )
    if reducer.module is not None:  # from here on the module follows the model's .to() / .half() / .cuda()
        first = next(model.parameters())
        reducer.module.to(device=first.device, dtype=first.dtype)
    reducer.restore = restore
    patch(model, adapter, reducer, cls.name, trace_source=trace_source)
    return model


def remove(model: M) -> M:
    """Give ``model`` back its stock forward (bit-identical outputs).  Idempotent."""
    unpatch(model)
    return model


@contextmanager
def unreduced(model: M) -> Iterator[M]:
    """Temporarily run a reduced model's stock forward (e.g. as its own distillation teacher).

    ``tr.stats`` keeps describing the last *reduced* forward.
    """
    if not is_patched(model):
        yield model
        return
    ctx = context_of(model)
    previous, ctx.enabled = ctx.enabled, False
    try:
        yield model
    finally:
        ctx.enabled = previous


def is_reduced(model: nn.Module) -> bool:
    """Whether a method is applied to ``model``."""
    return is_patched(model)


def reducer(model: nn.Module) -> Reducer:
    """The reducer applied to ``model``: ``.name``, ``.config()`` (resolved parameters), ``.info``
    (the model facts it uses), ``.schedule(n)``, ``.restore`` (the ``restore=`` it was applied with) and,
    for learned methods, ``.module`` (the parameters, which move with the model's dtype and device but
    are not among ``model.parameters()``).

    Raises:
        RuntimeError: no method is applied to ``model``.
    """
    return context_of(model).reducer


def last_forward(model: nn.Module) -> LastForward:
    """The record of the last forward of a reduced model: tokens per block, final sizes, sources,
    mask and (with ``trace_source=True``) the source map after every reduction.

    Raises:
        RuntimeError: no method is applied, or the reduced model has not run a forward yet.
    """
    return context_of(model).last_forward()


def stats(model: nn.Module) -> ReductionStats:
    """Tokens per block and GMACs per image of the last forward of a reduced model.

    Raises:
        RuntimeError: no method is applied, or the reduced model has not run a forward yet.
    """
    ctx = context_of(model)
    return collect_stats(ctx.reducer, ctx.last_forward())


def gmacs(model: nn.Module, method: str | None = None, *, num_tokens: int | None = None, **params: Any) -> float:
    """Analytic GMACs per image of ``model`` under ``method`` (``None``: unreduced), without running it.

    Args:
        num_tokens: tokens entering the first block (default: the model's own image size).
    """
    info = adapter_for(model).model_info(model)
    n = info.num_tokens if num_tokens is None else num_tokens
    if method is None:
        return info.unreduced_macs(n) / 1e9
    reducer = get_method(method).create(info, **params)
    return (info.cost.macs(reducer.schedule(n), n - info.num_prefix) + reducer.extra_macs(n)) / 1e9
