"""Frechet Inception Distance through pytorch-fid's Inception network (TF Inception 2015-12-05).

FID between image sets A and B, with f(x) ∈ R^2048 the pool3 features of the FID Inception
network (Heusel et al. 2017):

    FID = ‖μ_A − μ_B‖² + Tr(Σ_A + Σ_B − 2 (Σ_A Σ_B)^{1/2}),

μ, Σ the mean and the unbiased covariance of f over each set. The paper (§4.3, Table 4) uses
5000 samples vs the training set; Dai & Wipf's numbers use 10k samples vs 10k test images. The
protocol is the caller's choice and belongs in the reference-statistics key.

FID is biased upward at finite N (roughly by Tr Σ / N; Bińkowski et al. 2018, "Demystifying MMD
GANs"), so even two sets of real images score well above zero at a few hundred images. Two
companions read from the same features: the Kernel Inception Distance (KID, the unbiased MMD²
with the cubic polynomial kernel of Bińkowski et al. 2018), and the caller's real-vs-real FID at
the same N (the floor), for which `reference_features` caches a held-out set's features.

When both sets' features are at hand and either set has fewer images than features (n < d = 2048,
as at a few hundred images), `frechet_distance_of_sets` takes Tr (Σ_A Σ_B)^{1/2} from the singular
values of an n_A × n_B matrix (`frechet_distance_low_rank`) instead of square-rooting d × d ones.

Error bars for the draw of a sample set, the reference set fixed (`error_bars`): FID's interval
and sd and the sd of the unbiased MMD² come from the same distances over random half-samples of
the n samples, drawn without replacement; the bootstrap with replacement misstates FID's error
when n < d, its repeated rows adding finite-N bias and spread.

The network is an argument everywhere: pytorch-fid's InceptionV3 with verified weights comes from
`fetch_fid_weights.load_inception`; tests pass a small stand-in. Reference statistics are cached in
a directory the caller names. This module reads no environment and fetches nothing.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .files import atomic_write_bytes

FEATURE_DIM = 2048  # pool3 of the FID Inception
# progress(name, value, step): images through the network so far (see `iter_features`)
Progress = Callable[[str, float, int], None]


class FidCacheError(RuntimeError):
    """A cached reference-statistics file is corrupt or belongs to another network."""


# ----------------------------------------------------------------------------------------------
# Features and statistics
# ----------------------------------------------------------------------------------------------


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


def _resolvable(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below its rounding level, d·ε·λ_max, set to 0.

    Covariances of n < d feature vectors (e.g. 1000 images, 2048 features) have d − n + 1 zero
    eigenvalues that eigh returns as ±1e-16·λ_max; their square roots would be ~1e-8·√λ_max each,
    and a thousand of them would add ~1e-4 to a FID that should be exactly 0 (a set vs itself).
    """
    tol = eigenvalues.size * np.finfo(np.float64).eps * max(float(eigenvalues.max(initial=0.0)), 0.0)
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(μ1, Σ1) and N(μ2, Σ2):

        d² = ‖μ1 − μ2‖² + Tr Σ1 + Tr Σ2 − 2 Tr (Σ1 Σ2)^{1/2}.

    Tr (Σ1 Σ2)^{1/2} = Σ_i √λ_i with λ_i the eigenvalues of Σ1^{1/2} Σ2 Σ1^{1/2}, which is
    symmetric PSD and similar to Σ1 Σ2; two symmetric eigendecompositions are exact, and for
    d = 2048 about 7× faster than scipy's sqrtm of the non-symmetric product (which pytorch-fid
    uses; the two agree to rounding).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    w, V = np.linalg.eigh(sigma1)
    root1 = (V * np.sqrt(_resolvable(w))) @ V.T
    M = root1 @ sigma2 @ root1
    lam = np.linalg.eigvalsh(0.5 * (M + M.T))  # symmetrise away rounding asymmetry
    tr_covmean = np.sqrt(_resolvable(lam)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_low_rank(feats1: Tensor, feats2: Tensor) -> float:
    """`frechet_distance` of the means and unbiased covariances of two feature sets, computed from
    the features: feats1 (n1, d), feats2 (n2, d), any dtype, in float64. Exact (not an
    approximation) for any n1, n2 ≥ 2; it pays when min(n1, n2) < d.

    With X̃_i = X_i − 1 μ_iᵀ (n_i, d) the centred features, Σ_i = X̃_iᵀ X̃_i / (n_i − 1) and
    c = (n1 − 1)(n2 − 1):

        Σ1 Σ2 = X̃1ᵀ (X̃1 X̃2ᵀ X̃2) / c = P Q,  P = X̃1ᵀ (d, n1),  Q = K X̃2 / c (n1, d),  K = X̃1 X̃2ᵀ (n1, n2).

    PQ and QP share their nonzero eigenvalues, and QP = K X̃2 X̃1ᵀ / c = K Kᵀ / c (n1, n1), whose
    eigenvalues are s_k² / c with s_k the singular values of K. Σ1 Σ2 has the eigenvalues of the
    PSD Σ1^{1/2} Σ2 Σ1^{1/2} (PQ and QP again, with P = Σ1^{1/2}), all real and ≥ 0, and
    Tr (Σ1 Σ2)^{1/2} is the sum of their square roots; the zero ones add nothing, hence

        Tr (Σ1 Σ2)^{1/2} = Σ_k s_k / √c = ‖X̃1 X̃2ᵀ‖_* / √((n1 − 1)(n2 − 1)),

    and Tr Σ_i = ‖X̃_i‖_F² / (n_i − 1). Cost: one (n1, d) × (d, n2) product and the singular
    values of an n1 × n2 matrix, instead of eigendecompositions of d × d matrices.
    """
    if feats1.dim() != 2 or feats2.dim() != 2 or feats1.shape[1] != feats2.shape[1]:
        raise ValueError(f"need (n, d) features of one width, got {tuple(feats1.shape)} and {tuple(feats2.shape)}")
    n1, n2 = feats1.shape[0], feats2.shape[0]
    if min(n1, n2) < 2:
        raise ValueError(f"need at least 2 feature vectors per set for a covariance, have {n1} and {n2}")
    x1 = feats1.to(device="cpu", dtype=torch.float64)
    x2 = feats2.to(device="cpu", dtype=torch.float64)
    mu1, mu2 = x1.mean(0), x2.mean(0)
    c1, c2 = x1 - mu1, x2 - mu2  # two-pass centring: no cancellation of large sums
    # Singular values, not eigenvalues of K Kᵀ followed by square roots: the rank of K is at most
    # min(n1, n2) − 1, and its rounding-level singular values add ~ε·s_max each, where the square
    # roots of rounding-level eigenvalues would add ~√ε·s_max each.
    tr_covmean = float(torch.linalg.svdvals(c1 @ c2.T).sum()) / math.sqrt((n1 - 1) * (n2 - 1))
    tr1 = float(c1.square().sum()) / (n1 - 1)
    tr2 = float(c2.square().sum()) / (n2 - 1)
    diff = mu1 - mu2
    return float(diff @ diff) + tr1 + tr2 - 2.0 * tr_covmean


# ----------------------------------------------------------------------------------------------
# Kernel Inception Distance
# ----------------------------------------------------------------------------------------------


class KernelDistance(NamedTuple):
    """KID over random subsets: the mean and sample standard deviation (n_subsets − 1) of the
    per-subset unbiased MMD² (unitless), the subset size m and the number of subsets. When m equals
    both set sizes every subset is the whole set and std is 0 by construction, not an error bar
    (`error_bars` gives one)."""

    mean: float
    std: float
    subset_size: int
    n_subsets: int


def polynomial_kernel(a: Tensor, b: Tensor) -> Tensor:
    """k(x, y) = (xᵀy / d + 1)³ for every pair of rows: a (n, d), b (m, d) → (n, m), float64."""
    d = a.shape[1]
    return (a.double() @ b.double().T / d + 1.0) ** 3


def mmd2_unbiased(k_xx: Tensor, k_yy: Tensor, k_xy: Tensor) -> float:
    """The unbiased MMD² from kernel blocks of m_x and m_y samples (Gretton et al. 2012, "A Kernel
    Two-Sample Test", MMD²_u):

        Σ_{i≠j} k(x_i, x_j) / (m_x(m_x−1)) + Σ_{i≠j} k(y_i, y_j) / (m_y(m_y−1)) − 2 Σ_{i,j} k(x_i, y_j) / (m_x m_y).

    k_xx (m_x, m_x), k_yy (m_y, m_y), k_xy (m_x, m_y). The diagonals k(x_i, x_i) are left out (with
    them the estimate is biased upward by O(1/m)); k_xy keeps its diagonal, x and y being
    independent. Unbiased, so it can be negative when the two laws are (nearly) equal.
    """
    m_x, m_y = k_xx.shape[0], k_yy.shape[0]
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m_x * (m_x - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m_y * (m_y - 1))
    return float(within_x + within_y - 2.0 * k_xy.sum() / (m_x * m_y))


def _kid_values(feats_x: Tensor, feats_y: Tensor, n_subsets: int, m: int, seed: int, gram: bool) -> Tensor:
    """MMD²_u of `n_subsets` subset pairs (m rows of each set drawn without replacement by a
    generator seeded with `seed`): (n_subsets,) float64. gram=True indexes the full kernel matrices
    (one product each), gram=False forms each subset's blocks; the same numbers up to rounding."""
    x, y = feats_x.double(), feats_y.double()
    n_x, n_y = x.shape[0], y.shape[0]
    gen = torch.Generator().manual_seed(seed)
    if gram:
        k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    values = torch.empty(n_subsets, dtype=torch.float64)
    for s in range(n_subsets):  # vectorised within a subset; only the subsets loop
        ix = torch.randperm(n_x, generator=gen)[:m]
        iy = torch.randperm(n_y, generator=gen)[:m]
        if gram:
            blocks = (k_xx[ix[:, None], ix], k_yy[iy[:, None], iy], k_xy[ix[:, None], iy])
        else:
            xs, ys = x[ix], y[iy]  # (m, d) each
            blocks = (polynomial_kernel(xs, xs), polynomial_kernel(ys, ys), polynomial_kernel(xs, ys))
        values[s] = mmd2_unbiased(*blocks)
    return values


def kernel_inception_distance(
    feats_x: Tensor, feats_y: Tensor, *, n_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> KernelDistance:
    """KID (Bińkowski et al. 2018, "Demystifying MMD GANs", and their reference code): the
    unbiased MMD² with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³ between two feature
    sets, averaged over `n_subsets` random subset pairs of m = min(max_subset_size, n_x, n_y) rows.

    feats_x (n_x, d), feats_y (n_y, d): e.g. pool3 features of samples and of reference images.
    The same seed draws the same subsets, so KIDs computed with one seed are reproducible and
    share their subset noise. Unlike FID, KID has no bias at finite N (it can be negative).
    """
    if feats_x.dim() != 2 or feats_y.dim() != 2 or feats_x.shape[1] != feats_y.shape[1]:
        raise ValueError(f"need (n, d) features of one width, got {tuple(feats_x.shape)} and {tuple(feats_y.shape)}")
    n_x, n_y = feats_x.shape[0], feats_y.shape[0]
    m = min(max_subset_size, n_x, n_y)
    if m < 2 or n_subsets < 1:
        raise ValueError(
            f"KID needs subsets of at least 2 rows and at least 1 subset, got m = {m}, n_subsets = {n_subsets}"
        )
    # Kernel entries to evaluate: the full matrices once, or three m × m blocks per subset.
    gram = (n_x + n_y) ** 2 <= 3 * n_subsets * m * m
    values = _kid_values(feats_x, feats_y, n_subsets, m, seed, gram)
    std = float(values.std(correction=1)) if n_subsets > 1 else 0.0
    return KernelDistance(float(values.mean()), std, m, n_subsets)


# ----------------------------------------------------------------------------------------------
# Cached reference statistics and features, and the end-to-end FID
# ----------------------------------------------------------------------------------------------

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


class FeatureSet(NamedTuple):
    """An image set's pool3 features (n, 2048) float64, with μ (2048,) and Σ (2048, 2048) as np.float64."""

    features: Tensor
    mu: np.ndarray
    sigma: np.ndarray


def frechet_distance_of_sets(a: FeatureSet, b: FeatureSet) -> float:
    """FID between two sets of which the features are at hand (as `reference_features` and
    `features_and_stats` give them): a.features (n_a, d), b.features (n_b, d).

    When min(n_a, n_b) < d, at least one covariance has rank < d and `frechet_distance_low_rank`
    computes the same number from an n_a × n_b matrix (for 400 vs 400 images of 2048 features, a
    fraction of a second instead of seconds); otherwise the d × d path, `frechet_distance` of
    (μ, Σ), is the cheaper one. Both are exact; on pool3 features of a few hundred images they
    agree to ~1e-6 relative, the d × d path's square roots of rounding-level eigenvalues (~√ε
    each) setting that, so the low-rank value is the more accurate of the two.
    """
    (n_a, d), n_b = a.features.shape, b.features.shape[0]
    if min(n_a, n_b) < d:
        return frechet_distance_low_rank(a.features, b.features)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


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


def fid_from_images(
    net: nn.Module,
    images_a: Iterable[Tensor] | Tensor,
    images_b: Iterable[Tensor] | Tensor,
    *,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> float:
    """FID between two image sets (each as for inception_features), unitless."""
    kw = dict(batch_size=batch_size, device=device, progress=progress)
    mu_a, sigma_a = feature_stats(net, images_a, **kw).mean_cov()
    mu_b, sigma_b = feature_stats(net, images_b, **kw).mean_cov()
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


# ----------------------------------------------------------------------------------------------
# Error bars: half-samples of the generated set
# ----------------------------------------------------------------------------------------------

_CHUNK = 2**24  # float64 entries per batch of per-half-sample matrices (128 MiB)


class ErrorBars(NamedTuple):
    """The sampling error of a sample set's FID and KID against a fixed reference set
    (`error_bars`): the FID of all n samples, the ends of its interval, the standard deviations of
    the FID and of the unbiased MMD² (KID), all unitless, and the number and size r of the
    half-samples they come from."""

    fid: float
    fid_low: float
    fid_high: float
    fid_sd: float
    kid_sd: float
    n_resamples: int
    subset_size: int


def half_samples(n: int, n_resamples: int, seed: int) -> Tensor:
    """(n_resamples, ⌊n/2⌋) int64 row indices: each row a uniformly random subset of range(n),
    drawn without replacement (as the first ⌊n/2⌋ of a random permutation) by a torch.Generator
    seeded with `seed`, all at once."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_resamples, n, generator=gen, dtype=torch.float64).argsort(dim=1)[:, : n // 2]


def _kernel_row_sums(a: Tensor, b: Tensor) -> Tensor:
    """Σ_j k(a_i, b_j) of the cubic kernel for every row of a (n,) float64, in blocks of rows so
    that no n × m matrix is held at once."""
    step = max(1, _CHUNK // max(b.shape[0], 1))
    return torch.cat([polynomial_kernel(a[s : s + step], b).sum(1) for s in range(0, a.shape[0], step)])


def subset_distances(samples: FeatureSet, reference: FeatureSet, idx: Tensor) -> tuple[Tensor, Tensor]:
    """(FID (B,), unbiased MMD² (B,)) float64 of the sample subsets S_b = samples.features[idx[b]]
    against all of `reference`: idx (B, r) distinct row indices per row, r ≥ 2; samples.features
    (n, d), reference.features (m, d). The numbers are those of `frechet_distance_of_sets` and of
    `mmd2_unbiased` with the full kernel blocks, applied to each subset's rows (to rounding).

    With X̃ = X − 1 μ_Xᵀ the samples centred on their full mean, δ = μ_X − μ_Y, 1_b the (n,)
    indicator of S_b and ū_b = X̃ᵀ 1_b / r the subset's centred mean, all from (B, n) × (n, ·)
    products without a per-subset copy of the rows:

        ‖μ_b − μ_Y‖² = ‖δ‖² + 2 δᵀū_b + ‖ū_b‖²,   Tr Σ_b = (Σ_{i∈S_b} ‖x̃_i‖² − r ‖ū_b‖²) / (r − 1),

    and Tr (Σ_b Σ_Y)^{1/2} = ‖(X̃_b − 1 ū_bᵀ) Ỹᵀ‖_* / √((r − 1)(m − 1)) (the identity of
    `frechet_distance_low_rank`), whose r × m matrix is the rows S_b of G = X̃ Ỹᵀ (n, m), formed
    once, less their mean row; when min(r, m) ≥ d it is Σ_k √λ_k of Σ_Y^{1/2} Σ_b Σ_Y^{1/2} instead
    (as `frechet_distance`, Σ_Y^{1/2} formed once). Both are batched over subsets in blocks.
    KID: with K_XX (n, n) formed once and the subsets' indicators 1_b,

        MMD²_u(b) = (1_bᵀ K_XX 1_b − Σ_{i∈S_b} k(x_i, x_i)) / (r(r − 1))
                    + Σ_{j≠l} k(y_j, y_l) / (m(m − 1)) − 2 Σ_{i∈S_b} Σ_j k(x_i, y_j) / (r m).

    The rows of a subset are distinct, so no row is paired with itself.
    """
    x = samples.features.to(device="cpu", dtype=torch.float64)
    y = reference.features.to(device="cpu", dtype=torch.float64)
    (n, d), m = x.shape, y.shape[0]
    n_sub, r = idx.shape
    if r < 2 or m < 2:
        raise ValueError(f"need subsets of at least 2 rows and at least 2 reference rows, have r = {r}, m = {m}")
    ind = torch.zeros(n_sub, n, dtype=torch.float64).scatter_(1, idx, 1.0)  # (B, n) indicators 1_b
    if not bool((ind.sum(1) == r).all()):
        raise ValueError("the rows of idx must hold distinct indices")
    mu_x, mu_y = x.mean(0), y.mean(0)
    xc, yc = x - mu_x, y - mu_y  # two-pass centring, as frechet_distance_low_rank
    delta = mu_x - mu_y
    u = ind @ xc / r  # (B, d) centred subset means ū_b
    u_sq = u.square().sum(1)
    mean_sq = float(delta @ delta) + 2.0 * (u @ delta) + u_sq
    tr_x = (ind @ xc.square().sum(1) - r * u_sq) / (r - 1)
    tr_y = float(yc.square().sum()) / (m - 1)
    tr_covmean = torch.empty(n_sub, dtype=torch.float64)
    if min(r, m) < d:
        g = xc @ yc.T  # (n, m)
        step = max(1, _CHUNK // (r * m))
        for s in range(0, n_sub, step):  # only blocks of subsets loop
            k = g[idx[s : s + step]]  # (b, r, m)
            k = k - k.mean(1, keepdim=True)
            # the same singular values either way; LAPACK is quicker on a tall matrix
            tr_covmean[s : s + step] = torch.linalg.svdvals(k.mT if r < m else k).sum(-1)
        tr_covmean /= math.sqrt((r - 1) * (m - 1))
    else:
        w, v = torch.linalg.eigh(torch.as_tensor(reference.sigma, dtype=torch.float64))
        root_y = (v * torch.from_numpy(_resolvable(w.numpy())).sqrt()) @ v.T
        step = max(1, _CHUNK // (d * max(d, r)))
        for s in range(0, n_sub, step):
            xs = xc[idx[s : s + step]]  # (b, r, d)
            xs = xs - xs.mean(1, keepdim=True)
            prod = root_y @ (xs.mT @ xs / (r - 1)) @ root_y  # Σ_Y^{1/2} Σ_b Σ_Y^{1/2} (b, d, d)
            lam = torch.linalg.eigvalsh(0.5 * (prod + prod.mT))
            tol = d * torch.finfo(torch.float64).eps * lam.amax(-1, keepdim=True).clamp_min(0.0)  # `_resolvable`
            tr_covmean[s : s + step] = torch.where(lam > tol, lam, 0.0).sqrt().sum(-1)
    fids = mean_sq + tr_x + tr_y - 2.0 * tr_covmean
    k_xx = polynomial_kernel(x, x)  # (n, n)
    within_x = (((ind @ k_xx) * ind).sum(1) - ind @ k_xx.diagonal()) / (r * (r - 1))
    diag_y = (y.square().sum(1) / d + 1.0) ** 3  # k(y_j, y_j)
    within_y = float(_kernel_row_sums(y, y).sum() - diag_y.sum()) / (m * (m - 1))
    kids = within_x + within_y - 2.0 * (ind @ _kernel_row_sums(x, y)) / (r * m)
    return fids, kids


def error_bars(
    samples: FeatureSet, reference: FeatureSet, *, n_resamples: int = 200, seed: int = 0, level: float = 0.95
) -> ErrorBars:
    """Error bars of a sample set's FID and KID for the draw of its n samples, the reference set
    held fixed: samples.features (n, d), reference.features (m, d), n ≥ 4, m ≥ 2, features as
    `frechet_distance_of_sets` takes them (reference.sigma is used when min(⌊n/2⌋, m) ≥ d).

    Half-samples (the delete-n/2 jackknife; Shao & Wu 1989, Politis & Romano 1994): each of B =
    `n_resamples` subsets S_b of r = ⌊n/2⌋ sample rows is drawn without replacement
    (`half_samples`, seeded with `seed`), and its FID F_b and unbiased MMD² K_b against the whole
    reference set are computed (`subset_distances`). With c = √(r / (n − r)) (1 for even n), the
    finite-population factor that makes the variance of a mean over half-samples of n fixed rows
    that of a mean of n fresh draws,

        fid_sd = c · sd(F_b),   kid_sd = c · sd(K_b)            (sd with divisor B − 1),
        [fid_low, fid_high] = [F + c (q_{α/2} − F̄),  F + c (q_{1−α/2} − F̄)],   α = 1 − level,

    F the FID of all n rows (`frechet_distance_of_sets`), F̄ the mean and q_p the p-quantiles
    (linear interpolation) of the F_b: the percentile interval of F + c (F_b − F̄), whose law
    stands for that of the FID of a fresh set of n samples. The half-samples' own FIDs sit above
    F by the larger finite-N bias of r rows, hence the recentring on F̄: the interval is one for
    E F, the FID expected of n samples of the model against this reference set (what two models
    compare at one protocol), not for the FID at infinite N, which lies below it. (The reflected
    form F − c (q − F̄) covered E F less often in simulation: FID's sd grows with FID, so a set
    that scores low needs the room above it that the right-skewed F_b give the percentile form.)

    Half-samples rather than the bootstrap with replacement: a bootstrap resample repeats rows
    and has ≈ 0.632 n distinct ones, and when n < d the finite-N bias of FID (several units at
    n = 400, d = 2048, against an sd of 0.1–0.2) grows with the repeats, so bootstrap FIDs lie
    wholly above F (by 6–8 units) and spread 2–4× wider than the FIDs of fresh draws (simulated
    pool3-like features: rectified Gaussians with a decaying spectrum, n = m = 400, d = 2048).
    Half-samples repeat no row, so each K_b is the plain unbiased MMD², no row paired with a copy
    of itself. In those simulations fid_sd matched the sd of fresh draws' FIDs within their
    Monte-Carlo error (±7%) when the two laws differ, and kid_sd did when they differ in mean;
    where the laws are equal (a floor) or differ only in scale, FID and KID are (nearly)
    degenerate statistics and the half-sample sd over-states the sd of fresh draws, by 25–50%
    there (1.6× for FID in a 4-dimensional example): conservative.

    Cost: one (n, d) × (d, m) product and the n × n and n × m kernels, then per half-sample the
    singular values of an r × m matrix when min(r, m) < d (else an eigendecomposition of a d × d
    one); about 1.5 s for n = m = 400, d = 2048 and B = 200 on one CPU thread.
    """
    x, y = samples.features, reference.features
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need (n, d) features of one width, got {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    if n < 4 or n_resamples < 2 or not 0.0 < level < 1.0:
        raise ValueError(
            f"need n ≥ 4 samples, ≥ 2 resamples and 0 < level < 1, got n = {n}, "
            f"n_resamples = {n_resamples}, level = {level}"
        )
    fids, kids = subset_distances(samples, reference, half_samples(n, n_resamples, seed))
    r = n // 2
    c = math.sqrt(r / (n - r))
    value = frechet_distance_of_sets(samples, reference)
    alpha = 1.0 - level
    q_low, q_high = torch.quantile(fids, torch.tensor([alpha / 2, 1.0 - alpha / 2], dtype=torch.float64))
    centre = fids.mean()
    return ErrorBars(
        fid=value,
        fid_low=value + c * float(q_low - centre),
        fid_high=value + c * float(q_high - centre),
        fid_sd=c * float(fids.std(correction=1)),
        kid_sd=c * float(kids.std(correction=1)),
        n_resamples=n_resamples,
        subset_size=r,
    )
