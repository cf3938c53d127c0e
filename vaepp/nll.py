"""Test negative log-likelihood by importance sampling from the encoder posterior (paper §5,
Table 1 caption).

Per test image e and pass p (x = a fresh Bernoulli draw of e on binary data, else x = e):

    log p(x) ≈ logmeanexp_{s=1..S} [log p(x|z_s) + log f(z_s) − log Ẑ − log q(z_s|e)],  z_s ~ q(z|e).

log Ẑ enters only as a constant, so one pass over the samples serves every log-Z estimate: the
running logsumexp is kept without it and each named log Ẑ is subtracted at the end. The plain-VAE
NLL of the same model (prior N(0, I), log Z = 0) comes from the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import torch
from torch import Tensor

from .posteriors import log_standard_normal

RNG_ROWS = 1024  # rows (samples × images) per call of `sample_q`; see `estimate_nll`


class LatentModel(Protocol):
    """What `estimate_nll` needs from a model (`vaepp.model.VAEPP` is one; any likelihood or prior
    fits, e.g. a linear-Gaussian model in tests). Shapes: B images, n samples each, Z = zdim."""

    def encode(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """(B, ...) → μ, log σ, each (B, Z)."""

    def sample_q(
        self, mu: Tensor, log_sigma: Tensor, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """z (n, B, Z) ~ q(z|e) and log q(z|e) (n, B), in nats."""

    def log_px_and_log_f(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, ...), z (n, B, Z) → log p(x|z) (n, B) and log f(z) (n, B) in nats, where
        log f(z) = log N(z; 0, I) − β·D(G(z)) keeps its Gaussian constant; one decoder pass."""


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
    rng_rows: int = RNG_ROWS,
    generator: torch.Generator | None = None,
    binarize_generator: torch.Generator | None = None,
    progress: bool = False,
    return_per_image: bool = False,
    callback: Callable[[str, float, int], None] | None = None,
) -> dict:
    """Importance-sampled test NLL −log p(x), in nats and bits/dim (paper §5, Table 1).

    model: a `LatentModel`; data: iterable of test batches e (B, ...), values in [0, 1] when
    binarize (then x ~ Bernoulli(e), fresh every pass; else x = e). n_importance S samples per
    image and pass; n_passes P passes. `binarize_generator` draws the binarisations (default:
    `generator`): a generator of its own gives every model the same x for the same images and seed,
    so two models' per-image NLLs can be compared pairwise. log_z: one log Ẑ, or {name: log Ẑ} for several estimates,
    in which case `headline` names the one behind `nll_nats` (required when there are several).

    Cost and memory: the encoder runs once per batch; there is no Python loop over images or
    samples. Samples come from `sample_q` in draws of n_draw = max(1, rng_rows // B) samples of
    every image of the batch (≈ rng_rows rows per draw); each decoder call (`log_px_and_log_f`,
    one decoder pass shared by log p(x|z) and D(G(z))) takes the whole draws that fit in `chunk`
    rows (at least one), and a running logsumexp over chunks makes memory independent of S.
    Chunks of 1k–5k rows keep the decoder's activations in cache (measured: 30–50% faster than
    20k rows). The random stream depends on the seed, the batches and rng_rows but not on
    `chunk`, so the result does not depend on `chunk` beyond float rounding.

    Two standard errors, both of the mean NLL in nats:
      nll_stderr: over the test set, sd_i(−log p̂(x_i)) / √n_images with each image's value first
        averaged over the passes (what a fresh test set would change);
      nll_mc_stderr: the Monte-Carlo error of the importance sampler for these images,
        √(Σ_ip se_ip²) / (n_images·P), se_ip² = (S/ESS_ip − 1)/(S − 1) the delta-method variance
        of log p̂ from the weights' spread (what more samples would change; the paper's "std").
    Each log p̂ is also biased low by about (S/ESS − 1)/(2S) (Jensen); it shrinks as 1/S.

    Returns a dict (nats unless the key says bpd):
      nll_nats, nll_stderr, nll_mc_stderr: under the headline log Ẑ;
      nll_bpd = nll_nats / (H·W·C·ln 2), H·W·C = elements per image;
      nll_nats_by_log_z {name: nll}, nll_bpd_by_log_z, log_z_by_name, headline_log_z (the name);
      nll_nats_plain_vae, nll_stderr_plain_vae, nll_mc_stderr_plain_vae, nll_bpd_plain_vae: the
        same samples under the prior N(0, I) (log f = log N(z; 0, I), log Z = 0);
      ess_mean: mean over images × passes of the per-image ESS (Σw)²/Σw² of the VAEPP weights;
      n_images, n_passes, n_importance, n_importance_total = images × passes × S;
      nll_pass_sd (n_passes > 1 only): the sd of the P pass means of the NLL, the paper's "std"
        (how much a repeat of the whole evaluation on the same images moves the mean);
      with return_per_image: log_px_nats and log_px_nats_plain_vae, (P, n_images) tensors.

    callback: called after every batch, with n the number of test images done so far (every pass
    of them), as callback("images_done", n, n) and callback("nats_running", m, n), m the mean over
    those n images of −log p̂(x) (each averaged over the passes) under the headline log Ẑ, in
    nats: `nll_nats` of the images done, equal to it at the end up to summation order. It reads
    the batch's finished sums and draws nothing, so the estimate is the same with or without it.
    """
    if n_importance < 1 or n_passes < 1 or chunk < 1 or rng_rows < 1:
        raise ValueError("n_importance, n_passes, chunk and rng_rows must be >= 1")
    named, headline = _named_log_z(log_z, headline)
    S = n_importance
    n_done, log_px_sum = 0, 0.0  # images done and Σ of their log p̂(x) + log Ẑ, for the callback
    lse_parts, lse2_parts, lse_plain_parts, lse2_plain_parts = [], [], [], []
    dims_per_image = None
    batches = data
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(data, desc="NLL", leave=False)
    with torch.inference_mode():
        for e in batches:
            B = e.shape[0]
            dims_per_image = e[0].numel()
            mu, log_sigma = model.encode(e)  # (B, Z) each, once per batch
            n_draw = max(1, rng_rows // B)  # samples per image in one sample_q call
            n_per_chunk = n_draw * max(1, chunk // (n_draw * B))  # whole draws per decoder call
            acc = torch.full((4, n_passes, B), -math.inf, dtype=torch.float64, device=e.device)
            for p in range(n_passes):
                x = torch.bernoulli(e, generator=binarize_generator or generator) if binarize else e
                for start in range(0, S, n_per_chunk):
                    n_chunk = min(n_per_chunk, S - start)
                    draws = [
                        model.sample_q(mu, log_sigma, min(n_draw, n_chunk - i), generator=generator)
                        for i in range(0, n_chunk, n_draw)
                    ]
                    z = torch.cat([d[0] for d in draws])  # (n, B, Z)
                    log_q = torch.cat([d[1] for d in draws]).double()  # (n, B)
                    log_px, log_f = model.log_px_and_log_f(x, z)  # (n, B) each
                    log_px = log_px.double() - log_q
                    log_w = log_px + log_f.double()  # without −log Ẑ
                    log_w_plain = log_px + log_standard_normal(z.double())
                    chunk_lse = torch.stack(
                        [  # (4, B)
                            torch.logsumexp(log_w, dim=0),
                            torch.logsumexp(2.0 * log_w, dim=0),
                            torch.logsumexp(log_w_plain, dim=0),
                            torch.logsumexp(2.0 * log_w_plain, dim=0),
                        ]
                    )
                    acc[:, p] = torch.logaddexp(acc[:, p], chunk_lse)
            lse_parts.append(acc[0])  # (P, B) each
            lse2_parts.append(acc[1])
            lse_plain_parts.append(acc[2])
            lse2_plain_parts.append(acc[3])
            if callback is not None:
                n_done += B
                log_px_sum += acc[0].mean(0).sum().item() - B * math.log(S)  # Σ_batch of log p̂(x) + log Ẑ
                callback("images_done", float(n_done), n_done)
                callback("nats_running", named[headline] - log_px_sum / n_done, n_done)
    if dims_per_image is None:
        raise ValueError("data yielded no batches")
    log_s = math.log(S)
    lse, lse2 = torch.cat(lse_parts, dim=1), torch.cat(lse2_parts, dim=1)  # (P, n_images)
    lse_plain, lse2_plain = torch.cat(lse_plain_parts, dim=1), torch.cat(lse2_plain_parts, dim=1)
    log_px_base = lse - log_s  # log p̂(x) + log Ẑ
    log_px_plain = lse_plain - log_s
    ess = torch.exp(2.0 * lse - lse2)  # (P, n_images)
    n_images = log_px_base.shape[1]

    def errors(log_px_hat: Tensor, lse_w: Tensor, lse_w2: Tensor) -> tuple[float, float, float]:
        per_image = -log_px_hat.mean(0)  # (n_images,), averaged over passes
        sd = per_image.std().item() if n_images > 1 else float("nan")
        if S > 1:
            rel_var = (S * torch.exp(lse_w2 - 2.0 * lse_w) - 1.0).clamp(min=0.0)  # S/ESS − 1
            mc = math.sqrt((rel_var / (S - 1)).sum().item()) / rel_var.numel()
        else:
            mc = float("nan")
        return per_image.mean().item(), sd / math.sqrt(n_images), mc

    nll_base, nll_se, nll_mc = errors(log_px_base, lse, lse2)
    nll_plain, nll_plain_se, nll_plain_mc = errors(log_px_plain, lse_plain, lse2_plain)
    by_name = {name: nll_base + value for name, value in named.items()}
    bits = dims_per_image * math.log(2.0)
    out = {
        "nll_nats": by_name[headline],
        "nll_stderr": nll_se,
        "nll_mc_stderr": nll_mc,
        "nll_bpd": by_name[headline] / bits,
        "headline_log_z": headline,
        "log_z_by_name": named,
        "nll_nats_by_log_z": by_name,
        "nll_bpd_by_log_z": {name: v / bits for name, v in by_name.items()},
        "nll_nats_plain_vae": nll_plain,
        "nll_stderr_plain_vae": nll_plain_se,
        "nll_mc_stderr_plain_vae": nll_plain_mc,
        "nll_bpd_plain_vae": nll_plain / bits,
        "ess_mean": ess.mean().item(),
        "n_images": n_images,
        "n_passes": n_passes,
        "n_importance": S,
        "n_importance_total": n_images * n_passes * S,
    }
    if n_passes > 1:
        out["nll_pass_sd"] = (-log_px_base.mean(1)).std().item()  # (P,) pass means, sd with P − 1
    if return_per_image:
        out["log_px_nats"] = log_px_base - named[headline]
        out["log_px_nats_plain_vae"] = log_px_plain
    return out
