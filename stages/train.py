"""train: fit one run's VAE (plain VAE, Naive VAEPP or VAEPP) and write its model and metrics.

Outputs (paths from dvc.yaml): --vae (the model), --curve (per-epoch metrics, CSV), --out
(train.json). While it trains, a resumable checkpoint sits at --checkpoint: a killed run
continues where it stopped when the stage is rerun with the same params (with other params it
starts afresh); it is removed once the outputs are written (`vaepp.fit.fit_vae`).
With `train.patience` the fit stops early on the monitor's validation NLL and --vae holds the
best checked epoch's weights; train.json then adds best_epoch, stopped_early and epochs_trained.
With `distributed.nproc_per_node: N` (or under `torchrun`), N processes train with
DistributedDataParallel on the same global batch; only rank 0 writes (docs/distributed.md).
"""

from __future__ import annotations

from stages import cli, inputs, track
from stages.boot import boot


def _main(argv: list[str] | None) -> int:
    args = cli.parser(__doc__.splitlines()[0], paths=("data", "vae", "curve", "out", "checkpoint")).parse_args(argv)
    run = inputs.load_run(args)
    dev = cli.device(args.device, run.device)
    return cli.distributed_main(args, run, dev, __spec__.name, argv, _train)


def _train(args, run, ctx) -> int:
    from vaepp import artifacts, checkpoints, evaluate, fit, resolve
    from vaepp.files import atomic_write_csv, atomic_write_json

    splits = inputs.load_data(args.data, run)  # the training split is fitted, the validation split monitored
    images, meta = splits.train, splits.meta
    ds = inputs.dataset_input(run, meta, args.data, context="training")
    with track.stage_run(args, "train", run, run.model_dump(), ctx, dataset=ds) as log:
        model, result, settings = fit.fit_vae(
            run,
            images,
            meta,
            ctx,
            checkpoint_path=args.checkpoint,
            valid=splits.valid,
            say=cli.say,
            callback=lambda epoch, m: log.log_metrics(m, step=epoch),
            progress=not args.no_progress and ctx.is_writer,
        )
        if not ctx.is_writer:
            return 0
        metrics = {
            "run": run.name,
            "dataset": run.data.dataset,
            **evaluate.training_summary(
                result.history,
                algorithm=resolve.method(run),
                n_train=int(images.shape[0]),
                seconds=result.seconds,
                resumed_from_epoch=result.resumed_from_epoch,
            ),
        }
        if run.train.patience is not None:  # early stopping: the model saved is the best epoch's
            metrics.update(
                best_epoch=result.best_epoch, stopped_early=result.stopped_early, epochs_trained=result.epochs
            )
        artifacts.save_vae(
            args.vae, model, settings, run=run.model_dump(mode="json"), dataset_meta=meta, history=result.history
        )
        atomic_write_csv(args.curve, result.history)
        atomic_write_json(args.out, metrics)
        checkpoints.finish(args.checkpoint)
        log.log_metrics({f"final_{k}": v for k, v in track.numbers(metrics).items()})
        log.log_artifact(args.curve)
    checked = f", log Z {metrics['log_z_monitor']:.2f} monitored" if "log_z_monitor" in metrics else ""
    print(
        f"{run.name}: ELBO {metrics['elbo_under_train_log_z']:.2f} nats under the training log Z "
        f"{metrics['log_z_train']:.2f}{checked}, β {metrics['beta']:.3f}, {result.seconds:.0f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    boot()
    return cli.guarded(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
