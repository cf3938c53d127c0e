"""The VampPrior (Tomczak & Welling 2018, "VAE with a VampPrior"): the mixture of the encoder's
own posteriors at K learnable pseudo-inputs u_k,

    p(z) = (1/K)·Σ_k q(z | u_k),   log p(z) = logsumexp_k log q(z | u_k) − log K   (nats),

normalised by construction (log Z = 0), with exact samples: k ~ U{1..K}, then z ~ q(z | u_k).
q is the model's posterior family (`model.log_q`, `model.sample_q`): a diagonal Normal, or one
truncated at ±2σ, whose mixture is zero outside the union of the K boxes μ(u_k) ± 2σ(u_k), so the
ELBO is −∞ (and training stops) as soon as a posterior draw falls outside all of them; the authors
use Normal posteriors. Planar flows are refused: the density of a flowed posterior at given points
is not available (`VAEPP.log_q`).

Pseudo-inputs as in the authors' code (github.com/jmtomczak/vae_vampprior, models/Model.py
`add_pseudoinputs`, utils/load_data.py): u = hardtanh_[0, 1](W·I_K), a bias-free linear layer on a
fixed identity input, i.e. one free image per component clipped to [0, 1] (here the weight is
stored as K images (K, C, H, W)), its entries drawn from N(m, s²) with the authors' per-dataset
constants: m = 0.05, s = 0.01 for their binary data (MNIST, Omniglot), taken here for a Bernoulli
likelihood, and m = 0.4, s = 0.05 for their grey-level and colour data (histopathology,
CIFAR-10), taken here for a discretised-logistic one. Their option of starting from training
images plus noise is not followed. K: `model.vampprior_components` (authors: 500).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vaepp.distributed import DistContext
from vaepp.optim import NonFiniteLossError
from vaepp.posteriors import log_normal_components

from .standard import PosteriorDraw, exact_prior_loss, exact_prior_terms

if TYPE_CHECKING:
    from vaepp.config import MALAParams, TrainParams
    from vaepp.spec import ModelSpec

# The authors' initial pseudo-input entries N(mean, std²) (utils/load_data.py), by likelihood.
PSEUDO_INPUT_INIT = {"bernoulli": (0.05, 0.01), "logistic": (0.4, 0.05)}


class VampPrior(nn.Module):
    """p(z) = (1/K)·Σ_k q(z | u_k) with u_k = hardtanh_[0, 1](w_k), w (K, C, H, W) learnable."""

    kind = "vampprior"
    has_critic = False
    algorithms = ("naive", "vaepp")  # no critic: both train it the same way
    exact_log_z = True  # a mixture of normalised densities: log Z = 0
    has_certificate = False
    truncation = None

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.n_flows > 0:
            raise ValueError(
                f"model.n_flows = {spec.n_flows}: a VampPrior is a mixture of the encoder's posteriors, whose "
                "density at given points planar flows do not give; set model.n_flows: 0"
            )
        mean, std = PSEUDO_INPUT_INIT[spec.likelihood]
        self.pseudo_weight = nn.Parameter(torch.empty(spec.vampprior_components, *spec.image_shape).normal_(mean, std))
        # the last encoding under inference mode: (id of the model, copies of the weights it read,
        # the components)
        self._encoded: tuple[int, list[Tensor], tuple[Tensor, Tensor]] | None = None

    @property
    def n_components(self) -> int:
        return self.pseudo_weight.shape[0]

    @property
    def beta(self) -> Tensor:
        return torch.zeros(())

    def pseudo_inputs(self) -> Tensor:
        """u = hardtanh_[0, 1](w): the K pseudo-inputs as images (K, C, H, W) in [0, 1]."""
        return F.hardtanh(self.pseudo_weight, 0.0, 1.0)

    def components(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """The mixture's components q(z | u_k): the encoder's μ, log σ at the pseudo-inputs, (K, zdim) each.

        Under inference mode (the NLL's chunks, AIS's temperatures, the monitor) they are encoded
        once and reused while the pseudo-inputs and the encoder's weights equal, value for value,
        the copies kept with them (an optimiser step or a loaded state makes it encode again); with
        gradients they are encoded at every call, as training needs. Equal inputs to the same
        encoder pass give the same values, so reuse changes no number."""
        if not torch.is_inference_mode_enabled():
            return model.encode(self.pseudo_inputs())
        weights = [self.pseudo_weight, *model.encoder.parameters()]
        kept = self._encoded
        fresh = (
            kept is not None
            and kept[0] == id(model)
            and len(kept[1]) == len(weights)
            and all(_same(a, b) for a, b in zip(kept[1], weights, strict=True))
        )
        if not fresh:
            self._encoded = (id(model), [w.detach().clone() for w in weights], model.encode(self.pseudo_inputs()))
        return self._encoded[2]

    def log_f(self, model: nn.Module, z: Tensor, raw: Tensor | None = None) -> Tensor:
        """log p(z) = logsumexp_k log q(z | u_k) − log K: (..., zdim) → (...), nats (exact: log Z = 0;
        no decoder pass, `raw` unused). Evaluated as (..., K) against all components at once: for
        Normal posteriors by two matrix products in float64 (`posteriors.log_normal_components`),
        for truncated ones point by point with their boxes."""
        mu, log_sigma = self.components(model)
        if model.spec.posterior == "normal":
            log_q = log_normal_components(z, mu, log_sigma)  # (..., K), float64
        else:
            log_q = model.log_q(z.unsqueeze(-2), mu, log_sigma)  # (..., K)
        return (torch.logsumexp(log_q, dim=-1) - math.log(self.n_components)).to(z.dtype)

    def elbo_terms(
        self, model: nn.Module, draw: PosteriorDraw, e: Tensor, batch: int, params: TrainParams, n_train: int, ctx
    ) -> dict[str, Tensor]:
        """This rank's sums "recon" of −log p(e_i|z_i) and "kl" of log q(z_i|e_i) − log p(z_i)."""
        return exact_prior_terms(ctx, draw, self.log_f(model, draw.z))

    def loss(
        self, model: nn.Module, e: Tensor, t: dict[str, Tensor], batch: int, params: TrainParams, ctx: DistContext
    ) -> tuple[Tensor, dict[str, float]]:
        """Rank r's loss (W/B)·Σ [−log p(e_i|z_i) + log q(z_i|e_i) − log p(z_i)] and the global batch's
        metrics in nats. A draw outside every truncated component (log p = −∞) stops with a
        NonFiniteLossError saying so."""
        loss, metrics = exact_prior_loss(t, batch, ctx)
        if model.spec.posterior == "truncated" and math.isinf(metrics["kl"]):
            raise NonFiniteLossError(
                "VampPrior with truncated posteriors: a posterior draw fell outside every component's "
                "±2σ box, so log p(z) = −inf; use model.posterior: normal"
            )
        return loss, metrics

    def after_step(self, metrics: dict[str, float]) -> None:
        """Nothing to update outside the optimiser."""

    def sample(
        self, model: nn.Module, z0: Tensor, ctx, params: MALAParams, *, generator, device, progress=False, callback=None
    ) -> tuple[Tensor, dict]:
        """The sampler: exact draws (n_samples, zdim), k ~ U{1..K} then z ~ q(z | u_k) by the model's
        own posterior sampler, all from `generator` (the latent GAN's z₀ is not used); returns
        (z, the sampler's metrics)."""
        with torch.no_grad():
            k = torch.randint(self.n_components, (params.n_samples,), generator=generator, device=device)
            mu, log_sigma = self.components(model)
            z, _ = model.sample_q(mu[k], log_sigma[k], 1, generator=generator)  # (1, n_samples, zdim)
        return z[0], {"mala_acceptance": None, "sampler": "VampPrior mixture"}


def _same(kept: Tensor, now: Tensor) -> bool:
    """The kept copy is the weight as it is now: the same device, dtype and shape, and equal values
    (`torch.equal` alone calls a float32 tensor equal to its float64 copy)."""
    return kept.device == now.device and kept.dtype == now.dtype and kept.shape == now.shape and torch.equal(kept, now)
