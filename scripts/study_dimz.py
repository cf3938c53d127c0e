"""`python scripts/study_dimz.py`: the dim-z study behind Figure 4 (studies/dimz).

The runs of studies/dimz/runs.yaml, added to params.yaml's, are run by `scripts/repro.py --runs`
in a fresh clone of HEAD (so the study is made by committed code only, with the same lanes and
thread counts as `make repro`); then each run's metrics (train, latent_gan, nll, mala, fid .json)
and training curve are copied to studies/dimz/<run>/, and studies/dimz/manifest.json records the
commit, date, machine, wall time and the runs' definitions. The report stage reads them
(`--dimz-study`) and draws them in Figure 4 beside the default study's own runs. About 25 minutes
on 2 cores.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "dimz"
KINDS = ("train", "latent_gan", "nll", "mala", "fid")


def main() -> int:
    runs = yaml.safe_load((STUDY / "runs.yaml").read_text())
    work = Path(tempfile.mkdtemp(prefix="vaepp-dimz-")) / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    (work / ".venv").symlink_to(ROOT / ".venv")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True, check=True)
    params = yaml.safe_load((work / "params.yaml").read_text())
    clash = set(runs) & set(params["runs"])
    if clash:
        print(f"studies/dimz/runs.yaml: {', '.join(sorted(clash))} already in params.yaml", file=sys.stderr)
        return 2
    params["runs"].update(runs)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "scripts/repro.py", "--runs", ",".join(runs)], cwd=work)
    if rc != 0:
        print(f"study_dimz: the runs failed (status {rc}); their work is in {work}", file=sys.stderr)
        return rc
    seconds = time.perf_counter() - t0
    staged = Path(tempfile.mkdtemp(prefix="dimz-", dir=STUDY.parent))
    for run in runs:
        (staged / run).mkdir()
        for kind in KINDS:
            shutil.copy2(work / "metrics" / run / f"{kind}.json", staged / run / f"{kind}.json")
        shutil.copy2(work / "plots" / run / "train_curve.csv", staged / run / "train_curve.csv")
    manifest = {
        "commit": commit.stdout.strip(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "seconds": seconds,
        "command": "python scripts/study_dimz.py",
        "runs": runs,
    }
    (staged / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    shutil.copy2(STUDY / "runs.yaml", staged / "runs.yaml")
    for old in [*(STUDY / run for run in runs), STUDY / "manifest.json"]:
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    for item in staged.iterdir():
        if item.name != "runs.yaml":
            item.rename(STUDY / item.name)
    shutil.rmtree(staged)
    shutil.rmtree(work.parent, ignore_errors=True)
    print(f"study_dimz: {len(runs)} runs in {seconds:.0f} s → {STUDY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
