"""train: fit one run's VAE (plain VAE, Naive VAEPP or VAEPP) and write its model and metrics.

Outputs: models/<run>/vae.pt, plots/<run>/train_curve.csv, metrics/<run>/train.json. While it
trains, a resumable checkpoint sits in checkpoints/<run>/train.ckpt: a killed run continues where
it stopped when the stage is rerun with the same params (with other params it starts afresh); it
is removed once the outputs are written.
With `distributed.nproc_per_node: N` (or under `torchrun`), N processes train with
DistributedDataParallel on the same global batch; only rank 0 writes (docs/distributed.md).
"""

from __future__ import annotations

import csv
import io as _io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages import common  # noqa: E402


def _main(argv: list[str] | None) -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    run = common.load_run(args)
    dev = common.device(args.device, run.device)

    return common.distributed_main(args, run, dev, __file__, argv, _train)


def _train(args, run, ctx) -> int:
    dev = ctx.device
    paths = common.run_paths(run.name)
    data = common.load_data(run)

    import torch

    from vaepp import io as vio
    from vaepp.checkpoints import Checkpoint, save_vae
    from vaepp.model import VAEPP
    from vaepp.study import model_spec, train_algorithm
    from vaepp.tracking import Tracker
    from vaepp.train import train, train_settings

    images = data.train[: run.data.n_train] if run.data.n_train else data.train
    mspec = model_spec(run, tuple(images.shape[1:]), data.meta["binary"])
    algorithm = train_algorithm(run)
    settings = train_settings(mspec, run.train, algorithm)
    ckpt = paths["checkpoint"]
    # resume only a run of these settings on these very images
    origin = {"data_sha256": data.meta.get("sha256"), "n_train": int(images.shape[0])}
    common.keep_or_discard_checkpoint(
        ckpt, {**settings, **origin}, ctx)

    torch.manual_seed(run.train.seed)
    model = VAEPP(mspec)
    tracker = common.tracker(args.params) if ctx.is_writer else Tracker(reason=f"rank {ctx.rank}")
    with tracker.stage_run("train", run.name, common.flat(run.model_dump())) as log:
        result = train(
            model, images, run.train, algorithm, device=dev, ctx=ctx,
            callback=lambda epoch, m: log.log_metrics(m, step=epoch),
            progress=not args.no_progress and ctx.is_writer,
            checkpoint=Checkpoint(ckpt, write=ctx.is_writer,
                                  extra={"run": run.model_dump(mode="json"), "dataset_meta": data.meta, **origin}),
        )
        if not ctx.is_writer:
            return 0
        last = result.history[-1]
        metrics = {
            "run": run.name,
            "algorithm": run.algorithm,
            "dataset": run.data.dataset,
            "n_train": int(images.shape[0]),
            "elbo": last["elbo"],
            "recon": last["recon"],
            "kl": last["kl"],
            "beta": last["beta"],
            "log_z_train": last.get("log_z", 0.0),
            "epochs": result.epochs,
            "seconds": result.seconds,
            "resumed_from_epoch": result.resumed_from_epoch,
        }
        save_vae(paths["vae"], model, settings, run=run.model_dump(mode="json"), dataset_meta=data.meta,
                 history=result.history)
        columns = sorted({k for h in result.history for k in h}, key=lambda k: (k != "epoch", k))
        buf = _io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(result.history)
        vio.atomic_write_text(paths["plots"] / "train_curve.csv", buf.getvalue())
        common.write_json(paths["metrics"] / "train.json", metrics)
        common.finish_checkpoint(ckpt)
        log.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        log.log_artifact(paths["plots"] / "train_curve.csv")
    print(f"{run.name}: ELBO {metrics['elbo']:.2f} nats, β {metrics['beta']:.3f}, {result.seconds:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.guarded(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
