"""Metropolis-adjusted Langevin (MALA) on a latent energy, batched over chains (paper §4.3).

For the pull-back prior the target is p_λ(z) ∝ f_λ(z) = exp(−E(z)) · const with

    E(z) = β·D(G(z)) + ½‖z‖² = −log f(z) − (Z/2)·log 2π,

and one MALA step from z is

    z' = z − α∇E(z) + √(2α)·ξ,   ξ ~ N(0, I),
    log q(z'|z) = −‖z' − z + α∇E(z)‖² / (4α),
    accept with probability min(1, exp(E(z) − E(z') + log q(z|z') − log q(z'|z))), per chain.

Chains are the rows of z: (M, zdim). Every operation is vectorised over the M chains; the only
Python loop is over steps. The proposal pieces are public because the annealed importance
sampler in `vaepp.logz` uses the same move on tempered energies.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .posteriors import LOG_2PI
from .score import log_f_and_grad

EnergyAndGrad = Callable[[Tensor], tuple[Tensor, Tensor]]


def energy_from_log_f(log_f: Callable[[Tensor], Tensor]) -> EnergyAndGrad:
    """E(z) = −log f(z) − (Z/2)·log 2π and ∇E(z) = −∇log f(z), from a log f with its constant.

    With log f(z) = log N(z; 0, I) − β·D(G(z)) this is exactly β·D(G(z)) + ½‖z‖² (paper §4.3).
    Works inside `torch.inference_mode()`. z: (M, zdim) → E (M,), ∇E (M, zdim); E in nats.
    """

    def energy_and_grad(z: Tensor) -> tuple[Tensor, Tensor]:
        value, grad = log_f_and_grad(log_f, z)
        return -value - 0.5 * z.shape[-1] * LOG_2PI, -grad

    return energy_and_grad


def langevin_proposal(z: Tensor, grad: Tensor, step_size: float | Tensor, generator=None, noise=None) -> Tensor:
    """z' = z − α∇E(z) + √(2α)·ξ, ξ ~ N(0, I). z, grad: (M, zdim) → (M, zdim). α: a number, or one per
    chain (M,); ξ is drawn from `generator` unless given as `noise` (M, zdim)."""
    if noise is None:
        noise = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
    if not isinstance(step_size, Tensor):
        return z - step_size * grad + math.sqrt(2.0 * step_size) * noise
    a = step_size[:, None]
    return z - a * grad + (2.0 * a).sqrt() * noise


def log_proposal_density(z_to: Tensor, z_from: Tensor, grad_from: Tensor, step_size: float | Tensor) -> Tensor:
    """log q(z_to | z_from) = −‖z_to − z_from + α∇E(z_from)‖² / (4α), up to a constant that is the
    same in both directions and cancels in the acceptance ratio. (M, zdim) → (M,); α a number or (M,)."""
    a = step_size if not isinstance(step_size, Tensor) else step_size[:, None]
    return -(z_to - z_from + a * grad_from).square().sum(-1) / (4.0 * step_size)


def metropolis_accept(log_ratio: Tensor, generator=None, uniforms: Tensor | None = None) -> Tensor:
    """Per-chain accept mask: log U < log_ratio, U ~ U(0, 1) drawn from `generator` unless given as
    `uniforms` (M,). A NaN ratio (the proposal left the region where the energy is finite) is
    rejected. (M,) → bool (M,)."""
    if uniforms is None:
        uniforms = torch.rand(log_ratio.shape, device=log_ratio.device, dtype=log_ratio.dtype, generator=generator)
    return torch.nan_to_num(log_ratio, nan=-math.inf) > torch.log(uniforms)


def mala(
    energy_and_grad: EnergyAndGrad,
    z0: Tensor,
    n_steps: int,
    step_size: float,
    *,
    generator: torch.Generator | None = None,
    adapt: bool = False,
    target_accept: float = 0.65,
    adapt_rate: float = 0.05,
    metropolis: bool = True,
    progress: bool = False,
    callback: Callable[[str, float, int], None] | None = None,
) -> tuple[Tensor, float, dict]:
    """Run M MALA chains for n_steps on E(z) (paper §4.3).

    energy_and_grad: z (M, zdim) → (E (M,), ∇E (M, zdim)); use `energy_from_log_f(log_f)` to build it
    from a log f, or the model's `energy_and_grad`. z0: (M, zdim) start points (e.g. latent-GAN
    samples, or N(0, I)).

    adapt: after each step, log α += adapt_rate·(acceptance − target_accept), one α shared by all
    chains. An adapted chain is not a fixed Markov kernel, so adapt only during burn-in and run a
    second, non-adapted call for samples.
    metropolis=False drops the accept/reject test: the unadjusted Langevin algorithm (ULA), whose
    stationary law is biased by O(α); kept to show what the correction removes.

    Returns (z (M, zdim), acceptance rate over all steps and chains, stats) with stats:
    "step_size" (final α), "acceptance_per_step" (n_steps,), "energy_mean_per_step" (n_steps,).

    callback: called after every step k (1-based) as callback("steps_done", k, k) and
    callback("acceptance_running", a_k, k), a_k the fraction of proposals accepted over the k steps
    done and all chains (unitless, in [0, 1]; the returned rate at k = n_steps, up to summation
    order). It gets Python numbers the step computes anyway and draws nothing, so the chains are
    the same with or without it.
    """
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    if not step_size > 0.0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if z0.dim() != 2:
        raise ValueError(f"z0 must have shape (M, zdim), got {tuple(z0.shape)}")
    z = z0.detach().clone()
    energy, grad = energy_and_grad(z)
    alpha = float(step_size)
    acceptance = torch.zeros(n_steps, dtype=torch.float64)
    energy_mean = torch.zeros(n_steps, dtype=torch.float64)
    steps = range(n_steps)
    accepted_sum = 0.0  # Σ of the per-step rates, for the callback's running rate
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="MALA", leave=False)
    for k in steps:
        z_new = langevin_proposal(z, grad, alpha, generator)
        energy_new, grad_new = energy_and_grad(z_new)
        if metropolis:
            log_ratio = (
                energy
                - energy_new
                + log_proposal_density(z, z_new, grad_new, alpha)
                - log_proposal_density(z_new, z, grad, alpha)
            )
            accepted = metropolis_accept(log_ratio, generator)
        else:
            accepted = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        z = torch.where(accepted[:, None], z_new, z)
        energy = torch.where(accepted, energy_new, energy)
        grad = torch.where(accepted[:, None], grad_new, grad)
        rate = accepted.double().mean().item()
        acceptance[k] = rate
        energy_mean[k] = energy.double().mean().item()
        if adapt:
            alpha *= math.exp(adapt_rate * (rate - target_accept))
        if callback is not None:
            accepted_sum += rate
            callback("steps_done", float(k + 1), k + 1)
            callback("acceptance_running", accepted_sum / (k + 1), k + 1)
    overall = acceptance.mean().item() if n_steps > 0 else float("nan")
    stats = {"step_size": alpha, "acceptance_per_step": acceptance, "energy_mean_per_step": energy_mean}
    return z, overall, stats
