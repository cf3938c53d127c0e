"""The authors' settings: the zero-initialised heads (q = N(0, I) at step 0), the penalty exponent
and Algorithm 1's critic weight by likelihood, and a monitored fit that trains exactly as an
unmonitored one."""

import math

import pytest
import torch

from factories import model_spec, tiny, train_params
from vaepp.config import resolve_run
from vaepp.model import VAEPP
from vaepp.posteriors import log_standard_normal
from vaepp.resolve import latent_gan_params
from vaepp.resolve import train_params as resolved_train_params
from vaepp.train import train


@pytest.mark.parametrize("arch", ["mlp", "resnet"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic"])
def test_zero_heads_start_q_at_the_standard_normal_and_g_flat(arch, likelihood):
    torch.manual_seed(0)
    spec = model_spec((1, 12, 12), arch=arch, hidden=(16,), channels=(4, 8), likelihood=likelihood, posterior="normal")
    model = VAEPP(spec)
    e = torch.rand(5, 1, 12, 12)
    mu, log_sigma = model.encode(e)
    assert torch.equal(mu, torch.zeros_like(mu)) and torch.equal(log_sigma, torch.zeros_like(log_sigma))
    z, log_q = model.sample_q(mu, log_sigma, 3)
    assert torch.allclose(log_q, log_standard_normal(z), atol=1e-5)  # q(z|e) = N(z; 0, I) for every e
    g = model.image_mean(model.decode(torch.randn(4, spec.zdim)))
    assert torch.equal(g, torch.full_like(g, 0.5))  # a flat grey image whatever z is
    torch.manual_seed(0)
    default = VAEPP(
        model_spec((1, 12, 12), arch=arch, hidden=(16,), channels=(4, 8), likelihood=likelihood, init="torch")
    )
    assert default.encode(e)[0].abs().max() > 0  # PyTorch's init starts elsewhere


def test_zero_heads_still_learn():
    """A zero output layer gets a gradient at step 0 (its input is not zero), so the fit moves."""
    torch.manual_seed(0)
    model = VAEPP(model_spec((1, 12, 12), hidden=(16,), prior="standard"))
    images = torch.randint(0, 256, (32, 1, 12, 12), dtype=torch.uint8)
    train(model, images, train_params(epochs=1, batch_size=16, lr=1e-2))
    assert model.encoder.output_layer.weight.abs().max() > 0 and model.decoder.output_layer.weight.abs().max() > 0


@pytest.mark.parametrize(
    ("likelihood", "p", "c"), [("auto", 3.0, 10.0), ("bernoulli", 3.0, 10.0), ("logistic", 6.0, 1.0)]
)
def test_penalty_exponent_and_critic_weight_follow_the_likelihood(likelihood, p, c):
    """The authors' Bernoulli scripts: ‖∇D‖³ and c = w (= beta_max, 10 here); CIFAR: ‖∇D‖⁶, c = 1."""
    run = resolve_run(tiny(), "naive_vaepp")
    run = run.model_copy(update={"model": run.model.model_copy(update={"likelihood": likelihood})})
    t = resolved_train_params(run, binary=True)
    assert (t.penalty_p, t.critic_penalty_weight) == (p, c)
    g = latent_gan_params(run, binary=True)
    assert g.penalty_p == p and g.noise_dim == run.model.zdim
    assert g.inputs == ("sample" if likelihood == "logistic" else "mean")
    explicit = run.model_copy(
        update={"train": run.train.model_copy(update={"penalty_p": 4.0, "critic_penalty_weight": 2.5})}
    )
    t = resolved_train_params(explicit, binary=True)
    assert (t.penalty_p, t.critic_penalty_weight) == (4.0, 2.5)  # a stated value is kept


def test_training_refuses_an_unresolved_auto():
    model = VAEPP(model_spec((1, 12, 12), hidden=(16,)))
    params = tiny().train  # penalty_p: auto
    with pytest.raises(ValueError, match="auto"):
        train(model, torch.zeros(32, 1, 12, 12, dtype=torch.uint8), params)


def test_the_monitor_leaves_training_bitwise_unchanged_and_fills_its_columns():
    from vaepp.log_z_monitor import log_z_monitor

    images = torch.randint(0, 256, (64, 1, 12, 12), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    valid = images[:16]
    params = train_params(epochs=3, batch_size=16, n_prior_samples=16, log_z_every=2)
    fits = []
    for monitored in (False, True):
        torch.manual_seed(0)
        model = VAEPP(model_spec((1, 12, 12), hidden=(16,)))
        mon = (lambda m: log_z_monitor(m, valid, params.monitor, device="cpu")) if monitored else None
        fits.append((model, train(model, images, params, monitor=mon)))
    (plain, a), (watched, b) = fits
    assert all(torch.equal(v, watched.state_dict()[k]) for k, v in plain.state_dict().items())
    checked = [h["epoch"] for h in b.history if "monitor_log_z" in h]
    assert checked == [2, 3]  # every 2nd epoch and the last
    for h in b.history:
        if "monitor_log_z" in h:
            assert math.isfinite(h["monitor_log_z_ais"]) and math.isfinite(h["monitor_valid_nll"])
            assert h["elbo_under_monitor_log_z"] == pytest.approx(
                h["elbo_under_train_log_z"] + h["log_z"] - h["monitor_log_z"]
            )
    assert not any("monitor_log_z" in h for h in a.history)


@pytest.mark.parametrize(
    ("method", "prior", "algorithm"),
    [("vae", "standard", "vaepp"), ("naive_vaepp", "pullback", "naive"), ("vaepp", "pullback", "vaepp")],
)
def test_l2_falls_on_conv_kernels_only_and_never_on_the_naive_critic(method, prior, algorithm):
    from vaepp.train import make_optimizers

    params = train_params(weight_decay=2e-4, algorithm=algorithm)
    model = VAEPP(model_spec((1, 12, 12), arch="resnet", channels=(4, 8), prior=prior))
    opts = make_optimizers(model, params)
    decayed = {id(p) for opt in opts.values() for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    critic = {id(p) for p in model.critic.parameters()}
    for name, p in model.named_parameters():
        if method == "vae" and id(p) in critic:
            continue  # the plain VAE has no critic to train
        want = p.dim() == 4 and not (method == "naive_vaepp" and id(p) in critic)
        assert (id(p) in decayed) == want, name
    mlp = VAEPP(model_spec((1, 12, 12), hidden=(16,), prior=prior))
    groups = [g for opt in make_optimizers(mlp, params).values() for g in opt.param_groups]
    assert not any(g["params"] and g["weight_decay"] > 0 for g in groups)  # dense layers: no L2
