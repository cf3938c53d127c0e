"""The splits (`vaepp.data.split_prepared`): a validation split cut from the end of the training
images, disjoint from the training split; a test subset that is a uniform random sample of the
whole test set (seeded, never its first n); clear errors for sizes that do not fit; and no test
image reaching training, the latent GAN or the log-Z monitor when the stages run."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch
import yaml

from factories import tiny_params_yaml
from stage_args import stage_argv
from vaepp.data import DataError, PreparedData, indices_digest, save_prepared, split_prepared, subset_indices

SHAPE = (1, 4, 4)


def _labelled(n: int, marker: int) -> torch.Tensor:
    """n uint8 images (n, 1, 4, 4) that carry their index i in pixels 0 and 1 (i = 256·p0 + p1)
    and `marker` in pixel 2: every image is distinct and says where it came from."""
    out = torch.zeros(n, *SHAPE, dtype=torch.uint8)
    i = torch.arange(n)
    out.view(n, -1)[:, 0] = (i // 256).to(torch.uint8)
    out.view(n, -1)[:, 1] = (i % 256).to(torch.uint8)
    out.view(n, -1)[:, 2] = marker
    return out


def _ids(images: torch.Tensor) -> list[int]:
    flat = images.view(images.shape[0], -1).long()
    return (flat[:, 0] * 256 + flat[:, 1]).tolist()


def _prepared(n_train: int = 100, n_test: int = 50) -> PreparedData:
    meta = {"dataset": "mnist", "label": "labelled test images", "n_train": n_train, "n_test": n_test}
    return PreparedData(train=_labelled(n_train, 0), test=_labelled(n_test, 255), meta=meta)


def _split(prepared=None, **kw):
    args = {"n_train": None, "n_valid": 20, "n_test": None, "subset_seed": 0, **kw}
    return split_prepared(prepared or _prepared(), **args)


# ----- split_prepared ----------------------------------------------------------------------------
def test_the_validation_split_is_the_last_n_valid_training_images_and_disjoint_from_training():
    s = _split()
    assert _ids(s.train) == list(range(80)) and _ids(s.valid) == list(range(80, 100))
    assert not set(_ids(s.train)) & set(_ids(s.valid))
    short = _split(n_train=30)  # n_train cuts the training split, never the validation split
    assert _ids(short.train) == list(range(30)) and _ids(short.valid) == list(range(80, 100))
    assert (s.train[:, 0, 0, 2] == 0).all() and (s.valid[:, 0, 0, 2] == 0).all()  # no test image


def test_all_test_images_in_order_without_n_test():
    s = _split()
    assert torch.equal(s.test_indices, torch.arange(50)) and _ids(s.test) == list(range(50))
    assert s.test_indices.dtype == torch.int64


def test_the_test_subset_is_a_seeded_random_sample_never_the_first_n():
    s = _split(n_test=20, subset_seed=3)
    idx = s.test_indices
    assert idx.shape == (20,) and idx.dtype == torch.int64 and len(set(idx.tolist())) == 20
    assert 0 <= int(idx.min()) and int(idx.max()) < 50
    assert _ids(s.test) == idx.tolist()  # the images are test[indices], in that order
    assert sorted(idx.tolist()) != list(range(20))  # not the first 20
    assert torch.equal(idx, torch.randperm(50, generator=torch.Generator().manual_seed(3))[:20])
    assert torch.equal(_split(n_test=20, subset_seed=3).test_indices, idx)  # same seed, same images
    assert not torch.equal(_split(n_test=20, subset_seed=4).test_indices, idx)  # another seed, others
    # a smaller n is a prefix of a larger one (the dim-z study's 512 are the default's first 512)
    assert torch.equal(_split(n_test=7, subset_seed=3).test_indices, idx[:7])


def test_the_test_subset_is_uniform_over_the_whole_test_set():
    """Each of 10 items is in a 3-of-10 sample with probability 0.3, and so is each place of it:
    2000 seeds, within 5 standard errors (0.01)."""
    n_seeds = 2000
    draws = torch.stack([subset_indices(10, 3, seed) for seed in range(n_seeds)])  # (2000, 3)
    inclusion = torch.bincount(draws.flatten(), minlength=10).double() / n_seeds
    assert (inclusion - 0.3).abs().max() < 5 * (0.3 * 0.7 / n_seeds) ** 0.5
    first = torch.bincount(draws[:, 0], minlength=10).double() / n_seeds  # every prefix is a sample too
    assert (first - 0.1).abs().max() < 5 * (0.1 * 0.9 / n_seeds) ** 0.5
    # MNIST's shape: 2000 of 10 000 draw from both halves (the halves come from different writers)
    mnist = subset_indices(10_000, 2000, 0)
    assert abs(int((mnist >= 5000).sum()) - 1000) < 5 * 20  # hypergeometric sd ≈ 20


@pytest.mark.parametrize(
    ("kw", "needles"),
    [
        ({"n_valid": 100}, ["data.n_valid = 100", "100 prepared training images", "n_valid < 100"]),
        ({"n_valid": 150}, ["data.n_valid = 150"]),
        ({"n_valid": 0}, ["data.n_valid = 0"]),
        ({"n_test": 51}, ["data.n_test = 51", "50 test images", "null for all"]),
        ({"n_train": 81}, ["data.n_train = 81", "80 images", "n_valid 20", "n_train <= 80"]),
        ({"n_valid": 50, "n_train": 60}, ["data.n_train = 60", "50 images"]),
    ],
)
def test_sizes_that_do_not_fit_raise_a_data_error_naming_key_value_and_remedy(kw, needles):
    with pytest.raises(DataError) as err:
        _split(**kw)
    msg = str(err.value)
    assert "\n" not in msg and "labelled test images" in msg
    for needle in needles:
        assert needle in msg, msg


def test_the_largest_sizes_that_fit_are_accepted():
    s = _split(n_valid=99, n_train=1, n_test=50)
    assert (len(s.train), len(s.valid), len(s.test)) == (1, 99, 50)
    assert sorted(s.test_indices.tolist()) == list(range(50))  # all 50, in a random order


def test_indices_digest_is_the_sha256_of_the_int64_bytes():
    idx = subset_indices(100, 10, 1)
    want = hashlib.sha256(np.asarray(idx.tolist(), dtype="<i8").tobytes()).hexdigest()
    assert indices_digest(idx) == want and indices_digest(idx[:9]) != want


# ----- no test image reaches a fit or the monitor ------------------------------------------------
IMAGE = (1, 8, 8)
N_TRAIN, N_VALID, N_TEST = 64, 16, 16
OVERRIDES = {
    "data": {"n_train": None, "n_valid": N_VALID, "n_test": 8, "subset_seed": 0},
    "model": {"hidden": [16, 16], "zdim": 3},
    "train": {"epochs": 2, "batch_size": 16, "n_prior_samples": 16, "log_z_every": 1, "monitor": {"valid_images": 8}},
    "latent_gan": {"hidden": [8, 8], "critic_hidden": [8, 8], "epochs": 1, "batch_size": 16, "n_critic": 2},
    "nll": {"n_importance": 4, "n_passes": 1, "batch_images": 4},
    "runs": {"vaepp": {"prior": "pullback"}},
}


def _write_recognisable_dataset(root):
    """Binary images (0 / 255, so a binarisation of e = x/255 is x itself): training and
    validation images with pixel 0 off, test images with pixel 0 on, so no test image equals any
    image of the other splits."""
    g = torch.Generator().manual_seed(0)

    def binary(n: int, first: int) -> torch.Tensor:
        x = ((torch.rand(n, *IMAGE, generator=g) > 0.5) * 255).to(torch.uint8)
        x.view(n, -1)[:, 0] = first
        return x

    train, test = binary(N_TRAIN + N_VALID, 0), binary(N_TEST, 255)
    meta = {"dataset": "mnist", "binary": True, "label": "MNIST (recognisable test stand-in)", "stand_in": True}
    meta["source"] = "synthetic test data"
    save_prepared(root / "data" / "mnist", train, test, meta)
    return train, test


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Images as soft targets, one row each: uint8 grey levels / 255, float e as it is."""
    x = x.detach().cpu()
    return (x.double() / 255.0 if x.dtype == torch.uint8 else x.double()).reshape(x.shape[0], -1)


def _matches(x: torch.Tensor, images: torch.Tensor) -> int:
    """How many rows of x equal one of `images` exactly."""
    return int((_rows(x)[:, None, :] == _rows(images)[None]).all(-1).any(-1).sum())


@pytest.fixture
def recognisable_workspace(tmp_path, monkeypatch):
    train, test = _write_recognisable_dataset(tmp_path)
    (tmp_path / "params.yaml").write_text(tiny_params_yaml(OVERRIDES))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    monkeypatch.setenv("VAEPP_CACHE", str(tmp_path / "cache"))
    return tmp_path, train, test


def test_no_test_image_reaches_training_the_latent_gan_or_the_monitor(recognisable_workspace, monkeypatch):
    """The train and fit-latent-gan stages run in this process while every image tensor handed
    to the training loop, the latent GAN's posterior pool and the log-Z monitor, and every input
    of image shape to any network (encoder, critic), is compared with every test image."""
    from stages import fit_latent_gan, train
    from vaepp import fit

    work, prepared_train, test = recognisable_workspace
    fitted, monitored, pooled = [], [], []
    seen = {"rows": 0, "test_rows": 0}

    def recording(real, into):
        def wrapper(*args, **kwargs):
            into.append(args[1].clone())  # (model|encode|run, images, ...)
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(fit, "train", recording(fit.train, fitted))
    monkeypatch.setattr(fit, "log_z_monitor", recording(fit.log_z_monitor, monitored))
    monkeypatch.setattr(fit, "posterior_samples", recording(fit.posterior_samples, pooled))

    def every_network_input(module, args):
        for x in args:
            if isinstance(x, torch.Tensor) and x.dim() == 4 and tuple(x.shape[1:]) == IMAGE:
                seen["rows"] += x.shape[0]
                seen["test_rows"] += _matches(x, test)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(every_network_input)
    try:
        for stage, name in ((train, "train"), (fit_latent_gan, "fit-latent-gan")):
            assert stage.main(stage_argv(name, "vaepp", "--no-progress")) == 0, name
    finally:
        hook.remove()

    train_split, valid_split = prepared_train[:N_TRAIN], prepared_train[N_TRAIN:]
    assert len(fitted) == 1 and torch.equal(fitted[0], train_split)  # the training split, all of it
    assert len(pooled) == 1 and torch.equal(pooled[0], train_split)
    assert len(monitored) == 2  # after each epoch (log_z_every 1)
    for images in monitored:
        assert torch.equal(images, monitored[0])  # the same images at every check
        assert images.shape[0] == 8 and _matches(images, valid_split) == 8  # validation images only
    assert not torch.equal(monitored[0], valid_split[:8])  # a seeded random sample of them
    for images in (*fitted, *monitored, *pooled):
        assert _matches(images, test) == 0
    assert seen["rows"] > 2 * N_TRAIN and seen["test_rows"] == 0, seen


def test_estimate_nll_scores_the_test_subset_and_records_it(recognisable_workspace):
    """The per-image CSV names each scored image's index in the full test set; nll.json records
    the subset (seed, n, of, SHA-256 of the indices); the q-based log Ẑ_q counts the training split."""
    from stages import estimate_nll, train

    work, _, _ = recognisable_workspace
    for stage, name in ((train, "train"), (estimate_nll, "estimate-nll")):
        assert stage.main(stage_argv(name, "vaepp", "--no-progress")) == 0, name
    want = subset_indices(N_TEST, 8, 0)
    with open(work / "metrics" / "vaepp" / "nll_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["image"]) for r in rows] == list(range(8))
    assert [int(r["test_index"]) for r in rows] == want.tolist()
    assert all(np.isfinite(float(r["nll_nats"])) for r in rows)
    nll = json.loads((work / "metrics" / "vaepp" / "nll.json").read_text())
    assert nll["test_subset"] == {"seed": 0, "n": 8, "of": N_TEST, "indices_sha256": indices_digest(want)}
    assert nll["log_z"]["paper_q"]["extra"]["n_train"] == N_TRAIN  # N of Ẑ_q: the training split


def test_estimate_nll_on_the_validation_split_scores_no_test_image(recognisable_workspace, monkeypatch):
    """nll.split: valid (choices made by looking at numbers) scores a seeded random sample of
    validation images, records it as valid_subset and per-image valid_index, and no test image."""
    import vaepp.nll_protocol as protocol
    from stages import estimate_nll, train

    work, full_train, test = recognisable_workspace
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["nll"]["split"] = "valid"
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    scored = []
    real = protocol.nll_protocol
    monkeypatch.setattr(
        protocol,
        "nll_protocol",
        lambda m, c, tr, images, *a, **k: scored.append(images) or real(m, c, tr, images, *a, **k),
    )
    for stage, name in ((train, "train"), (estimate_nll, "estimate-nll")):
        assert stage.main(stage_argv(name, "vaepp", "--no-progress")) == 0, name
    want = subset_indices(N_VALID, 8, 0)
    assert _matches(scored[0], test) == 0 and torch.equal(scored[0], full_train[N_TRAIN:][want])
    with open(work / "metrics" / "vaepp" / "nll_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["valid_index"]) for r in rows] == want.tolist()
    nll = json.loads((work / "metrics" / "vaepp" / "nll.json").read_text())
    assert nll["split"] == "valid" and "test_subset" not in nll
    assert nll["valid_subset"] == {"seed": 0, "n": 8, "of": N_VALID, "indices_sha256": indices_digest(want)}
    assert "8 validation images" in nll["protocol"]


def test_the_params_state_every_split_setting():
    """All four DataParams keys are required (no silent default), in every committed file."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for f in (root / "params.yaml", root / "profiles" / "paper.yaml", root / "tests" / "profiles_tiny.yaml"):
        data = yaml.safe_load(f.read_text())["data"]
        assert {"dataset", "n_train", "n_valid", "n_test", "subset_seed"} <= data.keys(), f


# ----- compute-fid's held-out test images ---------------------------------------------------------
def _tiny_run(**data):
    from vaepp.config import parse_params, resolve_run

    raw = yaml.safe_load(tiny_params_yaml({"data": data}))
    return resolve_run(parse_params(raw), "vaepp")


def test_fid_feature_caches_name_the_test_sample_not_only_the_file():
    from stages.compute_fid import split_digests

    prepared = _prepared()
    prepared.meta["sha256"] = {"train.pt": "a" * 64, "test.pt": "b" * 64}

    def digests(**data):
        run = _tiny_run(n_train=None, n_valid=20, **data)
        d = run.data
        splits = split_prepared(prepared, n_train=None, n_valid=20, n_test=d.n_test, subset_seed=d.subset_seed)
        return split_digests(splits, run)

    whole = digests(n_test=None, subset_seed=0)
    assert whole == {"train": "a" * 64, "test": "b" * 64}  # the files, in order
    sample = digests(n_test=10, subset_seed=0)
    assert sample["train"] == "a" * 64 and sample["test"] not in ("b" * 64, whole["test"])
    assert digests(n_test=10, subset_seed=1)["test"] != sample["test"]
    assert digests(n_test=10, subset_seed=0) == sample


def test_the_fid_protocol_says_the_held_out_test_images_are_a_random_sample():
    from stages.compute_fid import sampled_splits
    from vaepp.fid_protocol import images_text

    def text(run):
        sampled = sampled_splits(run)
        return (
            f"400 samples vs {images_text(400, 'train', sampled)} of mnist, pytorch-fid Inception pool3; "
            f"floor: {images_text(400, 'test', sampled)} (held out) vs the same 400 train images"
        )

    sampled = text(_tiny_run(n_test=32, subset_seed=5))
    assert "floor: 400 test images drawn at random (subset_seed 5) (held out)" in sampled
    assert "the first 400 train images" in sampled and "first 400 test" not in sampled
    everything = text(_tiny_run(n_test=None, subset_seed=5))
    assert everything == (
        "400 samples vs the first 400 train images of mnist, pytorch-fid Inception pool3; "
        "floor: the first 400 test images (held out) vs the same 400 train images"
    )  # all, in order
