"""fit-latent-gan: fit the latent WGAN (paper §4.3) to posterior samples of the frozen VAE.

Outputs: models/<run>/latent_gan.pt, metrics/<run>/latent_gan.json. While it fits, a resumable
checkpoint sits in checkpoints/<run>/latent_gan.ckpt: a killed fit continues where it stopped when
the stage is rerun with the same params (with other params it starts afresh); it is removed once
the outputs are written.
With `distributed.nproc_per_node: N` (or under `torchrun`), N processes fit it with
DistributedDataParallel and share the encoder passes; only rank 0 writes (docs/distributed.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages import common  # noqa: E402


def _main(argv: list[str] | None) -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    run = common.load_run(args)
    dev = common.device(args.device, run.device)

    return common.distributed_main(args, run, dev, __file__, argv, _fit)


def _fit(args, run, ctx) -> int:
    from vaepp import distributed as vdist

    dev = ctx.device
    paths = common.run_paths(run.name)
    model, _ = common.load_vae(paths["vae"], dev)
    data = common.load_data(run)

    import torch

    from vaepp import io as vio
    from vaepp.checkpoints import Checkpoint, save_latent_gan
    from vaepp.latent_gan import LatentGAN, fit_latent_gan, latent_gan_settings, moment_gap, posterior_samples
    from vaepp.tracking import Tracker

    images = data.train[: run.data.n_train] if run.data.n_train else data.train
    spec = run.latent_gan
    torch.manual_seed(spec.seed)

    sharded = vdist.ShardedLatentModel(model, ctx)  # the encoder passes split across ranks

    def encode_sample(e):
        mu, log_sigma = sharded.encode(e.to(dev))
        return model.sample_q(mu, log_sigma, 1)[0][0]

    pool = lambda: posterior_samples(encode_sample, images)  # noqa: E731
    gan = LatentGAN(model.zdim, spec.noise_dim, spec.hidden)
    settings = latent_gan_settings(spec, model.zdim)
    ckpt = paths["latent_gan_checkpoint"]
    # resume only a fit of these settings on posterior samples of this very VAE and data
    origin = {"vae_sha256": vio.file_digest(paths["vae"]), "data_sha256": data.meta.get("sha256"),
              "n_train": int(images.shape[0])}
    common.keep_or_discard_checkpoint(ckpt, {**settings, **origin}, ctx)
    tracker = common.tracker(args.params) if ctx.is_writer else Tracker(reason=f"rank {ctx.rank}")
    with tracker.stage_run("fit-latent-gan", run.name, common.flat(run.latent_gan.model_dump())) as log:
        history = fit_latent_gan(
            gan, pool, spec, device=dev, ctx=ctx, progress=not args.no_progress and ctx.is_writer,
            callback=lambda epoch, m: log.log_metrics(m, step=epoch),
            checkpoint=Checkpoint(ckpt, write=ctx.is_writer, extra=origin),
        )
        with torch.inference_mode():
            gap = moment_gap(gan.sample(10000, device=dev), pool()[:10000])
        if not ctx.is_writer:
            return 0
        metrics = {**{f"final_{k}": v for k, v in history[-1].items()}, **gap,
                   "epochs": spec.epochs, "seconds": sum(h["seconds"] for h in history)}
        save_latent_gan(paths["latent_gan"], gan, settings, history=history)
        common.write_json(paths["metrics"] / "latent_gan.json", metrics)
        common.finish_checkpoint(ckpt)
        log.log_metrics(gap)
    print(f"{run.name}: latent GAN mean gap {gap['mean_gap']:.3f}, cov gap {gap['cov_gap']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.guarded(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
