"""Optional fused CPU kernels, compiled on first use.

At batch 1 on a CPU, a ToMe merge is ~30 small ATen ops whose fixed costs, not their
arithmetic, make up most of its time (each costs 10–25 µs once the block's GEMMs have
run, against 2–4 µs in a tight loop). The kernels each do one such step in one call and
give the same numbers as the Python path:

* ``csrc/bipartite_merge.cpp``: ToMe's matching and size-weighted merge
  (:func:`~tokenreduce.ops.matching.bipartite_soft_matching` + :func:`~tokenreduce.ops.merge.merge_wavg`);
* ``csrc/ltmp_merge_prune.cpp``: LTMP's inference step (the similarities from the keys, to rounding, then the
  threshold merge, threshold prune and compaction of the padded batch bit for bit; ``LTMP._reduce_hard``);
* ``csrc/bucketed_attention.cpp``: a padded batch's attention in length buckets with the lower bound on the
  attention every key receives (:func:`~tokenreduce.ops.attention.attend_bucketed`; LTMP at inference);
* ``csrc/dpc_knn.cpp``: BAT's DPC-kNN clustering (:func:`~tokenreduce.ops.cluster.dpc_knn`): the tokens'
  distances (to float rounding), the clusters they give and the cluster tokens (bit for bit);
* ``csrc/squeeze.cpp``: TPS's squeeze; ``csrc/window_groups.cpp``: the index maps of ToMe for SD's
  window matching (:func:`~tokenreduce.ops.unmerge.window_groups`); ``csrc/group_rows.cpp``: its merge
  into group means and its unmerge into the stream (:class:`~tokenreduce.ops.unmerge.TokenGroups`).

The extension is compiled with :func:`torch.utils.cpp_extension.load` the first time a
merge runs on the CPU in inference (about 30 s; cached in torch's extensions folder,
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). It needs a C++ compiler;
``ninja`` comes with the package. On Linux it is built with OpenMP, so each kernel splits a
batch's images across torch's intra-op threads (:func:`build_options`). The mode, from ``$TOKENREDUCE_CPU_KERNELS`` or
:func:`set_cpu_kernels`:

* ``"auto"`` (default): build and use the kernel; if the build fails, warn once and use
  the Python path.
* ``"on"``: as auto, but a failed build raises.
* ``"off"``: always the Python path.

The kernel is used only where it gives the same result as the Python path: CPU,
float32, no autograd through the hidden states, no source tracing or live-token mask,
and not while ``torch.compile``, ``torch.export``, ``torch.jit.trace`` or
``torch.jit.script`` trace the model (they get the Python path, which they can see
through).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from .modes import tracing

__all__ = ["cpu_kernels_mode", "load_cpu_kernels", "set_cpu_kernels", "fused_bipartite_merge", "fused_ltmp_merge_prune",
           "fused_bucketed_attention",
           "fused_squeeze", "fused_window_groups", "fused_group_mean", "fused_unmerge_add", "fused_token_distances",
           "fused_dpc_clusters", "fused_cluster_merge"]

ENV_VAR = "TOKENREDUCE_CPU_KERNELS"
MODES = ("auto", "on", "off")
EXTENSION_NAME = "tokenreduce_cpu_kernels"
SOURCES = tuple(Path(__file__).parent / "csrc" / name
                for name in ("module.cpp", "bipartite_merge.cpp", "ltmp_merge_prune.cpp", "bucketed_attention.cpp",
                             "squeeze.cpp", "window_groups.cpp", "group_rows.cpp", "dpc_knn.cpp"))
HEADERS = tuple(Path(__file__).parent / "csrc" / name for name in ("kernels.h", "rows.h"))
"""Headers the sources include (a change to one forces a rebuild: :func:`build_options`)."""

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_mode: str | None = None  # None: read the environment variable on first use
_module: ModuleType | None = None
_failure: str | None = None


def _check_mode(mode: str, origin: str) -> str:
    value = mode.strip().lower() if isinstance(mode, str) else mode
    if value not in MODES:
        raise ValueError(f"{origin} must be one of {', '.join(MODES)}; got {mode!r}")
    return value


def cpu_kernels_mode() -> str:
    """The current mode: ``"auto"``, ``"on"`` or ``"off"``."""
    global _mode
    if _mode is None:
        _mode = _check_mode(os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}")
    return _mode


def set_cpu_kernels(mode: str) -> None:
    """Choose whether merges on the CPU use the fused kernel: ``"auto"``, ``"on"`` or ``"off"``.

    Overrides ``$TOKENREDUCE_CPU_KERNELS`` for this process. ``"on"`` builds the kernel
    now (raising if that fails), so the cost of a first build is not paid in a timed
    forward.
    """
    global _mode, _failure
    _mode = _check_mode(mode, "cpu kernels mode")
    if _mode == "on":
        _failure = None  # a forced mode retries a build that failed under "auto"
        load_cpu_kernels()


def load_cpu_kernels() -> ModuleType | None:
    """The compiled extension, building it if needed; ``None`` when off or unavailable.

    Raises:
        RuntimeError: in mode ``"on"``, when the extension cannot be built.
    """
    global _module, _failure
    mode = cpu_kernels_mode()
    if mode == "off":
        return None
    if _module is None and _failure is None:
        with _lock:
            if _module is None and _failure is None:
                try:
                    _module = _build()
                except Exception as error:  # a compiler, header or ninja problem: fall back
                    _failure = f"{type(error).__name__}: {error}"
                    if mode == "auto":
                        warnings.warn(
                            "tokenreduce: could not build the fused CPU merge kernel, so merges use the "
                            f"(slower at small batches) PyTorch path. Set {ENV_VAR}=off to silence this. "
                            f"Cause: {_failure}",
                            RuntimeWarning,
                            stacklevel=2,
                        )
    if _module is None and mode == "on":
        raise RuntimeError(f"tokenreduce: the fused CPU merge kernel could not be built ({_failure})")
    return _module


def _build() -> ModuleType:
    """Compile (or load the cached build of) the sources in ``csrc/``."""
    # torch.utils.cpp_extension logs a CUDA warning at import on CPU-only machines; it does not apply.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)

    path = os.environ.get("PATH", "")
    try:  # the ninja wheel's binary, for an environment that is not activated
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
    except ImportError:
        pass
    try:
        name, cflags, ldflags = build_options(openmp=True)
        try:
            return _load(cpp_extension, name, cflags, ldflags)
        except Exception as error:  # no OpenMP for this compiler: the same kernels, on one thread
            if "-fopenmp" not in cflags:
                raise
            logger.warning("tokenreduce: building the CPU kernels with OpenMP failed (%s); building them for one "
                           "thread", error)
            return _load(cpp_extension, *build_options(openmp=False))
    finally:
        os.environ["PATH"] = path


STALE_LOCK_SECONDS = 600.0
"""Age past which an older torch's build lock is taken for one left by a killed build (a build takes ~30 s)."""


def clear_stale_build_lock(cpp_extension: ModuleType, name: str) -> bool:
    """Remove a build lock that a killed build left behind, where torch would wait on it forever.

    torch before its ``FileLock``-based builds marks a build in progress with a lock file whose mere
    existence makes every later process wait (``FileBaton``), so a build interrupted midway (Ctrl-C, a
    killed job) hangs every later import silently.  A lock older than :data:`STALE_LOCK_SECONDS` is
    removed with a warning.  Newer torch holds an advisory lock that dies with its holder; its lock
    file is left alone.

    Returns:
        Whether a lock was removed.
    """
    if not hasattr(cpp_extension, "FileBaton") or hasattr(cpp_extension, "FileLock"):
        return False
    try:  # a private helper of torch's
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except Exception:
        return False
    if age <= STALE_LOCK_SECONDS:
        return False
    logger.warning("tokenreduce: removing the build lock %s, left %.0f s ago by an interrupted build", lock, age)
    lock.unlink(missing_ok=True)
    return True


def _load(cpp_extension: ModuleType, name: str, cflags: list[str], ldflags: list[str]) -> ModuleType:
    clear_stale_build_lock(cpp_extension, name)
    _announce_first_build(cpp_extension, name)
    return cpp_extension.load(name=name, sources=[str(path) for path in SOURCES], extra_cflags=cflags,
                              extra_ldflags=ldflags)


def build_options(openmp: bool = True) -> tuple[str, list[str], list[str]]:
    """The extension's name, compiler flags and linker flags.

    With ``openmp`` on Linux the kernels are built with OpenMP (``-fopenmp``), so their
    ``at::parallel_for`` over the images of a batch runs on torch's intra-op threads: the
    process's one OpenMP runtime, the one torch loaded, with torch's thread count. Without it
    ``at::parallel_for`` compiles to a plain loop on the calling thread (the fallback where
    the compiler has no OpenMP, built under another name). Images are independent in every
    kernel, so the results do not depend on the thread count.

    No FMA contraction, so that ``x·s + y·t`` rounds as the PyTorch ops do. On x86-64
    Linux the kernel is built for the host CPU (``-march=native``: AVX2 where there is
    one, ~2× faster loops), under a name that carries a fingerprint of the CPU, so a
    build cached in a home folder shared by different machines is never loaded on a CPU
    it was not built for. The name also carries the torch version: a build links against
    one torch's ABI, and torch does not rebuild a cached one when torch is upgraded.
    """
    # torch rebuilds a cached extension when its sources or flags change, not its headers: the headers'
    # hash goes into a flag
    headers = hashlib.sha1(b"".join(path.read_bytes() for path in HEADERS)).hexdigest()[:12]
    flags = ["-O3", "-ffp-contract=off", f"-DTOKENREDUCE_HEADERS_{headers}"]
    name = f"{EXTENSION_NAME}_torch{re.sub(r'[^0-9A-Za-z]', '_', torch.__version__)}"
    ldflags: list[str] = []
    if sys.platform.startswith("linux"):
        if openmp:
            flags, ldflags = [*flags, "-fopenmp"], ["-fopenmp"]
        else:
            name = f"{name}_serial"
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):
        fingerprint = _cpu_fingerprint()
        if fingerprint is not None:
            return f"{name}_{fingerprint}", [*flags, "-march=native"], ldflags
    return name, flags, ldflags


def _cpu_fingerprint() -> str | None:
    """A short hash of the CPU's model and feature flags (Linux), or ``None`` if unreadable."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags") and key not in fields:
            fields[key] = value.strip()
    if "flags" not in fields:
        return None
    return hashlib.sha1(repr(sorted(fields.items())).encode()).hexdigest()[:12]


def _announce_first_build(cpp_extension: ModuleType, name: str) -> None:
    """Say so when no build is cached, since the first one takes about 30 s."""
    try:  # a private helper of torch's; the message is only a courtesy
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:
        return
    if not any(build_dir.glob(f"{name}*.so")):
        logger.warning("tokenreduce: compiling the fused CPU merge kernel (once, about 30 s) in %s", build_dir)


def kernel_eligible(x: Tensor, size: Tensor | None, packed: bool = False) -> bool:
    """Whether the fused kernel may replace the Python path for hidden states ``x`` (B×N×C, or ΣN×C when
    ``packed``): never while a graph is captured (``torch.compile``, TorchScript, ONNX export), which must
    hold its general form."""
    # the tensors' own flags first (``is_cpu``, not ``device.type``, which builds a device object), the modes last
    if not x.is_cpu or x.dtype != torch.float32 or x.dim() != (2 if packed else 3):
        return False
    if size is not None and (size.dtype != torch.float32 or not size.is_cpu):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (size is not None and size.requires_grad)):
        return False
    return not (tracing() or torch.jit.is_scripting())


def _kernels_for(x: Tensor, size: Tensor | None, packed: bool = False) -> ModuleType | None:
    """The built kernels when they may replace the Python path for ``x`` and ``size``
    (:func:`kernel_eligible`), else ``None`` (not eligible, off, or not built)."""
    return load_cpu_kernels() if kernel_eligible(x, size, packed) else None


def fused_bipartite_merge(
    x: Tensor, size: Tensor | None, metric: Tensor, r: int, num_prefix: int
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Bipartite soft matching + size-weighted merge in one kernel call.

    Args:
        x: B×N×C float32 hidden states; size: B×N×1 float32 sizes or ``None`` (all ones);
        metric: B×N×D matching features, or B×H×N×D per-head ones that the kernel averages over H as
            :func:`~tokenreduce.ops.gather.head_mean` does (cast to float32); r: merges per image, in
        ``[1, (N − num_prefix) // 2]``; num_prefix: protected leading tokens.

    Returns:
        ``(x, size, keep, remap)``, B×(N−r)×C, B×(N−r)×1, B×(N−r) int64 (the input position of
        every output token's own row: :meth:`~tokenreduce.ops.matching.BipartiteMatch.select`) and
        B×N int64 (the output row every input token ends up in, its destination's when merged away:
        :meth:`~tokenreduce.ops.matching.BipartiteMatch.remap`), or ``None`` when the kernel is not
        eligible or not available (the caller then takes the Python path).
    """
    module = _kernels_for(x, size)
    if module is None:
        return None
    if metric.dtype != torch.float32:
        metric = metric.float()
    if metric.requires_grad:
        metric = metric.detach()
    out_x, out_size, keep, remap = module.bipartite_merge_wavg(x, size, metric, r, num_prefix)
    return out_x, out_size, keep, remap


class LtmpStep(NamedTuple):
    """What :func:`fused_ltmp_merge_prune` returns.

    Attributes:
        x: B×M×C hidden states, or ΣM×C (the live tokens', image by image) when packed.
        size: B×M×1 sizes.
        mask: B×M×1 float live mask, ``None`` when every row is live.
        index: B×M int64 input position of every output row (``None`` unless asked for).
        counts: packed only (else ``None``): B int64 live tokens per image (each image's first ``counts[b]`` rows).
        rows: packed only (else ``None``): the ΣM rows of the live tokens in the B·M flattening.
        log_size: B×1×1×M float32 ``log size``, the proportional-attention bias
            (:func:`~tokenreduce.ops.attention.size_bias`; ``None`` unless asked for).
    """

    x: Tensor
    size: Tensor
    mask: Tensor | None
    index: Tensor | None
    counts: Tensor | None
    rows: Tensor | None
    log_size: Tensor | None


def fused_ltmp_merge_prune(
    x: Tensor, size: Tensor | None, sim: Tensor | None, importance: Tensor | None, mask: Tensor | None,
    theta_merge: float, theta_prune: float, num_prefix: int, multiple: int = 1, counts: Tensor | None = None,
    packed: bool = False, keys: Tensor | None = None, with_index: bool = True, with_log_size: bool = False,
) -> LtmpStep | None:
    """LTMP's inference step in one kernel call (``LTMP._reduce_hard``'s numbers).

    Args:
        x: B×N×C float32 hidden states, or with ``counts`` the ΣN×C live ones (image by image, each image's
        live tokens its first ``counts[b]`` positions); size: B×N×1 float32 sizes or ``None`` (all ones);
        sim: B×⌈N/2⌉×⌊N/2⌋ cosine similarities of the even (A) to the odd (B) positions, at most 1 (prefix
        and dead tokens are masked by the kernel), or ``None`` with ``keys``; importance: B×N attention received,
        or ``None`` where the block cannot prune (every importance +inf); mask: B×N×1 float32 live mask or
        ``None`` (all live); theta_merge, theta_prune: the block's thresholds; num_prefix: protected leading
        tokens; multiple: M is rounded up to a multiple of this (at most N); counts: B int64 live counts of a
        packed ``x``, or ``None``; packed: return the output's hidden states packed (required with ``counts``);
        keys: instead of ``sim``, the B×N×d keys or B×H×N×d per-head keys (compared as their mean over H,
        :func:`~tokenreduce.ops.gather.head_mean`): the kernel computes the similarities, to rounding
        those of ``LTMP._similarity`` (every step after them is bit for bit the Python path's); with_index,
        with_log_size: also return the input positions and the log sizes (each costs an allocation at batch 1).

    Returns:
        An :class:`LtmpStep`: M the largest live count in the batch rounded up to ``multiple``; or ``None``
        when the kernel is not eligible or not available (the caller then takes the Python path).
    """
    if (sim is None) == (keys is None):
        raise ValueError("fused_ltmp_merge_prune: pass either sim or keys")
    module = None if mask is not None and mask.dtype != torch.float32 else _kernels_for(x, size, counts is not None)
    if module is None:
        return None
    metric = sim if keys is None else keys
    metric = metric if metric.dtype == torch.float32 else metric.float()
    if importance is not None and importance.dtype != torch.float32:
        importance = importance.float()
    return LtmpStep(*module.ltmp_merge_prune(
        x, size, metric, importance, mask, float(theta_merge), float(theta_prune), num_prefix, int(multiple),
        counts, packed, keys is not None, with_index, with_log_size))


def fused_bucketed_attention(
    qkv: Tensor, packed: Tensor, live: Tensor, bias: Tensor | None, scale: float, log_floor: float | None,
    multiple: int, overhead: float, keys: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, list[int]] | None:
    """:func:`~tokenreduce.ops.attention.attend_bucketed`'s Python path in one kernel call: the bucket plan,
    the gathers, ATen's flash kernel per bucket, the received-attention bound (the exact values for an image it
    does not certify) and the head-mean keys.

    Args:
        qkv: ΣN×3×H×d float32 live rows; packed: their ΣN rows in the B·N flattening (increasing); live: B×N
        float32 live mask; bias: B×N float32 key bias (``log size``) or ``None``; scale: the logit scale;
        log_floor: an image is certified where every live key's log bound exceeds this (``None``: no received
        attention at all, for a caller that needs the output and the keys only); multiple, overhead:
        the bucket plan's (:func:`~tokenreduce.ops.buckets.bucket_layout`); keys: also the head-mean keys.

    Returns:
        ``(out, received, certified, keys, lengths)``: ΣN×(H·d), B×N float32 (0 at dead positions) or ``None``, B bool,
        B×N×d or ``None``, and the buckets' lengths; or ``None`` when the kernel is not eligible or not
        available (the caller then takes the Python path).
    """
    module = _kernels_for(qkv.reshape(qkv.shape[0], -1), None, packed=True) if qkv.dim() == 4 else None
    if module is None or live.dtype != torch.float32:
        return None
    out, received, certified, key_mean, lengths = module.bucketed_attention(
        qkv, packed, live, bias, float(scale), 0.0 if log_floor is None else float(log_floor), int(multiple),
        float(overhead), bool(keys), log_floor is not None)
    return (out, None if log_floor is None else received, certified, key_mean if keys else None,
            lengths.tolist())


def fused_squeeze(
    x: Tensor, size: Tensor | None, keep_index: Tensor, drop_index: Tensor, num_prefix: int, temperature: float,
) -> tuple[Tensor, Tensor] | None:
    """TPS's squeeze (:func:`~tokenreduce.ops.squeeze.squeeze_state` without restoration) in one kernel call.

    Args:
        x: B×N×C float32 hidden states; size: B×N×1 float32 sizes or ``None`` (all ones);
        keep_index: B×K and drop_index: B×M patch positions (counted after the prefix), disjoint, K ≥ 1;
        num_prefix: protected leading tokens; temperature: T > 0.

    Returns:
        ``(x, size)``: B×(P+K)×C and B×(P+K)×1, or ``None`` when the kernel is not eligible or not
        available (the caller then takes the Python path).
    """
    module = _kernels_for(x, size)
    if module is None:
        return None
    out_x, out_size = module.squeeze_tokens(x, size, keep_index.long(), drop_index.long(), num_prefix,
                                            float(temperature))
    return out_x, out_size


def fused_window_groups(
    scores: Tensor, norms: Tensor, src_pos: Tensor, dst_pos: Tensor, r: int, num_prefix: int, num_tokens: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """The group index maps of ToMe for SD's window matching (:func:`~tokenreduce.ops.unmerge.window_groups`
    after its similarity product) in one kernel call, equal to the Python path's.

    Args:
        scores: B×S×D float32 products of the sources with the unit destinations; norms: B×S float32 source
        norms; src_pos: S and dst_pos: D int64 stream positions; r: sources merged, in ``[0, S]``;
        num_prefix: leading tokens; num_tokens: N, the stream's length.

    Returns:
        ``(slot, rep, merged_pos, into, size)`` as in :class:`~tokenreduce.ops.unmerge.TokenGroups`, or
        ``None`` when the kernel is not eligible or not available (the caller then takes the Python path).
    """
    module = _kernels_for(scores, None)
    if module is None:
        return None
    slot, rep, merged_pos, into, size = module.window_groups(scores, norms, src_pos, dst_pos, r, num_prefix, num_tokens)
    return slot, rep, merged_pos, into, size


def fused_group_mean(x: Tensor, rep: Tensor, src: Tensor, into: Tensor, size: Tensor) -> Tensor | None:
    """The group means of ToMe for SD's merge (:meth:`~tokenreduce.ops.unmerge.TokenGroups.merge`) in one
    kernel call, equal to the Python path's.

    Args:
        x: B×N×C float32 stream; rep: B×M, src: B×R and into: B×R int64 group maps; size: B×M×1 float32.

    Returns:
        B×M×C group means, or ``None`` when the kernel is not eligible or not available.
    """
    module = _kernels_for(x, size)
    return None if module is None else module.group_mean(x, rep, src, into, size)


def fused_unmerge_add(x: Tensor, y: Tensor, slot: Tensor) -> Tensor | None:
    """``x`` plus every token's group row of ``y`` (:meth:`~tokenreduce.ops.unmerge.TokenGroups.unmerge_add`)
    in one kernel call, equal to the Python path's.

    Args:
        x: B×N×C float32 stream; y: B×M×C float32 group rows; slot: B×N int64 group of every token.

    Returns:
        B×N×C, or ``None`` when the kernel is not eligible or not available.
    """
    if y.dtype != x.dtype or not kernel_eligible(y, None):
        return None
    module = _kernels_for(x, None)
    return None if module is None else module.unmerge_add(x, y, slot)


def fused_token_distances(x: Tensor, scale: float) -> Tensor | None:
    """B×M×M Euclidean distances of every image's token rows ``x`` (B×M×C float32), divided by ``scale``, in one
    kernel call: exactly symmetric with a zero diagonal, and equal to ``torch.cdist``'s direct form up to float
    rounding (the channel sums are added in another order); ``None`` when the kernel is not eligible or not
    available (the caller then takes the Python path)."""
    module = _kernels_for(x, None)
    if module is None:
        return None
    return module.token_distances(x, float(scale))


def fused_dpc_clusters(dist: Tensor, num_clusters: int, k: int, include_self: bool) -> tuple[Tensor, Tensor] | None:
    """DPC-kNN's clusters from B×M×M float32 distances in one kernel call, bit for bit those of
    :func:`~tokenreduce.ops.cluster.clusters_from_distances` (same arguments); ``None`` when the kernel is not
    eligible or not available."""
    module = _kernels_for(dist, None)
    if module is None:
        return None
    assign, centres = module.dpc_clusters(dist, int(num_clusters), int(k), bool(include_self))
    return assign, centres


def fused_cluster_merge(
    x: Tensor, assign: Tensor, importance: Tensor, rest: Tensor, size: Tensor | None, num_prefix: int, num_clusters: int
) -> tuple[Tensor, Tensor] | None:
    """BAT's cluster tokens in one kernel call, bit for bit :func:`~tokenreduce.ops.cluster.cluster_merge`'s Python
    path (same arguments); ``None`` when the kernel is not eligible or not available."""
    module = None if importance.dtype != torch.float32 or importance.requires_grad else _kernels_for(x, size)
    if module is None:
        return None
    merged, merged_size = module.cluster_merge(x, assign, importance, rest, size, num_prefix, num_clusters)
    return merged, merged_size
