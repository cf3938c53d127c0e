"""The training-time log-Z monitor: an independent estimate of the current prior's log Z, and the
validation NLL under it, every `train.log_z_every` epochs (`fit.fit_vae`)."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from .config import MonitorParams
from .evaluate import unit_batches
from .importance import defensive_proposal
from .logz import log_z_ais, log_z_prior_is
from .nll import estimate_nll


def log_z_monitor(model, valid: Tensor, params: MonitorParams, *, device: torch.device | str) -> dict[str, float]:
    """An independent estimate of the current prior's log Z during training, and the validation
    NLL under it: what the training estimate log Z_train (`prior.log_z_train`) is checked against.

    valid: the uint8 validation images to score (N, C, H, W), all of them (the caller picks them:
    `fit.monitor_images`), with `params.n_importance` samples each from the NLL's default
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
        if not model.prior.exact_log_z:
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
