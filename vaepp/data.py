"""Datasets in the prepared on-disk form every stage reads, the soft target and its binarisation.

A prepared dataset is a directory with
  train.pt, test.pt  — {"images": uint8 tensor (N, C, H, W)} (grey levels 0..255; the soft
                        target e = images / 255, binarised per pass where the data is binary)
  meta.json          — dataset, label (as shown in reports), source, binary, stand_in,
                        n_train, n_test, image_shape, and the SHA-256 of both tensor files.

The splits (`split_prepared`): the last n_valid prepared training images are the validation split
(train[50 000:] on MNIST with n_valid 10 000: the VampPrior / IWAE convention), the first n_train
of the rest the training split, and the test split all test images or a seeded random sample of
them (MNIST's test set is not shuffled: its two halves come from different writers, so its first
n images are not a sample of it).

Binary datasets (MNIST family, Omniglot) keep their grey levels: the training objective uses the
soft target e and tests draw a fresh binarisation x ~ Bernoulli(e) (`binarize`) every pass.

`load_idx` reads MNIST / Fashion-MNIST IDX files already on disk, under torchvision's names in
<cache>/<MNIST|FashionMNIST>/raw/, with torchvision's own loader and download=False. Fetching and
verifying raw files, and turning every raw source into images (`prepare`), is `acquire.datasets`,
outside the library; this module reads only files it is given.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .datasets import DATASETS
from .files import CheckpointError, atomic_torch_save, atomic_write_json, file_digest, load_checkpoint


class DataError(RuntimeError):
    """A dataset that cannot be had or a prepared file that is missing or corrupt."""


@dataclass(frozen=True)
class PreparedData:
    train: Tensor  # (N, C, H, W) uint8
    test: Tensor  # (M, C, H, W) uint8
    meta: dict


# --------------------------------------------------------------------------- prepared format


def save_prepared(directory: str | Path, train: Tensor, test: Tensor, meta: dict) -> Path:
    """Write a prepared dataset atomically; meta gains the counts, shape and file checksums."""
    directory = Path(directory)
    for name, images in (("train", train), ("test", test)):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"{name} images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    atomic_torch_save({"images": train.contiguous()}, directory / "train.pt")
    atomic_torch_save({"images": test.contiguous()}, directory / "test.pt")
    meta = {
        **meta,
        "n_train": int(train.shape[0]),
        "n_test": int(test.shape[0]),
        "image_shape": list(train.shape[1:]),
        "sha256": {f: file_digest(directory / f) for f in ("train.pt", "test.pt")},
    }
    atomic_write_json(directory / "meta.json", meta)
    return directory


def load_prepared(directory: str | Path, *, verify: bool = True) -> PreparedData:
    """Read a prepared dataset; with `verify`, check both files against the recorded SHA-256."""
    directory = Path(directory)
    remedy = f"rerun `dvc repro prepare-data` (or delete {directory} and rerun)"
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing; the dataset is not prepared — {remedy}")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as err:
        raise DataError(f"{meta_path}: corrupt ({err}) — {remedy}") from None
    parts = {}
    for split in ("train", "test"):
        path = directory / f"{split}.pt"
        if verify and path.is_file():
            digest = file_digest(path)
            if digest != meta.get("sha256", {}).get(path.name):
                raise DataError(f"{path}: checksum mismatch (corrupt or modified file) — {remedy}")
        try:
            images = load_checkpoint(path)["images"]
        except (CheckpointError, KeyError) as err:
            raise DataError(f"{path}: unreadable prepared data ({err}) — {remedy}") from None
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(
                f"{path}: expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)} — {remedy}"
            )
        parts[split] = images
    return PreparedData(train=parts["train"], test=parts["test"], meta=meta)


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Splits:
    """The images a run uses, uint8 (N, C, H, W) each, from one prepared dataset.

    train: prepared.train[:n_all − n_valid][:n_train], the only images any fit sees.
    valid: prepared.train[n_all − n_valid:], in order (for choices made by looking at numbers).
    test: prepared.test[test_indices], in that order.
    test_indices: int64 (n_test,), indices into prepared.test: arange(n) for all of them, else
      the first n_test of a permutation seeded by subset_seed (`subset_indices`).
    meta: the prepared dataset's meta.json.
    """

    train: Tensor
    valid: Tensor
    test: Tensor
    test_indices: Tensor
    meta: dict


def subset_indices(n_all: int, n: int | None, seed: int) -> Tensor:
    """int64 (n,) indices of a uniform random sample of n of range(n_all) without replacement:
    the first n of torch.randperm(n_all) under torch.Generator().manual_seed(seed), kept in that
    random order, so that every prefix is itself a uniform random sample and a smaller n gives
    a prefix of a larger one. n None: arange(n_all), all in order."""
    if n is None:
        return torch.arange(n_all, dtype=torch.int64)
    if not 0 < n <= n_all:
        raise ValueError(f"cannot draw {n} of {n_all} items; n must be in 1..{n_all}")
    return torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[:n]


def split_prepared(
    prepared: PreparedData, *, n_train: int | None, n_valid: int, n_test: int | None, subset_seed: int
) -> Splits:
    """The training, validation and test splits of `prepared` (see `Splits`); the `config.DataParams`
    fields of the same names. Only indexing: the checks come first, and a DataError names the
    key, its value, the dataset's size and the remedy."""
    name = prepared.meta.get("label", prepared.meta.get("dataset", "the dataset"))
    n_prepared, n_all_test = int(prepared.train.shape[0]), int(prepared.test.shape[0])
    if not 1 <= n_valid < n_prepared:
        raise DataError(
            f"data.n_valid = {n_valid}: {name} has {n_prepared} prepared training images, and the "
            f"validation split (the last n_valid) must leave some for training; set 1 <= n_valid < {n_prepared}"
        )
    n_split = n_prepared - n_valid
    if n_train is not None and not 1 <= n_train <= n_split:
        raise DataError(
            f"data.n_train = {n_train}: the training split of {name} has {n_split} images "
            f"({n_prepared} prepared − n_valid {n_valid}); set n_train <= {n_split} or null for all"
        )
    if n_test is not None and not 1 <= n_test <= n_all_test:
        raise DataError(
            f"data.n_test = {n_test}: {name} has {n_all_test} test images; set n_test <= {n_all_test} or null for all"
        )
    test_indices = subset_indices(n_all_test, n_test, subset_seed)
    return Splits(
        train=prepared.train[: n_split if n_train is None else n_train],
        valid=prepared.train[n_split:],
        test=prepared.test[test_indices],
        test_indices=test_indices,
        meta=prepared.meta,
    )


def indices_digest(indices: Tensor) -> str:
    """SHA-256 (hex) of the indices as little-endian int64 bytes: names a subset exactly."""
    return hashlib.sha256(indices.to(torch.int64).cpu().numpy().astype("<i8").tobytes()).hexdigest()


# --------------------------------------------------------------------------- soft target, binarisation


def soft_target(images: Tensor) -> Tensor:
    """e = images / 255: uint8 grey levels (B, C, H, W) → float32 in [0, 1], same shape."""
    return images.float().div_(255.0)


def binarize(e: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x ~ Bernoulli(e), independently per pixel, so that E[x] = e (paper: dynamic binarisation).

    e: float in [0, 1], any shape; returns a float tensor of 0s and 1s of the same shape. A fresh
    draw per call (per epoch / per test pass); `generator` makes the draws reproducible.
    """
    return torch.bernoulli(e, generator=generator)


# --------------------------------------------------------------------------- IDX files on disk


@dataclass(frozen=True)
class IdxLayout:
    label: str  # the display name (the registry's, `vaepp.datasets`)
    tv_class: str  # torchvision.datasets class, also the folder name under the cache


# The datasets stored as IDX files (the registry's rows with fetcher "idx").
IDX_LAYOUT = {
    "mnist": IdxLayout(label=DATASETS["mnist"].label, tv_class="MNIST"),
    "fashion_mnist": IdxLayout(label=DATASETS["fashion_mnist"].label, tv_class="FashionMNIST"),
}


def idx_raw_dir(dataset: str, cache: str | Path) -> Path:
    """<cache>/<MNIST|FashionMNIST>/raw: where torchvision's loader looks for the IDX files."""
    return Path(cache) / IDX_LAYOUT[dataset].tv_class / "raw"


def error_line(err: BaseException) -> str:
    """The error on one line (torchvision's messages span several: one per mirror tried)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def load_idx(dataset: str, cache: str | Path) -> tuple[Tensor, Tensor]:
    """Train and test images (N, 1, 28, 28) uint8 read by torchvision's loader (download=False)
    from the IDX files under `idx_raw_dir(dataset, cache)` (placed by `acquire.datasets.ensure_idx`)."""
    import torchvision.datasets as tvd

    layout = IDX_LAYOUT[dataset]
    cls = getattr(tvd, layout.tv_class)
    try:
        train = cls(str(cache), train=True, download=False).data
        test = cls(str(cache), train=False, download=False).data
    except RuntimeError as err:
        raise DataError(
            f"{layout.label}: torchvision cannot read the raw files under "
            f"{cache} ({error_line(err)}); rerun to fetch them"
        ) from None
    return train.unsqueeze(1).contiguous(), test.unsqueeze(1).contiguous()  # (N, 1, 28, 28)
