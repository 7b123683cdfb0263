"""ONNX export of a reduced (or stock) model, verified in ONNX Runtime before the file is kept.

>>> tr.apply(model, "tome", r=13)                                          # doctest: +SKIP
>>> tr.export_onnx(model, "deit_s_tome.onnx", (1, 3, 224, 224))           # doctest: +SKIP

The model is captured with ``torch.export`` (``torch.onnx.export(..., dynamo=True)``) with a
dynamic batch axis; the image size is fixed, so the token counts of every block are constants
of the graph for the methods with a fixed schedule (ToMe, EViT, random, eTPS, dTPS, BAT,
DynamicViT, Cropr at inference).  The two methods whose counts depend on the image keep their
PyTorch results in a static-shape form:

* **PPT** computes both candidate reductions (pooling and pruning, the same shape) for the whole
  batch and picks one per image with a select — what its PyTorch path already runs;
* **LTMP** runs its padded batched form with the padding at the full token count: every block
  keeps N rows, the live tokens first, and a live-token mask removes the dead ones from attention
  (−inf key bias) while the MLP runs on the live rows only (``NonZero`` + gather).  In PyTorch the
  batch is also cut to its longest image; a traced graph cannot cut to a data-dependent length.

While exporting, the code takes the paths a tracer can follow: the fused CPU merge kernel is not
used (a C++ extension cannot be traced), shape-dependent fast paths take their general form
(:func:`tokenreduce.ops.gather.tracing`), and two ATen ops without an ONNX translation get one
here (stable ``sort`` → ``TopK``, whose ties go to the lower index as a stable sort's do;
``cdist`` → the Gram-matrix form in float64, whose rounding error stays far below float32's).

Nothing is written that gives other results than the PyTorch model: the exported file is run in
ONNX Runtime on the example input and on a second batch size, and refused (deleted, with an
:class:`OnnxExportError`) if any output differs by more than ``atol``.

Needs the optional dependencies: ``pip install "tokenreduce[onnx]"`` (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "FIXED_SCHEDULE",
    "INSTALL_HINT",
    "OnnxExport",
    "OnnxExportError",
    "export_form",
    "export_onnx",
    "ort_session",
    "require_onnx",
    "run_onnx",
]

INSTALL_HINT = 'pip install "tokenreduce[onnx]"'

FIXED_SCHEDULE = ("bat", "cropr", "dtps", "dynamicvit", "evit", "random", "tome", "tomesd", "tps")
"""Methods whose token counts are fixed by the input size: their exported graphs have static token counts."""

_FORMS = {
    "ppt": "both branches (pool and prune) per block, one chosen per image by a select",
    "ltmp": "padded to the full token count with a live-token mask (counts depend on the image)",
}


_SLOW_TO_OPTIMIZE = frozenset({"ltmp"})
"""Methods whose graphs (a data-dependent row count per block) the exporter's optimiser takes minutes over."""


class OnnxExportError(RuntimeError):
    """The model could not be exported, or the exported model did not reproduce PyTorch's outputs."""


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        method: the applied method's name, or ``None`` for an unreduced model.
        form: how the method's reduction appears in the graph (see :func:`export_form`).
        input_shape: B×C×H×W of the traced example (the batch axis is dynamic when ``dynamic_batch``).
        dynamic_batch: whether the graph takes any batch size.
        max_abs_diff: per verified batch size, the largest ``|ONNX Runtime − PyTorch|`` over all outputs.
        provider: the ONNX Runtime execution provider that verified it.
    """

    path: Path
    method: str | None
    form: str
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    max_abs_diff: dict[int, float]
    provider: str


def export_form(method: str | None) -> str:
    """How ``method``'s reduction appears in an exported graph (one line, for reports)."""
    if method is None:
        return "unreduced"
    return _FORMS.get(method, "static token counts (fixed schedule)")


# -- optional dependencies ----------------------------------------------------------------------------


def require_onnx() -> Any:
    """``onnxruntime`` (and a check that ``onnx`` and ``onnxscript`` import), or an ``ImportError`` with the fix."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(f"ONNX export needs onnx, onnxruntime and onnxscript: {INSTALL_HINT} ({err})") from None
    return onnxruntime


def _translation_table() -> dict[Callable, Callable]:
    """ONNX translations of the ATen ops the exporter has none for (stable sort, cdist)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    def sort_stable(self: Any, *, stable: bool | None = None, dim: int = -1, descending: bool = False) -> Any:
        # ONNX TopK breaks ties by the lower index: a stable sort, ascending or descending.
        axis = dim % len(self.shape)
        n = op.Shape(self, start=axis, end=axis + 1)
        values, indices = op.TopK(self, n, axis=axis, largest=descending, sorted=True)
        return values, indices

    def cdist_forward(x1: Any, x2: Any, p: float, compute_mode: int | None = None) -> Any:
        # ‖a − b‖ from ‖a‖² + ‖b‖² − 2a·b in float64: close to PyTorch's direct float32 differences, without
        # the B×M×M×C intermediate the direct form would take in a graph.
        if p != 2.0:
            raise NotImplementedError(f"cdist with p={p}: only the Euclidean distance (p=2) is translated")
        rank = len(x1.shape)
        perm = [*range(rank - 2), rank - 1, rank - 2]
        a, b = op.Cast(x1, to=ir.DataType.DOUBLE), op.Cast(x2, to=ir.DataType.DOUBLE)
        last = op.Constant(value_ints=[-1])
        aa = op.ReduceSum(op.Mul(a, a), last, keepdims=1)  # …×M×1
        bb = op.Transpose(op.ReduceSum(op.Mul(b, b), last, keepdims=1), perm=perm)  # …×1×N
        ab = op.MatMul(a, op.Transpose(b, perm=perm))  # …×M×N
        two = op.Constant(value=ir.tensor(2.0, dtype=ir.DataType.DOUBLE))
        zero = op.Constant(value=ir.tensor(0.0, dtype=ir.DataType.DOUBLE))
        d2 = op.Max(op.Sub(op.Add(aa, bb), op.Mul(two, ab)), zero)
        return op.Cast(op.Sqrt(d2), to=x1.dtype)

    return {torch.ops.aten.sort.stable: sort_stable, torch.ops.aten._cdist_forward.default: cdist_forward}


# -- ONNX Runtime -------------------------------------------------------------------------------------


def ort_session(path: str | Path, provider: str = "CPUExecutionProvider", *, threads: int | None = None,
                profile: str | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``path`` on ``provider``.

    Args:
        threads: intra-op threads (default: ONNX Runtime's, one per core).
        profile: a file-name prefix: write ONNX Runtime's per-op profile (JSON) when the session ends.

    Raises:
        ValueError: ``provider`` is not available in this onnxruntime build.
    """
    ort = require_onnx()
    available = ort.get_available_providers()
    if provider not in available:
        raise ValueError(f"ONNX Runtime provider {provider!r} is not available here (available: "
                         f"{', '.join(available)}; CUDAExecutionProvider needs the onnxruntime-gpu package)")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only (not the optimiser's notes on nodes it cannot fold)
    if threads is not None:
        options.intra_op_num_threads = threads
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path), options, providers=[provider])


def run_onnx(session: Any, x: Tensor) -> list[Any]:
    """Run ``session`` on images ``x`` (B×C×H×W); returns its outputs (numpy arrays)."""
    return session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})


# -- export -------------------------------------------------------------------------------------------


def _example(model: nn.Module, input_shape: Sequence[int] | None, example: Tensor | None, seed: int) -> Tensor:
    """The example images: ``example``, or standard-normal images of ``input_shape`` (B×C×H×W or C×H×W; default
    the model's own input size at batch 2), on the model's device in its floating-point dtype."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    if example is not None:
        if example.dim() != 4:
            raise ValueError(f"example must be B×C×H×W images, got shape {tuple(example.shape)}")
        return example.to(device=device, dtype=dtype)
    if input_shape is None:
        from .models import adapter_for

        input_shape = (2, *adapter_for(model).input_size(model))
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (2, *shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be (B, C, H, W) or (C, H, W) with sizes >= 1, got {tuple(input_shape)}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _batch_axis(model: nn.Module) -> dict[str, Any]:
    """``dynamic_shapes`` for a dynamic batch axis on the images, keyed by the name of ``forward``'s first
    parameter (``x`` for timm, ``pixel_values`` for Hugging Face models, whose ``forward`` has more; ``*args``
    where a patched ``forward`` passes its arguments through)."""
    first = next(iter(inspect.signature(model.forward).parameters.values()))
    batch = {0: torch.export.Dim("batch", min=1)}
    return {first.name: (batch,) if first.kind is inspect.Parameter.VAR_POSITIONAL else batch}


def _leaves(out: Any) -> list[Tensor]:
    """The tensors of a model's output (a tensor, a tuple, a Hugging Face output), in order."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, Tensor)]


def _cause(err: BaseException) -> str:
    """The innermost cause of an exporter error, in one line."""
    while err.__cause__ is not None and err.__cause__ is not err:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:600]


def _max_diff(expected: list[Tensor], got: list[Any]) -> float:
    """Largest ``|got − expected|`` over all outputs (``inf`` on a shape mismatch or a NaN)."""
    import numpy as np

    if len(expected) != len(got):
        return float("inf")
    worst = 0.0
    for e, g in zip(expected, got, strict=True):
        e = e.detach().float().cpu().numpy()
        g = np.asarray(g, dtype=np.float32)
        if e.shape != g.shape:
            return float("inf")
        if e.size:
            diff = float(np.abs(e - g).max())
            if not diff == diff:  # NaN
                return float("inf")
            worst = max(worst, diff)
    return worst


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int] | None = None,
    *,
    example: Tensor | None = None,
    dynamic_batch: bool = True,
    check_batch_size: int | None = None,
    atol: float = 1e-4,
    opset: int | None = None,
    provider: str = "CPUExecutionProvider",
    seed: int = 0,
    optimize: bool | None = None,
) -> OnnxExport:
    """Export ``model`` (reduced by :func:`tokenreduce.apply`, or stock) to an ONNX file, verified in ONNX Runtime.

    Args:
        model: a model in eval mode (a timm ``VisionTransformer`` or another supported family).
        path: the ``.onnx`` file to write (weights over 2 GB go to a ``.data`` file beside it).
        input_shape: B×C×H×W (or C×H×W) of the example images; default: the model's input size, batch 2.
            The image size is fixed in the graph; the batch axis is dynamic unless ``dynamic_batch=False``.
        example: example images B×C×H×W to trace and verify with (real images are better than the default
            random ones: a near tie between two tokens' scores can tip either way at float32 rounding).
        dynamic_batch: export a dynamic batch axis (traced at batch ≥ 2: a batch of 1 is widened for the
            trace, and still verified at 1).
        check_batch_size: the second batch size verified (default 1, or 3 when the example has batch 1).
        atol: the largest ``|ONNX Runtime − PyTorch|`` accepted on any output (fp32 logits: 1e-4).
        opset: ONNX opset (default: the exporter's).
        provider: the ONNX Runtime execution provider that verifies the file.
        seed: seed of the random example images.
        optimize: run the exporter's graph optimiser (constant folding, rewrites; ONNX Runtime optimises the
            graph again when it loads it).  Default: on, except for LTMP, whose data-dependent shapes make
            the optimiser's pattern matching take minutes on a 12-block model.

    Returns:
        An :class:`OnnxExport` with the path, the form of the reduction and the measured differences.

    Raises:
        ValueError: the model is in training mode, or a bad argument.
        ImportError: onnx, onnxruntime or onnxscript is missing.
        OnnxExportError: the model could not be exported (the message says which method and why), or the
            exported model's outputs differ from PyTorch's by more than ``atol`` (nothing is written).
    """
    require_onnx()
    from .models import context_of, is_patched

    if model.training:
        raise ValueError(
            "export_onnx needs the model in eval mode (model.eval()): in training mode dropout and the learned "
            "methods' training forms (Gumbel sampling, soft masks) make every forward different"
        )
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    method = context_of(model).method if is_patched(model) and context_of(model).enabled else None
    label = f"the model reduced by {method}" if method else "the unreduced model"
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{target} is a folder; give a file name, e.g. {target / 'model.onnx'}")

    if optimize is None:
        optimize = method not in _SLOW_TO_OPTIMIZE
    x = _example(model, input_shape, example, seed)
    traced = x
    if dynamic_batch and x.shape[0] == 1:  # torch.export specialises a dimension of size 1
        traced = torch.cat([x, _example(model, (1, *x.shape[1:]), None, seed + 1)])
    second = check_batch_size if check_batch_size is not None else (1 if x.shape[0] > 1 else 3)
    checks = [x] if not dynamic_batch else [x, _example(model, (second, *x.shape[1:]), None, seed + 2)]

    with torch.no_grad():
        single = len(_leaves(model(traced))) == 1  # eager first: a model that does not run fails here
        try:
            program = torch.onnx.export(
                model,
                (traced,),
                dynamo=True,
                input_names=["images"],
                output_names=["logits"] if single else None,
                dynamic_shapes=_batch_axis(model) if dynamic_batch else None,
                opset_version=opset,
                custom_translation_table=_translation_table(),
                optimize=optimize,
                verbose=False,
            )
        except Exception as err:  # torch.export or the ONNX translation: report the root cause
            raise OnnxExportError(f"{label} could not be exported to ONNX: {_cause(err)}") from err
        # after the trace, so that the model's record of its last forward (tokenreduce.stats) is a real one
        expected = [_leaves(model(c)) for c in checks]

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tokenreduce-export-"))
    try:
        staged = staging / target.name
        program.save(staged)
        try:
            session = ort_session(staged, provider)
            diffs = {c.shape[0]: _max_diff(e, run_onnx(session, c)) for c, e in zip(checks, expected, strict=True)}
        except ValueError:  # the provider is not available here (the message says which are)
            raise
        except Exception as err:  # an operator ONNX Runtime lacks on this provider, a graph it rejects
            raise OnnxExportError(f"ONNX Runtime ({provider}) cannot run the export of {label}: {_cause(err)}; "
                                  "nothing was written") from err
        del session
        bad = {b: d for b, d in diffs.items() if not d <= atol}
        if bad:
            worst = ", ".join(f"{d:.3g} at batch {b}" for b, d in bad.items())
            raise OnnxExportError(
                f"the ONNX export of {label} does not reproduce PyTorch (max |ONNX Runtime − PyTorch| {worst} > "
                f"atol {atol:g}); nothing was written. A reduction decision tipped by float rounding (two tokens "
                f"with near-equal scores) does this: export with real images as example=, or raise atol"
            )
        for item in staging.iterdir():  # the model, and its external weights file if it has one
            os.replace(item, target.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return OnnxExport(
        path=target,
        method=method,
        form=export_form(method),
        input_shape=tuple(traced.shape),
        dynamic_batch=dynamic_batch,
        max_abs_diff=diffs,
        provider=provider,
    )
