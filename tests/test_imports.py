"""Import hygiene: any submodule can be imported first, and importing the library leaves the warning filters alone."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import tokenreduce

SUBMODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(tokenreduce.__path__, "tokenreduce.")
    if ".csrc" not in m.name and not m.name.endswith("__main__")  # __main__ runs the command line
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_every_submodule_can_be_imported_first():
    # One interpreter (torch and timm stay loaded); before each import every tokenreduce module is
    # forgotten, so each submodule is the first of the package to be imported.
    code = f"""
import importlib, sys, traceback
import torch, timm
failed = []
for name in {SUBMODULES!r}:
    for loaded in [m for m in sys.modules if m == "tokenreduce" or m.startswith("tokenreduce.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    result = _run(code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(SUBMODULES) > 20  # the walk found the package's modules


def test_importing_the_library_leaves_warning_filters_unchanged():
    code = f"""
import importlib, warnings
import numpy, torch, timm, safetensors.torch, PIL.Image, tqdm.auto  # their own filters are theirs
before = list(warnings.filters)
for name in ["tokenreduce"] + {SUBMODULES!r}:
    importlib.import_module(name)
added = [f for f in warnings.filters if f not in before]
print(added)
raise SystemExit(1 if added or len(warnings.filters) != len(before) else 0)
"""
    result = _run(code)
    assert result.returncode == 0, result.stdout + result.stderr
