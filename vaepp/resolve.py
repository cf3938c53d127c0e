"""From a validated run (`config.RunConfig`) to the library's arguments: the one place where
"auto" settings are decided: from the dataset (the likelihood, the posterior, the penalty exponent,
Algorithm 1's critic weight, the latent GAN's inputs and noise size) and from the machine (the
device, the distributed backend). The stages, the report, the distributed code and the benchmarks
all resolve through here.
"""

from __future__ import annotations

from .config import LatentGANParams, RunConfig, TrainParams
from .options import Backend, Device, choices
from .spec import ModelSpec


def likelihood(run: RunConfig, binary: bool) -> str:
    """Likelihood "auto": Bernoulli on binary data, discretised logistic otherwise."""
    m = run.model.likelihood
    return m if m != "auto" else ("bernoulli" if binary else "logistic")


def penalty_exponent(bernoulli: bool) -> float:
    """The authors' ‖∇D‖ exponent p for "auto": 3 in their Bernoulli scripts, 6 in their
    discretised-logistic ones."""
    return 3.0 if bernoulli else 6.0


def model_spec(run: RunConfig, image_shape: tuple[int, int, int], binary: bool) -> ModelSpec:
    """Likelihood "auto": Bernoulli on binary data, discretised logistic otherwise; posterior
    "auto": Normal truncated at ±2σ with a Bernoulli likelihood (the paper's default on binary
    data), Normal otherwise and for a VampPrior (its authors' choice: a mixture of truncated
    posteriors is zero outside the union of their boxes, so a draw there stops training).
    The prior is the run's `prior`; `model.n_flows` planar flows on the posterior (0: none)."""
    m = run.model
    lik = likelihood(run, binary)
    posterior = m.posterior
    if posterior == "auto":
        posterior = "truncated" if lik == "bernoulli" and run.prior != "vampprior" else "normal"
    return ModelSpec(
        image_shape=tuple(image_shape),
        zdim=m.zdim,
        likelihood=lik,
        logistic_scale=m.logistic_scale,
        arch=m.arch,
        hidden=tuple(m.hidden),
        channels=tuple(m.channels),
        posterior=posterior,
        log_sigma_min=m.log_sigma_min,
        n_flows=m.n_flows,
        prior=run.prior,
        beta_max=m.beta_max,
        init=m.init,
        acceptance_c_init=m.acceptance_c_init,
        acceptance_mlp=tuple(m.acceptance_mlp),
        truncation=m.truncation,
        lars_mlp=tuple(m.lars_mlp),
        vampprior_components=m.vampprior_components,
    )


def _is_bernoulli(run: RunConfig, binary: bool) -> bool:
    return likelihood(run, binary) == "bernoulli"


def train_params(run: RunConfig, binary: bool) -> TrainParams:
    """The run's training params with "auto" resolved by the likelihood, as in the authors'
    scripts: ‖∇D‖ raised to p = 3 and Algorithm 1's critic penalty weight c = w on Bernoulli data;
    p = 6 and c = 1 on discretised-logistic data."""
    t = run.train
    bern = _is_bernoulli(run, binary)
    update = {}
    if t.penalty_p == "auto":
        update["penalty_p"] = penalty_exponent(bern)
    if t.critic_penalty_weight == "auto":
        update["critic_penalty_weight"] = run.model.beta_max if bern else 1.0
    return t.model_copy(update=update)


def latent_gan_params(run: RunConfig, binary: bool) -> LatentGANParams:
    """The run's latent-GAN params with "auto" resolved: fitted to the posterior means μ(e) on
    Bernoulli data and to draws z ~ q(z|e) otherwise, noise of dim z, and the likelihood's
    penalty exponent (as `train_params`)."""
    g = run.latent_gan
    bern = _is_bernoulli(run, binary)
    update = {}
    if g.inputs == "auto":
        update["inputs"] = "mean" if bern else "sample"
    if g.noise_dim == "auto":
        update["noise_dim"] = run.model.zdim
    if g.penalty_p == "auto":
        update["penalty_p"] = penalty_exponent(bern)
    return g.model_copy(update=update)


def method(run: RunConfig) -> str:
    """The paper's name of a run's method, for matching its tables: "vae" (prior N(0, I)),
    "naive_vaepp" (pull-back prior, Algorithm 1), "vaepp" (Algorithm 2), "vaepp_flow" (Algorithm 2
    with planar flows) or "certified" (this project's bounded pull-back prior)."""
    if run.prior == "standard":
        return "vae"
    if run.prior == "pullback":
        if run.train.algorithm == "naive":
            return "naive_vaepp"
        return "vaepp_flow" if run.model.n_flows > 0 else "vaepp"
    return run.prior


def device(choice: Device, cuda_available: bool) -> str:
    """The device: "auto" is CUDA when available, else the CPU; a CUDA device asked for but missing
    is a RuntimeError, not a silent CPU run."""
    if choice == "auto":
        return "cuda" if cuda_available else "cpu"
    if choice == "cuda" and not cuda_available:
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is available; use --device cpu")
    return choice


def backend(setting: Backend, device_type: str) -> str:
    """The distributed backend: "auto" is nccl on CUDA devices, gloo on the CPU; nccl without CUDA
    is refused."""
    if setting not in choices(Backend):
        raise ValueError(f"distributed.backend = {setting!r}; allowed: {', '.join(choices(Backend))}")
    if setting == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if setting == "nccl" and device_type != "cuda":
        raise ValueError(
            "distributed.backend = 'nccl' needs CUDA devices (device: cuda); use 'gloo' or 'auto' on the CPU"
        )
    return setting
