"""Reference statistics and features of an image set, cached in a directory the caller names.

`reference_statistics` keeps (μ, Σ, n) of the pool3 features as `<cache_dir>/<key>.npz`;
`reference_features` keeps the features too, as `<cache_dir>/<key>.features.npz`, for KID, the
low-rank FID and the error bars. Each file holds its key, the network's weights SHA-256 and a
SHA-256 over all fields; it is written to a temp file and os.replace'd, and a file that fails its
checks raises FidCacheError with the remedy (never silently recomputed over). This module reads no
environment and fetches nothing.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .fid_features import FeatureSet, Progress, feature_stats, features_and_stats
from .files import atomic_write_bytes


class FidCacheError(RuntimeError):
    """A cached reference-statistics file is corrupt or belongs to another network."""


_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


def _stats_digest(
    mu: np.ndarray, sigma: np.ndarray, n: int, key: str, network: str, features: np.ndarray | None = None
) -> str:
    h = hashlib.sha256()
    parts = [
        key.encode(),
        network.encode(),
        str(int(n)).encode(),
        np.ascontiguousarray(mu, np.float64).tobytes(),
        np.ascontiguousarray(sigma, np.float64).tobytes(),
    ]
    if features is not None:  # files of `reference_features`; a statistics-only digest is unchanged
        parts += [f"{features.dtype.str}{features.shape}".encode(), np.ascontiguousarray(features).tobytes()]
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def _load_cached_stats(
    path: Path, key: str, network: str, *, with_features: bool = False
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """(μ, Σ, n, features or None) of a cache file, after its checksum, key and network checks."""
    remedy = f"Remedy: delete {path} and rerun (the statistics are recomputed)."
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma, n = z["mu"], z["sigma"], int(z["n"])
            feats = z["features"] if with_features else None
            stored_key, stored_net, digest = str(z["key"]), str(z["network"]), str(z["sha256"])
    except Exception as err:  # truncated zip, missing field, bad dtype: all mean unusable
        raise FidCacheError(f"unreadable reference statistics {path} ({type(err).__name__}: {err}). {remedy}") from err
    if digest != _stats_digest(mu, sigma, n, stored_key, stored_net, feats):
        raise FidCacheError(f"checksum mismatch in reference statistics {path} (corrupt). {remedy}")
    if feats is not None and feats.shape != (n, mu.shape[0]):
        raise FidCacheError(f"{path} holds features of shape {feats.shape}, not ({n}, {mu.shape[0]}). {remedy}")
    if stored_key != key:
        raise FidCacheError(f"{path} holds statistics for key {stored_key!r}, not {key!r}. {remedy}")
    if stored_net != network:
        raise FidCacheError(
            f"{path} was computed with another feature network ({stored_net[:16]}… vs {network[:16]}…). {remedy}"
        )
    return mu, sigma, n, feats


def _write_cached_stats(
    path: Path, mu: np.ndarray, sigma: np.ndarray, n: int, key: str, network: str, features: np.ndarray | None = None
) -> None:
    """The .npz of `_load_cached_stats`, written to a temp file and os.replace'd."""
    fields = dict(
        mu=mu,
        sigma=sigma,
        n=np.int64(n),
        key=np.str_(key),
        network=np.str_(network),
        sha256=np.str_(_stats_digest(mu, sigma, n, key, network, features)),
    )
    if features is not None:
        fields["features"] = features
    buf = io.BytesIO()
    np.savez(buf, **fields)
    atomic_write_bytes(path, buf.getvalue())


def _check_key(key: str) -> None:
    if not _KEY_RE.match(key):
        raise ValueError(f"key must be a plain file-name stem, got {key!r}")


def reference_statistics(
    key: str,
    images_fn: Callable[[], Iterable[Tensor] | Tensor],
    cache_dir: Path,
    net: nn.Module,
    *,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(μ (2048,), Σ (2048, 2048), n) of a reference set, cached as `<cache_dir>/<key>.npz`.

    `key` names dataset and protocol (e.g. "mnist-train-all", "mnist-test-10k"); `images_fn` is
    called only on a cache miss. The .npz holds mu, sigma, n, key, the network's weights SHA-256
    and a SHA-256 over all of them; it is written to a temp file and os.replace'd. A cached file
    that fails its checksum, or was made with another network, raises FidCacheError with the
    remedy; it is never silently recomputed over.
    """
    _check_key(key)
    network = str(getattr(net, "fid_weights_sha256", "unrecorded"))
    path = Path(cache_dir) / f"{key}.npz"
    if path.exists():
        return _load_cached_stats(path, key, network)[:3]
    stats = feature_stats(net, images_fn(), batch_size=batch_size, device=device, progress=progress)
    mu, sigma = stats.mean_cov()
    _write_cached_stats(path, mu, sigma, stats.n, key, network)
    return mu, sigma, stats.n


def feature_cache_path(cache_dir: Path, key: str) -> Path:
    """Where `reference_features` keeps the set named `key`."""
    return Path(cache_dir) / f"{key}.features.npz"


def reference_features(
    key: str,
    images_fn: Callable[[], Iterable[Tensor] | Tensor],
    cache_dir: Path,
    net: nn.Module,
    *,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: Progress | None = None,
) -> FeatureSet:
    """Features, μ and Σ of a reference or held-out set, cached as `<cache_dir>/<key>.features.npz`.

    As `reference_statistics` (the same key rule, fields, checksum over all of them, network check,
    atomic write and FidCacheError on a bad file), plus the features for KID. μ and Σ come from
    the same running sums as `feature_stats`, so a FID against them is the FID against
    `reference_statistics` of the same images. Features are stored as float32 when that is exact
    (pool3 activations are float32; 2048 floats = 8 KiB per image), else as float64.
    callback: as in `iter_features`, on a cache miss only (a hit runs no image through the network).
    """
    _check_key(key)
    network = str(getattr(net, "fid_weights_sha256", "unrecorded"))
    path = feature_cache_path(cache_dir, key)
    if path.exists():
        mu, sigma, _, feats = _load_cached_stats(path, key, network, with_features=True)
        return FeatureSet(torch.from_numpy(feats.astype(np.float64)), mu, sigma)
    features, stats = features_and_stats(
        net, images_fn(), batch_size=batch_size, device=device, progress=progress, callback=callback
    )
    mu, sigma = stats.mean_cov()
    stored = features.numpy()
    as_f32 = stored.astype(np.float32)
    if np.array_equal(as_f32.astype(np.float64), stored):
        stored = as_f32
    _write_cached_stats(path, mu, sigma, stats.n, key, network, stored)
    return FeatureSet(features, mu, sigma)
