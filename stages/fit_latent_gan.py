"""fit-latent-gan: fit the latent GAN of paper §4.3 to a trained VAE's posteriors.

Outputs (paths from dvc.yaml): --latent-gan (the model), --out (latent_gan.json: final losses and
the moment gaps between GAN samples and posterior samples). While it fits, a resumable checkpoint
sits at --checkpoint; it resumes only a fit of the same settings on posterior samples of the same
VAE file and data, and is removed once the outputs are written (`vaepp.fit.fit_run_latent_gan`).
With `distributed.nproc_per_node: N` (or under `torchrun`), N processes fit with
DistributedDataParallel on the same global batch; only rank 0 writes (docs/distributed.md).
"""

from __future__ import annotations

from stages import cli, inputs, track
from stages.boot import boot


def _main(argv: list[str] | None) -> int:
    args = cli.parser(__doc__.splitlines()[0], paths=("data", "vae", "latent_gan", "out", "checkpoint")).parse_args(
        argv
    )
    run = inputs.load_run(args)
    dev = cli.device(args.device, run.device)
    return cli.distributed_main(args, run, dev, __spec__.name, argv, _fit)


def _fit(args, run, ctx) -> int:
    from vaepp import artifacts, checkpoints, fit
    from vaepp.files import atomic_write_json

    splits = inputs.load_data(args.data, run)
    images, meta = splits.train, splits.meta  # the posteriors of the training split only
    model, _ = artifacts.load_vae(args.vae, ctx.device)
    ds = inputs.dataset_input(run, meta, args.data, context="training")
    with track.stage_run(args, "fit-latent-gan", run, run.latent_gan.model_dump(), ctx, dataset=ds) as log:
        gan, history, settings, gap = fit.fit_run_latent_gan(
            run,
            model,
            args.vae,
            images,
            meta,
            ctx,
            checkpoint_path=args.checkpoint,
            say=cli.say,
            callback=lambda epoch, m: log.log_metrics(m, step=epoch),
            progress=not args.no_progress and ctx.is_writer,
        )
        if not ctx.is_writer:
            return 0
        metrics = {
            **{f"final_{k}": v for k, v in history[-1].items()},
            **gap,
            "epochs": run.latent_gan.epochs,
            "seconds": sum(h["seconds"] for h in history),
        }
        artifacts.save_latent_gan(args.latent_gan, gan, settings, history=history)
        atomic_write_json(args.out, metrics)
        checkpoints.finish(args.checkpoint)
        log.log_metrics(gap)
    print(f"{run.name}: latent GAN mean gap {gap['mean_gap']:.3f}, cov gap {gap['cov_gap']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    boot()
    return cli.guarded(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
