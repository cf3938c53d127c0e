"""The FID protocol of the compute-fid stage.

FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) of both sample sets against the first n
reference images, beside both for as many held-out real images (the floor), with the reference
and held-out features cached per dataset file and protocol (`vaepp.fid_cache`), and the
half-sample error bars of each (`vaepp.fid_error_bars`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from . import distributed as vdist
from .config import FIDParams
from .evaluate import REPORTS_PER_IMAGE_SET, Progress, throttled, unit_batches
from .fid_cache import feature_cache_path, reference_features
from .fid_error_bars import ErrorBars, error_bars
from .fid_features import FeatureSet, feature_stats, features_and_stats
from .kid import KernelDistance, kernel_inception_distance

# What fid.json repeats of mala.json, so a FID is read with the sampler that made its images.
SAMPLER_FIELDS = ("sampler", "mala_acceptance", "mala_steps", "mala_step_size")
# KID's subset protocol (Bińkowski et al. 2018): 100 subsets of m = min(1000, n) rows, one seed.
KID_SUBSETS, KID_MAX_SUBSET, KID_SEED = 100, 1000, 0
# Error bars of each set's FID and KID (`fid_error_bars.error_bars`): half-samples of its n images, one seed.
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
    (`kid.kernel_inception_distance`), from the same Inception features as the FID. Both sides'
    features are at hand, so each FID goes through `fid.frechet_distance_of_sets` (exact, and an
    n × n_reference problem rather than a 2048² matrix square root when n < 2048).
    Error bars, for the draw of each set's n images with the reference set fixed
    (`fid_error_bars.error_bars`: FID_BOOTSTRAP half-samples of ⌊n/2⌋ images without
    replacement, seed FID_BOOTSTRAP_SEED): fid*_ci_low and fid*_ci_high, a 95% interval for the FID expected of n
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

    def cached_set(name: str, key: str, images: Tensor) -> FeatureSet | None:
        """The set's features from the cache, or from one sharded pass that rank 0 caches."""
        hit = ctx.broadcast_flag(feature_cache_path(stats_dir, key).exists())
        if ctx.is_writer:
            done = images_done(name, images.shape[0])
            return reference_features(key, lambda: unit_batches(images, batch), stats_dir, net, **kw, callback=done)
        if not hit:  # take part in rank 0's sharded feature pass; rank 0 writes the cache
            feature_stats(net, unit_batches(images, batch), **kw)
        return None

    ref = cached_set("reference", f"{dataset}-{p.reference}-first{n_ref}-{reference_digest[:12]}", reference[:n_ref])
    t_floor = time.perf_counter()
    floor = cached_set("held_out", f"{dataset}-{held}-first{n_held}-{held_out_digest[:12]}", held_out[:n_held])
    t_floor = time.perf_counter() - t_floor

    def kid(features: Tensor) -> KernelDistance:
        return kernel_inception_distance(
            features, ref.features, n_subsets=KID_SUBSETS, max_subset_size=KID_MAX_SUBSET, seed=KID_SEED
        )

    def bars(features: FeatureSet) -> ErrorBars:
        """The set's FID (`fid.frechet_distance_of_sets`) with its error bars and KID's."""
        return error_bars(features, ref, n_resamples=FID_BOOTSTRAP, seed=FID_BOOTSTRAP_SEED)

    def scores(name: str, images: Tensor) -> tuple[ErrorBars, KernelDistance] | None:
        batches = unit_batches(images[: p.n_samples], batch)
        if not ctx.is_writer:
            feature_stats(net, batches, **kw)
            return None
        features, stats = features_and_stats(net, batches, **kw, callback=images_done(name, p.n_samples))
        return bars(FeatureSet(features, *stats.mean_cov())), kid(features)

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
