"""Compute benchmarks: the matmul limit, NLL importance sampling, training steps, MALA, AIS.

Every rate here is compared with the float32 matmul rate measured in the same run. FLOPs come
from the layer shapes (`bench.common.net_flops`), AIS's from torch's FlopCounterMode; the models
are the embedded default's networks with random weights and random images (speed does not depend
on what the weights have learnt).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import NetFlops, best_time, net_flops
from vaepp import datasets
from vaepp.likelihoods import bernoulli_log_prob

# Image shape, binarised or not, and prepared training images (validation included) of every
# dataset in the registry (`vaepp.datasets`).
DATASETS: dict[str, tuple[tuple[int, int, int], bool, int]] = {
    row.name: (row.shape, row.binary, row.n_train) for row in datasets.DATASETS.values()
}


# ----- 1. the matmul limit -----------------------------------------------------------------------
def _best_mm_seconds(m: int, k: int, n: int, *, min_calls: int, seconds: float, seed: int = 0) -> float:
    """Smallest wall time of one (m×k) @ (k×n) float32 product, over at least `min_calls` calls
    and until `seconds` have passed. Single calls, not blocks: on a shared machine the quiet
    moments are short, and the fastest call is the one that shows what the cores can do."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)  # warm-up
    best, calls, t_end = math.inf, 0, time.perf_counter() + seconds
    while calls < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best


def matmul_gflops(sizes: list[int], repeats: int, seconds_per_size: float = 1.5) -> dict:
    """float32 GFLOP/s of square n×n @ n×n products (2n³ FLOPs each): the fastest single call
    per size (at least `repeats` calls, for at least `seconds_per_size`).
    Returns {"by_size": {n: GFLOP/s}, "peak_gflops": max over sizes}."""
    by_size = {
        n: 2.0 * n**3 / _best_mm_seconds(n, n, n, min_calls=repeats, seconds=seconds_per_size) / 1e9 for n in sizes
    }
    return {"by_size": by_size, "peak_gflops": max(by_size.values())}


def linear_shapes(net: torch.nn.Module, example: torch.Tensor) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every Linear call of `net(example)`, in call order."""
    shapes: list[tuple[int, int, int]] = []
    hooks = [
        m.register_forward_hook(
            lambda m, i, o: shapes.append((i[0].numel() // m.in_features, m.in_features, m.out_features))
        )
        for m in net.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def layer_matmul_seconds(shapes: list[tuple[int, int, int]], *, repeats: int, seconds_each: float) -> float:
    """Σ over layers of the fastest single (rows×in) @ (in×out) product: the time a network's
    forward would take if it were nothing but its matmuls, at its own shapes."""
    return sum(_best_mm_seconds(r, i, o, min_calls=repeats, seconds=seconds_each) for r, i, o in shapes)


# ----- the default's model -----------------------------------------------------------------------
@dataclass
class Built:
    run: object  # vaepp.config.RunConfig
    model: torch.nn.Module  # vaepp.model.VAEPP, eval mode
    image_shape: tuple[int, int, int]
    binary: bool
    n_train: int
    enc: NetFlops
    dec: NetFlops
    crit: NetFlops


def build(params: Path, run_name: str) -> Built:
    """The run's model as `stages/train.py` builds it, with the per-row FLOPs of its networks."""
    from vaepp.config import load_run
    from vaepp.model import VAEPP
    from vaepp.resolve import model_spec

    run = load_run(params, run_name)  # its dataset is a registry name (config validates it)
    shape, binary, n_prepared = DATASETS[run.data.dataset]
    n_train = n_prepared - run.data.n_valid  # the training split, as `vaepp.data.split_prepared` cuts it
    if n_train < 1:
        raise ValueError(f"{params}: data.n_valid = {run.data.n_valid} leaves no training images of {n_prepared}")
    n_train = min(n_train, run.data.n_train) if run.data.n_train else n_train
    torch.manual_seed(0)
    model = VAEPP(model_spec(run, shape, binary)).eval()
    x = torch.rand(8, *shape)
    z = torch.randn(8, model.zdim)
    return Built(
        run,
        model,
        shape,
        binary,
        n_train,
        enc=net_flops(model.encoder, x),
        dec=net_flops(model.decoder, z),
        crit=net_flops(model.critic, x),
    )


def random_images(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """Grey levels in [0, 1] quantised to 1/255, as the prepared data gives them: (n, C, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8).float() / 255.0


# ----- 2. NLL ------------------------------------------------------------------------------------
def nll_bench(
    b: Built, *, n_images: int, n_importance: int, repeats: int, peak_gflops: float, mm_seconds: float = 0.5
) -> dict:
    """Importance samples per second of `vaepp.nll.estimate_nll` with the params' chunk and batch.

    FLOPs per sample: one decoder and one critic forward (the decoder output serves log p(x|z) and
    D(G(z))), plus the encoder once per image shared by its S samples. Also the rate the
    decoder's and critic's matmuls alone reach on one chunk of rows at their own shapes
    (fastest single product per layer, `mm_seconds` of calls each): achieved / that is the share
    of the time spent in the matmuls; the rest goes to sampling, the likelihood and the critic's
    elementwise work.
    """
    from vaepp.nll import estimate_nll

    p = b.run.nll
    images = random_images(n_images, b.image_shape, seed=1)
    batches = [images[i : i + p.batch_images] for i in range(0, n_images, p.batch_images)]
    gen = torch.Generator().manual_seed(p.seed)

    def once():
        return estimate_nll(
            b.model, batches, n_importance=n_importance, log_z=0.0, binarize=b.binary, chunk=p.chunk, generator=gen
        )

    t = best_time(once, repeats=repeats)
    samples = n_images * n_importance
    rate = samples / t
    flops = b.dec.forward + b.crit.forward + b.enc.forward / n_importance
    achieved = rate * flops / 1e9
    # The same chunk through the decoder's and the critic's matmuls alone, at their own shapes
    # (only for MLPs: a convolution is not one matmul).
    rows = min(p.chunk, samples)
    if b.run.model.arch == "mlp":
        shapes = linear_shapes(b.model.decoder, torch.randn(rows, b.model.zdim)) + linear_shapes(
            b.model.critic, torch.rand(rows, *b.image_shape)
        )
        mm_rate = rows / layer_matmul_seconds(shapes, repeats=5, seconds_each=mm_seconds)
    else:
        mm_rate = float("nan")
    paper_samples = 1e8  # 10^4 test images × 10^3 samples × 10 passes (paper, MNIST)
    return {
        "samples_per_s": rate,
        "flops_per_sample": flops,
        "gflops": achieved,
        "ratio_to_matmul": achieved / peak_gflops,
        "layer_matmuls_samples_per_s": mm_rate,
        "ratio_to_layer_matmuls": rate / mm_rate,
        "seconds_for_1e8_samples": paper_samples / rate,
        "n_images": n_images,
        "n_importance": n_importance,
        "chunk": p.chunk,
        "batch_images": p.batch_images,
        "seconds_best": t,
    }


# ----- 3. training -------------------------------------------------------------------------------
def train_step_flops(method: str, b: Built, batch: int, k_prior: int, *, penalty: bool = True) -> float:
    """FLOPs of one training step from the layer shapes (Linear/Conv matmuls only).

    Per row, with F the forward FLOPs of a network and F₁ of its first layer:
    a trained network costs 3F (forward, input gradient, weight gradient), 3F − F₁ when its input
    is data (no input gradient needed); a frozen network that passes gradients costs 2F; a
    forward without gradients costs F. The gradient penalty on m = min(B, K) rows costs 6F of the
    critic: forward, the input gradient built with create_graph (F), and the backward of both
    (4F: weight and input gradients of the forward and of the first backward); with a detached
    x̂ (Algorithm 1's critic step) the input gradient of the last backward is not needed: 5F.

      vae:           B·(3E − E₁ + 3G)
      vaepp (Alg 2): vae + B·3D (critic on G(z), the decoder pass shared with the reconstruction)
                     + K·(3G − G₁ + 3D) (K prior samples) + m·6D (penalty)
      certified:     the same terms as vaepp (Algorithm 2); its default run has no penalty
                     (train.penalty_k = 0: `penalty` False drops m·6D)
      naive (Alg 1): VAE step  vae + B·2D + K·(3G − G₁ + 2D)   (critic frozen)
                     critic step K·G (no grad) + m·5D + B·(3D − D₁) + K·(3D − D₁)

    A certified prior's acceptance MLP on z (`model.acceptance_mlp`) is not counted: refused.
    """
    E, G, D = b.enc, b.dec, b.crit
    B, K, m = batch, k_prior, min(batch, k_prior)
    vae = B * (3 * E.forward - E.first_layer + 3 * G.forward)
    pen = m * 6 * D.forward if penalty else 0.0
    if method == "vae":
        return vae
    if method == "certified" and b.run.model.acceptance_mlp:
        raise ValueError("the certified prior's acceptance MLP (model.acceptance_mlp) is not counted; use []")
    if method in ("vaepp", "certified"):
        return vae + B * 3 * D.forward + K * (3 * G.forward - G.first_layer + 3 * D.forward) + pen
    if method == "naive_vaepp":
        vae_step = vae + B * 2 * D.forward + K * (3 * G.forward - G.first_layer + 2 * D.forward)
        critic_step = (
            K * G.forward + (m * 5 * D.forward if penalty else 0.0) + (B + K) * (3 * D.forward - D.first_layer)
        )
        return vae_step + critic_step
    raise ValueError(f"no FLOP count for the method {method!r} (vae, vaepp, certified, naive_vaepp)")


def minimal_vae_loss(model: torch.nn.Module, e: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The plain VAE's loss and nothing else: (1/B)·Σ_i [−log p(e_i|z_i) + log q(z_i|e_i) − log N(z_i; 0, I)]
    with z = μ + σ·ε, for a Bernoulli decoder; the Normals' constants cancel, so the KL terms are
    Σ_d (z²/2 − ε²/2 − log σ). No log-σ floor, truncation, prior dispatch or metrics."""
    mu, log_sigma = model.encoder(e)
    z = mu + torch.exp(log_sigma) * eps
    recon = -bernoulli_log_prob(model.decoder(z), e).sum()
    kl = (0.5 * z.square() - 0.5 * eps.square() - log_sigma).sum()
    return (recon + kl) / e.shape[0]


def minimal_vae_step(b: Built, lr: float):
    """A reference for the plain VAE's `vaepp.train.train_step`: one step of `minimal_vae_loss` with
    ε ~ N(0, I) and torch's fused Adam over one parameter group, on the run's own encoder and
    decoder. Its rate is what eager torch reaches for these layers on this machine; the plain VAE's
    rate over it is what the step's bookkeeping (posterior truncation, log-σ floor, metrics,
    finiteness check, the prior's interface) costs. Returns step(e) → None."""
    from vaepp.optim import adam

    if b.model.spec.likelihood != "bernoulli" or b.model.flows is not None:
        raise ValueError("the minimal step is the Bernoulli plain VAE's without flows")
    model = b.model.train()
    opt = adam([p for p in model.model_parameters() if p.requires_grad], lr=lr)

    def step(e: torch.Tensor) -> None:
        eps = torch.randn(e.shape[0], model.zdim, dtype=e.dtype)
        loss = minimal_vae_loss(model, e, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


MINIMAL = "vae_minimal"  # the reference entry of `train_bench` beside a "vae" run


def train_bench(params: Path, runs: list[str], *, steps: int, repeats: int, warmup: int, peak_gflops: float) -> dict:
    """Seconds per step of `vaepp.train.train_step` for each run, on random images, with the same
    per-step data path as `vaepp.train.train` (uint8 slice → float / 255); with a "vae" run, also
    `minimal_vae_step` on a second copy of its networks, as the entry MINIMAL (same FLOPs).

    The runs are timed in turns (run A block, run B block, …, repeated) and each keeps its best
    block of `steps` steps, so slow phases of a shared machine hit every run alike; the median
    block is kept too. seconds/epoch = seconds/step × ⌊n_train / batch⌋.
    """
    from vaepp.resolve import method, train_params
    from vaepp.train import make_optimizers, train_step

    setups = {}
    for name in [*runs, *([MINIMAL] if "vae" in runs else [])]:
        b = build(params, "vae" if name == MINIMAL else name)
        spec, algorithm = train_params(b.run, b.binary), method(b.run)
        if name == MINIMAL:
            step = minimal_vae_step(b, spec.lr)
        else:
            model = b.model.train()
            step = partial(train_step, model, make_optimizers(model, spec), params=spec, n_train=b.n_train)
        gen = torch.Generator().manual_seed(2)
        data = torch.randint(0, 256, (spec.batch_size * 8, *b.image_shape), generator=gen, dtype=torch.uint8)
        setups[name] = (b, spec, algorithm, step, data)

    def block(name: str, n: int) -> float:
        b, spec, algorithm, step, data = setups[name]
        B = spec.batch_size
        n_batches = data.shape[0] // B
        t0 = time.perf_counter()
        for s in range(n):
            step(data[(s % n_batches) * B : (s % n_batches + 1) * B].float().div_(255.0))
        return time.perf_counter() - t0

    blocks: dict[str, list[float]] = {name: [] for name in setups}
    for name in setups:
        block(name, warmup)
    for _ in range(repeats):
        for name in setups:
            blocks[name].append(block(name, steps) / steps)
    best = {name: min(ts) for name, ts in blocks.items()}
    median = {name: sorted(ts)[len(ts) // 2] for name, ts in blocks.items()}
    out = {}
    for name in setups:
        b, spec, algorithm = setups[name][:3]
        flops = train_step_flops(algorithm, b, spec.batch_size, spec.n_prior_samples, penalty=spec.penalty_k > 0)
        steps_per_epoch = b.n_train // spec.batch_size
        out[name] = {
            "algorithm": algorithm,
            "seconds_per_step": best[name],
            "steps_per_epoch": steps_per_epoch,
            "seconds_per_epoch": best[name] * steps_per_epoch,
            # the median block: closer to a sustained epoch (the best block is a quiet moment
            # with the bench's few batches in cache)
            "seconds_per_epoch_median": median[name] * steps_per_epoch,
            "flops_per_step": flops,
            "gflops": flops / best[name] / 1e9,
            "ratio_to_matmul": flops / best[name] / 1e9 / peak_gflops,
            "batch_size": spec.batch_size,
            "n_prior_samples": spec.n_prior_samples,
        }
    if "vae" in out:
        for name in out:
            out[name]["gflops_ratio_to_vae"] = out[name]["gflops"] / out["vae"]["gflops"]
            out[name]["flops_ratio_to_vae"] = out[name]["flops_per_step"] / out["vae"]["flops_per_step"]
    return out


# ----- 4. MALA -----------------------------------------------------------------------------------
def mala_bench(b: Built, *, n_chains: int, n_steps: int, repeats: int, peak_gflops: float) -> dict:
    """Chain-steps per second of `vaepp.mala.mala` on the model's energy βD(G(z)) + ½‖z‖².

    One chain-step evaluates E and ∇_z E at the proposal once: decoder and critic forward (F) and
    their input gradients (F; no weight gradients), so the FLOP limit is
    peak / (2·(G + D)) chain-steps per second.
    """
    from vaepp.mala import mala

    step_size = b.run.mala.step_size
    gen = torch.Generator().manual_seed(b.run.mala.seed)
    z0 = torch.randn(n_chains, b.model.zdim, generator=gen)
    t = best_time(lambda: mala(b.model.energy_and_grad, z0, n_steps, step_size, generator=gen), repeats=repeats)
    rate = n_chains * n_steps / t
    flops = 2.0 * (b.dec.forward + b.crit.forward)
    limit = peak_gflops * 1e9 / flops
    return {
        "chain_steps_per_s": rate,
        "flops_per_chain_step": flops,
        "limit_chain_steps_per_s": limit,
        "ratio_to_limit": rate / limit,
        "n_chains": n_chains,
        "n_steps": n_steps,
    }


# ----- 5. AIS ------------------------------------------------------------------------------------
def ais_bench(b: Built, *, n_temps: int, repeats: int, peak_gflops: float) -> dict:
    """Transitions per second of `vaepp.logz.log_z_ais` called as the estimate-nll stage calls it
    (`vaepp.log_z_protocol.log_z_protocol`: nll.log_z.ais_chains chains for each of nll.log_z.ais_seeds
    seeds, all seeds' chains in one batch, MALA transitions, the protocol's seeds), on `n_temps`
    temperatures instead of nll.log_z.ais_temps; the best of `repeats` runs after one untimed run.

    A transition is one chain advancing one temperature: S·M·K per run (S seeds, M chains, K
    temperatures), so rate = S·M·K / seconds. Every temperature evaluates h(z) = log f(z) −
    log N(z; 0, I) and ∇h once per chain, at the proposal (`vaepp.logz._log_ratio_and_grad`); the
    FLOPs of one such evaluation per chain are counted by torch's FlopCounterMode on the S·M rows
    (decoder and critic forward and their input gradients: about 2·(G + D) of `mala_bench`), and

        limit = matmul limit / FLOPs per chain,   ratio = rate / limit.

    The run also evaluates h and ∇h once at the start, so even with no other overhead the ratio
    is at most K / (K + 1) of the matmul share (the stage's 1000 temperatures make that share
    negligible). At the default params (3 seeds × 256 chains, K = 25) a run takes about half a
    second on 2 cores.
    """
    from vaepp.logz import _log_ratio_and_grad, log_z_ais

    p = b.run.nll
    n_chains, seeds = p.log_z.ais_chains, tuple(p.seed + 100 + s for s in range(p.log_z.ais_seeds))
    rows = n_chains * len(seeds)
    z = torch.randn(rows, b.model.zdim, generator=torch.Generator().manual_seed(p.seed))
    with FlopCounterMode(display=False) as counter:
        _log_ratio_and_grad(b.model.log_f, z)
    flops = counter.get_total_flops() / rows

    def once():
        return log_z_ais(b.model.log_f, b.model.zdim, n_chains=n_chains, n_temps=n_temps, seeds=seeds)

    t = best_time(once, repeats=repeats)
    rate = rows * n_temps / t
    limit = peak_gflops * 1e9 / flops
    return {
        "transitions_per_s": rate,
        "flops_per_transition": flops,
        "limit_transitions_per_s": limit,
        "ratio_to_limit": rate / limit,
        "n_chains": n_chains,
        "n_seeds": len(seeds),
        "n_temps": n_temps,
        "seconds_best": t,
    }
