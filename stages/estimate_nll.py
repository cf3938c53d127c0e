"""estimate-nll: test NLL by importance sampling, under every estimate of log Z.

The protocol (which log-Z estimators run, with which seeds and budgets, and which one heads
`nll_nats`) is `vaepp.nll_protocol`. Outputs: the --out JSON (metrics/<run>/nll.json) and
--per-image, a CSV of −log p̂(x) per test image (nats, headline log Z) for paired comparisons:
columns image (the row's place in the scored subset), test_index (the image's index in the full
prepared test set), nll_nats and the protocol's other per-image values. The scored images are the
run's test split (data.n_test: all, or a seeded random sample; `vaepp.data.split_prepared`),
recorded in the JSON as `test_subset`; the q-based log-Z estimate runs over the training split.
While it runs, the stage's MLflow run gets the protocol's progress (`nll_protocol`): the
AIS temperatures done, each log-Z estimate as it is finished, the test images done and the running
NLL; the final metrics follow at step 0.
With `distributed.nproc_per_node: N` (or under `torchrun`), the decoder and critic passes of
every estimate are split across N processes and gathered; the result is the one-process
result with the same seeds (docs/distributed.md). Only rank 0 writes.
"""

from __future__ import annotations

from stages import cli, inputs, track
from stages.boot import boot


def _main(argv: list[str] | None) -> int:
    args = cli.parser(__doc__.splitlines()[0], paths=("data", "vae", "out", "per_image")).parse_args(argv)
    run = inputs.load_run(args)
    dev = cli.device(args.device, run.device)
    return cli.distributed_main(args, run, dev, __spec__.name, argv, _estimate)


def _estimate(args, run, ctx) -> int:
    from vaepp import evaluate
    from vaepp.artifacts import load_vae
    from vaepp.files import atomic_write_csv, atomic_write_json
    from vaepp.nll_protocol import nll_protocol

    splits = inputs.load_data(args.data, run)
    meta = splits.meta
    images, indices, record = inputs.scored_images(splits, run)
    model, _ = load_vae(args.vae, ctx.device)
    ds = inputs.dataset_input(run, meta, args.data)
    with track.stage_run(args, "estimate-nll", run, run.nll.model_dump(), ctx, dataset=ds) as log:
        log.set_tags({"vaepp.phase": "estimating log Z and the NLL"})
        metrics = nll_protocol(
            model,
            ctx,
            splits.train,  # the q-based log Ẑ_q: N = the training split's size
            images,
            run.nll,
            device=ctx.device,
            progress=not args.no_progress and ctx.is_writer,
            callback=track.progress_logger(log, ctx),
        )
        if not ctx.is_writer:
            return 0
        metrics.update(run=run.name, **evaluate.dataset_fields(run.data.dataset, meta))
        metrics[f"{run.nll.split}_subset"] = record
        metrics["split"] = run.nll.split
        per_image = metrics.pop("nll_per_image")  # {column: one value per scored image}
        if any(len(values) != len(indices) for values in per_image.values()):
            raise RuntimeError(f"{run.name}: per-image values do not match the {len(indices)} scored images")
        rows = [
            {"image": i, f"{run.nll.split}_index": idx, **{k: values[i] for k, values in per_image.items()}}
            for i, idx in enumerate(indices.tolist())
        ]
        atomic_write_csv(args.per_image, rows)
        atomic_write_json(args.out, metrics)
        log.log_metrics(track.numbers(metrics))
        log.set_tags({"vaepp.phase": "done"})
    by = ", ".join(f"{k} {v:.2f}" for k, v in metrics["nll_nats_by_log_z"].items())
    print(
        f"{run.name}: NLL {metrics['nll_nats']:.2f} ± {metrics['nll_stderr']:.2f} nats "
        f"(log Z: {metrics['log_z_headline']}); by log Z: {by}; plain-VAE prior {metrics['nll_vae_prior_nats']:.2f}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    boot()
    return cli.guarded(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
