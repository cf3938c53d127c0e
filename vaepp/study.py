"""From a validated run (`config.RunConfig`) to the library's arguments and fits: the ModelSpec,
the training algorithm (the train and latent-GAN params are passed as validated), and the one call
each fitting stage makes (`fit_vae`, `fit_run_latent_gan`). The one place where "auto" settings
are decided from the dataset.

A fit resumes a checkpoint only if it was written with the same settings on the same data (and,
for the latent GAN, posterior samples of the same VAE file): `checkpoints.keep_or_discard`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from . import checkpoints, io
from .config import RunConfig
from .distributed import DistContext, ShardedLatentModel
from .latent_gan import LatentGAN, fit_latent_gan, latent_gan_settings, moment_gap, posterior_samples
from .model import VAEPP, ModelSpec
from .train import Algorithm, TrainResult, train, train_settings

Say = Callable[[str], None]


def model_spec(run: RunConfig, image_shape: tuple[int, int, int], binary: bool) -> ModelSpec:
    """Likelihood "auto": Bernoulli on binary data, discretised logistic otherwise; posterior
    "auto": Normal truncated at ±2σ with a Bernoulli likelihood (the paper's default on binary
    data), Normal otherwise.
    `vaepp_flow` runs add `model.n_flows` planar flows; `vae` runs have no pull-back (β ≡ 0)."""
    m = run.model
    likelihood = m.likelihood if m.likelihood != "auto" else ("bernoulli" if binary else "logistic")
    posterior = m.posterior if m.posterior != "auto" else ("truncated" if likelihood == "bernoulli" else "normal")
    return ModelSpec(
        image_shape=tuple(image_shape),
        zdim=m.zdim,
        likelihood=likelihood,
        logistic_scale=m.logistic_scale,
        arch=m.arch,
        hidden=tuple(m.hidden),
        channels=tuple(m.channels),
        posterior=posterior,
        log_sigma_min=m.log_sigma_min,
        n_flows=m.n_flows if run.algorithm == "vaepp_flow" else 0,
        pullback=run.algorithm != "vae",
        beta_max=m.beta_max,
    )


def train_algorithm(run: RunConfig) -> Algorithm:
    """The training algorithm of a run: `vaepp_flow` trains as VAEPP (Algorithm 2) with flows."""
    return "vaepp" if run.algorithm == "vaepp_flow" else run.algorithm


def _resume_or_start(ctx: DistContext, path: Path, expected: dict, say: Say | None) -> None:
    """Rank 0 keeps or deletes the checkpoint; every rank waits until it has."""
    if ctx.is_writer:
        note = checkpoints.keep_or_discard(path, expected)
        if note and say is not None:
            say(note)
    ctx.barrier()


def fit_vae(
    run: RunConfig,
    images: Tensor,
    meta: dict,
    ctx: DistContext,
    *,
    checkpoint_path: Path,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    say: Say | None = None,
) -> tuple[VAEPP, TrainResult, dict]:
    """The train stage's work: the run's model trained on uint8 images (N, C, H, W), resuming a
    matching checkpoint at `checkpoint_path`. Returns (model, result, settings for `save_vae`)."""
    spec = model_spec(run, tuple(images.shape[1:]), meta["binary"])
    algorithm = train_algorithm(run)
    settings = train_settings(spec, run.train, algorithm)
    origin = {"data_sha256": meta.get("sha256"), "n_train": int(images.shape[0])}
    _resume_or_start(ctx, checkpoint_path, {**settings, **origin}, say)
    torch.manual_seed(run.train.seed)
    model = VAEPP(spec)
    extra = {"run": run.model_dump(mode="json"), "dataset_meta": meta, **origin}
    result = train(
        model,
        images,
        run.train,
        algorithm,
        device=ctx.device,
        ctx=ctx,
        callback=callback,
        progress=progress,
        checkpoint=checkpoints.Checkpoint(checkpoint_path, write=ctx.is_writer, extra=extra),
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
    """The fit-latent-gan stage's work (paper §4.3): the latent GAN fitted to one posterior draw
    per training image, redrawn every epoch, resuming a matching checkpoint. Returns (gan,
    history, settings for `save_latent_gan`, moment gaps between 10⁴ GAN samples and the pool)."""
    params = run.latent_gan
    torch.manual_seed(params.seed)
    sharded = ShardedLatentModel(model, ctx)  # the encoder passes split across ranks

    def encode_sample(e: Tensor) -> Tensor:
        mu, log_sigma = sharded.encode(e.to(ctx.device))
        return model.sample_q(mu, log_sigma, 1)[0][0]

    pool = lambda: posterior_samples(encode_sample, images)  # noqa: E731
    gan = LatentGAN(model.zdim, params.noise_dim, params.hidden)
    settings = latent_gan_settings(params, model.zdim)
    origin = {
        "vae_sha256": io.file_digest(vae_path),
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
