"""Install Debian's `chromium`, which the tests that render pages need (the report's, DVC's plots).

Called by `make test` before pytest; it fails the target when Chromium is still missing. It prints
one line saying what it found or did, or why it could not, and exits 0 when /usr/bin/chromium is
there afterwards, 1 when not. The install has a time budget (--budget, 600 s by default, `apt-get
update` included): packages are first downloaded with `apt-get install --download-only` (safe to
stop at the deadline; a rerun picks up the downloaded files), then installed from the local cache.
Installing needs root and apt-get; elsewhere, install Chromium by hand (`apt-get install -y chromium`
as root) and rerun.

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
CHROMIUM = "/usr/bin/chromium"  # where Debian's package puts it; the binary tests/chromium.py runs
BUDGET_S = 600.0
INSTALL_RESERVE_S = 60.0  # seconds kept back from the download for unpacking the packages
MISSING = "the tests that render pages will fail"
BY_HAND = "install it with `apt-get install -y chromium` as root"


def find_chromium() -> str | None:
    """CHROMIUM if it is installed, else None."""
    return CHROMIUM if Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK) else None


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


def ensure(budget_s: float = BUDGET_S) -> str:
    """Install Chromium unless it is there, within `budget_s` seconds; returns a one-line status
    (find_chromium() then says whether it is there)."""
    found = find_chromium()
    if found:
        return f"chromium: present at {found}"
    if shutil.which("apt-get") is None:
        return f"chromium: not installed (no apt-get on this machine: install Chromium at {CHROMIUM}); {MISSING}"
    if os.geteuid() != 0:
        return f"chromium: not installed (installing needs root: run `sudo apt-get install -y chromium`); {MISSING}"
    deadline = time.monotonic() + budget_s
    left = lambda: deadline - time.monotonic()  # noqa: E731
    if not _has_candidate():
        code, last = _apt(["update", "-qq"], left())
        if code is None:
            return f"chromium: not installed (apt-get update took over {budget_s:.0f} s; {BY_HAND}); {MISSING}"
        if not _has_candidate():
            return f"chromium: not installed (no apt candidate for {PACKAGE} after apt-get update: {last}); {MISSING}"
    install = ["install", "-y", "-qq", "--no-install-recommends", PACKAGE]
    code, last = _apt([*install[:1], "--download-only", *install[1:]], left() - INSTALL_RESERVE_S)
    if code is None:
        return (
            f"chromium: not installed (downloading it took over {budget_s:.0f} s here; rerun to go on "
            f"downloading, or {BY_HAND}); {MISSING}"
        )
    if code != 0:
        return f"chromium: not installed (apt-get download failed: {last}); {MISSING}"
    code, last = _apt(install, max(left(), INSTALL_RESERVE_S))
    if code is None:
        return (
            "chromium: installation stopped at the time limit; run `dpkg --configure -a` and "
            f"`apt-get install -y chromium` to finish it; {MISSING}"
        )
    if code != 0 or not find_chromium():
        return f"chromium: not installed (apt-get install failed: {last}); {MISSING}"
    return f"chromium: installed at {find_chromium()} in {budget_s - left():.0f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds allowed in all (default {BUDGET_S:.0f})")
    args = p.parse_args(argv)
    try:
        print(ensure(args.budget))
    except (OSError, subprocess.SubprocessError) as err:
        print(f"chromium: not installed ({err}); {MISSING}")
    return 0 if find_chromium() else 1


if __name__ == "__main__":
    sys.exit(main())
