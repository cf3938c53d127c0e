"""No loader of the project unpickles arbitrary objects: torch.load(weights_only=True) everywhere,
so a file holding a custom class is refused by name and its code never runs."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from stage_helpers import ROOT, workspace


def _evil(marker):  # what a malicious pickle would run on load
    Path(marker).write_text("code ran")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_evil, (self.marker,))


def test_pickles_with_code_are_refused_by_every_loader(tmp_path):
    """weights_only=True everywhere: a model file, a prepared split and an Inception weights file
    that hold a custom class are refused by name and their code never runs."""
    from acquire import fid_weights as fetch_fid_weights
    from vaepp.data import DataError, load_prepared
    from vaepp.files import CheckpointError, load_checkpoint

    marker = tmp_path / "PWNED"
    evil = tmp_path / "vae.pt"
    torch.save({"model": {}, "payload": _Evil(str(marker))}, evil)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(evil))}: unreadable checkpoint"):
        load_checkpoint(evil)

    work = workspace(tmp_path / "w")
    d = work / "data" / "mnist"
    torch.save({"images": _Evil(str(marker))}, d / "train.pt")
    meta = json.loads((d / "meta.json").read_text())
    meta["sha256"]["train.pt"] = hashlib.sha256((d / "train.pt").read_bytes()).hexdigest()
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="unreadable prepared data"):
        load_prepared(d)

    path = fetch_fid_weights.checkpoint_path(tmp_path / "torch")
    path.parent.mkdir(parents=True)
    torch.save({"Mixed_7c.branch_pool.conv.weight": _Evil(str(marker))}, path)
    data = path.read_bytes()
    record = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    path.with_name(path.name + ".sha256.json").write_text(json.dumps(record))
    with pytest.raises(fetch_fid_weights.FidWeightsError, match="torch.load failed"):
        fetch_fid_weights.verify_inception_weights(path)
    assert not marker.exists()


def test_every_torch_load_in_the_project_is_weights_only():
    """No loader of the project may unpickle arbitrary objects."""
    offenders = []
    for f in [*(ROOT / "vaepp").glob("*.py"), *(ROOT / "stages").glob("*.py")]:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{f.relative_to(ROOT)}:{i}")
            if "allow_pickle=True" in code or "pickle.load" in code:
                offenders.append(f"{f.relative_to(ROOT)}:{i}")
    assert not offenders, offenders
