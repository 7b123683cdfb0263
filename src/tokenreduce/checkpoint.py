"""Checkpoints of learned reducers: their parameters and config only, in one safetensors file.

The file holds the reducer's tensors; its metadata holds JSON: the method name,
the resolved parameters and a fingerprint of the model it was trained for
(depth, width, heads, prefix tokens).  Loading into a different model is refused
with a message saying what differs.  Writes are atomic (temporary file, then
rename), so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .methods.base import ModelInfo, Reducer

FORMAT = "tokenreduce.reducer/1"


def fingerprint(info: ModelInfo) -> dict[str, int | str]:
    """What a checkpoint must match: the model family and the shapes the learned parameters depend on."""
    return {"family": info.family, "depth": info.depth, "dim": info.dim, "num_heads": info.num_heads,
            "num_prefix": info.num_prefix}


def atomic_save_file(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_reducer(reducer: Reducer, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write a reducer's learned parameters and config to ``path`` (safetensors).

    A training-free reducer is written too, with its config and no tensors (the record of a
    fine-tuned backbone's method: ``tokenreduce.apply(model, method, checkpoint=path)`` restores it).
    """
    meta = {
        "format": FORMAT,
        "method": reducer.name,
        "params": reducer.config(),
        "model": fingerprint(reducer.info),
        "extra": extra or {},
    }
    state = {} if reducer.module is None else reducer.module.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_save_file(tensors, path, {"tokenreduce": json.dumps(meta)})


def read_reducer(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, tensors)`` of a reducer checkpoint; a clear ``ValueError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("tokenreduce")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({err})") from None
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a tokenreduce reducer checkpoint")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    meta["model"].setdefault("family", "timm-vit")  # written before other families existed
    if meta.get("method") == "tps" and meta.get("params", {}).get("variant") == "dtps":  # before dtps had its name
        meta["method"] = "dtps"
        meta["params"] = {k: v for k, v in meta["params"].items() if k != "variant"}
    return meta, tensors


def check_compatible(meta: dict[str, Any], method: str, info: ModelInfo, path: str | Path) -> None:
    """Refuse a checkpoint of another method or another model, saying what differs."""
    if meta["method"] != method:
        raise ValueError(f"{path} holds a {meta['method']!r} checkpoint, not {method!r}")
    want = fingerprint(info)
    if meta["model"] != want:
        diff = {k: (meta["model"].get(k), v) for k, v in want.items() if meta["model"].get(k) != v}
        raise ValueError(f"{path} was trained for another model: (checkpoint, this model) differ in {diff}")


def load_into(reducer: Reducer, meta: dict[str, Any], tensors: dict[str, Any], path: str | Path) -> None:
    """Load tensors into ``reducer.module`` after :func:`check_compatible`."""
    check_compatible(meta, reducer.name, reducer.info, path)
    own = reducer.module.state_dict()
    if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
        raise ValueError(f"{path}: tensors do not match {reducer.name}'s parameters")
    reducer.module.load_state_dict(tensors)
