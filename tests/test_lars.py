"""The `lars` prior (Bauer & Mnih 2019): p(z) = N(z; 0, I)·sigmoid(MLP(z))/Z, trained with LARS's
estimate of Z and sharing the certified prior's certificate, sampler and estimator.

Known-Z cases: a constant acceptance a ≡ sigmoid(b) (output weights 0, bias b) gives Z = sigmoid(b)
and p = N(0, I); an MLP whose first layer reads z₀ only gives a(z) = g(z₀), so Z = E[g(u)],
u ~ N(0, 1), and the tilted law of z₀ is φ(u)·g(u)/Z with the other coordinates N(0, 1): Z and
its moments by quadrature on a fine grid (float64). Monte-Carlo tolerances are 5 standard errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.factories import model_spec, tiny, train_params
from vaepp.distributed import ONE_PROCESS
from vaepp.model import VAEPP
from vaepp.posteriors import log_standard_normal
from vaepp.resampled import log_z_certificate

ZDIM = 3


def _model(seed: int = 0, **overrides) -> VAEPP:
    torch.manual_seed(seed)
    spec = model_spec((1, 6, 6), zdim=ZDIM, hidden=(8,), prior="lars", lars_mlp=(8, 8), **overrides)
    return VAEPP(spec).eval()


def _randomise_output(model: VAEPP, seed: int = 1) -> None:
    """Output layer away from its zero start, so a(z) varies with z."""
    g = torch.Generator().manual_seed(seed)
    out = model.prior.mlp[-1]
    with torch.no_grad():
        out.weight.copy_(2.0 * torch.randn(out.weight.shape, generator=g))
        out.bias.fill_(0.3)


def _one_coordinate(model: VAEPP) -> None:
    """a(z) = g(z₀): the first layer reads z₀ only; g tilts z₀ strongly (mean ≈ −0.82, var ≈ 0.50, Z ≈ 0.38)."""
    with torch.no_grad():
        first, out = model.prior.mlp[0], model.prior.mlp[-1]
        first.weight.zero_()
        first.weight[:, 0] = torch.linspace(-1.0, 1.0, first.out_features) + 0.5
        first.bias.zero_()
        out.weight.fill_(3.0)
        out.bias.fill_(-1.0)


def _tilted_z0(model: VAEPP) -> tuple[float, float, float]:
    """Z, E[z₀] and Var[z₀] under p, by the trapezoid rule on u ∈ [−12, 12] (float64)."""
    u = torch.linspace(-12.0, 12.0, 240_001, dtype=torch.float64)
    z = torch.zeros(len(u), ZDIM, dtype=torch.float64)
    z[:, 0] = u
    mlp = model.prior.mlp.double()
    with torch.no_grad():
        a = torch.sigmoid(mlp(z).squeeze(-1)).numpy()
    model.prior.mlp.float()
    un = u.numpy()
    phi = np.exp(-0.5 * un**2) / math.sqrt(2 * math.pi)
    big_z = np.trapezoid(phi * a, un)
    mean = np.trapezoid(un * phi * a, un) / big_z
    var = np.trapezoid((un - mean) ** 2 * phi * a, un) / big_z
    return float(big_z), float(mean), float(var)


def test_the_prior_is_registered_without_a_critic_and_with_a_certificate():
    model = _model()
    prior = model.prior
    assert prior.kind == "lars" and not prior.has_critic and prior.has_certificate and not prior.exact_log_z
    assert set(prior.algorithms) == {"naive", "vaepp"}
    assert [m.__class__.__name__ for m in prior.mlp] == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    assert [m.out_features for m in prior.mlp if isinstance(m, torch.nn.Linear)] == [8, 8, 1]
    assert float(prior.z_ema) == 0.5 and float(model.beta) == 0.0
    z = torch.randn(50, ZDIM)
    with torch.no_grad():
        assert torch.equal(prior.log_acceptance(z), torch.full((50,), math.log(0.5)))  # a ≡ ½ at the start


def test_a_resampled_prior_without_its_acceptance_cannot_be_built():
    from vaepp.priors.certified import ResampledPrior

    class NoAcceptance(ResampledPrior):
        kind = "none"

    with pytest.raises(TypeError, match="abstract"):
        NoAcceptance(model_spec(zdim=ZDIM))


def test_log_f_is_log_n_plus_logsigmoid_of_the_mlp():
    model = _model()
    _randomise_output(model)
    z = 2.0 * torch.randn(40, ZDIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        log_a = torch.nn.functional.logsigmoid(model.prior.mlp(z).squeeze(-1))
        expected = log_standard_normal(z) + log_a
        assert torch.equal(model.log_f(z), expected)
        assert torch.equal(model.log_f_from_raw(z, model.decode(z)), expected)  # no decoder pass is read
        assert torch.equal(model.prior.log_acceptance_of(model, z), log_a)
        assert bool((model.log_f(z) < log_standard_normal(z)).all())  # a < 1, so Z < 1


def test_certificate_covers_the_constant_acceptance_z():
    """a ≡ sigmoid(b): Z = sigmoid(b) exactly."""
    model = _model()
    with torch.no_grad():
        model.prior.mlp[-1].bias.fill_(-1.2)
    est = log_z_certificate(
        lambda z: model.prior.log_acceptance_of(model, z),
        ZDIM,
        delta=1e-3,
        target_half_width=0.05,
        pilot_samples=2000,
        generator=torch.Generator().manual_seed(4),
    )
    truth = 1.0 / (1.0 + math.exp(1.2))
    assert est.extra["z_lo"] <= truth <= est.extra["z_hi"]
    assert est.extra["z_hat"] == pytest.approx(truth, rel=1e-5)  # every a(ε) is the same number


def test_certificate_covers_the_quadrature_z_of_a_one_coordinate_acceptance():
    model = _model()
    _one_coordinate(model)
    truth, _, _ = _tilted_z0(model)
    assert 0.05 < truth < 0.95
    est = log_z_certificate(
        lambda z: model.prior.log_acceptance_of(model, z),
        ZDIM,
        delta=1e-3,
        target_half_width=0.05,
        pilot_samples=20_000,
        generator=torch.Generator().manual_seed(5),
    )
    assert est.extra["z_lo"] <= truth <= est.extra["z_hi"]
    assert est.log_z == pytest.approx(math.log(est.extra["z_hi"]))


def test_exact_samples_match_the_quadrature_moments():
    model = _model()
    _one_coordinate(model)
    truth, mean, var = _tilted_z0(model)
    n = 20_000
    mala = tiny().mala.model_copy(update={"n_samples": n, "n_steps": 0})
    z, info = model.prior.sample(
        model, torch.zeros(n, ZDIM), ONE_PROCESS, mala, generator=torch.Generator().manual_seed(6), device="cpu"
    )
    assert z.shape == (n, ZDIM) and info["sampler"] == "exact (rejection)" and info["mala_acceptance"] is None
    se = math.sqrt(var / n)
    assert float(z[:, 0].mean()) == pytest.approx(mean, abs=5 * se)
    assert float(z[:, 0].var()) == pytest.approx(var, abs=5 * var * math.sqrt(2.0 / n) * 1.5)  # kurtosis slack
    assert float(z[:, 1:].mean(0).abs().max()) < 5 / math.sqrt(n)
    assert float((z[:, 1:].var(0) - 1.0).abs().max()) < 5 * math.sqrt(2.0 / n)
    # 1/Z proposals per sample on average: n/proposals estimates Z
    assert info["rejection_acceptance"] == pytest.approx(truth, abs=5 * math.sqrt(truth * (1 - truth) * truth / n))


def test_the_log_z_protocol_certifies_and_brackets_with_both_ais():
    from vaepp.log_z_protocol import log_z_protocol

    model = _model()
    _one_coordinate(model)
    truth, _, _ = _tilted_z0(model)
    train = ((torch.rand(32, 1, 6, 6, generator=torch.Generator().manual_seed(7)) > 0.5) * 255).to(torch.uint8)
    estimates, headline = log_z_protocol(model, ONE_PROCESS, train, tiny().nll, device="cpu")
    assert headline == "certificate"
    assert {"certificate", "reverse_ais", "ais", "prior_is"} <= set(estimates)
    cert = estimates["certificate"]["extra"]
    assert cert["z_lo"] <= truth <= cert["z_hi"]
    for name in ("ais", "reverse_ais", "prior_is"):  # small runs: within a generous 0.1 nats of log Z
        assert estimates[name]["log_z"] == pytest.approx(math.log(truth), abs=0.1), name


def _images(n=32, seed=5):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, 1, 6, 6, generator=g) > 0.6).float() * 255).to(torch.uint8)


def _one_step(seed: int = 2, algorithm: str = "vaepp"):
    from vaepp.train import make_optimizers, train_step

    model = _model(seed).train()
    params = train_params(batch_size=16, n_prior_samples=16, lr=1e-2, epochs=1, seed=seed, algorithm=algorithm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = make_optimizers(model, params)
    torch.manual_seed(11)
    metrics = train_step(model, opts, _images(16).float() / 255, params, n_train=32)
    return model, before, metrics


def test_one_step_is_finite_moves_the_mlp_and_encoder_and_is_reproducible():
    model, before, m = _one_step()
    after = model.state_dict()
    assert all(math.isfinite(v) for v in m.values())
    assert "penalty" not in m and "critic_recon" not in m
    assert 0.0 < m["z_ema"] <= 1.0 and m["z_ema"] == pytest.approx(float(model.prior.z_ema))
    assert float(model.prior.z_ema) != 0.5
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert {"prior.mlp.4.weight", "prior.mlp.4.bias"} <= moved  # the output layer (the hidden ones from step 2)
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("decoder.") for k in moved)
    assert not any(k.startswith("critic.") for k in moved)  # no critic in the prior
    again, _, m2 = _one_step()
    assert m2 == m
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.items())


def test_algorithm_1_is_accepted_and_is_the_same_step():
    """No critic, so Algorithm 1 (whose only difference is the critic's own step) and Algorithm 2 are
    one step: `algorithms` accepts both, as for N(0, I), and they agree bitwise."""
    from vaepp.config import ParamsError, resolve_run
    from vaepp.train import train

    naive, _, m_naive = _one_step(algorithm="naive")
    joint, _, m_joint = _one_step(algorithm="vaepp")
    assert m_naive == m_joint
    assert all(torch.equal(v, joint.state_dict()[k]) for k, v in naive.state_dict().items())
    train(_model().train(), _images(), train_params(algorithm="naive", epochs=1, batch_size=16, n_prior_samples=16))

    base = tiny().model_dump()
    base["runs"] = {"lars": {"prior": "lars", "train": {"algorithm": "naive"}}}
    from vaepp.config import Params

    assert resolve_run(Params(**base), "lars").train.algorithm == "naive"
    base["runs"] = {"lars": {"prior": "lars", "model": {"truncation": 5}}}
    with pytest.raises(ParamsError, match=r"runs.lars.model.truncation = 5: a lars prior"):
        Params(**base)


def test_an_older_model_file_without_lars_mlp_loads():
    from vaepp.spec import ModelSpec

    spec = _model().spec.to_dict()
    del spec["lars_mlp"]
    assert ModelSpec.from_dict(spec).lars_mlp == (100, 100)


def test_the_training_gradient_of_z_through_elbo_terms_is_unbiased():
    """Through `elbo_terms`, Ẑ_smooth·∇log Ẑ for one image averages to the quadrature ∇Z of the MLP's parameters."""
    from vaepp.priors.standard import PosteriorDraw

    k, reps = 8, 4000
    model = _model()
    _one_coordinate(model)
    prior = model.prior.double()
    prior.z_ema.fill_(0.8)  # far from Z ≈ 0.38, so the smoothed Ẑ is far from the current one
    params = train_params(n_prior_samples=k, lars_decay=0.99)
    chosen = (prior.mlp[-1].bias, prior.mlp[-1].weight, prior.mlp[0].weight)

    def pick(grads):  # the output bias, one output weight, the first layer's weight on z₀ of one unit
        return torch.stack([grads[0][0], grads[1][0, 0], grads[2][0, 0]])

    u = torch.linspace(-12.0, 12.0, 240_001, dtype=torch.float64)
    grid = torch.zeros(len(u), ZDIM, dtype=torch.float64)
    grid[:, 0] = u
    phi = torch.exp(-0.5 * u**2) / math.sqrt(2 * math.pi)
    exact = pick(torch.autograd.grad(torch.trapezoid(phi * torch.sigmoid(prior.mlp(grid).squeeze(-1)), u), chosen))

    torch.manual_seed(12)  # the K proposals come from the global generator, as in training
    gen = torch.Generator().manual_seed(13)
    q_mean, q_sd = torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64), 1.1  # a fixed "posterior" N(m, σ²I)
    e = torch.zeros(1, 1, 6, 6, dtype=torch.float64)  # read for its dtype and device only
    nothing = torch.zeros((), dtype=torch.float64)
    grads = []
    for _ in range(reps):
        noise = torch.randn(1, ZDIM, generator=gen, dtype=torch.float64)
        z = q_mean + q_sd * noise
        log_q = log_standard_normal(noise) - ZDIM * math.log(q_sd)
        draw = PosteriorDraw(z_all=z, log_q_all=log_q, z=z, log_q=log_q, raw=nothing, recon=nothing)
        t = prior.elbo_terms(model, draw, e, 1, params, 1, ONE_PROCESS)
        # one image: kl = log q(z) − log N(z) − log a(z) + log Ẑ, so log Ẑ is what remains
        log_z = t["kl"] - (log_q - log_standard_normal(z) - prior.log_acceptance(z)).sum()
        # ∇log Ẑ·Ẑ_smooth = ∇Ẑ_cur: the current estimate's gradient, averaged.
        grads.append(pick(torch.autograd.grad(t["z_smooth"] * log_z, chosen)))
    assert float(log_z.detach().exp()) == pytest.approx(float(t["z_smooth"]), rel=1e-12)  # the value is the smoothed Ẑ
    grads = torch.stack(grads)  # (reps, 3)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(reps)
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    assert (se < 0.05 * exact.abs()).all(), (se, exact)  # the test has power
