"""Training checkpoints: written atomically, verified on load.

File layout: an 8-byte magic, the 32-byte SHA-256 of the payload, then the payload
(``torch.save`` of a dict).  A truncated or altered file fails the digest check and
is refused with a :class:`CheckpointError` naming the file, instead of resuming
from garbage.  Writing goes to a temporary file in the same folder, flushed and
fsynced, then ``os.replace``-d over the target, so a crash mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

MAGIC = b"TRCKPT01"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or not a tokenreduce checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + ``os.replace``).

    Args:
        state: tensors, numbers, strings, lists and dicts (what ``torch.load(weights_only=True)`` reads).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            f.write(hashlib.sha256(payload).digest())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, not a tokenreduce checkpoint, truncated or corrupted.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    if len(data) < len(MAGIC) + 32 or data[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not a tokenreduce training checkpoint (bad header)")
    digest, payload = data[len(MAGIC) : len(MAGIC) + 32], data[len(MAGIC) + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated (SHA-256 mismatch); "
            "delete it to start over or restore an intact copy"
        )
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"checkpoint {path} could not be read: {err}") from err
