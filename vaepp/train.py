"""Training: Algorithm 2 (VAEPP, one step) and Algorithm 1 (Naive VAEPP, two steps), for any prior.

Per global batch of B images e in [0, 1]: one posterior draw z_i ~ q(z|e_i), K prior draws
ε_k ~ N(0, I), and the m = min(B, K) penalty pairs (e_i, G(ε_i)):

    recon  = −(1/B)·Σ_i log p(e_i | z_i)                       (soft Bernoulli target, eq. 7)
    kl     = (1/B)·Σ_i [log q(z_i|e_i) − log f(z_i)] + log Z_train
    loss   = recon + kl + w·(1/m)·Σ_{i<m} R_i                  (Algorithm 2)

with log Z_train = log(½(Ẑ_N + Ẑ_q)) (`priors.pullback.log_z_train`). The paper's Algorithm 2 line 6 adds
βζ to a maximised objective and line 9 updates ω without a gradient; here, as in the authors'
code, the penalty is added to the loss, scaled by w (= `beta_max`), and encoder, decoder, critic
and ξ take one Adam step together. Algorithm 1 takes the same loss without the penalty on
everything but the critic, then one critic step on fresh prior samples,
    (1/B)·Σ_i D(e_i) − (1/K)·Σ_k D(G(ε_k)) + c·(1/m)·Σ_{i<m} R_i
(D low = real; the paper's line 14 swaps them) with Adam(β₁ = 0.5, β₂ = 0.999). The formulas above
are the pull-back prior's; each prior forms its own terms and loss (`vaepp.priors`: N(0, I) has
log f = log N(z; 0, I), log Z = 0 and no critic; the certified prior uses LARS's estimate of Z),
while the posterior draw, the optimisers, the steps and the loop here are shared.

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

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from .checkpoints import Checkpoint
from .config import TrainParams
from .distributed import ONE_PROCESS, DistContext, all_sum, check_same_input, data_parallel, gather_rows, row_range
from .early_stopping import StopDecision, stop_decision
from .model import VAEPP, ModelSpec
from .optim import adam, check_finite, halving_factor
from .priors import PosteriorDraw
from .priors.pullback import penalty_rows_sum, prior_rows

Part = Literal["model", "critic"]
# (e this rank's rows, B, part) → (this rank's loss, metrics of the global batch)
StepLoss = Callable[[Tensor, int, Part], tuple[Tensor, dict[str, float]]]


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one dict of metrics per epoch
    seconds: float = 0.0
    epochs: int = 0  # epochs trained: train.epochs, or fewer after an early stop
    resumed_from_epoch: int = 0
    # with train.patience: the epoch whose weights the model ends with (None: no finite
    # validation NLL, the last epoch's weights) and whether the fit stopped before train.epochs
    best_epoch: int | None = None
    stopped_early: bool = False


def train_settings(spec: ModelSpec, params: TrainParams) -> dict:
    """The settings a training checkpoint and a model file record; a checkpoint resumes only
    if they match: {"model_spec": …, "train_spec": params (the training algorithm included)}."""
    return {"model_spec": spec.to_dict(), "train_spec": params.model_dump()}


# ----- the losses, as sums over this rank's rows ------------------------------------------------
def elbo_terms(
    model: VAEPP, e: Tensor, batch: int, params: TrainParams, *, n_train: int, ctx: DistContext = ONE_PROCESS
) -> dict[str, Tensor]:
    """This rank's terms of the negative ELBO; e: its rows E_r (b, C, H, W) of a batch of B.

    The posterior draw is the same for every prior: the encoder's μ, log σ of all B rows are
    gathered, z_i ~ q(z|e_i) is drawn for all of them in the one-process order, and this rank
    decodes its own rows. The prior (`model.prior`, `vaepp.priors`) then forms its terms: sums over
    i ∈ E_r of "recon" (−log p(e_i|z_i)) and "kl" (log q(z_i|e_i) − log f(z_i)), in nats, and
    whatever its training estimate of log Z and its critic need.
    """
    start, stop = row_range(batch, ctx.rank, ctx.world)
    mu, log_sigma = model.encode(e)
    mu, log_sigma = gather_rows(ctx, mu, n=batch), gather_rows(ctx, log_sigma, n=batch)  # (B, zdim)
    z_all, log_q_all = model.sample_q(mu, log_sigma, 1)  # the one-process draw for all B
    z_all, log_q_all = z_all[0], log_q_all[0]  # (B, zdim), (B,)
    z, log_q = z_all[start:stop], log_q_all[start:stop]
    raw = model.decode(z)
    recon = -model.log_px(e, raw).sum()
    draw = PosteriorDraw(z_all=z_all, log_q_all=log_q_all, z=z, log_q=log_q, raw=raw, recon=recon)
    return model.prior.elbo_terms(model, draw, e, batch, params, n_train, ctx)


def model_loss(
    model: VAEPP, e: Tensor, batch: int, params: TrainParams, *, n_train: int, ctx: DistContext = ONE_PROCESS
) -> tuple[Tensor, dict[str, float]]:
    """Rank r's loss of the model step (module docstring: the negative ELBO, plus w·R for
    Algorithm 2) on its rows e of a batch of B, and the global batch's metrics in nats; the prior's
    `loss` forms it. Scaled as (W·Σ)/B, not Σ·(W/B): with one process that is Σ/B, torch's mean to
    the last bit."""
    t = elbo_terms(model, e, batch, params, n_train=n_train, ctx=ctx)
    return model.prior.loss(model, e, t, batch, params, ctx)


def critic_loss(
    model: VAEPP, e: Tensor, batch: int, params: TrainParams, *, ctx: DistContext = ONE_PROCESS
) -> tuple[Tensor, dict[str, float]]:
    """Rank r's loss of Algorithm 1's critic step on fresh prior samples, decoder frozen:
    (1/B)·Σ D(e_i) − (1/K)·Σ D(G(ε_k)) + c·(1/m)·Σ R_i in its per-rank form; global metrics."""
    n_ranks, big_k = ctx.world, params.n_prior_samples
    m = min(batch, big_k)
    with torch.no_grad():
        eps = torch.randn(big_k, model.zdim, device=e.device, dtype=e.dtype)
        fake = model.image_mean(model.decode(eps[prior_rows(ctx, batch, big_k)[ctx.rank]]))
    check_same_input(ctx, eps)
    pen = penalty_rows_sum(model.critic, e, fake, batch, params, ctx)
    d_real, d_fake = model.critic_images(e).sum(), model.critic_images(fake).sum()
    c = params.critic_penalty_weight
    loss = n_ranks * d_real / batch - n_ranks * d_fake / big_k + c * (n_ranks * pen / m)
    s_real, s_fake, s_pen = all_sum(ctx, [d_real, d_fake, pen])
    penalty = s_pen / m
    return loss, {"critic_loss": float(s_real / batch - s_fake / big_k + c * penalty), "penalty": float(penalty)}


def step_loss(model: VAEPP, params: TrainParams, *, n_train: int, ctx: DistContext = ONE_PROCESS) -> StepLoss:
    """The losses of one step as one callable, (e_r, B, part) → (rank's loss, global metrics),
    part "model" (`model_loss`) or "critic" (`critic_loss`). On W ranks it is wrapped for
    DistributedDataParallel (`distributed.data_parallel`: construction broadcasts rank 0's
    weights), so build it once per fit, after the weights are loaded."""

    def losses(e: Tensor, batch: int, part: Part) -> tuple[Tensor, dict[str, float]]:
        if part == "critic":
            return critic_loss(model, e, batch, params, ctx=ctx)
        return model_loss(model, e, batch, params, n_train=n_train, ctx=ctx)

    return data_parallel(ctx, model, losses, find_unused_parameters=not joint_critic(model, params))


def joint_critic(model: VAEPP, params: TrainParams) -> bool:
    """Whether the critic trains in the model's own step: a prior with a critic under Algorithm 2."""
    return model.prior.has_critic and params.algorithm == "vaepp"


def make_optimizers(model: VAEPP, params: TrainParams) -> dict[str, torch.optim.Optimizer]:
    """Adam over (encoder, decoder, the prior's parameters, …) — plus the critic for Algorithm 2 —
    and, for Algorithm 1, a separate critic Adam(β₁ = 0.5, β₂ = 0.999); N(0, I) has no critic.

    L2 as in the authors' code: `weight_decay`·w added to the gradient (the loss's λ·½Σw²) of
    convolution kernels only; dense layers, biases and Algorithm 1's critic are unregularised. So
    the MLP family trains without L2."""

    def groups(ps, regularised: bool = True):
        ps = [p for p in ps if p.requires_grad]
        decay = [p for p in ps if regularised and p.dim() == 4]  # (out, in, kh, kw) conv kernels
        ids = {id(p) for p in decay}
        rest = [p for p in ps if id(p) not in ids]
        return [{"params": decay, "weight_decay": params.weight_decay}, {"params": rest, "weight_decay": 0.0}]

    if joint_critic(model, params):
        return {"model": adam(groups(model.parameters()), lr=params.lr)}
    opts = {"model": adam(groups(model.model_parameters()), lr=params.lr)}
    if model.prior.has_critic:  # Algorithm 1
        critic = groups(model.critic.parameters(), regularised=False)
        opts["critic"] = adam(critic, lr=params.critic_lr, betas=(0.5, 0.999))
    return opts


def train_step(
    model: VAEPP,
    opts: dict[str, torch.optim.Optimizer],
    e: Tensor,
    params: TrainParams,
    *,
    n_train: int,
    ctx: DistContext = ONE_PROCESS,
    loss_fn: StepLoss | None = None,
    epoch: int = 0,
    step: int = 0,
    checkpoint_path: Path | None = None,
) -> dict[str, float]:
    """One step of `params.algorithm` on the global batch e (B, C, H, W), the same on every rank (this
    rank keeps its rows E_r); returns the global batch's metrics. loss_fn: `step_loss(...)`,
    built once by `train`; built here when None (one process). The finiteness check is on the
    global loss, so all ranks stop together."""
    batch = e.shape[0]
    if batch < ctx.world:
        raise ValueError(
            f"train.batch_size = {batch} is smaller than the {ctx.world} processes; raise it or use fewer processes"
        )
    loss_fn = loss_fn or step_loss(model, params, n_train=n_train, ctx=ctx)
    start, stop = row_range(batch, ctx.rank, ctx.world)
    e_r = e[start:stop]
    loss, metrics = loss_fn(e_r, batch, "model")
    check_finite(metrics["loss"], epoch, step, checkpoint_path)
    opts["model"].zero_grad(set_to_none=True)
    loss.backward()
    opts["model"].step()
    model.prior.after_step(metrics)
    if "critic" in opts:  # Algorithm 1, critic step
        loss, critic_metrics = loss_fn(e_r, batch, "critic")
        check_finite(critic_metrics["critic_loss"], epoch, step, checkpoint_path)
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
def train(
    model: VAEPP,
    train_images: Tensor,
    params: TrainParams,
    *,
    device: str | torch.device = "cpu",
    ctx: DistContext = ONE_PROCESS,
    callback: Callable[[int, dict], None] | None = None,
    checkpoint: Checkpoint | None = None,
    progress: bool = False,
    monitor: Callable[[VAEPP], dict[str, float]] | None = None,
) -> TrainResult:
    """Train `model` with `params.algorithm` on uint8 images (N, C, H, W) for `params.epochs` epochs.

    With a `checkpoint`, the fit's state is written every `checkpoint_every` epochs and at the
    end, and a fit that finds one resumes from it, so a killed run finishes with the same result
    as an uninterrupted one. `callback(epoch, metrics)` receives each epoch's mean metrics.
    `monitor(model)` (`log_z_monitor.log_z_monitor`) runs after every `log_z_every`-th epoch and after
    the last; its values join that epoch's metrics, with elbo_under_monitor_log_z = the epoch's
    mean ELBO terms under its log Z instead of the per-batch training estimate. It must leave the
    global RNG alone, so that a monitored fit trains exactly as an unmonitored one.
    With `params.patience` (early stopping, `vaepp.early_stopping`; it needs the monitor) the fit
    stops after `patience` monitor checks in a row without a new best validation NLL, and the model
    ends with the weights of its best checked epoch (`TrainResult.best_epoch`), which the
    checkpoint stores beside the current ones. The decision reads only the history, and keeping
    the best weights draws no random number, so until it stops such a fit trains bitwise as one
    without early stopping, and a resumed fit stops at the same epoch with the same weights.
    A non-finite loss raises NonFiniteLossError and leaves the last checkpoint untouched.
    On W processes every rank passes the same arguments and its `ctx`, and the same checkpoint
    file with `write=True` on rank 0 only.
    """
    from tqdm.auto import tqdm

    unresolved = [k for k in ("penalty_p", "critic_penalty_weight") if getattr(params, k) == "auto"]
    if unresolved:
        raise ValueError(f"train.{unresolved[0]} is 'auto': resolve it by the likelihood (vaepp.resolve.train_params)")
    if params.algorithm not in model.prior.algorithms:
        raise ValueError(
            f"train.algorithm = {params.algorithm!r}: the {model.spec.prior} prior trains with "
            f"{' or '.join(model.prior.algorithms)} only"
        )
    patience = params.patience
    if patience is not None and (monitor is None or not params.log_z_every):
        raise ValueError(
            f"train.patience = {patience}: early stopping needs the log-Z monitor's validation NLL; "
            "pass a monitor and set train.log_z_every >= 1, or set train.patience: null"
        )
    device = torch.device(device)
    model.to(device)
    data = train_images.to(device)
    n_train = data.shape[0]
    if data.dtype != torch.uint8:
        raise TypeError(f"train_images must be uint8, got {data.dtype}")
    torch.manual_seed(params.seed)
    data_gen = torch.Generator(device="cpu").manual_seed(params.seed)
    opts = make_optimizers(model, params)
    result = TrainResult()
    settings = train_settings(model.spec, params)
    start_epoch = 0
    state = None
    best_state = None  # with patience: the best checked epoch's state_dict so far
    if checkpoint is not None:
        state = checkpoint.resume(
            settings, model, opts, data_gen, device, epochs=params.epochs, every=params.checkpoint_every
        )
    if state is not None:
        start_epoch = result.resumed_from_epoch = int(state["epoch"])
        result.history = list(state["history"])
        result.seconds = float(state["seconds"])
        if patience is not None:
            best_state = state["best_model"]
    loss_fn = step_loss(model, params, n_train=n_train, ctx=ctx)  # after the weights are loaded

    batch = params.batch_size
    steps = n_train // batch
    if params.max_steps_per_epoch is not None:
        steps = min(steps, params.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"batch_size {batch} exceeds the training set ({n_train} images)")
    decision = None if patience is None else stop_decision(result.history, patience)
    model.train()
    for epoch in range(start_epoch, params.epochs):
        if decision is not None and decision.stop:
            break  # resumed from the checkpoint of a fit that had stopped early
        t0 = time.perf_counter()
        for opt in opts.values():
            base = params.lr if opt is opts["model"] else params.critic_lr
            for g in opt.param_groups:
                g["lr"] = base * halving_factor(epoch, params.lr_halve_every)
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
        metrics["lr"] = params.lr * halving_factor(epoch, params.lr_halve_every)
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
        best = {}
        if decision is not None:
            decision = stop_decision(result.history, patience)
            if decision.best_epoch == epoch + 1:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = {"best_model": best_state}
        if checkpoint is not None:
            stopping = decision is not None and decision.stop
            checkpoint.after_epoch(epoch + 1, last=stopping, history=result.history, seconds=result.seconds, **best)
        if callback is not None:
            callback(epoch + 1, metrics)
    result.epochs = len(result.history)
    if decision is not None:
        _end_at_best(model, result, decision, best_state, params.epochs)
    model.eval()
    return result


def _end_at_best(
    model: VAEPP, result: TrainResult, decision: StopDecision, best_state: dict | None, epochs: int
) -> None:
    """The end of a fit with early stopping: the model takes the best checked epoch's weights
    (kept as they are when no check gave a finite NLL) and `result` says which and whether the
    fit stopped before `epochs`."""
    result.best_epoch = decision.best_epoch
    result.stopped_early = decision.stop and result.epochs < epochs
    if best_state is not None:
        model.load_state_dict(best_state)
