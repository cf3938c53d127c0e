"""2 CPU processes with gloo against 1 process: training (DDP), the latent GAN, NLL, log Z, MALA
and FID features give the one-process results, and only rank 0 writes files.

One `torch.multiprocessing.spawn` of 2 ranks (module fixture) runs every scenario, then the
train, fit-latent-gan, estimate-nll and sample-mala stages (with MLflow) in a scratch project
under an audit hook that records every file write; the tests compare with the single-process
library calls made here. The ranks draw the same random numbers as one process
(vaepp/distributed.py), so the comparisons are to float rounding: float64 models for the
estimators, float32 (train() feeds float32) for training. Start-up dominates (importing torch in
two fresh processes); heavy imports stay inside the functions that need them.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import sys
from pathlib import Path

import pytest
import torch
import yaml

from factories import latent_gan_params, model_spec, tiny_params_yaml, train_params
from stage_args import stage_argv
from vaepp import distributed as vdist
from vaepp import resolve
from vaepp.checkpoints import Checkpoint
from vaepp.latent_gan import LatentGAN, fit_latent_gan, posterior_samples
from vaepp.logz import log_z_ais, log_z_prior_is, log_z_q_based
from vaepp.mala import mala
from vaepp.model import VAEPP
from vaepp.nll import estimate_nll
from vaepp.train import train

REPO = Path(__file__).resolve().parents[1]
WORLD = 2

# (name, model overrides, train overrides): every prior trained by Algorithm 1 or 2, every penalty,
# B ≠ K both ways (penalty pairs and prior rows split unevenly), planar flows, the KL clamp.
TRAIN_CASES = [
    ("vae", {"prior": "standard"}, {"algorithm": "vaepp"}),
    ("naive", {}, {"algorithm": "naive", "penalty": "wgan_gp_classic", "penalty_k": 10.0}),
    ("vaepp", {}, {"algorithm": "vaepp"}),
    (
        "vaepp_k_gt_b",
        {"posterior": "normal", "n_flows": 2},
        {"algorithm": "vaepp", "n_prior_samples": 11, "penalty": "wgan_div_2"},
    ),
    (
        "vaepp_k_lt_b",
        {},
        {"algorithm": "vaepp", "n_prior_samples": 5, "penalty": "wgan_gp_classic", "penalty_k": 10.0, "clamp_kl": True},
    ),
]


def _model(overrides: dict, seed: int = 0) -> VAEPP:
    # PyTorch's initialisation: from zero-initialised heads the first gradients of some weights are
    # rounding noise, which Adam scales to full steps, so W processes and one would part at float
    # rounding for reasons that have nothing to do with the sharding under test.
    torch.manual_seed(seed)
    return VAEPP(model_spec((1, 6, 6), zdim=3, hidden=(16, 16), **{"init": "torch", **overrides}))


def _train_params(overrides: dict):
    """The TrainParams of a case's train overrides (train.algorithm among them)."""
    # ‖∇D‖⁶ and c = 1: at ‖∇D‖³ and c = w the penalty's gradients of this tiny critic are rounding
    # level, which Adam scales to full steps (the sharding under test is the same for any p and c)
    base = dict(
        batch_size=8,
        n_prior_samples=8,
        lr=1e-3,
        epochs=1,
        max_steps_per_epoch=3,
        seed=3,
        penalty_p=6.0,
        critic_penalty_weight=1.0,
    )
    return train_params(**{**base, **overrides})


def _images(n: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 6, 6, generator=g) * 255).round().to(torch.uint8)


def _sgd_optimizers(model: VAEPP, params) -> dict:
    """`make_optimizers` with plain SGD: weights move by −lr·Σ gradients, so equal weights mean
    equal gradients. (Adam's first steps are ≈ lr·sign(g): they would hide a gradient scaled by a
    constant, and they turn the rounding of the critic's output-bias gradient, which is exactly 0
    in VAEPP because D → D + c leaves the loss unchanged, into ±lr steps.)"""
    has_critic = model.spec.prior != "standard"
    joint = has_critic and params.algorithm == "vaepp"  # Algorithm 2: the critic in the one step
    trained = model.parameters() if joint else model.model_parameters()
    opts = {"model": torch.optim.SGD(trained, lr=params.lr)}
    if has_critic and not joint:  # Algorithm 1's critic step
        opts["critic"] = torch.optim.SGD(model.critic.parameters(), lr=params.critic_lr)
    return opts


def _train_once(ctx, name: str, optimizer: str, checkpoint=None):
    """One epoch of `train` (3 steps of 8 images) for TRAIN_CASES[name]; W ranks if ctx is given."""
    import vaepp.train as vtrain

    _, mo, to = next(c for c in TRAIN_CASES if c[0] == name)
    model = _model(mo)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    params = _train_params({**to, "lr": 0.05, "critic_lr": 0.05} if optimizer == "sgd" else to)
    kw = {} if ctx is None else dict(ctx=ctx)
    if checkpoint is not None:
        kw["checkpoint"] = Checkpoint(checkpoint, write=ctx is None or ctx.is_writer)
    original = vtrain.make_optimizers
    vtrain.make_optimizers = _sgd_optimizers if optimizer == "sgd" else original
    try:
        r = train(model, _images(), params, **kw)
    finally:
        vtrain.make_optimizers = original
    delta = {k: v - start[k] for k, v in model.state_dict().items()}
    return {"delta": delta, "history": [{k: v for k, v in h.items() if k != "seconds"} for h in r.history]}


def _latent_setup():
    spec = latent_gan_params(noise_dim=4, hidden=(16, 16), epochs=2, batch_size=10, n_critic=2, seed=2)
    torch.manual_seed(0)
    gan = LatentGAN.from_params(3, spec)
    pool = torch.randn(40, 3, generator=torch.Generator().manual_seed(4)) * 0.7 + 0.2
    return gan, spec, pool


def _eval_model() -> VAEPP:
    model = _model({"posterior": "truncated"}, seed=5).double().eval()
    with torch.no_grad():  # a critic with some weight, so log Z is far from 0
        model.prior.xi.fill_(1.0)
    return model


def _test_batches(model: VAEPP, n: int = 12, b: int = 5):
    e = _images(n, seed=7).double() / 255.0
    return [e[i : i + b] for i in range(0, n, b)]


def _estimators(model, encode, log_px_model, log_f, energy) -> dict:
    """Every estimator on the given (possibly sharded) callables; same seeds each call."""
    batches = _test_batches(model)
    out = {}
    for name, kw in {"split_samples": dict(chunk=64), "split_images": dict(rng_rows=5, chunk=5)}.items():
        g = torch.Generator().manual_seed(3)
        r = estimate_nll(
            log_px_model, batches, n_importance=7, n_passes=2, log_z=0.4, generator=g, return_per_image=True, **kw
        )
        out[f"nll_{name}"] = {
            k: r[k]
            for k in ("nll_nats", "nll_stderr", "nll_mc_stderr", "ess_mean", "nll_nats_plain_vae", "log_px_nats")
        }
    g = torch.Generator().manual_seed(4)
    q = log_z_q_based(batches, encode, model.sample_q, log_f, n_train=100, n_per_image=9, chunk=20, generator=g)
    g = torch.Generator().manual_seed(5)
    pis = log_z_prior_is(log_f, 3, 3000, chunk=1024, generator=g, dtype=torch.float64)
    ais = log_z_ais(log_f, 3, n_chains=9, n_temps=6, seeds=(0, 1), dtype=torch.float64)
    for est in (q, pis, ais):
        out[est.name] = {"log_z": est.log_z, "std_err": est.std_err, "ess": est.ess, "n": est.n_samples}
    z0 = torch.randn(9, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    z, acc, _ = mala(energy, z0, 8, 0.05, generator=torch.Generator().manual_seed(7))
    out["mala"] = {"z": z, "acceptance": acc}
    return out


class _FakeInception(torch.nn.Module):
    """Stands in for pytorch-fid's network: returns [features (B, 5, 1, 1)] as it does, and
    carries the weights digest that keys the reference-statistics cache."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        # float64 throughout: a float32 convolution rounds differently with the batch size and
        # thread count (a rank sees half the rows), which would hide what the test compares.
        self.conv = torch.nn.Conv2d(3, 5, 3).double()
        self.fid_weights_sha256 = "abc123"

    def forward(self, x):
        return [self.conv(x.double()).mean((2, 3), keepdim=True)]


def _fid_batches():
    """Batches as `vaepp.fid.iter_features` feeds them, the last one smaller than the ranks."""
    x = torch.rand(13, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    return [x[:6], x[6:12], x[12:]]


# ----- the stages, in a scratch project ----------------------------------------------------------
STAGE_OVERRIDES = yaml.safe_load("""
device: cpu
distributed: {nproc_per_node: 1, backend: gloo}
datasets: [mnist]
data: {dataset: mnist, n_train: 64, n_valid: 16, n_test: 8}
model: {arch: mlp, zdim: 3, hidden: [16, 16], init: torch}
train: {epochs: 1, batch_size: 16, n_prior_samples: 16, lr: 1.0e-3, penalty_p: 6.0, critic_penalty_weight: 1.0}
latent_gan: {noise_dim: 4, hidden: [8, 8], epochs: 1, batch_size: 16, n_critic: 2}
nll: {n_importance: 4, chunk: 64, batch_images: 4,
      log_z: {prior_is_samples: 256, ais_chains: 4, ais_temps: 3, ais_seeds: 2, q_based_per_image: 2,
              q_based_images: 16}}
mala: {n_samples: 6, n_steps: 3}
runs: {vaepp: {prior: pullback}}
""")
STAGE_PARAMS = tiny_params_yaml(STAGE_OVERRIDES)
STAGES = ("train", "fit_latent_gan", "estimate_nll", "sample_mala")
CHECKPOINTS = ["checkpoints/vaepp/train.ckpt", "checkpoints/vaepp/latent_gan.ckpt"]  # removed at the end
RANK0_OUTPUTS = [
    "models/vaepp/vae.pt",
    "plots/vaepp/train_curve.csv",
    "metrics/vaepp/train.json",
    "models/vaepp/latent_gan.pt",
    "metrics/vaepp/latent_gan.json",
    "metrics/vaepp/nll.json",
    "samples/vaepp/images.pt",
    "samples/vaepp/images_gan.pt",
    "samples/vaepp/grid.png",
    "metrics/vaepp/mala.json",
    "mlflow.db",
]


def _make_project(root: Path) -> None:
    from vaepp.data import save_prepared

    g = torch.Generator().manual_seed(0)
    images = lambda n: ((torch.rand(n, 1, 8, 8, generator=g) > 0.5) * 255).to(torch.uint8)  # noqa: E731
    save_prepared(
        root / "data" / "mnist",
        images(64 + 16),  # the training split, then the validation split
        images(8),
        {"binary": True, "source": "test", "label": "MNIST (test stand-in)", "stand_in": True},
    )
    (root / "params.yaml").write_text(STAGE_PARAMS)


_WRITE_EVENTS = {
    "os.rename",
    "os.mkdir",
    "os.remove",
    "os.rmdir",
    "shutil.rmtree",
    "tempfile.mkstemp",
    "sqlite3.connect",
    "os.truncate",
}


def _record_writes(root: Path, log: list) -> None:
    """Audit hook: every write, rename, mkdir, removal or SQLite connection under `root`."""
    prefix = str(root)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
        else:
            writing = event in _WRITE_EVENTS
        targets = args[:2] if event == "os.rename" else args[:1]  # a rename writes its destination
        for target in targets if writing else ():
            if isinstance(target, (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(target))
                if path.startswith(prefix):
                    log.append((event, os.path.relpath(path, prefix)))

    sys.addaudithook(hook)


def _run_stages(ctx: vdist.DistContext, root: Path) -> dict:
    """Every rank: the stages' main() in `root` (rank 0 made the project first)."""
    import importlib

    if ctx.is_writer:
        _make_project(root)
    ctx.barrier()
    os.chdir(root)
    os.environ.update(DVC_ROOT=str(root), VAEPP_CACHE=str(root.parent / "cache"), MLFLOW_DISABLE_TELEMETRY="true")
    os.environ.pop("VAEPP_MLFLOW", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    log: list = []
    _record_writes(root, log)
    codes = {}
    for stage in STAGES:
        main = importlib.import_module(f"stages.{stage}").main
        codes[stage] = main(stage_argv(stage.replace("_", "-"), "vaepp", "--params", "params.yaml", "--no-progress"))
    return {"codes": codes, "writes": log}


# ----- what each rank runs ---------------------------------------------------------------------
def _rank_scenarios(ctx: vdist.DistContext, out: Path) -> dict:
    res: dict = {}
    for name, _, _ in TRAIN_CASES:  # (b) one epoch of train() under DDP
        res[f"sgd_{name}"] = _train_once(ctx, name, "sgd", checkpoint=out / f"ckpt_{name}.pt")
        res[f"adam_{name}"] = _train_once(ctx, name, "adam")
    gan, spec, pool = _latent_setup()
    hist = fit_latent_gan(gan, lambda: pool, spec, ctx=ctx)
    res["latent_gan"] = {"state": gan.state_dict(), "history": hist}
    model = _eval_model()
    sharded = vdist.ShardedLatentModel(model, ctx)
    torch.manual_seed(12)
    res["pool"] = posterior_samples(
        lambda e: model.sample_q(*sharded.encode(e.double()), 1)[0][0], _images(30), batch_size=7
    )
    res["estimators"] = _estimators(
        model,
        sharded.encode,
        sharded,
        vdist.sharded_log_f(ctx, model.log_f),
        vdist.shard_rows(ctx, model.energy_and_grad),
    )
    net = vdist.ShardedModule(_FakeInception(), ctx)
    with torch.inference_mode():
        res["fid"] = {"features": [net(x)[0] for x in _fid_batches()], "sha": net.fid_weights_sha256}
    return res


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    out = Path(out)
    # a deadlock fails within minutes instead of torch's default 30
    with vdist.session(vdist.launch_from_env(os.environ), backend="gloo", timeout_s=180) as ctx:
        res = _rank_scenarios(ctx, out)
        res["stages"] = _run_stages(ctx, out.parent / "project")
    torch.save(res, out / f"rank{rank}.pt")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the interpreter's slow teardown of torch (seconds per process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(a, b, *, rtol, atol, what):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _close(a[k], b[k], rtol=rtol, atol=atol, what=f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, rtol=rtol, atol=atol, what=f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol), (
            f"{what}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
        )
    elif isinstance(a, float):
        assert abs(a - b) <= atol + rtol * abs(b), f"{what}: {a} vs {b}"
    else:
        assert a == b, f"{what}: {a} vs {b}"


def _drop_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


# ----- (b) training ----------------------------------------------------------------------------
NAMES = [c[0] for c in TRAIN_CASES]


@pytest.mark.parametrize("name", NAMES)
def test_ddp_epoch_with_sgd_equals_one_process_on_the_global_batch(ranks, name):
    """Weight changes after one epoch = −lr·Σ gradients: equal to float32 rounding (the ranks'
    networks see half batches; ~1e-6 of the largest change)."""
    out, res = ranks
    want = _train_once(None, name, "sgd")
    scale = max(v.abs().max().item() for v in want["delta"].values())
    assert scale > 1e-3, "training did not move the weights: the comparison would be empty"
    for rank in range(WORLD):
        got = res[rank][f"sgd_{name}"]
        _close(got["delta"], want["delta"], rtol=1e-3, atol=1e-5 * scale, what=f"rank {rank} {name} weight changes")
        _close(got["history"], want["history"], rtol=1e-5, atol=1e-5, what=f"rank {rank} {name} metrics")


@pytest.mark.parametrize("name", NAMES)
def test_ddp_epoch_with_adam_equals_one_process(ranks, name):
    """train() as the stage runs it (Adam). Every weight agrees to rounding except the critic's
    biases: the output bias has an exactly-zero gradient (D → D + c leaves the VAEPP loss
    unchanged) and the others nearly so at initialisation, and Adam's ≈ lr·sign(g) steps turn
    the rounding of such gradients into differences of up to 2·lr per step."""
    out, res = ranks
    want = _train_once(None, name, "adam")
    lr, steps = _train_params({"algorithm": "vaepp"}).lr, 3
    for rank in range(WORLD):
        got = res[rank][f"adam_{name}"]["delta"]
        for k, v in want["delta"].items():
            if k.startswith("critic.") and k.endswith(".bias"):
                assert (got[k] - v).abs().max().item() <= 2 * lr * steps + 1e-6, k
            else:
                _close(got[k], v, rtol=1e-3, atol=1e-6, what=f"rank {rank} {name} {k}")


def test_ddp_latent_gan_equals_one_process(ranks):
    out, res = ranks
    gan, spec, pool = _latent_setup()
    hist = fit_latent_gan(gan, lambda: pool, spec)
    for rank in range(WORLD):
        got = res[rank]["latent_gan"]
        _close(got["state"], gan.state_dict(), rtol=1e-4, atol=1e-6, what=f"rank {rank} latent GAN weights")
        _close(_drop_seconds(got["history"]), _drop_seconds(hist), rtol=1e-4, atol=1e-5, what="latent GAN metrics")


# ----- (a) NLL, log Z, MALA, FID ---------------------------------------------------------------
def test_sharded_estimates_equal_one_process(ranks):
    out, res = ranks
    model = _eval_model()
    want = _estimators(model, model.encode, model, model.log_f, model.energy_and_grad)
    assert want["nll_split_samples"]["nll_nats"] > 1.0 and abs(want["prior_is"]["log_z"]) > 0.05
    for rank in range(WORLD):
        _close(res[rank]["estimators"], want, rtol=1e-9, atol=1e-9, what=f"rank {rank}")


def test_sharded_posterior_pool_equals_one_process(ranks):
    out, res = ranks
    model = _eval_model()
    torch.manual_seed(12)
    want = posterior_samples(lambda e: model.sample_q(*model.encode(e.double()), 1)[0][0], _images(30), batch_size=7)
    for rank in range(WORLD):
        _close(res[rank]["pool"], want, rtol=1e-12, atol=1e-12, what=f"rank {rank} pool")


def test_sharded_feature_network_equals_one_process(ranks):
    """Every rank gets every image's features, so FeatureStats' sums are the one-process sums."""
    out, res = ranks
    net = _FakeInception()
    with torch.inference_mode():
        want = [net(x)[0] for x in _fid_batches()]
    for rank in range(WORLD):
        _close(res[rank]["fid"]["features"], want, rtol=1e-12, atol=1e-12, what=f"rank {rank} features")
        assert res[rank]["fid"]["sha"] == "abc123"  # the cache key sees the wrapped network


# ----- (c) only rank 0 writes --------------------------------------------------------------------
def test_only_rank_zero_writes_checkpoints(ranks):
    out, res = ranks
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([f"ckpt_{n}.pt" for n, _, _ in TRAIN_CASES] + [f"rank{r}.pt" for r in range(WORLD)])


def test_stages_on_two_ranks_write_only_from_rank_zero(ranks):
    out, res = ranks
    project = out.parent / "project"
    for rank in range(WORLD):
        assert res[rank]["stages"]["codes"] == {s: 0 for s in STAGES}, f"rank {rank} exit codes"
    assert res[1]["stages"]["writes"] == [], "rank 1 wrote files"
    touched = {path for _, path in res[0]["stages"]["writes"]}
    for f in RANK0_OUTPUTS:
        assert f in touched and (project / f).is_file(), f
    for f in CHECKPOINTS:  # written while fitting (by rank 0 alone), removed once the outputs are
        assert f in touched and not (project / f).exists(), f
    with sqlite3.connect(project / "mlflow.db") as db:  # one MLflow run per stage, from rank 0
        names = sorted(r[0] for r in db.execute("SELECT name FROM runs WHERE name LIKE '%:vaepp'"))
    assert names == sorted(f"{s.replace('_', '-')}:vaepp" for s in STAGES)


# ----- pieces without processes ----------------------------------------------------------------
def test_row_ranges_cover_every_row_once():
    for n in range(13):
        for world in range(1, 6):
            blocks = [vdist.row_range(n, r, world) for r in range(world)]
            assert [i for a, b in blocks for i in range(a, b)] == list(range(n))
            sizes = [b - a for a, b in blocks]
            assert max(sizes) - min(sizes) <= 1


def test_launch_from_env_and_relaunch():
    assert vdist.launch_from_env({}) == vdist.Launch()
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert vdist.launch_from_env(env) == vdist.Launch(1, 4, 1, from_launcher=True)
    with pytest.raises(ValueError, match="RANK"):
        vdist.launch_from_env({"WORLD_SIZE": "2", "RANK": "x"})
    with pytest.raises(ValueError, match="inconsistent"):
        vdist.launch_from_env({"WORLD_SIZE": "2", "RANK": "2"})
    cmd = vdist.relaunch_command(vdist.Launch(), 3, "stages/train.py", ["--run", "a"], "py")
    assert cmd == [
        "py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=3",
        "stages/train.py",
        "--",
        "--run",
        "a",
    ]
    module = vdist.relaunch_command(vdist.Launch(), 2, "stages.train", ["--run", "a"], "py", module=True)
    assert module[5:9] == ["-m", "stages.train", "--", "--run"]
    assert vdist.relaunch_command(vdist.Launch(), 1, "s.py", [], "py") is None
    assert vdist.relaunch_command(vdist.launch_from_env({"WORLD_SIZE": "1"}), 3, "s.py", [], "py") is None


def test_backend_choice():
    assert resolve.backend("auto", "cpu") == "gloo"
    assert resolve.backend("auto", "cuda") == "nccl"
    assert resolve.backend("gloo", "cuda") == "gloo"
    with pytest.raises(ValueError, match="nccl.*CUDA"):
        resolve.backend("nccl", "cpu")


def test_one_process_context_is_the_identity():
    ctx = vdist.DistContext()
    model = _eval_model()
    assert vdist.sharded_log_f(ctx, model.log_f) == model.log_f
    x = torch.randn(4, 3)
    assert vdist.gather_rows(ctx, x, n=4) is x
    sharded = vdist.ShardedLatentModel(model, ctx)
    e = _test_batches(model)[0]
    assert all(torch.equal(a, b) for a, b in zip(sharded.encode(e), model.encode(e), strict=True))


def test_stage_starts_itself_under_torchrun(tmp_path, monkeypatch):
    """`distributed.nproc_per_node: 2` makes `python -m stages.train` re-run itself through
    torchrun (--standalone, env:// rendezvous on torchrun's store); rank 0's model matches one
    process. Encoder, decoder and ξ agree to rounding; the critic's gradients nearly cancel at
    initialisation (see the Adam test), so its Adam steps may differ by up to 2·lr each."""
    import subprocess

    two, one = tmp_path / "two", tmp_path / "one"
    for root in (two, one):
        _make_project(root)
    (two / "params.yaml").write_text(
        tiny_params_yaml({**STAGE_OVERRIDES, "distributed": {"nproc_per_node": 2, "backend": "gloo"}})
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(VAEPP_MLFLOW="0", VAEPP_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", *stage_argv("train", "vaepp", "--no-progress")],
        cwd=two,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.chdir(one)
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    from stages import train as train_stage

    assert train_stage.main(stage_argv("train", "vaepp", "--no-progress")) == 0
    got = torch.load(two / "models" / "vaepp" / "vae.pt", weights_only=True)["model"]
    want = torch.load(one / "models" / "vaepp" / "vae.pt", weights_only=True)["model"]
    steps, lr = 64 // 16, 1e-3
    for k, v in want.items():
        tol = 2 * lr * steps if k.startswith("critic.") else 1e-4
        assert (got[k] - v).abs().max().item() <= tol, k
    assert sorted(p.name for p in (two / "models" / "vaepp").iterdir()) == ["vae.pt"]
