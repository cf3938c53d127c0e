"""Corrupt inputs are refused by name: checkpoints and models, the prepared dataset, the FID
statistics cache and the Inception weights, each corrupted six ways; and a stage that reads a
corrupt file first stops in one line naming it."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil

import pytest
import torch

from stage_helpers import CKPT, VAE, assert_clean_failure, corruptions, stage, workspace


def test_corrupt_checkpoints_and_models_are_refused_by_name(reference, tmp_path):
    """A genuine training checkpoint and model file, each corrupted six ways: load_checkpoint
    raises CheckpointError naming the file and the remedy (one line) — a flipped byte inside a
    tensor included, which torch alone would load."""
    from factories import model_spec, train_params
    from vaepp.checkpoints import Checkpoint
    from vaepp.files import CheckpointError, load_checkpoint
    from vaepp.model import VAEPP
    from vaepp.train import train

    rng = random.Random(4)
    # the stage removes its checkpoint once done; the library's own training writes a genuine one
    genuine = tmp_path / "genuine"
    train(
        VAEPP(model_spec((1, 28, 28), zdim=3, hidden=(8,))),
        torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8),
        train_params(epochs=1, batch_size=32, n_prior_samples=8),
        checkpoint=Checkpoint(genuine / CKPT),
    )
    files = [(genuine, CKPT), (reference, VAE)]
    n = 0
    for where, rel in files:
        data = (where / rel).read_bytes()
        load_checkpoint(where / rel)  # the genuine file loads
        for how, bad in corruptions(data, rng).items():
            path = tmp_path / f"{how}-{rel.name}"
            path.write_bytes(bad)
            with pytest.raises(CheckpointError) as err:
                load_checkpoint(path)
            msg = str(err.value)
            assert str(path) in msg and "rerun the stage" in msg and "\n" not in msg, (rel, how, msg)
            n += 1
    assert n == 12


def test_corrupt_prepared_data_is_refused_by_name(tmp_path):
    """The prepared dataset: each split corrupted six ways, meta.json garbled, and a corrupt
    file whose checksum was updated to match (so only the load check can catch it)."""
    from vaepp.data import DataError, load_prepared

    work = workspace(tmp_path / "w")
    good = work / "data" / "mnist"
    load_prepared(good)
    rng = random.Random(5)
    for split in ("train.pt", "test.pt"):
        for how, bad in corruptions((good / split).read_bytes(), rng).items():
            d = tmp_path / f"{split}-{how}"
            shutil.copytree(good, d)
            (d / split).write_bytes(bad)
            with pytest.raises(DataError, match=rf"^{re.escape(str(d / split))}: .*prepare-data"):
                load_prepared(d)
    d = tmp_path / "meta"
    shutil.copytree(good, d)
    (d / "meta.json").write_text((good / "meta.json").read_text()[:-20])
    with pytest.raises(DataError, match=rf"^{re.escape(str(d / 'meta.json'))}: corrupt"):
        load_prepared(d)
    d = tmp_path / "rehashed"
    shutil.copytree(good, d)
    data = bytearray((d / "train.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "train.pt").write_bytes(bytes(data))
    meta = json.loads((d / "meta.json").read_text())
    meta["sha256"]["train.pt"] = hashlib.sha256(bytes(data)).hexdigest()
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"^{re.escape(str(d / 'train.pt'))}: unreadable prepared data .*CRC-32"):
        load_prepared(d)


class _FakeFeatures(torch.nn.Module):
    """A stand-in for Inception: 8 fixed random projections of the image (no weights file)."""

    fid_weights_sha256 = "0" * 64

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(3 * 28 * 28, 8, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return x.flatten(1) @ self.proj


def test_corrupt_fid_statistics_cache_is_refused_by_name(tmp_path):
    """Cached reference statistics corrupted six ways: FidCacheError naming the file and the
    remedy; the images are never re-read to overwrite the evidence."""
    from vaepp import fid_cache

    net = _FakeFeatures()
    images = torch.rand(20, 1, 28, 28)
    _, _, n = fid_cache.reference_statistics("synthetic-train-first20", lambda: images, tmp_path, net)
    path = tmp_path / "synthetic-train-first20.npz"
    assert path.is_file() and n == 20
    data = path.read_bytes()

    def never():
        raise AssertionError("the images were read again: the corrupt cache was not detected")

    for how, bad in corruptions(data, random.Random(7)).items():
        path.write_bytes(bad)
        with pytest.raises(fid_cache.FidCacheError) as err:
            fid_cache.reference_statistics("synthetic-train-first20", never, tmp_path, net)
        assert str(path) in str(err.value) and "delete" in str(err.value), how


def test_corrupt_inception_weights_are_refused_by_name(tmp_path):
    """A weights file with its checksum record, corrupted six ways, and a file with no record:
    FidWeightsError naming the file and the remedy."""
    from acquire import fid_weights as fetch_fid_weights

    path = fetch_fid_weights.checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save({"Mixed_7c.branch_pool.conv.weight": torch.randn(4, 4)}, path)
    data = path.read_bytes()
    side = path.with_name(path.name + ".sha256.json")
    record = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "source": "test"}
    side.write_text(json.dumps(record))
    assert fetch_fid_weights.verify_inception_weights(path) == hashlib.sha256(data).hexdigest()
    for how, bad in corruptions(data, random.Random(8)).items():
        path.write_bytes(bad)
        with pytest.raises(fetch_fid_weights.FidWeightsError) as err:
            fetch_fid_weights.verify_inception_weights(path)
        assert str(path) in str(err.value) and "Remedy" in str(err.value), how
    path.write_bytes(data)
    side.unlink()
    with pytest.raises(fetch_fid_weights.FidWeightsError, match="no recorded checksum"):
        fetch_fid_weights.verify_inception_weights(path)


CORRUPT_STAGE_CASES = [  # (file, how, stage that reads it first, needles)
    ("data/mnist/train.pt", "truncated-half", "train", ["data/mnist/train.pt", "checksum mismatch", "prepare-data"]),
    ("data/mnist/meta.json", "truncated-half", "train", ["data/mnist/meta.json", "corrupt"]),
    ("models/vaepp/vae.pt", "flipped", "fit-latent-gan", ["models/vaepp/vae.pt", "CRC-32"]),
    ("models/vaepp/vae.pt", "truncated-half", "estimate-nll", ["models/vaepp/vae.pt", "truncated"]),
    ("models/vaepp/latent_gan.pt", "one-byte-short", "sample-mala", ["models/vaepp/latent_gan.pt"]),
    ("metrics/vaepp/mala.json", "truncated-half", "compute-fid", ["metrics/vaepp/mala.json", "rerun"]),
    ("samples/vaepp/images.pt", "random", "compute-fid", ["samples/vaepp/images.pt", "rerun the stage"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rel", "how", "name", "needles"), CORRUPT_STAGE_CASES, ids=[f"{c[0]}-{c[1]}" for c in CORRUPT_STAGE_CASES]
)
def test_stage_with_a_corrupt_input_fails_in_one_line(reference_full, tmp_path, rel, how, name, needles):
    """The stage that reads a corrupt file first stops in one line naming it; exit 2."""
    work = tmp_path / "w"
    shutil.copytree(reference_full, work, ignore=shutil.ignore_patterns("checkpoints"))
    data = (work / rel).read_bytes()
    (work / rel).write_bytes(corruptions(data, random.Random(9))[how])
    proc = stage(name, cwd=work)
    assert_clean_failure(proc, *needles)
