"""Gradient penalties R(e, ê) of the Wasserstein critics (SPEC "Gradient penalties").

ê = G(ε) are generated samples, x̂ = ê + α(e − ê) with α ~ U(0, 1) drawn once per example.
Gradient norms are taken over all non-batch dimensions and built with create_graph=True, so
the penalty can itself be differentiated (it is part of a loss).

| kind        | formula                                   | authors' defaults |
|-------------|-------------------------------------------|-------------------|
| wgan_gp     | k·E(‖∇D(x̂)‖ − 1)²   (Gulrajani et al. 2017) | k = 10            |
| wgan_div_1  | k·E‖∇D(x̂)‖^p        (Wu et al. 2018)        | k = 2, p = 6      |
| wgan_div_2  | (k/2)·(E‖∇D(e)‖^p + E‖∇D(ê)‖^p)             | k = 2, p = 6      |
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

PenaltyKind = Literal["wgan_gp", "wgan_div_1", "wgan_div_2"]
PENALTY_KINDS: tuple[str, ...] = ("wgan_gp", "wgan_div_1", "wgan_div_2")


def critic_grad_norm(critic: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """‖∇ₓD(x)‖₂ per example, differentiable (create_graph=True). x: (B, ...) → (B,).

    If x already depends on parameters (x = G(ε)), it is not detached: as in the authors' graph,
    the penalty's gradient then also reaches the generator.
    """
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    d = critic(x)  # (B,)
    (grad,) = torch.autograd.grad(d.sum(), x, create_graph=True)
    return grad.flatten(1).norm(dim=1)


def interpolate(real: Tensor, fake: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x̂ = ê + α(e − ê), one α ~ U(0,1) per example, broadcast over the other dimensions."""
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    alpha = torch.rand(shape, device=real.device, dtype=real.dtype, generator=generator)
    return fake + alpha * (real - fake)


def gradient_penalty(
    critic: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    kind: PenaltyKind,
    *,
    k: float,
    p: float = 6.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """R(e, ê) for the chosen `kind` (table in the module docstring); a scalar tensor.

    real, fake: (B, ...) with the same shape; fake should come from G(ε) with ε ~ N(0, I).
    Gradients flow into the critic's parameters and, through `fake`, into the generator.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} differ in shape")
    if kind == "wgan_gp":
        norm = critic_grad_norm(critic, interpolate(real, fake, generator))
        return k * ((norm - 1.0) ** 2).mean()
    if kind == "wgan_div_1":
        norm = critic_grad_norm(critic, interpolate(real, fake, generator))
        return k * (norm**p).mean()
    if kind == "wgan_div_2":
        norm_real = critic_grad_norm(critic, real)
        norm_fake = critic_grad_norm(critic, fake)
        return 0.5 * k * ((norm_real**p).mean() + (norm_fake**p).mean())
    raise ValueError(f"unknown penalty kind {kind!r}; allowed: {', '.join(PENALTY_KINDS)}")
