"""The latent GAN of paper §4.3: a Wasserstein GAN in z space fitted to posterior samples.

After the VAE is trained and frozen, z ~ q(z|e) over the training set are the "real" data of a
WGAN with the same penalty family as the VAE's critic, n_critic = 5 critic steps per generator
step, Adam(1e-4, β₁ = 0.5, β₂ = 0.999). Its samples z₀ seed MALA; decoding z₀ directly gives the
"GAN-VAEPP" row of Table 4. The critic convention is the project's: LOW D = real, so the critic
minimises mean D(z_real) − mean D(z_fake) + R and the generator minimises mean D(z_fake).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from . import io as vio
from .nets import _mlp
from .penalties import PenaltyKind, gradient_penalty
from .train import adam

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class LatentGANSpec:
    noise_dim: int = 64
    hidden: tuple[int, ...] = (256, 256)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-4
    n_critic: int = 5
    penalty: PenaltyKind = "wgan_div_1"
    penalty_k: float = 2.0
    penalty_p: float = 6.0
    seed: int = 0
    max_steps_per_epoch: int | None = None  # generator steps; None = one pass over the z pool
    checkpoint_every: int = 1  # epochs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatentGANSpec":
        return cls(**{**d, "hidden": tuple(d["hidden"])})


class LatentGAN(nn.Module):
    """Generator g: N(0, I_noise) → z (MLP) and critic D_z: z → ℝ (MLP)."""

    def __init__(self, zdim: int, spec: LatentGANSpec):
        super().__init__()
        self.zdim = zdim
        self.noise_dim = spec.noise_dim
        self.generator = _mlp([spec.noise_dim, *spec.hidden, zdim])
        self.critic_net = _mlp([zdim, *spec.hidden, 1])

    def critic(self, z: Tensor) -> Tensor:
        return self.critic_net(z).squeeze(-1)

    def sample(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        """n latent samples z₀ (n, Z)."""
        device = device or next(self.parameters()).device
        noise = torch.randn(n, self.noise_dim, generator=generator, device=device)
        return self.generator(noise)


@torch.inference_mode()
def posterior_samples(encode_sample: Callable[[Tensor], Tensor], images: Tensor, *, batch_size: int = 1000) -> Tensor:
    """One z ~ q(z|e) per image: images uint8 (N, C, H, W) → (N, Z), batched.

    `encode_sample(e)` maps a float batch in [0, 1] to one posterior draw per image."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        out.append(encode_sample(images[i : i + batch_size].float().div(255.0)))
    return torch.cat(out)


class LatentGANCheckpoint:
    """Resumable state of a latent-GAN fit in one file, written atomically every
    `spec.checkpoint_every` epochs and after the last: both networks, both Adam states, the global
    and the data RNG states (the global one also draws the posterior pool of each epoch), the
    epoch and the history, plus `extra` (e.g. which VAE the posterior samples come from, for the
    caller to check before resuming). `path=None` keeps nothing. On W processes every rank resumes
    from the same file and only the writer writes it."""

    def __init__(self, path: str | Path | None, spec: LatentGANSpec, *, write: bool = True,
                 extra: dict | None = None):
        self.path = Path(path) if path is not None else None
        self.spec, self.write, self.extra = spec, write, dict(extra or {})
        if self.path is not None and write:
            vio.remove_stale_temporaries(self.path)  # from a process killed while writing it

    def resume(self, gan: LatentGAN, opts: dict, data_gen: torch.Generator, device) -> tuple[int, list[dict]]:
        """Load the checkpoint if there is one: returns (epochs done, history so far)."""
        if self.path is None or not self.path.exists():
            return 0, []
        ckpt = vio.load_checkpoint(self.path, map_location=device)
        if ckpt.get("spec") != self.spec.to_dict() or ckpt.get("zdim") != gan.zdim:
            raise vio.CheckpointError(
                f"{self.path}: checkpoint was written with other settings; delete it to start "
                "afresh, or restore the settings it was written with")
        gan.load_state_dict(ckpt["model"])
        for name, opt in opts.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        torch.set_rng_state(ckpt["rng"]["torch"])
        data_gen.set_state(ckpt["rng"]["data"])
        if torch.device(device).type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        return int(ckpt["epoch"]), list(ckpt["history"])

    def after_epoch(self, epoch: int, gan: LatentGAN, opts: dict, data_gen: torch.Generator,
                    history: list[dict], device) -> None:
        last = epoch == self.spec.epochs
        if self.path is None or not self.write or not (epoch % self.spec.checkpoint_every == 0 or last):
            return
        rng = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
        if torch.device(device).type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        vio.atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "spec": self.spec.to_dict(), "zdim": gan.zdim,
            "model": gan.state_dict(), "optimizers": {k: o.state_dict() for k, o in opts.items()},
            "rng": rng, "epoch": epoch, "history": history, **self.extra,
        }, self.path)


def fit_latent_gan(
    gan: LatentGAN,
    sample_pool: Callable[[], Tensor],
    spec: LatentGANSpec,
    *,
    device: str | torch.device = "cpu",
    callback: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    checkpoint: LatentGANCheckpoint | None = None,
) -> list[dict]:
    """Fit the WGAN for `spec.epochs` epochs. `sample_pool()` returns a fresh (N, Z) tensor of
    posterior samples at the start of every epoch (one z per training image). An epoch is one
    pass of the critic over the pool: N / batch_size critic batches, n_critic per generator step.
    With a `checkpoint`, a fit that was killed resumes from its last checkpoint and ends with the
    same networks as an uninterrupted one. Returns one dict of mean metrics per epoch: critic
    loss, Wasserstein estimate, penalty.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    gan.to(device).train()
    torch.manual_seed(spec.seed)
    opts = {"generator": adam(gan.generator.parameters(), lr=spec.lr, betas=(0.5, 0.999)),
            "critic": adam(gan.critic_net.parameters(), lr=spec.lr, betas=(0.5, 0.999))}
    opt_g, opt_d = opts["generator"], opts["critic"]
    data_gen = torch.Generator().manual_seed(spec.seed)
    checkpoint = checkpoint or LatentGANCheckpoint(None, spec)
    start, history = checkpoint.resume(gan, opts, data_gen, device)
    for epoch in range(start, spec.epochs):
        t0 = time.perf_counter()
        pool = sample_pool().to(device)
        n = pool.shape[0]
        g_steps = max(1, n // (spec.batch_size * spec.n_critic))
        if spec.max_steps_per_epoch is not None:
            g_steps = min(g_steps, spec.max_steps_per_epoch)
        perm = torch.randint(0, n, (g_steps * spec.n_critic, spec.batch_size), generator=data_gen).to(device)
        sums = {"critic_loss": 0.0, "wasserstein": 0.0, "penalty": 0.0, "generator_loss": 0.0}
        for step in tqdm(range(g_steps), desc=f"latent GAN {epoch + 1}/{spec.epochs}", disable=not progress, leave=False):
            for c in range(spec.n_critic):
                real = pool[perm[step * spec.n_critic + c]]
                with torch.no_grad():
                    fake = gan.sample(spec.batch_size, device=device)
                penalty = gradient_penalty(gan.critic, real, fake, spec.penalty, k=spec.penalty_k, p=spec.penalty_p)
                gap = gan.critic(fake).mean() - gan.critic(real).mean()
                loss_d = -gap + penalty
                if not torch.isfinite(loss_d):
                    raise FloatingPointError(f"latent GAN: non-finite critic loss at epoch {epoch + 1}, step {step}")
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
            loss_g = gan.critic(gan.sample(spec.batch_size, device=device)).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            sums["critic_loss"] += float(loss_d.detach())
            sums["wasserstein"] += float(gap.detach())
            sums["penalty"] += float(penalty.detach())
            sums["generator_loss"] += float(loss_g.detach())
        metrics = {k: v / g_steps for k, v in sums.items()}
        metrics.update(epoch=epoch + 1, seconds=time.perf_counter() - t0)
        history.append(metrics)
        checkpoint.after_epoch(epoch + 1, gan, opts, data_gen, history, device)
        if callback is not None:
            callback(epoch + 1, metrics)
    gan.eval()
    return history


def moment_gap(a: Tensor, b: Tensor) -> dict[str, float]:
    """Distance between the first two moments of two (N, Z) samples: ‖μa − μb‖ and the
    Frobenius norm of Σa − Σb (a cheap check of what the GAN learnt)."""
    return {
        "mean_gap": float((a.mean(0) - b.mean(0)).norm()),
        "cov_gap": float((torch.cov(a.T) - torch.cov(b.T)).norm()),
    }
