"""Install Debian's `chromium` for the report's headless-rendering test, if it is quick.

Called by `make test` before pytest. It never fails the build: it always exits 0 and prints one
line saying what it did or why it did not. Chromium is installed only when that can finish within
a minute (the whole budget, `apt-get update` included): packages are first downloaded with
`apt-get install --download-only` (safe to stop at the deadline), then installed from the local
cache. Without Chromium, the report's screenshot test is skipped and says so.

Usage: python scripts/ensure_chromium.py [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGE = "chromium"
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
INSTALL_RESERVE_S = 20.0  # seconds kept back from the download for unpacking the packages


def find_chromium() -> str | None:
    """Path of an installed Chromium binary, or None."""
    for path in CANDIDATES:
        if Path(path).is_file() and os.access(path, os.X_OK):
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _apt(args: list[str], timeout: float) -> tuple[int | None, str]:
    """Run apt-get non-interactively; (returncode, last stderr/stdout line); None on timeout."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        proc = subprocess.run(["apt-get", *args], capture_output=True, text=True, timeout=max(timeout, 1.0), env=env)
    except subprocess.TimeoutExpired:
        return None, ""
    lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    return proc.returncode, lines[-1] if lines else ""


def _has_candidate() -> bool:
    proc = subprocess.run(["apt-cache", "policy", PACKAGE], capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and "Candidate:" in proc.stdout and "Candidate: (none)" not in proc.stdout


def ensure(budget_s: float = 60.0) -> str:
    """Make Chromium available if that fits in `budget_s` seconds; returns a one-line status."""
    found = find_chromium()
    if found:
        return f"chromium: present at {found}"
    if shutil.which("apt-get") is None:
        return "chromium: not installed (no apt-get on this machine); the report's screenshot test will be skipped"
    if os.geteuid() != 0:
        return (
            "chromium: not installed (installing needs root: run `sudo apt-get install -y chromium`); "
            "the report's screenshot test will be skipped"
        )
    deadline = time.monotonic() + budget_s
    left = lambda: deadline - time.monotonic()  # noqa: E731
    if not _has_candidate():
        code, last = _apt(["update", "-qq"], left())
        if code is None:
            return f"chromium: not installed (apt-get update took over {budget_s:.0f} s); screenshot test skipped"
        if not _has_candidate():
            return (
                f"chromium: not installed (no apt candidate for {PACKAGE} after apt-get update: {last}); "
                "screenshot test skipped"
            )
    install = ["install", "-y", "-qq", "--no-install-recommends", PACKAGE]
    code, last = _apt([*install[:1], "--download-only", *install[1:]], left() - INSTALL_RESERVE_S)
    if code is None:
        return (
            f"chromium: not installed (downloading it would take over {budget_s:.0f} s here; "
            "install it with `apt-get install -y chromium`); screenshot test skipped"
        )
    if code != 0:
        return f"chromium: not installed (apt-get download failed: {last}); screenshot test skipped"
    code, last = _apt(install, max(left(), INSTALL_RESERVE_S))
    if code is None:
        return (
            "chromium: installation stopped at the time limit; run `dpkg --configure -a` and "
            "`apt-get install -y chromium` to finish it; screenshot test skipped"
        )
    if code != 0 or not find_chromium():
        return f"chromium: not installed (apt-get install failed: {last}); screenshot test skipped"
    return f"chromium: installed at {find_chromium()} in {budget_s - left():.0f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=60.0, help="seconds allowed in all (default 60)")
    args = p.parse_args(argv)
    try:
        print(ensure(args.budget))
    except (OSError, subprocess.SubprocessError) as err:
        print(f"chromium: not installed ({err}); screenshot test skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
