"""Likelihoods and posteriors against analytic answers."""

import math

import torch

from vaepp.likelihoods import bernoulli_log_prob, bits_per_dim, discretized_logistic_log_prob
from vaepp.posteriors import (
    TRUNCATED_MASS,
    PlanarFlows,
    log_normal,
    log_posterior,
    sample_standard,
)


def test_discretized_logistic_sums_to_one_over_256_values():
    g = torch.Generator().manual_seed(0)
    n_params = 50
    # random means in and beyond [−1, 1], log-scales from very sharp to very broad
    mean = torch.rand(n_params, generator=g, dtype=torch.float64) * 3 - 1.5
    log_scale = torch.rand(n_params, generator=g, dtype=torch.float64) * 9 - 7
    values = torch.arange(256, dtype=torch.float64) / 255.0  # every 8-bit value
    # shape (256, n_params, 1, 1, 1): one "image" of one pixel per (value, parameter) pair
    x = values.view(256, 1, 1, 1, 1).expand(256, n_params, 1, 1, 1)
    lp = discretized_logistic_log_prob(mean.view(1, -1, 1, 1, 1), log_scale.view(1, -1, 1, 1, 1), x)
    total = torch.logsumexp(lp, dim=0).exp()  # (n_params,)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-9)


def test_discretized_logistic_float32_sums_to_one():
    mean = torch.tensor([0.3, -0.999, 0.0])
    log_scale = torch.tensor([-7.0, -3.0, 1.0])
    x = (torch.arange(256.0) / 255.0).view(256, 1, 1, 1, 1).expand(256, 3, 1, 1, 1)
    lp = discretized_logistic_log_prob(mean.view(1, 3, 1, 1, 1), log_scale.view(1, 3, 1, 1, 1), x)
    assert torch.allclose(torch.logsumexp(lp, 0).exp(), torch.ones(3), atol=1e-4)


def test_soft_bernoulli_equals_average_over_binarisations():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    e = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)
    soft = bernoulli_log_prob(logits, e)
    # exact expectation over all binarisations of each pixel: the sum factorises per pixel,
    # so E_x Σ log p(x_ij) = Σ [e·log σ(l) + (1−e)·log(1−σ(l))] evaluated with hard targets
    hard1 = bernoulli_log_prob(logits, torch.ones_like(e))
    per_pixel_1 = torch.nn.functional.logsigmoid(logits)
    per_pixel_0 = torch.nn.functional.logsigmoid(-logits)
    exact = (e * per_pixel_1 + (1 - e) * per_pixel_0).flatten(1).sum(1)
    assert torch.allclose(soft, exact)
    assert torch.allclose(hard1, per_pixel_1.flatten(1).sum(1))
    # and Monte Carlo over binarisations agrees within its standard error
    n = 20000
    x = torch.bernoulli(e.expand(n, *e.shape), generator=g)
    mc = bernoulli_log_prob(logits, x)  # (n, 2)
    se = mc.std(0) / math.sqrt(n)
    assert ((mc.mean(0) - soft).abs() < 4 * se).all()


def test_bits_per_dim():
    assert math.isclose(bits_per_dim(784 * math.log(2.0), 784), 1.0)


def test_truncated_normal_integrates_to_one_and_stays_in_box():
    mu, log_sigma = torch.tensor([0.7]), torch.tensor([math.log(0.3)])
    # 1-d trapezoid integral of the density over a grid wider than the box
    z = torch.linspace(-1.0, 2.5, 200001, dtype=torch.float64).view(-1, 1)
    dens = log_posterior("truncated", z, mu.double(), log_sigma.double()).exp()
    integral = torch.trapezoid(dens, z.squeeze(-1))
    assert abs(float(integral) - 1.0) < 1e-4
    eps = sample_standard(
        "truncated", (100000, 3), device="cpu", dtype=torch.float32, generator=torch.Generator().manual_seed(0)
    )
    assert eps.abs().max() <= 2.0
    # the variance of N(0,1) truncated at ±2: 1 − 2·2·φ(2)/0.9545
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    var = 1.0 - 4.0 * phi2 / TRUNCATED_MASS
    se = math.sqrt(2.0 / eps.numel()) * var  # approx. std of a sample variance
    assert abs(float(eps.var()) - var) < 5 * se


def test_truncated_density_is_normal_over_mass_inside_and_zero_outside():
    mu, ls = torch.zeros(2), torch.zeros(2)
    z = torch.tensor([[0.5, -1.0], [2.5, 0.0]])
    lq = log_posterior("truncated", z, mu, ls)
    assert torch.isclose(lq[0], log_normal(z[0], mu, ls) - 2 * math.log(TRUNCATED_MASS))
    assert lq[1] == -math.inf


def test_planar_flow_log_det_matches_autograd_jacobian():
    torch.manual_seed(0)
    flows = PlanarFlows(3, 4).double()
    with torch.no_grad():
        for p in flows.parameters():
            p.normal_()
    z = torch.randn(5, 3, dtype=torch.float64)
    _, log_det = flows(z)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda v: flows(v)[0], z[i])
        assert torch.isclose(log_det[i], torch.linalg.slogdet(jac)[1], atol=1e-8)


def test_bernoulli_matches_cross_entropy_at_extreme_logits_and_broadcasts():
    # logits from −60 to 60 in float32: the dot-product form equals the elementwise stable
    # cross-entropy to float rounding, and a target shared by n samples broadcasts over them
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 3, 1, 4, 4, generator=g) * 20.0
    logits[0, 0, 0, 0, :] = torch.tensor([-60.0, -25.0, 25.0, 60.0])
    x = torch.bernoulli(torch.full((3, 1, 4, 4), 0.5), generator=g)
    got = bernoulli_log_prob(logits, x)  # (5, 3)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.double(), x.double().expand_as(logits), reduction="none"
    )
    want = -ce.flatten(-3).sum(-1)
    assert got.shape == (5, 3)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-4)
    assert torch.isfinite(got).all()
