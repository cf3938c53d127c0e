"""log-Z estimators on the linear critic D(G(z)) = a·z, where f(z) = N(z; 0, I)·exp(−β a·z),
p_λ = N(−βa, I) and log Z = β²‖a‖²/2 exactly (the linear critic of a pull-back prior, paper eq. 4).
Tolerances: 4 standard errors."""

import math

import pytest
import torch

from vaepp.importance import LogMeanExp
from vaepp.logz import (
    LogZEstimate,
    annealing_schedule,
    log_z_ais,
    log_z_prior_is,
    log_z_q_based,
)
from vaepp.posteriors import log_standard_normal

ZDIM = 8
BETA = 1.0
TRUNC_MASS = math.erf(2.0 / math.sqrt(2.0))


def linear_critic(zdim=ZDIM, beta=BETA, norm=2.0, seed=0):
    """a with β‖a‖ = norm, so log Z = norm²/2. Returns (a, log_f, exact log Z)."""
    a = torch.randn(zdim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = a / a.norm() * norm / beta

    def log_f(z):
        return log_standard_normal(z) - beta * (z @ a.to(z.dtype))

    return a, log_f, beta**2 * a.square().sum().item() / 2.0


def test_streaming_log_mean_exp_matches_direct_and_survives_overflow():
    log_w = torch.randn(10_000, dtype=torch.float64) * 3.0 + 2000.0  # exp overflows float64
    acc = LogMeanExp()
    for part in log_w.split(777):
        acc.update(part)
    direct = torch.logsumexp(log_w, 0).item() - math.log(log_w.numel())
    assert acc.log_mean.item() == pytest.approx(direct, abs=1e-9)
    w = torch.exp(log_w - log_w.max())
    assert acc.ess.item() == pytest.approx((w.sum() ** 2 / w.square().sum()).item(), rel=1e-9)
    rel_sd = (w.std() / w.mean()).item()
    assert acc.std_err.item() == pytest.approx(rel_sd / math.sqrt(log_w.numel()), rel=1e-6)


def test_prior_is_matches_exact_log_z_and_reports_ess():
    _, log_f, truth = linear_critic()
    n = 1_000_000
    est = log_z_prior_is(log_f, ZDIM, n, generator=torch.Generator().manual_seed(1))
    assert isinstance(est, LogZEstimate) and est.name == "prior_is" and est.n_samples == n
    assert abs(est.log_z - truth) < 4 * est.std_err
    # For log w = −βa·z, z ~ N(0, I): E[w²]/E[w]² = exp(β²‖a‖²), so ESS ≈ n·exp(−2 log Z).
    # The sample ESS of lognormal weights is noisy and biased up; a factor 2 either way.
    expected_ess = n * math.exp(-2.0 * truth)
    assert expected_ess / 2 < est.ess < expected_ess * 2
    # The stated error matches the analytic delta-method error √((e^{β²‖a‖²} − 1)/n).
    assert est.std_err == pytest.approx(math.sqrt(math.expm1(2.0 * truth) / n), rel=0.5)


def test_prior_is_does_not_depend_on_chunk_size():
    _, log_f, _ = linear_critic()
    n = 200_003  # not a multiple of any chunk
    results = [
        log_z_prior_is(log_f, ZDIM, n, chunk=chunk, generator=torch.Generator().manual_seed(7))
        for chunk in (1, 5000, 65536, 10**6)
    ]
    for r in results[1:]:
        assert r.n_samples == n
        assert r.log_z == pytest.approx(results[0].log_z, abs=1e-10)
        assert r.ess == pytest.approx(results[0].ess, rel=1e-9)
        assert r.std_err == pytest.approx(results[0].std_err, rel=1e-9)


@pytest.mark.parametrize("transition", ["mala", "hmc"])
def test_ais_matches_exact_log_z(transition):
    _, log_f, truth = linear_critic()
    est = log_z_ais(log_f, ZDIM, n_chains=400, n_temps=150, transition=transition, seeds=(0, 1, 2))
    assert est.name == "ais" and est.n_samples == 1200
    assert abs(est.log_z - truth) < 4 * est.std_err
    assert est.std_err < 0.05  # AIS on this easy path is far more precise than the tolerance
    assert len(est.extra["log_z_per_seed"]) == 3 and est.extra["seed_std"] > 0.0
    for rate in est.extra["acceptance_per_seed"]:
        assert 0.5 < rate < 0.85  # adapted towards 0.65
    assert 1.0 < est.ess <= 1200


def test_ais_same_seed_same_answer():
    _, log_f, _ = linear_critic()
    runs = [log_z_ais(log_f, ZDIM, n_chains=50, n_temps=20, seeds=(3,)) for _ in range(2)]
    assert runs[0].log_z == runs[1].log_z


def test_annealing_schedule_endpoints_and_monotone():
    for kind in ("linear", "sigmoid"):
        t = annealing_schedule(50, kind)
        assert t[0].item() == 0.0 and t[-1].item() == pytest.approx(1.0, abs=1e-15)
        assert (t.diff() > 0).all()


def _point_posteriors(n_images, sigma, truncated, seed, mean, spread):
    """Toy "posteriors" N(μ_i, σ²I) (optionally truncated at ±2σ), μ_i = mean + spread·N(0, I)."""
    gen = torch.Generator().manual_seed(seed)
    mus = mean + spread * torch.randn(n_images, ZDIM, generator=gen, dtype=torch.float64)
    log_sigma = torch.full_like(mus, math.log(sigma))

    def encode(e):
        return e, log_sigma[: e.shape[0]]

    def sample_q(mu, log_sig, n, generator=None):
        shape = (n,) + tuple(mu.shape)
        if truncated:
            lo = 0.5 * (1.0 - TRUNC_MASS)
            u = lo + TRUNC_MASS * torch.rand(shape, generator=generator, dtype=mu.dtype)
            eps = torch.special.ndtri(u).clamp(-2.0, 2.0)
        else:
            eps = torch.randn(shape, generator=generator, dtype=mu.dtype)
        z = mu + eps * log_sig.exp()
        log_q = (-0.5 * eps.square() - log_sig - 0.5 * math.log(2 * math.pi)).sum(-1)
        if truncated:
            log_q = log_q - ZDIM * math.log(TRUNC_MASS)
        return z, log_q

    return mus, encode, sample_q


def test_paper_q_with_full_support_posteriors_estimates_n_times_z():
    a, log_f, truth = linear_critic()
    n_train = 50
    # Wide posteriors near p_λ = N(−βa, I): the weights are well behaved and the estimate is
    # log Z + log N, i.e. too high by log N: the paper's estimate targets N·Z, not Z.
    mus, encode, sample_q = _point_posteriors(n_train, 1.0, False, 3, -BETA * a, 0.3)
    est = log_z_q_based(
        mus.split(20),
        encode,
        sample_q,
        log_f,
        n_train,
        n_per_image=2000,
        chunk=4096,
        generator=torch.Generator().manual_seed(4),
    )
    assert est.name == "paper_q" and est.n_samples == n_train * 2000
    assert abs(est.log_z - (truth + math.log(n_train))) < 4 * est.std_err
    assert est.extra["log_mean_f_over_q"] == pytest.approx(est.log_z - math.log(n_train))


def test_paper_q_drifts_far_from_log_z_with_narrow_posteriors():
    a, log_f, truth = linear_critic()
    n_train, sigma = 200, 0.05
    m = -BETA * a
    # Narrow posteriors placed at draws from p_λ itself: an aggregate posterior that covers p_λ.
    mus, encode, sample_q = _point_posteriors(n_train, sigma, True, 5, m, 1.0)
    est = log_z_q_based(
        mus.split(64), encode, sample_q, log_f, n_train, n_per_image=500, generator=torch.Generator().manual_seed(6)
    )
    # Truncated q: E[f/q | e_i] = ∫_{box_i} f = Z·P_{p_λ}(box_i), exactly computable.
    ndtr = torch.special.ndtr
    p_box = (ndtr(mus + 2 * sigma - m) - ndtr(mus - 2 * sigma - m)).prod(-1)  # (N,)
    expected = truth + math.log(n_train) + math.log(p_box.mean().item())
    assert abs(est.log_z - expected) < 4 * est.std_err
    assert est.log_z < truth - 10.0  # many nats BELOW log Z: an optimistic NLL would follow

    # Full-support narrow Normals: the mean is N·Z (above log Z), but the mass sits in tails q
    # never visits, so the realised estimate is far below log Z as well: not a bound either way.
    mus, encode, sample_q = _point_posteriors(n_train, sigma, False, 5, m, 1.0)
    est_normal = log_z_q_based(
        mus.split(64), encode, sample_q, log_f, n_train, n_per_image=500, generator=torch.Generator().manual_seed(6)
    )
    assert est_normal.log_z < truth - 10.0
    assert truth + math.log(n_train) - est_normal.log_z > 10.0


@pytest.mark.parametrize("transition", ["mala", "hmc"])
def test_ais_seeds_run_together_equal_each_seed_run_alone(transition):
    """All seeds share one batch of chains; each keeps its own random stream and step size, so a
    seed's log Z, acceptance and final step equal those of a run with that seed alone (float64
    log f: no rounding from the larger batch)."""
    _, log_f, _ = linear_critic()
    f64 = lambda z: log_f(z.double())  # noqa: E731
    kw = dict(n_chains=64, n_temps=30, transition=transition, dtype=torch.float64)
    together = log_z_ais(f64, ZDIM, seeds=(5, 6, 7), **kw).extra
    for i, seed in enumerate((5, 6, 7)):
        alone = log_z_ais(f64, ZDIM, seeds=(seed,), **kw).extra
        assert together["log_z_per_seed"][i] == pytest.approx(alone["log_z_per_seed"][0], abs=1e-12)
        assert together["acceptance_per_seed"][i] == pytest.approx(alone["acceptance_per_seed"][0], abs=1e-12)
        assert together["final_step_size_per_seed"][i] == pytest.approx(alone["final_step_size_per_seed"][0], rel=1e-12)
    assert len(set(together["log_z_per_seed"])) == 3  # the seeds are different runs
