"""Every estimate of log Z of a trained run, and which one heads its NLL.

For a pull-back prior the estimates are the paper's q-based Ẑ_q over the training set (eq. 8; not
a bound), N(0, I)-proposal importance sampling with its effective sample size, and annealed
importance sampling (Neal 2001) from N(0, I) to p_λ, spread over seeds. Both N(0, I)-IS and AIS
are unbiased for Z, hence in expectation LOWER estimates of log Z (Jensen), so the larger of the
two heads the NLL (the less optimistic one). A certified prior adds its certificate on Z, whose
upper end heads instead, and reverse AIS from exact samples. The plain VAE has log Z = 0 exactly.

Seeds: nll.seed for the q-based estimate, seed + 1 for N(0, I)-IS, seed + 100 + s for AIS seed s;
a certified prior's in `_certified_estimates`. Every estimate has its own stream.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from . import distributed as vdist
from .config import NLLParams
from .evaluate import REPORTS_PER_LOOP, Progress, throttled, unit_batches
from .logz import log_z_ais, log_z_prior_is, log_z_q_based

# The independent estimates that may head the NLL; each is a lower estimate of log Z in
# expectation, so the larger is chosen.
HEADLINE_CANDIDATES = ("prior_is", "ais")

# Why a certified prior with LARS's truncated sampler has no NLL here (config.RunConfig rejects it).
TRUNCATED_NLL = (
    "a certified prior with a finite model.truncation has no NLL protocol: its density "
    "p_T(z) = N(z; 0, I)·(a(z)(1 − α)/Z + α), α = (1 − Z)^(T − 1), is not f(z)/Z, so no log Ẑ constant "
    "gives its log p(x); set model.truncation: null"
)


def _estimate_reporter(callback: Progress | None) -> Callable:
    """estimate → estimate, calling callback(f"log_z.{name}", log Ẑ in nats, k) for the k-th
    estimate of log Z finished (k = 1, 2, ...: its place in the protocol)."""
    count = itertools.count(1)

    def report(estimate):
        if callback is not None:
            callback(f"log_z.{estimate.name}", estimate.log_z, next(count))
        return estimate

    return report


def log_z_protocol(
    model,
    ctx: vdist.DistContext,
    train: Tensor,
    params: NLLParams,
    *,
    device: torch.device | str,
    progress: bool = False,
    callback: Progress | None = None,
) -> tuple[dict[str, dict], str]:
    """Every estimate of log Z for a pull-back model, and the name of the headline one.

    train: uint8 training images (N, C, H, W); the q-based estimate uses the first
    `log_z.q_based_images` of them (all when None) with N = len(train). Returns
    ({name: LogZEstimate as a dict}, headline name); for the plain VAE ({}, "exact").
    callback: progress as `nll_protocol` lists it under "log_z." (none for the plain VAE).
    """
    if model.prior.exact_log_z:
        return {}, "exact"
    if model.prior.has_certificate and model.prior.truncation is not None:
        raise ValueError(TRUNCATED_NLL)
    lz, p = params.log_z, params
    sharded = vdist.ShardedLatentModel(model, ctx)  # identity with one process
    log_f = vdist.sharded_log_f(ctx, model.log_f)
    gen = torch.Generator(device=device)
    q_images = train[: lz.q_based_images] if lz.q_based_images else train
    report = _estimate_reporter(callback)
    found = [  # each reported as it is finished
        report(
            log_z_q_based(
                unit_batches(q_images, p.batch_images, device),
                sharded.encode,
                model.sample_q,
                log_f,
                n_train=int(train.shape[0]),
                n_per_image=lz.q_based_per_image,
                chunk=p.chunk,
                generator=gen.manual_seed(p.seed),
                progress=progress,
            )
        ),
        report(
            log_z_prior_is(
                log_f,
                model.zdim,
                lz.prior_is_samples,
                chunk=p.chunk,
                generator=gen.manual_seed(p.seed + 1),
                device=device,
                progress=progress,
            )
        ),
        report(
            log_z_ais(
                log_f,
                model.zdim,
                n_chains=lz.ais_chains,
                n_temps=lz.ais_temps,
                seeds=tuple(p.seed + 100 + s for s in range(lz.ais_seeds)),
                device=device,
                progress=progress,
                callback=throttled(callback, "log_z.ais.", lz.ais_temps, REPORTS_PER_LOOP),
            )
        ),
    ]
    if model.prior.has_certificate:
        found += _certified_estimates(model, lz, p, device=device, progress=progress, callback=callback, report=report)
    estimates = {e.name: dataclasses.asdict(e) for e in found}
    if model.prior.has_certificate:
        return estimates, "certificate"  # log Z's upper end at 1 − δ: the honest direction
    headline = max(HEADLINE_CANDIDATES, key=lambda n: estimates[n]["log_z"])
    return estimates, headline


def _certified_estimates(model, lz, p: NLLParams, *, device, progress: bool, callback, report) -> list:
    """A certified prior's extra estimates: the certificate on Z = E_N[a] (`resampled.
    log_z_certificate`; its upper end heads the NLL) and reverse AIS from exact samples (a
    stochastic upper estimate of log Z; with forward AIS, bidirectional Monte Carlo). Seeds:
    nll.seed + 3 for the certificate, seed + 200 + s for reverse-AIS seed s (its exact samples
    from seed + 300). Progress to `callback` and each finished estimate to `report`, as in
    `log_z_protocol`."""
    from .logz import log_z_reverse_ais
    from .resampled import log_z_certificate, rejection_sample

    gen = torch.Generator(device=device)
    log_a = lambda z: model.prior.log_acceptance_of(model, z)  # noqa: E731
    cert = report(
        log_z_certificate(
            log_a,
            model.zdim,
            delta=lz.certificate_delta,
            target_half_width=lz.certificate_half_width,
            pilot_samples=lz.certificate_pilot,
            max_samples=lz.certificate_max_samples,
            chunk=p.chunk,
            generator=gen.manual_seed(p.seed + 3),
            device=device,
            progress=progress,
        )
    )
    with torch.inference_mode():
        start, _ = rejection_sample(
            log_a,
            model.zdim,
            lz.ais_seeds * lz.ais_chains,
            generator=gen.manual_seed(p.seed + 300),
            device=device,
        )
    reverse = report(
        log_z_reverse_ais(
            model.log_f,
            start.view(lz.ais_seeds, lz.ais_chains, model.zdim),
            n_temps=lz.ais_temps,
            seeds=tuple(p.seed + 200 + s for s in range(lz.ais_seeds)),
            device=device,
            progress=progress,
            callback=throttled(callback, "log_z.reverse_ais.", lz.ais_temps, REPORTS_PER_LOOP),
        )
    )
    return [cert, reverse]


def headline_log_z_stderr(estimates: dict[str, dict], headline: str) -> float:
    """The error of the headline log Ẑ that the NLL carries, nats: 0 for the exact log Z = 0 of
    the plain VAE; for the certificate its half-width log Z_hi − log Ẑ (the interval's, not Ẑ's
    standard error: the headline is the interval's end); else the estimate's std_err."""
    if not estimates:
        return 0.0
    chosen = estimates[headline]
    if headline == "certificate":
        return chosen["extra"]["log_half_width"]
    return chosen["std_err"]
