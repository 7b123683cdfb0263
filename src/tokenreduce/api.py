"""The public API: :func:`apply`, :func:`remove`, :func:`stats`, :func:`methods`, :func:`gmacs`."""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

from .methods import REGISTRY, get_method
from .models.timm_vit import check_supported, is_patched, model_info, patch, unpatch
from .stats import ReductionStats, collect_stats

M = TypeVar("M", bound=nn.Module)


def methods() -> list[str]:
    """Names of the available methods."""
    return sorted(REGISTRY)


def apply(
    model: M,
    method: str,
    *,
    budget: float | None = None,
    trace_source: bool = False,
    **params: Any,
) -> M:
    """Make ``model`` reduce its tokens with ``method``, in place.

    Args:
        model: a live timm ``VisionTransformer`` (weights are not copied; its
            ``state_dict()`` is unchanged).
        method: one of :func:`methods`.
        budget: fraction of the unreduced GMACs to keep; resolves the method's main
            knob (e.g. ToMe's ``r``) to the closest schedule that does not exceed it.
        trace_source: track which original patches every token stands for
            (needed for token maps; costs B×N×N memory).
        **params: the method's parameters under their official names
            (``r``, ``keep_rate``, ``layers``, ...); defaults are the papers'.

    Returns:
        ``model`` itself.  Applying again replaces the previous method.

    Raises:
        ValueError: unknown method, bad parameter value or unreachable budget.
        TypeError: unknown parameter name or unsupported model.
    """
    cls = get_method(method)
    if is_patched(model):
        unpatch(model)
    check_supported(model)
    reducer = cls.create(model_info(model), budget=budget, **params)
    patch(model, reducer, cls.name, trace_source=trace_source)
    return model


def remove(model: M) -> M:
    """Give ``model`` back its stock forward (bit-identical outputs).  Idempotent."""
    unpatch(model)
    return model


def stats(model: nn.Module) -> ReductionStats:
    """Tokens per block and GMACs per image of the last forward of a reduced model."""
    if not is_patched(model):
        raise RuntimeError("tokenreduce.stats: the model has no method applied (call tokenreduce.apply first)")
    return collect_stats(model._tr_ctx)


def gmacs(model: nn.Module, method: str | None = None, *, num_tokens: int | None = None, **params: Any) -> float:
    """Analytic GMACs per image of ``model`` under ``method`` (``None``: unreduced), without running it.

    Args:
        num_tokens: tokens entering the first block (default: the model's own image size).
    """
    check_supported(model)
    info = model_info(model)
    n = info.num_tokens if num_tokens is None else num_tokens
    if method is None:
        return info.unreduced_macs(n) / 1e9
    reducer = get_method(method).create(info, **params)
    return (info.cost.macs(reducer.schedule(n), n - info.num_prefix) + reducer.extra_macs(n)) / 1e9
