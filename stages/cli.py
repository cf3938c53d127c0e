"""A stage's command line and process: its arguments, device, messages, exit codes, the download
caches it is pointed at, and its relaunch under torchrun.

Edge code: it reads argv and the environment, so that the `vaepp` library never does. Nothing
here imports torch or the library at import time (`stages.boot`).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path


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
    """Where torch keeps downloaded weights: $TORCH_HOME or ~/.cache/torch."""
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")).expanduser()


def device(name: str | None, params_device: str) -> str:
    """The device the stage runs on: --device, else the params' `device`; "auto" is CUDA when
    available. A CUDA device asked for but missing is an error, not a silent CPU run."""
    import torch

    from vaepp import resolve

    return resolve.device(name or params_device, torch.cuda.is_available())


def distributed_main(args, run, dev: str, module: str, argv: list[str] | None, body) -> int:
    """Run `body(args, run, ctx)` in this process, or, when `distributed.nproc_per_node` > 1 and
    this process was not started by torchrun, start the stage module `module` (e.g.
    "stages.train") again under `torchrun -m` and wait. `ctx` carries the rank, the world size and
    the device (vaepp.distributed.session)."""
    import subprocess

    from vaepp import distributed as vdist

    launch = vdist.launch_from_env(os.environ)
    cmd = vdist.relaunch_command(
        launch,
        run.distributed.nproc_per_node,
        module,
        sys.argv[1:] if argv is None else argv,
        sys.executable,
        module=True,
    )
    if cmd:
        return subprocess.call(cmd)
    with vdist.session(launch, backend=run.distributed.backend, device=dev) as ctx:
        return body(args, run, ctx)


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
