"""Encoder posteriors q(z | e): diagonal Normal, Normal truncated at ±2σ, and planar flows.

All densities are in nats; z has shape (n, B, zdim) for n samples of each of B posteriors.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .options import PosteriorKind

LOG_2PI = math.log(2.0 * math.pi)
TRUNCATION = 2.0  # in standard deviations
# Mass of N(0,1) inside [−2, 2]: erf(2/√2) = 0.9544997361…
TRUNCATED_MASS = math.erf(TRUNCATION / math.sqrt(2.0))
LOG_TRUNCATED_MASS = math.log(TRUNCATED_MASS)


def log_normal(z: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
    """Σ_d log N(z_d; μ_d, σ_d²), summed over the last dimension. Shapes broadcast; (...)."""
    eps = (z - mu) * torch.exp(-log_sigma)
    return (-0.5 * eps.square() - log_sigma - 0.5 * LOG_2PI).sum(-1)


def log_normal_components(z: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
    """Σ_d log N(z_d; μ_kd, σ_kd²) of every point against every one of K diagonal Normals:
    z (..., zdim), μ and log σ (K, zdim) → (..., K) in float64. The square is expanded,
    Σ_d (z_d − μ_kd)²/σ_kd² = z²·σ_k⁻² − 2 z·(μ_k σ_k⁻²) + μ_k²·σ_k⁻², into two matrix products, so
    the work is O(N·K·zdim) multiply-adds with O(N·K) memory instead of an (N, K, zdim) tensor;
    float64 keeps the cancellation between the three terms far below float32's resolution."""
    z, mu, log_sigma = z.double(), mu.double(), log_sigma.double()
    w = torch.exp(-2.0 * log_sigma)  # σ⁻² (K, zdim)
    quad = z.square() @ w.T - 2.0 * (z @ (mu * w).T) + (mu.square() * w).sum(-1)
    return -0.5 * quad - log_sigma.sum(-1) - 0.5 * mu.shape[-1] * LOG_2PI


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I) with its constant, summed over the last dimension: (..., zdim) → (...)."""
    return -0.5 * z.square().sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


def sample_standard(kind: PosteriorKind, shape: tuple[int, ...], *, device, dtype, generator=None) -> Tensor:
    """ε with the posterior's standardised law: N(0,1), or N(0,1) truncated to [−2, 2].

    The truncated draw is by inversion, ε = Φ⁻¹(u), u ~ U(Φ(−2), Φ(2)): exact, with no rejection
    loop, and with the same law as resampling outside the box.
    """
    if kind == "normal":
        return torch.randn(shape, device=device, dtype=dtype, generator=generator)
    if kind == "truncated":
        lo = 0.5 * (1.0 - TRUNCATED_MASS)
        u = lo + TRUNCATED_MASS * torch.rand(shape, device=device, dtype=dtype, generator=generator)
        eps = torch.special.ndtri(u)
        # float32 rounding of Φ⁻¹ near the edges may step a hair outside ±2; the density is
        # zero there, so pull such draws back onto the box.
        return eps.clamp(-TRUNCATION, TRUNCATION)
    raise ValueError(f"unknown posterior kind {kind!r}; allowed: normal, truncated")


def log_posterior(kind: PosteriorKind, z: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
    """log q(z | e) for a diagonal Normal or its ±2σ truncation (density N/0.9545 per dim).

    Outside the truncation box the density is 0, so the result is −inf there.
    """
    log_q = log_normal(z, mu, log_sigma)
    if kind == "normal":
        return log_q
    eps = (z - mu) * torch.exp(-log_sigma)
    inside = (eps.abs() <= TRUNCATION + 1e-6).all(-1)
    log_q = log_q - z.shape[-1] * LOG_TRUNCATED_MASS
    return torch.where(inside, log_q, torch.full_like(log_q, -math.inf))


class PlanarFlows(nn.Module):
    """K planar flows f(z) = z + û·tanh(wᵀz + b) applied to posterior samples (Rezende &
    Mohamed 2015), with û = u + (m(wᵀu) − wᵀu)·w/‖w‖², m(a) = −1 + softplus(a), so that
    wᵀû ≥ −1 and each map is invertible. log q(z_K) = log q₀(z₀) − Σ_k log|1 + ûᵀ h'(·) w|.
    """

    def __init__(self, zdim: int, n_flows: int):
        super().__init__()
        self.u = nn.Parameter(torch.randn(n_flows, zdim) * 0.01)
        self.w = nn.Parameter(torch.randn(n_flows, zdim) * 0.01)
        self.b = nn.Parameter(torch.zeros(n_flows))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z: (..., zdim) → (f(z) (..., zdim), Σ log|det ∂f/∂z| (...))."""
        log_det = torch.zeros(z.shape[:-1], device=z.device, dtype=z.dtype)
        for u, w, b in zip(self.u, self.w, self.b, strict=True):
            wu = (w * u).sum()
            u_hat = u + (F.softplus(wu) - 1.0 - wu) * w / (w.square().sum() + 1e-12)
            a = z @ w + b  # (...)
            h = torch.tanh(a)
            z = z + h.unsqueeze(-1) * u_hat
            psi_u = (1.0 - h.square()) * (w @ u_hat)  # h'(a)·wᵀû
            log_det = log_det + torch.log((1.0 + psi_u).abs() + 1e-12)
        return z, log_det
