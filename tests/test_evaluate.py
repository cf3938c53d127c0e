"""The evaluation protocol of the estimate-nll stage, on the linear-Gaussian VAE whose log p(x) and
log Z are exact (see tests/test_nll.py): every log-Z estimate, the choice of the headline one,
and the NLL under each, without DVC."""

import math
from types import SimpleNamespace

import pytest
import torch

from test_nll import SHAPE, ZDIM, LinearGaussianVAE
from vaepp.config import LogZParams, NLLParams, ProposalParams
from vaepp.distributed import DistContext
from vaepp.log_z_monitor import log_z_monitor
from vaepp.log_z_protocol import headline_log_z_stderr
from vaepp.nll_protocol import nll_protocol
from vaepp.posteriors import log_standard_normal
from vaepp.priors import PRIORS


def fake_prior(kind: str, truncation: int | None = None) -> SimpleNamespace:
    """What the protocols read from a model's prior (`vaepp.priors`), with the flags of the real
    prior `kind`."""
    real = PRIORS[kind]
    return SimpleNamespace(
        kind=kind, exact_log_z=real.exact_log_z, has_certificate=real.has_certificate, truncation=truncation
    )


class PullbackLinearVAE(LinearGaussianVAE):
    """The linear-Gaussian VAE with the attributes the protocol reads from a trained model; with
    prior "standard" its β is 0 (p = N(0, I))."""

    def __init__(self, beta: float, prior: str = "pullback"):
        super().__init__(beta=beta if prior != "standard" else 0.0)
        self.spec = SimpleNamespace(prior=prior, likelihood="gaussian", truncation=None)
        self.prior = fake_prior(prior)
        self.zdim = ZDIM

    def log_f(self, z):
        """log N(z; 0, I) − β·a·z, in z's dtype (the estimators draw float32 z)."""
        return log_standard_normal(z) - self.beta * (z @ self.a.to(z.dtype))


def params(**log_z) -> NLLParams:
    budget = dict(
        prior_is_samples=200_000, ais_chains=256, ais_temps=200, ais_seeds=2, q_based_per_image=20, q_based_images=None
    ) | dict(
        certificate_delta=1e-6, certificate_half_width=0.05, certificate_pilot=10_000, certificate_max_samples=10**7
    )
    return NLLParams(
        n_importance=500,
        n_passes=1,
        chunk=4096,
        batch_images=16,
        seed=0,
        split="test",
        proposal=ProposalParams(kind="defensive", weight=0.5, width=2.0, paper_protocol=True),
        log_z=LogZParams(**{**budget, **log_z}),
    )


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_every_log_z_estimate_and_the_headline_nll_match_the_exact_values():
    model = PullbackLinearVAE(beta=1.5)
    train, test = images(64, 1), images(40, 2)
    out = nll_protocol(model, DistContext(), train, test, params(), device="cpu")
    est = out["log_z"]
    assert set(est) == {"paper_q", "prior_is", "ais"}
    for name in ("prior_is", "ais"):  # unbiased for Z: within their stated errors of log Z = β²/2
        assert abs(est[name]["log_z"] - model.log_z) < 4 * est[name]["std_err"] + 0.01, name
    # The headline is the larger independent estimate (each is low in expectation).
    assert out["log_z_headline"] == max(("prior_is", "ais"), key=lambda n: est[n]["log_z"])
    # log Z enters as a constant: the NLL under each estimate differs by the difference of log Z.
    by = out["nll_nats_by_log_z"]
    for name in est:
        assert by[name] - by["ais"] == pytest.approx(est[name]["log_z"] - est["ais"]["log_z"], abs=1e-9)
    assert out["nll_nats"] == by[out["log_z_headline"]]
    exact = -model.exact_log_px(test.double().div(255.0)).mean().item()
    log_z_err = est[out["log_z_headline"]]["std_err"]
    assert abs(out["nll_nats"] - exact) < 4 * math.hypot(out["nll_mc_stderr"], log_z_err) + 0.01
    assert out["n_test_images"] == 40 and out["n_importance_total"] == 40 * 500
    # The paper's proposal q(z|e) scores the same images beside it (here a full-support Normal q,
    # so it too is near the exact value), under every log Z; the S/10 read-out and ESS come along.
    paper = out["paper_protocol"]
    assert abs(paper["nll_nats"] - exact) < 4 * math.hypot(paper["nll_mc_stderr"], log_z_err) + 0.01
    assert paper["nll_nats_by_log_z"]["ais"] - by["ais"] == pytest.approx(paper["nll_nats"] - out["nll_nats"])
    assert out["n_importance_sub"] == 50 and abs(out["nll_nats_sub"] - out["nll_nats"]) < 0.5
    assert 1.0 <= out["ess_min"] <= out["ess_median"] <= 500 and out["proposal"] == "defensive"
    per_image = out["nll_per_image"]
    assert set(per_image) == {"nll_nats", "nll_nats_sub", "ess", "nll_nats_paper_protocol"}
    assert sum(per_image["nll_nats"]) / 40 == pytest.approx(out["nll_nats"], rel=1e-9)
    assert out["bpd"] == pytest.approx(out["nll_nats"] / (math.prod(SHAPE) * math.log(2.0)))


def test_plain_vae_has_log_z_zero_exactly_and_runs_no_estimator():
    model = PullbackLinearVAE(beta=1.5, prior="standard")
    out = nll_protocol(model, DistContext(), images(8, 1), images(8, 2), params(), device="cpu")
    assert out["log_z"] == {} and out["log_z_headline"] == "exact"
    assert out["nll_nats_by_log_z"] == {"exact": out["nll_nats"]}
    assert out["nll_nats"] == pytest.approx(out["nll_vae_prior_nats"], abs=1e-9)


def test_protocol_is_reproducible_and_each_estimate_has_its_own_seed():
    model = PullbackLinearVAE(beta=1.0)
    small = params(prior_is_samples=4096, ais_chains=32, ais_temps=20, ais_seeds=1, q_based_per_image=4)
    a = nll_protocol(model, DistContext(), images(16, 1), images(8, 2), small, device="cpu")
    b = nll_protocol(model, DistContext(), images(16, 1), images(8, 2), small, device="cpu")
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    c = nll_protocol(
        model, DistContext(), images(16, 1), images(8, 2), small.model_copy(update={"seed": 1}), device="cpu"
    )
    assert c["log_z"]["prior_is"]["log_z"] != a["log_z"]["prior_is"]["log_z"]


def test_total_error_holds_the_log_z_error_and_covers_the_actual_error():
    """On the linear case the true log Z is known, so each run's actual NLL error is known: with
    a deliberately small log-Z budget its spread over seeds is mostly log Ẑ's error, which the
    total standard error states and the test-set and Monte-Carlo errors alone do not."""
    model = PullbackLinearVAE(beta=1.5)
    train, test = images(32, 1), images(16, 2)
    exact = -model.exact_log_px(test.double().div(255.0)).mean().item()
    small = params(prior_is_samples=64, ais_chains=8, ais_temps=30, ais_seeds=2, q_based_per_image=2)
    errors, stated, without_log_z = [], [], []
    for seed in range(8):
        out = nll_protocol(model, DistContext(), train, test, small.model_copy(update={"seed": seed}), device="cpu")
        headline_err = out["log_z"][out["log_z_headline"]]["std_err"]
        assert out["nll_log_z_stderr"] == headline_err
        assert out["nll_total_stderr"] == pytest.approx(
            math.sqrt(out["nll_stderr"] ** 2 + out["nll_mc_stderr"] ** 2 + headline_err**2), rel=1e-12
        )
        errors.append(out["nll_nats"] - exact)  # the same test images: no test-set error in it
        stated.append(math.hypot(out["nll_mc_stderr"], headline_err))
        without_log_z.append(out["nll_mc_stderr"])
    rms = lambda v: math.sqrt(sum(x * x for x in v) / len(v))  # noqa: E731
    assert rms(errors) < 3 * rms(stated)  # the stated error covers the actual one
    assert rms(errors) > 3 * rms(without_log_z)  # and the log-Z part is what does it


def test_pass_spread_is_reported_only_with_several_passes():
    model = PullbackLinearVAE(beta=1.0)
    small = params(prior_is_samples=1024, ais_chains=16, ais_temps=10, ais_seeds=1, q_based_per_image=2)
    one = nll_protocol(model, DistContext(), images(16, 1), images(8, 2), small, device="cpu")
    three = nll_protocol(
        model, DistContext(), images(16, 1), images(8, 2), small.model_copy(update={"n_passes": 3}), device="cpu"
    )
    assert "nll_pass_sd" not in one and three["nll_pass_sd"] > 0.0
    assert three["nll_pass_sd"] < 1.0  # S = 500 samples per image: the pass means agree closely


def test_the_training_monitor_finds_the_exact_log_z_and_nll_of_the_linear_case():
    """The check training runs every `log_z_every` epochs: AIS and N(0, I)-IS within their errors
    of log Z = β²‖a‖²/2, the larger heading, and the NLL of the images it is given under it near
    the exact one."""
    from vaepp.config import MonitorParams

    model = PullbackLinearVAE(beta=1.5)
    valid = images(40, 2)[:30]  # the monitor scores every image it is given
    mp = MonitorParams(
        ais_chains=128, ais_temps=100, ais_seeds=3, prior_is_samples=100_000, valid_images=30, n_importance=200, seed=0
    )
    out = log_z_monitor(model, valid, mp, device="cpu")
    sd = out["monitor_log_z_ais_seed_sd"]
    assert abs(out["monitor_log_z_ais"] - model.log_z) < 4 * sd / math.sqrt(3) + 0.02
    ess = out["monitor_prior_is_ess"]
    assert 0 < ess <= 100_000
    assert abs(out["monitor_log_z_prior_is"] - model.log_z) < 4 / math.sqrt(ess) + 0.02  # delta-method error
    assert out["monitor_log_z"] == max(out["monitor_log_z_ais"], out["monitor_log_z_prior_is"])
    exact = -model.exact_log_px(valid.double().div(255.0)).mean().item()
    # the same images: only the importance sampler's error and log Ẑ's separate the two
    assert abs(out["monitor_valid_nll"] - exact) < 0.05 + abs(out["monitor_log_z"] - model.log_z)
    plain = log_z_monitor(PullbackLinearVAE(beta=1.5, prior="standard"), valid, mp, device="cpu")
    assert plain["monitor_log_z"] == 0.0 and "monitor_log_z_ais" not in plain


def test_headline_log_z_error_is_the_certificates_half_width_for_a_certified_run():
    interval = {"log_z": -5.10, "std_err": 0.004, "extra": {"log_half_width": 0.041}}
    estimates = {"certificate": interval, "ais": {"log_z": -5.14, "std_err": 0.009, "extra": {}}}
    assert headline_log_z_stderr(estimates, "certificate") == 0.041  # not Ẑ's se
    assert headline_log_z_stderr(estimates, "ais") == 0.009
    assert headline_log_z_stderr({}, "exact") == 0.0


def test_a_certified_prior_with_a_truncated_sampler_has_no_nll_protocol():
    model = PullbackLinearVAE(beta=1.0)
    model.spec = SimpleNamespace(prior="certified", likelihood="gaussian", truncation=4)
    model.prior = fake_prior("certified", truncation=4)
    with pytest.raises(ValueError, match="model.truncation"):
        nll_protocol(model, DistContext(), images(8, 1), images(4, 2), params(), device="cpu")
