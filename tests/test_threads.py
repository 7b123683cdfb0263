"""tokenreduce.threads.set_threads: the thread count is set and MKL is left as a default process has it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tokenreduce.threads import _mkl_setters, set_threads


def run(*parts: str) -> list[str]:
    """Run the code ``parts`` in a fresh interpreter (thread settings are process-wide); its printed words."""
    code = "".join(textwrap.dedent(part) for part in parts)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


MKL_STATE = """
    import ctypes, os
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    lib.MKL_Set_Num_Threads_Local.restype = ctypes.c_int
    def state():  # this thread's MKL count (0: follows the global one) and MKL's dynamic flag
        local = lib.MKL_Set_Num_Threads_Local(0)
        lib.MKL_Set_Num_Threads_Local(local)
        return local, lib.mkl_serv_get_dynamic()
"""


needs_mkl = pytest.mark.skipif(_mkl_setters() is None, reason="no MKL in this torch build: nothing to reset")


@needs_mkl
def test_set_threads_sets_the_count_and_leaves_mkl_at_its_defaults() -> None:
    out = run("""
        import torch
    """, MKL_STATE, """
        from tokenreduce.threads import set_threads
        print(*state())                        # a default process
        torch.set_num_threads(2)
        torch.get_num_threads()
        print(*state())                        # what torch.set_num_threads leaves
        set_threads(1)
        torch.ones(1000, 1000).sum()           # a parallel op: ATen's lazy initialisation has run
        print(torch.get_num_threads(), *state())
        print(lib.mkl_get_max_threads())
    """)
    default_local, default_dynamic, raw_local, raw_dynamic, threads, local, dynamic, mkl_threads = map(int, out)
    # torch 2.12-2.14 leave (2, 0) here, the state that nests MKL inside ATen's parallel loops
    print(f"torch.set_num_threads leaves MKL at local={raw_local}, dynamic={raw_dynamic}")
    assert threads == 1
    assert (local, dynamic) == (default_local, default_dynamic) == (0, 1)
    assert mkl_threads == 1  # MKL follows the new count outside ATen's parallel regions


@needs_mkl
def test_set_threads_at_the_current_count_keeps_it_and_undoes_torch_set_num_threads() -> None:
    out = run("""
        import torch
    """, MKL_STATE, """
        from tokenreduce.threads import set_threads
        torch.set_num_threads(2)
        torch.get_num_threads()
        set_threads(2)
        torch.ones(1000, 1000).sum()
        print(torch.get_num_threads(), *state())
    """)
    threads, local, dynamic = map(int, out)
    assert threads == 2
    assert (local, dynamic) == (0, 1)  # torch.set_num_threads(2) left (2, 0)


def test_set_threads_refuses_a_count_below_one() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        set_threads(0)
    assert torch.get_num_threads() >= 1
