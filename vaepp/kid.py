"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD²
with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³ between two sets of pool3 features.

Read from the same features as the FID (`vaepp.fid_features`); unlike FID it has no bias at finite
N (it can be negative). Unitless.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


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
