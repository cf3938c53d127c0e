"""Pool3 features of the FID Inception network and their streamed sufficient statistics.

The network is an argument (pytorch-fid's InceptionV3 with verified weights, or a test's small
stand-in); images are float (N, C, H, W) in [0, 1], C = 1 (repeated to RGB) or 3, any H and W (the
network resizes to 299×299). Features come out as (N, 2048) float64 on the CPU; `FeatureStats`
keeps n, Σf (d,) and Σf fᵀ (d, d) in float64, whence μ = Σf / n and the unbiased
Σ = (Σf fᵀ − n μ μᵀ) / (n − 1) of every FID (`vaepp.fid`). `FeatureSet` holds a set's features with
its μ and Σ, for the distances that read the features themselves (the low-rank FID, KID, error
bars). This module reads no environment and fetches nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

FEATURE_DIM = 2048  # pool3 of the FID Inception
# progress(name, value, step): images through the network so far (see `iter_features`)
Progress = Callable[[str, float, int], None]


def _batches(images: Iterable[Tensor] | Tensor, batch_size: int) -> Iterator[Tensor]:
    """Yield (B, C, H, W) chunks of at most batch_size from a tensor or an iterable of batches."""
    if isinstance(images, Tensor):
        images = (images,)
    for block in images:
        if block.dim() == 3:  # a single (C, H, W) image
            block = block.unsqueeze(0)
        for start in range(0, block.shape[0], batch_size):
            yield block[start : start + batch_size]


def _prepare(batch: Tensor, device: torch.device | str) -> Tensor:
    """Validate a (B, C, H, W) batch in [0, 1] and return it float32 (B, 3, H, W) on device."""
    if batch.dim() != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C = 1 or 3, got {tuple(batch.shape)}")
    x = batch.to(device=device, dtype=torch.float32)
    # Inception's normalisation maps [0, 1] → [−1, 1]; values outside (or NaN) would be fed
    # silently as out-of-range pixels, so they are refused rather than clipped.
    lo, hi = torch.aminmax(x)
    if not (lo >= 0.0 and hi <= 1.0):
        raise ValueError(f"images must be float in [0, 1], got range [{lo.item()}, {hi.item()}]")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grey repeated to RGB (a view; interpolate copies)
    return x


def iter_features(
    net: nn.Module,
    images: Iterable[Tensor] | Tensor,
    *,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: Progress | None = None,
) -> Iterator[Tensor]:
    """Yield (B, 2048) float64 CPU feature batches of `net` (pool3), under inference_mode.

    callback: called after every batch as callback("images_done", n, n), n the number of images
    through the network so far; it only counts rows, so the features are the same without it.
    """
    total = images.shape[0] if isinstance(images, Tensor) else None
    n_done = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="inception")
    with torch.inference_mode():
        for batch in _batches(images, batch_size):
            out = net(_prepare(batch, device))
            feats = out[0] if isinstance(out, (list, tuple)) else out
            B = feats.shape[0]
            yield feats.reshape(B, -1).to(device="cpu", dtype=torch.float64)  # (B, 2048)
            if bar is not None:
                bar.update(B)
            if callback is not None:
                n_done += B
                callback("images_done", float(n_done), n_done)
    if bar is not None:
        bar.close()


def inception_features(
    net: nn.Module,
    images: Iterable[Tensor] | Tensor,
    *,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Tensor:
    """Pool3 features of every image: (N, 2048) float64.

    images: a float tensor (N, C, H, W) in [0, 1] with C = 1 (repeated to 3) or 3, or an iterable
    of such batches. Any H, W: the network resizes to 299×299 (bilinear, as pytorch-fid does).
    """
    chunks = list(iter_features(net, images, batch_size=batch_size, device=device, progress=progress))
    if not chunks:
        raise ValueError("no images")
    return torch.cat(chunks)


class FeatureStats:
    """Streaming sufficient statistics of features: n, Σf (d,), Σf fᵀ (d, d), all float64.

    Sums (not running means) so that shards computed on several processes add exactly:
    `a + b`, or all_reduce each of `n`, `sum`, `sum_outer`.
    """

    def __init__(self, dim: int = FEATURE_DIM):
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, feats: Tensor) -> FeatureStats:
        """Add a (B, d) batch of features."""
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}) features, got {tuple(feats.shape)}")
        f = feats.to(device="cpu", dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f
        return self

    def __add__(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot add statistics of dim {self.dim} and {other.dim}")
        out = FeatureStats(self.dim)
        out.n = self.n + other.n
        out.sum = self.sum + other.sum
        out.sum_outer = self.sum_outer + other.sum_outer
        return out

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """μ = Σf / n (d,) and the unbiased Σ = (Σf fᵀ − n μ μᵀ) / (n − 1) (d, d), as np.float64.

        The one-pass formula subtracts two large sums; in float64 the relative rounding error is
        about 1e-16 · (μ² / var) per entry, negligible for pool3 features (μ² / var ≲ 10²).
        """
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        mu = self.sum / self.n
        cov = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        cov = 0.5 * (cov + cov.T)  # exact symmetry despite rounding in f.T @ f sums
        return mu.numpy(), cov.numpy()


def _stream_stats(batches: Iterator[Tensor], kept: list[Tensor] | None) -> FeatureStats:
    """FeatureStats of (B, d) feature batches, appending each batch to `kept` when given."""
    stats: FeatureStats | None = None
    for feats in batches:
        if stats is None:  # the width comes from the network (2048 for pool3)
            stats = FeatureStats(feats.shape[1])
        stats.update(feats)
        if kept is not None:
            kept.append(feats)
    if stats is None:
        raise ValueError("no images")
    return stats


def feature_stats(
    net: nn.Module,
    images: Iterable[Tensor] | Tensor,
    *,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: Progress | None = None,
) -> FeatureStats:
    """FeatureStats of the pool3 features of `images`, streamed (features are not kept);
    callback as in `iter_features`."""
    feats = iter_features(net, images, batch_size=batch_size, device=device, progress=progress, callback=callback)
    return _stream_stats(feats, None)


def features_and_stats(
    net: nn.Module,
    images: Iterable[Tensor] | Tensor,
    *,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: Progress | None = None,
) -> tuple[Tensor, FeatureStats]:
    """(features (N, 2048) float64, FeatureStats) from one pass: the statistics are those of
    `feature_stats` (the same batches through the same running sums), the features feed KID.
    callback as in `iter_features`."""
    kept: list[Tensor] = []
    feats = iter_features(net, images, batch_size=batch_size, device=device, progress=progress, callback=callback)
    stats = _stream_stats(feats, kept)
    return torch.cat(kept), stats


class FeatureSet(NamedTuple):
    """An image set's pool3 features (n, 2048) float64, with μ (2048,) and Σ (2048, 2048) as np.float64."""

    features: Tensor
    mu: np.ndarray
    sigma: np.ndarray
