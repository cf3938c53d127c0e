"""A stage process's start: `boot()`, the first call of every stage's `main`.

Importing a stage module does nothing but define functions (so tests, benchmarks and scripts can
import them freely); what a stage process needs before its work is done here, once, in this order:

1. environment defaults: MLflow's telemetry and DVC's analytics off, few and short HTTP retries
   for a remote tracking server (an outage cannot stall a stage);
2. the environment check: stop in one line if this Python lacks a module the stages import;
3. the OpenMP wait policy (`choose_omp_wait_policy`), which must be set before torch is first
   imported in the process: the stages import torch only inside functions, after `boot()`;
4. the C library's allocator keeps freed memory for reuse (`keep_freed_memory`);
5. in a stage's own process (`python -m stages.<name>`), the exit handler that freezes the
   garbage collector's objects, and the tracking process (`stages.track.start_process`), started
   after the load sample, which would otherwise count it.

Stages run as `python -m stages.<name>` from the repository root (DVC's working directory; for
`dvc exp run --temp` a copy of it), which puts the root on sys.path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    # A remote tracking server gets few, short retries, so that an outage cannot stall a stage.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}

# What the stages import (requirements.txt). DVC runs `python -m stages.<name>` with the first `python`
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

BUSY_CORES_FOR_PASSIVE = 0.5

_booted: str | None = None  # the OpenMP wait policy once boot() has run in this process
_allocator: str | None = None  # what keep_freed_memory did in this process, once boot() has run


def boot(argv: list[str] | None = None, environ=None) -> str:
    """Prepare this process for a stage (the module docstring's steps); once per process, later
    calls return at once. argv and environ default to sys.argv and os.environ. Returns the OpenMP
    wait policy chosen ("PASSIVE", "default" or the user's setting)."""
    global _booted
    if _booted is not None:
        return _booted
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    for key, value in ENV_DEFAULTS.items():
        environ.setdefault(key, value)
    check_environment()
    policy = choose_omp_wait_policy(environ)
    keep_freed_memory(environ)
    if is_stage_script(argv):
        import atexit

        # exit handlers run last-in first-out: registered first, this one runs after the stage's own
        atexit.register(_freeze_objects_at_exit)
        from stages import track

        track.adopt_process(start_tracking_process(argv, environ))
    _booted = policy
    return policy


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


def choose_omp_wait_policy(environ=None, busy: Callable[[], float | None] = busy_cores) -> str:
    """How idle OpenMP threads wait, decided before torch is first imported (environ: default
    os.environ, where a PASSIVE choice is written).

    Measured on 2 cores (a plain-VAE training step, batch 128, 2 threads): on a quiet machine
    OpenMP's default spinning takes 3.4 ms and PASSIVE (sleeping) 7.9 ms; with another process
    on the cores spinning takes 7.9-10 ms and PASSIVE 5.5 ms, and under heavier sharing spinning
    made tiny latent-GAN layers 40-70x slower. So: a setting the user made is kept; otherwise
    PASSIVE when other processes are busy at start, else OpenMP's default. Returns the choice.
    """
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ:
        return environ["OMP_WAIT_POLICY"]
    if (os.cpu_count() or 1) == 1:
        return "default"  # one OpenMP thread: no idle thread waits, so no sample is needed
    load = busy()
    if load is not None and load >= BUSY_CORES_FOR_PASSIVE:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "PASSIVE"
    return "default"


# glibc's mallopt(3) parameters (<malloc.h>) and the environment variables that set them at start
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
KEEP_BYTES = 1 << 30


def keep_freed_memory(environ=None) -> str:
    """Let glibc's malloc keep freed blocks up to `KEEP_BYTES` (1 GiB) for reuse instead of handing
    them back to the kernel: blocks that large come from the heap, not from a fresh mmap, and the
    heap's free top is not trimmed below 1 GiB. Returns "kept", "user" or "unavailable".

    By default glibc maps every block above its (adaptive) threshold anew and unmaps it on free,
    and trims the heap's top above 128 KiB, so a loop that allocates the same large tensors on
    every pass pays a page fault and the zeroing of a 4 KiB page per 4 KiB touched, on every pass.
    Measured on 2 cores: the NLL's 1024-row chunks took 80-150 thousand page faults per 64 000
    importance samples (60-66k samples/s, 81-86k kept), and Inception about 0.8 million per batch
    of 50 images (10.3-10.9 images/s, 12.8-14.3 kept). The numbers themselves do not change:
    torch aligns every tensor to 64 bytes either way. A process keeps the memory of its peak
    until it exits. A user's own allocator settings (any of `MALLOC_ENV`, or glibc.malloc
    tunables in GLIBC_TUNABLES) are kept; nothing is done where the C library has no mallopt."""
    global _allocator
    environ = os.environ if environ is None else environ
    if any(k in environ for k in MALLOC_ENV) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        _allocator = "user"
    elif _mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) and _mallopt(M_TRIM_THRESHOLD, KEEP_BYTES):
        _allocator = "kept"
    else:
        _allocator = "unavailable"
    return _allocator


def allocator() -> str | None:
    """What `keep_freed_memory` did in this process ("kept", "user", "unavailable"), None before it ran."""
    return _allocator


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(param, value); False where the C library has none or refuses it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(param, value) == 1


def is_stage_script(argv: list[str]) -> bool:
    """True in the process of a stage, `python -m stages.<name>` (argv[0] is then the module's
    file, also under torchrun); false for `python -c`, the test runner, a benchmark."""
    return bool(argv) and argv[0] not in ("", "-c", "-m") and Path(argv[0]).resolve().parent == ROOT / "stages"


def start_tracking_process(argv: list[str], environ):
    """In a stage's process with tracking on (rank 0 or not distributed), start the tracking
    process now: it imports mlflow on the other core while this one imports torch
    (tracking.process.TrackerProcess), and `stages.track.tracker()` hands it the stage's params.
    None in any other process."""
    from stages import track

    if not is_stage_script(argv) or not track.tracking_on(environ) or environ.get("RANK", "0") != "0":
        return None
    from tracking.process import TrackerProcess

    return TrackerProcess.start(ROOT)


def _freeze_objects_at_exit() -> None:
    """The last exit handler of a stage process: move every live object into the garbage
    collector's permanent generation (gc.freeze), so that the interpreter's final collections do
    not walk torch's and torch._dynamo's object graphs once more (0.8 s down to 0.2 s measured on
    2 cores). Exit handlers, flushes and reference-count finalisers still run; the memory of what
    stays goes back with the process."""
    import gc

    gc.freeze()
