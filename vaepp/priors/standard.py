"""The standard prior N(z; 0, I) of the plain VAE: log Z = 0 exactly, no critic, exact samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor

from vaepp.distributed import DistContext, all_sum, check_same_input
from vaepp.posteriors import log_standard_normal

if TYPE_CHECKING:
    from vaepp.config import MALAParams, TrainParams
    from vaepp.spec import ModelSpec


@dataclass(frozen=True)
class PosteriorDraw:
    """One training step's posterior draw, shared by every prior's ELBO terms: z_i ~ q(z|e_i) for
    the whole global batch (z_all (B, zdim), log_q_all (B,)), this rank's rows of them (z (b, zdim),
    log_q (b,)), the decoder's raw output on those rows and the sum of −log p(e_i|z_i) over them."""

    z_all: Tensor
    log_q_all: Tensor
    z: Tensor
    log_q: Tensor
    raw: Tensor
    recon: Tensor


def exact_prior_terms(ctx, draw: PosteriorDraw, log_prior: Tensor) -> dict[str, Tensor]:
    """A normalised prior's (log Z = 0) ELBO terms on this rank: the sums "recon" of −log p(e_i|z_i)
    and "kl" of log q(z_i|e_i) − log p(z_i), given log p at this rank's draws (b,)."""
    check_same_input(ctx, draw.z_all)
    return {"recon": draw.recon, "kl": (draw.log_q - log_prior).sum()}


def exact_prior_loss(t: dict[str, Tensor], batch: int, ctx: DistContext) -> tuple[Tensor, dict[str, float]]:
    """Rank r's loss (W/B)·Σ [−log p(e_i|z_i) + log q(z_i|e_i) − log p(z_i)] for a normalised prior,
    and the global batch's metrics in nats."""
    n_ranks = ctx.world
    s_recon, s_kl = all_sum(ctx, [t["recon"], t["kl"]])
    recon, kl = s_recon / batch, s_kl / batch
    loss = n_ranks * t["recon"] / batch + n_ranks * t["kl"] / batch
    return loss, {"recon": float(recon), "kl": float(kl), "log_z": 0.0, "loss": float(recon + kl)}


class StandardPrior(nn.Module):
    """p(z) = N(z; 0, I): β ≡ 0, log Z = 0."""

    kind = "standard"
    has_critic = False
    algorithms = ("naive", "vaepp")  # no critic: both train it the same way
    exact_log_z = True  # log Z = 0: no estimate needed
    has_certificate = False
    truncation = None

    def __init__(self, spec: ModelSpec):
        super().__init__()

    @property
    def beta(self) -> Tensor:
        return torch.zeros(())

    def log_f(self, model: nn.Module, z: Tensor, raw: Tensor | None = None) -> Tensor:
        """log N(z; 0, I): (..., zdim) → (...), nats; no decoder or critic pass."""
        return log_standard_normal(z)

    def elbo_terms(
        self, model: nn.Module, draw: PosteriorDraw, e: Tensor, batch: int, params: TrainParams, n_train: int, ctx
    ) -> dict[str, Tensor]:
        """This rank's sums "recon" of −log p(e_i|z_i) and "kl" of log q(z_i|e_i) − log N(z_i; 0, I)."""
        return exact_prior_terms(ctx, draw, log_standard_normal(draw.z))

    def loss(
        self, model: nn.Module, e: Tensor, t: dict[str, Tensor], batch: int, params: TrainParams, ctx: DistContext
    ) -> tuple[Tensor, dict[str, float]]:
        """Rank r's loss (W/B)·Σ [−log p(e_i|z_i) + log q(z_i|e_i) − log N(z_i; 0, I)] and the global
        batch's metrics in nats."""
        return exact_prior_loss(t, batch, ctx)

    def after_step(self, metrics: dict[str, float]) -> None:
        """Nothing to update outside the optimiser."""

    def sample(
        self, model: nn.Module, z0: Tensor, ctx, params: MALAParams, *, generator, device, progress=False, callback=None
    ) -> tuple[Tensor, dict]:
        """The sampler: z ~ N(0, I) exactly, (n_samples, zdim), from `generator` (the latent GAN's
        z₀ is not used); returns (z, the sampler's metrics)."""
        z = torch.randn(params.n_samples, model.zdim, generator=generator, device=device)
        return z, {"mala_acceptance": None, "sampler": "prior N(0, I)"}
