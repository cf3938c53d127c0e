"""Headless Chromium for the tests that look at a page as a person would (Debian's `chromium`,
which `make test` installs first through scripts/ensure_chromium.py). Without it those tests fail."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
# The network off: every host name fails to resolve and every request goes to a closed port.
OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9")


def require_chromium() -> None:
    """Fail the test, saying how to install Chromium, where it is not installed."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"{CHROMIUM} is not installed: install it with `python scripts/ensure_chromium.py` "
            "(what `make test` runs first; it says why it could not) or, as root, `apt-get install -y chromium`",
            pytrace=False,
        )


def render(
    page: Path, *, width: int, height: int, screenshot: Path | None = None, dom: bool = False, offline: bool = False
) -> str:
    """Load the file `page` headless in a fresh profile (15 s of virtual time); write a
    width × height `screenshot` if given, and return the DOM after scripts ran if `dom` ("" if not)."""
    require_chromium()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    base = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        *(OFFLINE if offline else ()),
        f"--user-data-dir={profile}",
        "--virtual-time-budget=15000",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
    ]
    url = Path(page).resolve().as_uri()
    text = ""
    try:
        if dom:
            text = subprocess.run(
                [*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False
            ).stdout
        if screenshot is not None:
            subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return text
