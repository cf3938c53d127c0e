"""Error bars of a sample set's FID and KID for the draw of its n samples, the reference set fixed.

FID's interval and sd and the sd of the unbiased MMD² (KID) come from the same distances over
random half-samples of the n samples, drawn without replacement (`error_bars`); the bootstrap with
replacement misstates FID's error when n < d, its repeated rows adding finite-N bias and spread.
Features and their μ, Σ: `vaepp.fid_features.FeatureSet`; the distances: `vaepp.fid` and
`vaepp.kid`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .fid import _resolvable, frechet_distance_of_sets
from .fid_features import FeatureSet
from .kid import polynomial_kernel

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
    `kid.mmd2_unbiased` with the full kernel blocks, applied to each subset's rows (to rounding).

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
