"""The LARS prior (Bauer & Mnih 2019, "Resampled priors for variational autoencoders"):

    p(z) = N(z; 0, I)·a(z)/Z,   a(z) = sigmoid(MLP(z)) ∈ (0, 1),   Z = E_{ε~N(0, I)}[a(ε)] ≤ 1.

The acceptance is a small MLP on z with tanh hidden layers (sizes `model.lars_mlp`; LARS: two of
100), with no critic and no decoder pass: the resampled prior of LARS itself, untruncated unless
`model.truncation` is set. Everything else is the certified prior's machinery
(`priors.certified.ResampledPrior`): LARS's per-image training estimate of Z with its EMA
(`resampled.lars_log_z`, decay `train.lars_decay`, Ẑ_ema starting at ½), the certificate on Z and
reverse AIS (`vaepp.log_z_protocol`), exact samples by rejection.

Initialisation: the hidden layers' weights Glorot-uniform with zero biases, as in the public LARS
implementation of Lawson et al. 2019 ("Energy-inspired models", whose MLP has Glorot-uniform
weights on every layer); the output layer here starts at zero (weight and bias), so a(z) ≡ ½ = Z at
the start, matching Ẑ_ema's starting value, where theirs starts at a random a(z).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor

from vaepp.distributed import check_same_input

from .certified import ResampledPrior
from .standard import PosteriorDraw

if TYPE_CHECKING:
    from vaepp.config import TrainParams
    from vaepp.spec import ModelSpec


def acceptance_mlp(zdim: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """MLP(z): Linear layers zdim → hidden… → 1 with tanh between them (none after the last);
    hidden weights Glorot-uniform, hidden biases 0, the output layer all 0 (MLP ≡ 0 at the start)."""
    sizes = [zdim, *hidden, 1]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        linear = nn.Linear(a, b)
        if i < len(sizes) - 2:
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.Tanh()]
        else:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
            layers.append(linear)
    return nn.Sequential(*layers)


class LarsPrior(ResampledPrior):
    """N(z; 0, I)·sigmoid(MLP(z))/Z, the MLP of hidden sizes `lars_mlp` (tanh); no critic, so both
    training algorithms are the same one step (the critic is neither in the loss nor trained)."""

    kind = "lars"
    has_critic = False
    algorithms = ("naive", "vaepp")  # no critic: Algorithm 1 and 2 coincide, as for N(0, I)

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.mlp = acceptance_mlp(spec.zdim, tuple(spec.lars_mlp))

    def log_acceptance(self, z: Tensor, cond: None = None) -> Tensor:
        """log a(z) = log sigmoid(MLP(z)): z (..., zdim) → (...), nats."""
        return torch.nn.functional.logsigmoid(self.mlp(z).squeeze(-1))

    def _decoded(self, model: nn.Module, z: Tensor, raw: Tensor | None) -> None:
        """None: the acceptance reads z alone, no decoder pass."""

    def _acceptance_from(self, model: nn.Module, z: Tensor, raw: None) -> Tensor:
        """log sigmoid(MLP(z)): (..., zdim) → (...), nats."""
        return self.log_acceptance(z)

    def _acceptance_inputs(
        self, model: nn.Module, draw: PosteriorDraw, e: Tensor, batch: int, params: TrainParams, ctx
    ) -> tuple[Tensor, None, None, dict[str, Tensor]]:
        """K = `n_prior_samples` draws ε_k ~ N(0, I) (K, zdim), drawn whole on every rank after the
        posterior's (every rank evaluates the MLP on all K: it is small); no other input, no extra terms."""
        eps = torch.randn(params.n_prior_samples, model.zdim, device=e.device, dtype=e.dtype)
        check_same_input(ctx, draw.z_all, eps)
        return eps, None, None, {}
