"""Test negative log-likelihood by importance sampling from the encoder posterior (SPEC
"Evaluation protocols"; paper §5, Table 1 caption).

Per test image e and pass p (x = a fresh Bernoulli draw of e on binary data, else x = e):

    log p(x) ≈ logmeanexp_{s=1..S} [log p(x|z_s) + log f(z_s) − log Ẑ − log q(z_s|e)],  z_s ~ q(z|e).

log Ẑ enters only as a constant, so one pass over the samples serves every log-Z estimate: the
running logsumexp is kept without it and each named log Ẑ is subtracted at the end. The plain-VAE
NLL of the same model (prior N(0, I), log Z = 0) comes from the same samples.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Protocol

import torch
from torch import Tensor

from .logz import log_standard_normal


class LatentModel(Protocol):
    """What `estimate_nll` needs from a model. Shapes: B images, n samples each, Z = zdim."""

    zdim: int

    def encode(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """(B, ...) → μ, log σ, each (B, Z)."""

    def sample_q(self, mu: Tensor, log_sigma: Tensor, n: int,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """z (n, B, Z) ~ q(z|e) and log q(z|e) (n, B), in nats."""

    def log_q(self, z: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
        """log q(z|e): z (n, B, Z) → (n, B), in nats."""

    def log_px_and_log_f(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, ...), z (n, B, Z) → log p(x|z) (n, B), log f(z) (n, B), one decoder pass, nats."""

    def log_f(self, z: Tensor) -> Tensor:
        """(..., Z) → (...): log N(z; 0, I) − β·D(G(z)), Gaussian constant kept, in nats."""

    def energy_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """E(z) = β·D(G(z)) + ½‖z‖² (M,) and ∇E (M, Z) for z (M, Z)."""


def _named_log_z(log_z: float | Mapping[str, float], headline: str | None) -> tuple[dict, str]:
    if isinstance(log_z, Mapping):
        named = {str(k): float(v) for k, v in log_z.items()}
        if not named:
            raise ValueError("log_z mapping is empty")
        if headline is None:
            if len(named) > 1:
                raise ValueError(f"several log Z estimates {sorted(named)}: name the headline one")
            headline = next(iter(named))
        if headline not in named:
            raise ValueError(f"headline {headline!r} not among log Z estimates {sorted(named)}")
        return named, headline
    name = headline or "log_z"
    return {name: float(log_z)}, name


def estimate_nll(
    model: LatentModel,
    data: Iterable[Tensor],
    *,
    n_importance: int = 1000,
    n_passes: int = 1,
    log_z: float | Mapping[str, float] = 0.0,
    headline: str | None = None,
    binarize: bool = True,
    chunk: int = 4096,
    rng_block: int = 4,
    generator: torch.Generator | None = None,
    progress: bool = False,
    return_per_image: bool = False,
) -> dict:
    """Importance-sampled test NLL −log p(x), in nats and bits/dim (SPEC "Evaluation protocols").

    model: a `LatentModel`; data: iterable of test batches e (B, ...), values in [0, 1] when
    binarize (then x ~ Bernoulli(e), fresh every pass; else x = e). n_importance S samples per
    image and pass; n_passes P passes. log_z: one log Ẑ, or {name: log Ẑ} for several estimates,
    in which case `headline` names the one behind `nll_nats` (required when there are several).

    Cost and memory: the encoder runs once per batch; each decoder call (`log_px_and_log_f`, which
    shares one decoder pass between log p(x|z) and D(G(z))) sees about `chunk` rows, i.e.
    max(1, chunk // B) samples of every image, rounded to whole blocks of `rng_block` samples; a
    running logsumexp over chunks makes memory independent of S. Samples are drawn from the
    generator in calls of `rng_block` samples, so the same seed gives the same samples, hence the
    same result up to float64 rounding, for any `chunk`.

    Returns a dict (nats unless the key says bpd):
      nll_nats, nll_stderr: mean and standard error of −log p(x) over all images × passes under
        the headline log Ẑ; nll_bpd = nll_nats / (H·W·C·ln 2), H·W·C = elements per image;
      nll_nats_by_log_z {name: nll}, log_z_by_name, headline_log_z (the name);
      nll_nats_plain_vae, nll_stderr_plain_vae, nll_bpd_plain_vae: prior N(0, I), log Z = 0;
      ess_mean: mean over images × passes of the per-image ESS (Σw)²/Σw² of the VAEPP weights;
      n_images, n_passes, n_importance, n_importance_total = images × passes × S;
      with return_per_image: log_px_nats and log_px_nats_plain_vae, (P, n_images) tensors.
    """
    if n_importance < 1 or n_passes < 1 or chunk < 1 or rng_block < 1:
        raise ValueError("n_importance, n_passes, chunk and rng_block must be >= 1")
    named, headline = _named_log_z(log_z, headline)
    log_s = math.log(n_importance)
    lse_parts, lse_plain_parts, ess_parts = [], [], []
    dims_per_image = None
    batches = data
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(data, desc="NLL", leave=False)
    with torch.inference_mode():
        for e in batches:
            batch = e.shape[0]
            dims_per_image = e[0].numel()
            mu, log_sigma = model.encode(e)  # (B, Z) each, once per batch
            samples_per_chunk = max(1, chunk // batch)
            if samples_per_chunk >= rng_block:
                samples_per_chunk -= samples_per_chunk % rng_block
            else:
                samples_per_chunk = rng_block
            lse_pass, lse_plain_pass, ess_pass = [], [], []
            for _ in range(n_passes):
                x = torch.bernoulli(e, generator=generator) if binarize else e
                lse = torch.full((batch,), -math.inf, dtype=torch.float64, device=e.device)
                lse2 = lse.clone()
                lse_plain = lse.clone()
                done = 0
                while done < n_importance:
                    n_chunk = min(samples_per_chunk, n_importance - done)
                    draws = [model.sample_q(mu, log_sigma, min(rng_block, n_chunk - i), generator=generator)
                             for i in range(0, n_chunk, rng_block)]
                    z = torch.cat([d[0] for d in draws])  # (n, B, Z)
                    log_q = torch.cat([d[1] for d in draws]).double()  # (n, B)
                    log_px, log_f = model.log_px_and_log_f(x, z)  # (n, B) each
                    log_px = log_px.double()
                    log_w = log_px + log_f.double() - log_q  # without −log Ẑ
                    log_w_plain = log_px + log_standard_normal(z.double()) - log_q
                    lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=0))
                    lse2 = torch.logaddexp(lse2, torch.logsumexp(2.0 * log_w, dim=0))
                    lse_plain = torch.logaddexp(lse_plain, torch.logsumexp(log_w_plain, dim=0))
                    done += n_chunk
                lse_pass.append(lse)
                lse_plain_pass.append(lse_plain)
                ess_pass.append(torch.exp(2.0 * lse - lse2))
            lse_parts.append(torch.stack(lse_pass))  # (P, B)
            lse_plain_parts.append(torch.stack(lse_plain_pass))
            ess_parts.append(torch.stack(ess_pass))
    if dims_per_image is None:
        raise ValueError("data yielded no batches")
    log_px_base = torch.cat(lse_parts, dim=1) - log_s  # (P, n_images), log p(x) + log Ẑ
    log_px_plain = torch.cat(lse_plain_parts, dim=1) - log_s
    count = log_px_base.numel()

    def mean_and_se(values: Tensor) -> tuple[float, float]:
        sd = values.std().item() if count > 1 else float("nan")
        return values.mean().item(), sd / math.sqrt(count)

    nll_base, nll_se = mean_and_se(-log_px_base)
    nll_plain, nll_plain_se = mean_and_se(-log_px_plain)
    by_name = {name: nll_base + value for name, value in named.items()}
    bits = dims_per_image * math.log(2.0)
    out = {
        "nll_nats": by_name[headline],
        "nll_stderr": nll_se,
        "nll_bpd": by_name[headline] / bits,
        "headline_log_z": headline,
        "log_z_by_name": named,
        "nll_nats_by_log_z": by_name,
        "nll_bpd_by_log_z": {name: v / bits for name, v in by_name.items()},
        "nll_nats_plain_vae": nll_plain,
        "nll_stderr_plain_vae": nll_plain_se,
        "nll_bpd_plain_vae": nll_plain / bits,
        "ess_mean": torch.cat(ess_parts, dim=1).mean().item(),
        "n_images": log_px_base.shape[1],
        "n_passes": n_passes,
        "n_importance": n_importance,
        "n_importance_total": count * n_importance,
    }
    if return_per_image:
        out["log_px_nats"] = log_px_base - named[headline]
        out["log_px_nats_plain_vae"] = log_px_plain
    return out
