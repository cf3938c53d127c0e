"""The latent GAN of paper §4.3: a Wasserstein GAN in z space fitted to the training posteriors.

After the VAE is trained and frozen, the training set's posterior means μ(e) (Bernoulli data, as
the authors) or one draw z ~ q(z|e) per image per epoch (other data) are the "real" data of a
WGAN with the same penalty family as the VAE's critic, n_critic critic steps per generator step,
Adam(lr_t, β₁ = 0.5, β₂ = 0.999) with lr_t = lr · 0.5^⌊t / lr_halve_every⌋ at epoch t (the VAE's
schedule, restarted). Its samples z₀ seed MALA; decoding z₀ directly gives the
"GAN-VAEPP" row of Table 4. The critic convention is the project's: LOW D = real, so per batch of
B (m = B penalty pairs) the critic minimises

    (1/B)·Σ_i D(z_i) − (1/B)·Σ_i D(g(u_i)) + (1/B)·Σ_i R_i,     u_i ~ N(0, I_noise),

and the generator minimises (1/B)·Σ_i D(g(u_i)). As in `vaepp.train`, each loss is written as
this rank's share of the global sum, scaled by W (`vaepp.distributed.data_parallel`), and every
rank draws the noise and α of the whole batch, so W processes give the one-process fit up to
float rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import parametrizations

from .checkpoints import Checkpoint
from .config import LatentGANParams
from .distributed import ONE_PROCESS, DistContext, all_sum, check_same_input, data_parallel, row_range
from .nets import SLOPE
from .optim import adam, check_finite, halving_factor
from .options import GeneratorOutput
from .penalties import draw_alpha, penalty_sum


def _weight_normed_mlp(sizes: list[int], *, weight_norm: bool, final_activation: bool) -> nn.Sequential:
    """[Linear(a, b) (weight-normalised when `weight_norm`) + LeakyReLU(0.2)] for each hidden
    width, then a plain Linear to sizes[-1], followed by LeakyReLU when `final_activation`.

    Weight norm writes each hidden layer's weight W (out, in) as W_j = g_j · v_j / ‖v_j‖ per
    output unit j, with g (out, 1) and v (out, in) the trained parameters."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
        linear = nn.Linear(a, b)
        layers += [parametrizations.weight_norm(linear) if weight_norm else linear, nn.LeakyReLU(SLOPE)]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    if final_activation:
        layers.append(nn.LeakyReLU(SLOPE))
    return nn.Sequential(*layers)


class LatentGAN(nn.Module):
    """Generator g: u ~ N(0, I_noise) → z (zdim) and critic D_z: z (zdim) → ℝ, both MLPs.

    generator: noise_dim → hidden[0] → … → hidden[-1] → Z, LeakyReLU(0.2) after every hidden
    layer and, with generator_output = "leaky_relu" (authors), after the output layer too (a
    bijection of ℝ, so every z stays reachable). critic: Z → critic_hidden… → 1, LeakyReLU after
    every hidden layer, linear output. `weight_norm` puts weight normalisation on every hidden
    layer of both (authors: generator 5 × 40, critic 6 × 40, noise of dim zdim).
    """

    def __init__(
        self,
        zdim: int,
        noise_dim: int,
        hidden: tuple[int, ...],
        critic_hidden: tuple[int, ...],
        *,
        weight_norm: bool,
        generator_output: GeneratorOutput,
    ):
        super().__init__()
        self.zdim = zdim
        self.noise_dim = noise_dim
        self.generator = _weight_normed_mlp(
            [noise_dim, *hidden, zdim], weight_norm=weight_norm, final_activation=generator_output == "leaky_relu"
        )
        self.critic_net = _weight_normed_mlp([zdim, *critic_hidden, 1], weight_norm=weight_norm, final_activation=False)

    @classmethod
    def from_params(cls, zdim: int, params: LatentGANParams) -> LatentGAN:
        """The networks `params` describe, for latents of dim `zdim` (params resolved: no "auto")."""
        _check_resolved(params)
        return cls(
            zdim,
            params.noise_dim,
            tuple(params.hidden),
            tuple(params.critic_hidden),
            weight_norm=params.weight_norm,
            generator_output=params.generator_output,
        )

    def critic(self, z: Tensor) -> Tensor:
        """D_z(z): (n, zdim) → (n,)."""
        return self.critic_net(z).squeeze(-1)

    def sample(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        """n latent samples z₀ = g(u), u ~ N(0, I_noise): (n, zdim)."""
        device = device or next(self.parameters()).device
        noise = torch.randn(n, self.noise_dim, generator=generator, device=device)
        return self.generator(noise)


def _check_resolved(params: LatentGANParams) -> None:
    auto = [k for k, v in params.model_dump().items() if v == "auto"]
    if auto:
        raise ValueError(
            f"latent_gan params {', '.join(auto)} are still 'auto'; resolve them for the run with "
            "vaepp.resolve.latent_gan_params"
        )


def latent_gan_settings(params: LatentGANParams, zdim: int) -> dict:
    """The settings a latent-GAN checkpoint and model file record; a checkpoint resumes only if
    they match: {"spec": params, "zdim"}."""
    return {"spec": params.model_dump(), "zdim": zdim}


@torch.inference_mode()
def posterior_samples(encode_sample: Callable[[Tensor], Tensor], images: Tensor, *, batch_size: int = 1000) -> Tensor:
    """One latent row per image: images uint8 (N, C, H, W) → (N, zdim), batched.

    `encode_sample(e)` maps a float batch (b, C, H, W) in [0, 1] to (b, zdim): one posterior draw
    z ~ q(z|e) per image, or the posterior mean μ(e)."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        out.append(encode_sample(images[i : i + batch_size].float().div(255.0)))
    return torch.cat(out)


def critic_loss(
    gan: LatentGAN,
    noise: Tensor,
    real: Tensor,
    alpha: Tensor | None,
    batch: int,
    params: LatentGANParams,
    ctx: DistContext = ONE_PROCESS,
) -> tuple[Tensor, dict[str, float]]:
    """Rank r's critic loss on its rows (noise u (b, noise), real z (b, zdim), α (b, 1)) of a batch of
    B, and the global metrics: critic_loss, wasserstein = mean D(fake) − mean D(real), penalty."""
    w = ctx.world
    with torch.no_grad():
        fake = gan.generator(noise)
    pen = penalty_sum(gan.critic, real, fake, alpha, params.penalty, k=params.penalty_k, p=params.penalty_p)
    d_fake, d_real = gan.critic(fake).sum(), gan.critic(real).sum()
    loss = -(w * d_fake / batch - w * d_real / batch) + w * pen / batch
    s_fake, s_real, s_pen = all_sum(ctx, [d_fake, d_real, pen])
    gap, penalty = s_fake / batch - s_real / batch, s_pen / batch
    return loss, {"critic_loss": float(-gap + penalty), "wasserstein": float(gap), "penalty": float(penalty)}


def generator_loss(
    gan: LatentGAN, noise: Tensor, batch: int, ctx: DistContext = ONE_PROCESS
) -> tuple[Tensor, dict[str, float]]:
    """Rank r's generator loss on its rows of the noise (b, noise) of a batch of B; global metric."""
    g = gan.critic(gan.generator(noise)).sum()
    (s_g,) = all_sum(ctx, [g])
    return ctx.world * g / batch, {"generator_loss": float(s_g / batch)}


def fit_latent_gan(
    gan: LatentGAN,
    sample_pool: Callable[[], Tensor],
    params: LatentGANParams,
    *,
    device: str | torch.device = "cpu",
    ctx: DistContext = ONE_PROCESS,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    checkpoint: Checkpoint | None = None,
) -> list[dict]:
    """Fit the WGAN for `params.epochs` epochs. `sample_pool()` returns the (N, zdim) tensor of "real"
    latents at the start of every epoch (one row per training image: the posterior means, or a
    fresh posterior draw; the same on every rank). `params` must be resolved (no "auto"; see
    `vaepp.resolve.latent_gan_params`). Both optimisers' learning rate is lr · 0.5^⌊t / lr_halve_every⌋
    in epoch t (from 0). An epoch is one pass of the critic over the pool: N / batch_size critic batches,
    n_critic per generator step. With a `checkpoint`, a fit that was killed resumes from its last
    checkpoint and ends with the same networks as an uninterrupted one (on W processes every rank
    passes the same file, with `write=True` on rank 0 only). Returns one dict of mean metrics per
    epoch: critic loss, Wasserstein estimate, penalty, generator loss, lr.
    """
    from tqdm.auto import tqdm

    _check_resolved(params)
    batch = params.batch_size
    if batch < ctx.world:
        raise ValueError(
            f"latent_gan.batch_size = {batch} is smaller than the {ctx.world} "
            "processes; raise it or use fewer processes"
        )
    device = torch.device(device)
    gan.to(device).train()
    torch.manual_seed(params.seed)
    opts = {
        "generator": adam(gan.generator.parameters(), lr=params.lr, betas=(0.5, 0.999)),
        "critic": adam(gan.critic_net.parameters(), lr=params.lr, betas=(0.5, 0.999)),
    }
    opt_g, opt_d = opts["generator"], opts["critic"]
    data_gen = torch.Generator().manual_seed(params.seed)
    settings = latent_gan_settings(params, gan.zdim)
    state = None
    if checkpoint is not None:
        state = checkpoint.resume(
            settings, gan, opts, data_gen, device, epochs=params.epochs, every=params.checkpoint_every
        )
    first_epoch, history = (int(state["epoch"]), list(state["history"])) if state is not None else (0, [])

    def losses(
        part: Literal["critic", "generator"], noise: Tensor, real: Tensor | None = None, alpha: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        if part == "critic":
            return critic_loss(gan, noise, real, alpha, batch, params, ctx)
        return generator_loss(gan, noise, batch, ctx)

    loss_fn = data_parallel(ctx, gan, losses, find_unused_parameters=True)  # after the weights are loaded
    start, stop = row_range(batch, ctx.rank, ctx.world)
    for epoch in range(first_epoch, params.epochs):
        t0 = time.perf_counter()
        lr = params.lr * halving_factor(epoch, params.lr_halve_every)
        for opt in opts.values():
            for group in opt.param_groups:
                group["lr"] = lr
        pool = sample_pool().to(device)
        check_same_input(ctx, pool)
        n = pool.shape[0]
        g_steps = max(1, n // (batch * params.n_critic))
        if params.max_steps_per_epoch is not None:
            g_steps = min(g_steps, params.max_steps_per_epoch)
        perm = torch.randint(0, n, (g_steps * params.n_critic, batch), generator=data_gen).to(device)
        sums = {"critic_loss": 0.0, "wasserstein": 0.0, "penalty": 0.0, "generator_loss": 0.0}
        for step in tqdm(
            range(g_steps), desc=f"latent GAN {epoch + 1}/{params.epochs}", disable=not progress, leave=False
        ):
            for c in range(params.n_critic):
                real = pool[perm[step * params.n_critic + c]]
                noise = torch.randn(batch, gan.noise_dim, device=device)  # gan.sample's draw
                alpha = draw_alpha(params.penalty, batch, real)
                loss, crit = loss_fn(
                    "critic", noise[start:stop], real[start:stop], None if alpha is None else alpha[start:stop]
                )
                check_finite(
                    crit["critic_loss"],
                    epoch + 1,
                    step,
                    None if checkpoint is None else checkpoint.path,
                    what="latent-GAN critic loss",
                )
                opt_d.zero_grad(set_to_none=True)
                loss.backward()
                opt_d.step()
            noise = torch.randn(batch, gan.noise_dim, device=device)
            loss, gen = loss_fn("generator", noise[start:stop])
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            for key, v in {**crit, **gen}.items():
                sums[key] += v
        metrics = {k: v / g_steps for k, v in sums.items()}
        metrics.update(lr=lr, epoch=epoch + 1, seconds=time.perf_counter() - t0)
        history.append(metrics)
        if checkpoint is not None:
            checkpoint.after_epoch(epoch + 1, history=history)
        if callback is not None:
            callback(epoch + 1, metrics)
    gan.eval()
    return history


def moment_gap(a: Tensor, b: Tensor) -> dict[str, float]:
    """Distance between the first two moments of two (N, zdim) samples: ‖μa − μb‖ and the
    Frobenius norm of Σa − Σb (a cheap check of what the GAN learnt)."""
    return {
        "mean_gap": float((a.mean(0) - b.mean(0)).norm()),
        "cov_gap": float((torch.cov(a.T) - torch.cov(b.T)).norm()),
    }
