"""Datasets: the prepared on-disk form every stage reads.

A prepared dataset is a directory with
  train.pt, test.pt  — {"images": uint8 tensor (N, C, H, W)} (grey levels 0..255; the soft
                        target e = images / 255, binarised per pass where the data is binary)
  meta.json          — dataset, label (as shown in reports), source, binary, stand_in,
                        n_train, n_test, image_shape, and the SHA-256 of both tensor files.
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
            raise DataError(f"{path}: expected uint8 (N, C, H, W) images, got {images.dtype} "
                            f"{tuple(images.shape)} — {remedy}")
        parts[split] = images
    return PreparedData(train=parts["train"], test=parts["test"], meta=meta)
