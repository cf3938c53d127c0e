"""The pull-back prior (paper eq. 4) and the training estimate of its log partition function.

    f_λ(z) = N(z; 0, I) · exp(−β·D(G(z))),   p_λ(z) = f_λ(z) / Z,   Z = ∫ f_λ(z) dz,
    β = w · sigmoid(ξ), ξ learnable (ξ₀ = 0), w = `beta_max`.

log f keeps the Gaussian constant, so Z = 1 exactly at β = 0 and VAEPP reduces to a plain VAE.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .posteriors import log_standard_normal


def beta_from_xi(xi: Tensor, beta_max: float) -> Tensor:
    """β = w·sigmoid(ξ) ∈ (0, w)."""
    return beta_max * torch.sigmoid(xi)


def log_f(z: Tensor, critic_on_decoded: Tensor, beta: Tensor) -> Tensor:
    """log f_λ(z) = log N(z; 0, I) − β·D(G(z)), in nats. z: (..., Z), critic values (...)."""
    return log_standard_normal(z) - beta * critic_on_decoded


def log_acceptance(critic_on_decoded: Tensor, beta: Tensor, c: Tensor, extra: Tensor | None = None) -> Tensor:
    """log a(z) = log sigmoid(ℓ(z)), ℓ(z) = c − β·D(G(z)) (+ h(z)): the acceptance of the bounded
    pull-back prior p(z) = N(z; 0, I)·a(z)/Z of `certified` runs, with Z = E_{N(0, I)}[a] ≤ 1 (the
    resampled priors of Bauer & Mnih 2019, with the critic on decoded images as the logit). As β → 0
    and c → ∞ it becomes N(0, I). critic values (...) and extra (...) → (...), nats."""
    logit = c - beta * critic_on_decoded
    if extra is not None:
        logit = logit + extra
    return torch.nn.functional.logsigmoid(logit)


def log_f_and_grad(log_f: Callable[[Tensor], Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
    """log f(z) and its score ∇_z log f(z) by autograd, detached: (M, Z) → (M,), (M, Z), nats.

    The one gradient of the prior that the samplers use: MALA's energy E = −log f − (Z/2)·log 2π
    (`vaepp.mala.energy_from_log_f`) and AIS's log-ratio h = log f − log N(z; 0, I)
    (`vaepp.logz`). Works inside `torch.inference_mode()` (the graph is built in a local
    non-inference region).
    """
    with torch.inference_mode(False), torch.enable_grad():
        z_leaf = z.detach().clone().requires_grad_(True)
        value = log_f(z_leaf)
        (grad,) = torch.autograd.grad(value.sum(), z_leaf)
    return value.detach(), grad.detach()


def logmeanexp(x: Tensor, dim: int = -1) -> Tensor:
    """log((1/n) Σ exp(x)) along `dim`, stable for any range of x."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def log_z_train(
    beta: Tensor,
    critic_on_prior_samples: Tensor,
    log_f_posterior: Tensor,
    log_q_posterior: Tensor,
    n_train: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The training estimate log Z_train = log(½(Ẑ_N + Ẑ_q)) (Algorithms 1-2, line 5).

    Ẑ_N = mean_k exp(−β·D(G(ε_k))), ε_k ~ N(0, I): unbiased for Z (critic_on_prior_samples (K,)).
    Ẑ_q = mean_i f(z_i)·N / q(z_i | e_i), z_i ~ q(z | e_i), N = n_train (the real training-set
    size): the paper's q-based term; with full-support q its mean is N·Z, not Z, and with ±2σ
    truncation it can sit far below; it is NOT an upper bound (see `vaepp.logz.log_z_q_based`).
    Gradients flow through both terms. Returns (log Z_train, log Ẑ_N, log Ẑ_q), scalars.
    """
    log_z_n = logmeanexp(-beta * critic_on_prior_samples, dim=0)
    log_z_q = logmeanexp(log_f_posterior - log_q_posterior, dim=0) + math.log(n_train)
    log_z = torch.logaddexp(log_z_n, log_z_q) - math.log(2.0)
    return log_z, log_z_n, log_z_q
