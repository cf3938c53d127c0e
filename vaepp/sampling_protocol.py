"""The sampling protocol of the sample-mala stage (paper §4.3).

z₀ from the latent GAN for every run ("GAN-VAEPP" decodes z₀ directly); the headline samples are
the prior's own (`prior.sample`): for the pull-back prior MALA from z₀ on
E(z) = β·D(G(z)) + ½‖z‖², for a certified prior exact samples by rejection (then MALA only if
mala.n_steps > 0), for N(0, I) exact draws.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from . import distributed as vdist
from .config import MALAParams
from .evaluate import REPORTS_PER_LOOP, Progress, throttled
from .images import decode_images


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
    z, info = model.prior.sample(
        model, z0, ctx, p, generator=gen, device=device, progress=progress, callback=mala_progress
    )
    metrics.update(info)
    images, images_gan = decode_images(model, z), decode_images(model, z0)
    metrics["seconds"] = time.perf_counter() - t0
    return images, images_gan, metrics
