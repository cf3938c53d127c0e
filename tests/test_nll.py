"""The importance-sampled NLL on a linear-Gaussian VAE, whose log p(x) is exact.

Model: p(z) ∝ f(z) = N(z; 0, I)·exp(−β a·z) (the linear critic, p_λ = N(−βa, I), log Z = β²‖a‖²/2),
p(x|z) = N(x; Wz + b, σ²I), so p(x) = N(x; b − βWa, WWᵀ + σ²I); under the plain prior N(0, I),
p(x) = N(x; b, WWᵀ + σ²I). The encoder is a deliberately imperfect diagonal Normal (shifted mean,
inflated spread) so the importance weights vary and the test exercises the estimator, not a
zero-variance special case. Tolerances: 4 Monte-Carlo standard errors as the estimator states them.
"""

import math

import pytest
import torch

from factories import model_spec
from vaepp.importance import defensive_proposal
from vaepp.model import VAEPP
from vaepp.nll import estimate_nll
from vaepp.posteriors import LOG_2PI, log_normal, log_posterior, log_standard_normal, sample_standard

ZDIM, SHAPE = 3, (1, 2, 3)  # 6 "pixels"
XDIM = math.prod(SHAPE)


class LinearGaussianVAE:
    """Satisfies vaepp.nll.LatentModel with a Gaussian likelihood; float64 throughout."""

    def __init__(self, beta: float, seed: int = 0, sigma_x: float = 0.5):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(XDIM, ZDIM, generator=g, dtype=torch.float64)
        self.b = 0.3 * torch.randn(XDIM, generator=g, dtype=torch.float64)
        self.a = torch.randn(ZDIM, generator=g, dtype=torch.float64)
        self.a /= self.a.norm()  # ‖a‖ = 1: log Z = β²/2
        self.beta, self.sigma_x = beta, sigma_x
        self.log_z = beta**2 * self.a.square().sum().item() / 2.0
        self.decoder_calls: list[int] = []

    def prior_mean(self) -> torch.Tensor:
        return -self.beta * self.a

    def exact_log_px(self, x: torch.Tensor, pullback: bool = True) -> torch.Tensor:
        mean = self.b + (self.W @ self.prior_mean() if pullback else 0.0)
        cov = self.W @ self.W.T + self.sigma_x**2 * torch.eye(XDIM, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
        return dist.log_prob(x.flatten(1))

    def encode(self, e):
        """Exact posterior under p_λ: Σ = (I + WᵀW/σ²)⁻¹, μ = Σ(Wᵀ(x − b)/σ² + m0); returned
        with its mean shifted by 0.2·√diag Σ and its sd inflated by 1.3 (a realistic q)."""
        x = e.flatten(1).double()
        prec = torch.eye(ZDIM, dtype=torch.float64) + self.W.T @ self.W / self.sigma_x**2
        cov = torch.linalg.inv(prec)
        mu = ((x - self.b) @ self.W / self.sigma_x**2 + self.prior_mean()) @ cov  # (B, Z)
        sd = cov.diagonal().sqrt()
        return mu + 0.2 * sd, torch.log(1.3 * sd).expand_as(mu)

    def sample_q(self, mu, log_sigma, n, generator=None):
        eps = torch.randn((n, *mu.shape), generator=generator, dtype=mu.dtype)
        z = mu + log_sigma.exp() * eps
        return z, log_normal(z, mu, log_sigma)

    def log_px_and_log_f(self, x, z):
        self.decoder_calls.append(z.shape[0] * z.shape[1])
        mean = z @ self.W.T + self.b  # (n, B, X)
        resid = (x.flatten(1).double() - mean) / self.sigma_x
        log_px = (-0.5 * resid.square() - math.log(self.sigma_x) - 0.5 * LOG_2PI).sum(-1)
        log_f = log_standard_normal(z) - self.beta * (z @ self.a)
        return log_px, log_f


def _images(model, n, seed):
    """x ~ p(x) of the model, shaped as images (n, 1, 2, 3)."""
    g = torch.Generator().manual_seed(seed)
    z = model.prior_mean() + torch.randn(n, ZDIM, generator=g, dtype=torch.float64)
    x = z @ model.W.T + model.b + model.sigma_x * torch.randn(n, XDIM, generator=g, dtype=torch.float64)
    return x.view(n, *SHAPE)


def _run(model, x, S, *, seed=0, chunk=4096, batch=16, **kw):
    return estimate_nll(
        model,
        x.split(batch),
        n_importance=S,
        log_z={"exact": model.log_z},
        binarize=False,
        chunk=chunk,
        generator=torch.Generator().manual_seed(seed),
        return_per_image=True,
        **kw,
    )


@pytest.mark.parametrize("S", [10, 100, 1000])
def test_nll_matches_exact_log_px_of_linear_gaussian_vae(S):
    model = LinearGaussianVAE(beta=1.5)
    x = _images(model, 40, seed=1)
    out = _run(model, x, S)
    exact = -model.exact_log_px(x).mean().item()
    exact_plain = -model.exact_log_px(x, pullback=False).mean().item()
    assert out["n_images"] == 40 and out["n_importance_total"] == 40 * S
    # The Monte-Carlo error is small enough that a lost constant (log Z ≈ 1–3 nats here, or a
    # ½·log 2π per dimension) could not hide inside the tolerance.
    assert 0.0 < out["nll_mc_stderr"] < 0.1
    assert abs(out["nll_nats"] - exact) < 4 * out["nll_mc_stderr"]
    assert model.log_z > 0.5
    # The plain-VAE NLL of the same samples is the exact NLL under the N(0, I) prior.
    assert abs(out["nll_nats_plain_vae"] - exact_plain) < 4 * out["nll_mc_stderr_plain_vae"]
    # bits/dim are nats / (elements · ln 2); the test-set error is the sd over images / √n.
    assert out["nll_bpd"] == pytest.approx(out["nll_nats"] / (XDIM * math.log(2.0)))
    per_image = out["log_px_nats"][0]
    assert out["nll_stderr"] == pytest.approx((-per_image).std().item() / math.sqrt(40), rel=1e-9)


def test_stated_monte_carlo_error_is_calibrated():
    """The spread of the estimate over independent seeds matches nll_mc_stderr (S = 20)."""
    model = LinearGaussianVAE(beta=1.0, seed=2)
    x = _images(model, 10, seed=3)
    runs = [_run(model, x, 20, seed=s) for s in range(40)]
    values = torch.tensor([r["nll_nats"] for r in runs], dtype=torch.float64)
    stated = torch.tensor([r["nll_mc_stderr"] for r in runs]).mean().item()
    # sd of 40 draws is within ±35% of the truth with probability > 0.99.
    assert 0.6 * stated < values.std().item() < 1.5 * stated


def test_result_does_not_depend_on_chunk_size():
    model = LinearGaussianVAE(beta=1.0)
    x = _images(model, 37, seed=4)  # batches of 16, 16, 5
    results = []
    for chunk in (1, 50, 16 * 13, 4096, 10**6):
        model.decoder_calls.clear()
        results.append(_run(model, x, 301, seed=9, chunk=chunk, rng_rows=64))
        # Every decoder call holds whole draws of n_draw = 64 // B samples and at most `chunk`
        # rows unless one draw alone is larger.
        assert max(model.decoder_calls) <= max(chunk, 64)
    for r in results[1:]:
        for key in ("nll_nats", "nll_mc_stderr", "nll_stderr", "nll_nats_plain_vae", "ess_mean"):
            assert r[key] == pytest.approx(results[0][key], rel=1e-12, abs=1e-12)
        assert torch.allclose(r["log_px_nats"], results[0]["log_px_nats"], rtol=0, atol=1e-10)


def test_passes_average_and_seed_determinism():
    model = LinearGaussianVAE(beta=0.5)
    x = _images(model, 8, seed=5)
    two = _run(model, x, 50, seed=1, n_passes=3)
    assert two["log_px_nats"].shape == (3, 8) and two["n_importance_total"] == 3 * 8 * 50
    # Passes without binarisation are independent repeats: the MC error shrinks by √P.
    one = _run(model, x, 50, seed=1)
    assert two["nll_mc_stderr"] == pytest.approx(one["nll_mc_stderr"] / math.sqrt(3), rel=0.3)
    assert _run(model, x, 50, seed=1)["nll_nats"] == one["nll_nats"]


def test_several_log_z_estimates_are_labelled():
    model = LinearGaussianVAE(beta=1.0)
    x = _images(model, 4, seed=6)
    out = estimate_nll(
        model,
        [x],
        n_importance=20,
        binarize=False,
        headline="ais",
        log_z={"paper_q": -3.0, "ais": 0.7},
        generator=torch.Generator().manual_seed(0),
    )
    assert out["headline_log_z"] == "ais"
    assert out["nll_nats_by_log_z"]["paper_q"] == pytest.approx(out["nll_nats"] - 3.7)
    with pytest.raises(ValueError, match="headline"):
        estimate_nll(model, [x], n_importance=5, binarize=False, log_z={"a": 0.0, "b": 1.0})


def _tiny_vaepp(beta_max, prior="pullback"):
    torch.manual_seed(0)
    spec = model_spec((1, 6, 6), zdim=4, hidden=(32, 32), beta_max=beta_max, prior=prior)
    return VAEPP(spec).eval()


def test_vaepp_with_beta_zero_equals_plain_vae():
    e = torch.rand(12, 1, 6, 6, generator=torch.Generator().manual_seed(0))

    def nll(model):
        return estimate_nll(
            model, e.split(5), n_importance=64, chunk=100, log_z=0.0, generator=torch.Generator().manual_seed(3)
        )

    zero = nll(_tiny_vaepp(beta_max=0.0))  # β = 0·sigmoid(ξ) = 0: p_λ = N(0, I), Z = 1
    # Equal up to float32 rounding of log f (the plain-VAE term is recomputed in float64).
    assert zero["nll_nats"] == pytest.approx(zero["nll_nats_plain_vae"], rel=1e-6)
    plain_model = _tiny_vaepp(beta_max=0.0, prior="standard")
    pullback_state = _tiny_vaepp(beta_max=0.0).state_dict()
    shared = {k: v for k, v in pullback_state.items() if not k.startswith("prior.")}
    assert set(pullback_state) - set(shared) == {"prior.xi"}  # N(0, I) has no ξ; every network is shared
    plain_model.load_state_dict(shared)
    assert nll(plain_model)["nll_nats"] == pytest.approx(zero["nll_nats"], rel=1e-6)
    # With β > 0 the pull-back term changes the weights (so the equality above is not vacuous).
    assert abs(nll(_tiny_vaepp(beta_max=10.0))["nll_nats"] - zero["nll_nats"]) > 1e-3


def test_vaepp_model_is_chunk_independent_in_float32():
    model = _tiny_vaepp(beta_max=10.0)
    e = torch.rand(20, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    out = [
        estimate_nll(
            model, e.split(8), n_importance=100, chunk=c, log_z=0.25, generator=torch.Generator().manual_seed(5)
        )
        for c in (8, 333, 10**5)
    ]
    for r in out[1:]:
        assert r["nll_nats"] == pytest.approx(out[0]["nll_nats"], rel=1e-6)
        assert r["nll_nats_plain_vae"] == pytest.approx(out[0]["nll_nats_plain_vae"], rel=1e-6)


def test_bad_arguments_fail_clearly():
    model = LinearGaussianVAE(beta=0.0)
    with pytest.raises(ValueError, match="n_importance"):
        estimate_nll(model, [torch.zeros(1, *SHAPE)], n_importance=0)
    with pytest.raises(ValueError, match="no batches"):
        estimate_nll(model, [], n_importance=3, binarize=False)


class BoxedPosteriorVAE(LinearGaussianVAE):
    """A linear-Gaussian VAE whose true posterior is diagonal (W has orthogonal columns), encoded
    by q = its exact mean with the sd shrunk by `shrink`, truncated at ±2σ_q (the paper's q).

    The box μ ± 2σ_q holds a share Π_d erf(2/(shrink·√2)) of the true posterior's mass: 0.6827 per
    dimension at shrink 2, so with 3 dimensions 68% of the mass lies outside it. The paper's
    estimator E_q[p(x, z)/q(z)] = ∫_box p(x, z) dz = p(x)·mass, whatever S; a full-support proposal
    keeps E[p̂(x)] = p(x)."""

    def __init__(self, shrink: float, seed: int = 0):
        super().__init__(beta=1.0, seed=seed)
        q, _ = torch.linalg.qr(self.W)  # orthonormal columns, then distinct scales
        self.W = q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
        self.shrink = shrink
        self.box_mass = math.erf(2.0 / (shrink * math.sqrt(2.0))) ** ZDIM

    def encode(self, e):
        x = e.flatten(1).double()
        var = 1.0 / (1.0 + self.W.square().sum(0) / self.sigma_x**2)  # (Z,): WᵀW is diagonal
        mu = ((x - self.b) @ self.W / self.sigma_x**2 + self.prior_mean()) * var
        return mu, torch.log(var.sqrt() / self.shrink).expand_as(mu)

    def sample_q(self, mu, log_sigma, n, generator=None):
        eps = sample_standard("truncated", (n, *mu.shape), device=mu.device, dtype=mu.dtype, generator=generator)
        z = mu + log_sigma.exp() * eps
        return z, log_posterior("truncated", z, mu, log_sigma)


def test_full_support_proposal_is_unbiased_where_the_truncated_posterior_loses_known_mass():
    model = BoxedPosteriorVAE(shrink=2.0)
    x = _images(model, 8, seed=11)
    exact = model.exact_log_px(x)  # (8,)
    assert model.box_mass < 0.35  # over 65% of the posterior's mass lies outside q's box
    S, seeds = 200, 30
    ratios, paper = [], []
    for seed in range(seeds):
        out = _run(model, x, S, seed=seed, proposal=defensive_proposal)
        ratios.append(torch.exp(out["log_px_nats"][0] - exact))  # p̂(x)/p(x), (8,)
        paper.append(_run(model, x, S, seed=seed)["log_px_nats"][0] - exact)
    ratios = torch.stack(ratios)  # (seeds, 8): E = 1 for an unbiased p̂
    mean, se = ratios.mean().item(), ratios.std().item() / math.sqrt(ratios.numel())
    assert se < 0.01 and abs(mean - 1.0) < 4 * se
    # The log-scale estimate sits within its stated MC error of the exact value too.
    log_mean = torch.log(ratios).mean().item()
    assert abs(log_mean) < 4 * torch.log(ratios).std().item() / math.sqrt(ratios.numel()) + 0.01
    # The paper's proposal misses the mass outside the box: E[p̂(x)/p(x)] = the box's mass.
    paper = torch.stack(paper).exp()
    se_paper = paper.std().item() / math.sqrt(paper.numel())
    assert abs(paper.mean().item() - model.box_mass) < 4 * se_paper
    assert model.box_mass + 40 * se_paper < 1.0  # the bias is far outside the noise


def test_sub_sample_read_out_is_the_estimate_of_the_first_samples():
    model = LinearGaussianVAE(beta=1.0)
    x = _images(model, 6, seed=12)
    full = _run(model, x, 300, seed=4, proposal=defensive_proposal, n_importance_sub=30)
    first = _run(model, x, 30, seed=4, proposal=defensive_proposal, rng_rows=6 * 30)
    assert full["n_importance_sub"] == 30
    same_draws = _run(model, x, 300, seed=4, proposal=defensive_proposal, n_importance_sub=30, rng_rows=6 * 30)
    # With one draw per 30 samples, the first 30 samples are exactly what an S = 30 run draws.
    assert torch.allclose(same_draws["log_px_nats_sub"], first["log_px_nats"], atol=1e-12)
    assert same_draws["nll_nats_sub"] == pytest.approx(first["nll_nats"], abs=1e-10)
    assert full["ess"].shape == (1, 6) and (full["ess"] <= 300).all() and (full["ess"] >= 1).all()
    assert full["ess_min"] <= full["ess_median"] <= 300


def test_defensive_proposal_density_matches_the_mixture_and_its_moments():
    g = torch.Generator().manual_seed(0)
    mu, log_sigma = torch.tensor([[0.5, -1.0]], dtype=torch.float64), torch.tensor([[0.0, -0.7]], dtype=torch.float64)
    z, log_r = defensive_proposal(mu, log_sigma, 200_000, weight=0.3, width=3.0, generator=g)
    sigma = log_sigma.exp()
    narrow = torch.distributions.Normal(mu, sigma)
    wide = torch.distributions.Normal(mu, 3.0 * sigma)
    expected = torch.logaddexp(math.log(0.7) + narrow.log_prob(z).sum(-1), math.log(0.3) + wide.log_prob(z).sum(-1))
    assert torch.allclose(log_r, expected, atol=1e-10)
    # Var = (0.7 + 0.3·9)·σ² per dimension; the sample variance's relative sd is about √(2·κ/n).
    var = ((0.7 + 0.3 * 9.0) * sigma.square())[0]
    assert torch.allclose(z[:, 0].var(0), var, rtol=0.03)
    assert torch.allclose(z[:, 0].mean(0), mu[0], atol=4 * (var / 200_000).sqrt().max().item())
