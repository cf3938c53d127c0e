"""The latent GAN learns a simple law of latents."""

import pytest
import torch

from factories import latent_gan_params
from vaepp.checkpoints import Checkpoint
from vaepp.io import CheckpointError, load_checkpoint
from vaepp.latent_gan import LatentGAN, fit_latent_gan, moment_gap, posterior_samples


def _gan(zdim, params):
    return LatentGAN(zdim, params.noise_dim, params.hidden)


def test_latent_gan_moves_towards_the_posterior_samples():
    torch.manual_seed(0)
    target_mean = torch.tensor([2.0, -1.0, 0.5])
    scale = torch.tensor([0.5, 1.5, 1.0])
    pool = lambda: target_mean + scale * torch.randn(4096, 3)  # noqa: E731
    spec = latent_gan_params(
        noise_dim=8, hidden=(64, 64), epochs=6, batch_size=128, lr=1e-3, penalty="wgan_gp", penalty_k=10.0
    )
    gan = _gan(3, spec)
    with torch.no_grad():
        before = moment_gap(gan.sample(4096), pool())
    history = fit_latent_gan(gan, pool, spec)
    with torch.no_grad():
        after = moment_gap(gan.sample(4096), pool())
    assert len(history) == 6
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert after["mean_gap"] < 0.25 * before["mean_gap"]
    assert after["cov_gap"] < before["cov_gap"]


def test_posterior_samples_one_per_image_in_batches():
    images = torch.randint(0, 256, (25, 1, 4, 4), dtype=torch.uint8)
    z = posterior_samples(lambda e: e.flatten(1)[:, :2], images, batch_size=7)
    assert z.shape == (25, 2)
    assert torch.allclose(z, images.flatten(1)[:, :2].float() / 255)


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
    uninterrupted fit: weights, Adam states and the RNG streams (pool and batches) are restored."""
    spec = _spec()
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


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    spec = _spec(epochs=1)
    fit_latent_gan(_gan(3, spec), _pool, spec, checkpoint=Checkpoint(tmp_path / "c.ckpt"))
    other = _spec(epochs=1, lr=1e-4)
    with pytest.raises(CheckpointError, match="other settings"):
        fit_latent_gan(_gan(3, other), _pool, other, checkpoint=Checkpoint(tmp_path / "c.ckpt"))
