"""Test-session settings and the fixtures shared by several test modules."""

import os
import shutil
import subprocess
import time

import pytest

# As in stages/boot.py: idle OpenMP threads sleep rather than spin, so tests and the stage
# processes they start do not slow each other down by orders of magnitude on 2 cores. Set before
# anything imports torch (stage_helpers does: the fixtures import it when they run).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted run of the train stage (tiny profile, EPOCHS epochs, a checkpoint after
    every epoch) in a workspace of its own: what a killed and resumed run must equal bitwise.
    Read-only for its users: copy it before running a stage in it."""
    from stage_helpers import env, train_cmd, workspace

    work = workspace(tmp_path_factory.mktemp("reference"))
    start = time.monotonic()
    proc = subprocess.run(train_cmd(), cwd=work, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    print(f"uninterrupted run: {time.monotonic() - start:.1f} s")
    return work


@pytest.fixture(scope="session")
def reference_full(reference, tmp_path_factory):
    """A copy of the reference run plus its latent GAN and MALA samples: genuine files of every
    kind a later stage reads. Read-only for its users."""
    from stage_helpers import stage

    work = tmp_path_factory.mktemp("reference_full") / "w"
    shutil.copytree(reference, work)
    for name in ("fit-latent-gan", "sample-mala"):
        proc = stage(name, cwd=work)
        assert proc.returncode == 0, proc.stderr
    return work
