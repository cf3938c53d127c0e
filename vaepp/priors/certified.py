"""The bounded pull-back prior: p(z) = N(z; 0, I)·a(z)/Z with a(z) = sigmoid(c − β·D(G(z)) + h(z)).

A resampled prior (Bauer & Mnih 2019) whose acceptance logit is the critic on decoded images: a is
bounded, so Z = E_{N(0, I)}[a] ≤ 1 has a certificate from N(0, I) draws alone
(`vaepp.resampled.log_z_certificate`) and p has exact samples by rejection
(`vaepp.resampled.rejection_sample`). Training uses LARS's per-image estimate of Z
(`vaepp.resampled.lars_log_z`) with Algorithm 2's single optimiser. As β → 0 and c → ∞ it becomes
N(0, I).

`ResampledPrior` holds what every resampled prior N(z; 0, I)·a(z)/Z here shares, written once: log f,
LARS's estimator terms and EMA, the loss (with the critic's penalty when a critic enters a), the
certificate's flags and the exact sampler; `CertifiedPrior` and `priors.lars.LarsPrior` differ only in
their log a(z).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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


class ResampledPrior(nn.Module, ABC):
    """What every resampled prior p(z) = N(z; 0, I)·a(z)/Z, a(z) = sigmoid(ℓ(z)) ∈ (0, 1), shares
    (Bauer & Mnih 2019): log f = log N + log a, LARS's training estimate of Z with its running Ẑ in
    the buffer `z_ema` (starts at ½), the loss (with the critic's penalty when a critic enters a),
    the certificate on Z ≤ 1 (`vaepp.log_z_protocol`) and exact samples by rejection. A subclass
    defines only its acceptance: `log_acceptance(z, cond)`, what it reads of z besides z itself
    (`_decoded`, `_acceptance_from`) and its prior-sample pass in training (`_acceptance_inputs`)."""

    exact_log_z = False
    has_certificate = True  # Z ≤ 1 certified from N(0, I) draws (`vaepp.log_z_protocol`)
    truncation: int | None = None  # LARS's truncated sampler (at most T proposals), from the spec

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.truncation = spec.truncation
        self.register_buffer("z_ema", torch.tensor(0.5, dtype=torch.float64))

    # ----- the acceptance: what a subclass defines -----------------------------------------------
    @abstractmethod
    def log_acceptance(self, z: Tensor, cond: Tensor | None) -> Tensor:
        """log a(z) = log sigmoid(ℓ(z)) given what ℓ reads beside z (`cond`): z (..., zdim) → (...), nats."""

    @abstractmethod
    def _decoded(self, model: nn.Module, z: Tensor, raw: Tensor | None) -> Tensor | None:
        """The decoder pass of z that the acceptance reads (`raw` when given), or None if it reads none."""

    @abstractmethod
    def _acceptance_from(self, model: nn.Module, z: Tensor, raw: Tensor | None) -> Tensor:
        """log a(z) from z (..., zdim) and its decoder pass `raw` (`_decoded`) → (...), nats."""

    @abstractmethod
    def _acceptance_inputs(
        self, model: nn.Module, draw: PosteriorDraw, e: Tensor, batch: int, params: TrainParams, ctx
    ) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, Tensor]]:
        """One training step's K prior draws ε_k ~ N(0, I) (K, zdim), drawn whole on every rank after the
        posterior's, and what `log_acceptance` reads beside z at this rank's posterior rows and at
        the K draws, plus this rank's extra terms for `loss`."""

    # ----- shared ----------------------------------------------------------------------------------
    @property
    def beta(self) -> Tensor:
        """β = 0: no critic in the acceptance (a prior with a critic overrides it)."""
        return torch.zeros(())

    def log_acceptance_of(self, model: nn.Module, z: Tensor) -> Tensor:
        """log a(z), decoding z when the acceptance reads G(z): (..., zdim) → (...), nats."""
        return self._acceptance_from(model, z, self._decoded(model, z, None))

    def log_f(self, model: nn.Module, z: Tensor, raw: Tensor | None = None) -> Tensor:
        """log f(z) = log N(z; 0, I) + log a(z) (a ∈ (0, 1), so Z ≤ 1), reusing the decoder pass
        `raw` of z when given: (..., zdim) → (...), nats."""
        raw = self._decoded(model, z, raw)
        return log_standard_normal(z) + self._acceptance_from(model, z, raw)

    def elbo_terms(
        self, model: nn.Module, draw: PosteriorDraw, e: Tensor, batch: int, params: TrainParams, n_train: int, ctx
    ) -> dict[str, Tensor]:
        """This rank's terms with LARS's per-image estimate of Z (`resampled.lars_log_z`): the K
        proposals' a(ε_k) plus the image's own a(z_i)·N(z_i)/q(z_i|e_i), an EMA (decay `lars_decay`,
        from `z_ema`) in the forward value and the current estimate's gradient. "kl" sums
        log q(z_i|e_i) − log p(z_i) over E_r, the image's log Z_i included; "log_z" is the batch mean
        of log Z_i (global) and "z_smooth" the sum of the smoothed Ẑ_i over E_r, from which `loss`
        moves the EMA; then the acceptance's own terms (`_acceptance_inputs`)."""
        eps, cond, cond_prior, extra = self._acceptance_inputs(model, draw, e, batch, params, ctx)
        log_n = log_standard_normal(draw.z)
        log_a = self.log_acceptance(draw.z, cond)  # (b,)
        log_a_prior = self.log_acceptance(eps, cond_prior)  # (K,)
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
            **extra,
        }

    def _extra_metrics(self) -> dict[str, float]:
        """The acceptance's own parameters worth logging each step."""
        return {}

    def loss(
        self, model: nn.Module, e: Tensor, t: dict[str, Tensor], batch: int, params: TrainParams, ctx: DistContext
    ) -> tuple[Tensor, dict[str, float]]:
        """Rank r's loss (one optimiser, LARS's log Z):
        (W/B)·Σ_{i∈E_r} [−log p(e_i|z_i) + log q(z_i|e_i) − log p(z_i)], plus w·(W/m)·Σ R_i (Algorithm
        2's critic penalty) when a critic enters a, and the global metrics, with "z_ema" the EMA of Ẑ
        after this step (mean of the smoothed Ẑ_i)."""
        n_ranks = ctx.world
        m = min(batch, params.n_prior_samples)
        pen = penalty_rows_sum(model.critic, e, t["fake"], batch, params, ctx) if self.has_critic else None
        loss = n_ranks * t["recon"] / batch + n_ranks * t["kl"] / batch
        if pen is None:
            s_recon, s_kl, s_z = all_sum(ctx, [t["recon"], t["kl"], t["z_smooth"]])
            recon, kl = s_recon / batch, s_kl / batch
            metrics = {"recon": float(recon), "kl": float(kl), "log_z": float(t["log_z"])}
            return loss, {**metrics, **self._extra_metrics(), "z_ema": float(s_z / batch), "loss": float(recon + kl)}
        loss = loss + self.beta_max * (n_ranks * pen / m)
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
            **self._extra_metrics(),
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


class CertifiedPrior(ResampledPrior):
    """N(z; 0, I)·sigmoid(c − β·D(G(z)) + h(z))/Z: β = w·sigmoid(ξ), c learnable (from
    `acceptance_c_init`), h an MLP on z with hidden sizes `acceptance_mlp` (none when empty) whose
    output layer starts at zero; LARS's running Ẑ in the buffer `z_ema` (starts at ½). Its
    acceptance reads the critic on decoded images, so training adds the critic's prior-sample pass
    and its penalty (Algorithm 2)."""

    kind = "certified"
    has_critic = True
    algorithms = ("vaepp",)

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.beta_max = spec.beta_max
        self.acceptance_c = nn.Parameter(torch.tensor(float(spec.acceptance_c_init)))
        self.acceptance_mlp = None
        if spec.acceptance_mlp:
            self.acceptance_mlp = _mlp([spec.zdim, *spec.acceptance_mlp, 1])
            nn.init.zeros_(self.acceptance_mlp[-1].weight)
            nn.init.zeros_(self.acceptance_mlp[-1].bias)
        self.xi = nn.Parameter(torch.zeros(()))  # β = w·sigmoid(ξ), ξ₀ = 0

    @property
    def beta(self) -> Tensor:
        return beta_from_xi(self.xi, self.beta_max)

    def log_acceptance(self, z: Tensor, critic_on_decoded: Tensor) -> Tensor:
        """log a(z) from D(G(z)): z (..., zdim), critic values (...) → (...), nats."""
        extra = None if self.acceptance_mlp is None else self.acceptance_mlp(z).squeeze(-1)
        return log_acceptance(critic_on_decoded, self.beta, self.acceptance_c, extra)

    def _decoded(self, model: nn.Module, z: Tensor, raw: Tensor | None) -> Tensor:
        """G's raw output at z (..., zdim): `raw` when given, else one decoder pass."""
        return model.decode(z) if raw is None else raw

    def _acceptance_from(self, model: nn.Module, z: Tensor, raw: Tensor | None) -> Tensor:
        """log a(z) with D(G(z)) from the decoder pass `raw` of z: (..., zdim) → (...), nats."""
        return self.log_acceptance(z, model.critic_images(model.image_mean(raw)))

    def _acceptance_inputs(
        self, model: nn.Module, draw: PosteriorDraw, e: Tensor, batch: int, params: TrainParams, ctx
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """D(G(z_i)) on this rank's rows (b,) and D(G(ε_k)) of all K gathered with its gradient (K,)
        (`pullback.critic_on_prior_samples`), and the terms "critic_recon", "critic_prior" (sums
        over this rank's rows) and "fake" (G(ε_k) on them, its penalty pairs first) for the
        penalty. With `acceptance_trains_decoder` False the critic terms decode with G's weights
        held fixed, so only the reconstruction trains G."""
        fixed = not params.acceptance_trains_decoder
        raw = model.decode(draw.z, weights_fixed=True) if fixed else draw.raw
        d_recon = model.critic_images(model.image_mean(raw))  # (b,)
        eps, fake, d_prior_mine, d_prior = critic_on_prior_samples(
            model, e, batch, params.n_prior_samples, ctx, draw.z_all, fixed=fixed
        )
        extra = {"critic_recon": d_recon.sum(), "critic_prior": d_prior_mine.sum(), "fake": fake}
        return eps, d_recon, d_prior, extra

    def _extra_metrics(self) -> dict[str, float]:
        return {"acceptance_c": float(self.acceptance_c.detach())}
