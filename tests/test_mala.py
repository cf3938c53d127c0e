"""MALA on the linear critic: E(z) = β a·z + ½‖z‖², target p_λ = N(−βa, I) (paper eq. 4 with a linear critic).

Chains are independent, so the ensemble of M chains at the final step is M independent draws
(once mixed): each coordinate's mean has standard error 1/√M and its variance 1 has standard
error √(2/(M−1)). Tolerances are 4 such errors. For a Gaussian target the unadjusted Langevin
algorithm (ULA) has an exact stationary law: z' − m = (1 − α)(z − m) + √(2α)ξ gives variance
v = 2α / (1 − (1 − α)²) = 1 / (1 − α/2), so its bias at a large step is known in closed form.
"""

import math

import pytest
import torch

from factories import model_spec
from vaepp.mala import energy_from_log_f, log_proposal_density, mala
from vaepp.model import VAEPP
from vaepp.posteriors import log_standard_normal

ZDIM, BETA, M = 4, 2.0, 4000


def linear_critic(seed=0):
    a = torch.randn(ZDIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = a / a.norm()  # ‖βa‖ = β: the target sits 2 units from the origin

    def energy_and_grad(z):
        return BETA * (z @ a) + 0.5 * z.square().sum(-1), BETA * a + z

    return a, energy_and_grad


def _start(seed):
    """Over-dispersed start: N(0, 9I) around the origin, far from the target N(−βa, I)."""
    return 3.0 * torch.randn(M, ZDIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_target(z, a, var=1.0):
    mean_err = (z.mean(0) + BETA * a).abs().max().item()
    assert mean_err < 4.0 * math.sqrt(var / M), f"ensemble mean off by {mean_err}"
    v = z.var(0)
    assert ((v - var).abs() < 4.0 * var * math.sqrt(2.0 / (M - 1))).all(), f"variances {v.tolist()}"


def test_mala_reproduces_target_mean_and_unit_variance():
    a, eg = linear_critic()
    z, acceptance, stats = mala(eg, _start(1), 150, 0.3, generator=torch.Generator().manual_seed(2))
    _check_target(z, a)
    # The acceptance rate is reported, over all steps and chains, and per step.
    per_step = stats["acceptance_per_step"]
    assert per_step.shape == (150,) and acceptance == pytest.approx(per_step.mean().item())
    assert 0.7 < acceptance < 1.0  # a small step on a Gaussian: most proposals are accepted
    # The mean energy settles at its stationary value E[β a·z + ½‖z‖²] = −β² + (Z + β²)/2.
    e_stat = -(BETA**2) + 0.5 * (ZDIM + BETA**2)
    tail = stats["energy_mean_per_step"][-50:].mean().item()
    assert abs(tail - e_stat) < 4.0 * math.sqrt((ZDIM / 2 + BETA**2) / M)


def test_too_large_step_still_targets_the_law_but_ula_is_biased():
    a, eg = linear_critic()
    alpha = 1.5  # ULA's stationary variance is 1/(1 − α/2) = 4: four times too wide
    z, acceptance, _ = mala(eg, _start(3), 400, alpha, generator=torch.Generator().manual_seed(4))
    _check_target(z, a)
    assert acceptance < 0.5  # far from the small-step regime: the correction is doing the work
    z_ula, acc_ula, _ = mala(eg, _start(3), 400, alpha, metropolis=False, generator=torch.Generator().manual_seed(4))
    assert acc_ula == 1.0
    _check_target(z_ula, a, var=1.0 / (1.0 - alpha / 2.0))  # ULA's law, exactly as predicted
    assert (z_ula.var(0) > 3.0).all()  # measurably wrong: variance 4 instead of 1


def test_adaptation_reaches_target_acceptance():
    _, eg = linear_critic()
    z, _, stats = mala(
        eg, _start(5), 300, 3.0, adapt=True, target_accept=0.65, generator=torch.Generator().manual_seed(6)
    )
    # With 4000 chains the per-step rate has sd ≈ 0.008; the adapted α hovers near the target.
    assert abs(stats["acceptance_per_step"][-100:].mean().item() - 0.65) < 0.03
    assert stats["step_size"] < 3.0


def test_energy_from_log_f_matches_linear_critic_energy_and_works_in_inference_mode():
    a, eg = linear_critic()

    def log_f(z):
        return log_standard_normal(z) - BETA * (z @ a.to(z.dtype))

    z = torch.randn(7, ZDIM, dtype=torch.float64)
    with torch.inference_mode():
        e1, g1 = energy_from_log_f(log_f)(z)
        zz, rate, _ = mala(energy_from_log_f(log_f), z, 3, 0.1, generator=torch.Generator().manual_seed(0))
    e2, g2 = eg(z)
    assert torch.allclose(e1, e2) and torch.allclose(g1, g2)
    assert zz.shape == z.shape and 0.0 <= rate <= 1.0


def test_model_energy_is_beta_critic_plus_half_squared_norm():
    """E(z) = β·D(G(z)) + ½‖z‖² and its gradient, written out directly on the model's networks."""
    torch.manual_seed(0)
    model = VAEPP(model_spec((1, 6, 6), zdim=3, hidden=(16,), beta_max=5.0)).double().eval()
    with torch.no_grad():
        model.prior.xi.fill_(1.0)  # β away from its initial w/2
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    direct = model.beta * model.critic_images(model.image_mean(model.decode(z))) + 0.5 * z.square().sum(-1)
    (grad,) = torch.autograd.grad(direct.sum(), z)
    energy, energy_grad = model.energy_and_grad(z.detach())
    assert torch.allclose(energy, direct.detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(energy_grad, grad, rtol=1e-12, atol=1e-12)


def test_proposal_density_is_the_langevin_gaussian():
    """log q(z'|z) differs from log N(z'; z − α∇E, 2αI) only by a constant (which cancels)."""
    z, zp, g = torch.randn(3, 6, ZDIM, dtype=torch.float64)
    alpha = 0.37
    exact = torch.distributions.Normal(z - alpha * g, math.sqrt(2 * alpha)).log_prob(zp).sum(-1)
    diff = exact - log_proposal_density(zp, z, g, alpha)
    assert torch.allclose(diff, diff[0].expand_as(diff))


def test_nan_energy_region_is_never_entered():
    """A proposal whose energy is NaN (outside the model's domain) is rejected, not accepted."""

    def eg(z):
        e = 0.5 * z.square().sum(-1)
        return torch.where(z[:, 0] > 0.5, torch.full_like(e, math.nan), e), z

    z, _, _ = mala(eg, torch.zeros(500, 2), 50, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(z).all() and (z[:, 0] <= 0.5).all()


def test_bad_arguments_fail_clearly():
    _, eg = linear_critic()
    with pytest.raises(ValueError, match="step_size"):
        mala(eg, torch.zeros(2, ZDIM), 1, 0.0)
    with pytest.raises(ValueError, match="shape"):
        mala(eg, torch.zeros(ZDIM), 1, 0.1)
