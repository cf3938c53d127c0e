"""The priors of vaepp/priors/: one module each, registered once, each defining its log f and its
sampler, checked here against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from tests.factories import model_spec, train_params
from vaepp.distributed import ONE_PROCESS
from vaepp.model import VAEPP
from vaepp.options import PriorKind, choices
from vaepp.posteriors import log_standard_normal
from vaepp.priors import PRIORS

INTERFACE = ("log_f", "elbo_terms", "loss", "after_step", "sample")
FLAGS = ("has_critic", "algorithms", "exact_log_z", "has_certificate", "truncation")


def _model(prior: str) -> VAEPP:
    torch.manual_seed(0)
    model = VAEPP(model_spec((1, 6, 6), zdim=3, hidden=(8,), prior=prior)).eval()
    if hasattr(model.prior, "xi"):
        with torch.no_grad():
            model.prior.xi.fill_(0.7)  # β away from w/2
    return model


def test_every_prior_module_is_registered_under_its_file_name():
    assert set(PRIORS) == set(choices(PriorKind))
    for kind, cls in PRIORS.items():
        assert cls.kind == kind
        missing = [name for name in INTERFACE + FLAGS if not hasattr(cls, name)]
        assert not missing, f"prior {kind!r} lacks {missing}"


def test_log_f_is_each_priors_formula():
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = _model("standard")
        assert torch.equal(plain.log_f(z), log_standard_normal(z))
        assert float(plain.beta) == 0.0
        pull = _model("pullback")
        d = pull.critic_images(pull.image_mean(pull.decode(z)))
        beta = 10.0 * torch.sigmoid(torch.tensor(0.7))  # w = beta_max of the tiny profile
        assert pull.spec.beta_max == 10.0
        torch.testing.assert_close(pull.log_f(z), log_standard_normal(z) - beta * d)
        cert = _model("certified")
        d = cert.critic_images(cert.image_mean(cert.decode(z)))
        logit = cert.prior.acceptance_c - beta * d
        torch.testing.assert_close(cert.log_f(z), log_standard_normal(z) + torch.nn.functional.logsigmoid(logit))
        assert bool((cert.log_f(z) <= log_standard_normal(z)).all())  # a ≤ 1, so Z ≤ 1


def test_the_standard_priors_sampler_is_n01():
    model, n = _model("standard"), 4000
    from tests.factories import tiny

    mala = tiny().mala.model_copy(update={"n_samples": n})
    z, info = model.prior.sample(
        model, torch.zeros(n, 3), ONE_PROCESS, mala, generator=torch.Generator().manual_seed(0), device="cpu"
    )
    assert z.shape == (n, 3) and info["sampler"] == "prior N(0, I)"
    se = 1.0 / math.sqrt(n)
    assert float(z.mean(0).abs().max()) < 5 * se
    assert float((z.var(0) - 1.0).abs().max()) < 5 * math.sqrt(2.0) * se
    assert set(model.prior.algorithms) == {"naive", "vaepp"}  # no critic: both train it alike


@pytest.mark.parametrize("prior", ["pullback", "certified"])
def test_the_critic_priors_samplers_return_finite_latents(prior):
    from tests.factories import tiny

    model = _model(prior)
    mala = tiny().mala.model_copy(update={"n_samples": 6, "n_steps": 2})
    z0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    z, info = model.prior.sample(model, z0, ONE_PROCESS, mala, generator=torch.Generator().manual_seed(0), device="cpu")
    assert z.shape == (6, 3) and bool(torch.isfinite(z).all())
    assert info["sampler"] == ("latent GAN + MALA" if prior == "pullback" else "exact (rejection) + MALA")


def test_a_certified_prior_refuses_algorithm_1():
    from vaepp.train import train

    model = _model("certified").train()
    images = torch.zeros(8, 1, 6, 6, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"train.algorithm = 'naive': the certified prior trains with vaepp only"):
        train(model, images, train_params(algorithm="naive", epochs=1, batch_size=4))


def test_the_machine_auto_rules_resolve_in_one_place():
    from vaepp import resolve

    assert resolve.device("auto", cuda_available=False) == "cpu" and resolve.device("auto", True) == "cuda"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve.device("cuda", cuda_available=False)
    assert resolve.backend("auto", "cpu") == "gloo" and resolve.backend("auto", "cuda") == "nccl"
