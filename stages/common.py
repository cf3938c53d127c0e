"""Glue shared by the stage scripts: arguments, params, paths, device, data, models, tracking.

Stage scripts are run as `python stages/<name>.py` from the repository root (DVC's working
directory; for `dvc exp run --temp` a copy of it). Everything here is edge code: it reads argv,
the environment and params.yaml, so that the `vaepp` library never does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# A remote tracking server gets few, short retries, so that an outage cannot stall a stage.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

# What the stages import (requirements.txt). DVC runs `python stages/...` with the first `python`
# on PATH; outside the project's environment that is another Python, and the stage would die on
# an import deep inside, after DVC has already removed its previous outputs.
REQUIRED_MODULES = (
    "torch",
    "torchvision",
    "pytorch_fid",
    "pandas",
    "matplotlib",
    "mlflow",
    "pydantic",
    "yaml",
    "tqdm",
    "scipy",
)


def check_environment() -> None:
    """Stop at once, in one line, if this Python lacks a module the stages need."""
    import importlib.util

    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"error: {sys.executable} has no {', '.join(missing)}: run the pipeline in the project's environment "
            "(`make repro`, or `make setup` then `source .venv/bin/activate` before `dvc ...`)",
            file=sys.stderr,
        )
        raise SystemExit(2)


check_environment()

BUSY_CORES_FOR_PASSIVE = 0.5


def busy_cores(window: float = 0.1, stat: Path = Path("/proc/stat")) -> float | None:
    """Cores' worth of CPU time other processes use right now (Linux /proc/stat over `window`
    seconds), or None where /proc/stat cannot be read. /proc/stat counts 1/100 s ticks, so 0.1 s
    on 2 cores resolves 0.05 cores: ten times finer than the threshold below."""
    import time

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in stat.read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return 0.0
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def choose_omp_wait_policy(environ=os.environ, busy: Callable[[], float | None] = busy_cores) -> str:
    """How idle OpenMP threads wait, decided before torch is first imported.

    Measured on 2 cores (a plain-VAE training step, batch 128, 2 threads): on a quiet machine
    OpenMP's default spinning takes 3.4 ms and PASSIVE (sleeping) 7.9 ms; with another process
    on the cores spinning takes 7.9-10 ms and PASSIVE 5.5 ms, and under heavier sharing spinning
    made tiny latent-GAN layers 40-70x slower. So: a setting the user made is kept; otherwise
    PASSIVE when other processes are busy at start, else OpenMP's default. Returns the choice.
    """
    if "OMP_WAIT_POLICY" in environ:
        return environ["OMP_WAIT_POLICY"]
    if (os.cpu_count() or 1) == 1:
        return "default"  # one OpenMP thread: no idle thread waits, so no sample is needed
    load = busy()
    if load is not None and load >= BUSY_CORES_FOR_PASSIVE:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "PASSIVE"
    return "default"


OMP_WAIT_POLICY = choose_omp_wait_policy()


def tracking_on(environ=os.environ) -> bool:
    """False when VAEPP_MLFLOW turns MLflow tracking off (0, false, no, off)."""
    return environ.get("VAEPP_MLFLOW", "1").strip().lower() not in ("0", "false", "no", "off")


def is_stage_script(argv: list[str] = sys.argv) -> bool:
    """True in the process of `python stages/<name>.py`."""
    return bool(argv) and argv[0] not in ("", "-c", "-m") and Path(argv[0]).resolve().parent == ROOT / "stages"


def start_tracking_process(argv: list[str] = sys.argv, environ=os.environ):
    """In a stage script's process with tracking on (rank 0 or not distributed), start the
    tracking process now: it imports mlflow on the other core while this one imports torch
    (vaepp.tracking.TrackerProcess), and `tracker()` hands it the stage's params. Started after
    the load sample above, which would otherwise count it. None in any other process."""
    if not is_stage_script(argv) or not tracking_on(environ) or environ.get("RANK", "0") != "0":
        return None
    from vaepp.tracking import TrackerProcess

    return TrackerProcess.start(ROOT)


def _freeze_objects_at_exit() -> None:
    """The last exit handler of a stage process: move every live object into the garbage
    collector's permanent generation (gc.freeze), so that the interpreter's final collections do
    not walk torch's and torch._dynamo's object graphs once more (0.8 s down to 0.2 s measured on
    2 cores). Exit handlers, flushes and reference-count finalisers still run; the memory of what
    stays goes back with the process."""
    import gc

    gc.freeze()


if is_stage_script():
    import atexit

    atexit.register(_freeze_objects_at_exit)  # exit handlers run last-in first-out: after the stage's own
_TRACKING_PROCESS = start_tracking_process()


def parser(description: str, *, run: bool = True, paths: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The stage's arguments: --params, --run, --device, --no-progress, and one required
    `--<name> PATH` per entry of `paths`: every file a stage reads or writes is named in dvc.yaml."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if run:
        p.add_argument("--run", required=True, help="name of a run under `runs:` in the params")
    p.add_argument("--device", default=None, help="override params `device`: cpu, cuda or auto")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    for name in paths:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, metavar="PATH")
    return p


def cache_dir() -> Path:
    """Downloads and caches shared by every checkout and experiment: $VAEPP_CACHE or
    ~/.cache/vaepp (raw datasets, the FID network's files, FID reference statistics)."""
    return Path(os.environ.get("VAEPP_CACHE", Path.home() / ".cache" / "vaepp")).expanduser()


def torch_home() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")).expanduser()


def tracking_root() -> Path:
    """The real repository (DVC_ROOT), also for `dvc exp run --temp` copies, so the MLflow
    database at its root keeps every run."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def device(name: str | None, params_device: str) -> str:
    import torch

    choice = name or params_device
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is available; use --device cpu")
    return choice


def load_run(args):
    from vaepp.config import load_run as _load_run

    return _load_run(args.params, args.run)


def load_data(data_root: Path, run):
    """The run's prepared dataset under data_root/<dataset> cut into its splits
    (`vaepp.data.split_prepared` with data.n_train, n_valid, n_test, subset_seed): a `Splits`.
    Sizes that do not fit the dataset raise DataError here, before any model is fitted or read."""
    from vaepp.data import load_prepared, split_prepared

    prepared = load_prepared(Path(data_root) / run.data.dataset)
    d = run.data
    return split_prepared(prepared, n_train=d.n_train, n_valid=d.n_valid, n_test=d.n_test, subset_seed=d.subset_seed)


def subset_record(indices, n_all: int, seed: int | None) -> dict:
    """Which images a stage scored, for its metrics JSON: seed (None when every image of the split
    is used, in order), n (images scored), of (images in the split) and indices_sha256
    (`vaepp.data.indices_digest` of the indices into the split, in order)."""
    from vaepp.data import indices_digest

    return {"seed": seed, "n": int(indices.numel()), "of": int(n_all), "indices_sha256": indices_digest(indices)}


def record_of_test_images(splits, run) -> dict:
    """`subset_record` of the run's test images (data.n_test of all the test images, seeded)."""
    seed = run.data.subset_seed if run.data.n_test is not None else None
    return subset_record(splits.test_indices, splits.meta["n_test"], seed)


def scored_images(splits, run):
    """The images estimate-nll scores, by nll.split: (uint8 images, indices into their split, record).
    test: the run's test images. valid: a seeded random sample of data.n_test validation images
    (all when null; seed data.subset_seed, the permutation whose prefix the monitor scores), for
    choices made by looking at numbers."""
    from vaepp.data import subset_indices

    if run.nll.split == "test":
        return splits.test, splits.test_indices, record_of_test_images(splits, run)
    n_all = int(splits.valid.shape[0])
    n = None if run.data.n_test is None else min(run.data.n_test, n_all)
    indices = subset_indices(n_all, n, run.data.subset_seed)
    return splits.valid[indices], indices, subset_record(indices, n_all, run.data.subset_seed if n else None)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise RuntimeError(f"{path}: cannot read ({err}); rerun the stage that writes it") from None


SHARED_SECTIONS = ("data", "model", "train", "latent_gan", "nll", "mala", "fid")


def shared_params(params_path: str | Path) -> dict[str, str]:
    """The params file's shared sections flattened with dots (`model.zdim`), its `profile` and
    `runs` (the run names, comma-separated): what the parent MLflow run carries. {} if unreadable."""
    import yaml

    try:
        raw = yaml.safe_load(Path(params_path).read_text()) or {}
    except Exception:  # noqa: BLE001 - an unreadable params file fails in load_run, not here
        return {}
    if not isinstance(raw, dict):
        return {}
    out = flat({k: raw[k] for k in SHARED_SECTIONS if isinstance(raw.get(k), dict)})
    if "profile" in raw:
        out["profile"] = raw["profile"]
    if isinstance(raw.get("runs"), dict):
        out["runs"] = ",".join(map(str, raw["runs"]))
    return {k: str(v) for k, v in out.items()}


def dataset_input(run, meta: dict, data_root: Path | None = None, context: str = "eval") -> dict[str, str] | None:
    """The MLflow dataset input of a stage: name (the dataset), source (JSON: the prepared data
    directory `<data_root>/<dataset>` when known, and meta.json's source description), digest (the
    first 16 hex digits of SHA-256 over the prepared files' SHA-256s, in file-name order), context.
    None without meta (no prepared data known)."""
    import hashlib

    if not meta:
        return None
    files = sorted((meta.get("sha256") or {}).items())
    digest = (
        hashlib.sha256("".join(f"{f}:{h}\n" for f, h in files).encode()).hexdigest()[:16] if files else "unrecorded"
    )
    source = {"uri": f"{Path(data_root).as_posix()}/{run.data.dataset}"} if data_root is not None else {}
    source["description"] = str(meta.get("source", "unknown"))
    return {"name": run.data.dataset, "source": json.dumps(source), "digest": digest, "context": context}


def tracker(params_path: str):
    """The pipeline's MLflow tracker (degrades to no logging with a warning if MLflow fails).

    Environment: DVC_EXP_NAME keys the parent run; MLFLOW_TRACKING_URI overrides the SQLite
    store at the repository root; MLFLOW_EXPERIMENT_NAME overrides "vaepp"; VAEPP_MLFLOW=0
    turns tracking off. In a stage script's process the tracker runs in the tracking process
    started at import (same interface, same failure policy); elsewhere in this process.
    """
    global _TRACKING_PROCESS
    from vaepp.tracking import EXPERIMENT, Tracker

    settings = dict(
        exp_name=os.environ.get("DVC_EXP_NAME", ""),
        git_rev=os.environ.get("DVC_EXP_BASELINE_REV") or None,
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
        experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT,
        parent_params=shared_params(params_path) if tracking_on() else {},
    )
    if _TRACKING_PROCESS is not None and tracking_on():
        proc, _TRACKING_PROCESS = _TRACKING_PROCESS, None
        return proc.open(tracking_root(), Path(params_path), **settings)
    return Tracker.for_pipeline(tracking_root(), params_path=Path(params_path), enabled=tracking_on(), **settings)


def distributed_main(args, run, dev: str, script: str, argv: list[str] | None, body) -> int:
    """Run `body(args, run, ctx)` in this process, or, when `distributed.nproc_per_node` > 1 and
    this process was not started by torchrun, start the stage again under torchrun and wait.
    `ctx` carries the rank, the world size and the device (vaepp.distributed.session)."""
    import subprocess

    from vaepp import distributed as vdist

    launch = vdist.launch_from_env(os.environ)
    cmd = vdist.relaunch_command(
        launch, run.distributed.nproc_per_node, script, sys.argv[1:] if argv is None else argv, sys.executable
    )
    if cmd:
        return subprocess.call(cmd)
    with vdist.session(launch, backend=run.distributed.backend, device=dev) as ctx:
        return body(args, run, ctx)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def numbers(metrics: dict) -> dict:
    """The numeric leaves of a (nested) metrics dict, flattened with dots; booleans left out."""
    return {k: v for k, v in flat(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def stage_run(args, stage: str, run, params: dict, ctx=None, dataset: dict | None = None):
    """The stage's MLflow child run (a context manager giving its log), with `params` flattened
    and `dataset` (`dataset_input`) as its dataset input; on ranks other than 0 a silent no-op."""
    if ctx is not None and not ctx.is_writer:
        from vaepp.tracking import Tracker

        return Tracker(reason=f"rank {ctx.rank}").stage_run(stage, run.name, {})
    return tracker(args.params).stage_run(stage, run.name, flat(params), dataset=dataset)


def progress_logger(log, ctx=None) -> Callable[[str, float, int], None] | None:
    """The evaluation protocols' `callback` (vaepp.evaluate): each progress value logged at once
    to the stage's MLflow run `log` as metric `name` at `step`; None on ranks other than 0, so
    that only the writing rank logs."""
    if ctx is not None and not ctx.is_writer:
        return None
    return lambda name, value, step: log.log_metrics({name: value}, step=step)


def say(message: str) -> None:
    """A line for the user on stderr (stdout carries each stage's one-line result)."""
    print(message, file=sys.stderr)


def guarded(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a stage body: expected errors print one line on stderr and return exit code 2
    (set VAEPP_DEBUG=1 for the traceback); anything else keeps its traceback (a bug)."""
    from vaepp.config import ParamsError

    expected: tuple[type[BaseException], ...] = (ParamsError, RuntimeError, ValueError, OSError)
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except expected as err:
        if os.environ.get("VAEPP_DEBUG"):
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
