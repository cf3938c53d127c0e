"""The latent GAN learns a simple law of latents."""

import torch

from vaepp.latent_gan import LatentGAN, LatentGANSpec, fit_latent_gan, moment_gap, posterior_samples


def test_latent_gan_moves_towards_the_posterior_samples():
    torch.manual_seed(0)
    target_mean = torch.tensor([2.0, -1.0, 0.5])
    scale = torch.tensor([0.5, 1.5, 1.0])
    pool = lambda: target_mean + scale * torch.randn(4096, 3)  # noqa: E731
    spec = LatentGANSpec(noise_dim=8, hidden=(64, 64), epochs=6, batch_size=128, lr=1e-3,
                         penalty="wgan_gp", penalty_k=10.0)
    gan = LatentGAN(3, spec)
    with torch.no_grad():
        before = moment_gap(gan.sample(4096), pool())
    history = fit_latent_gan(gan, pool, spec)
    with torch.no_grad():
        after = moment_gap(gan.sample(4096), pool())
    assert len(history) == 6 and all(h["critic_loss"] == h["critic_loss"] for h in history)
    assert after["mean_gap"] < 0.25 * before["mean_gap"]
    assert after["cov_gap"] < before["cov_gap"]


def test_posterior_samples_one_per_image_in_batches():
    images = torch.randint(0, 256, (25, 1, 4, 4), dtype=torch.uint8)
    z = posterior_samples(lambda e: e.flatten(1)[:, :2], images, batch_size=7)
    assert z.shape == (25, 2)
    assert torch.allclose(z, images.flatten(1)[:, :2].float() / 255)
