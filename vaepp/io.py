"""Files that are never half-written, checkpoints that are never silently wrong.

Every output of the project goes through `atomic_write_bytes`: the bytes are written to a
temporary file in the destination's directory, flushed and fsync'ed, then renamed over the
destination (`os.replace` is atomic on POSIX), so a reader or a killed process sees either the
old file or the new one, never a torn one. Checkpoints load with `weights_only=True` (no
arbitrary code from a pickle) and every load failure names the file and the remedy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint or model file is missing, truncated, corrupt or from other settings."""


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary sibling and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """JSON with sorted keys and a trailing newline; NaN/inf are refused (not valid JSON)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save` into memory, then one atomic write."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Load a file written by `atomic_torch_save` with `weights_only=True`.

    Raises CheckpointError naming the file when it is missing, truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; rerun the stage that writes it")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle.UnpicklingError, EOFError, ...
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
            "it is truncated or corrupt — delete it and rerun the stage that writes it"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this project (a {type(obj).__name__}); "
                              "delete it and rerun the stage that writes it")
    return obj


def file_digest(path: str | Path, algorithm: str = "sha256", *, chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
