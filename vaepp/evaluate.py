"""The evaluation protocols: what the estimate-nll, sample-mala and compute-fid stages compute.

Each function takes validated params (`vaepp.config`), a trained model and a `DistContext`
(identity on one process) and returns the metrics dict that its stage writes as JSON, so the
protocol is unit-tested without DVC:

- `nll_protocol`: test NLL by importance sampling (paper §5) from a full-support proposal (by
  default `importance.defensive_proposal`; the paper's q(z|e) beside it) under every estimate of
  log Z. For a pull-back prior the estimates are the paper's q-based Ẑ_q over the training set
  (eq. 8; not a bound), N(0, I)-proposal importance sampling with its effective sample size, and
  annealed importance sampling (Neal 2001) from N(0, I) to p_λ, spread over seeds. Both N(0, I)-IS
  and AIS are unbiased for Z, hence in expectation LOWER estimates of log Z (Jensen), so the
  larger of the two heads `nll_nats` (the less optimistic NLL); the paper-protocol NLL is
  reported beside it, never in its place. The plain VAE has log Z = 0 exactly.
- `sampling_protocol`: paper §4.3. Pull-back runs: z₀ from the latent GAN, then MALA on
  E(z) = β·D(G(z)) + ½‖z‖²; "GAN-VAEPP" decodes z₀ directly. Plain VAE: z ~ N(0, I), its prior.
- `log_z_monitor`: the check that training runs every `train.log_z_every` epochs: AIS on a small
  budget with its spread over seeds and N(0, I)-IS with its ESS, the larger heading (as in the
  NLL), and the NLL of a few validation images under it.
- `fid_protocol`: FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) of both sample sets
  against the first n reference images, beside both for as many held-out real images (the
  floor), with the reference and held-out features cached per dataset file and protocol.

Progress: `nll_protocol`, `sampling_protocol` and `fid_protocol` take an optional
`callback(name, value, step)`, called as the work advances with the values each docstring lists,
at most every 5% of a loop of temperatures or MALA steps and every 10% of an image set, and at its
end (a few dozen calls per protocol). The callbacks read numbers the estimators compute anyway and
draw no random number, so every result is the same with or without one.

Seeds: the NLL uses nll.seed for the q-based estimate, seed + 1 for N(0, I)-IS, seed + 100 + s
for AIS seed s, seed + 5 for the test-set samples from the full-support proposal, seed + 2 for those from the
paper's q(z|e) and seed + 4 for the binarisations (the same for every run and proposal, so that
runs compare image by image), so every estimate has its own stream.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from . import distributed as vdist
from .config import FIDParams, MALAParams, MonitorParams, NLLParams
from .importance import defensive_proposal
from .logz import log_z_ais, log_z_prior_is, log_z_q_based
from .mala import mala
from .nll import estimate_nll
from .sampling import decode_images

SPLIT_NAMES = {"test": "test", "valid": "validation"}  # nll.split → the images' name in a protocol text
# The independent estimates that may head the NLL; each is a lower estimate of log Z in
# expectation, so the larger is chosen.
HEADLINE_CANDIDATES = ("prior_is", "ais")

# Why a certified prior with LARS's truncated sampler has no NLL here (config.RunConfig rejects it).
TRUNCATED_NLL = (
    "a certified prior with a finite model.truncation has no NLL protocol: its density "
    "p_T(z) = N(z; 0, I)·(a(z)(1 − α)/Z + α), α = (1 − Z)^(T − 1), is not f(z)/Z, so no log Ẑ constant "
    "gives its log p(x); set model.truncation: null"
)
# callback(name, value, step): a progress value of a protocol (see the module docstring)
Progress = Callable[[str, float, int], None]
# Progress reports per series: every 5% of a loop of temperatures or MALA steps, every 10% of a
# set of test or Inception images (their batches are coarser steps), and the last step.
REPORTS_PER_LOOP, REPORTS_PER_IMAGE_SET = 20, 10


def throttled(callback: Progress | None, prefix: str, total: int, reports: int) -> Progress | None:
    """`callback` for one series of progress values whose steps run up to `total`: names get
    `prefix`, and only the steps that complete another 1/reports of `total`, and the last, are
    passed on (every value of such a step), so at most `reports` steps whatever the loop's length.
    None without a callback."""
    if callback is None:
        return None
    total = max(total, 1)
    state = {"step": 0, "due": False}

    def report(name: str, value: float, step: int) -> None:
        if step != state["step"]:  # a new step: due if it crosses a multiple of total / reports
            state["due"] = step >= total or step * reports // total > state["step"] * reports // total
            state["step"] = step
        if state["due"]:
            callback(prefix + name, value, step)

    return report


def _estimate_reporter(callback: Progress | None) -> Callable:
    """estimate → estimate, calling callback(f"log_z.{name}", log Ẑ in nats, k) for the k-th
    estimate of log Z finished (k = 1, 2, ...: its place in the protocol)."""
    count = itertools.count(1)

    def report(estimate):
        if callback is not None:
            callback(f"log_z.{estimate.name}", estimate.log_z, next(count))
        return estimate

    return report


def unit_batches(images: Tensor, batch: int, device: torch.device | str = "cpu") -> Iterator[Tensor]:
    """uint8 images (N, C, H, W) → float batches in [0, 1] of at most `batch` images on `device`."""
    for i in range(0, images.shape[0], batch):
        yield images[i : i + batch].to(device).float().div_(255.0)


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
    if not model.spec.pullback:
        return {}, "exact"
    if model.spec.certified and model.spec.truncation is not None:
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
    if model.spec.certified:
        found += _certified_estimates(model, lz, p, device=device, progress=progress, callback=callback, report=report)
    estimates = {e.name: dataclasses.asdict(e) for e in found}
    if model.spec.certified:
        return estimates, "certificate"  # log Z's upper end at 1 − δ: the honest direction
    headline = max(HEADLINE_CANDIDATES, key=lambda n: estimates[n]["log_z"])
    return estimates, headline


def _certified_estimates(model, lz, p: NLLParams, *, device, progress: bool, callback, report) -> list:
    """A certified prior's extra estimates: the certificate on Z = E_N[a] (`certified.
    log_z_certificate`; its upper end heads the NLL) and reverse AIS from exact samples (a
    stochastic upper estimate of log Z; with forward AIS, bidirectional Monte Carlo). Seeds:
    nll.seed + 3 for the certificate, seed + 200 + s for reverse-AIS seed s (its exact samples
    from seed + 300). Progress to `callback` and each finished estimate to `report`, as in
    `log_z_protocol`."""
    from .certified import log_z_certificate, rejection_sample
    from .logz import log_z_reverse_ais

    gen = torch.Generator(device=device)
    cert = report(
        log_z_certificate(
            model.log_acceptance_of,
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
            model.log_acceptance_of,
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


def log_z_monitor(model, valid: Tensor, params: MonitorParams, *, device: torch.device | str) -> dict[str, float]:
    """An independent estimate of the current prior's log Z during training, and the validation
    NLL under it: what the training estimate log Z_train (`prior.log_z_train`) is checked against.

    valid: the uint8 validation images to score (N, C, H, W), all of them (the caller picks them:
    `study.monitor_images`), with `params.n_importance` samples each from the NLL's default
    full-support proposal (`importance.defensive_proposal`; a fresh
    binarisation on Bernoulli data). Returns, in nats: monitor_log_z (the larger of AIS and
    N(0, I)-IS: both are lower estimates in expectation), monitor_log_z_ais with
    monitor_log_z_ais_seed_sd (sd of the per-seed values), monitor_log_z_prior_is with
    monitor_prior_is_ess, monitor_valid_nll with its standard error over the images
    (monitor_valid_nll_stderr), and monitor_seconds. The plain VAE has log Z = 0 exactly and
    gets only the NLL.
    The global RNG is left as it was: the check draws from its own seeded generators, so a
    monitored fit trains exactly as an unmonitored one.
    """
    t0 = time.perf_counter()
    out: dict[str, float] = {"monitor_log_z": 0.0}
    gen = torch.Generator(device=device)
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        if model.spec.pullback:
            prior_is = log_z_prior_is(
                model.log_f,
                model.zdim,
                params.prior_is_samples,
                generator=gen.manual_seed(params.seed + 1),
                device=device,
            )
            ais = log_z_ais(
                model.log_f,
                model.zdim,
                n_chains=params.ais_chains,
                n_temps=params.ais_temps,
                seeds=tuple(params.seed + 100 + s for s in range(params.ais_seeds)),
                device=device,
            )
            out = {
                "monitor_log_z": max(prior_is.log_z, ais.log_z),
                "monitor_log_z_ais": ais.log_z,
                "monitor_log_z_prior_is": prior_is.log_z,
                "monitor_prior_is_ess": prior_is.ess,
            }
            if ais.extra["seed_std"] is not None:  # one seed has no spread
                out["monitor_log_z_ais_seed_sd"] = ais.extra["seed_std"]
        nll = estimate_nll(
            model,
            unit_batches(valid, 100, device),
            n_importance=params.n_importance,
            log_z=out["monitor_log_z"],
            binarize=model.spec.likelihood == "bernoulli",
            proposal=defensive_proposal,  # the NLL's full-support default (importance.DEFENSIVE_*)
            generator=torch.Generator(device=device).manual_seed(params.seed + 2),
        )
    out["monitor_valid_nll"] = nll["nll_nats"]
    out["monitor_valid_nll_stderr"] = nll["nll_stderr"]
    out["monitor_seconds"] = time.perf_counter() - t0
    return out


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


def total_stderr(test_set: float, monte_carlo: float, log_z: float) -> float:
    """The NLL's whole standard error, nats: √(se_test² + se_MC² + se_logZ²).

    log Ẑ enters every image's NLL as the same constant, so its error does not average out over
    the test set: it adds in quadrature to the test-set error (sd over images / √n) and the
    importance sampler's Monte-Carlo error. The test-set term already holds part of the Monte-Carlo
    noise, so the sum errs on the large side."""
    return math.sqrt(test_set**2 + monte_carlo**2 + log_z**2)


def sampling_protocol(
    model,
    gan,
    ctx: vdist.DistContext,
    params: MALAParams,
    *,
    device: torch.device | str,
    progress: bool = False,
    callback: Progress | None = None,
) -> tuple[Tensor, Tensor, dict]:
    """Images from a run: (images, GAN-VAEPP images, metrics), images uint8 (n_samples, C, H, W).

    One generator seeded with mala.seed draws z₀ from the latent GAN, then the MALA noise (or,
    for the plain VAE, z ~ N(0, I); for a certified prior, exact samples by rejection, then MALA
    only if mala.n_steps > 0). On W processes the chains' energy gradients are sharded.

    callback(name, value, step), if given and MALA runs, gets every 5% of the steps, at step =
    MALA steps done: mala.steps_done (that count) and mala.acceptance_running (the fraction of
    proposals accepted over the steps done and all chains, unitless; `mala_acceptance` at the end).
    """
    p = params
    mala_progress = throttled(callback, "mala.", p.n_steps, REPORTS_PER_LOOP)
    gen = torch.Generator(device=device).manual_seed(p.seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        z0 = gan.sample(p.n_samples, generator=gen, device=device)
    metrics: dict = {"n_samples": p.n_samples, "mala_steps": p.n_steps, "mala_step_size": p.step_size}
    if model.spec.certified:  # exact samples by rejection; MALA from them when mala.n_steps > 0
        from .certified import rejection_sample

        with torch.inference_mode():
            z, info = rejection_sample(
                model.log_acceptance_of,
                model.zdim,
                p.n_samples,
                truncation=model.spec.truncation,
                generator=gen,
                device=device,
            )
        metrics.update(sampler="exact (rejection)", rejection_acceptance=info["acceptance_rate"], mala_acceptance=None)
        if p.n_steps > 0:
            z, acceptance, _ = mala(
                vdist.shard_rows(ctx, model.energy_and_grad),
                z,
                p.n_steps,
                p.step_size,
                generator=gen,
                progress=progress,
                callback=mala_progress,
            )
            metrics.update(sampler="exact (rejection) + MALA", mala_acceptance=float(acceptance))
    elif model.spec.pullback:
        z, acceptance, stats = mala(
            vdist.shard_rows(ctx, model.energy_and_grad),
            z0.clone(),
            p.n_steps,
            p.step_size,
            generator=gen,
            progress=progress,
            callback=mala_progress,
        )
        metrics.update(
            mala_acceptance=float(acceptance),
            sampler="latent GAN + MALA",
            **{f"mala_{k}": v for k, v in stats.items() if isinstance(v, (int, float))},
        )
    else:
        z = torch.randn(p.n_samples, model.zdim, generator=gen, device=device)
        metrics.update(mala_acceptance=None, sampler="prior N(0, I)")
    images, images_gan = decode_images(model, z), decode_images(model, z0)
    metrics["seconds"] = time.perf_counter() - t0
    return images, images_gan, metrics


# What fid.json repeats of mala.json, so a FID is read with the sampler that made its images.
SAMPLER_FIELDS = ("sampler", "mala_acceptance", "mala_steps", "mala_step_size")
# KID's subset protocol (Bińkowski et al. 2018): 100 subsets of m = min(1000, n) rows, one seed.
KID_SUBSETS, KID_MAX_SUBSET, KID_SEED = 100, 1000, 0
# Error bars of each set's FID and KID (`fid.error_bars`): half-samples of its n images, one seed.
FID_BOOTSTRAP, FID_BOOTSTRAP_SEED = 200, 0
# The floor's held-out images: the split that is not the reference.
HELD_OUT = {"train": "test", "test": "train"}


def fid_protocol(
    net,
    ctx: vdist.DistContext,
    samples: Tensor,
    samples_gan: Tensor,
    reference: Tensor,
    held_out: Tensor,
    params: FIDParams,
    *,
    sampler: dict,
    dataset: str,
    reference_digest: str,
    held_out_digest: str,
    stats_dir: Path,
    sampled: dict[str, str] | None = None,
    device: torch.device | str,
    progress: bool = False,
    callback: Progress | None = None,
) -> dict:
    """FID and KID of the MALA samples and (when params.latent_gan_samples; else their keys hold
    None) of the latent-GAN samples against the first n_reference
    images, beside the same FID and KID for real held-out images (the floor).

    reference: uint8 images (N, C, H, W) of split `params.reference`; held_out: those of the other
    split, whose first n_samples images are scored against the same reference set, so the floor
    is the FID that real images get at this N and protocol (FID is biased upward at finite N;
    Bińkowski et al. 2018, "Demystifying MMD GANs"). KID: the unbiased MMD² with the cubic kernel
    (`fid.kernel_inception_distance`), from the same Inception features as the FID. Both sides'
    features are at hand, so each FID goes through `fid.frechet_distance_of_sets` (exact, and an
    n × n_reference problem rather than a 2048² matrix square root when n < 2048).
    Error bars, for the draw of each set's n images with the reference set fixed
    (`fid.error_bars`: FID_BOOTSTRAP half-samples of ⌊n/2⌋ images without replacement, seed
    FID_BOOTSTRAP_SEED): fid*_ci_low and fid*_ci_high, a 95% interval for the FID expected of n
    images against this reference (not for the FID at infinite N, which lies below it),
    fid*_boot_sd its standard deviation, and kid*_std the standard deviation of the unbiased MMD²
    of all n images (kid*_mean stays the mean over KID_SUBSETS subsets, which is that MMD² when
    n ≤ KID_MAX_SUBSET).
    net: the Inception network (a `ShardedModule` on W processes: each rank evaluates batch_size
    images of every W·batch_size batch). reference_digest, held_out_digest: the prepared files'
    SHA-256, part of the cache keys, so features of one dataset file are never reused for another.
    sampler: the sampling stage's metrics, whose SAMPLER_FIELDS are copied into the result.
    sampled: {split: how its images were drawn} for a split that is a random sample of its file
    (the protocol text then names it so, `images_text`); other splits are the file's first images.
    Only rank 0 writes the caches and returns the metrics (other ranks return {}).

    callback(name, value, step), if given, gets fid.<set>.images_done, the images of a set through
    Inception so far at step = that count, every 10% of the set, for the sets in the order they
    are scored: reference and held_out (on a cache miss only: a cached set runs no image through
    the network), samples (MALA's, or the sampler's) and samples_gan (the latent GAN's, decoded).
    """
    from . import fid

    p = params
    if samples.shape[0] < p.n_samples:
        raise ValueError(
            f"fid.n_samples = {p.n_samples} but only {samples.shape[0]} samples were drawn; "
            "raise mala.n_samples or lower fid.n_samples"
        )
    t0 = time.perf_counter()
    batch = p.batch_size * ctx.world
    held = HELD_OUT[p.reference]
    n_ref = min(p.n_reference, reference.shape[0])
    n_held = min(p.n_samples, held_out.shape[0])
    kw = dict(batch_size=batch, device=device, progress=progress)

    def images_done(name: str, n: int):
        return throttled(callback, f"fid.{name}.", n, REPORTS_PER_IMAGE_SET)

    def cached_set(name: str, key: str, images: Tensor) -> fid.FeatureSet | None:
        """The set's features from the cache, or from one sharded pass that rank 0 caches."""
        hit = ctx.broadcast_flag(fid.feature_cache_path(stats_dir, key).exists())
        if ctx.is_writer:
            done = images_done(name, images.shape[0])
            return fid.reference_features(key, lambda: unit_batches(images, batch), stats_dir, net, **kw, callback=done)
        if not hit:  # take part in rank 0's sharded feature pass; rank 0 writes the cache
            fid.feature_stats(net, unit_batches(images, batch), **kw)
        return None

    ref = cached_set("reference", f"{dataset}-{p.reference}-first{n_ref}-{reference_digest[:12]}", reference[:n_ref])
    t_floor = time.perf_counter()
    floor = cached_set("held_out", f"{dataset}-{held}-first{n_held}-{held_out_digest[:12]}", held_out[:n_held])
    t_floor = time.perf_counter() - t_floor

    def kid(features: Tensor) -> fid.KernelDistance:
        return fid.kernel_inception_distance(
            features, ref.features, n_subsets=KID_SUBSETS, max_subset_size=KID_MAX_SUBSET, seed=KID_SEED
        )

    def bars(features: fid.FeatureSet) -> fid.ErrorBars:
        """The set's FID (`fid.frechet_distance_of_sets`) with its error bars and KID's."""
        return fid.error_bars(features, ref, n_resamples=FID_BOOTSTRAP, seed=FID_BOOTSTRAP_SEED)

    def scores(name: str, images: Tensor) -> tuple[fid.ErrorBars, fid.KernelDistance] | None:
        batches = unit_batches(images[: p.n_samples], batch)
        if not ctx.is_writer:
            fid.feature_stats(net, batches, **kw)
            return None
        features, stats = fid.features_and_stats(net, batches, **kw, callback=images_done(name, p.n_samples))
        return bars(fid.FeatureSet(features, *stats.mean_cov())), kid(features)

    ours = scores("samples", samples)
    # GAN-VAEPP: z₀ decoded directly, unless params.latent_gan_samples is off (then None)
    ours_gan = scores("samples_gan", samples_gan) if p.latent_gan_samples else None
    if not ctx.is_writer:
        return {}
    e_mala, k_mala = ours
    e_gan, k_gan = ours_gan or (None, None)
    e_floor, k_floor = bars(floor), kid(floor.features)
    return {
        "fid": e_mala.fid,
        "fid_ci_low": e_mala.fid_low,
        "fid_ci_high": e_mala.fid_high,
        "fid_boot_sd": e_mala.fid_sd,
        "fid_floor": e_floor.fid,
        "fid_floor_ci_low": e_floor.fid_low,
        "fid_floor_ci_high": e_floor.fid_high,
        "fid_floor_boot_sd": e_floor.fid_sd,
        "kid_mean": k_mala.mean,
        "kid_std": e_mala.kid_sd,
        "fid_gan": e_gan.fid if e_gan else None,
        "fid_gan_ci_low": e_gan.fid_low if e_gan else None,
        "fid_gan_ci_high": e_gan.fid_high if e_gan else None,
        "fid_gan_boot_sd": e_gan.fid_sd if e_gan else None,
        "kid_gan_mean": k_gan.mean if k_gan else None,
        "kid_gan_std": e_gan.kid_sd if e_gan else None,
        "kid_floor_mean": k_floor.mean,
        "kid_floor_std": e_floor.kid_sd,
        "kid_subset_size": k_mala.subset_size,
        "kid_floor_subset_size": k_floor.subset_size,
        "kid_subsets": KID_SUBSETS,
        "bootstrap_resamples": FID_BOOTSTRAP,
        "n_samples": p.n_samples,
        "n_reference": n_ref,
        "reference": p.reference,
        "n_held_out": n_held,
        "held_out": held,
        "protocol": (
            f"{p.n_samples} samples vs {images_text(n_ref, p.reference, sampled)} of {dataset}, "
            f"pytorch-fid Inception pool3; floor: {images_text(n_held, held, sampled)} (held out) vs the "
            f"same {n_ref} {p.reference} images; KID: cubic-kernel unbiased MMD², the mean over "
            f"{KID_SUBSETS} subsets of m = {k_mala.subset_size}; error bars for the draw of each set's "
            f"images, the reference fixed, from {FID_BOOTSTRAP} random half-samples of r = "
            f"{e_mala.subset_size} of the n = {p.n_samples} images (without replacement): sd = "
            f"√(r/(n − r)) × the sd of their FIDs (fid_boot_sd) or MMD²s (kid_std); FID 95% interval = "
            f"the FID of all n images + √(r/(n − r)) × (the 2.5% and 97.5% quantiles of their FIDs − "
            f"their mean), an interval for the FID expected of n images against this reference"
        ),
        **{k: sampler.get(k) for k in SAMPLER_FIELDS},
        "seconds": time.perf_counter() - t0,
        "seconds_floor": t_floor,
    }


def images_text(n: int, split: str, sampled: dict[str, str] | None = None) -> str:
    """How a protocol text names the first n images of a split: "the first n <split> images", or,
    for a split in `sampled` (a seeded random sample, whose every prefix is one too),
    "n <split> images <how they were drawn>"."""
    if sampled and split in sampled:
        return f"{n} {split} images {sampled[split]}"
    return f"the first {n} {split} images"


def dataset_fields(dataset: str, meta: dict) -> dict:
    """Where a metric's data came from: the dataset, its source, and whether it is a stand-in."""
    return {
        "dataset": dataset,
        "dataset_source": meta.get("source", "unknown"),
        "stand_in": bool(meta.get("stand_in", False)),
        "dataset_label": meta.get("label", dataset),
    }


def training_summary(
    history: list[dict], *, algorithm: str, n_train: int, seconds: float, resumed_from_epoch: int
) -> dict:
    """metrics/<run>/train.json: the last epoch's ELBO terms, β, training log Z and, where the
    log-Z monitor ran, its last values and the training time it took."""
    last = history[-1]
    checked = [h for h in history if "monitor_log_z" in h]
    monitor = {}
    if checked:
        m = checked[-1]
        monitor = {
            "log_z_monitor": m["monitor_log_z"],
            "log_z_monitor_epoch": m["epoch"],
            "elbo_under_monitor_log_z": m["elbo_under_monitor_log_z"],
            "valid_nll_monitor": m["monitor_valid_nll"],
            "monitor_seconds": sum(h["monitor_seconds"] for h in checked),
        }
    return {
        "algorithm": algorithm,
        "n_train": n_train,
        "elbo_under_train_log_z": last["elbo_under_train_log_z"],
        "recon": last["recon"],
        "kl": last["kl"],
        "beta": last["beta"],
        "log_z_train": last.get("log_z", 0.0),
        "epochs": len(history),
        "seconds": seconds,
        "resumed_from_epoch": resumed_from_epoch,
        **monitor,
    }
