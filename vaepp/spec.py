"""A model's specification: everything needed to rebuild it, stored in every model file and
checkpoint (`vaepp.artifacts`). Plain data, so that the priors and the model both read it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .options import Arch, Init, LikelihoodKind, LogisticScale, PosteriorKind, PriorKind


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored in every checkpoint. No defaults: the values
    come from a run's `config.ModelParams` and `prior` (`vaepp.resolve.model_spec`) with "auto"
    resolved."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    zdim: int
    likelihood: LikelihoodKind
    logistic_scale: LogisticScale
    arch: Arch
    hidden: tuple[int, ...]
    channels: tuple[int, ...]
    posterior: PosteriorKind
    log_sigma_min: float
    n_flows: int  # 0: no planar flows
    prior: PriorKind  # vaepp.priors
    beta_max: float  # w in β = w·sigmoid(ξ)
    init: Init  # zero_heads: q starts as N(0, I), G as a flat image
    # The bounded prior's acceptance (prior "certified": `priors.certified`); unused otherwise.
    acceptance_c_init: float
    acceptance_mlp: tuple[int, ...]
    truncation: int | None
    lars_mlp: tuple[int, ...]  # the LARS prior's MLP hidden sizes (prior "lars": `priors.lars`); unused otherwise
    # The VampPrior's number K of pseudo-inputs (prior "vampprior": `priors.vampprior`); unused otherwise.
    vampprior_components: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        d["hidden"] = tuple(d["hidden"])
        d["channels"] = tuple(d["channels"])
        d.setdefault("init", "torch")  # model files written before the option existed
        if "prior" not in d:  # model files written with the two flags pullback and certified
            pullback, certified = d.pop("pullback"), d.pop("certified", False)
            d["prior"] = "certified" if certified else "pullback" if pullback else "standard"
        d.setdefault("acceptance_c_init", 0.0)
        d.setdefault("truncation", None)
        d.setdefault("vampprior_components", 500)  # model files written before the VampPrior (never one)
        d["acceptance_mlp"] = tuple(d.get("acceptance_mlp", ()))
        d["lars_mlp"] = tuple(d.setdefault("lars_mlp", (100, 100)))  # model files written before the LARS prior
        return cls(**d)
