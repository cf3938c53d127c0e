"""The pull-back prior (paper eq. 4) and what every prior with a critic shares.

    f_λ(z) = N(z; 0, I) · exp(−β·D(G(z))),   p_λ(z) = f_λ(z) / Z,   Z = ∫ f_λ(z) dz,
    β = w · sigmoid(ξ), ξ learnable (ξ₀ = 0), w = `beta_max`.

log f keeps the Gaussian constant, so Z = 1 exactly at β = 0 and VAEPP reduces to a plain VAE.
Training estimates log Z by log Z_train = log(½(Ẑ_N + Ẑ_q)) (Algorithms 1-2, line 5); samples come
from the latent GAN followed by MALA (paper §4.3).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor

from vaepp.distributed import DistContext, all_sum, check_same_input, gather_rows, row_range, shard_rows
from vaepp.mala import mala
from vaepp.penalties import draw_alpha, penalty_sum
from vaepp.posteriors import log_standard_normal

from .standard import PosteriorDraw

if TYPE_CHECKING:
    from vaepp.config import MALAParams, TrainParams
    from vaepp.spec import ModelSpec


def beta_from_xi(xi: Tensor, beta_max: float) -> Tensor:
    """β = w·sigmoid(ξ) ∈ (0, w)."""
    return beta_max * torch.sigmoid(xi)


def log_f(z: Tensor, critic_on_decoded: Tensor, beta: Tensor) -> Tensor:
    """log f_λ(z) = log N(z; 0, I) − β·D(G(z)), in nats. z: (..., zdim), critic values (...)."""
    return log_standard_normal(z) - beta * critic_on_decoded


def logmeanexp(x: Tensor, dim: int = -1) -> Tensor:
    """log((1/n) Σ exp(x)) along `dim`, stable for any range of x."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def log_z_train(
    beta: Tensor,
    critic_on_prior_samples: Tensor,
    log_f_posterior: Tensor,
    log_q_posterior: Tensor,
    n_train: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The training estimate log Z_train = log(½(Ẑ_N + Ẑ_q)) (Algorithms 1-2, line 5).

    Ẑ_N = mean_k exp(−β·D(G(ε_k))), ε_k ~ N(0, I): unbiased for Z (critic_on_prior_samples (K,)).
    Ẑ_q = mean_i f(z_i)·N / q(z_i | e_i), z_i ~ q(z | e_i), N = n_train (the real training-set
    size): the paper's q-based term; with full-support q its mean is N·Z, not Z, and with ±2σ
    truncation it can sit far below; it is NOT an upper bound (see `vaepp.logz.log_z_q_based`).
    Gradients flow through both terms. Returns (log Z_train, log Ẑ_N, log Ẑ_q), scalars.
    """
    log_z_n = logmeanexp(-beta * critic_on_prior_samples, dim=0)
    log_z_q = logmeanexp(log_f_posterior - log_q_posterior, dim=0) + math.log(n_train)
    log_z = torch.logaddexp(log_z_n, log_z_q) - math.log(2.0)
    return log_z, log_z_n, log_z_q


# ----- shared by the priors with a critic (pullback, certified) ------------------------------------
def prior_rows(ctx: DistContext, batch: int, n_prior: int) -> list[list[int]]:
    """For every rank, the global indices of the prior samples it decodes: its penalty pairs
    i ∈ E_r, i < m = min(B, K), first, then its share of the rows m..K−1."""
    m = min(batch, n_prior)
    rows = []
    for r in range(ctx.world):
        a, b = row_range(batch, r, ctx.world)
        c, d = row_range(n_prior - m, r, ctx.world)
        rows.append(list(range(min(a, m), min(b, m))) + list(range(m + c, m + d)))
    return rows


def critic_on_prior_samples(
    model: nn.Module, e: Tensor, batch: int, n_prior: int, ctx: DistContext, z_all: Tensor, fixed: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """K prior draws ε_k ~ N(0, I) (drawn whole on every rank, after the posterior's), decoded on
    this rank's rows (`prior_rows`) and scored by the critic. fixed: G's weights held fixed.
    Returns ε (K, zdim), G(ε_k) on this rank's rows (k_r, C, H, W), their D (k_r,) and D(G(ε)) of
    all K gathered with its gradient (K,)."""
    eps = torch.randn(n_prior, model.zdim, device=e.device, dtype=e.dtype)
    check_same_input(ctx, z_all, eps)
    rows = prior_rows(ctx, batch, n_prior)
    fake = model.image_mean(model.decode(eps[rows[ctx.rank]], weights_fixed=fixed))  # (k_r, C, H, W)
    d_prior_mine = model.critic_images(fake)  # (k_r,)
    order = torch.tensor([i for r in rows for i in r], device=e.device)
    d_prior = torch.empty(n_prior, device=e.device, dtype=d_prior_mine.dtype).index_copy(
        0, order, gather_rows(ctx, d_prior_mine, [len(r) for r in rows])
    )  # (K,)
    return eps, fake, d_prior_mine, d_prior


def penalty_rows_sum(critic, e: Tensor, fake: Tensor, batch: int, params: TrainParams, ctx: DistContext) -> Tensor:
    """Σ R_i over this rank's penalty pairs (e_i, G(ε_i)), i ∈ E_r, i < m = min(B, K); the α of
    all m pairs are drawn on every rank, as one process draws them."""
    m = min(batch, params.n_prior_samples)
    start, stop = row_range(batch, ctx.rank, ctx.world)
    n_mine = max(0, min(stop, m) - start)
    alpha = draw_alpha(params.penalty, m, e)
    return penalty_sum(
        critic,
        e[:n_mine],
        fake[:n_mine],
        None if alpha is None else alpha[start : start + n_mine],
        params.penalty,
        k=params.penalty_k,
        p=params.penalty_p,
    )


class PullbackPrior(nn.Module):
    """p(z) ∝ N(z; 0, I)·exp(−β·D(G(z))) with β = w·sigmoid(ξ); trained with Algorithm 1 or 2."""

    kind = "pullback"
    has_critic = True
    algorithms = ("naive", "vaepp")
    exact_log_z = False  # log Z is estimated (`vaepp.log_z_protocol`)
    has_certificate = False
    truncation = None

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.beta_max = spec.beta_max
        self.xi = nn.Parameter(torch.zeros(()))  # β = w·sigmoid(ξ), ξ₀ = 0

    @property
    def beta(self) -> Tensor:
        return beta_from_xi(self.xi, self.beta_max)

    def log_f(self, model: nn.Module, z: Tensor, raw: Tensor | None = None) -> Tensor:
        """log f(z) = log N(z; 0, I) − β·D(G(z)), reusing the decoder pass `raw` of z when given:
        (..., zdim) → (...), nats."""
        raw = model.decode(z) if raw is None else raw
        return log_f(z, model.critic_images(model.image_mean(raw)), self.beta)

    def elbo_terms(
        self, model: nn.Module, draw: PosteriorDraw, e: Tensor, batch: int, params: TrainParams, n_train: int, ctx
    ) -> dict[str, Tensor]:
        """This rank's sums "recon", "kl" (of log q − log f), the global log Z_train, log Ẑ_N and
        log Ẑ_q (`log_z_train`), the sums "critic_recon" of D(G(z_i)) and "critic_prior" of D(G(ε_k))
        over this rank's rows, and "fake": G(ε_k) on those rows (its penalty pairs first)."""
        beta = self.beta
        d_recon = model.critic_images(model.image_mean(draw.raw))  # (b,)
        log_f_z = log_f(draw.z, d_recon, beta)  # (b,)
        _, fake, d_prior_mine, d_prior = critic_on_prior_samples(
            model, e, batch, params.n_prior_samples, ctx, draw.z_all, fixed=False
        )
        log_z, log_z_n, log_z_q = log_z_train(
            beta, d_prior, gather_rows(ctx, log_f_z, n=batch), draw.log_q_all, n_train
        )
        return {
            "recon": draw.recon,
            "kl": (draw.log_q - log_f_z).sum(),
            "log_z": log_z,
            "log_z_n": log_z_n,
            "log_z_q": log_z_q,
            "critic_recon": d_recon.sum(),
            "critic_prior": d_prior_mine.sum(),
            "fake": fake,
        }

    def loss(
        self, model: nn.Module, e: Tensor, t: dict[str, Tensor], batch: int, params: TrainParams, ctx: DistContext
    ) -> tuple[Tensor, dict[str, float]]:
        """Rank r's loss of the model step: (W/B)·Σ [−log p(e_i|z_i) + log q − log f] + log Z_train,
        plus w·(W/m)·Σ R_i with Algorithm 2; the global batch's metrics in nats."""
        n_ranks = ctx.world
        log_z = t["log_z"]
        s_recon, s_kl, s_d_recon, s_d_prior = all_sum(ctx, [t["recon"], t["kl"], t["critic_recon"], t["critic_prior"]])
        recon, kl = s_recon / batch, s_kl / batch + log_z.detach()
        clamped = params.clamp_kl and bool(kl < 0.0)  # the authors' clamp at ≥ 0: value 0, gradient 0
        kl_term = 0.0 * log_z if clamped else n_ranks * t["kl"] / batch + log_z
        loss = n_ranks * t["recon"] / batch + kl_term
        loss_value = recon + (0.0 * kl if clamped else kl)
        metrics = {
            "recon": float(recon),
            "kl": float(kl),
            "log_z": float(log_z.detach()),
            "log_z_n": float(t["log_z_n"].detach()),
            "log_z_q": float(t["log_z_q"].detach()),
            "critic_recon": float(s_d_recon / batch),
            "critic_prior": float(s_d_prior / params.n_prior_samples),
        }
        if params.algorithm == "vaepp":
            m = min(batch, params.n_prior_samples)
            pen = penalty_rows_sum(model.critic, e, t["fake"], batch, params, ctx)
            loss = loss + self.beta_max * (n_ranks * pen / m)
            (s_pen,) = all_sum(ctx, [pen])
            penalty = s_pen / m
            loss_value = loss_value + self.beta_max * penalty
            metrics["penalty"] = float(penalty)
        metrics["loss"] = float(loss_value)
        return loss, metrics

    def after_step(self, metrics: dict[str, float]) -> None:
        """Nothing to update outside the optimiser."""

    def sample(
        self, model: nn.Module, z0: Tensor, ctx, params: MALAParams, *, generator, device, progress=False, callback=None
    ) -> tuple[Tensor, dict]:
        """The sampler of paper §4.3: MALA for `params.n_steps` steps on E(z) = β·D(G(z)) + ½‖z‖²
        from the latent GAN's z₀ (n_samples, zdim), its noise from `generator`, the chains' energy
        gradients sharded over the ranks; returns (z, the sampler's metrics)."""
        z, acceptance, stats = mala(
            shard_rows(ctx, model.energy_and_grad),
            z0.clone(),
            params.n_steps,
            params.step_size,
            generator=generator,
            progress=progress,
            callback=callback,
        )
        return z, {
            "mala_acceptance": float(acceptance),
            "sampler": "latent GAN + MALA",
            **{f"mala_{k}": v for k, v in stats.items() if isinstance(v, (int, float))},
        }
