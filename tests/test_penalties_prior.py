"""Gradient penalties on critics with known gradients; the prior and its training log Z."""

import math

import pytest
import torch

from vaepp.penalties import critic_grad_norm, draw_alpha, gradient_penalty, penalty_sum
from vaepp.posteriors import log_standard_normal
from vaepp.priors.pullback import beta_from_xi, log_f, log_z_train


def quadratic_critic(x):
    """D(x) = ½‖x‖², ∇D = x, so ‖∇D(x)‖ = ‖x‖."""
    return 0.5 * x.flatten(1).square().sum(1)


def test_grad_norm_of_a_linear_critic_is_the_weight_norm():
    a = torch.randn(1, 2, 3)
    norms = critic_grad_norm(lambda x: (x * a).flatten(1).sum(1), torch.randn(4, 1, 2, 3))
    assert torch.allclose(norms, a.norm().expand(4))


@pytest.mark.parametrize("p", [3.0, 6.0])
@pytest.mark.parametrize("kind", ["wgan_gp", "wgan_gp_classic", "wgan_div_1"])
def test_interpolating_penalties_match_their_formulas(kind, p):
    # real = fake makes x̂ = real whatever α is, so the value is exact
    x = torch.randn(6, 1, 2, 2)
    norms = x.flatten(1).norm(dim=1)
    k = 3.0
    expected = {
        "wgan_gp": k * ((norms - 1) ** p).mean(),
        "wgan_gp_classic": k * ((norms - 1) ** 2).mean(),
        "wgan_div_1": k * (norms**p).mean(),
    }[kind]
    got = gradient_penalty(quadratic_critic, x, x.clone(), kind, k=k, p=p)
    assert torch.isclose(got, expected)


def test_the_authors_gp_on_binary_data_is_signed():
    """p = 3: a gradient norm of ½ gives k·(½ − 1)³ = −k/8 (the authors' Bernoulli form rewards
    norms below one); p = 6 gives +k/64; a non-integer p is refused for this signed power."""
    x = torch.full((4, 1), 0.5)  # ‖∇D(x)‖ = ‖x‖ = ½ for the quadratic critic
    assert torch.isclose(gradient_penalty(quadratic_critic, x, x.clone(), "wgan_gp", k=2.0, p=3.0), torch.tensor(-0.25))
    assert torch.isclose(
        gradient_penalty(quadratic_critic, x, x.clone(), "wgan_gp", k=2.0, p=6.0), torch.tensor(2 / 64)
    )
    with pytest.raises(ValueError, match="integer"):
        gradient_penalty(quadratic_critic, x, x.clone(), "wgan_gp", k=2.0, p=2.5)


def test_div2_penalty_formula():
    real, fake = torch.randn(5, 3, 1, 1), torch.randn(5, 3, 1, 1)
    k, p = 2.0, 6.0
    expected = 0.5 * k * ((real.flatten(1).norm(dim=1) ** p).mean() + (fake.flatten(1).norm(dim=1) ** p).mean())
    assert torch.isclose(gradient_penalty(quadratic_critic, real, fake, "wgan_div_2", k=k, p=p), expected)


def test_gp_penalty_on_interpolates_with_a_known_gradient():
    # along x̂ = ê + α(e − ê) with e = 2u, ê = 0 (u a unit vector): ‖∇D(x̂)‖ = 2α, α ~ U(0,1),
    # so E(‖∇D‖ − 1)² = E(2α − 1)² = 1/3.
    n = 200000
    u = torch.nn.functional.normalize(torch.randn(n, 4, dtype=torch.float64), dim=1)
    got = gradient_penalty(
        quadratic_critic,
        2 * u,
        torch.zeros_like(u),
        "wgan_gp_classic",
        k=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    se = math.sqrt(4 / 45 / n)  # Var (2α−1)² = E(2α−1)^4 − 1/9 = 1/5 − 1/9
    assert abs(float(got.detach()) - 1 / 3) < 4 * se
    # the authors' forms on the same line: E(2α − 1)³ = 0 and E(2α − 1)⁶ = 1/7
    for p, mean, var in ((3.0, 0.0, 1 / 7), (6.0, 1 / 7, 1 / 13 - 1 / 49)):
        got = gradient_penalty(
            quadratic_critic,
            2 * u,
            torch.zeros_like(u),
            "wgan_gp",
            k=1.0,
            p=p,
            generator=torch.Generator().manual_seed(0),
        )
        assert abs(float(got.detach()) - mean) < 4 * math.sqrt(var / n)


def test_penalty_is_differentiable_and_rejects_unknown_kind():
    lin = torch.nn.Linear(4, 1)
    critic = lambda x: lin(x.flatten(1)).squeeze(-1)  # noqa: E731
    r = gradient_penalty(critic, torch.randn(3, 4), torch.randn(3, 4), "wgan_gp", k=10.0)
    r.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown penalty"):
        gradient_penalty(critic, torch.randn(3, 4), torch.randn(3, 4), "wgan", k=1.0)


@pytest.mark.parametrize("kind", ["wgan_gp", "wgan_div_1", "wgan_div_2"])
def test_a_zero_weight_penalty_is_zero_without_a_critic_pass(kind):
    """k = 0 (the certified run's default: no penalty) gives 0 and builds no double-backward graph;
    any k > 0 on the same pairs evaluates the critic."""
    calls = []

    def critic(x):
        calls.append(len(x))
        return quadratic_critic(x)

    real, fake = torch.randn(5, 3), torch.randn(5, 3)
    alpha = draw_alpha(kind, 5, real)
    r = penalty_sum(critic, real, fake, alpha, kind, k=0.0, p=3.0)
    assert r.item() == 0.0 and calls == []
    assert penalty_sum(critic, real, fake, alpha, kind, k=1e-3, p=3.0).item() != 0.0 and calls


def test_beta_and_log_f():
    assert float(beta_from_xi(torch.tensor(0.0), 10.0)) == 5.0
    z = torch.randn(7, 3)
    assert torch.allclose(log_f(z, torch.zeros(7), torch.tensor(4.0)), log_standard_normal(z))


def test_training_log_z_terms_on_the_linear_critic():
    """D(G(z)) = a·z: p_λ = N(−βa, I) and log Z = β²‖a‖²/2 exactly."""
    torch.manual_seed(0)
    a = torch.tensor([0.3, -0.2, 0.4], dtype=torch.float64)
    beta = torch.tensor(1.5, dtype=torch.float64)
    log_z_true = float(beta**2 * a.square().sum() / 2)
    # Ẑ_N with many prior draws: unbiased for Z; delta-method error on the log
    k = 400000
    eps = torch.randn(k, 3, dtype=torch.float64)
    w = torch.exp(-beta * (eps @ a))
    se_log = float(w.std() / w.mean()) / math.sqrt(k)
    # Ẑ_q with the exact p_λ as the proposal of a single "posterior": f/q = Z for every draw,
    # so log Ẑ_q − log N equals log Z to rounding (the N·Z behaviour of the paper's term).
    z_q = -beta * a + torch.randn(64, 3, dtype=torch.float64)
    log_q = log_standard_normal(z_q + beta * a)
    log_f_q = log_standard_normal(z_q) - beta * (z_q @ a)
    n_train = 1000
    log_zt, log_zn, log_zq = log_z_train(beta, eps @ a, log_f_q, log_q, n_train)
    assert abs(float(log_zn) - log_z_true) < 4 * se_log
    assert abs(float(log_zq) - math.log(n_train) - log_z_true) < 1e-10
    expected = math.log(0.5 * (math.exp(float(log_zn)) + n_train * math.exp(log_z_true)))
    assert abs(float(log_zt) - expected) < 1e-10


@pytest.mark.parametrize("kind", ["wgan_gp", "wgan_gp_classic", "wgan_div_1", "wgan_div_2"])
def test_penalty_sums_over_shards_add_up_to_the_penalty(kind):
    """Σ R_i over rows 0..2 plus over rows 3..6 (with their α) is m·R of all 7 pairs."""
    lin = torch.nn.Linear(4, 1).double()
    critic = lambda x: torch.tanh(lin(x)).squeeze(-1)  # noqa: E731  (a non-constant gradient)
    real, fake = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    alpha = draw_alpha(kind, 7, real, torch.Generator().manual_seed(1))
    parts = [
        penalty_sum(critic, real[a:b], fake[a:b], None if alpha is None else alpha[a:b], kind, k=3.0, p=4.0)
        for a, b in ((0, 3), (3, 7))
    ]
    whole = gradient_penalty(critic, real, fake, kind, k=3.0, p=4.0, generator=torch.Generator().manual_seed(1))
    assert torch.isclose(sum(parts) / 7, whole, rtol=1e-12, atol=0.0)
    assert penalty_sum(critic, real[:0], fake[:0], None, kind, k=3.0, p=4.0) == 0.0  # a rank without pairs
