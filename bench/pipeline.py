"""Pipeline overhead: a no-op `dvc repro` and the import time of each stage module.

A no-op repro is timed only when the pipeline's outputs exist and `dvc status` reports nothing
to do but the stages marked `always_changed` (the report stage, which then reruns and is part
of the figure); otherwise running it would execute the whole study, so it is not measured.
Import times are wall times of a fresh `python -c "import stages.<name>"` from the repository
root, less that of `python -c pass` (the interpreter's own start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT


def _wall(cmd: list[str], *, timeout: float = 300.0) -> float:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return wall


def stage_modules(root: Path = ROOT) -> list[str]:
    """stages/<name>.py → "stages.<name>", every stage module and the modules they share."""
    return sorted(f"stages.{p.stem}" for p in (root / "stages").glob("*.py") if p.stem != "__init__")


def import_times(modules: list[str], *, repeats: int = 1) -> dict:
    """{module: seconds} of importing each module in a fresh interpreter, start-up subtracted;
    best of `repeats`. Also "python_start_s" and "import_torch_s" for scale."""

    def best(code: str) -> float:
        return min(_wall([sys.executable, "-c", code]) for _ in range(repeats))

    start = best("pass")
    out = {m: max(0.0, best(f"import {m}") - start) for m in modules}
    return {"python_start_s": start, "import_torch_s": max(0.0, best("import torch") - start), "modules": out}


def dvc_noop(root: Path = ROOT) -> dict:
    """Wall seconds of `dvc repro` when nothing but always-changed stages is out of date."""
    if not (root / "dvc.lock").exists():
        return {"measured": False, "reason": "no pipeline outputs (no dvc.lock)"}
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        return {"measured": False, "reason": f"dvc status failed: {proc.stderr.strip()[-200:]}"}
    try:
        status = json.loads(proc.stdout or "{}")
    except ValueError:
        return {"measured": False, "reason": f"dvc status printed no JSON: {proc.stdout[-200:]!r}"}
    stale = sorted(name for name, changes in status.items() if any(c != "always changed" for c in changes))
    if stale:
        return {
            "measured": False,
            "reason": f"pipeline outputs out of date ({len(stale)} stages, e.g. {stale[0]}); a repro would run them",
        }
    always = sorted(status)
    seconds = _wall([sys.executable, "-m", "dvc", "repro"], timeout=600)
    return {"measured": True, "seconds": seconds, "always_changed_stages_rerun": always}
