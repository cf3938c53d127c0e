"""The priors p(z), one module each, chosen by `prior` in params.yaml (`vaepp.options.PriorKind`).

Each prior is an `nn.Module` holding its own parameters and defining, in one place:
- `log_f(model, z, raw=None)`: its unnormalised log-density log f(z) (reusing a decoder pass);
- `elbo_terms(...)` and `loss(...)`: its terms of the negative ELBO, its training estimate of log Z
  included, and the step's loss, as sums over one process's rows (`vaepp.train`);
- `after_step(metrics)`: state it keeps outside the optimiser;
- `sampler`: how its samples are drawn ("normal", "latent_gan" with MALA, or "rejection");
- `has_critic` (a critic D on decoded images enters it) and `algorithms` (the training
  algorithms it accepts).

To add a prior: its module here and one line in `PRIORS` (`options.PriorKind` reads the module
names, so config needs no edit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .certified import CertifiedPrior
from .lars import LarsPrior
from .pullback import PullbackPrior
from .standard import PosteriorDraw, StandardPrior
from .vampprior import VampPrior

if TYPE_CHECKING:
    from vaepp.spec import ModelSpec

PRIORS = {
    "standard": StandardPrior,
    "pullback": PullbackPrior,
    "certified": CertifiedPrior,
    "lars": LarsPrior,
    "vampprior": VampPrior,
}


def build_prior(spec: ModelSpec):
    """The prior module of a model spec (its parameters are the model's `prior.*`)."""
    return PRIORS[spec.prior](spec)


__all__ = ["PRIORS", "PosteriorDraw", "build_prior"]
