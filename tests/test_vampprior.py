"""The VampPrior (Tomczak & Welling 2018): p(z) = (1/K)·Σ_k q(z | u_k) over learnable pseudo-inputs u_k,
checked against torch.distributions and a direct formula, its sampler against the mixture's moments
(tolerances of 5 standard errors), one training step, and its exact log Z."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from tests.factories import model_spec, tiny, train_params
from vaepp.config import ParamsError, parse_params
from vaepp.distributed import ONE_PROCESS
from vaepp.log_z_protocol import log_z_protocol
from vaepp.model import VAEPP
from vaepp.optim import NonFiniteLossError
from vaepp.posteriors import TRUNCATED_MASS
from vaepp.priors import PRIORS
from vaepp.priors.vampprior import VampPrior
from vaepp.spec import ModelSpec
from vaepp.train import make_optimizers, train_step

ZDIM, K = 3, 8


def _model(posterior: str = "normal", seed: int = 0, **overrides) -> VAEPP:
    """A 6×6 VampPrior model whose K components differ: PyTorch's init (not the zero heads, under which
    every posterior is N(0, I)) and pseudo-inputs spread over [0, 1]."""
    torch.manual_seed(seed)
    spec = model_spec(
        (1, 6, 6), zdim=ZDIM, hidden=(8,), prior="vampprior", posterior=posterior, init="torch", **overrides
    )
    model = VAEPP(spec).eval()
    with torch.no_grad():
        model.prior.pseudo_weight.uniform_(-0.2, 1.2, generator=torch.Generator().manual_seed(seed + 1))
        model.encoder.apply(lambda m: m.weight.mul_(3.0) if isinstance(m, torch.nn.Linear) else None)
    return model


def _components(model: VAEPP) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        mu, log_sigma = model.encode(model.prior.pseudo_inputs())
    return mu.double(), log_sigma.exp().double()


def test_it_is_registered_with_the_interface_and_k_from_the_spec():
    assert PRIORS["vampprior"] is VampPrior
    model = _model()
    assert model.prior.pseudo_inputs().shape == (K, 1, 6, 6) and model.spec.vampprior_components == K
    assert model.prior.exact_log_z and not model.prior.has_critic and float(model.beta) == 0.0
    u = model.prior.pseudo_inputs().detach()
    assert float(u.min()) >= 0.0 and float(u.max()) <= 1.0  # hardtanh on [0, 1]


def test_log_p_is_the_mixture_of_normal_posteriors():
    model = _model("normal")
    mu, sigma = _components(model)
    mixture = MixtureSameFamily(
        Categorical(logits=torch.zeros(K, dtype=torch.float64)), Independent(Normal(mu, sigma), 1)
    )
    z = 2.0 * torch.randn(4, 5, ZDIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model.log_f(z)
    assert got.shape == (4, 5)
    torch.testing.assert_close(got.double(), mixture.log_prob(z.double()), atol=1e-5, rtol=1e-5)


def test_log_p_is_the_mixture_of_truncated_posteriors():
    """Per component Σ_d [log N(z_d; μ_kd, σ_kd²) − log(Φ(2) − Φ(−2))] inside its ±2σ box, −∞ outside."""
    model = _model("truncated")
    mu, sigma = _components(model)
    g = torch.Generator().manual_seed(4)
    inside = mu[torch.arange(6) % K] + sigma[torch.arange(6) % K] * (3.8 * torch.rand(6, ZDIM, generator=g) - 1.9)
    far = mu.abs().max() + 3.0 * sigma.max() + 1.0
    z = torch.cat([inside, torch.full((1, ZDIM), float(far), dtype=torch.float64)])  # the last outside every box
    z = z.float().double()  # the points the model sees
    expected = []
    for zi in z:
        terms = []
        for k in range(K):
            if bool(((zi - mu[k]).abs() <= 2.0 * sigma[k]).all()):
                terms.append(sum(Normal(mu[k, d], sigma[k, d]).log_prob(zi[d]) for d in range(ZDIM)))
                terms[-1] = terms[-1] - ZDIM * math.log(TRUNCATED_MASS)
        expected.append(torch.logsumexp(torch.stack(terms), 0) - math.log(K) if terms else -math.inf)
    with torch.no_grad():
        got = model.log_f(z.float()).double()
    assert math.isinf(float(got[-1])) and float(got[-1]) < 0
    torch.testing.assert_close(got[:-1], torch.tensor(expected[:-1], dtype=torch.float64), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("posterior", ["normal", "truncated"])
def test_samples_have_the_mixtures_mean_and_covariance(posterior):
    """Mean (1/K)Σμ_k and covariance (1/K)Σ(c·diag σ_k² + μ_kμ_kᵀ) − m mᵀ, c = 1 for the Normal and
    1 − 4φ(2)/(Φ(2) − Φ(−2)) for the ±2σ truncation; each entry within 5 of its standard errors
    (the covariance's from the draws' own fourth moments)."""
    model, n = _model(posterior), 20_000
    mu, sigma = _components(model)
    c = 1.0 if posterior == "normal" else 1.0 - 4.0 * math.exp(-2.0) / math.sqrt(2.0 * math.pi) / TRUNCATED_MASS
    mean = mu.mean(0)
    cov = (c * torch.diag_embed(sigma.square()) + mu[:, :, None] * mu[:, None, :]).mean(0) - torch.outer(mean, mean)
    mala = tiny().mala.model_copy(update={"n_samples": n})

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return model.prior.sample(model, torch.zeros(n, ZDIM), ONE_PROCESS, mala, generator=gen, device="cpu")

    z, info = draw(0)
    assert z.shape == (n, ZDIM) and info == {"mala_acceptance": None, "sampler": "VampPrior mixture"}
    assert torch.equal(z, draw(0)[0])  # from the generator alone
    z = z.double()
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert bool(((z.mean(0) - mean).abs() < 5 * se_mean).all()), (z.mean(0), mean)
    d = z - z.mean(0)
    products = d[:, :, None] * d[:, None, :]  # (n, Z, Z)
    se_cov = (products.var(0) / n).sqrt()
    assert bool(((products.mean(0) - cov).abs() < 5 * se_cov).all()), (products.mean(0), cov)


def _train_setup(seed: int):
    torch.manual_seed(seed)
    spec = model_spec((1, 12, 12), hidden=(32, 32), prior="vampprior", posterior="normal", init="torch")
    model = VAEPP(spec)
    params = train_params(batch_size=16, n_prior_samples=16, lr=1e-3, seed=seed, algorithm="vaepp")
    g = torch.Generator().manual_seed(seed)
    e = (torch.rand(16, 1, 12, 12, generator=g) > 0.6).float() * 0.9 + 0.05
    return model, params, e


def test_one_training_step_is_finite_moves_the_pseudo_inputs_and_is_reproducible():
    runs = []
    for _ in range(2):
        model, params, e = _train_setup(5)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(11)
        metrics = train_step(model, make_optimizers(model, params), e, params, n_train=1000)
        assert all(math.isfinite(v) for v in metrics.values())
        assert metrics["log_z"] == 0.0 and metrics["loss"] == pytest.approx(metrics["recon"] + metrics["kl"])
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert "prior.pseudo_weight" in changed
        assert any(k.startswith("encoder") for k in changed) and any(k.startswith("decoder") for k in changed)
        assert not any(k.startswith("critic") for k in changed)
        runs.append((metrics, after))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_components_are_encoded_once_under_inference_mode_until_a_weight_changes():
    """Under inference mode log f reuses the pseudo-inputs' encoding, with the values a fresh
    encoding gives; a training step (fused Adam, in place) or a loaded state makes it encode
    again, and with gradients it encodes at every call."""
    model, params, e = _train_setup(3)
    calls = []
    model.encoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    z = torch.randn(7, model.zdim)
    with torch.inference_mode():
        first = model.prior.log_f(model, z)
        again = model.prior.log_f(model, z)
    assert calls == [model.prior.n_components] and torch.equal(first, again)
    with torch.no_grad():
        assert torch.equal(model.prior.log_f(model, z), first)  # encoded afresh, the same values
    assert len(calls) == 2
    train_step(model, make_optimizers(model, params), e, params, n_train=1000)
    calls.clear()
    with torch.inference_mode():
        moved = model.prior.log_f(model, z)
    with torch.no_grad():
        assert torch.equal(model.prior.log_f(model, z), moved)
    assert calls == [model.prior.n_components] * 2 and not torch.equal(moved, first)
    other, _, _ = _train_setup(4)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        loaded = model.prior.log_f(model, z)
    with torch.no_grad():
        assert torch.equal(loaded, other.prior.log_f(other, z))
    model.double()  # the same values in another dtype: encoded again, in float64
    calls.clear()
    with torch.inference_mode():
        mu, _ = model.prior.components(model)
    assert calls == [model.prior.n_components] and mu.dtype == torch.float64


def test_a_draw_outside_every_truncated_component_stops_with_a_clear_error():
    model = _model("truncated")
    t = {"recon": torch.tensor(1.0), "kl": torch.tensor(math.inf)}
    with pytest.raises(NonFiniteLossError, match="outside every component"):
        model.prior.loss(model, torch.zeros(1, 1, 6, 6), t, 1, train_params(), ONE_PROCESS)


def test_log_z_is_exact_in_the_nll_protocol():
    model = _model()
    train = torch.zeros(4, 1, 6, 6, dtype=torch.uint8)
    assert log_z_protocol(model, ONE_PROCESS, train, tiny().nll, device="cpu") == ({}, "exact")


def test_planar_flows_are_refused():
    with pytest.raises(ValueError, match="n_flows = 2: a VampPrior"):
        _model(n_flows=2)
    raw = tiny().model_dump()
    raw["runs"] = {"vamp": {"prior": "vampprior", "model": {"n_flows": 2}}}
    with pytest.raises(ParamsError, match=r"runs.vamp.model.n_flows = 2: a VampPrior"):
        parse_params(raw)


def test_model_files_from_before_the_field_still_load():
    spec = _model().spec.to_dict()
    del spec["vampprior_components"]
    assert ModelSpec.from_dict(spec).vampprior_components == 500


def test_the_components_density_by_matrix_products_equals_the_point_by_point_one():
    """log_normal_components (two float64 matrix products) against Σ_d log N(z_d; μ_kd, σ_kd²)
    point by point, for values, far points and small σ, and for the gradients in z, μ and log σ."""
    from vaepp.posteriors import log_normal, log_normal_components

    gen = torch.Generator().manual_seed(7)
    mu = torch.randn(9, ZDIM, generator=gen, dtype=torch.float64).requires_grad_(True)
    log_sigma = (torch.rand(9, ZDIM, generator=gen, dtype=torch.float64) * 4.0 - 5.0).requires_grad_(True)
    z = (6.0 * torch.randn(3, 7, ZDIM, generator=gen, dtype=torch.float64)).requires_grad_(True)
    got = log_normal_components(z, mu, log_sigma)
    want = log_normal(z.unsqueeze(-2), mu, log_sigma)
    assert got.shape == (3, 7, 9) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    weights = torch.randn(3, 7, 9, generator=gen, dtype=torch.float64)
    g_got = torch.autograd.grad((weights * got).sum(), (z, mu, log_sigma))
    g_want = torch.autograd.grad((weights * want).sum(), (z, mu, log_sigma))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-8)
    # float32 inputs: the result is float64 and agrees with the float64 point-by-point density
    got32 = log_normal_components(z.detach().float(), mu.detach().float(), log_sigma.detach().float())
    want32 = log_normal(
        z.detach().float().double().unsqueeze(-2), mu.detach().float().double(), log_sigma.detach().float().double()
    )
    torch.testing.assert_close(got32, want32, rtol=1e-12, atol=1e-9)


def test_with_a_logistic_likelihood_it_starts_grey_and_trains():
    """On grey-level or colour data (the discretised logistic likelihood) the pseudo-inputs start at
    the authors' N(0.4, 0.05²), log p(z) is still the mixture, and a training step is finite and
    moves them."""
    torch.manual_seed(3)
    spec = model_spec((3, 8, 8), binary=False, hidden=(16,), prior="vampprior", posterior="normal", init="torch")
    assert spec.likelihood == "logistic"
    model = VAEPP(spec)
    w = model.prior.pseudo_weight.detach()
    n = w.numel()  # K·3·8·8 entries: their mean and sd within 5 standard errors of 0.4 and 0.05
    assert abs(float(w.mean()) - 0.4) < 5 * 0.05 / math.sqrt(n)
    assert abs(float(w.std()) - 0.05) < 5 * 0.05 / math.sqrt(2 * n)
    with torch.no_grad():
        mu, log_sigma = model.encode(model.prior.pseudo_inputs())
        mixture = MixtureSameFamily(
            Categorical(logits=torch.zeros(spec.vampprior_components, dtype=torch.float64)),
            Independent(Normal(mu.double(), log_sigma.exp().double()), 1),
        )
        z = torch.randn(6, spec.zdim, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(model.log_f(z).double(), mixture.log_prob(z.double()), atol=1e-5, rtol=1e-5)
    params = train_params(batch_size=8, n_prior_samples=8, lr=1e-3, seed=0, algorithm="vaepp")
    e = torch.randint(0, 256, (8, 3, 8, 8), generator=torch.Generator().manual_seed(5)).float() / 255
    before = model.prior.pseudo_weight.detach().clone()
    metrics = train_step(model, make_optimizers(model, params), e, params, n_train=1000)
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["log_z"] == 0.0
    assert not torch.equal(before, model.prior.pseudo_weight.detach())
