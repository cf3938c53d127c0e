"""A non-finite loss stops training in one line naming epoch and step, and leaves behind only a
checkpoint that is genuinely the last good one (or none)."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
import torch

from stage_helpers import (
    CKPT,
    STEPS_PER_EPOCH,
    VAE,
    assert_clean_failure,
    checkpoint_epoch,
    hook_env,
    hooked,
    temporaries,
    workspace,
)


def test_nan_loss_stops_with_epoch_and_step_and_writes_nothing(tmp_path):
    """The 19th step (epoch 3, step 2 counted from 0) gets a NaN loss: one line naming epoch and
    step, exit 2; the epoch-2 checkpoint is byte-for-byte the one on disk when the NaN struck
    and loads; no model, metrics, curve or temporary file is left behind."""
    work = workspace(tmp_path / "nan")
    record = tmp_path / "checkpoint_at_nan.sha256"
    nth = 2 * STEPS_PER_EPOCH + 3
    proc = subprocess.run(
        hooked(work, "nan-step", str(nth), str(record)),
        cwd=work,
        env=hook_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = assert_clean_failure(proc, "non-finite loss", "epoch 3, step 2", f"kept at {CKPT}")
    assert hashlib.sha256((work / CKPT).read_bytes()).hexdigest() == record.read_text()
    assert checkpoint_epoch(work) == 2
    assert not (work / VAE).exists()
    assert not (work / "metrics").exists() and not (work / "plots").exists()
    assert temporaries(work) == []
    assert line.startswith("error: non-finite loss (nan)")


def test_nan_before_any_checkpoint_claims_none(tmp_path):
    """A NaN in the first step: the error must not point at a checkpoint that does not exist."""
    from factories import model_spec, train_params
    from vaepp.checkpoints import Checkpoint
    from vaepp.model import VAEPP
    from vaepp.optim import NonFiniteLossError
    from vaepp.train import train

    torch.manual_seed(0)
    model = VAEPP(model_spec((1, 8, 8), zdim=2, hidden=(8,), likelihood="bernoulli"))
    with torch.no_grad():
        model.decoder.net[0].weight.fill_(float("nan"))
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    ckpt = tmp_path / "train.ckpt"
    params = train_params(batch_size=16, n_prior_samples=8, epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 0; training stopped$"):
        train(model, images, params, checkpoint=Checkpoint(ckpt))
    assert not ckpt.exists() and list(tmp_path.iterdir()) == []
