"""Helpers of the tests that run stage scripts as real subprocesses, exactly as DVC runs them.

The working directory is a temporary workspace (tiny synthetic prepared dataset, params file) and
the stage modules are those of this repository, run as `python -m stages.<name>` with the
repository on PYTHONPATH (DVC runs them from the repository root, which puts it on sys.path).
Every expected failure must be one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from stage_args import stage_argv, stage_module

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = yaml.safe_load((ROOT / "tests" / "profiles_tiny.yaml").read_text())
RUN = "vaepp"
CKPT = Path("checkpoints") / RUN / "train.ckpt"
VAE = Path("models") / RUN / "vae.pt"
GAN_CKPT = Path("checkpoints") / RUN / "latent_gan.ckpt"
GAN = Path("models") / RUN / "latent_gan.pt"
EPOCHS = 12  # of the kill-and-resume runs: 8 steps each on 512 images, ~0.35 s per epoch
N_TRAIN = 512
N_VALID = TINY["data"]["n_valid"]  # prepared after the training images: 576 in all
STEPS_PER_EPOCH = N_TRAIN // TINY["train"]["batch_size"]


def env(**extra: str) -> dict[str, str]:
    """The environment of a stage run: no DVC/MLflow variables from outside, MLflow off unless a
    test turns it on, downloads cached in a path that holds nothing (no network work), the
    repository importable from any working directory."""
    out = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DVC_", "MLFLOW_")) and k not in ("VAEPP_DEBUG", "VAEPP_MLFLOW")
    }
    out.update(
        VAEPP_MLFLOW="0",
        VAEPP_CACHE=str(Path(os.environ.get("TMPDIR", "/tmp")) / "vaepp-none"),
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONPATH=str(ROOT),
    )
    out.update(extra)
    return out


def params(epochs: int = EPOCHS) -> dict:
    """The tiny profile with `epochs` epochs and a checkpoint after every epoch."""
    raw = copy.deepcopy(TINY)
    raw["train"]["epochs"] = epochs
    raw["train"]["checkpoint_every"] = 1
    return raw


def set_path(raw: dict, keys: list[str], value) -> dict:
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return raw


def write_dataset(work: Path) -> None:
    """512 random 28×28 uint8 training images, then N_VALID validation images, and 64 test
    images, prepared format."""
    from vaepp.data import save_prepared

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (N_TRAIN + N_VALID, 1, 28, 28), generator=g, dtype=torch.uint8)
    test = torch.randint(0, 256, (64, 1, 28, 28), generator=g, dtype=torch.uint8)
    meta = {
        "dataset": "mnist",
        "binary": True,
        "label": "MNIST (synthetic test data)",
        "source": "synthetic test data",
        "stand_in": True,
    }
    save_prepared(work / "data" / "mnist", train, test, meta)


def workspace(path: Path, raw: dict | None = None) -> Path:
    """`path` with the synthetic prepared dataset and a params.yaml (`raw`, default params())."""
    path.mkdir(parents=True, exist_ok=True)
    write_dataset(path)
    (path / "params.yaml").write_text(yaml.safe_dump(raw or params()))
    return path


def stage_cmd(name: str, *extra: str) -> list[str]:
    """DVC stage `name` (e.g. "fit-latent-gan") of run `vaepp` as dvc.yaml runs it, without
    progress bars: `python -m stages.fit_latent_gan <dvc.yaml's arguments> --no-progress`."""
    return [PY, "-m", stage_module(name), *stage_argv(name, RUN), "--no-progress", *extra]


def train_cmd(*extra: str) -> list[str]:
    return stage_cmd("train", *extra)


def stage(name: str, cwd: Path, timeout: float = 300, **env_extra: str) -> subprocess.CompletedProcess:
    """Run DVC stage `name` of run `vaepp` to the end in `cwd` (see stage_cmd)."""
    return subprocess.run(
        stage_cmd(name), cwd=cwd, env=env(**env_extra), capture_output=True, text=True, timeout=timeout
    )


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, exactly one line on stderr holding every needle, no traceback anywhere."""
    out = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, out
    assert proc.returncode == 2, out
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def state_dict(path: Path) -> dict:
    from vaepp.files import load_checkpoint

    return load_checkpoint(path)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ: {differ}"


def history_without_times(path: Path) -> list[dict]:
    from vaepp.files import load_checkpoint

    # wall-clock columns: the epoch's training time and the log-Z monitor's
    return [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in load_checkpoint(path)["history"]]


def checkpoint_epoch(work: Path, rel: Path = CKPT) -> int:
    from vaepp.files import load_checkpoint

    return int(load_checkpoint(work / rel)["epoch"])


def temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(
                f"the process ended (exit {proc.returncode}) before {what}:\n"
                f"{proc.stderr.read() if proc.stderr else ''}"
            )
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def kill_when(cmd: list[str], work: Path, condition, what: str, run_env: dict[str, str] | None = None) -> None:
    """Start `cmd` in `work` (environment `run_env`, default env()) and SIGKILL it as soon as
    `condition()` holds."""
    proc = subprocess.Popen(
        cmd, cwd=work, env=run_env or env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(condition, proc, what=what)
        sigkill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def corruptions(data: bytes, rng: random.Random) -> dict[str, bytes]:
    """Ways a file goes bad: emptied, truncated (early, halfway, one byte short), bytes flipped
    in the middle, replaced by random bytes of the same length."""
    n = len(data)
    flipped = bytearray(data)
    for i in rng.sample(range(n // 4, 3 * n // 4), 3):
        flipped[i] ^= 0xFF
    return {
        "empty": b"",
        "truncated-16": data[:16],
        "truncated-half": data[: n // 2],
        "one-byte-short": data[:-1],
        "flipped": bytes(flipped),
        "random": bytes(rng.getrandbits(8) for _ in range(min(n, 4096))),
    }


HOOKED_TRAIN = '''
"""The train stage (`python -m stages.train`) with a test hook: `pause-write N` stops inside the
N-th write of the training checkpoint (after its bytes are written to the temporary file, before fsync and rename);
`nan-step N RECORD` makes the N-th training step's loss NaN after recording the checkpoint's
SHA-256 in RECORD. Started with the repository root on PYTHONPATH."""
import hashlib, os, runpy, sys, time
from pathlib import Path

mode, n = sys.argv[2], int(sys.argv[3])  # sys.argv[1]: the repository root
if mode == "pause-write":
    real_fsync, seen = os.fsync, [0]

    def fsync(fd):
        if ".train.ckpt." in os.readlink(f"/proc/self/fd/{fd}"):
            seen[0] += 1
            if seen[0] == n:
                Path("IN_CHECKPOINT_WRITE").write_text(os.readlink(f"/proc/self/fd/{fd}"))
                time.sleep(600)
        real_fsync(fd)

    os.fsync = fsync
    rest = sys.argv[4:]
elif mode == "nan-step":
    import vaepp.train as vt

    record, real, calls = Path(sys.argv[4]), vt.elbo_terms, [0]

    def elbo_terms(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            ckpt = Path("checkpoints/vaepp/train.ckpt")
            record.write_text(hashlib.sha256(ckpt.read_bytes()).hexdigest() if ckpt.exists() else "none")
            terms["recon"] = terms["recon"] * float("nan")
        return terms

    vt.elbo_terms = elbo_terms
    rest = sys.argv[5:]
sys.argv = [sys.argv[0], *rest]
runpy.run_module("stages.train", run_name="__main__", alter_sys=True)  # argv[0]: stages/train.py, as with -m
'''


def hooked(work: Path, *hook: str) -> list[str]:
    """The train stage of run `vaepp` with a test hook (HOOKED_TRAIN); run it with hook_env()."""
    script = work / "hooked_train.py"
    script.write_text(HOOKED_TRAIN)
    return [PY, str(script), str(ROOT), *hook, *stage_argv("train", RUN), "--no-progress"]


def hook_env() -> dict[str, str]:
    """env(): the repository root is importable there, for the hook's own `import vaepp.train`."""
    return env()
