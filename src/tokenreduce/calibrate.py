"""Data-driven thresholds for threshold-based methods (today: PPT's pool/prune variance threshold).

PPT's threshold τ compares the variance of an image's normalised importance
scores, which scales roughly like ``1/(N−P)²`` and differs between layers and
models; the official ``7e-5`` is for off-the-shelf DeiT-S at 197 tokens only.
:func:`calibrate` measures the variances on images the user supplies and picks
τ as a quantile, so that a chosen fraction of images is pooled.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .api import apply, is_reduced, reducer
from .models import context_of

Images = Tensor | Iterable[Any]


def calibrate(
    model: nn.Module,
    method: str,
    images: Images,
    *,
    pool_fraction: float = 0.5,
    batch_size: int = 64,
    per_layer: bool = True,
    trace_source: bool | None = None,
    **params: Any,
) -> float | tuple[float, ...]:
    """Choose PPT's variance threshold from data and apply PPT with it.

    Exact behaviour:

    1. The PPT parameters are ``params`` (``r``, ``layers``, ``prop_attn`` or
       ``budget``); when ``params`` is empty and PPT is already applied to
       ``model``, its current parameters are reused.  ``threshold`` itself may not
       be passed.  Whatever method was applied is replaced.
    2. The model runs in eval mode under ``torch.no_grad()`` (its training flag is
       restored afterwards) on ``images``, in batches of ``batch_size``, on the
       device of its parameters.  At every reduction block the unbiased variance
       of each image's normalised importance scores is recorded — the quantity
       PPT compares with τ.
    3. ``per_layer=True`` (default): blocks are calibrated in order.  The threshold
       of a block is the ``pool_fraction`` quantile (linear interpolation) of its
       variances, measured with the thresholds already chosen for the earlier
       blocks in force (a block's variances depend on the earlier blocks'
       pool/prune decisions).  This costs one pass over ``images`` per reduction
       block, and then about ``pool_fraction`` of these images are pooled at
       *every* block.  Returns one threshold per reduction block (ascending block
       order).
       ``per_layer=False``: one pass; the single threshold is the quantile of the
       variances at the *first* reduction block (the paper's single-τ form).  Later
       blocks use the same value and may pool a different fraction.
    4. ``pool_fraction=0`` gives τ = 0 (nothing pooled), ``1`` gives τ = ∞
       (everything pooled).
    5. PPT is applied to ``model`` with the result as ``threshold`` (and
       ``trace_source`` as given, else as it was).

    Args:
        model: a timm ``VisionTransformer``.
        method: ``"ppt"`` (the only method with a calibrated threshold so far).
        images: a B×3×H×W tensor, or an iterable of batches (tensors, or
            ``(images, labels)`` pairs such as a ``DataLoader`` yields).  With
            ``per_layer=True`` and several reduction blocks the iterable is read
            several times, so it must be re-iterable (a list or ``DataLoader``, not a
            generator).
        pool_fraction: fraction of the calibration images to pool, in [0, 1].
        batch_size: batch size when ``images`` is a tensor.
        per_layer: one threshold per reduction block (see above) or a single one.
        trace_source: source tracing of the re-applied model (default: unchanged).
        **params: PPT parameters other than ``threshold``.

    Returns:
        The threshold: a tuple (``per_layer=True``) or a float.

    Raises:
        ValueError: another method, ``threshold`` in ``params``, ``pool_fraction``
            outside [0, 1], a bad ``batch_size`` or no images.
        TypeError: a one-shot iterator where several passes are needed.
    """
    if not isinstance(method, str) or method.lower() != "ppt":
        raise ValueError(f"calibrate: only 'ppt' has a calibrated threshold, got {method!r}")
    if "threshold" in params:
        raise ValueError("calibrate: threshold is what calibrate chooses; do not pass it")
    if isinstance(pool_fraction, bool) or not isinstance(pool_fraction, (int, float)) or not 0 <= pool_fraction <= 1:
        raise ValueError(f"calibrate: pool_fraction must be in [0, 1], got {pool_fraction!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"calibrate: batch_size must be an int >= 1, got {batch_size!r}")

    restore = None
    if is_reduced(model):
        if trace_source is None:
            trace_source = context_of(model).trace_source
        restore = reducer(model).restore  # the calibrated model gives the grid back as the applied one did
        if not params and reducer(model).name == "ppt":
            params = {k: v for k, v in reducer(model).config().items() if k != "threshold"}
            params["layers"] = tuple(params["layers"])
    trace_source = bool(trace_source)

    apply(model, "ppt", trace_source=False, threshold=0.0, **params)
    ppt = reducer(model)
    layers = ppt.layers
    params = {**{k: v for k, v in ppt.config().items() if k != "threshold"}, "layers": layers}

    passes = len(layers) if per_layer else 1
    if passes > 1 and not isinstance(images, Tensor) and iter(images) is images:
        raise TypeError("calibrate: images must be re-iterable (a tensor, list or DataLoader), not an iterator")

    chosen: list[float] = []
    for block in layers[:passes]:
        thresholds = tuple(chosen) + (0.0,) * (len(layers) - len(chosen))
        apply(model, "ppt", trace_source=False, **params, threshold=thresholds)
        variances = _record_variances(model, images, batch_size)[block]
        chosen.append(_quantile(variances, float(pool_fraction)))

    result: float | tuple[float, ...] = tuple(chosen) if per_layer else chosen[0]
    apply(model, "ppt", trace_source=trace_source, restore=restore, **params, threshold=result)
    return result


def _record_variances(model: nn.Module, images: Images, batch_size: int) -> dict[int, Tensor]:
    """Run ``model`` (with PPT applied) on ``images``; per reduction block the recorded variances."""
    ppt = reducer(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ppt.start_recording()
    seen = 0
    try:
        with torch.no_grad():
            for batch in _batches(images, batch_size):
                model(batch.to(device))
                seen += batch.shape[0]
    finally:
        recorded = ppt.stop_recording()
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibrate: no images given")
    return recorded


def _batches(images: Images, batch_size: int) -> Iterator[Tensor]:
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"calibrate: images must be B×3×H×W, got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    for batch in images:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(f"calibrate: batches must be tensors or (images, labels) pairs, got {type(batch).__name__}")
        yield batch


def _quantile(values: Tensor, q: float) -> float:
    """The ``q`` quantile of ``values``; 0 for q = 0 (pool nothing), ∞ for q = 1 (pool all)."""
    if q <= 0.0 or values.numel() == 0:
        return 0.0
    if q >= 1.0:
        return float("inf")
    return float(torch.quantile(values.double(), q))
