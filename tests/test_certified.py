"""The certified resampled prior on the linear logit ℓ(z) = c − β·a·z, where everything reduces to one
dimension: with s = ‖a‖ and u = â·z ~ N(0, 1) under N(0, I), Z = E[sigmoid(c − βs·u)], the tilted
law of u is φ(u)·sigmoid(c − βs·u)/Z, and the components of z orthogonal to a stay N(0, 1).
Quadrature (scipy, 1e-13) gives the exact values; Monte-Carlo tolerances are 4 standard errors
unless stated."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from vaepp.logz import log_z_ais, log_z_reverse_ais
from vaepp.posteriors import log_standard_normal
from vaepp.resampled import (
    bernstein_width,
    hoeffding_width,
    lars_log_z,
    log_prior_density,
    log_z_certificate,
    rejection_sample,
)

ZDIM = 4


def linear_case(c=0.5, beta_s=2.0, zdim=ZDIM, seed=0):
    """a with ‖a‖ = beta_s/β at β = 1. Returns (unit direction â (Z,) float64, log_acceptance)."""
    a = torch.randn(zdim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a_hat = a / a.norm()

    def log_acceptance(z):
        return torch.nn.functional.logsigmoid(c - beta_s * (z @ a_hat.to(z.dtype)))

    return a_hat, log_acceptance


def gauss_expect(g):
    """E[g(u)], u ~ N(0, 1), by adaptive quadrature to ~1e-13."""
    value, _ = integrate.quad(
        lambda u: g(u) * math.exp(-0.5 * u * u) / math.sqrt(2 * math.pi), -40, 40, epsabs=1e-14, epsrel=1e-13, limit=400
    )
    return value


def exact_z(c, beta_s):
    return gauss_expect(lambda u: special.expit(c - beta_s * u))


def test_quadrature_agrees_with_gauss_hermite():
    nodes, weights = np.polynomial.hermite_e.hermegauss(250)
    gh = (weights * special.expit(0.5 - 2.0 * nodes)).sum() / math.sqrt(2 * math.pi)
    assert exact_z(0.5, 2.0) == pytest.approx(gh, abs=1e-12)
    assert exact_z(0.0, 0.0) == pytest.approx(0.5, abs=1e-14)


# ------------------------------------------------------------------------------------------------
# Certificate
# ------------------------------------------------------------------------------------------------


def test_certificate_fields_width_and_target():
    _, log_acc = linear_case(c=0.5)
    truth = exact_z(0.5, 2.0)
    est = log_z_certificate(
        log_acc,
        ZDIM,
        delta=1e-6,
        target_half_width=0.05,
        pilot_samples=20_000,
        generator=torch.Generator().manual_seed(1),
    )
    x = est.extra
    assert est.name == "certificate" and est.n_samples == x["m"] and est.ess == x["m"]
    assert est.log_z == x["log_z_hi"] == pytest.approx(math.log(x["z_hi"]))
    assert x["z_lo"] <= truth <= x["z_hi"]
    assert x["z_lo"] < x["z_hat"] < x["z_hi"]
    assert x["z_hi"] == min(x["hoeffding_hi"], x["bernstein_hi"])
    assert x["z_lo"] == max(x["hoeffding_lo"], x["bernstein_lo"])
    # The chosen M meets the target, and is not far above the smallest M that does.
    assert x["target_met"] and x["log_half_width"] <= 0.05
    assert x["log_half_width"] > 0.035
    # Fresh draws: the main estimate is not the pilot's.
    assert x["z_hat"] != x["pilot_z_hat"]
    assert abs(x["z_hat"] - truth) < 4 * math.sqrt(x["sample_var"] / x["m"])
    assert est.std_err == pytest.approx(math.sqrt(x["sample_var"] / x["m"]) / x["z_hat"])
    assert x["sample_var"] == pytest.approx(
        gauss_expect(lambda u: special.expit(0.5 - 2 * u) ** 2) - truth**2, rel=0.02
    )
    # The widths are those of the stated formulas at δ/4 each.
    assert x["hoeffding_hi"] - x["z_hat"] == pytest.approx(hoeffding_width(x["m"], 1e-6 / 4))
    assert x["bernstein_hi"] - x["z_hat"] == pytest.approx(bernstein_width(x["m"], x["sample_var"], 1e-6 / 4))


@pytest.mark.parametrize("delta,reps", [(0.05, 100), (1e-6, 20)])
def test_certificate_covers_exact_z_at_stated_rate(delta, reps):
    c, beta_s = -1.0, 2.0
    _, log_acc = linear_case(c=c, beta_s=beta_s)
    truth = exact_z(c, beta_s)
    gen = torch.Generator().manual_seed(2)
    misses_hi = misses_lo = 0
    for _ in range(reps):
        est = log_z_certificate(
            log_acc, ZDIM, delta=delta, target_half_width=0.3, pilot_samples=2000, chunk=4096, generator=gen
        )
        misses_hi += truth > est.extra["z_hi"]
        misses_lo += truth < est.extra["z_lo"]
        assert est.extra["log_half_width"] <= 0.3
    # Each side is allowed δ/2 of the total δ; with probability ≥ 1 − 1e-4 a valid interval misses
    # at most `allowed` times (binomial tail at the full δ).
    allowed = stats.binom.ppf(1 - 1e-4, reps, delta)
    assert misses_hi + misses_lo <= allowed
    if delta < 1e-3:
        assert misses_hi + misses_lo == 0


def test_bernstein_beats_hoeffding_for_small_z():
    _, log_acc = linear_case(c=-5.0, beta_s=1.0)  # Z ≈ 0.011, V ≈ 10⁻⁴
    est = log_z_certificate(
        log_acc,
        ZDIM,
        delta=1e-6,
        target_half_width=0.2,
        pilot_samples=20_000,
        generator=torch.Generator().manual_seed(3),
    )
    x = est.extra
    assert x["bernstein_hi"] < x["hoeffding_hi"] and x["z_hi"] == x["bernstein_hi"]
    assert x["z_lo"] <= exact_z(-5.0, 1.0) <= x["z_hi"]


def test_certificate_refuses_unreachable_target_and_bad_acceptance():
    _, log_acc = linear_case(c=-5.0, beta_s=1.0)
    with pytest.raises(ValueError, match="max_samples"):
        log_z_certificate(log_acc, ZDIM, target_half_width=0.01, pilot_samples=5000, max_samples=10_000)
    with pytest.raises(ValueError, match="a must lie in"):
        log_z_certificate(lambda z: z[:, 0].abs() + 1.0, ZDIM, pilot_samples=100)


def test_certificate_does_not_depend_on_chunk_size():
    _, log_acc = linear_case()
    kw = dict(delta=1e-3, target_half_width=0.1, pilot_samples=3000)
    runs = [
        log_z_certificate(log_acc, ZDIM, chunk=chunk, generator=torch.Generator().manual_seed(4), **kw).extra
        for chunk in (1, 5000, 65536)
    ]
    for r in runs[1:]:
        assert r["m"] == runs[0]["m"]
        assert r["z_hat"] == pytest.approx(runs[0]["z_hat"], abs=1e-12)
        assert r["sample_var"] == pytest.approx(runs[0]["sample_var"], rel=1e-9)


# ------------------------------------------------------------------------------------------------
# Sampler and density
# ------------------------------------------------------------------------------------------------


def tilted_moments(c, beta_s, truncation=None):
    """Mean, variance and 4th central moment of u = â·z under p (or p_T), and Z."""
    z = exact_z(c, beta_s)
    if truncation is None:

        def weight(u):
            return special.expit(c - beta_s * u) / z
    else:
        alpha = (1 - z) ** (truncation - 1)

        def weight(u):
            return special.expit(c - beta_s * u) * (1 - alpha) / z + alpha

    mean = gauss_expect(lambda u: u * weight(u))
    var = gauss_expect(lambda u: (u - mean) ** 2 * weight(u))
    m4 = gauss_expect(lambda u: (u - mean) ** 4 * weight(u))
    return mean, var, m4, z


@pytest.mark.parametrize("truncation", [None, 2, 3])
def test_rejection_sampler_matches_quadrature_moments(truncation):
    c, beta_s, n = -1.0, 2.5, 40_000
    a_hat, log_acc = linear_case(c=c, beta_s=beta_s)
    gen = torch.Generator().manual_seed(5)
    z, info = rejection_sample(log_acc, ZDIM, n, truncation=truncation, generator=gen, batch=8192, dtype=torch.float64)
    assert z.shape == (n, ZDIM)
    mean, var, m4, z_exact = tilted_moments(c, beta_s, truncation)
    u = z @ a_hat
    assert abs(u.mean().item() - mean) < 4 * math.sqrt(var / n)
    assert abs(u.var().item() - var) < 4 * math.sqrt((m4 - var**2) / n)
    # The orthogonal part is untouched N(0, I).
    orth = z - u[:, None] * a_hat
    assert orth.mean(0).abs().max().item() < 4 / math.sqrt(n)
    assert (orth.square().sum(1).mean().item() - (ZDIM - 1)) < 4 * math.sqrt(2 * (ZDIM - 1) / n)
    # Proposals per sample: geometric(Z) (mean 1/Z), or capped at T: (1 − (1 − Z)^T)/Z.
    per_sample = info["proposals"] / n
    if truncation is None:
        expected, sd = 1 / z_exact, math.sqrt((1 - z_exact) / z_exact**2)
    else:
        q = 1 - z_exact
        probs = [q**t * z_exact for t in range(truncation - 1)] + [q ** (truncation - 1)]  # P(tries = t + 1)
        expected = sum((t + 1) * p for t, p in enumerate(probs))
        sd = math.sqrt(sum((t + 1) ** 2 * p for t, p in enumerate(probs)) - expected**2)
        assert expected == pytest.approx((1 - q**truncation) / z_exact)
    assert abs(per_sample - expected) < 4 * sd / math.sqrt(n)
    assert info["acceptance_rate"] == pytest.approx(n / info["proposals"])


def test_rejection_sampler_edge_cases():
    _, log_acc = linear_case(c=-1.0)
    z, info = rejection_sample(log_acc, ZDIM, 1000, truncation=1, generator=torch.Generator().manual_seed(6), batch=300)
    assert info["proposals"] == 1000 and z.shape == (1000, ZDIM)  # T = 1: every proposal is a sample
    assert not z.is_inference() and not z.requires_grad
    weight = torch.ones(ZDIM, requires_grad=True)
    (z @ weight).square().sum().backward()  # usable in a graph being trained
    assert weight.grad is not None
    # The first n in draw order are kept: a smaller request gives a prefix of a larger one.
    gen_kw = dict(truncation=3, batch=512)
    z_small, _ = rejection_sample(log_acc, ZDIM, 100, generator=torch.Generator().manual_seed(7), **gen_kw)
    z_large, _ = rejection_sample(log_acc, ZDIM, 300, generator=torch.Generator().manual_seed(7), **gen_kw)
    assert torch.equal(z_small, z_large[:100])


def _reference_sampler(log_acc, n, truncation, seed, batch):
    """The sampler's rule written as a loop over single proposals, on the same random stream."""
    gen = torch.Generator().manual_seed(seed)
    out, tries, used = [], 0, 0
    while len(out) < n:
        eps = torch.randn(batch, ZDIM, generator=gen)
        u = torch.rand(batch, generator=gen, dtype=torch.float64)
        log_a = log_acc(eps).double()
        for i in range(batch):
            used += 1
            tries += 1
            if math.log(u[i].item()) < log_a[i].item() or tries == truncation:
                out.append(eps[i])
                tries = 0
                if len(out) == n:
                    return torch.stack(out), used
    raise AssertionError("unreachable")


@pytest.mark.parametrize("truncation", [None, 1, 3, 10])
@pytest.mark.parametrize("batch", [7, 64])
def test_rejection_sampler_equals_one_proposal_at_a_time(truncation, batch):
    _, log_acc = linear_case(c=-2.0, beta_s=2.0)  # Z ≈ 0.2: runs of rejections cross batch ends
    z, info = rejection_sample(
        log_acc, ZDIM, 150, truncation=truncation, generator=torch.Generator().manual_seed(11), batch=batch
    )
    z_ref, used = _reference_sampler(log_acc, 150, truncation, 11, batch)
    assert torch.equal(z, z_ref) and info["proposals"] == used


@pytest.mark.parametrize("truncation", [None, 1, 2, 5])
def test_log_prior_density_integrates_to_one(truncation):
    c, beta_s = -1.0, 2.0
    z_exact = exact_z(c, beta_s)
    u = torch.linspace(-14.0, 14.0, 40_001, dtype=torch.float64)
    log_n = -0.5 * u.square() - 0.5 * math.log(2 * math.pi)
    log_a = torch.nn.functional.logsigmoid(c - beta_s * u)
    density = log_prior_density(log_n, log_a, math.log(z_exact), truncation).exp()
    assert torch.trapezoid(density, u).item() == pytest.approx(1.0, abs=1e-10)


def test_log_prior_density_values_and_gradients():
    log_n = torch.randn(6, dtype=torch.float64, requires_grad=True)
    log_a = (-torch.rand(6, dtype=torch.float64) * 5).requires_grad_(True)
    log_z = torch.tensor(math.log(0.3), dtype=torch.float64, requires_grad=True)
    alpha = 0.7**3
    direct = log_n + torch.log(log_a.exp() * (1 - alpha) / 0.3 + alpha)
    assert torch.allclose(log_prior_density(log_n, log_a, log_z, 4), direct)
    assert torch.allclose(log_prior_density(log_n, log_a, log_z), log_n + log_a - log_z)
    for t in (None, 4):
        assert torch.autograd.gradcheck(lambda n_, a_, z_, t=t: log_prior_density(n_, a_, z_, t), (log_n, log_a, log_z))
    # Extreme inputs stay finite: tiny a and Z, Z near 1.
    for lz in (-50.0, -1e-9):
        lz_t = torch.tensor(lz, dtype=torch.float64, requires_grad=True)
        out = log_prior_density(log_n, torch.full((6,), -300.0, dtype=torch.float64), lz_t, 10)
        (g,) = torch.autograd.grad(out.sum(), lz_t)
        assert torch.isfinite(out).all() and torch.isfinite(g)


# ------------------------------------------------------------------------------------------------
# Training estimator
# ------------------------------------------------------------------------------------------------


def test_lars_value_and_straight_through_gradient():
    gen = torch.Generator().manual_seed(8)
    c = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    log_ratio = torch.randn(5, generator=gen, dtype=torch.float64)
    z_ema, decay = 0.4, 0.9

    def log_a(x):
        return torch.nn.functional.logsigmoid(c - beta * x[:, 0])

    log_z, new_ema = lars_log_z(log_a(eps), log_a(z), log_ratio, z_ema, decay=decay)
    z_cur = (log_a(eps).exp().sum() + log_a(z).exp() * log_ratio.exp()) / 17  # (5,)
    z_smooth = decay * z_ema + (1 - decay) * z_cur
    assert torch.allclose(log_z, z_smooth.log())
    assert new_ema.item() == pytest.approx(z_smooth.mean().item()) and not new_ema.requires_grad
    weights = torch.randn(5, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((weights * log_z).sum(), (c, beta))
    want = torch.autograd.grad((weights * z_cur / z_smooth.detach()).sum(), (c, beta))
    for g, w in zip(got, want, strict=True):
        assert g.item() == pytest.approx(w.item(), rel=1e-10)
    # The ratio is a constant: a log_ratio that requires grad gets none.
    lr = log_ratio.clone().requires_grad_(True)
    log_z2, _ = lars_log_z(log_a(eps), log_a(z), lr, z_ema, decay=decay)
    assert torch.autograd.grad(log_z2.sum(), lr, allow_unused=True)[0] is None
    # decay = 0: the plain current estimate; extreme log a stay finite.
    log_z0, _ = lars_log_z(log_a(eps), log_a(z), log_ratio, 0.0, decay=0.0)
    assert torch.allclose(log_z0, z_cur.log())
    log_zx, ema_x = lars_log_z(torch.full((16,), -800.0), torch.full((5,), -800.0), torch.zeros(5), 0.0, decay=0.0)
    assert torch.allclose(log_zx, torch.full((5,), -800.0)) and ema_x.item() == 0.0


def test_lars_gradient_is_unbiased_for_exact_gradient():
    c0, beta0, s, zdim, k, b, reps = -0.5, 1.2, 1.5, 3, 8, 4, 1500
    gen = torch.Generator().manual_seed(9)
    a_hat = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) * s
    q_mean, q_sd = torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64), 1.1  # a fixed "posterior" N(m, σ²I)
    c = torch.tensor(c0, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(beta0, dtype=torch.float64, requires_grad=True)

    def log_a(x):
        return torch.nn.functional.logsigmoid(c - beta * (x @ a_hat))

    grads = []
    for _ in range(reps):
        eps = torch.randn(k, zdim, generator=gen, dtype=torch.float64)
        noise = torch.randn(b, zdim, generator=gen, dtype=torch.float64)
        z = q_mean + q_sd * noise
        log_q = log_standard_normal(noise) - zdim * math.log(q_sd)
        log_z, _ = lars_log_z(log_a(eps), log_a(z), log_standard_normal(z) - log_q, 0.5)
        # ∇log Z_i·Z_smooth,i = ∇Z_cur,i: the per-image current estimate's gradient, averaged.
        z_smooth = log_z.detach().exp()
        grads.append(torch.stack(torch.autograd.grad((z_smooth * log_z).mean(), (c, beta))))
    grads = torch.stack(grads)  # (reps, 2)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(reps)

    def dsig(u):
        p = special.expit(c0 - beta0 * s * u)
        return p * (1 - p)

    exact = torch.tensor([gauss_expect(dsig), gauss_expect(lambda u: dsig(u) * (-s * u))], dtype=torch.float64)
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    assert (se < 0.05 * exact.abs()).all()  # the test has power


# ------------------------------------------------------------------------------------------------
# Reverse AIS
# ------------------------------------------------------------------------------------------------


def test_reverse_ais_brackets_log_z_with_forward_ais():
    c, beta_s = -1.0, 3.0
    _, log_acc = linear_case(c=c, beta_s=beta_s)
    truth = math.log(exact_z(c, beta_s))

    def log_f(z):
        return log_standard_normal(z) + log_acc(z)

    seeds, chains, temps = (0, 1, 2), 200, 60
    start, _ = rejection_sample(log_acc, ZDIM, len(seeds) * chains, generator=torch.Generator().manual_seed(10))
    rev = log_z_reverse_ais(log_f, start.view(len(seeds), chains, ZDIM), n_temps=temps, seeds=seeds)
    fwd = log_z_ais(log_f, ZDIM, n_chains=chains, n_temps=temps, seeds=seeds)
    assert rev.name == "reverse_ais" and rev.n_samples == len(seeds) * chains
    assert len(rev.extra["log_z_per_seed"]) == 3 and rev.extra["seed_std"] > 0.0
    assert rev.extra["log_z_per_seed"][0] == pytest.approx(rev.extra["seed_mean"], abs=5 * rev.extra["seed_std"])
    for rate in rev.extra["acceptance_per_seed"]:
        assert 0.4 < rate < 0.9
    assert abs(rev.log_z - truth) < 4 * rev.std_err + 1e-3
    assert abs(fwd.log_z - truth) < 4 * fwd.std_err + 1e-3
    assert fwd.log_z <= rev.log_z + 3 * math.hypot(fwd.std_err, rev.std_err)
    assert rev.std_err < 0.05


def test_reverse_ais_starts_where_told_and_validates_shape():
    _, log_acc = linear_case()

    def log_f(z):
        return log_standard_normal(z) + log_acc(z)

    start = torch.randn(2, 10, ZDIM)
    with pytest.raises(ValueError, match="one non-empty block per seed"):
        log_z_reverse_ais(log_f, start, n_temps=5, seeds=(0, 1, 2))
    a = log_z_reverse_ais(log_f, start, n_temps=5, seeds=(0, 1)).log_z
    b = log_z_reverse_ais(log_f, start + 1.0, n_temps=5, seeds=(0, 1)).log_z
    assert a != b and a == log_z_reverse_ais(log_f, start, n_temps=5, seeds=(0, 1)).log_z
