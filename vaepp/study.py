"""From a validated run (`config.RunConfig`) to the library's arguments: the ModelSpec and the
training algorithm (the train and latent-GAN params are passed as validated). The one place where
"auto" settings are decided from the dataset."""

from __future__ import annotations

from .config import RunConfig
from .model import ModelSpec
from .train import Algorithm


def model_spec(run: RunConfig, image_shape: tuple[int, int, int], binary: bool) -> ModelSpec:
    """Likelihood "auto": Bernoulli on binary data, discretised logistic otherwise; posterior
    "auto": Normal truncated at ±2σ with a Bernoulli likelihood (the paper's default on binary
    data), Normal otherwise.
    `vaepp_flow` runs add `model.n_flows` planar flows; `vae` runs have no pull-back (β ≡ 0)."""
    m = run.model
    likelihood = m.likelihood if m.likelihood != "auto" else ("bernoulli" if binary else "logistic")
    posterior = m.posterior if m.posterior != "auto" else (
        "truncated" if likelihood == "bernoulli" else "normal"
    )
    return ModelSpec(
        image_shape=tuple(image_shape),
        zdim=m.zdim,
        likelihood=likelihood,
        logistic_scale=m.logistic_scale,
        arch=m.arch,
        hidden=tuple(m.hidden),
        channels=tuple(m.channels),
        posterior=posterior,
        log_sigma_min=m.log_sigma_min,
        n_flows=m.n_flows if run.algorithm == "vaepp_flow" else 0,
        pullback=run.algorithm != "vae",
        beta_max=m.beta_max,
    )


def train_algorithm(run: RunConfig) -> Algorithm:
    """The training algorithm of a run: `vaepp_flow` trains as VAEPP (Algorithm 2) with flows."""
    return "vaepp" if run.algorithm == "vaepp_flow" else run.algorithm
