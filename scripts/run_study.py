"""`python scripts/run_study.py NAME`: a committed study beside the default one (studies/NAME).

The runs of studies/NAME/runs.yaml, added to params.yaml's (with the datasets they read added to
`datasets`), are run by `scripts/repro.py --runs`
in a fresh clone of HEAD (so the study is made by committed code only, with the same lanes and
thread counts as `make repro`); then each run's metrics (train, latent_gan, nll, mala, fid .json),
per-image NLLs and training curve are copied to studies/NAME/<run>/, and studies/NAME/manifest.json
records the commit, date, machine, wall time, the runs' definitions and the shared sections they
were resolved on (`shared`: the clone's params.yaml without its runs; the report reads the runs
with them, under any profile).

Studies: `dimz`, the dim-z sweep behind Figure 4 (the report reads it with `--dimz-study`; about
28 minutes on 2 cores); `attempts`, the certified prior's best attempts scored on validation
images (README "A certified pull-back prior"); `fashion`, five priors on Fashion-MNIST for Tables 2
and 4 (the report reads it with `--table-study`).
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
KINDS = ("train", "latent_gan", "nll", "mala", "fid")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (ROOT / "studies" / argv[0] / "runs.yaml").is_file():
        print("usage: python scripts/run_study.py NAME (a folder studies/NAME with a runs.yaml)", file=sys.stderr)
        return 2
    name = argv[0]
    study = ROOT / "studies" / name
    runs = yaml.safe_load((study / "runs.yaml").read_text())
    work = Path(tempfile.mkdtemp(prefix=f"vaepp-{name}-")) / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    (work / ".venv").symlink_to(ROOT / ".venv")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True, check=True)
    clash = add_runs(work / "params.yaml", runs)
    if clash:
        print(f"studies/{name}/runs.yaml: {', '.join(clash)} already in params.yaml", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "scripts/repro.py", "--runs", ",".join(runs)], cwd=work)
    if rc != 0:
        print(f"run_study {name}: the runs failed (status {rc}); their work is in {work}", file=sys.stderr)
        return rc
    seconds = time.perf_counter() - t0
    staged = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=study.parent))
    for run in runs:
        copy_outputs(work, run, staged / run)
    manifest = {
        "commit": commit.stdout.strip(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "seconds": seconds,
        "command": f"python scripts/run_study.py {name}",
        "runs": runs,
        "shared": shared_sections(work),
    }
    (staged / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    shutil.copy2(study / "runs.yaml", staged / "runs.yaml")
    for old in [*(study / run for run in runs), study / "manifest.json"]:
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    for item in staged.iterdir():
        if item.name != "runs.yaml":
            item.rename(study / item.name)
    shutil.rmtree(staged)
    shutil.rmtree(work.parent, ignore_errors=True)
    print(f"run_study {name}: {len(runs)} runs in {seconds:.0f} s → {study}")
    return 0


def add_runs(params_path: Path, runs: dict) -> list[str]:
    """Add a study's runs to a params file (and the datasets they read to its `datasets`, prepared
    beside the default study's); returns the names that clash with its own runs, writing nothing
    then."""
    params = yaml.safe_load(params_path.read_text())
    clash = sorted(set(runs) & set(params["runs"]))
    if clash:
        return clash
    params["runs"].update(runs)
    needed = [spec["data"]["dataset"] for spec in runs.values() if "dataset" in spec.get("data", {})]
    params["datasets"] = list(dict.fromkeys([*params["datasets"], *needed]))
    params_path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    return []


def copy_outputs(work: Path, run: str, dest: Path, *, model: bool = False) -> None:
    """A run's metrics (train, latent_gan, nll, mala, fid .json), per-image NLLs and training curve
    from the checkout `work` into the folder `dest` (made if missing), and its model file with
    `model`."""
    dest.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        shutil.copy2(work / "metrics" / run / f"{kind}.json", dest / f"{kind}.json")
    shutil.copy2(work / "metrics" / run / "nll_per_image.csv", dest / "nll_per_image.csv")
    shutil.copy2(work / "plots" / run / "train_curve.csv", dest / "train_curve.csv")
    if model:
        shutil.copy2(work / "models" / run / "vae.pt", dest / "vae.pt")


def shared_sections(work: Path) -> dict:
    """A study checkout's params.yaml without its runs: the shared sections every run of the study
    was resolved on. A study's manifest records them (`shared`), so that the report reads its runs
    as they ran whatever profile it runs under."""
    params = yaml.safe_load((work / "params.yaml").read_text())
    return {key: value for key, value in params.items() if key != "runs"}


def machine() -> str:
    """The machine, as a study's manifest records it."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}"


if __name__ == "__main__":
    sys.exit(main())
