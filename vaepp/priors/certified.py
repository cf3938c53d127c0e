"""The bounded pull-back prior: p(z) = N(z; 0, I)·a(z)/Z with a(z) = sigmoid(c − β·D(G(z)) + h(z)).

A resampled prior (Bauer & Mnih 2019) whose acceptance logit is the critic on decoded images: a is
bounded, so Z = E_{N(0, I)}[a] ≤ 1 has a certificate from N(0, I) draws alone
(`vaepp.resampled.log_z_certificate`) and p has exact samples by rejection
(`vaepp.resampled.rejection_sample`). Training uses LARS's per-image estimate of Z
(`vaepp.resampled.lars_log_z`) with Algorithm 2's single optimiser. As β → 0 and c → ∞ it becomes
N(0, I).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor

from vaepp.distributed import DistContext, all_sum, shard_rows
from vaepp.mala import mala
from vaepp.nets import _mlp
from vaepp.posteriors import log_standard_normal
from vaepp.resampled import lars_log_z, log_prior_density, rejection_sample

from .pullback import beta_from_xi, critic_on_prior_samples, penalty_rows_sum
from .standard import PosteriorDraw

if TYPE_CHECKING:
    from vaepp.config import MALAParams, TrainParams
    from vaepp.spec import ModelSpec


def log_acceptance(critic_on_decoded: Tensor, beta: Tensor, c: Tensor, extra: Tensor | None = None) -> Tensor:
    """log a(z) = log sigmoid(ℓ(z)), ℓ(z) = c − β·D(G(z)) (+ h(z)). critic values (...) and extra
    (...) → (...), nats."""
    logit = c - beta * critic_on_decoded
    if extra is not None:
        logit = logit + extra
    return torch.nn.functional.logsigmoid(logit)


class CertifiedPrior(nn.Module):
    """N(z; 0, I)·sigmoid(c − β·D(G(z)) + h(z))/Z: β = w·sigmoid(ξ), c learnable (from
    `acceptance_c_init`), h an MLP on z with hidden sizes `acceptance_mlp` (none when empty) whose
    output layer starts at zero; LARS's running Ẑ in the buffer `z_ema` (starts at ½)."""

    kind = "certified"
    has_critic = True
    algorithms = ("vaepp",)
    exact_log_z = False
    has_certificate = True  # Z ≤ 1 certified from N(0, I) draws (`vaepp.log_z_protocol`)
    truncation: int | None = None  # LARS's truncated sampler (at most T proposals), from the spec

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.beta_max, self.truncation = spec.beta_max, spec.truncation
        self.acceptance_c = nn.Parameter(torch.tensor(float(spec.acceptance_c_init)))
        self.acceptance_mlp = None
        if spec.acceptance_mlp:
            self.acceptance_mlp = _mlp([spec.zdim, *spec.acceptance_mlp, 1])
            nn.init.zeros_(self.acceptance_mlp[-1].weight)
            nn.init.zeros_(self.acceptance_mlp[-1].bias)
        self.register_buffer("z_ema", torch.tensor(0.5, dtype=torch.float64))
        self.xi = nn.Parameter(torch.zeros(()))  # β = w·sigmoid(ξ), ξ₀ = 0

    @property
    def beta(self) -> Tensor:
        return beta_from_xi(self.xi, self.beta_max)

    def log_acceptance(self, z: Tensor, critic_on_decoded: Tensor) -> Tensor:
        """log a(z) from D(G(z)): z (..., zdim), critic values (...) → (...), nats."""
        extra = None if self.acceptance_mlp is None else self.acceptance_mlp(z).squeeze(-1)
        return log_acceptance(critic_on_decoded, self.beta, self.acceptance_c, extra)

    def log_acceptance_of(self, model: nn.Module, z: Tensor) -> Tensor:
        """log a(z), decoding z: (..., zdim) → (...), nats."""
        return self.log_acceptance(z, model.critic_images(model.image_mean(model.decode(z))))

    def log_f(self, model: nn.Module, z: Tensor, raw: Tensor | None = None) -> Tensor:
        """log f(z) = log N(z; 0, I) + log a(z) (a ∈ (0, 1), so Z ≤ 1), reusing the decoder pass
        `raw` of z when given: (..., zdim) → (...), nats."""
        raw = model.decode(z) if raw is None else raw
        return log_standard_normal(z) + self.log_acceptance(z, model.critic_images(model.image_mean(raw)))

    def elbo_terms(
        self, model: nn.Module, draw: PosteriorDraw, e: Tensor, batch: int, params: TrainParams, n_train: int, ctx
    ) -> dict[str, Tensor]:
        """This rank's terms with LARS's per-image estimate of Z (`resampled.lars_log_z`): the K
        proposals' a(ε_k) plus the image's own a(z_i)·N(z_i)/q(z_i|e_i), an EMA (decay `lars_decay`,
        from `z_ema`) in the forward value and the current estimate's gradient. "kl" sums
        log q(z_i|e_i) − log p(z_i) over E_r, the image's log Z_i included; "log_z" is the batch mean
        of log Z_i (global) and "z_smooth" the sum of the smoothed Ẑ_i over E_r, from which `loss`
        moves the EMA. With `acceptance_trains_decoder` False the critic terms decode with G's
        weights held fixed, so only the reconstruction trains G."""
        fixed = not params.acceptance_trains_decoder
        raw = model.decode(draw.z, weights_fixed=True) if fixed else draw.raw
        d_recon = model.critic_images(model.image_mean(raw))  # (b,)
        eps, fake, d_prior_mine, d_prior = critic_on_prior_samples(
            model, e, batch, params.n_prior_samples, ctx, draw.z_all, fixed=fixed
        )
        log_n = log_standard_normal(draw.z)
        log_a = self.log_acceptance(draw.z, d_recon)  # (b,)
        log_a_prior = self.log_acceptance(eps, d_prior)  # (K,), D(G(ε)) gathered with its gradient
        log_z_i, _ = lars_log_z(
            log_a_prior, log_a, (log_n - draw.log_q).detach(), float(self.z_ema), decay=params.lars_decay
        )
        log_p = log_prior_density(log_n, log_a, log_z_i, self.truncation)
        (s_log_z,) = all_sum(ctx, [log_z_i.detach().sum()])
        return {
            "recon": draw.recon,
            "kl": (draw.log_q - log_p).sum(),
            "log_z": s_log_z / batch,
            "z_smooth": log_z_i.detach().exp().sum(),
            "critic_recon": d_recon.sum(),
            "critic_prior": d_prior_mine.sum(),
            "fake": fake,
        }

    def loss(
        self, model: nn.Module, e: Tensor, t: dict[str, Tensor], batch: int, params: TrainParams, ctx: DistContext
    ) -> tuple[Tensor, dict[str, float]]:
        """Rank r's loss (Algorithm 2's single optimiser, LARS's log Z):
        (W/B)·Σ_{i∈E_r} [−log p(e_i|z_i) + log q(z_i|e_i) − log p(z_i)] + w·(W/m)·Σ R_i, and the
        global metrics, with "z_ema" the EMA of Ẑ after this step (mean of the smoothed Ẑ_i)."""
        n_ranks = ctx.world
        m = min(batch, params.n_prior_samples)
        pen = penalty_rows_sum(model.critic, e, t["fake"], batch, params, ctx)
        loss = n_ranks * t["recon"] / batch + n_ranks * t["kl"] / batch + self.beta_max * (n_ranks * pen / m)
        s_recon, s_kl, s_d_recon, s_d_prior, s_pen, s_z = all_sum(
            ctx, [t["recon"], t["kl"], t["critic_recon"], t["critic_prior"], pen, t["z_smooth"]]
        )
        recon, kl, penalty = s_recon / batch, s_kl / batch, s_pen / m
        return loss, {
            "recon": float(recon),
            "kl": float(kl),
            "log_z": float(t["log_z"]),
            "critic_recon": float(s_d_recon / batch),
            "critic_prior": float(s_d_prior / params.n_prior_samples),
            "penalty": float(penalty),
            "acceptance_c": float(self.acceptance_c.detach()),
            "z_ema": float(s_z / batch),
            "loss": float(recon + kl + self.beta_max * penalty),
        }

    def after_step(self, metrics: dict[str, float]) -> None:
        """LARS: Z_ema ← the batch mean of the smoothed Ẑ_i, after the optimiser's step."""
        self.z_ema.fill_(metrics["z_ema"])

    def sample(
        self, model: nn.Module, z0: Tensor, ctx, params: MALAParams, *, generator, device, progress=False, callback=None
    ) -> tuple[Tensor, dict]:
        """The sampler: exact samples (n_samples, zdim) by rejection from N(0, I)
        (`resampled.rejection_sample`, LARS's truncated one with a finite `truncation`), then
        MALA from them only if `params.n_steps` > 0 (the latent GAN's z₀ is not used); returns
        (z, the sampler's metrics)."""
        with torch.inference_mode():
            z, info = rejection_sample(
                lambda z: self.log_acceptance_of(model, z),
                model.zdim,
                params.n_samples,
                truncation=self.truncation,
                generator=generator,
                device=device,
            )
        metrics = {"sampler": "exact (rejection)", "rejection_acceptance": info["acceptance_rate"]}
        metrics["mala_acceptance"] = None
        if params.n_steps > 0:
            z, acceptance, _ = mala(
                shard_rows(ctx, model.energy_and_grad),
                z,
                params.n_steps,
                params.step_size,
                generator=generator,
                progress=progress,
                callback=callback,
            )
            metrics.update(sampler="exact (rejection) + MALA", mala_acceptance=float(acceptance))
        return z, metrics
