"""estimate-nll: test NLL by importance sampling, under every estimate of log Z.

log Z estimates (VAEPP runs; the plain VAE has log Z = 0 exactly):
  paper_q  — the paper's q-based estimate over the training set (NOT a bound; SPEC),
  prior_is — N(0, I)-proposal importance sampling, with its effective sample size,
  ais      — annealed importance sampling from N(0, I) to p_λ, spread over seeds.
The headline `nll_nats` uses the larger of prior_is and ais (each is, in expectation, a lower
estimate of log Z, so the larger gives the less optimistic NLL); the paper-protocol NLL is
reported beside it as `nll_nats_by_log_z.paper_q`. Output: metrics/<run>/nll.json.
With `distributed.nproc_per_node: N` (or under `torchrun`), the decoder and critic passes of
every estimate are split across N processes and gathered; the result is the one-process
result with the same seeds (docs/distributed.md). Only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages import common  # noqa: E402


def _batches(images, batch: int, device: str):
    for i in range(0, images.shape[0], batch):
        yield images[i : i + batch].to(device).float().div_(255.0)


def _main(argv: list[str] | None) -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    run = common.load_run(args)
    dev = common.device(args.device, run.device)

    return common.distributed_main(args, run, dev, __file__, argv, _estimate)


def _estimate(args, run, ctx) -> int:
    from vaepp import distributed as vdist

    dev = ctx.device
    paths = common.run_paths(run.name)
    model, ckpt = common.load_vae(paths["vae"], dev)
    data = common.load_data(run)

    import torch

    from vaepp.logz import log_z_ais, log_z_prior_is, log_z_q_based
    from vaepp.nll import estimate_nll

    p = run.nll
    progress = not args.no_progress and ctx.is_writer
    sharded = vdist.ShardedLatentModel(model, ctx)  # identity with one process
    log_f = vdist.sharded_log_f(ctx, model.log_f)
    train = data.train[: run.data.n_train] if run.data.n_train else data.train
    test = data.test[: run.data.n_test] if run.data.n_test else data.test
    binary = model.spec.likelihood == "bernoulli"  # x ~ Bernoulli(e), fresh each pass
    t0 = time.perf_counter()
    estimates: dict[str, dict] = {}
    if model.spec.pullback:
        lz = p.log_z
        gen = torch.Generator(device=dev)
        q_images = train[: lz.q_based_images] if lz.q_based_images else train
        found = [
            log_z_q_based(
                _batches(q_images, p.batch_images, dev), sharded.encode, model.sample_q, log_f,
                n_train=int(train.shape[0]), n_per_image=lz.q_based_per_image, chunk=p.chunk,
                generator=gen.manual_seed(p.seed), progress=progress,
            ),
            log_z_prior_is(log_f, model.zdim, lz.prior_is_samples, chunk=p.chunk,
                           generator=gen.manual_seed(p.seed + 1), device=dev, progress=progress),
            log_z_ais(log_f, model.zdim, n_chains=lz.ais_chains, n_temps=lz.ais_temps,
                      seeds=tuple(p.seed + 100 + s for s in range(lz.ais_seeds)), device=dev,
                      progress=progress),
        ]
        estimates = {e.name: dataclasses.asdict(e) for e in found}
        headline = max(("prior_is", "ais"), key=lambda n: estimates[n]["log_z"])
        log_z = {name: e["log_z"] for name, e in estimates.items()}
    else:
        headline, log_z = "exact", {"exact": 0.0}
    gen = torch.Generator(device=dev).manual_seed(p.seed + 2)
    nll = estimate_nll(
        sharded, _batches(test, p.batch_images, dev), n_importance=p.n_importance, n_passes=p.n_passes,
        log_z=log_z, headline=headline, binarize=binary, chunk=p.chunk, generator=gen,
        progress=progress,
    )
    meta = data.meta
    metrics = {
        "run": run.name,
        "nll_nats": nll["nll_nats"],
        "nll_stderr": nll["nll_stderr"],
        "nll_mc_stderr": nll["nll_mc_stderr"],
        "bpd": nll["nll_bpd"],
        "n_importance_total": nll["n_importance_total"],
        "n_importance_per_image": p.n_importance,
        "n_passes": p.n_passes,
        "n_test_images": nll["n_images"],
        "log_z_headline": headline,
        "log_z": estimates,
        "nll_nats_by_log_z": nll["nll_nats_by_log_z"],
        "nll_vae_prior_nats": nll["nll_nats_plain_vae"],
        "nll_vae_prior_stderr": nll["nll_stderr_plain_vae"],
        "ess_mean": nll["ess_mean"],
        "dataset": run.data.dataset,
        "dataset_source": meta.get("source", "unknown"),
        "stand_in": bool(meta.get("stand_in", False)),
        "dataset_label": meta.get("label", run.data.dataset),
        "protocol": (
            f"{nll['n_images']} test images × {p.n_passes} pass(es) × S={p.n_importance} samples "
            f"from q(z|e){', fresh binarisation per pass' if binary else ''}; "
            f"log Z: {headline}"
        ),
        "seconds": time.perf_counter() - t0,
    }
    if not ctx.is_writer:
        return 0
    common.write_json(paths["metrics"] / "nll.json", metrics)
    tracker = common.tracker(args.params)
    with tracker.stage_run("estimate-nll", run.name, common.flat(run.nll.model_dump())) as log:
        log.log_metrics({k: v for k, v in common.flat(metrics).items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    by = ", ".join(f"{k} {v:.2f}" for k, v in metrics["nll_nats_by_log_z"].items())
    print(f"{run.name}: NLL {metrics['nll_nats']:.2f} ± {metrics['nll_stderr']:.2f} nats "
          f"(log Z: {headline}); by log Z: {by}; plain-VAE prior {metrics['nll_vae_prior_nats']:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.guarded(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
