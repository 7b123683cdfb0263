"""Setting the CPU's intra-op thread count without slowing ATen's fused attention.

``torch.set_num_threads(n)`` does more than set OpenMP's thread count.  In PyTorch's x86 wheels
(MKL for BLAS, GNU OpenMP) it also gives MKL an explicit thread count for the calling thread and
turns MKL's dynamic adjustment off, and it repeats this on the first parallel op of every thread.
MKL then opens nested OpenMP teams for the small matrix products that ATen's CPU flash-attention
kernel runs *inside* its own parallel loop, with a futex storm on every call.  On a 2-core AVX2 VM
(torch 2.12 and 2.14) the fused kernel at 250×4×64×16 (the reference model's shape) takes about
5.5 ms in a default process and 10–14 ms after ``torch.set_num_threads(2)``, although the count did not
change: slower than one thread (``python benchmarks/set_threads.py``).  A process that never calls
it (the default, or ``OMP_NUM_THREADS`` in the environment) keeps MKL sequential inside ATen's parallel
regions and multi-threaded outside them.

:func:`set_threads` sets the count and then puts MKL's two settings back to that default state, so
a benchmark run with ``--threads`` times what a user's default process runs.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

import torch


@functools.cache
def _mkl_setters() -> tuple[Callable[[int], int], Callable[[int], None]] | None:
    """MKL's per-thread thread count and dynamic-adjustment setters in libtorch_cpu, or ``None`` if this
    build has no MKL (ARM, macOS, a build with another BLAS)."""
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(library)
        local, dynamic = lib.MKL_Set_Num_Threads_Local, lib.MKL_Set_Dynamic
    except (OSError, AttributeError):
        return None
    local.argtypes, local.restype = [ctypes.c_int], ctypes.c_int
    dynamic.argtypes, dynamic.restype = [ctypes.c_int], None
    return local, dynamic


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads on the CPU, with MKL as a default process has it.

    ``torch.set_num_threads(threads)`` unless the count is already ``threads``, then MKL's thread count for
    this thread back to "follow OpenMP" and its dynamic adjustment back on (which undoes an earlier
    ``torch.set_num_threads`` too, and changes nothing in a default process): MKL still uses ``threads``
    threads for a large product, and one inside ATen's parallel loops.

    Raises:
        ValueError: ``threads`` < 1.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    torch.get_num_threads()  # ATen's per-thread lazy initialisation applies the setting again: let it run first
    setters = _mkl_setters()
    if setters is not None:
        local, dynamic = setters
        local(0)  # 0: this thread follows the global count (OpenMP's, now ``threads``)
        dynamic(1)
