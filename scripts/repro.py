"""`make repro`: the whole study, several runs at a time.

On the reference 2-core machine one process with two OpenMP threads does about two thirds of
the work of two processes with one thread each (a VAEPP training step: 30.9 ms on two threads;
40-42 ms each for two at once on one thread), because the networks are small enough that the
second thread mostly waits. So this runs the study's runs in `jobs` lanes:

1. `dvc repro prepare-data`: every dataset, once;
2. each run's chain, stage by stage (`dvc --wait-for-lock repro --single-item <stage>@<run>` for
   train, fit-latent-gan, estimate-nll, sample-mala, compute-fid), `jobs` runs at a time with
   `threads` OpenMP threads each, the costliest runs first (pull-back runs before plain VAEs).
   One stage at a time, because a `dvc repro` that reaches back to prepare-data would ask for a
   write lock on the data another lane is reading;
3. `dvc repro`: the report, and anything a lane did not reach.

DVC releases its repository lock while a stage's command runs and takes it back to record the
result, so lanes only wait for each other's bookkeeping. Every run's outputs are its own; the
MLflow parent run is shared (`tracking`). Results are those of `dvc repro` with the same
thread count per process: a run's numbers do not depend on which lane ran it or when.

Output: each lane's lines, prefixed with its run; a progress bar shows its last state only.
Environment: REPRO_JOBS (default: one lane per core, at most the number of runs) and
REPRO_THREADS (default: cores // jobs, at least 1). REPRO_JOBS=1 is plain `dvc repro`.
Exit status: 0, or the first failing step's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DVC = [sys.executable, "-m", "dvc"]


def lane_order(runs: dict[str, str]) -> list[str]:
    """Run names, costliest first: {name: prior} → runs with a critic, then plain VAEs (prior
    standard), each in params order (a plain VAE trains about 3× faster than a pull-back run)."""
    return sorted(runs, key=lambda name: runs[name] == "standard")


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
    """Copy `stream` to `out` line by line with `prefix`; of a line rewritten by carriage returns
    (a progress bar) only its last state is kept."""
    for raw in iter(stream.readline, b""):
        text = raw.decode(errors="replace").rstrip("\n").split("\r")
        last = next((t for t in reversed(text) if t.strip()), "")
        if last:
            with lock:
                out.write(f"{prefix}{last}\n")
                out.flush()


RUN_STAGES = ("train", "fit-latent-gan", "estimate-nll", "sample-mala", "compute-fid")


def stage_commands(run: str) -> list[list[str]]:
    """A run's chain, one `dvc repro --single-item` per stage in dvc.yaml order, each waiting for
    DVC's repository lock (another lane may hold it for its bookkeeping)."""
    return [[*DVC, "--wait-for-lock", "repro", "--single-item", f"{st}@{run}"] for st in RUN_STAGES]


def project_env() -> dict[str, str]:
    """The environment with this interpreter's bin first on PATH: DVC runs the stages' `python`
    from PATH, which must be the project's environment."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def lane_env(threads: int) -> dict[str, str]:
    """`project_env` with `threads` OpenMP and MKL threads per process: a lane's environment."""
    return {**project_env(), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_lanes(
    items: Sequence[str],
    commands: Callable[[str], list[list[str]]],
    *,
    jobs: int,
    env: dict[str, str],
    out=sys.stdout,
    cwd: Path = ROOT,
    on_done: Callable[[str, float], None] | None = None,
) -> int:
    """Run the commands(item) of every item one after another in `cwd`, `jobs` items at a time, in
    order; returns 0, or the first failure's exit status (an item stops at its failing command;
    items not yet started are then skipped; running ones finish). on_done(item, seconds) runs after
    an item's last command succeeds, with the item's wall time, one at a time (under the lanes'
    lock); an exception it raises fails the item."""
    queue, lock, status = list(items), threading.Lock(), []

    def lane() -> None:
        while True:
            with lock:
                if not queue or status:
                    return
                item = queue.pop(0)
            t0, rc = time.perf_counter(), 0
            for argv in commands(item):
                proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                _pump(proc.stdout, f"[{item}] ", out, lock)
                if (rc := proc.wait()) != 0:
                    break
            with lock:
                if rc == 0 and on_done is not None:
                    try:
                        on_done(item, time.perf_counter() - t0)
                    except Exception as err:  # noqa: BLE001 - reported as the item's failure
                        out.write(f"[{item}] failed after its commands: {err}\n")
                        rc = 1
                out.write(f"[{item}] finished with status {rc} in {time.perf_counter() - t0:.0f} s\n")
                out.flush()
                if rc != 0 and not status:
                    status.append(rc)

    threads = [threading.Thread(target=lane) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return status[0] if status else 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    from vaepp.config import ParamsError, load_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", help="only these runs (comma-separated), and no report (default: every run)")
    args = ap.parse_args(argv)
    params_path = ROOT / "params.yaml"
    try:
        params = load_params(params_path)
    except ParamsError as err:
        print(f"params.yaml: {err}", file=sys.stderr)
        return 2
    runs = {name: run.prior for name, run in params.runs.items()}
    if args.runs:
        unknown = set(args.runs.split(",")) - set(runs)
        if unknown:
            print(f"--runs: no such run {', '.join(sorted(unknown))}; defined: {', '.join(runs)}", file=sys.stderr)
            return 2
        runs = {name: prior for name, prior in runs.items() if name in args.runs.split(",")}
    cores = os.cpu_count() or 1
    try:
        jobs = max(1, int(os.environ.get("REPRO_JOBS", min(cores, len(runs)))))
        threads = max(1, int(os.environ.get("REPRO_THREADS", cores // jobs)))
    except ValueError:
        print("REPRO_JOBS and REPRO_THREADS must be whole numbers", file=sys.stderr)
        return 2
    base = project_env()
    if jobs <= 1 and not args.runs:
        return subprocess.call([*DVC, "repro"], cwd=ROOT, env=base)
    t0 = time.perf_counter()
    print(f"make repro: {len(runs)} runs in {jobs} lanes of {threads} thread(s) each", flush=True)
    rc = subprocess.call([*DVC, "repro", "prepare-data"], cwd=ROOT, env=base)
    if rc == 0:
        rc = run_lanes(lane_order(runs), stage_commands, jobs=jobs, env=lane_env(threads))
    if rc == 0 and not args.runs:
        rc = subprocess.call([*DVC, "repro"], cwd=ROOT, env=base)
    print(f"make repro: status {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
