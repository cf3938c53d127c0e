"""The test-NLL protocol of the estimate-nll stage (paper §5).

Test NLL by importance sampling from a full-support proposal (by default
`importance.defensive_proposal`; the paper's q(z|e) beside it) under every estimate of log Z of
the run (`log_z_protocol`): for a pull-back prior the larger of N(0, I)-IS and AIS heads
`nll_nats` (the less optimistic NLL); the paper-protocol NLL is reported beside it, never in its
place. The plain VAE has log Z = 0 exactly.

Seeds: the NLL uses nll.seed for the q-based estimate, seed + 1 for N(0, I)-IS, seed + 100 + s
for AIS seed s, seed + 5 for the test-set samples from the full-support proposal, seed + 2 for those from the
paper's q(z|e) and seed + 4 for the binarisations (the same for every run and proposal, so that
runs compare image by image), so every estimate has its own stream.
"""

from __future__ import annotations

import math
import time
from functools import partial

import torch
from torch import Tensor

from . import distributed as vdist
from .config import NLLParams
from .evaluate import REPORTS_PER_IMAGE_SET, Progress, throttled, unit_batches
from .importance import defensive_proposal
from .log_z_protocol import headline_log_z_stderr, log_z_protocol
from .nll import estimate_nll

SPLIT_NAMES = {"test": "test", "valid": "validation"}  # nll.split → the images' name in a protocol text


def nll_protocol(
    model,
    ctx: vdist.DistContext,
    train: Tensor,
    test: Tensor,
    params: NLLParams,
    *,
    device: torch.device | str,
    progress: bool = False,
    callback: Progress | None = None,
) -> dict:
    """Test NLL (nats, bits/dim) under every estimate of log Z, with the headline one named.

    train, test: uint8 images (N, C, H, W): the training split (the q-based log Ẑ's images, N its
    size) and the test images to score. On Bernoulli data every pass binarises the test images
    afresh (x ~ Bernoulli(e)). The headline proposal is `params.proposal` (default the
    full-support defensive mixture, `importance.defensive_proposal`: E[p̂(x)] = p(x)); with
    `proposal.paper_protocol` the same images and binarisations are also scored with the paper's
    proposal q(z|e) (`paper_protocol` in the result). Errors, nats: nll_stderr (test set),
    nll_mc_stderr (importance sampler), nll_log_z_stderr (the headline log Ẑ's own: for AIS its
    spread over seeds, for the certificate its half-width log Z_hi − log Ẑ), nll_total_stderr
    (`total_stderr`), and with n_passes > 1 nll_pass_sd, the sd of the pass means (the paper's
    "std"). The S/10 read-out: nll_nats_sub from each image's first S/10 samples of the same draws;
    ess_mean/median/min: the per-image ESS out of S.

    callback(name, value, step), if given, gets the progress, in this order (pull-back priors
    only for log_z.*):
      log_z.ais.temps_done_fraction: the fraction of AIS temperatures done (all seeds at once;
        unitless, in (0, 1]) at step = temperatures done, every 5% of them;
      log_z.<name> (paper_q, prior_is, ais; for a certified prior also certificate, reverse_ais,
        with log_z.reverse_ais.temps_done_fraction before it): each estimate of log Z in nats as
        it is finished, at step = its place in that order (1, 2, ...);
      nll.images_done and nll.nats_running: the test images done (every pass of them) and the
        mean over them of −log p̂(x) under the headline log Ẑ in nats (`nll_nats` of the images
        done), both at step = images done, every 10% of the test set; then, with the paper's
        protocol on, the same as nll_paper.images_done and nll_paper.nats_running.
    """
    t0 = time.perf_counter()
    estimates, headline = log_z_protocol(model, ctx, train, params, device=device, progress=progress, callback=callback)
    log_z = {name: e["log_z"] for name, e in estimates.items()} if estimates else {"exact": 0.0}
    binary = model.spec.likelihood == "bernoulli"
    p, r = params, params.proposal
    n_test = int(test.shape[0])

    def score(proposal, seed_offset: int, prefix: str) -> dict:
        return estimate_nll(
            vdist.ShardedLatentModel(model, ctx),
            unit_batches(test, p.batch_images, device),
            n_importance=p.n_importance,
            n_passes=p.n_passes,
            log_z=log_z,
            headline=headline,
            binarize=binary,
            proposal=proposal,
            chunk=p.chunk,
            generator=torch.Generator(device=device).manual_seed(p.seed + seed_offset),
            binarize_generator=torch.Generator(device=device).manual_seed(p.seed + 4),
            progress=progress,
            return_per_image=True,
            callback=throttled(callback, prefix, n_test, REPORTS_PER_IMAGE_SET),
        )

    paper = None
    if r.kind == "posterior":
        nll, described = score(None, 2, "nll."), "q(z|e) (the paper's protocol)"
    else:
        nll = score(partial(defensive_proposal, weight=r.weight, width=r.width), 5, "nll.")
        described = f"r = {1 - r.weight:g}·N(μ, σ²) + {r.weight:g}·N(μ, ({r.width:g}σ)²), untruncated"
        if r.paper_protocol:
            paper = score(None, 2, "nll_paper.")
    log_z_stderr = headline_log_z_stderr(estimates, headline)
    out = {
        "nll_nats": nll["nll_nats"],
        "nll_stderr": nll["nll_stderr"],
        "nll_mc_stderr": nll["nll_mc_stderr"],
        "nll_log_z_stderr": log_z_stderr,
        "nll_total_stderr": total_stderr(nll["nll_stderr"], nll["nll_mc_stderr"], log_z_stderr),
        "bpd": nll["nll_bpd"],
        "nll_nats_sub": nll["nll_nats_sub"],
        "n_importance_sub": nll["n_importance_sub"],
        "ess_mean": nll["ess_mean"],
        "ess_median": nll["ess_median"],
        "ess_min": nll["ess_min"],
        "proposal": r.kind,
        "proposal_density": described,
        "n_importance_total": nll["n_importance_total"],
        "n_importance_per_image": p.n_importance,
        "n_passes": p.n_passes,
        "n_test_images": nll["n_images"],
        "log_z_headline": headline,
        "log_z": estimates,
        "nll_nats_by_log_z": nll["nll_nats_by_log_z"],
        "nll_vae_prior_nats": nll["nll_nats_plain_vae"],
        "nll_vae_prior_stderr": nll["nll_stderr_plain_vae"],
        "protocol": (
            f"{nll['n_images']} {SPLIT_NAMES[p.split]} images × {p.n_passes} pass(es) × S={p.n_importance} samples "
            f"from {described}{', fresh binarisation per pass' if binary else ''}; log Z: {headline}"
        ),
    }
    if "nll_pass_sd" in nll:
        out["nll_pass_sd"] = nll["nll_pass_sd"]
    # per test image (headline log Z, mean over passes): for paired comparisons of runs
    per_image = {
        "nll_nats": -nll["log_px_nats"].mean(0),
        "nll_nats_sub": -nll["log_px_nats_sub"].mean(0),
        "ess": nll["ess"].mean(0),
    }
    if paper is not None:
        out["paper_protocol"] = {
            "proposal_density": "q(z|e)",
            "nll_nats": paper["nll_nats"],
            "nll_stderr": paper["nll_stderr"],
            "nll_mc_stderr": paper["nll_mc_stderr"],
            "nll_nats_by_log_z": paper["nll_nats_by_log_z"],
            "nll_nats_sub": paper["nll_nats_sub"],
            "ess_mean": paper["ess_mean"],
        }
        per_image["nll_nats_paper_protocol"] = -paper["log_px_nats"].mean(0)
    out["seconds"] = time.perf_counter() - t0
    out["nll_per_image"] = {k: v.tolist() for k, v in per_image.items()}
    return out


def total_stderr(test_set: float, monte_carlo: float, log_z: float) -> float:
    """The NLL's whole standard error, nats: √(se_test² + se_MC² + se_logZ²).

    log Ẑ enters every image's NLL as the same constant, so its error does not average out over
    the test set: it adds in quadrature to the test-set error (sd over images / √n) and the
    importance sampler's Monte-Carlo error. The test-set term already holds part of the Monte-Carlo
    noise, so the sum errs on the large side."""
    return math.sqrt(test_set**2 + monte_carlo**2 + log_z**2)
