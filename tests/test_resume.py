"""Kill and resume: a stage killed with SIGKILL (anywhere, even inside a checkpoint write) and
rerun ends bitwise equal to an uninterrupted run; a checkpoint it cannot or must not use is set
aside with one warning.

The uninterrupted training run is the session fixture `reference` (tests/conftest.py).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from stage_helpers import (
    CKPT,
    EPOCHS,
    GAN,
    GAN_CKPT,
    RUN,
    TINY,
    VAE,
    assert_same_weights,
    checkpoint_epoch,
    env,
    history_without_times,
    hook_env,
    hooked,
    kill_when,
    params,
    sigkill,
    stage,
    stage_cmd,
    state_dict,
    temporaries,
    train_cmd,
    workspace,
)

pytestmark = pytest.mark.slow  # stage processes killed and rerun: `make test-slow`

GAN_EPOCHS = 120  # one generator step per epoch on the 512-image pool: a few seconds in all
FIT_GAN = stage_cmd("fit-latent-gan")


def run(cmd: list[str], work: Path) -> subprocess.CompletedProcess:
    """Run `cmd` to the end in `work`; it must succeed."""
    proc = subprocess.run(cmd, cwd=work, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_sigkill_after_first_checkpoint_resumes_to_the_same_weights(reference, tmp_path):
    """A training process killed with SIGKILL once its first checkpoint exists; the rerun says it
    resumes and ends bitwise equal (weights and per-epoch metrics) to the uninterrupted run."""
    work = workspace(tmp_path / "killed")
    kill_when(train_cmd(), work, lambda: (work / CKPT).exists(), "the first checkpoint")
    epoch = checkpoint_epoch(work)
    assert 1 <= epoch < EPOCHS and not (work / VAE).exists()
    start = time.monotonic()
    rerun = run(train_cmd(), work)
    assert f"{CKPT}: resuming from epoch {epoch}" in rerun.stderr
    metrics = json.loads((work / "metrics" / RUN / "train.json").read_text())
    assert metrics["resumed_from_epoch"] == epoch and metrics["epochs"] == EPOCHS
    assert_same_weights(state_dict(work / VAE), state_dict(reference / VAE))
    assert history_without_times(work / VAE) == history_without_times(reference / VAE)
    assert temporaries(work) == []
    assert not (work / CKPT).exists()  # done with: removed once the outputs are written
    print(f"killed after epoch {epoch}; resumed run took {time.monotonic() - start:.1f} s")


def gan_workspace(reference: Path, path: Path) -> Path:
    """The reference run's trained VAE and data, with a latent GAN of GAN_EPOCHS epochs."""
    shutil.copytree(reference, path, ignore=shutil.ignore_patterns("checkpoints"))
    raw = params()
    raw["latent_gan"]["epochs"] = GAN_EPOCHS
    (path / "params.yaml").write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def whole_gan_fit(reference, tmp_path_factory) -> Path:
    """An uninterrupted fit-latent-gan of GAN_EPOCHS epochs on the reference run's VAE."""
    whole = gan_workspace(reference, tmp_path_factory.mktemp("gan") / "whole")
    run(FIT_GAN, whole)
    return whole


def test_sigkill_of_the_latent_gan_fit_resumes_to_the_same_networks(reference, whole_gan_fit, tmp_path):
    """fit-latent-gan killed with SIGKILL once its first checkpoint exists; the rerun resumes and
    ends bitwise equal (weights and per-epoch metrics) to an uninterrupted fit."""
    work = gan_workspace(reference, tmp_path / "killed")
    kill_when(FIT_GAN, work, lambda: (work / GAN_CKPT).exists(), "the first latent-GAN checkpoint")
    epoch = checkpoint_epoch(work, GAN_CKPT)
    assert 1 <= epoch < GAN_EPOCHS and not (work / GAN).exists()
    rerun = run(FIT_GAN, work)
    assert f"{GAN_CKPT}: resuming from epoch {epoch}" in rerun.stderr
    assert_same_weights(state_dict(work / GAN), state_dict(whole_gan_fit / GAN))
    assert history_without_times(work / GAN) == history_without_times(whole_gan_fit / GAN)
    assert temporaries(work) == [] and not (work / GAN_CKPT).exists()
    print(f"latent GAN killed after epoch {epoch} of {GAN_EPOCHS}; resumed to the same networks")


def test_latent_gan_checkpoint_of_another_vae_is_not_resumed(reference, whole_gan_fit, tmp_path):
    """A leftover latent-GAN checkpoint whose posterior samples came from another VAE (its file
    digest differs) is set aside with one warning and the fit starts afresh, to the same networks
    as an uninterrupted fit."""
    from vaepp.config import load_run
    from vaepp.files import atomic_torch_save, load_checkpoint
    from vaepp.latent_gan import latent_gan_settings

    work = gan_workspace(reference, tmp_path / "w")
    settings = latent_gan_settings(load_run(work / "params.yaml", RUN).latent_gan, TINY["model"]["zdim"])
    atomic_torch_save({**settings, "epoch": 3, "history": [], "vae_sha256": "0" * 64}, work / GAN_CKPT)
    proc = stage("fit-latent-gan", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert f"{GAN_CKPT}: written with other settings; starting afresh" in proc.stderr
    assert len(load_checkpoint(work / GAN)["history"]) == GAN_EPOCHS  # every epoch fitted anew
    assert_same_weights(state_dict(work / GAN), state_dict(whole_gan_fit / GAN))


def test_sigkill_inside_a_checkpoint_write_leaves_the_previous_checkpoint(reference, tmp_path):
    """Killed while the third checkpoint's bytes sit in the temporary file: the checkpoint on
    disk is still the second one and loads; the rerun removes the stray temporary, resumes
    from epoch 2 and ends bitwise equal to the uninterrupted run."""
    work = workspace(tmp_path / "in-write")
    kill_when(
        hooked(work, "pause-write", "3"),
        work,
        lambda: (work / "IN_CHECKPOINT_WRITE").exists(),
        "the third checkpoint write",
        run_env=hook_env(),
    )
    stray = temporaries(work / CKPT.parent)
    assert len(stray) == 1 and stray[0].stat().st_size > 0
    assert checkpoint_epoch(work) == 2
    rerun = run(train_cmd(), work)
    assert f"{CKPT}: resuming from epoch 2" in rerun.stderr
    assert temporaries(work) == []
    assert_same_weights(state_dict(work / VAE), state_dict(reference / VAE))


def checkpoint_signature(work: Path):
    try:
        st = (work / CKPT).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def test_sigkill_at_random_moments_never_tears_the_checkpoint(reference, tmp_path):
    """Four SIGKILLs at random moments of training: each process is let through two checkpoint
    writes (so that it is inside its loop whatever the machine's load), then killed after a
    random fraction (0-1) of the time between them. After each kill the checkpoint loads and
    never goes back in epochs; the final rerun equals the uninterrupted run bitwise."""
    work = workspace(tmp_path / "random")
    rng = random.Random(2)
    epochs, in_write = [0], 0
    for _ in range(4):
        proc = subprocess.Popen(
            train_cmd(), cwd=work, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            sig, times = checkpoint_signature(work), []
            for _ in range(2):  # two checkpoint writes: the process is in its training loop
                while checkpoint_signature(work) == sig and proc.poll() is None:
                    time.sleep(0.005)
                sig = checkpoint_signature(work)
                times.append(time.monotonic())
            if proc.poll() is not None:
                break
            time.sleep(rng.uniform(0.0, 1.0) * (times[1] - times[0]))  # a random moment of an epoch
            if proc.poll() is not None:
                break
            sigkill(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        in_write += bool(temporaries(work / CKPT.parent))
        epochs.append(checkpoint_epoch(work))
        assert epochs[-1] >= epochs[-2] and not (work / VAE).exists()
    run(train_cmd(), work)
    assert_same_weights(state_dict(work / VAE), state_dict(reference / VAE))
    assert temporaries(work) == []
    assert len(epochs) >= 3, "the runs finished before two kills"
    print(f"checkpoint epoch after each kill: {epochs[1:]}; {in_write} kill(s) inside a write")


def test_unreadable_training_checkpoint_is_reported_once_and_training_starts_afresh(tmp_path):
    """A garbled checkpoint is never used: one warning naming it, then a fresh run of every epoch
    whose model file loads (and whose checkpoint, done with, is removed)."""
    work = workspace(tmp_path / "w", params(epochs=1))
    (work / CKPT).parent.mkdir(parents=True)
    (work / CKPT).write_bytes(b"PK\x03\x04 not really a checkpoint")
    proc = run(train_cmd(), work)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {CKPT}: ") and "starting afresh" in lines[0]
    metrics = json.loads((work / "metrics" / RUN / "train.json").read_text())
    assert metrics["resumed_from_epoch"] == 0 and metrics["epochs"] == 1
    assert len(history_without_times(work / VAE)) == 1 and not (work / CKPT).exists()
