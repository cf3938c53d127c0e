"""The VAEPP model: encoder q(z|e), decoder p(x|z) with mean G(z), critic D, and the prior p(z).

The prior is one module of `vaepp.priors`, chosen by `ModelSpec.prior`: with "standard" the model
is the plain VAE with prior N(0, I) (β ≡ 0, log Z = 0), so the baseline is this same code.
Shapes: images (B, C, H, W) in [0, 1]; latents (..., zdim); densities in nats.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .likelihoods import bernoulli_log_prob, discretized_logistic_log_prob
from .mala import energy_from_log_f
from .nets import build_networks, zero_output_layers
from .posteriors import (
    LOG_2PI,
    LOG_TRUNCATED_MASS,
    PlanarFlows,
    log_posterior,
    sample_standard,
)
from .priors import build_prior
from .spec import ModelSpec

LOGISTIC_LOG_SCALE_MIN = -7.0  # PixelCNN++'s floor: bins stay resolvable in float32


class VAEPP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.zdim = spec.zdim
        c = spec.image_shape[0]
        n_out = 2 if spec.likelihood == "logistic" and spec.logistic_scale == "per_pixel" else 1
        self.encoder, self.decoder, self.critic = build_networks(
            spec.arch,
            spec.image_shape,
            spec.zdim,
            hidden=list(spec.hidden),
            channels=list(spec.channels),
            n_out=n_out,
        )
        if spec.init == "zero_heads":
            zero_output_layers(self.encoder, self.decoder)
        self.prior = build_prior(spec)  # before the flows: the order in which weights draw their init
        self.n_channels = c
        self.flows = PlanarFlows(spec.zdim, spec.n_flows) if spec.n_flows > 0 else None
        # The paper's "learnable scalar γ": one log-scale shared by every pixel (FID runs).
        self.log_gamma = (
            nn.Parameter(torch.zeros(())) if spec.likelihood == "logistic" and spec.logistic_scale == "scalar" else None
        )

    # ----- parameters of the prior -------------------------------------------------------
    @property
    def beta(self) -> Tensor:
        """The prior's β: w·sigmoid(ξ) with a critic; exactly 0 for N(0, I)."""
        return self.prior.beta

    def model_parameters(self) -> list[nn.Parameter]:
        """Encoder, decoder, flows, γ and the prior's parameters: everything but the critic."""
        critic_ids = {id(p) for p in self.critic.parameters()}
        return [p for p in self.parameters() if id(p) not in critic_ids]

    # ----- posterior ---------------------------------------------------------------------
    def encode(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """e (B, C, H, W) → μ, log σ, each (B, zdim); log σ is floored at `log_sigma_min`."""
        mu, log_sigma = self.encoder(e)
        return mu, log_sigma.clamp(min=self.spec.log_sigma_min)

    def sample_q(
        self, mu: Tensor, log_sigma: Tensor, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """n reparameterised draws per posterior: z (n, B, zdim) and log q(z | e) (n, B), nats."""
        eps = sample_standard(
            self.spec.posterior, (n, *mu.shape), device=mu.device, dtype=mu.dtype, generator=generator
        )
        z = mu + torch.exp(log_sigma) * eps  # (n, B, zdim)
        # log q from ε directly: Σ_d [−ε²/2 − log σ_d − log(2π)/2] (− Z·log 0.9545 if truncated).
        log_q = (-0.5 * eps.square() - log_sigma - 0.5 * LOG_2PI).sum(-1)
        if self.spec.posterior == "truncated":
            log_q = log_q - self.zdim * LOG_TRUNCATED_MASS
        if self.flows is not None:
            z, log_det = self.flows(z)
            log_q = log_q - log_det
        return z, log_q

    def log_q(self, z: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
        """log q(z | e) of given points z (n, B, zdim) → (n, B). Not available with flows (the
        planar maps have no closed-form inverse); use the log q returned by `sample_q`."""
        if self.flows is not None:
            raise ValueError("log q of arbitrary points is not available with planar flows")
        return log_posterior(self.spec.posterior, z, mu, log_sigma)

    # ----- decoder -----------------------------------------------------------------------
    def decode(self, z: Tensor, *, weights_fixed: bool = False) -> Tensor:
        """z (..., zdim) → raw decoder output (..., n_out·C, H, W). weights_fixed: G's weights are
        detached, so the output's gradient reaches z but not G (a certified prior's acceptance
        that does not train the decoder)."""
        lead = z.shape[:-1]
        flat = z.reshape(-1, self.zdim)
        if weights_fixed:
            weights = {name: w.detach() for name, w in self.decoder.named_parameters()}
            raw = torch.func.functional_call(self.decoder, weights, (flat,))
        else:
            raw = self.decoder(flat)
        return raw.view(*lead, *raw.shape[1:])

    def log_px(self, x: Tensor, raw: Tensor) -> Tensor:
        """log p(x | z) in nats from the raw decoder output. x (B, C, H, W) broadcasts against
        raw (..., B, ·, H, W); a soft x is the Bernoulli expectation (eq. 7). Returns (..., B)."""
        if self.spec.likelihood == "bernoulli":
            return bernoulli_log_prob(raw, x)
        c = self.n_channels
        mean = raw[..., :c, :, :]
        if self.log_gamma is not None:
            log_scale = self.log_gamma.clamp(min=LOGISTIC_LOG_SCALE_MIN).expand_as(mean)
        else:
            log_scale = raw[..., c:, :, :].clamp(min=LOGISTIC_LOG_SCALE_MIN)
        return discretized_logistic_log_prob(mean, log_scale, x)

    def image_mean(self, raw: Tensor) -> Tensor:
        """G(z) = E[x | z] as an image in [0, 1] (the critic's input)."""
        if self.spec.likelihood == "bernoulli":
            return torch.sigmoid(raw)
        mean = raw[..., : self.n_channels, :, :].clamp(-1.0, 1.0)
        return 0.5 * (mean + 1.0)

    def critic_images(self, images: Tensor) -> Tensor:
        """D(x) for images (..., C, H, W) → (...)."""
        lead = images.shape[:-3]
        return self.critic(images.reshape(-1, *images.shape[-3:])).view(lead)

    # ----- prior -------------------------------------------------------------------------
    def log_f_from_raw(self, z: Tensor, raw: Tensor) -> Tensor:
        """The prior's log f(z) reusing an existing decoder pass `raw` of z: (..., zdim) → (...), nats."""
        return self.prior.log_f(self, z, raw)

    def log_f(self, z: Tensor) -> Tensor:
        """The prior's log f(z) in nats, Gaussian constant kept: (..., zdim) → (...)."""
        return self.prior.log_f(self, z)

    def log_px_and_log_f(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """One decoder pass serves both: x (B, C, H, W), z (n, B, zdim) → (n, B), (n, B)."""
        raw = self.decode(z)
        return self.log_px(x, raw), self.log_f_from_raw(z, raw)

    def energy_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """MALA's E(z) = β·D(G(z)) + ½‖z‖² and ∇E (`mala.energy_from_log_f` of this log f).
        z (M, zdim) → (M,), (M, zdim)."""
        return energy_from_log_f(self.log_f)(z)


def n_pixels(spec: ModelSpec) -> int:
    c, h, w = spec.image_shape
    return c * h * w


__all__ = ["ModelSpec", "VAEPP", "n_pixels"]
