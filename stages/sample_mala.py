"""sample-mala: draw images from a run (paper §4.3) for FID and the report.

VAEPP runs: z₀ from the latent GAN, then MALA on E(z) = βD(G(z)) + ½‖z‖², images G(z); the
"GAN-VAEPP" images are G(z₀). Plain-VAE runs: images G(z), z ~ N(0, I) (their prior), and the
latent GAN's G(z₀) as the two-stage comparison. Outputs: samples/<run>/{images.pt,
images_gan.pt, grid.png, grid_gan.png}, metrics/<run>/mala.json.
With `distributed.nproc_per_node: N` (or under `torchrun`), the chains' energy gradients are
split across N processes and gathered; the chains are the one-process chains. Only rank 0 writes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages import common  # noqa: E402


def _main(argv: list[str] | None) -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    run = common.load_run(args)
    dev = common.device(args.device, run.device)

    return common.distributed_main(args, run, dev, __file__, argv, _sample)


def _sample(args, run, ctx) -> int:
    from vaepp import distributed as vdist

    dev = ctx.device
    paths = common.run_paths(run.name)
    model, _ = common.load_vae(paths["vae"], dev)

    import torch

    from vaepp import io as vio
    from vaepp.latent_gan import LatentGAN, LatentGANSpec
    from vaepp.mala import mala
    from vaepp.sampling import decode_images, save_grid

    g_ckpt = vio.load_checkpoint(paths["latent_gan"], map_location=dev)
    gan = LatentGAN(g_ckpt["zdim"], LatentGANSpec.from_dict(g_ckpt["spec"]))
    gan.load_state_dict(g_ckpt["model"])
    gan.to(dev).eval()

    p = run.mala
    gen = torch.Generator(device=dev).manual_seed(p.seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        z0 = gan.sample(p.n_samples, generator=gen, device=dev)
    metrics: dict = {"n_samples": p.n_samples, "mala_steps": p.n_steps, "mala_step_size": p.step_size}
    if model.spec.pullback:
        z, acceptance, stats = mala(vdist.shard_rows(ctx, model.energy_and_grad), z0.clone(), p.n_steps,
                                    p.step_size, generator=gen, progress=not args.no_progress and ctx.is_writer)
        metrics.update(mala_acceptance=float(acceptance), sampler="latent GAN + MALA",
                       **{f"mala_{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
    else:
        z = torch.randn(p.n_samples, model.zdim, generator=gen, device=dev)
        metrics.update(mala_acceptance=None, sampler="prior N(0, I)")
    if not ctx.is_writer:
        return 0
    images = decode_images(model, z)
    images_gan = decode_images(model, z0)
    metrics["seconds"] = time.perf_counter() - t0
    out = paths["samples"]
    vio.atomic_torch_save({"images": images}, out / "images.pt")
    vio.atomic_torch_save({"images": images_gan}, out / "images_gan.pt")
    save_grid(images[:100], out / "grid.png")
    save_grid(images_gan[:100], out / "grid_gan.png")
    common.write_json(paths["metrics"] / "mala.json", metrics)
    tracker = common.tracker(args.params)
    with tracker.stage_run("sample-mala", run.name, common.flat(run.mala.model_dump())) as log:
        log.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        log.log_artifact(out / "grid.png")
        log.log_artifact(out / "grid_gan.png")
    acc = metrics["mala_acceptance"]
    print(f"{run.name}: {p.n_samples} samples ({metrics['sampler']})"
          + (f", MALA acceptance {acc:.3f}" if acc is not None else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.guarded(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
