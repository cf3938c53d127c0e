"""The score of an unnormalised log-density: the one gradient of the prior the samplers use."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def log_f_and_grad(log_f: Callable[[Tensor], Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
    """log f(z) and its score ∇_z log f(z) by autograd, detached: (M, zdim) → (M,), (M, zdim), nats.

    The one gradient of the prior that the samplers use: MALA's energy E = −log f − (zdim/2)·log 2π
    (`vaepp.mala.energy_from_log_f`) and AIS's log-ratio h = log f − log N(z; 0, I)
    (`vaepp.logz`). Works inside `torch.inference_mode()` (the graph is built in a local
    non-inference region).
    """
    with torch.inference_mode(False), torch.enable_grad():
        z_leaf = z.detach().clone().requires_grad_(True)
        value = log_f(z_leaf)
        (grad,) = torch.autograd.grad(value.sum(), z_leaf)
    return value.detach(), grad.detach()
