"""Files that are never half-written, checkpoints that are never silently wrong.

Every output of the project goes through `atomic_write_bytes`: the bytes are written to a
temporary file in the destination's directory, flushed and fsync'ed, then renamed over the
destination (`os.replace` is atomic on POSIX), so a reader or a killed process sees either the
old file or the new one, never a torn one; the file gets the mode a plain `open` would give it
(0o666 less the umask), not mkstemp's 0o600. A process killed mid-write leaves only a hidden
`.<name>.*.tmp` sibling, which `remove_stale_temporaries` clears. Checkpoints load with
`weights_only=True` (no arbitrary code from a pickle) after every member's CRC-32 in the zip
archive `torch.save` writes has been checked (torch's own reader does not check them, so a
flipped bit in a tensor would otherwise load silently); every load failure names the file and
the remedy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint or model file is missing, truncated, corrupt or from other settings."""


def _umask() -> int:
    """The process umask (os.umask can only be read by setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary sibling and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the `.<name>.*.tmp` siblings that a process killed inside `atomic_write_bytes(path)`
    left behind; returns them. Call only when no other process is writing `path`."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: str | Path, rows: list[dict]) -> Path:
    """One row per dict, columns the union of their keys ("epoch" first, then sorted); a key a
    row lacks is an empty cell."""
    import csv

    columns = sorted({k for row in rows for k in row}, key=lambda k: (k != "epoch", k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """JSON with sorted keys and a trailing newline; NaN/inf are refused (not valid JSON)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save` into memory, then one atomic write."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _why(err: BaseException) -> str:
    first = str(err).splitlines()[0][:160] if str(err) else ""
    return f"{type(err).__name__}: {first}"


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Load a file written by `atomic_torch_save` with `weights_only=True`.

    Raises CheckpointError naming the file and the remedy when it is missing, truncated, fails a
    member's CRC-32, holds anything but tensors and plain containers, or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; rerun the stage that writes it")
    remedy = "delete it and rerun the stage that writes it"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and compares its CRC-32
    except Exception as err:  # BadZipFile, EOFError, zlib.error, NotImplementedError, ...: unusable
        raise CheckpointError(
            f"{path}: not a complete checkpoint archive ({_why(err)}); it is truncated or corrupt — {remedy}"
        ) from None
    if bad is not None:
        raise CheckpointError(f"{path}: CRC-32 mismatch in {bad!r} (corrupt file) — {remedy}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle.UnpicklingError, EOFError, ...
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({_why(err)}); it is truncated, corrupt or holds "
            f"objects other than tensors — {remedy}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this project (a {type(obj).__name__}); {remedy}")
    return obj


def file_digest(path: str | Path, algorithm: str = "sha256", *, chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, *, missing_ok: bool = False) -> dict | None:
    """A JSON file's content (None for a missing file with `missing_ok`); a ValueError naming the
    file and the remedy when it is missing or cannot be read or parsed."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return None
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err}); rerun the stage that writes it") from None
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rerun the stage that writes it") from None


def flat(d: dict, prefix: str = "", *, lists_as_json: bool = False) -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}; with `lists_as_json`, lists become JSON text so that every
    value is a scalar."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + ".", lists_as_json=lists_as_json))
        else:
            out[key] = json.dumps(v) if lists_as_json and isinstance(v, (list, tuple)) else v
    return out
