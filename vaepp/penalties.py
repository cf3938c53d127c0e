"""Gradient penalties R(e, ê) of the Wasserstein critics.

ê = G(ε) are generated samples, x̂ᵢ = êᵢ + αᵢ(eᵢ − êᵢ) with αᵢ ~ U(0, 1) drawn once per pair, and
R = (1/m)·Σᵢ Rᵢ over the m pairs (eᵢ, êᵢ), with the per-pair terms

| kind            | Rᵢ                                          | authors' defaults  |
|-----------------|---------------------------------------------|--------------------|
| wgan_gp         | k·(‖∇D(x̂ᵢ)‖ − 1)^p, signed for odd p           | k = 2, p = 3 or 6  |
| wgan_gp_classic | k·(‖∇D(x̂ᵢ)‖ − 1)²   (Gulrajani et al. 2017)   | k = 10 (theirs)    |
| wgan_div_1      | k·‖∇D(x̂ᵢ)‖^p        (Wu et al. 2018)          | k = 2, p = 3 or 6  |
| wgan_div_2      | (k/2)·(‖∇D(eᵢ)‖^p + ‖∇D(êᵢ)‖^p)               | k = 2, p = 3 or 6  |

The authors' code takes p = 3 in its Bernoulli scripts (the norm raised to the index 6 / 2) and
p = 6 in its CIFAR scripts (the squared norm raised to 6 / 2), so their "WGAN-GP" is
2·(‖∇D‖ − 1)³ on binary data, negative where the norm is below one, and 2·(‖∇D‖ − 1)⁶ on CIFAR;
Gulrajani's form is kept as `wgan_gp_classic`. A signed power needs an integer p.

Gradient norms are taken over all non-batch dimensions and built with create_graph=True, so
the penalty can itself be differentiated (it is part of a loss). Training writes its losses as
sums over the rows a process holds (`penalty_sum`), so that W processes add up to one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .options import PenaltyKind, choices

PENALTY_KINDS = choices(PenaltyKind)


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


def draw_alpha(kind: PenaltyKind, m: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
    """α ~ U(0, 1), one per pair, for m pairs: (m, 1, …, 1), broadcasting over `like`'s trailing
    dimensions; None for wgan_div_2, which interpolates nothing (and draws nothing)."""
    if kind == "wgan_div_2":
        return None
    shape = (m,) + (1,) * (like.dim() - 1)
    return torch.rand(shape, device=like.device, dtype=like.dtype, generator=generator)


def penalty_sum(
    critic: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    alpha: Tensor | None,
    kind: PenaltyKind,
    *,
    k: float,
    p: float,
) -> Tensor:
    """Σ_i of the per-pair terms R_i in the module docstring's table, over the pairs (eᵢ, êᵢ) given,
    with x̂ᵢ = êᵢ + αᵢ(eᵢ − êᵢ) for the given α (`draw_alpha`; None for wgan_div_2). A scalar.

    The penalty of m pairs is this sum over them divided by m; a shard of the pairs (one rank of
    `vaepp.distributed`) passes its rows of e, ê and α and its sum enters the global one.
    real, fake: (b, ...) with the same shape, b ≥ 0.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} differ in shape")
    if kind not in PENALTY_KINDS:
        raise ValueError(f"unknown penalty kind {kind!r}; allowed: {', '.join(PENALTY_KINDS)}")
    if kind == "wgan_gp" and p != int(p):
        raise ValueError(f"the wgan_gp penalty raises ‖∇D‖ − 1 to p = {p}: it must be an integer (signed power)")
    if real.shape[0] == 0 or k == 0:  # k = 0: no penalty, and no double-backward graph built for it
        return real.new_zeros(())
    if kind == "wgan_div_2":
        return 0.5 * k * (critic_grad_norm(critic, real).pow(p).sum() + critic_grad_norm(critic, fake).pow(p).sum())
    norm = critic_grad_norm(critic, fake + alpha * (real - fake))
    if kind == "wgan_gp":
        return k * (norm - 1.0).pow(int(p)).sum()
    if kind == "wgan_gp_classic":
        return k * (norm - 1.0).square().sum()
    return k * norm.pow(p).sum()


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
    """R(e, ê) = (1/B)·Σᵢ Rᵢ for the chosen `kind`, α drawn here; a scalar tensor.

    real, fake: (B, ...) with the same shape; fake should come from G(ε) with ε ~ N(0, I).
    Gradients flow into the critic's parameters and, through `fake`, into the generator.
    """
    alpha = draw_alpha(kind, real.shape[0], real, generator)
    return penalty_sum(critic, real, fake, alpha, kind, k=k, p=p) / real.shape[0]
