"""The one call each fitting stage makes (`fit_vae`, `fit_run_latent_gan`), with the run's
"auto" settings resolved by `vaepp.resolve`.

A fit resumes a checkpoint only if it was written with the same settings on the same data (and,
for the latent GAN, posterior samples of the same VAE file): `checkpoints.keep_or_discard`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from . import checkpoints, files
from .config import RunConfig
from .data import subset_indices
from .distributed import DistContext, ShardedLatentModel
from .latent_gan import LatentGAN, fit_latent_gan, latent_gan_settings, moment_gap, posterior_samples
from .log_z_monitor import log_z_monitor
from .model import VAEPP
from .resolve import latent_gan_params, model_spec, train_params
from .train import TrainResult, train, train_settings

Say = Callable[[str], None]


def _resume_or_start(ctx: DistContext, path: Path, expected: dict, say: Say | None) -> None:
    """Rank 0 keeps or deletes the checkpoint; every rank waits until it has."""
    if ctx.is_writer:
        note = checkpoints.keep_or_discard(path, expected)
        if note and say is not None:
            say(note)
    ctx.barrier()


def monitor_images(valid: Tensor, n: int, seed: int) -> Tensor:
    """The validation images the log-Z monitor scores: valid[`data.subset_indices`(len, n, seed)],
    the first n of a seeded permutation of the validation split (a uniform random sample, in that
    order). valid: uint8 (N, C, H, W); returns (n, C, H, W). A ValueError if n > N."""
    if n > valid.shape[0]:
        raise ValueError(
            f"train.monitor.valid_images = {n}: the validation split has only {valid.shape[0]} images; "
            "lower it or raise data.n_valid"
        )
    return valid[subset_indices(int(valid.shape[0]), n, seed)]


def fit_vae(
    run: RunConfig,
    images: Tensor,
    meta: dict,
    ctx: DistContext,
    *,
    checkpoint_path: Path,
    valid: Tensor | None = None,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    say: Say | None = None,
) -> tuple[VAEPP, TrainResult, dict]:
    """The train stage's work: the run's model trained on the uint8 training split `images`
    (N, C, H, W), resuming a matching checkpoint at `checkpoint_path`, with the log-Z monitor
    (`log_z_monitor.log_z_monitor`) every `train.log_z_every` epochs on validation images (none
    without `valid`): `monitor_images(valid, ...)`, the same images at every check. With
    `train.patience` the fit stops early on the monitor's validation NLL and the model returned
    holds its best checked epoch's weights (`train.train`; it needs `valid`).
    Returns (model, result, settings for `save_vae`)."""
    spec = model_spec(run, tuple(images.shape[1:]), meta["binary"])
    params = train_params(run, meta["binary"])
    settings = train_settings(spec, params)
    origin = {
        "data_sha256": meta.get("sha256"),
        "n_train": int(images.shape[0]),
        "n_valid": None if valid is None else int(valid.shape[0]),
        "subset_seed": run.data.subset_seed,
    }
    monitor = None
    if valid is not None and params.log_z_every:
        scored = monitor_images(valid, params.monitor.valid_images, run.data.subset_seed)
        monitor = lambda m: log_z_monitor(m, scored, params.monitor, device=ctx.device)  # noqa: E731
    _resume_or_start(ctx, checkpoint_path, {**settings, **origin}, say)
    torch.manual_seed(params.seed)
    model = VAEPP(spec)
    extra = {"run": run.model_dump(mode="json"), "dataset_meta": meta, **origin}
    result = train(
        model,
        images,
        params,
        device=ctx.device,
        ctx=ctx,
        callback=callback,
        progress=progress,
        checkpoint=checkpoints.Checkpoint(checkpoint_path, write=ctx.is_writer, extra=extra),
        monitor=monitor,
    )
    return model, result, settings


def fit_run_latent_gan(
    run: RunConfig,
    model: VAEPP,
    vae_path: Path,
    images: Tensor,
    meta: dict,
    ctx: DistContext,
    *,
    checkpoint_path: Path,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    say: Say | None = None,
) -> tuple[LatentGAN, list[dict], dict, dict]:
    """The fit-latent-gan stage's work (paper §4.3): the latent GAN fitted, resuming a matching
    checkpoint, to the training images' posteriors: with `inputs` "mean" (resolved on Bernoulli
    data) to the means μ(e) (N, zdim), computed once; with "sample" to one draw z ~ q(z|e) per image,
    redrawn every epoch. Returns (gan, history, settings for `save_latent_gan`, moment gaps
    between 10⁴ GAN samples and the pool)."""
    params = latent_gan_params(run, meta["binary"])
    torch.manual_seed(params.seed)
    sharded = ShardedLatentModel(model, ctx)  # the encoder passes split across ranks

    def encode_mean(e: Tensor) -> Tensor:
        return sharded.encode(e.to(ctx.device))[0]

    def encode_sample(e: Tensor) -> Tensor:
        mu, log_sigma = sharded.encode(e.to(ctx.device))
        return model.sample_q(mu, log_sigma, 1)[0][0]

    if params.inputs == "mean":
        means = posterior_samples(encode_mean, images)  # deterministic: draws nothing from the RNG
        pool = lambda: means  # noqa: E731
    else:
        pool = lambda: posterior_samples(encode_sample, images)  # noqa: E731
    gan = LatentGAN.from_params(model.zdim, params)
    settings = latent_gan_settings(params, model.zdim)
    origin = {
        "vae_sha256": files.file_digest(vae_path),
        "data_sha256": meta.get("sha256"),
        "n_train": int(images.shape[0]),
    }
    _resume_or_start(ctx, checkpoint_path, {**settings, **origin}, say)
    history = fit_latent_gan(
        gan,
        pool,
        params,
        device=ctx.device,
        ctx=ctx,
        progress=progress,
        callback=callback,
        checkpoint=checkpoints.Checkpoint(checkpoint_path, write=ctx.is_writer, extra=origin),
    )
    with torch.inference_mode():
        gap = moment_gap(gan.sample(10000, device=ctx.device), pool()[:10000])
    return gan, history, settings, gap
