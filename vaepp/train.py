"""Training: Algorithm 2 (VAEPP, one step), Algorithm 1 (Naive VAEPP, two steps) and the plain VAE.

Per global batch of B images e in [0, 1]: one posterior draw z_i ~ q(z|e_i), K prior draws
ε_k ~ N(0, I), and the m = min(B, K) penalty pairs (e_i, G(ε_i)):

    recon  = −(1/B)·Σ_i log p(e_i | z_i)                       (soft Bernoulli target, eq. 7)
    kl     = (1/B)·Σ_i [log q(z_i|e_i) − log f(z_i)] + log Z_train
    loss   = recon + kl + w·(1/m)·Σ_{i<m} R_i                  (Algorithm 2)

with log Z_train = log(½(Ẑ_N + Ẑ_q)) (`prior.log_z_train`). The paper's Algorithm 2 line 6 adds
βζ to a maximised objective and line 9 updates ω without a gradient; here, as in the authors'
code, the penalty is added to the loss, scaled by w (= `beta_max`), and encoder, decoder, critic
and ξ take one Adam step together. Algorithm 1 takes the same loss without the penalty on
everything but the critic, then one critic step on fresh prior samples,
    (1/B)·Σ_i D(e_i) − (1/K)·Σ_k D(G(ε_k)) + c·(1/m)·Σ_{i<m} R_i
(D low = real; the paper's line 14 swaps them) with Adam(β₁ = 0.5, β₂ = 0.999). The plain VAE is
the same code with β ≡ 0 and log Z = 0.

Every loss is written as a sum over the rows one process holds. On W processes
(`vaepp.distributed`) the global batch is split into contiguous blocks E_r and rank r's loss is

    loss_r = (W/B)·Σ_{i∈E_r} [−log p(e_i|z_i) + log q(z_i|e_i) − log f(z_i)] + log Z_train
             + w·(W/m)·Σ_{i∈E_r, i<m} R_i,

whose gradient averaged over the ranks (DistributedDataParallel) is the gradient of the loss
above; with one process (W = 1, `ONE_PROCESS`) it is that loss. log Z_train needs all B posterior
terms and all K prior samples: log f(z_i) and D(G(ε_k)) are gathered with a gradient
(`distributed.gather_rows`), so every rank forms the one-process log Z_train. Every rank draws the
random numbers of the whole global batch in the one-process order — the posterior ε, then the
K prior ε, then the m α of the penalty — and evaluates the networks on its own rows only; rank r
decodes the prior rows i ∈ E_r, i < m (its penalty pairs) plus a share of the rows m..K−1. So
W processes give the one-process result up to float rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from .certified import lars_log_z, log_prior_density
from .checkpoints import Checkpoint
from .config import TrainParams
from .distributed import DistContext, all_sum, check_same_input, data_parallel, gather_rows, row_range
from .model import VAEPP, ModelSpec
from .penalties import draw_alpha, penalty_sum
from .posteriors import log_standard_normal
from .prior import log_f, log_z_train

Algorithm = Literal["vae", "naive_vaepp", "vaepp", "certified"]
ALGORITHMS: tuple[str, ...] = ("vae", "naive_vaepp", "vaepp", "certified")
Part = Literal["model", "critic"]
ONE_PROCESS = DistContext()
# (e this rank's rows, B, part) → (this rank's loss, metrics of the global batch)
StepLoss = Callable[[Tensor, int, Part], tuple[Tensor, dict[str, float]]]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left in place."""


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one dict of metrics per epoch
    seconds: float = 0.0
    epochs: int = 0
    resumed_from_epoch: int = 0


def train_settings(spec: ModelSpec, params: TrainParams, algorithm: Algorithm) -> dict:
    """The settings a training checkpoint and a model file record; a checkpoint resumes only
    if they match: {"model_spec": …, "train_spec": {"algorithm", **params}}."""
    return {"model_spec": spec.to_dict(), "train_spec": {"algorithm": algorithm, **params.model_dump()}}


# ----- the losses, as sums over this rank's rows ------------------------------------------------
def _prior_rows(ctx: DistContext, batch: int, n_prior: int) -> list[list[int]]:
    """For every rank, the global indices of the prior samples it decodes: its penalty pairs
    i ∈ E_r, i < m = min(B, K), first, then its share of the rows m..K−1."""
    m = min(batch, n_prior)
    rows = []
    for r in range(ctx.world):
        a, b = row_range(batch, r, ctx.world)
        c, d = row_range(n_prior - m, r, ctx.world)
        rows.append(list(range(min(a, m), min(b, m))) + list(range(m + c, m + d)))
    return rows


def elbo_terms(
    model: VAEPP,
    e: Tensor,
    batch: int,
    *,
    n_train: int,
    n_prior_samples: int,
    ctx: DistContext = ONE_PROCESS,
    lars_decay: float = 0.99,
    acceptance_trains_decoder: bool = True,
) -> dict[str, Tensor]:
    """This rank's terms of the negative ELBO; e: its rows E_r (b, C, H, W) of a batch of B.

    Returns sums over i ∈ E_r: "recon" of −log p(e_i|z_i) and "kl" of log q(z_i|e_i) − log f(z_i),
    nats. With a pull-back prior also the global log Z_train, log Ẑ_N, log Ẑ_q (scalars), the
    sums "critic_recon" of D(G(z_i)) over E_r and "critic_prior" of D(G(ε_k)) over this rank's
    prior rows, and "fake": G(ε_k) on those rows (its penalty pairs first), (k_r, C, H, W).
    A certified prior's terms are `_certified_terms`'; with `acceptance_trains_decoder` False its
    critic terms decode with G's weights held fixed (`VAEPP.decode(weights_fixed=True)`), so only the
    reconstruction trains G.
    """
    start, stop = row_range(batch, ctx.rank, ctx.world)
    mu, log_sigma = model.encode(e)
    mu, log_sigma = gather_rows(ctx, mu, n=batch), gather_rows(ctx, log_sigma, n=batch)  # (B, Z)
    z_all, log_q_all = model.sample_q(mu, log_sigma, 1)  # the one-process draw for all B
    z_all, log_q_all = z_all[0], log_q_all[0]  # (B, Z), (B,)
    z, log_q = z_all[start:stop], log_q_all[start:stop]
    raw = model.decode(z)
    recon = -model.log_px(e, raw).sum()
    if not model.spec.pullback:
        check_same_input(ctx, z_all)
        return {"recon": recon, "kl": (log_q - log_standard_normal(z)).sum()}
    beta = model.beta
    fixed = model.spec.certified and not acceptance_trains_decoder
    d_recon = model.critic_images(model.image_mean(model.decode(z, weights_fixed=True) if fixed else raw))  # (b,)
    log_f_z = log_f(z, d_recon, beta)  # (b,)
    eps = torch.randn(n_prior_samples, model.zdim, device=e.device, dtype=e.dtype)
    check_same_input(ctx, z_all, eps)
    prior_rows = _prior_rows(ctx, batch, n_prior_samples)
    fake = model.image_mean(model.decode(eps[prior_rows[ctx.rank]], weights_fixed=fixed))  # (k_r, C, H, W)
    d_prior_mine = model.critic_images(fake)  # (k_r,)
    order = torch.tensor([i for rows in prior_rows for i in rows], device=e.device)
    d_prior = torch.empty(n_prior_samples, device=e.device, dtype=d_prior_mine.dtype).index_copy(
        0, order, gather_rows(ctx, d_prior_mine, [len(rows) for rows in prior_rows])
    )  # (K,)
    if model.spec.certified:
        return _certified_terms(
            model, z, log_q, d_recon, eps, d_prior, d_prior_mine, recon, fake, batch, lars_decay, ctx
        )
    log_z, log_z_n, log_z_q = log_z_train(beta, d_prior, gather_rows(ctx, log_f_z, n=batch), log_q_all, n_train)
    return {
        "recon": recon,
        "kl": (log_q - log_f_z).sum(),
        "log_z": log_z,
        "log_z_n": log_z_n,
        "log_z_q": log_z_q,
        "critic_recon": d_recon.sum(),
        "critic_prior": d_prior_mine.sum(),
        "fake": fake,
    }


def _certified_terms(
    model: VAEPP,
    z: Tensor,
    log_q: Tensor,
    d_recon: Tensor,
    eps: Tensor,
    d_prior: Tensor,
    d_prior_mine: Tensor,
    recon: Tensor,
    fake: Tensor,
    batch: int,
    lars_decay: float,
    ctx: DistContext,
) -> dict[str, Tensor]:
    """The terms of a certified prior p(z) = N(z; 0, I)·a(z)/Z on this rank's rows, with LARS's
    per-image estimate of Z (`certified.lars_log_z`): the K proposals' a(ε_k) plus the image's own
    a(z_i)·N(z_i)/q(z_i|e_i), an EMA (decay `lars_decay`, from the model's `z_ema`) in the forward
    value and the current estimate's gradient. "kl" sums log q(z_i|e_i) − log p(z_i) over E_r, the
    image's log Z_i included; "log_z" is the batch mean of log Z_i (global) and "z_smooth" the sum of
    the smoothed Ẑ_i over E_r, from which `model_loss` moves the EMA."""

    log_n = log_standard_normal(z)
    log_a = model.log_acceptance(z, d_recon)  # (b,)
    log_a_prior = model.log_acceptance(eps, d_prior)  # (K,), D(G(ε)) gathered with its gradient
    log_z_i, _ = lars_log_z(log_a_prior, log_a, (log_n - log_q).detach(), float(model.z_ema), decay=lars_decay)
    log_p = log_prior_density(log_n, log_a, log_z_i, model.spec.truncation)
    (s_log_z,) = all_sum(ctx, [log_z_i.detach().sum()])
    return {
        "recon": recon,
        "kl": (log_q - log_p).sum(),
        "log_z": s_log_z / batch,
        "z_smooth": log_z_i.detach().exp().sum(),
        "critic_recon": d_recon.sum(),
        "critic_prior": d_prior_mine.sum(),
        "fake": fake,
    }


def _penalty_sum(critic, e: Tensor, fake: Tensor, batch: int, params: TrainParams, ctx: DistContext) -> Tensor:
    """Σ R_i over this rank's penalty pairs (e_i, G(ε_i)), i ∈ E_r, i < m = min(B, K); the α of
    all m pairs are drawn on every rank, as one process draws them."""
    m = min(batch, params.n_prior_samples)
    start, stop = row_range(batch, ctx.rank, ctx.world)
    n_mine = max(0, min(stop, m) - start)
    alpha = draw_alpha(params.penalty, m, e)
    return penalty_sum(
        critic,
        e[:n_mine],
        fake[:n_mine],
        None if alpha is None else alpha[start : start + n_mine],
        params.penalty,
        k=params.penalty_k,
        p=params.penalty_p,
    )


def model_loss(
    model: VAEPP,
    e: Tensor,
    batch: int,
    params: TrainParams,
    algorithm: Algorithm,
    *,
    n_train: int,
    ctx: DistContext = ONE_PROCESS,
) -> tuple[Tensor, dict[str, float]]:
    """Rank r's loss of the model step (module docstring: the negative ELBO, plus w·R for
    Algorithm 2) on its rows e of a batch of B, and the global batch's metrics in nats."""
    w = ctx.world
    # Scaled as (W·Σ)/B, not Σ·(W/B): with one process that is Σ/B, torch's mean to the last bit.
    t = elbo_terms(
        model,
        e,
        batch,
        n_train=n_train,
        n_prior_samples=params.n_prior_samples,
        ctx=ctx,
        lars_decay=params.lars_decay,
        acceptance_trains_decoder=params.acceptance_trains_decoder,
    )
    if not model.spec.pullback:
        s_recon, s_kl = all_sum(ctx, [t["recon"], t["kl"]])
        recon, kl = s_recon / batch, s_kl / batch
        loss = w * t["recon"] / batch + w * t["kl"] / batch
        return loss, {"recon": float(recon), "kl": float(kl), "log_z": 0.0, "loss": float(recon + kl)}
    if model.spec.certified:
        return _certified_loss(model, e, t, batch, params, ctx)
    log_z = t["log_z"]
    s_recon, s_kl, s_d_recon, s_d_prior = all_sum(ctx, [t["recon"], t["kl"], t["critic_recon"], t["critic_prior"]])
    recon, kl = s_recon / batch, s_kl / batch + log_z.detach()
    clamped = params.clamp_kl and bool(kl < 0.0)  # the authors' clamp at ≥ 0: value 0, gradient 0
    kl_term = 0.0 * log_z if clamped else w * t["kl"] / batch + log_z
    loss = w * t["recon"] / batch + kl_term
    loss_value = recon + (0.0 * kl if clamped else kl)
    metrics = {
        "recon": float(recon),
        "kl": float(kl),
        "log_z": float(log_z.detach()),
        "log_z_n": float(t["log_z_n"].detach()),
        "log_z_q": float(t["log_z_q"].detach()),
        "critic_recon": float(s_d_recon / batch),
        "critic_prior": float(s_d_prior / params.n_prior_samples),
    }
    if algorithm == "vaepp":
        m = min(batch, params.n_prior_samples)
        pen = _penalty_sum(model.critic, e, t["fake"], batch, params, ctx)
        loss = loss + model.spec.beta_max * (w * pen / m)
        (s_pen,) = all_sum(ctx, [pen])
        penalty = s_pen / m
        loss_value = loss_value + model.spec.beta_max * penalty
        metrics["penalty"] = float(penalty)
    metrics["loss"] = float(loss_value)
    return loss, metrics


def _certified_loss(
    model: VAEPP, e: Tensor, t: dict[str, Tensor], batch: int, params: TrainParams, ctx: DistContext
) -> tuple[Tensor, dict[str, float]]:
    """Rank r's loss of a certified prior's step (Algorithm 2's single optimiser, LARS's log Z):
    (W/B)·Σ_{i∈E_r} [−log p(e_i|z_i) + log q(z_i|e_i) − log p(z_i)] + w·(W/m)·Σ R_i, and the
    global metrics, with "z_ema" the EMA of Ẑ after this step (mean of the smoothed Ẑ_i)."""
    w = ctx.world
    m = min(batch, params.n_prior_samples)
    pen = _penalty_sum(model.critic, e, t["fake"], batch, params, ctx)
    loss = w * t["recon"] / batch + w * t["kl"] / batch + model.spec.beta_max * (w * pen / m)
    s_recon, s_kl, s_d_recon, s_d_prior, s_pen, s_z = all_sum(
        ctx, [t["recon"], t["kl"], t["critic_recon"], t["critic_prior"], pen, t["z_smooth"]]
    )
    recon, kl, penalty = s_recon / batch, s_kl / batch, s_pen / m
    return loss, {
        "recon": float(recon),
        "kl": float(kl),
        "log_z": float(t["log_z"]),
        "critic_recon": float(s_d_recon / batch),
        "critic_prior": float(s_d_prior / params.n_prior_samples),
        "penalty": float(penalty),
        "acceptance_c": float(model.acceptance_c.detach()),
        "z_ema": float(s_z / batch),
        "loss": float(recon + kl + model.spec.beta_max * penalty),
    }


def critic_loss(
    model: VAEPP, e: Tensor, batch: int, params: TrainParams, *, ctx: DistContext = ONE_PROCESS
) -> tuple[Tensor, dict[str, float]]:
    """Rank r's loss of Algorithm 1's critic step on fresh prior samples, decoder frozen:
    (1/B)·Σ D(e_i) − (1/K)·Σ D(G(ε_k)) + c·(1/m)·Σ R_i in its per-rank form; global metrics."""
    w, big_k = ctx.world, params.n_prior_samples
    m = min(batch, big_k)
    with torch.no_grad():
        eps = torch.randn(big_k, model.zdim, device=e.device, dtype=e.dtype)
        fake = model.image_mean(model.decode(eps[_prior_rows(ctx, batch, big_k)[ctx.rank]]))
    check_same_input(ctx, eps)
    pen = _penalty_sum(model.critic, e, fake, batch, params, ctx)
    d_real, d_fake = model.critic_images(e).sum(), model.critic_images(fake).sum()
    c = params.critic_penalty_weight
    loss = w * d_real / batch - w * d_fake / big_k + c * (w * pen / m)
    s_real, s_fake, s_pen = all_sum(ctx, [d_real, d_fake, pen])
    penalty = s_pen / m
    return loss, {"critic_loss": float(s_real / batch - s_fake / big_k + c * penalty), "penalty": float(penalty)}


def step_loss(
    model: VAEPP, params: TrainParams, algorithm: Algorithm, *, n_train: int, ctx: DistContext = ONE_PROCESS
) -> StepLoss:
    """The losses of one step as one callable, (e_r, B, part) → (rank's loss, global metrics),
    part "model" (`model_loss`) or "critic" (`critic_loss`). On W ranks it is wrapped for
    DistributedDataParallel (`distributed.data_parallel`: construction broadcasts rank 0's
    weights), so build it once per fit, after the weights are loaded."""

    def losses(e: Tensor, batch: int, part: Part) -> tuple[Tensor, dict[str, float]]:
        if part == "critic":
            return critic_loss(model, e, batch, params, ctx=ctx)
        return model_loss(model, e, batch, params, algorithm, n_train=n_train, ctx=ctx)

    return data_parallel(ctx, model, losses, find_unused_parameters=algorithm not in ("vaepp", "certified"))


def _check_finite(value: float, epoch: int, step: int, checkpoint_path: Path | None) -> None:
    if not math.isfinite(value):
        kept = (
            f"; last good checkpoint kept at {checkpoint_path}"
            if checkpoint_path is not None and Path(checkpoint_path).is_file()
            else ""
        )
        raise NonFiniteLossError(f"non-finite loss ({value}) at epoch {epoch}, step {step}; training stopped{kept}")


def adam(params, **kwargs) -> torch.optim.Adam:
    """torch's Adam with its fused kernel (CPU and CUDA): one pass over all parameters of a
    group instead of a loop over tensors; a plain VAE step on the CPU took 25% less time."""
    return torch.optim.Adam(params, fused=True, **kwargs)


def make_optimizers(model: VAEPP, params: TrainParams, algorithm: Algorithm) -> dict[str, torch.optim.Optimizer]:
    """Adam over (encoder, decoder, ξ, …) — plus the critic for Algorithm 2 — and, for
    Algorithm 1, a separate critic Adam(β₁ = 0.5, β₂ = 0.999).

    L2 as in the authors' code: `weight_decay`·w added to the gradient (the loss's λ·½Σw²) of
    convolution kernels only; dense layers, biases and Algorithm 1's critic are unregularised. So
    the MLP family trains without L2."""

    def groups(ps, regularised: bool = True):
        ps = [p for p in ps if p.requires_grad]
        decay = [p for p in ps if regularised and p.dim() == 4]  # (out, in, kh, kw) conv kernels
        ids = {id(p) for p in decay}
        rest = [p for p in ps if id(p) not in ids]
        return [{"params": decay, "weight_decay": params.weight_decay}, {"params": rest, "weight_decay": 0.0}]

    if algorithm in ("vaepp", "certified"):
        return {"model": adam(groups(model.parameters()), lr=params.lr)}
    opts = {"model": adam(groups(model.model_parameters()), lr=params.lr)}
    if algorithm == "naive_vaepp":
        critic = groups(model.critic.parameters(), regularised=False)
        opts["critic"] = adam(critic, lr=params.critic_lr, betas=(0.5, 0.999))
    return opts


def train_step(
    model: VAEPP,
    opts: dict[str, torch.optim.Optimizer],
    e: Tensor,
    params: TrainParams,
    algorithm: Algorithm,
    *,
    n_train: int,
    ctx: DistContext = ONE_PROCESS,
    loss_fn: StepLoss | None = None,
    epoch: int = 0,
    step: int = 0,
    checkpoint_path: Path | None = None,
) -> dict[str, float]:
    """One step of `algorithm` on the global batch e (B, C, H, W), the same on every rank (this
    rank keeps its rows E_r); returns the global batch's metrics. loss_fn: `step_loss(...)`,
    built once by `train`; built here when None (one process). The finiteness check is on the
    global loss, so all ranks stop together."""
    batch = e.shape[0]
    if batch < ctx.world:
        raise ValueError(
            f"train.batch_size = {batch} is smaller than the {ctx.world} processes; raise it or use fewer processes"
        )
    loss_fn = loss_fn or step_loss(model, params, algorithm, n_train=n_train, ctx=ctx)
    start, stop = row_range(batch, ctx.rank, ctx.world)
    e_r = e[start:stop]
    loss, metrics = loss_fn(e_r, batch, "model")
    _check_finite(metrics["loss"], epoch, step, checkpoint_path)
    opts["model"].zero_grad(set_to_none=True)
    loss.backward()
    opts["model"].step()
    if "z_ema" in metrics:  # LARS: Z_ema ← the batch mean of the smoothed Ẑ_i, after the step
        model.z_ema.fill_(metrics["z_ema"])
    if algorithm == "naive_vaepp":  # Algorithm 1, critic step
        loss, critic_metrics = loss_fn(e_r, batch, "critic")
        _check_finite(critic_metrics["critic_loss"], epoch, step, checkpoint_path)
        opts["critic"].zero_grad(set_to_none=True)
        loss.backward()
        opts["critic"].step()
        model.zero_grad(set_to_none=True)  # the critic step also filled the VAE's .grad
        metrics.update(critic_metrics)
    # The objective's ELBO: its log Z is the training estimate log Z_train, which training can exploit.
    metrics["elbo_under_train_log_z"] = -(metrics["recon"] + metrics["kl"])
    metrics["beta"] = float(model.beta.detach())
    return metrics


# ----- the loop --------------------------------------------------------------------------------
def _lr_factor(epoch: int, params: TrainParams) -> float:
    """Learning rate halved every `lr_halve_every` epochs (authors: 200)."""
    return 0.5 ** (epoch // params.lr_halve_every)


def train(
    model: VAEPP,
    train_images: Tensor,
    params: TrainParams,
    algorithm: Algorithm,
    *,
    device: str | torch.device = "cpu",
    ctx: DistContext = ONE_PROCESS,
    callback: Callable[[int, dict], None] | None = None,
    checkpoint: Checkpoint | None = None,
    progress: bool = False,
    monitor: Callable[[VAEPP], dict[str, float]] | None = None,
) -> TrainResult:
    """Train `model` with `algorithm` on uint8 images (N, C, H, W) for `params.epochs` epochs.

    With a `checkpoint`, the fit's state is written every `checkpoint_every` epochs and at the
    end, and a fit that finds one resumes from it, so a killed run finishes with the same result
    as an uninterrupted one. `callback(epoch, metrics)` receives each epoch's mean metrics.
    `monitor(model)` (`evaluate.log_z_monitor`) runs after every `log_z_every`-th epoch and after
    the last; its values join that epoch's metrics, with elbo_under_monitor_log_z = the epoch's
    mean ELBO terms under its log Z instead of the per-batch training estimate. It must leave the
    global RNG alone, so that a monitored fit trains exactly as an unmonitored one.
    A non-finite loss raises NonFiniteLossError and leaves the last checkpoint untouched.
    On W processes every rank passes the same arguments and its `ctx`, and the same checkpoint
    file with `write=True` on rank 0 only.
    """
    from tqdm.auto import tqdm

    unresolved = [k for k in ("penalty_p", "critic_penalty_weight") if getattr(params, k) == "auto"]
    if unresolved:
        raise ValueError(f"train.{unresolved[0]} is 'auto': resolve it by the likelihood (vaepp.resolve.train_params)")
    if (algorithm == "certified") != model.spec.certified:
        raise ValueError(
            f"algorithm {algorithm!r} and a model with certified={model.spec.certified} do not go together"
        )
    if (algorithm == "vae") == model.spec.pullback:
        raise ValueError(
            f"algorithm {algorithm!r} needs a model with pullback={algorithm != 'vae'} "
            f"(the plain VAE is β ≡ 0), got pullback={model.spec.pullback}"
        )
    device = torch.device(device)
    model.to(device)
    data = train_images.to(device)
    n_train = data.shape[0]
    if data.dtype != torch.uint8:
        raise TypeError(f"train_images must be uint8, got {data.dtype}")
    torch.manual_seed(params.seed)
    data_gen = torch.Generator(device="cpu").manual_seed(params.seed)
    opts = make_optimizers(model, params, algorithm)
    result = TrainResult()
    settings = train_settings(model.spec, params, algorithm)
    start_epoch = 0
    state = None
    if checkpoint is not None:
        state = checkpoint.resume(
            settings, model, opts, data_gen, device, epochs=params.epochs, every=params.checkpoint_every
        )
    if state is not None:
        start_epoch = result.resumed_from_epoch = int(state["epoch"])
        result.history = list(state["history"])
        result.seconds = float(state["seconds"])
    loss_fn = step_loss(model, params, algorithm, n_train=n_train, ctx=ctx)  # after the weights are loaded

    batch = params.batch_size
    steps = n_train // batch
    if params.max_steps_per_epoch is not None:
        steps = min(steps, params.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"batch_size {batch} exceeds the training set ({n_train} images)")
    model.train()
    for epoch in range(start_epoch, params.epochs):
        t0 = time.perf_counter()
        for opt in opts.values():
            base = params.lr if opt is opts["model"] else params.critic_lr
            for g in opt.param_groups:
                g["lr"] = base * _lr_factor(epoch, params)
        perm = torch.randperm(n_train, generator=data_gen)[: steps * batch].to(device)
        sums: dict[str, float] = {}
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{params.epochs}", disable=not progress, leave=False)
        for step in bar:
            e = data[perm[step * batch : (step + 1) * batch]].float().div_(255.0)
            m = train_step(
                model,
                opts,
                e,
                params,
                algorithm,
                n_train=n_train,
                ctx=ctx,
                loss_fn=loss_fn,
                epoch=epoch + 1,
                step=step,
                checkpoint_path=None if checkpoint is None else checkpoint.path,
            )
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{m['loss']:.2f}", beta=f"{m['beta']:.2f}")
        metrics = {k: v / steps for k, v in sums.items()}
        metrics["beta"] = float(model.beta.detach())
        metrics["epoch"] = epoch + 1
        metrics["seconds"] = time.perf_counter() - t0
        metrics["lr"] = params.lr * _lr_factor(epoch, params)
        every = params.log_z_every or 0
        if monitor is not None and every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == params.epochs):
            model.eval()
            metrics.update(monitor(model))
            model.train()
            # Σ of the ELBO terms without log Z, averaged over the epoch, less the monitored log Z.
            metrics["elbo_under_monitor_log_z"] = (
                metrics["elbo_under_train_log_z"] + metrics.get("log_z", 0.0) - metrics["monitor_log_z"]
            )
        result.history.append(metrics)
        result.seconds += metrics["seconds"]
        if checkpoint is not None:
            checkpoint.after_epoch(epoch + 1, history=result.history, seconds=result.seconds)
        if callback is not None:
            callback(epoch + 1, metrics)
    result.epochs = params.epochs
    model.eval()
    return result
