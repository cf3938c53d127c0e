"""Datasets in the prepared on-disk form every stage reads, the soft target and its binarisation.

A prepared dataset is a directory with
  train.pt, test.pt  — {"images": uint8 tensor (N, C, H, W)} (grey levels 0..255; the soft
                        target e = images / 255, binarised per pass where the data is binary)
  meta.json          — dataset, label (as shown in reports), source, binary, stand_in,
                        n_train, n_test, image_shape, and the SHA-256 of both tensor files.

Binary datasets (MNIST family, Omniglot) keep their grey levels: the training objective uses the
soft target e and tests draw a fresh binarisation x ~ Bernoulli(e) (`binarize`) every pass.

`load_idx` reads MNIST / Fashion-MNIST IDX files already on disk, under torchvision's names in
<cache>/<MNIST|FashionMNIST>/raw/, with torchvision's own loader and download=False. Fetching and
verifying raw files, and turning every raw source into images (`prepare`), is `vaepp.fetch_data`;
this module reads only files it is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .io import CheckpointError, atomic_torch_save, atomic_write_json, file_digest, load_checkpoint


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
    label: str  # the display name
    tv_class: str  # torchvision.datasets class, also the folder name under the cache


IDX_LAYOUT = {
    "mnist": IdxLayout(label="MNIST", tv_class="MNIST"),
    "fashion_mnist": IdxLayout(label="Fashion-MNIST", tv_class="FashionMNIST"),
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
    from the IDX files under `idx_raw_dir(dataset, cache)` (placed by `fetch_data.ensure_idx`)."""
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
