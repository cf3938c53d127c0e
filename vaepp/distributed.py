"""Scale-out on torch.distributed: DDP training and row-sharded evaluation that reduce exactly.

One rule makes every result independent of the number of processes W: **every rank draws the
same random numbers as a single process would, for the whole global batch, and evaluates the
networks only on its own rows.** The ranks start from the same seed, so their random streams stay
identical; the per-row network outputs are all-gathered (or, in training, the per-rank loss is
weighted so that DDP's gradient average is the one-process gradient). Consequences:

- a W-process run is the one-process run up to float rounding (the networks see sub-batches), so
  2-process results equal 1-process results with the same seeds (tests/test_distributed.py);
- the checkpointed RNG state is the same on every rank, so resuming works for any W;
- the replicated work (random draws, encoder statistics, log-sum-exp reductions) is a few
  flops per row against the millions of a decoder + critic pass.

Training (`ShardedTrainStep`, `fit_latent_gan_sharded`): the global batch of B images is split
into contiguous row blocks, rank r owning E_r. A `nn.Module` objective, wrapped in
DistributedDataParallel, computes in its `forward` rank r's loss

    loss_r = (W/B)·Σ_{i∈E_r} [−log p(e_i|z_i) + log q(z_i|e_i) − log f(z_i)]
             + log Z_train + w·(W/m)·Σ_{pairs i∈E_r, i<m} R_i,

and DDP averages ∇loss_r over ranks, which gives the gradient of the one-process loss. The
log-Z training estimate log ½(Ẑ_N + Ẑ_q) is formed from ALL B posterior terms and ALL K prior
samples: log f(z_i) and D(G(ε_k)) are all-gathered with an autograd-aware gather (backward: sum
of every rank's gradient, then each rank keeps its rows), so every rank computes the same
log Z_train as one process on the global batch, and its gradient reaches every row exactly once
after DDP's average. The encoder's μ, log σ are gathered too, so that z ~ q(z|e) is drawn for the
global batch with the one-process random stream. The gradient penalty pairs e_i with G(ε_i),
i < m = min(B, K), with α_i drawn for all m pairs; rank r decodes the prior rows i ∈ E_r, i < m,
first (its pairs) plus a share of the rows m..K−1, so no image crosses ranks.

Evaluation (`ShardedLatentModel`, `sharded_log_f`, `shard_rows`, `ShardedModule`): the
one-process estimators of `vaepp.nll`, `vaepp.logz`, `vaepp.mala` and `vaepp.fid` run unchanged
on every rank, on wrapped callables that evaluate their networks on this rank's share of the rows
and all-gather the outputs; NLL and log-Z log-sum-exps, and the FID feature sums, are then
computed from the same numbers as in one process. A fingerprint of each sharded input is
compared across ranks (one small all-gather), so ranks that drew different numbers (e.g. mixed
GPU models) stop with an error instead of combining unrelated samples.

The library never reads the environment: `launch_from_env(mapping)` parses torchrun's variables
from the mapping it is given; `torch.distributed`'s own env:// rendezvous then reads
MASTER_ADDR/MASTER_PORT from the process environment, as torchrun expects.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .penalties import PenaltyKind, critic_grad_norm
from .posteriors import log_standard_normal
from .prior import log_z_train
from .train import adam

Backend = Literal["auto", "gloo", "nccl"]
BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")


# ----- who am I -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """torchrun's description of this process: global rank, world size, rank on this node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    from_launcher: bool = False  # started by torchrun (WORLD_SIZE was set), even with world = 1


def launch_from_env(env: Mapping[str, str]) -> Launch:
    """Parse RANK, WORLD_SIZE, LOCAL_RANK as torchrun sets them; absent → one process.

    Raises ValueError with one line naming the variable when a value is not a valid integer.
    """
    if "WORLD_SIZE" not in env:
        return Launch()
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = env.get(key, "0")
        try:
            values[key] = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {key}={raw!r} is not an integer; launch with "
                             "torchrun, or unset WORLD_SIZE for one process") from None
    launch = Launch(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], from_launcher=True)
    if launch.world < 1 or not 0 <= launch.rank < launch.world or launch.local_rank < 0:
        raise ValueError(f"RANK={launch.rank}, WORLD_SIZE={launch.world}, LOCAL_RANK={launch.local_rank} "
                         "are inconsistent (need 0 <= RANK < WORLD_SIZE); launch with torchrun")
    return launch


def relaunch_command(launch: Launch, nproc_per_node: int, script: str, argv: Sequence[str],
                     python: str) -> list[str] | None:
    """The `torchrun --standalone --nproc_per_node=N script -- argv…` command that starts N local
    processes, when `nproc_per_node` > 1 asks for them and this process was not started by a
    launcher (then None: run here). python: the interpreter (sys.executable at the edge)."""
    if nproc_per_node <= 1 or launch.from_launcher:
        return None
    # "--" ends torchrun's own options: without it, argparse reads the script's `--run` as an
    # abbreviation of torchrun's `--run-path`.
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            script, "--", *argv]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. world = 1 (the default) makes every helper below the
    identity, with no collective and no process group. `group` carries the row gathers, apart
    from the default group that DDP's gradient all-reduce uses."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    group: Any = None

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes outputs, checkpoints and MLflow runs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's value of `flag` on every rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device)
        dist.broadcast(t, src=0, group=self.group)
        return bool(t.item())

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")


def resolve_backend(setting: Backend, device_type: str) -> str:
    """auto → nccl on CUDA devices, gloo on the CPU; nccl without CUDA is refused."""
    if setting not in BACKENDS:
        raise ValueError(f"distributed.backend = {setting!r}; allowed: {', '.join(BACKENDS)}")
    if setting == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if setting == "nccl" and device_type != "cuda":
        raise ValueError("distributed.backend = 'nccl' needs CUDA devices (device: cuda); "
                         "use 'gloo' or 'auto' on the CPU")
    return setting


@contextmanager
def session(launch: Launch, *, backend: Backend = "auto", device: str | torch.device = "cpu",
            timeout_s: float | None = None) -> Iterator[DistContext]:
    """The process group for the duration of a stage: a one-process DistContext when
    launch.world == 1; otherwise init (env:// rendezvous, as set up by torchrun), a second group
    for the row gathers, and destroy on exit. On CUDA, rank r uses device cuda:LOCAL_RANK.
    timeout_s: how long a collective waits for the other ranks (None: torch's default, 30 min)."""
    device = torch.device(device)
    if launch.world == 1:
        yield DistContext(device=device)
        return
    chosen = resolve_backend(backend, device.type)
    if device.type == "cuda":
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    owner = not dist.is_initialized()
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    if owner:
        dist.init_process_group(chosen, init_method="env://", rank=launch.rank, world_size=launch.world,
                                timeout=timeout)
    elif dist.get_world_size() != launch.world or dist.get_rank() != launch.rank:
        raise RuntimeError("a process group with another rank/world size is already initialised")
    group = dist.new_group(list(range(launch.world)), backend=chosen, timeout=timeout)
    try:
        yield DistContext(rank=launch.rank, world=launch.world, device=device, group=group)
    finally:
        dist.destroy_process_group(group)
        if owner:
            dist.destroy_process_group()


# ----- rows and gathers -----------------------------------------------------------------------
def row_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous block [start, stop) of n rows; block sizes differ by at most 1."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _all_gather_padded(ctx: DistContext, local: Tensor, sizes: Sequence[int]) -> Tensor:
    """Concatenate every rank's `local` (sizes[r] rows each, same trailing shape) in rank order."""
    width = max(sizes)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=ctx._comm_device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    dist.all_gather(parts, padded, group=ctx.group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(local.device)


class _GatherRows(torch.autograd.Function):
    """All-gather with a gradient: backward sums every rank's gradient of the gathered tensor
    and returns this rank's rows, as the chain rule for a tensor that every rank uses requires."""

    @staticmethod
    def forward(fctx, local: Tensor, ctx: DistContext, sizes: tuple[int, ...]) -> Tensor:
        fctx.ctx, fctx.sizes = ctx, sizes
        return _all_gather_padded(ctx, local, sizes)

    @staticmethod
    def backward(fctx, grad: Tensor):
        total = grad.to(fctx.ctx._comm_device, copy=True).contiguous()
        dist.all_reduce(total, group=fctx.ctx.group)
        start = sum(fctx.sizes[: fctx.ctx.rank])
        return total[start : start + fctx.sizes[fctx.ctx.rank]].to(grad.device), None, None


def gather_rows(ctx: DistContext, local: Tensor, sizes: Sequence[int] | None = None, *, n: int | None = None) -> Tensor:
    """Rows of every rank, in rank order; differentiable (see `_GatherRows`). Give either the
    per-rank `sizes`, or `n` for the blocks of `row_range(n, ·, world)`. Identity when world = 1."""
    if not ctx.distributed:
        return local
    if sizes is None:
        sizes = [b - a for a, b in (row_range(n, r, ctx.world) for r in range(ctx.world))]
    sizes = tuple(int(s) for s in sizes)
    if local.shape[0] != sizes[ctx.rank]:
        raise ValueError(f"rank {ctx.rank} holds {local.shape[0]} rows, expected {sizes[ctx.rank]}")
    if torch.is_grad_enabled() and local.requires_grad:
        return _GatherRows.apply(local, ctx, sizes)
    return _all_gather_padded(ctx, local, sizes)


def check_same_input(ctx: DistContext, *tensors: Tensor) -> None:
    """Raise if the ranks hold different values of tensors that should be replicated.

    Compares a float64 fingerprint (Σx, Σx²) of each tensor across ranks, exactly. Replicated
    random draws differ only if the ranks' generators do (different seeds or GPU models)."""
    if not ctx.distributed:
        return
    fp = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
                      for t in tensors]).reshape(-1).to(ctx._comm_device)
    parts = [torch.empty_like(fp) for _ in range(ctx.world)]
    dist.all_gather(parts, fp, group=ctx.group)
    if not all(torch.equal(p.nan_to_num(nan=0.5), parts[0].nan_to_num(nan=0.5)) for p in parts):
        raise RuntimeError(
            "the ranks drew different random numbers for the same rows (fingerprints "
            f"{[p.tolist() for p in parts]}); every rank must use the same seed and the same device "
            "type and model, or run with one process"
        )


def _local(x: Tensor, start: int, stop: int) -> Tensor:
    """x[start:stop], or x[:1] when the block is empty (a network needs ≥ 1 row; the output
    row is dropped again by the caller), so shapes are known on every rank."""
    return x[start:stop] if stop > start else x[:1]


def shard_rows(ctx: DistContext, fn: Callable[[Tensor], Any]) -> Callable[[Tensor], Any]:
    """fn on rows: x (M, ...) → fn(x) (a tensor or a tuple of tensors, each (M, ...)), computed
    on this rank's rows and all-gathered (not differentiable: use for values and for functions
    that return their own gradients, e.g. a model's `energy_and_grad` for MALA)."""
    if not ctx.distributed:
        return fn

    def sharded(x: Tensor):
        check_same_input(ctx, x)
        m = x.shape[0]
        start, stop = row_range(m, ctx.rank, ctx.world)
        out = fn(_local(x, start, stop))
        single = isinstance(out, Tensor)
        outs = (out,) if single else tuple(out)
        gathered = tuple(gather_rows(ctx, o.detach()[: stop - start], n=m) for o in outs)
        return gathered[0] if single else gathered

    return sharded


class _ShardedLogF(torch.autograd.Function):
    """log f on rows with a first-order gradient: forward evaluates log f and ∇log f on this
    rank's rows and all-gathers both; backward is grad_out·∇log f (no further communication)."""

    @staticmethod
    def forward(fctx, z: Tensor, log_f, ctx: DistContext) -> Tensor:
        rows = z.reshape(-1, z.shape[-1])  # (R, Z)
        start, stop = row_range(rows.shape[0], ctx.rank, ctx.world)
        with torch.enable_grad():
            zl = _local(rows, start, stop).detach().requires_grad_(True)
            value = log_f(zl)
            (grad,) = torch.autograd.grad(value.sum(), zl)
        n = rows.shape[0]
        value = gather_rows(ctx, value.detach()[: stop - start], n=n)
        fctx.save_for_backward(gather_rows(ctx, grad[: stop - start], n=n).reshape(z.shape))
        return value.reshape(z.shape[:-1])

    @staticmethod
    def backward(fctx, grad_out: Tensor):
        (grad,) = fctx.saved_tensors
        return grad_out.unsqueeze(-1) * grad, None, None


def sharded_log_f(ctx: DistContext, log_f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """log f: (..., Z) → (...) evaluated on this rank's share of the rows and all-gathered; when
    its input requires a gradient (AIS, MALA through `energy_from_log_f`) the gradient is exact
    to first order. For `log_z_q_based`, `log_z_prior_is`, `log_z_ais`."""
    if not ctx.distributed:
        return log_f

    def sharded(z: Tensor) -> Tensor:
        check_same_input(ctx, z)
        if torch.is_grad_enabled() and z.requires_grad:
            return _ShardedLogF.apply(z, log_f, ctx)
        rows = z.reshape(-1, z.shape[-1])
        start, stop = row_range(rows.shape[0], ctx.rank, ctx.world)
        value = log_f(_local(rows, start, stop))[: stop - start]
        return gather_rows(ctx, value, n=rows.shape[0]).reshape(z.shape[:-1])

    return sharded


class ShardedLatentModel:
    """The `vaepp.nll.LatentModel` protocol over a model, sharded: `encode` splits the images,
    `log_px_and_log_f` splits the samples (or the images when there are fewer samples than
    ranks); `sample_q` and everything random stay replicated. Pass it to `estimate_nll`, and its
    `encode`/`sample_q` to `log_z_q_based` and to the latent GAN's posterior pool."""

    def __init__(self, model, ctx: DistContext):
        self.model, self.ctx = model, ctx
        self.zdim = model.zdim

    def encode(self, e: Tensor) -> tuple[Tensor, Tensor]:
        if not self.ctx.distributed:
            return self.model.encode(e)
        n = e.shape[0]
        start, stop = row_range(n, self.ctx.rank, self.ctx.world)
        mu, log_sigma = self.model.encode(_local(e, start, stop))
        return (gather_rows(self.ctx, mu[: stop - start], n=n),
                gather_rows(self.ctx, log_sigma[: stop - start], n=n))

    def sample_q(self, mu, log_sigma, n, generator=None):
        return self.model.sample_q(mu, log_sigma, n, generator=generator)

    def log_px_and_log_f(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, ...), z (n, B, Z) → log p(x|z), log f(z), each (n, B)."""
        ctx = self.ctx
        if not ctx.distributed:
            return self.model.log_px_and_log_f(x, z)
        check_same_input(ctx, x, z)
        n, b = z.shape[:2]
        if n >= ctx.world:  # split the samples: every rank sees all B images
            start, stop = row_range(n, ctx.rank, ctx.world)
            log_px, log_f = self.model.log_px_and_log_f(x, _local(z, start, stop))
            return (gather_rows(ctx, log_px[: stop - start], n=n),
                    gather_rows(ctx, log_f[: stop - start], n=n))
        start, stop = row_range(b, ctx.rank, ctx.world)  # split the images
        z_mine = _local(z.transpose(0, 1), start, stop).transpose(0, 1)  # (n, b_r, Z)
        log_px, log_f = self.model.log_px_and_log_f(_local(x, start, stop), z_mine)
        return (gather_rows(ctx, log_px.T[: stop - start], n=b).T,
                gather_rows(ctx, log_f.T[: stop - start], n=b).T)


class ShardedModule(nn.Module):
    """A network on rows, sharded: forward(x (B, ...)) runs `net` on this rank's rows and
    all-gathers its output (a tensor, or a list/tuple of tensors as pytorch-fid's Inception
    returns). For inference (the FID features); the wrapped net stays `self.net`."""

    def __init__(self, net: nn.Module, ctx: DistContext):
        super().__init__()
        self.net, self.ctx = net, ctx

    def forward(self, x: Tensor):
        return shard_rows(self.ctx, self.net)(x)

    def __getattr__(self, name: str):
        """Attributes of the wrapped net show through (e.g. `fid_weights_sha256`, which keys
        the FID reference-statistics cache)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)


# ----- the gradient penalty on a shard ----------------------------------------------------------
def penalty_sum(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, alpha: Tensor | None,
                kind: PenaltyKind, *, k: float, p: float) -> Tensor:
    """Σ over this shard's pairs of the per-pair terms of `penalties.gradient_penalty` (its table),
    with α given (drawn for all m pairs of the global batch, so the shards use one process's α):
    wgan_gp k(‖∇D(x̂)‖ − 1)², wgan_div_1 k‖∇D(x̂)‖^p, wgan_div_2 (k/2)(‖∇D(e)‖^p + ‖∇D(ê)‖^p),
    x̂ = ê + α(e − ê). The global penalty is this sum over all ranks divided by m."""
    if real.shape[0] == 0:
        return real.new_zeros(())
    if kind == "wgan_div_2":
        return 0.5 * k * (critic_grad_norm(critic, real).pow(p).sum() + critic_grad_norm(critic, fake).pow(p).sum())
    norm = critic_grad_norm(critic, fake + alpha * (real - fake))
    if kind == "wgan_gp":
        return k * (norm - 1.0).square().sum()
    if kind == "wgan_div_1":
        return k * norm.pow(p).sum()
    raise ValueError(f"unknown penalty kind {kind!r}")


def _draw_alpha(kind: PenaltyKind, m: int, like: Tensor) -> Tensor | None:
    """The α ~ U(0,1) of `penalties.interpolate` for m pairs, from the global RNG (None for
    wgan_div_2, which draws nothing), shaped to broadcast over `like`'s trailing dimensions."""
    if kind == "wgan_div_2":
        return None
    return torch.rand((m,) + (1,) * (like.dim() - 1), device=like.device, dtype=like.dtype)


def _all_sum(ctx: DistContext, values: list[Tensor]) -> list[float]:
    """Σ over ranks of detached scalars, in one all-reduce (identity when world = 1)."""
    t = torch.stack([v.detach().to(torch.float64) for v in values])
    if ctx.distributed:
        t = t.to(ctx._comm_device)
        dist.all_reduce(t, group=ctx.group)
    return t.tolist()


# ----- VAE training under DDP -----------------------------------------------------------------
class _VAEPPObjective(nn.Module):
    """Rank r's loss for one step of `vaepp.train.train_step` on the global batch (module
    docstring). forward(e_local, B, mode) → {"loss": this rank's loss, "metrics": global values}."""

    def __init__(self, model, spec, n_train: int, ctx: DistContext):
        super().__init__()
        self.model, self.spec, self.n_train, self.ctx = model, spec, n_train, ctx

    def _prior_rows(self, batch: int) -> tuple[list[list[int]], list[int]]:
        """For every rank: the global indices of the prior samples it decodes (its penalty pairs
        i ∈ E_r, i < m, first, then its share of m..K−1), and its number of pairs."""
        ctx, big_k = self.ctx, self.spec.n_prior_samples
        m = min(batch, big_k)
        rows, n_pairs = [], []
        for r in range(ctx.world):
            a, b = row_range(batch, r, ctx.world)
            pairs = list(range(min(a, m), min(b, m)))
            c, d = row_range(big_k - m, r, ctx.world)
            rows.append(pairs + list(range(m + c, m + d)))
            n_pairs.append(len(pairs))
        return rows, n_pairs

    def forward(self, e: Tensor, batch: int, mode: str) -> dict:
        model, spec, ctx = self.model, self.spec, self.ctx
        w = ctx.world
        start, stop = row_range(batch, ctx.rank, w)
        k_all = spec.n_prior_samples
        m = min(batch, k_all)
        prior_rows, n_pairs = self._prior_rows(batch)
        mine, n_mine = prior_rows[ctx.rank], n_pairs[ctx.rank]
        if mode == "critic":  # Algorithm 1's critic step; the decoder is frozen
            with torch.no_grad():
                eps = torch.randn(k_all, model.zdim, device=e.device, dtype=e.dtype)
                fake = model.image_mean(model.decode(eps[mine]))
            check_same_input(ctx, eps)
            alpha = _draw_alpha(spec.penalty, m, e)
            pen = penalty_sum(model.critic, e[:n_mine], fake[:n_mine],
                              None if alpha is None else alpha[start : start + n_mine],
                              spec.penalty, k=spec.penalty_k, p=spec.penalty_p)
            d_real, d_fake = model.critic_images(e).sum(), model.critic_images(fake).sum()
            loss = (w / batch) * d_real - (w / k_all) * d_fake + spec.critic_penalty_weight * (w / m) * pen
            s_real, s_fake, s_pen = _all_sum(ctx, [d_real, d_fake, pen])
            penalty = s_pen / m
            return {"loss": loss, "metrics": {
                "critic_loss": s_real / batch - s_fake / k_all + spec.critic_penalty_weight * penalty,
                "penalty": penalty}}

        mu, log_sigma = model.encode(e)
        mu, log_sigma = gather_rows(ctx, mu, n=batch), gather_rows(ctx, log_sigma, n=batch)  # (B, Z)
        z_all, log_q_all = model.sample_q(mu, log_sigma, 1)  # the one-process draw for all B
        z_all, log_q_all = z_all[0], log_q_all[0]  # (B, Z), (B,)
        z, log_q = z_all[start:stop], log_q_all[start:stop]
        raw = model.decode(z)
        recon = -model.log_px(e, raw).sum()
        if not model.spec.pullback:
            check_same_input(ctx, z_all)
            kl = (log_q - log_standard_normal(z)).sum()
            s_recon, s_kl = _all_sum(ctx, [recon, kl])
            metrics = {"recon": s_recon / batch, "kl": s_kl / batch, "log_z": 0.0}
            loss = (w / batch) * (recon + kl)
            metrics["loss_value"] = metrics["recon"] + metrics["kl"]
            return {"loss": loss, "metrics": metrics}
        beta = model.beta
        d_recon = model.critic_images(model.image_mean(raw))  # (b,)
        log_f = log_standard_normal(z) - beta * d_recon
        eps = torch.randn(k_all, model.zdim, device=e.device, dtype=e.dtype)
        check_same_input(ctx, z_all, eps)
        fake = model.image_mean(model.decode(eps[mine]))  # (|mine|, C, H, W)
        d_prior_mine = model.critic_images(fake)
        order = torch.tensor([i for rows in prior_rows for i in rows], device=e.device)
        d_prior = torch.empty(k_all, device=e.device, dtype=d_prior_mine.dtype)
        d_prior = d_prior.index_copy(0, order, gather_rows(ctx, d_prior_mine, [len(r) for r in prior_rows]))
        log_z, log_z_n, log_z_q = log_z_train(beta, d_prior, gather_rows(ctx, log_f, n=batch), log_q_all,
                                              self.n_train)
        kl_part = (log_q - log_f).sum()
        s_recon, s_kl, s_d_recon, s_d_prior = _all_sum(ctx, [recon, kl_part, d_recon.sum(), d_prior_mine.sum()])
        kl = s_kl / batch + log_z.item()
        clamped = spec.clamp_kl and kl < 0.0  # the authors' clamp at ≥ 0: value 0, gradient 0
        kl_term = 0.0 * log_z if clamped else (w / batch) * kl_part + log_z
        metrics = {"recon": s_recon / batch, "kl": kl, "log_z": log_z.item(), "log_z_n": log_z_n.item(),
                   "log_z_q": log_z_q.item(), "critic_recon": s_d_recon / batch, "critic_prior": s_d_prior / k_all}
        loss = (w / batch) * recon + kl_term
        kl_value = 0.0 if clamped else kl
        if mode == "vaepp":
            alpha = _draw_alpha(spec.penalty, m, e)
            pen = penalty_sum(model.critic, e[:n_mine], fake[:n_mine],
                              None if alpha is None else alpha[start : start + n_mine],
                              spec.penalty, k=spec.penalty_k, p=spec.penalty_p)
            loss = loss + model.spec.beta_max * (w / m) * pen
            (s_pen,) = _all_sum(ctx, [pen])
            metrics["penalty"] = s_pen / m
            metrics["loss_value"] = metrics["recon"] + kl_value + model.spec.beta_max * metrics["penalty"]
        else:
            metrics["loss_value"] = metrics["recon"] + kl_value
        return {"loss": loss, "metrics": metrics}


class ShardedTrainStep:
    """A drop-in for `vaepp.train.train_step` on W processes (pass as `train(..., step_fn=…)`).

    Receives the same global batch e (B, C, H, W) on every rank, keeps rows E_r, and takes the
    step through DistributedDataParallel around `_VAEPPObjective` (built at the first call, after
    `train` has moved the model to its device). Returns the same metrics as `train_step`, for the
    global batch. The loss checked for finiteness is the global one, so all ranks stop together.
    """

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self._ddp = None

    def _objective(self, model, spec, n_train):
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self._ddp is None or self._ddp.module.model is not model:
            obj = _VAEPPObjective(model, spec, n_train, self.ctx)
            dev = self.ctx.device
            self._ddp = DDP(obj, device_ids=[dev] if dev.type == "cuda" else None,
                            find_unused_parameters=spec.algorithm != "vaepp")
        return self._ddp

    def __call__(self, model, opts, e, spec, *, n_train, epoch=0, step=0, checkpoint_path=None) -> dict[str, float]:
        from .train import _check_finite

        batch = e.shape[0]
        if batch < self.ctx.world:
            raise ValueError(f"train.batch_size = {batch} is smaller than the {self.ctx.world} processes; "
                             "raise it or use fewer processes")
        ddp = self._objective(model, spec, n_train)
        start, stop = row_range(batch, self.ctx.rank, self.ctx.world)
        e_local = e[start:stop]
        out = ddp(e_local, batch, "vaepp" if spec.algorithm == "vaepp" else "model")
        metrics = out["metrics"]
        loss_value = metrics.pop("loss_value")
        _check_finite(torch.tensor(loss_value), epoch, step, checkpoint_path)
        opts["model"].zero_grad(set_to_none=True)
        out["loss"].backward()
        opts["model"].step()
        metrics["loss"] = loss_value
        if spec.algorithm == "naive_vaepp":
            crit = ddp(e_local, batch, "critic")
            _check_finite(torch.tensor(crit["metrics"]["critic_loss"]), epoch, step, checkpoint_path)
            opts["critic"].zero_grad(set_to_none=True)
            crit["loss"].backward()
            opts["critic"].step()
            model.zero_grad(set_to_none=True)
            metrics.update(crit["metrics"])
        metrics["elbo"] = -(metrics["recon"] + metrics["kl"])
        metrics["beta"] = float(model.beta.detach())
        return metrics


# ----- the latent GAN under DDP ---------------------------------------------------------------
class _LatentGANObjective(nn.Module):
    """Rank r's critic or generator loss for one step of `fit_latent_gan` on the global batch."""

    def __init__(self, gan, spec, ctx: DistContext):
        super().__init__()
        self.gan, self.spec, self.ctx = gan, spec, ctx

    def forward(self, mode: str, noise: Tensor, batch: int, real: Tensor | None = None,
                alpha: Tensor | None = None) -> dict:
        gan, spec, ctx, w = self.gan, self.spec, self.ctx, self.ctx.world
        if mode == "generator":
            g = gan.critic(gan.generator(noise)).sum()
            (s_g,) = _all_sum(ctx, [g])
            return {"loss": (w / batch) * g, "metrics": {"generator_loss": s_g / batch}}
        with torch.no_grad():
            fake = gan.generator(noise)
        pen = penalty_sum(gan.critic, real, fake, alpha, spec.penalty, k=spec.penalty_k, p=spec.penalty_p)
        d_fake, d_real = gan.critic(fake).sum(), gan.critic(real).sum()
        s_fake, s_real, s_pen = _all_sum(ctx, [d_fake, d_real, pen])
        gap, penalty = (s_fake - s_real) / batch, s_pen / batch
        return {"loss": (w / batch) * (d_real - d_fake + pen),
                "metrics": {"critic_loss": -gap + penalty, "wasserstein": gap, "penalty": penalty}}


def fit_latent_gan_sharded(gan, sample_pool: Callable[[], Tensor], spec, ctx: DistContext, *,
                           device: str | torch.device = "cpu", callback: Callable[[int, dict], None] | None = None,
                           progress: bool = False, checkpoint=None) -> list[dict]:
    """`vaepp.latent_gan.fit_latent_gan` on W processes with DDP: the same loop, random draws and
    metrics (for the global batch of `spec.batch_size`), each rank evaluating its rows. The pool
    must be the same on every rank (e.g. from `ShardedLatentModel.encode` + `sample_q`). Every
    rank passes the same `checkpoint` file, with `write=True` on rank 0 only."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm.auto import tqdm

    from .latent_gan import LatentGANCheckpoint

    if spec.batch_size < ctx.world:
        raise ValueError(f"latent_gan.batch_size = {spec.batch_size} is smaller than the {ctx.world} "
                         "processes; raise it or use fewer processes")
    device = torch.device(device)
    gan.to(device).train()
    torch.manual_seed(spec.seed)
    opts = {"generator": adam(gan.generator.parameters(), lr=spec.lr, betas=(0.5, 0.999)),
            "critic": adam(gan.critic_net.parameters(), lr=spec.lr, betas=(0.5, 0.999))}
    opt_g, opt_d = opts["generator"], opts["critic"]
    data_gen = torch.Generator().manual_seed(spec.seed)
    checkpoint = checkpoint or LatentGANCheckpoint(None, spec)
    first_epoch, history = checkpoint.resume(gan, opts, data_gen, device)  # before DDP copies rank 0's weights
    ddp = DDP(_LatentGANObjective(gan, spec, ctx), device_ids=[device] if device.type == "cuda" else None,
              find_unused_parameters=True)
    batch = spec.batch_size
    start, stop = row_range(batch, ctx.rank, ctx.world)
    for epoch in range(first_epoch, spec.epochs):
        t0 = time.perf_counter()
        pool = sample_pool().to(device)
        check_same_input(ctx, pool)
        n = pool.shape[0]
        g_steps = max(1, n // (batch * spec.n_critic))
        if spec.max_steps_per_epoch is not None:
            g_steps = min(g_steps, spec.max_steps_per_epoch)
        perm = torch.randint(0, n, (g_steps * spec.n_critic, batch), generator=data_gen).to(device)
        sums = {"critic_loss": 0.0, "wasserstein": 0.0, "penalty": 0.0, "generator_loss": 0.0}
        for step in tqdm(range(g_steps), desc=f"latent GAN {epoch + 1}/{spec.epochs}", disable=not progress, leave=False):
            for c in range(spec.n_critic):
                real = pool[perm[step * spec.n_critic + c]]
                noise = torch.randn(batch, gan.noise_dim, device=device)  # gan.sample's draw
                alpha = _draw_alpha(spec.penalty, batch, real)
                out = ddp("critic", noise[start:stop], batch, real[start:stop],
                          None if alpha is None else alpha[start:stop])
                crit = out["metrics"]
                if not math.isfinite(crit["critic_loss"]):
                    raise FloatingPointError(f"latent GAN: non-finite critic loss at epoch {epoch + 1}, step {step}")
                opt_d.zero_grad(set_to_none=True)
                out["loss"].backward()
                opt_d.step()
            noise = torch.randn(batch, gan.noise_dim, device=device)
            out = ddp("generator", noise[start:stop], batch)
            opt_g.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt_g.step()
            for key, v in {**crit, **out["metrics"]}.items():
                sums[key] += v
        metrics = {k: v / g_steps for k, v in sums.items()}
        metrics.update(epoch=epoch + 1, seconds=time.perf_counter() - t0)
        history.append(metrics)
        checkpoint.after_epoch(epoch + 1, gan, opts, data_gen, history, device)
        if callback is not None:
            callback(epoch + 1, metrics)
    gan.eval()
    return history


__all__ = [
    "BACKENDS", "DistContext", "Launch", "ShardedLatentModel", "ShardedModule", "ShardedTrainStep",
    "check_same_input", "fit_latent_gan_sharded", "gather_rows", "launch_from_env", "penalty_sum",
    "relaunch_command", "resolve_backend", "row_range", "session", "shard_rows", "sharded_log_f",
]
