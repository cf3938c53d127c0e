"""`python scripts/study_converged.py`: the converged study (studies/converged), run by run and
across sittings.

The runs of studies/converged/runs.yaml train until early stopping on the log-Z monitor's
validation NLL (`train.patience`) or to their cap (`train.epochs`), their model file holding the
best checked epoch, and are scored once on all 10 000 test images by the default study's stages.
They run in lanes (`scripts/repro.py`'s, one thread each, the costliest first) in one persistent
clone of the study's commit, <cache>/studies/converged/<commit>/repo, where <cache> is
$VAEPP_CACHE or ~/.cache/vaepp. As each run finishes, its metrics, per-image NLLs, training curve
and model file are copied to studies/converged/<run>/ and studies/converged/manifest.json records
it (commit them then); the manifest also records the shared sections the runs were resolved on
(`shared`: the clone's params.yaml without its runs), which the report reads them with. Started
again, the script skips the runs already copied, and a run killed mid-fit resumes from its
training checkpoint in the clone: the same commit for every run (the manifest's, not HEAD's), so
the whole study is made by one version of the code.

Options: --runs a,b (only these), --jobs N (lanes; default one per core, at most the runs left),
--dry-run (print the plan and stop). Exit status: 0, 2 on a bad argument, else the first
failing stage's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.repro import DVC, lane_env, lane_order, project_env, run_lanes, stage_commands  # noqa: E402
from scripts.run_study import add_runs, copy_outputs, machine, shared_sections  # noqa: E402

STUDY = ROOT / "studies" / "converged"
DONE = "nll.json"  # a run's folder appears whole (`collect`): one holding its NLL is done


def study_runs(study: Path = STUDY) -> dict[str, dict]:
    """The study's run definitions (runs.yaml), in order."""
    return yaml.safe_load((study / "runs.yaml").read_text())


def runs_left(runs: dict[str, dict], study: Path = STUDY, only: list[str] | None = None) -> list[str]:
    """The runs (of `only`, when given) not yet copied to the study's folder, in definition order."""
    return [name for name in runs if (only is None or name in only) and not (study / name / DONE).is_file()]


def read_manifest(study: Path = STUDY) -> dict | None:
    path = study / "manifest.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_manifest(manifest: dict, study: Path = STUDY) -> None:
    from vaepp.files import atomic_write_json

    atomic_write_json(study / "manifest.json", manifest)


def new_manifest(commit: str, runs: dict[str, dict]) -> dict:
    return {
        "commit": commit,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": "python scripts/study_converged.py",
        "runs": runs,
        "finished": {},
    }


def work_dir(cache: Path, commit: str) -> Path:
    return cache / "studies" / "converged" / commit[:12] / "repo"


def ensure_clone(work: Path, commit: str, runs: dict[str, dict]) -> None:
    """The study's checkout at `commit` with its runs added to params.yaml, made once and then reused
    (its checkpoints, DVC cache and finished stages with it); a clone at another commit is an error.
    A clone stopped before its runs were added gets them now."""
    if work.is_dir():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True, check=True)
        if head.stdout.strip() != commit:
            raise RuntimeError(f"{work} is at {head.stdout.strip()[:12]}, the study's commit is {commit[:12]}")
    else:
        work.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
        subprocess.run(["git", "checkout", "-q", commit], cwd=work, check=True)
        (work / ".venv").symlink_to(ROOT / ".venv")
    params = yaml.safe_load((work / "params.yaml").read_text())
    if all(params.get("runs", {}).get(name) == spec for name, spec in runs.items()):
        return
    clash = add_runs(work / "params.yaml", runs)
    if clash:
        names = ", ".join(clash)
        raise RuntimeError(f"{work}/params.yaml: {names} defined otherwise than in studies/converged/runs.yaml")


def record_shared(manifest: dict, work: Path) -> None:
    """Record the clone's shared sections in the manifest (`run_study.shared_sections`), once."""
    if "shared" not in manifest and work.is_dir():
        manifest["shared"] = shared_sections(work)
        write_manifest(manifest)


def collect(work: Path, run: str, manifest: dict, seconds: float, study: Path = STUDY) -> None:
    """Copy a finished run from the clone to studies/converged/<run>/ (through a staging folder
    renamed into place, so a folder with its NLL is complete) and record it in the manifest with
    its lane's wall time."""
    dest, staging = study / run, study / f".{run}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    copy_outputs(work, run, staging, model=True)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    manifest["finished"][run] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "lane_seconds": seconds}
    write_manifest(manifest, study)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", help="only these runs (comma-separated)")
    ap.add_argument("--jobs", type=int, help="lanes (default: one per core, at most the runs left)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    args = ap.parse_args(argv)
    runs = study_runs()
    only = args.runs.split(",") if args.runs else None
    if only and (unknown := sorted(set(only) - set(runs))):
        print(f"--runs: no such run {', '.join(unknown)}; defined: {', '.join(runs)}", file=sys.stderr)
        return 2
    if args.jobs is not None and args.jobs < 1:
        print("--jobs must be at least 1", file=sys.stderr)
        return 2
    todo = runs_left(runs, only=only)
    manifest = read_manifest()
    if manifest is not None and manifest["runs"] != runs:
        print("studies/converged/runs.yaml differs from the manifest's runs: start a new study", file=sys.stderr)
        return 2
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    commit = manifest["commit"] if manifest else head.stdout.strip()
    from stages.cli import cache_dir

    work = work_dir(cache_dir(), commit)
    if manifest is not None and not args.dry_run:
        record_shared(manifest, work)  # a manifest written before it recorded them
    jobs = args.jobs or max(1, min(os.cpu_count() or 1, len(todo)))
    print(f"converged study at {commit[:12]} in {work}: {len(runs) - len(todo)} of {len(runs)} runs done")
    if not todo:
        return 0
    order = lane_order({name: runs[name]["prior"] for name in todo})
    print(f"to run, {jobs} lane(s), in this order: {', '.join(order)}", flush=True)
    if args.dry_run:
        return 0
    if manifest is None:
        manifest = new_manifest(commit, runs)
        write_manifest(manifest)
    ensure_clone(work, commit, runs)
    record_shared(manifest, work)
    rc = subprocess.call([*DVC, "repro", "prepare-data"], cwd=work, env=project_env())
    if rc != 0:
        return rc
    env = lane_env(max(1, (os.cpu_count() or 1) // jobs))
    on_done = lambda run, seconds: collect(work, run, manifest, seconds)  # noqa: E731
    return run_lanes(order, stage_commands, jobs=jobs, env=env, cwd=work, on_done=on_done)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
