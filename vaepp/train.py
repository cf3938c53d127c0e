"""Training: Algorithm 2 (VAEPP, one step), Algorithm 1 (Naive VAEPP, two steps) and the plain VAE.

Per batch e (B images in [0, 1]), one posterior draw z ~ q(z|e) and K prior draws ε ~ N(0, I):

    recon  = −mean_i log p(e_i | z_i)                        (soft Bernoulli target, eq. 7)
    kl     = mean_i [log q(z_i|e_i) − log f(z_i)] + log Z_train
    loss   = recon + kl + w·R(e, G(ε[:B]))                     (Algorithm 2)

with log Z_train = log(½(Ẑ_N + Ẑ_q)) (see `prior.log_z_train`). The paper's Algorithm 2 line 6
adds βζ to a maximised objective and line 9 updates ω without a gradient; here, as in the
authors' code, the penalty is added to the loss, scaled by w (= `beta_max`), and encoder,
decoder, critic and ξ take one Adam step together. Algorithm 1 takes the same loss without the
penalty on everything but the critic, then one critic step on
    mean D(e) − mean D(G(ε)) + c·R(e, G(ε))      (D low = real; the paper's line 14 swaps them)
with Adam(β₁ = 0.5, β₂ = 0.999). The plain VAE is the same code with β ≡ 0 and log Z = 0.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor

from .model import VAEPP
from .penalties import PenaltyKind, gradient_penalty
from .posteriors import log_standard_normal
from .prior import log_z_train

Algorithm = Literal["vae", "naive_vaepp", "vaepp"]
ALGORITHMS: tuple[str, ...] = ("vae", "naive_vaepp", "vaepp")
CHECKPOINT_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left in place."""


@dataclass(frozen=True)
class TrainSpec:
    """Hyperparameters of one training run (authors' defaults where SPEC gives them)."""

    algorithm: Algorithm = "vaepp"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-4
    lr_halve_every: int = 200  # epochs
    weight_decay: float = 2e-4  # L2 on weight matrices and kernels (not biases, ξ, γ)
    n_prior_samples: int = 128  # K
    penalty: PenaltyKind = "wgan_div_1"
    penalty_k: float = 2.0
    penalty_p: float = 6.0
    critic_lr: float = 1e-4  # Algorithm 1 only
    critic_penalty_weight: float = 1.0  # c in Algorithm 1's critic loss
    clamp_kl: bool = False  # the authors' code clamps the batch KL term at ≥ 0; off by default
    max_steps_per_epoch: int | None = None  # None = one pass over the training set
    seed: int = 0
    checkpoint_every: int = 1  # epochs

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one dict of metrics per epoch
    seconds: float = 0.0
    epochs: int = 0
    resumed_from_epoch: int = 0


# ----- the losses ----------------------------------------------------------------------------
def elbo_terms(model: VAEPP, e: Tensor, *, n_train: int, n_prior_samples: int) -> dict[str, Tensor]:
    """Differentiable terms of the (negative) ELBO for one batch e (B, C, H, W).

    Returns scalars recon, kl, log_z (with log_z_n, log_z_q for VAEPP), the critic's mean on
    reconstructions and on prior samples, and `fake` = G(ε) (K, C, H, W) for the penalty.
    """
    mu, log_sigma = model.encode(e)
    z, log_q = model.sample_q(mu, log_sigma, 1)
    z, log_q = z[0], log_q[0]  # (B, Z), (B,)
    raw = model.decode(z)
    recon = -model.log_px(e, raw).mean()
    out: dict[str, Tensor] = {"recon": recon}
    if not model.spec.pullback:
        out["kl"] = (log_q - log_standard_normal(z)).mean()
        out["log_z"] = torch.zeros((), device=e.device)
        return out
    beta = model.beta
    d_recon = model.critic_images(model.image_mean(raw))  # (B,)
    log_f_z = log_standard_normal(z) - beta * d_recon
    eps = torch.randn(n_prior_samples, model.zdim, device=e.device, dtype=e.dtype)
    fake = model.image_mean(model.decode(eps))  # (K, C, H, W)
    d_prior = model.critic_images(fake)  # (K,)
    log_z, log_z_n, log_z_q = log_z_train(beta, d_prior, log_f_z, log_q, n_train)
    out.update(
        kl=(log_q - log_f_z).mean() + log_z,
        log_z=log_z,
        log_z_n=log_z_n,
        log_z_q=log_z_q,
        critic_recon=d_recon.mean(),
        critic_prior=d_prior.mean(),
        fake=fake,
    )
    return out


def _penalty(model: VAEPP, e: Tensor, fake: Tensor, spec: TrainSpec) -> Tensor:
    m = min(e.shape[0], fake.shape[0])
    return gradient_penalty(
        model.critic, e[:m], fake[:m], spec.penalty, k=spec.penalty_k, p=spec.penalty_p
    )


def _kl(terms: dict[str, Tensor], spec: TrainSpec) -> Tensor:
    return terms["kl"].clamp(min=0.0) if spec.clamp_kl else terms["kl"]


def _scalars(terms: dict[str, Tensor], model: VAEPP, **extra: Tensor) -> dict[str, float]:
    out = {k: float(v.detach()) for k, v in terms.items() if k != "fake"}
    out.update({k: float(v.detach()) for k, v in extra.items()})
    out["elbo"] = -(out["recon"] + out["kl"])
    out["beta"] = float(model.beta.detach())
    return out


def _check_finite(loss: Tensor, epoch: int, step: int, checkpoint_path: Path | None) -> None:
    if not torch.isfinite(loss):
        kept = (f"; last good checkpoint kept at {checkpoint_path}"
                if checkpoint_path is not None and Path(checkpoint_path).is_file() else "")
        raise NonFiniteLossError(
            f"non-finite loss ({float(loss.detach())}) at epoch {epoch}, step {step}; training stopped{kept}"
        )


def adam(params, **kwargs) -> torch.optim.Adam:
    """torch's Adam with its fused kernel (CPU and CUDA): one pass over all parameters of a
    group instead of a loop over tensors; a plain VAE step on the CPU took 25% less time."""
    return torch.optim.Adam(params, fused=True, **kwargs)


def make_optimizers(model: VAEPP, spec: TrainSpec) -> dict[str, torch.optim.Optimizer]:
    """Adam over (encoder, decoder, ξ, …) — plus the critic for Algorithm 2 — and, for
    Algorithm 1, a separate critic Adam(β₁ = 0.5, β₂ = 0.999). L2 only on ≥ 2-d weights."""

    def groups(params):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": spec.weight_decay}, {"params": rest, "weight_decay": 0.0}]

    if spec.algorithm == "vaepp":
        return {"model": adam(groups(model.parameters()), lr=spec.lr)}
    opts = {"model": adam(groups(model.model_parameters()), lr=spec.lr)}
    if spec.algorithm == "naive_vaepp":
        opts["critic"] = adam(
            groups(model.critic.parameters()), lr=spec.critic_lr, betas=(0.5, 0.999)
        )
    return opts


def train_step(
    model: VAEPP,
    opts: dict[str, torch.optim.Optimizer],
    e: Tensor,
    spec: TrainSpec,
    *,
    n_train: int,
    epoch: int = 0,
    step: int = 0,
    checkpoint_path: Path | None = None,
) -> dict[str, float]:
    """One step of the chosen algorithm on batch e; returns the batch's scalar metrics."""
    terms = elbo_terms(model, e, n_train=n_train, n_prior_samples=spec.n_prior_samples)
    if spec.algorithm == "vaepp":
        penalty = _penalty(model, e, terms["fake"], spec)
        loss = terms["recon"] + _kl(terms, spec) + model.spec.beta_max * penalty
        _check_finite(loss, epoch, step, checkpoint_path)
        opts["model"].zero_grad(set_to_none=True)
        loss.backward()
        opts["model"].step()
        return _scalars(terms, model, loss=loss, penalty=penalty)

    loss = terms["recon"] + _kl(terms, spec)
    _check_finite(loss, epoch, step, checkpoint_path)
    opts["model"].zero_grad(set_to_none=True)
    loss.backward()
    opts["model"].step()
    if spec.algorithm == "vae":
        return _scalars(terms, model, loss=loss)

    # Algorithm 1, critic step: fresh prior samples, decoder frozen (detached).
    with torch.no_grad():
        eps = torch.randn(spec.n_prior_samples, model.zdim, device=e.device, dtype=e.dtype)
        fake = model.image_mean(model.decode(eps))
    penalty = _penalty(model, e, fake, spec)
    critic_loss = (
        model.critic_images(e).mean()
        - model.critic_images(fake).mean()
        + spec.critic_penalty_weight * penalty
    )
    _check_finite(critic_loss, epoch, step, checkpoint_path)
    opts["critic"].zero_grad(set_to_none=True)
    critic_loss.backward()
    opts["critic"].step()
    model.zero_grad(set_to_none=True)  # the critic step also filled the VAE's .grad
    return _scalars(terms, model, loss=loss, penalty=penalty, critic_loss=critic_loss)


# ----- the loop --------------------------------------------------------------------------------
def _rng_state(data_gen: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, data_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _lr_factor(epoch: int, spec: TrainSpec) -> float:
    """Learning rate halved every `lr_halve_every` epochs (authors: 200)."""
    return 0.5 ** (epoch // spec.lr_halve_every)


def train(
    model: VAEPP,
    train_images: Tensor,
    spec: TrainSpec,
    *,
    device: str | torch.device = "cpu",
    callback: Callable[[int, dict], None] | None = None,
    checkpoint_path: Path | None = None,
    checkpoint_extra: dict | None = None,
    progress: bool = False,
    step_fn: Callable[..., dict[str, float]] = train_step,
    write_checkpoints: bool = True,
) -> TrainResult:
    """Train `model` on uint8 images (N, C, H, W) for `spec.epochs` epochs.

    Every `checkpoint_every` epochs (and at the end) the model, optimisers, ξ, RNG states,
    epoch and history are written atomically to `checkpoint_path`; if that file exists when
    training starts, training resumes from it, so a killed run finishes with the same result as
    an uninterrupted one. `callback(epoch, metrics)` receives each epoch's mean metrics.
    A non-finite loss raises NonFiniteLossError and leaves the last checkpoint untouched.
    On W processes (`vaepp.distributed`), every rank passes the same arguments with
    `step_fn=ShardedTrainStep(ctx)`, and only rank 0 `write_checkpoints`; all ranks resume
    from the same file.
    """
    from . import io as vio
    from tqdm.auto import tqdm

    if (spec.algorithm == "vae") == model.spec.pullback:
        raise ValueError(
            f"algorithm {spec.algorithm!r} needs a model with pullback={spec.algorithm != 'vae'} "
            f"(the plain VAE is β ≡ 0), got pullback={model.spec.pullback}"
        )
    device = torch.device(device)
    model.to(device)
    data = train_images.to(device)
    n_train = data.shape[0]
    if data.dtype != torch.uint8:
        raise TypeError(f"train_images must be uint8, got {data.dtype}")
    torch.manual_seed(spec.seed)
    data_gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    opts = make_optimizers(model, spec)
    result = TrainResult()
    start_epoch = 0
    if checkpoint_path is not None and write_checkpoints:
        vio.remove_stale_temporaries(checkpoint_path)  # from a process killed while writing it
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        ckpt = vio.load_checkpoint(checkpoint_path, map_location=device)
        if ckpt.get("train_spec") != spec.to_dict() or ckpt.get("model_spec") != model.spec.to_dict():
            raise vio.CheckpointError(
                f"{checkpoint_path}: checkpoint was written with other settings; "
                "delete it to start afresh, or restore the settings it was written with"
            )
        model.load_state_dict(ckpt["model"])
        for name, opt in opts.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        _set_rng_state(ckpt["rng"], data_gen, device)
        start_epoch = int(ckpt["epoch"])
        result.history = list(ckpt["history"])
        result.seconds = float(ckpt["seconds"])
        result.resumed_from_epoch = start_epoch

    batch = spec.batch_size
    steps = n_train // batch
    if spec.max_steps_per_epoch is not None:
        steps = min(steps, spec.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"batch_size {batch} exceeds the training set ({n_train} images)")
    model.train()
    for epoch in range(start_epoch, spec.epochs):
        t0 = time.perf_counter()
        for opt in opts.values():
            base = spec.lr if opt is opts["model"] else spec.critic_lr
            for g in opt.param_groups:
                g["lr"] = base * _lr_factor(epoch, spec)
        perm = torch.randperm(n_train, generator=data_gen)[: steps * batch].to(device)
        sums: dict[str, float] = {}
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{spec.epochs}", disable=not progress, leave=False)
        for step in bar:
            e = data[perm[step * batch : (step + 1) * batch]].float().div_(255.0)
            m = step_fn(
                model, opts, e, spec, n_train=n_train, epoch=epoch + 1, step=step,
                checkpoint_path=checkpoint_path,
            )
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{m['loss']:.2f}", beta=f"{m['beta']:.2f}")
        metrics = {k: v / steps for k, v in sums.items()}
        metrics["beta"] = float(model.beta.detach())
        metrics["epoch"] = epoch + 1
        metrics["seconds"] = time.perf_counter() - t0
        metrics["lr"] = spec.lr * _lr_factor(epoch, spec)
        result.history.append(metrics)
        result.seconds += metrics["seconds"]
        if callback is not None:
            callback(epoch + 1, metrics)
        last = epoch + 1 == spec.epochs
        if checkpoint_path is not None and write_checkpoints and ((epoch + 1) % spec.checkpoint_every == 0 or last):
            vio.atomic_torch_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "model_spec": model.spec.to_dict(),
                    "train_spec": spec.to_dict(),
                    "model": model.state_dict(),
                    "optimizers": {k: o.state_dict() for k, o in opts.items()},
                    "rng": _rng_state(data_gen, device),
                    "epoch": epoch + 1,
                    "history": result.history,
                    "seconds": result.seconds,
                    **(checkpoint_extra or {}),
                },
                checkpoint_path,
            )
    result.epochs = spec.epochs
    model.eval()
    return result

