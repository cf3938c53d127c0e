"""The latent GAN: the authors' networks and schedule, its inputs, and that it learns a simple law
of latents."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from factories import latent_gan_params, model_spec, tiny
from vaepp import fit, resolve
from vaepp.artifacts import load_latent_gan, save_latent_gan
from vaepp.checkpoints import Checkpoint
from vaepp.config import load_params, resolve_run
from vaepp.distributed import ONE_PROCESS
from vaepp.files import CheckpointError, load_checkpoint
from vaepp.latent_gan import LatentGAN, fit_latent_gan, latent_gan_settings, moment_gap, posterior_samples
from vaepp.model import VAEPP
from vaepp.nets import SLOPE

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"


def _gan(zdim, params):
    return LatentGAN.from_params(zdim, params)


def _linears(net: nn.Sequential) -> list[nn.Linear]:
    return [m for m in net if isinstance(m, nn.Linear)]


def test_default_networks_are_the_authors():
    """params.yaml, resolved for binary MNIST: noise of dim z; generator 5 × [Linear(40) + weight
    norm + LeakyReLU(0.2)] → Linear(z) → LeakyReLU; critic 6 × [Linear(40) + weight norm +
    LeakyReLU(0.2)] → Linear(1)."""
    run = resolve_run(load_params(PARAMS_YAML), "vaepp")
    params = resolve.latent_gan_params(run, binary=True)
    zdim = run.model.zdim
    gan = _gan(zdim, params)
    assert gan.noise_dim == zdim and params.inputs == "mean"
    for net, n_hidden, d_in, d_out in ((gan.generator, 5, zdim, zdim), (gan.critic_net, 6, zdim, 1)):
        layers = _linears(net)
        assert len(layers) == n_hidden + 1
        assert [(m.in_features, m.out_features) for m in layers] == [(d_in, 40)] + [(40, 40)] * (n_hidden - 1) + [
            (40, d_out)
        ]
        assert all(parametrize.is_parametrized(m, "weight") for m in layers[:-1])
        assert not parametrize.is_parametrized(layers[-1])
        acts = [m for m in net if isinstance(m, nn.LeakyReLU)]
        assert all(a.negative_slope == SLOPE == 0.2 for a in acts)
        # a LeakyReLU follows every hidden layer; the generator's output has one too, the critic's none
        assert len(acts) == n_hidden + (net is gan.generator)
    assert isinstance(gan.generator[-1], nn.LeakyReLU) and isinstance(gan.critic_net[-1], nn.Linear)
    z = gan.sample(7)
    assert z.shape == (7, zdim) and gan.critic(z).shape == (7,)


def test_plain_networks_without_weight_norm_and_with_a_linear_output():
    gan = _gan(3, latent_gan_params(weight_norm=False, generator_output="linear", hidden=(8,), critic_hidden=(8, 8)))
    assert not any(parametrize.is_parametrized(m) for m in gan.modules())
    assert isinstance(gan.generator[-1], nn.Linear) and len(_linears(gan.generator)) == 2
    assert len(_linears(gan.critic_net)) == 3


def test_unresolved_auto_is_refused():
    pool = lambda: torch.randn(64, 3)  # noqa: E731
    for field in ("inputs", "penalty_p"):
        spec = latent_gan_params(**{field: "auto"})
        with pytest.raises(ValueError, match=rf"{field}.*vaepp\.resolve\.latent_gan_params"):
            fit_latent_gan(_gan(3, latent_gan_params()), pool, spec)
    with pytest.raises(ValueError, match="noise_dim"):
        _gan(3, latent_gan_params(noise_dim="auto"))


def test_a_non_finite_critic_loss_stops_the_fit_before_its_step():
    """A NaN in the latents fitted: NonFiniteLossError (the fits' one error for it) naming the loss,
    the epoch and the step, and the critic left as it was."""
    from vaepp.optim import NonFiniteLossError

    pool = torch.randn(64, 3)
    pool[::2] = float("nan")  # half the rows: every critic batch draws some
    gan = _gan(3, latent_gan_params(hidden=(8,), critic_hidden=(8,)))
    before = {k: v.clone() for k, v in gan.state_dict().items()}
    spec = latent_gan_params(hidden=(8,), critic_hidden=(8,), epochs=1, batch_size=64, n_critic=1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite latent-GAN critic loss \(nan\) at epoch 1, step 0"):
        fit_latent_gan(gan, lambda: pool, spec)
    assert all(torch.equal(v, gan.state_dict()[k]) for k, v in before.items())


def test_learning_rate_halves_on_schedule():
    """lr_halve_every = 1: epochs log lr, lr/2, lr/4; the first epoch matches a fit that never
    halves, the later ones do not (the optimisers use the logged rate)."""
    pool = lambda: 1.0 + torch.randn(128, 3)  # noqa: E731
    spec = latent_gan_params(epochs=3, batch_size=32, n_critic=2, lr=1e-2, lr_halve_every=1)
    torch.manual_seed(0)
    halved = fit_latent_gan(_gan(3, spec), pool, spec)
    assert [h["lr"] for h in halved] == [1e-2, 5e-3, 2.5e-3]
    steady_spec = spec.model_copy(update={"lr_halve_every": 100})
    torch.manual_seed(0)
    steady = fit_latent_gan(_gan(3, steady_spec), pool, steady_spec)
    assert [h["lr"] for h in steady] == [1e-2] * 3
    assert halved[0]["critic_loss"] == steady[0]["critic_loss"]
    assert halved[2]["critic_loss"] != steady[2]["critic_loss"]


def test_latent_gan_learns_a_gaussian_pool():
    """The authors' networks and penalty (WGAN-div, k = 2, p = 3) fitted to a correlated 2-D
    Gaussian pool: the mean gap shrinks 4-fold, the covariance gap by a quarter."""
    torch.manual_seed(0)
    mean = torch.tensor([1.5, -1.0])
    chol = torch.tensor([[0.8, 0.0], [0.6, 0.5]])  # Σ = [[0.64, 0.48], [0.48, 0.61]]
    pool = lambda: mean + torch.randn(2048, 2) @ chol.T  # noqa: E731
    spec = latent_gan_params(noise_dim=2, hidden=(40,) * 5, critic_hidden=(40,) * 6, epochs=20, batch_size=64, lr=2e-3)
    gan = _gan(2, spec)
    with torch.no_grad():
        before = moment_gap(gan.sample(4096), pool())
    history = fit_latent_gan(gan, pool, spec)
    with torch.no_grad():
        after = moment_gap(gan.sample(4096), pool())
    assert len(history) == 20
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert after["mean_gap"] < 0.25 * before["mean_gap"]
    assert after["cov_gap"] < 0.75 * before["cov_gap"]


def test_posterior_samples_one_per_image_in_batches():
    images = torch.randint(0, 256, (25, 1, 4, 4), dtype=torch.uint8)
    z = posterior_samples(lambda e: e.flatten(1)[:, :2], images, batch_size=7)
    assert z.shape == (25, 2)
    assert torch.allclose(z, images.flatten(1)[:, :2].float() / 255)


def _pools_of_the_stage(tmp_path, monkeypatch, inputs: str):
    """The pools fit_run_latent_gan hands the fit in two epochs, and the VAE's μ(e) (N, Z)."""
    run = resolve_run(tiny(), "vaepp")
    run = run.model_copy(update={"latent_gan": run.latent_gan.model_copy(update={"inputs": inputs})})
    torch.manual_seed(3)
    model = VAEPP(model_spec((1, 28, 28))).eval()
    with torch.no_grad():  # move the zero-initialised heads, so μ(e) differs between images
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    images = torch.randint(0, 2, (40, 1, 28, 28), dtype=torch.uint8) * 255
    with torch.no_grad():
        mu = model.encode(images.float() / 255)[0]
    seen = []

    def fake_fit(gan, sample_pool, params, **kw):
        seen.extend([sample_pool(), sample_pool()])
        return []

    monkeypatch.setattr(fit, "fit_latent_gan", fake_fit)
    vae = tmp_path / "vae.pt"
    vae.write_bytes(b"vae")
    meta = {"binary": True, "sha256": None}
    _, _, settings, gap = fit.fit_run_latent_gan(
        run, model, vae, images, meta, ONE_PROCESS, checkpoint_path=tmp_path / "gan.ckpt"
    )
    assert settings["spec"]["inputs"] == inputs and set(gap) == {"mean_gap", "cov_gap"}
    return seen, mu


def test_mean_inputs_fit_the_posterior_means(tmp_path, monkeypatch):
    (first, second), mu = _pools_of_the_stage(tmp_path, monkeypatch, "mean")
    assert torch.equal(first, mu) and torch.equal(second, mu)


def test_sample_inputs_draw_afresh_every_epoch(tmp_path, monkeypatch):
    (first, second), mu = _pools_of_the_stage(tmp_path, monkeypatch, "sample")
    assert first.shape == second.shape == mu.shape
    assert not torch.equal(first, second) and not torch.allclose(first, mu)


def test_saved_gan_loads_to_the_same_networks(tmp_path):
    spec = latent_gan_params()
    torch.manual_seed(0)
    gan = _gan(3, spec)
    path = save_latent_gan(tmp_path / "gan.pt", gan, latent_gan_settings(spec, 3), history=[])
    loaded = load_latent_gan(path, "cpu")
    with torch.no_grad():
        want = gan.eval().sample(9, generator=torch.Generator().manual_seed(1))
        assert torch.equal(loaded.sample(9, generator=torch.Generator().manual_seed(1)), want)
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in gan.modules()]


def _spec(**kw):
    return latent_gan_params(
        **{"noise_dim": 4, "hidden": (16, 16), "epochs": 4, "batch_size": 32, "n_critic": 2, "lr": 1e-3, **kw}
    )


def _pool():
    return 1.0 + torch.randn(256, 3)  # drawn from the global RNG, as the stage's posterior pool is


class _Crash(Exception):
    pass


def test_interrupted_fit_resumes_to_the_same_networks(tmp_path):
    """A fit stopped after epoch 2 (its checkpoint written) and rerun ends bitwise equal to an
    uninterrupted fit: weights, Adam states, learning rates and the RNG streams (pool and
    batches) are restored."""
    spec = _spec(lr_halve_every=1)
    torch.manual_seed(1)
    whole = _gan(3, spec)
    history = fit_latent_gan(whole, _pool, spec, checkpoint=Checkpoint(tmp_path / "a.ckpt"))

    def crash_after_two(epoch, metrics):
        if epoch == 2:
            raise _Crash

    path = tmp_path / "b.ckpt"
    torch.manual_seed(1)
    try:
        fit_latent_gan(_gan(3, spec), _pool, spec, callback=crash_after_two, checkpoint=Checkpoint(path))
    except _Crash:
        pass
    assert load_checkpoint(path)["epoch"] == 2
    torch.manual_seed(123)  # a different start: everything that matters comes from the checkpoint
    resumed = _gan(3, spec)
    rest = fit_latent_gan(resumed, _pool, spec, checkpoint=Checkpoint(path))
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    drop = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert drop(rest) == drop(history) and len(rest) == 4
    assert [h["lr"] for h in rest] == [1e-3 * 0.5**t for t in range(4)]


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    spec = _spec(epochs=1)
    fit_latent_gan(_gan(3, spec), _pool, spec, checkpoint=Checkpoint(tmp_path / "c.ckpt"))
    other = _spec(epochs=1, lr=1e-4)
    with pytest.raises(CheckpointError, match="other settings"):
        fit_latent_gan(_gan(3, other), _pool, other, checkpoint=Checkpoint(tmp_path / "c.ckpt"))
