"""Scale-out on torch.distributed: row sharding, gathers and reductions that reduce exactly.

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

Training (`vaepp.train`, `vaepp.latent_gan`): the global batch is split into contiguous row
blocks, rank r owning E_r (`row_range`). The training code writes each loss as rank r's share of
a global sum, scaled by W, and calls it through `data_parallel`, a DistributedDataParallel
wrapper that averages the gradients over ranks, which then equal the one-process gradient.
Quantities that need every row (the training estimate of log Z, the encoder statistics from which
z ~ q(z|e) is drawn) are all-gathered with a gradient (`gather_rows`: backward sums every rank's
gradient, then each rank keeps its rows); metrics are summed over ranks (`all_sum`). With one
process every helper here is the identity, so one process runs the same code as W.

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

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from . import resolve
from .options import Backend
from .score import log_f_and_grad


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
            raise ValueError(
                f"environment variable {key}={raw!r} is not an integer; launch with "
                "torchrun, or unset WORLD_SIZE for one process"
            ) from None
    launch = Launch(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], from_launcher=True)
    if launch.world < 1 or not 0 <= launch.rank < launch.world or launch.local_rank < 0:
        raise ValueError(
            f"RANK={launch.rank}, WORLD_SIZE={launch.world}, LOCAL_RANK={launch.local_rank} "
            "are inconsistent (need 0 <= RANK < WORLD_SIZE); launch with torchrun"
        )
    return launch


def relaunch_command(
    launch: Launch, nproc_per_node: int, script: str, argv: Sequence[str], python: str, *, module: bool = False
) -> list[str] | None:
    """The `torchrun --standalone --nproc_per_node=N script -- argv…` command that starts N local
    processes, when `nproc_per_node` > 1 asks for them and this process was not started by a
    launcher (then None: run here). python: the interpreter (sys.executable at the edge). module:
    `script` is a module name that each process runs as `python -m script` (torchrun's `-m`)."""
    if nproc_per_node <= 1 or launch.from_launcher:
        return None
    # "--" ends torchrun's own options: without it, argparse reads the script's `--run` as an
    # abbreviation of torchrun's `--run-path`.
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        *(["-m"] if module else []),
        script,
        "--",
        *argv,
    ]


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


ONE_PROCESS = DistContext()  # the default of every function that takes a context: one process, no group


@contextmanager
def session(
    launch: Launch, *, backend: Backend = "auto", device: str | torch.device = "cpu", timeout_s: float | None = None
) -> Iterator[DistContext]:
    """The process group for the duration of a stage: a one-process DistContext when
    launch.world == 1; otherwise init (env:// rendezvous, as set up by torchrun), a second group
    for the row gathers, and destroy on exit. On CUDA, rank r uses device cuda:LOCAL_RANK.
    timeout_s: how long a collective waits for the other ranks (None: torch's default, 30 min)."""
    device = torch.device(device)
    if launch.world == 1:
        yield DistContext(device=device)
        return
    chosen = resolve.backend(backend, device.type)
    if device.type == "cuda":
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    owner = not dist.is_initialized()
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    if owner:
        dist.init_process_group(
            chosen, init_method="env://", rank=launch.rank, world_size=launch.world, timeout=timeout
        )
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
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(local.device)


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
    fp = (
        torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]) for t in tensors])
        .reshape(-1)
        .to(ctx._comm_device)
    )
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
        rows = z.reshape(-1, z.shape[-1])  # (R, zdim)
        start, stop = row_range(rows.shape[0], ctx.rank, ctx.world)
        value, grad = log_f_and_grad(log_f, _local(rows, start, stop))  # this rank's rows
        n = rows.shape[0]
        value = gather_rows(ctx, value[: stop - start], n=n)
        fctx.save_for_backward(gather_rows(ctx, grad[: stop - start], n=n).reshape(z.shape))
        return value.reshape(z.shape[:-1])

    @staticmethod
    def backward(fctx, grad_out: Tensor):
        (grad,) = fctx.saved_tensors
        return grad_out.unsqueeze(-1) * grad, None, None


def sharded_log_f(ctx: DistContext, log_f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """log f: (..., zdim) → (...) evaluated on this rank's share of the rows and all-gathered; when
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
        return (gather_rows(self.ctx, mu[: stop - start], n=n), gather_rows(self.ctx, log_sigma[: stop - start], n=n))

    def sample_q(self, mu, log_sigma, n, generator=None):
        return self.model.sample_q(mu, log_sigma, n, generator=generator)

    def log_px_and_log_f(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, ...), z (n, B, zdim) → log p(x|z), log f(z), each (n, B)."""
        ctx = self.ctx
        if not ctx.distributed:
            return self.model.log_px_and_log_f(x, z)
        check_same_input(ctx, x, z)
        n, b = z.shape[:2]
        if n >= ctx.world:  # split the samples: every rank sees all B images
            start, stop = row_range(n, ctx.rank, ctx.world)
            log_px, log_f = self.model.log_px_and_log_f(x, _local(z, start, stop))
            return (gather_rows(ctx, log_px[: stop - start], n=n), gather_rows(ctx, log_f[: stop - start], n=n))
        start, stop = row_range(b, ctx.rank, ctx.world)  # split the images
        z_mine = _local(z.transpose(0, 1), start, stop).transpose(0, 1)  # (n, b_r, zdim)
        log_px, log_f = self.model.log_px_and_log_f(_local(x, start, stop), z_mine)
        return (gather_rows(ctx, log_px.T[: stop - start], n=b).T, gather_rows(ctx, log_f.T[: stop - start], n=b).T)


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


# ----- reductions and DDP ----------------------------------------------------------------------
def all_sum(ctx: DistContext, values: list[Tensor]) -> list[Tensor]:
    """Σ over ranks of detached scalars, in one all-reduce; the local values when world = 1.
    values: 0-d tensors of one dtype → the same number of 0-d tensors."""
    t = torch.stack([v.detach() for v in values])
    if ctx.distributed:
        device = t.device
        t = t.to(ctx._comm_device)
        dist.all_reduce(t, group=ctx.group)
        t = t.to(device)
    return list(t.unbind())


class _Objective(nn.Module):
    """A loss function as the forward of a module that owns `module`'s parameters."""

    def __init__(self, module: nn.Module, loss_fn: Callable[..., Any]):
        super().__init__()
        self.module, self.loss_fn = module, loss_fn

    def forward(self, *args):
        return self.loss_fn(*args)


def data_parallel(
    ctx: DistContext, module: nn.Module, loss_fn: Callable[..., Any], *, find_unused_parameters: bool = False
) -> Callable[..., Any]:
    """`loss_fn` itself on one process. On W ranks, DistributedDataParallel around a module that
    owns `module` and whose forward is `loss_fn`: called with loss_fn's arguments, it returns
    loss_fn's result, and a backward through the rank's loss averages the gradients of
    `module`'s parameters over the ranks (construction broadcasts rank 0's weights). A loss
    written as this rank's share of a global sum, scaled by W, then has the one-process gradient.
    find_unused_parameters: some parameters get no gradient in some calls."""
    if not ctx.distributed:
        return loss_fn
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = ctx.device
    return DDP(
        _Objective(module, loss_fn),
        device_ids=[dev] if dev.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


__all__ = [
    "DistContext",
    "ONE_PROCESS",
    "Launch",
    "ShardedLatentModel",
    "ShardedModule",
    "all_sum",
    "check_same_input",
    "data_parallel",
    "gather_rows",
    "launch_from_env",
    "relaunch_command",
    "row_range",
    "session",
    "shard_rows",
    "sharded_log_f",
]
