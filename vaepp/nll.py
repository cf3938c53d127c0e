"""Test negative log-likelihood by importance sampling (paper §5, Table 1 caption).

Per test image e and pass p (x = a fresh Bernoulli draw of e on binary data, else x = e):

    log p(x) ≈ logmeanexp_{s=1..S} [log p(x|z_s) + log f(z_s) − log Ẑ − log r(z_s|x)],  z_s ~ r(z|x).

The proposal r is the caller's choice. The paper's is the encoder posterior q(z|e) itself; with q
truncated at ±2σ its estimate's expectation is ∫_box p(x, z) dz < p(x), whatever S: the mass
outside the box is lost. A full-support proposal (`importance.defensive_proposal`) has
E[p̂(x)] = p(x); log p̂(x) is then a stochastic lower bound on log p(x) (Jensen) whose gap shrinks
as 1/S, read out by the same draws' estimate from the first S/10 samples.

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

from .importance import CHUNK, RNG_BLOCK, LogMeanExp, stream
from .posteriors import log_standard_normal

# (μ, log σ (B, zdim), n, generator=) → z (n, B, zdim) and log r(z|x) (n, B) in nats
Proposal = Callable[..., tuple[Tensor, Tensor]]


class LatentModel(Protocol):
    """What `estimate_nll` needs from a model (`vaepp.model.VAEPP` is one; any likelihood or prior
    fits, e.g. a linear-Gaussian model in tests). Shapes: B images, n samples each, Z = zdim."""

    def encode(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """(B, ...) → μ, log σ, each (B, zdim)."""

    def sample_q(
        self, mu: Tensor, log_sigma: Tensor, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """z (n, B, zdim) ~ q(z|e) and log q(z|e) (n, B), in nats."""

    def log_px_and_log_f(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, ...), z (n, B, zdim) → log p(x|z) (n, B) and log f(z) (n, B) in nats, where
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
    proposal: Proposal | None = None,
    n_importance_sub: int | None = None,
    chunk: int = CHUNK,
    rng_rows: int = RNG_BLOCK,
    generator: torch.Generator | None = None,
    binarize_generator: torch.Generator | None = None,
    progress: bool = False,
    return_per_image: bool = False,
    callback: Callable[[str, float, int], None] | None = None,
) -> dict:
    """Importance-sampled test NLL −log p(x), in nats and bits/dim (paper §5, Table 1).

    model: a `LatentModel`; data: iterable of test batches e (B, ...), values in [0, 1] when
    binarize (then x ~ Bernoulli(e), fresh every pass; else x = e). n_importance S samples per
    image and pass from `proposal` (default: the model's `sample_q`, the paper's protocol); n_passes
    P passes. `binarize_generator` draws the binarisations (default: `generator`): a generator of
    its own gives every model and proposal the same x for the same images and seed, so per-image
    NLLs can be compared pairwise. log_z: one log Ẑ, or {name: log Ẑ} for several estimates, in
    which case `headline` names the one behind `nll_nats` (required when there are several).
    n_importance_sub (default max(1, S // 10)): the read-out of S, the same estimate from each
    image's first n_importance_sub samples of the same draws.

    Cost and memory: the encoder runs once per batch; there is no Python loop over images or
    samples. The samples of a batch stream through `importance.stream`: draws of
    max(1, rng_rows // B) samples of every image, decoder calls (`log_px_and_log_f`, one decoder
    pass shared by log p(x|z) and D(G(z))) on the whole draws that fit in `chunk` rows, and
    per-image running log-mean-exps, so memory is independent of S. Chunks of 1k–5k rows keep the
    decoder's activations in cache (measured: 30–50% faster than 20k rows). The random stream
    depends on the seed, the batches and rng_rows but not on `chunk`.

    Two standard errors, both of the mean NLL in nats:
      nll_stderr: over the test set, sd_i(−log p̂(x_i)) / √n_images with each image's value first
        averaged over the passes (what a fresh test set would change);
      nll_mc_stderr: the Monte-Carlo error of the importance sampler for these images,
        √(Σ_ip se_ip²) / (n_images·P), se_ip the delta-method error of log p̂ (`LogMeanExp.std_err`,
        from the weights' spread at an ESS_ip). It assumes the weights' spread is seen: with a
        heavy-tailed weight it is optimistic, and the S/10 read-out shows how far the estimate
        still moves. Each log p̂ is biased low by about (S/ESS − 1)/(2S) (Jensen).

    Returns a dict (nats unless the key says bpd):
      nll_nats, nll_stderr, nll_mc_stderr: under the headline log Ẑ;
      nll_bpd = nll_nats / (H·W·C·ln 2), H·W·C = elements per image;
      nll_nats_by_log_z {name: nll}, nll_bpd_by_log_z, log_z_by_name, headline_log_z (the name);
      nll_nats_sub, n_importance_sub: the headline NLL from the first n_importance_sub samples;
      nll_nats_plain_vae, nll_stderr_plain_vae, nll_mc_stderr_plain_vae, nll_bpd_plain_vae: the
        same samples under the prior N(0, I) (log f = log N(z; 0, I), log Z = 0);
      ess_mean, ess_median, ess_min: over images of the per-image ESS (Σw)²/Σw² of the weights
        (averaged over passes), out of S;
      n_images, n_passes, n_importance, n_importance_total = images × passes × S;
      nll_pass_sd (n_passes > 1 only): the sd of the P pass means of the NLL, the paper's "std"
        (how much a repeat of the whole evaluation on the same images moves the mean);
      with return_per_image: log_px_nats, log_px_nats_sub, log_px_nats_plain_vae and ess, each a
        (P, n_images) tensor.

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
    s_sub = max(1, S // 10) if n_importance_sub is None else n_importance_sub
    if not 1 <= s_sub <= S:
        raise ValueError(f"n_importance_sub must lie in [1, {S}], got {s_sub}")
    propose = proposal or model.sample_q
    n_done, log_px_sum = 0, 0.0  # images done and Σ of their log p̂(x) + log Ẑ, for the callback
    parts: dict[str, list[Tensor]] = {k: [] for k in ("log_px", "se", "ess", "sub", "plain", "plain_se")}
    dims_per_image = None
    batches = data
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(data, desc="NLL", leave=False)
    with torch.inference_mode():
        for e in batches:
            B = e.shape[0]
            dims_per_image = e[0].numel()
            mu, log_sigma = model.encode(e)  # (B, zdim) each, once per batch
            per_pass: dict[str, list[Tensor]] = {k: [] for k in parts}
            for _ in range(n_passes):
                x = torch.bernoulli(e, generator=binarize_generator or generator) if binarize else e

                def weights(z: Tensor, log_r: Tensor, x: Tensor = x) -> tuple[Tensor, Tensor]:
                    log_px, log_f = model.log_px_and_log_f(x, z)  # (k, B) each
                    log_joint = log_px.double() - log_r.double()
                    return log_joint + log_f.double(), log_joint + log_standard_normal(z.double())  # no −log Ẑ

                acc, plain, sub = LogMeanExp(B, e.device), LogMeanExp(B, e.device), LogMeanExp(B, e.device)
                stream(
                    lambda k, mu=mu, log_sigma=log_sigma: propose(mu, log_sigma, k, generator=generator),
                    weights,
                    S,
                    B,
                    [acc, plain],
                    chunk=chunk,
                    block=rng_rows,
                    prefix=s_sub,
                    prefix_accumulators=[sub],
                )
                for key, value in zip(
                    parts,
                    (acc.log_mean, acc.std_err, acc.ess, sub.log_mean, plain.log_mean, plain.std_err),
                    strict=True,
                ):
                    per_pass[key].append(value)
            for key in parts:
                parts[key].append(torch.stack(per_pass[key]))  # (P, B)
            if callback is not None:
                n_done += B
                log_px_sum += parts["log_px"][-1].mean(0).sum().item()  # Σ_batch of log p̂(x) + log Ẑ
                callback("images_done", float(n_done), n_done)
                callback("nats_running", named[headline] - log_px_sum / n_done, n_done)
    if dims_per_image is None:
        raise ValueError("data yielded no batches")
    cat = {key: torch.cat(value, dim=1) for key, value in parts.items()}  # (P, n_images) each
    log_px_base, log_px_plain = cat["log_px"], cat["plain"]  # log p̂(x) + log Ẑ; under N(0, I)
    n_images = log_px_base.shape[1]

    def errors(log_px_hat: Tensor, se: Tensor) -> tuple[float, float, float]:
        per_image = -log_px_hat.mean(0)  # (n_images,), averaged over passes
        sd = per_image.std().item() if n_images > 1 else float("nan")
        mc = math.sqrt(se.square().sum().item()) / se.numel() if S > 1 else float("nan")
        return per_image.mean().item(), sd / math.sqrt(n_images), mc

    nll_base, nll_se, nll_mc = errors(log_px_base, cat["se"])
    nll_plain, nll_plain_se, nll_plain_mc = errors(log_px_plain, cat["plain_se"])
    by_name = {name: nll_base + value for name, value in named.items()}
    bits = dims_per_image * math.log(2.0)
    ess = cat["ess"].mean(0)  # (n_images,)
    out = {
        "nll_nats": by_name[headline],
        "nll_stderr": nll_se,
        "nll_mc_stderr": nll_mc,
        "nll_bpd": by_name[headline] / bits,
        "headline_log_z": headline,
        "log_z_by_name": named,
        "nll_nats_by_log_z": by_name,
        "nll_bpd_by_log_z": {name: v / bits for name, v in by_name.items()},
        "nll_nats_sub": named[headline] - cat["sub"].mean().item(),
        "n_importance_sub": s_sub,
        "nll_nats_plain_vae": nll_plain,
        "nll_stderr_plain_vae": nll_plain_se,
        "nll_mc_stderr_plain_vae": nll_plain_mc,
        "nll_bpd_plain_vae": nll_plain / bits,
        "ess_mean": ess.mean().item(),
        "ess_median": ess.median().item(),
        "ess_min": ess.min().item(),
        "n_images": n_images,
        "n_passes": n_passes,
        "n_importance": S,
        "n_importance_total": n_images * n_passes * S,
    }
    if n_passes > 1:
        out["nll_pass_sd"] = (-log_px_base.mean(1)).std().item()  # (P,) pass means, sd with P − 1
    if return_per_image:
        out["log_px_nats"] = log_px_base - named[headline]
        out["log_px_nats_sub"] = cat["sub"] - named[headline]
        out["log_px_nats_plain_vae"] = log_px_plain
        out["ess"] = cat["ess"]
    return out
