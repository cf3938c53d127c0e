"""sample-mala: draw images from a run (paper §4.3) for FID and the report.

VAEPP runs: z₀ from the latent GAN, then MALA on E(z) = βD(G(z)) + ½‖z‖², images G(z); the
"GAN-VAEPP" images are G(z₀). Plain-VAE runs: images G(z), z ~ N(0, I) (their prior), and the
latent GAN's G(z₀) as the two-stage comparison (`vaepp.sampling_protocol`).
Outputs: --samples <dir> with images.pt, images_gan.pt, grid.png, grid_gan.png; --out JSON.
While MALA runs, the stage's MLflow run gets its steps done and running acceptance rate.
With `distributed.nproc_per_node: N` (or under `torchrun`), the chains' energy gradients are
split across N processes and gathered; the chains are the one-process chains. Only rank 0 writes.
"""

from __future__ import annotations

from stages import cli, inputs, track
from stages.boot import boot


def _main(argv: list[str] | None) -> int:
    args = cli.parser(__doc__.splitlines()[0], paths=("vae", "latent_gan", "samples", "out")).parse_args(argv)
    run = inputs.load_run(args)
    dev = cli.device(args.device, run.device)
    return cli.distributed_main(args, run, dev, __spec__.name, argv, _sample)


def _sample(args, run, ctx) -> int:
    from vaepp.artifacts import load_latent_gan, load_vae
    from vaepp.files import atomic_torch_save, atomic_write_json
    from vaepp.images import save_grid
    from vaepp.sampling_protocol import sampling_protocol

    model, saved = load_vae(args.vae, ctx.device)
    gan = load_latent_gan(args.latent_gan, ctx.device)
    ds = inputs.dataset_input(run, saved.get("dataset_meta"), context="training")  # the model's training data
    with track.stage_run(args, "sample-mala", run, run.mala.model_dump(), ctx, dataset=ds) as log:
        log.set_tags({"vaepp.phase": "sampling"})
        images, images_gan, metrics = sampling_protocol(
            model,
            gan,
            ctx,
            run.mala,
            device=ctx.device,
            progress=not args.no_progress and ctx.is_writer,
            callback=track.progress_logger(log, ctx),
        )
        if not ctx.is_writer:
            return 0
        out = args.samples
        atomic_torch_save({"images": images}, out / "images.pt")
        atomic_torch_save({"images": images_gan}, out / "images_gan.pt")
        save_grid(images[:100], out / "grid.png")
        save_grid(images_gan[:100], out / "grid_gan.png")
        atomic_write_json(args.out, metrics)
        log.log_metrics(track.numbers(metrics))
        log.log_artifact(out / "grid.png")
        log.log_artifact(out / "grid_gan.png")
        log.set_tags({"vaepp.phase": "done"})
    acc = metrics["mala_acceptance"]
    print(
        f"{run.name}: {run.mala.n_samples} samples ({metrics['sampler']})"
        + (f", MALA acceptance {acc:.3f}" if acc is not None else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    boot()
    return cli.guarded(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
