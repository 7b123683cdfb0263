"""Grad, autocast and tracing modes, entered only where they change something.

A ``with torch.no_grad()`` or ``with torch.autocast(..., enabled=False)`` that changes nothing
(grad already off, autocast not active) still becomes a region of its own in a graph captured by
``torch.export`` (ONNX export), which the exporter splits out and inlines again: on a ViT with a
reduction in every block that is most of the export's time.  :func:`no_grad` and :func:`fp32`
enter the mode only when it is not already in force; in eager mode they behave exactly as the
plain context managers.  :func:`cached_constants` keeps small constant index tensors per shape and
inference mode (inference tensors cannot enter autograd).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch

__all__ = ["cached_constants", "fp32", "no_grad", "tracing"]

T = TypeVar("T")


def tracing() -> bool:
    """Whether a graph is being captured (``torch.compile``, ``torch.export``, ONNX export, ``torch.jit``).

    A captured graph must not depend on the example's batch size, so shape-dependent fast paths
    (chosen per call in eager mode) take their general form while tracing.
    """
    return torch.compiler.is_compiling() or _onnx_exporting() or torch.jit.is_tracing()


# What torch.onnx.is_in_onnx_export reads (torch 2.12 to 2.14): two flags, in modules it imports on every call.
_ONNX_EXPORT_NAMES = ("torch.onnx._internal.exporter", "_flags", "torch.onnx._internal.torchscript_exporter._globals",
                      "GLOBALS", "in_onnx_export", "_is_onnx_exporting")


def _onnx_export_check() -> Callable[[], bool]:
    """``torch.onnx.is_in_onnx_export``, or where it reads just its two flags (its code names exactly
    :data:`_ONNX_EXPORT_NAMES`), a function that reads them without its two imports per call: 0.1 µs
    instead of 1.5, in a check that runs twice per block."""
    public = torch.onnx.is_in_onnx_export
    if getattr(getattr(public, "__code__", None), "co_names", None) != _ONNX_EXPORT_NAMES:
        return public
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return public
    return lambda: bool(GLOBALS.in_onnx_export or _flags._is_onnx_exporting)


_onnx_check: Callable[[], bool] | None = None


def _onnx_exporting() -> bool:
    """Whether an ONNX export is running (:func:`_onnx_export_check`, chosen on first use)."""
    global _onnx_check
    if _onnx_check is None:
        _onnx_check = _onnx_export_check()
    return _onnx_check()


def no_grad() -> AbstractContextManager:
    """``torch.no_grad()`` where autograd is on; nothing where it is already off."""
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


def fp32(device_type: str) -> AbstractContextManager:
    """Autocast off on ``device_type`` (float32 arithmetic) where it is on; nothing where it is not."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def cached_constants(cache: dict[Any, T], key: Hashable, build: Callable[[], T], limit: int) -> T:
    """``build()``'s constant tensors, kept in ``cache`` under ``key`` and the inference mode (at batch 1
    every saved small op counts); the cache starts over past ``limit`` entries (e.g. many batch sizes).
    Callers build fresh instead while a graph is captured."""
    full_key = (key, torch.is_inference_mode_enabled())
    cached = cache.get(full_key)
    if cached is None:
        if len(cache) > limit:
            cache.clear()
        cached = cache[full_key] = build()
    return cached
