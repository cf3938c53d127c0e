"""Estimators of log Z, Z = ∫ f_λ(z) dz, for the pull-back prior f_λ(z) = N(z; 0, I)·exp(−β·D(G(z)))
(paper eq. 4). All values are in nats.

Three estimators, each returning a `LogZEstimate`:
- `log_z_q_based`: the paper's evaluation protocol (§3.4, eq. 8), the posterior-based Ẑ_q over the
  training set. It is NOT a bound on Z (see its docstring); reported only beside the others.
- `log_z_prior_is`: importance sampling with the N(0, I) proposal, streamed (10⁸ samples and more).
- `log_z_ais`: annealed importance sampling from N(0, I) to p_λ along the geometric path.

`log_z_reverse_ais` runs AIS backwards from exact samples of p_λ: a stochastic UPPER estimate of
log Z, the other half of bidirectional Monte Carlo.

They need only `log_f: (..., zdim) → (...)`, log f with its Gaussian constant (so Z = 1 at β = 0),
and, for gradient moves, autograd through it. Both N(0, I)-IS and AIS are unbiased for Z, hence by
Jensen LOWER estimates of log Z in expectation; the larger is the less optimistic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .importance import CHUNK, LogMeanExp, stream
from .mala import langevin_proposal, log_proposal_density, metropolis_accept
from .posteriors import log_standard_normal
from .score import log_f_and_grad

LogF = Callable[[Tensor], Tensor]
# progress(name, value, step): what the AIS runs report as they go (see `log_z_ais`)
Progress = Callable[[str, float, int], None]


@dataclass(frozen=True)
class LogZEstimate:
    """One estimate of log Z in nats. std_err: delta-method standard error of log Ẑ (sd(w)/(√n·w̄)),
    which is only meaningful when ess ≫ 1; ess = (Σw)²/Σw² of the importance weights."""

    name: str
    log_z: float
    std_err: float
    n_samples: int
    ess: float
    extra: dict = field(default_factory=dict)


def _progress(iterable, enabled: bool, desc: str, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def log_z_q_based(
    batches: Iterable[Tensor],
    encode: Callable[[Tensor], tuple[Tensor, Tensor]],
    sample_q: Callable[..., tuple[Tensor, Tensor]],
    log_f: LogF,
    n_train: int,
    *,
    n_per_image: int = 1000,
    chunk: int = CHUNK,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> LogZEstimate:
    """The paper's q-based estimate ("paper_q"; §3.4 eq. 8):

        Ẑ_q = mean over images i and samples s of f(z_is)·N / q(z_is | e_i),  z_is ~ q(z | e_i),
        log Ẑ_q = log N + log mean(f/q),   N = n_train.

    This is not a bound on Z, in either direction. For each image E_q[f/q] = ∫_{supp q} f, so
    with a full-support q the mean of Ẑ_q is N·Z (log Ẑ_q ≈ log Z + log N, too high by log N);
    with q truncated at ±2σ it is Σ_i ∫_{box_i} f, only the mass of f inside the posteriors'
    boxes, which sits far below Z once p_λ has mass away from the posteriors (and then the NLL
    looks better than it is). The paper's "q̂ = q/N ≤ q(z)" argument would need the mixture
    density q(z) in the denominator, not one component. Never report this estimate alone.

    batches: iterable of training batches e (B, ...); encode: e → (μ, log σ), each (B, zdim), run
    once per batch; sample_q(μ, log σ, n, generator=...) → (z (n, B, zdim), log q (n, B)), as the
    model's `sample_q`. The samples of a batch stream through `importance.stream` (draws of about
    RNG_BLOCK rows, chunks of about `chunk` rows). std_err pools all N·n weights as one sample, which over-states the
    error (the images are not resampled). Returns log_z in nats; extra carries
    log_mean_f_over_q = log Ẑ_q − log N and the number of images seen.
    """
    if n_train < 1 or n_per_image < 1:
        raise ValueError("n_train and n_per_image must be >= 1")
    acc = LogMeanExp()  # every image's weights pooled into one mean
    n_images = 0
    with torch.inference_mode():
        for e in _progress(batches, progress, "log Z (paper q)"):
            mu, log_sigma = encode(e)  # (B, zdim) each
            n_images += mu.shape[0]
            stream(
                lambda k, mu=mu, log_sigma=log_sigma: sample_q(mu, log_sigma, k, generator=generator),
                lambda z, log_q: (log_f(z).double() - log_q.double(),),  # (k, B)
                n_per_image,
                mu.shape[0],
                [acc],
                chunk=chunk,
            )
    log_mean = acc.log_mean.item()
    return LogZEstimate(
        name="paper_q",
        log_z=log_mean + math.log(n_train),
        std_err=acc.std_err.item(),
        n_samples=acc.n,
        ess=acc.ess.item(),
        extra={"log_mean_f_over_q": log_mean, "n_train": n_train, "n_images": n_images, "n_per_image": n_per_image},
    )


def log_z_prior_is(
    log_f: LogF,
    zdim: int,
    n_samples: int,
    *,
    chunk: int = CHUNK,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> LogZEstimate:
    """log Z = log E_{z~N(0,I)}[f(z)/N(z; 0, I)] by importance sampling ("prior_is").

    log wᵢ = log f(zᵢ) − log N(zᵢ; 0, I) = −β·D(G(zᵢ)), zᵢ ~ N(0, I); log Ẑ = log mean(w), with a
    running logsumexp and running Σw, Σw² for the delta-method std_err and the ESS (Σw)²/Σw².
    Streamed by `importance.stream`: memory is one chunk of about `chunk` rows whatever n_samples
    is, and the noise comes in draws of RNG_BLOCK rows, so the same generator state gives the same
    samples, hence the same estimate up to float64 summation order, for any chunk size.
    Unbiased for Z, so in expectation a lower estimate of log Z; when ESS is a handful of samples
    out of millions the estimate and its std_err are both unreliable.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    acc = LogMeanExp()
    with torch.inference_mode():
        stream(
            lambda k: (torch.randn(k, 1, zdim, generator=generator, device=device, dtype=dtype),),
            lambda z: (log_f(z).double() - log_standard_normal(z.double()),),  # (k, 1)
            n_samples,
            1,
            [acc],
            chunk=chunk,
            progress=progress,
            desc="log Z (N(0,I)-IS)",
        )
    return LogZEstimate(
        name="prior_is",
        log_z=acc.log_mean.item(),
        std_err=acc.std_err.item(),
        n_samples=acc.n,
        ess=acc.ess.item(),
    )


def annealing_schedule(n_temps: int, kind: Literal["linear", "sigmoid"] = "sigmoid", sharpness: float = 4.0) -> Tensor:
    """Inverse temperatures 0 = t₀ < t₁ < … < t_K = 1, K = n_temps, float64 (K + 1,).

    "sigmoid" (Grosse et al. 2015): t_k ∝ σ(δ(2k/K − 1)), rescaled to [0, 1], δ = sharpness;
    it spends more temperatures at both ends, where the path changes fastest in log space.
    """
    if n_temps < 1:
        raise ValueError(f"n_temps must be >= 1, got {n_temps}")
    grid = torch.linspace(0.0, 1.0, n_temps + 1, dtype=torch.float64)
    if kind == "linear":
        return grid
    if kind == "sigmoid":
        s = torch.sigmoid(sharpness * (2.0 * grid - 1.0))
        return (s - s[0]) / (s[-1] - s[0])
    raise ValueError(f"unknown schedule {kind!r}; allowed: linear, sigmoid")


def _log_ratio_and_grad(log_f: LogF, z: Tensor) -> tuple[Tensor, Tensor]:
    """h(z) = log f(z) − log N(z; 0, I) (= −β·D(G(z))) and ∇h, by `prior.log_f_and_grad` applied
    to the log-ratio. (M, zdim) → (M,), (M, zdim)."""
    return log_f_and_grad(lambda x: log_f(x) - log_standard_normal(x), z)


def _ais_seeds(
    log_f,
    zdim,
    n_chains,
    temps,
    transition,
    step_size,
    n_leapfrog,
    target_accept,
    adapt_rate,
    seeds,
    device,
    dtype,
    progress,
    start=None,
    callback=None,
):
    """The AIS runs of all `seeds` at once: S·M chains in one batch, so every temperature costs one
    network pass over S·M rows instead of S passes over M (the per-call overhead dominates on a
    CPU). Each seed keeps its own generator, drawn in the order of a run by itself (the start, then
    per temperature the proposal noise — or momentum — and the acceptance uniforms), and its own
    step size adapted to its own acceptance rate, so a seed's run is the same as alone up to float
    rounding. Returns (log weights (S, M) float64, mean acceptance (S,), final step sizes (S,)).

    `start` (S, M, zdim), if given, replaces the N(0, I) draw as the chains' starting points (nothing is
    drawn for them): with exact samples of p ∝ f and the reversed temperatures this is reverse AIS
    (`log_z_reverse_ais`). The loop itself does not depend on the direction of `temps`.
    `callback`, if given, is called after every temperature as callback("temps_done_fraction",
    k / K, k): k temperatures of K done, for all seeds at once; it only reads k."""
    n_seeds = len(seeds)
    dev = device if device is not None else "cpu"
    gens = [torch.Generator(device=dev).manual_seed(seed) for seed in seeds]

    def draw(fn, shape) -> Tensor:  # one block of rows per seed, from that seed's generator
        return torch.cat([fn(shape, generator=g, device=device, dtype=dtype) for g in gens])

    if start is None:
        z = draw(torch.randn, (n_chains, zdim))  # (S·M, zdim) ~ π₀
    else:
        z = start.detach().reshape(n_seeds * n_chains, zdim).to(device=device, dtype=dtype)  # (S·M, zdim) ~ π_{t₀}
    h, grad_h = _log_ratio_and_grad(log_f, z)
    log_w = torch.zeros(n_seeds * n_chains, dtype=torch.float64, device=z.device)
    alpha = torch.full((n_seeds,), float(step_size), dtype=torch.float64)
    acc_sum = torch.zeros(n_seeds, dtype=torch.float64)
    n_temps = temps.numel() - 1
    desc = f"AIS seeds {seeds[0]}–{seeds[-1]}" if n_seeds > 1 else f"AIS seed {seeds[0]}"
    for k in _progress(range(1, n_temps + 1), progress, desc):
        t = temps[k].item()
        a = alpha.to(device=z.device, dtype=z.dtype).repeat_interleave(n_chains)  # (S·M,)
        log_w += (temps[k] - temps[k - 1]).item() * h.double()
        # π_t(z) ∝ exp(−E_t(z)), E_t(z) = ½‖z‖² − t·h(z): the geometric path N^(1−t)·f^t.
        energy = 0.5 * z.square().sum(-1) - t * h
        grad_e = z - t * grad_h
        if transition == "mala":
            z_new = langevin_proposal(z, grad_e, a, noise=draw(torch.randn, (n_chains, zdim)))
            h_new, grad_h_new = _log_ratio_and_grad(log_f, z_new)
            energy_new = 0.5 * z_new.square().sum(-1) - t * h_new
            grad_e_new = z_new - t * grad_h_new
            log_ratio = (
                energy
                - energy_new
                + log_proposal_density(z, z_new, grad_e_new, a)
                - log_proposal_density(z_new, z, grad_e, a)
            )
        elif transition == "hmc":
            momentum = draw(torch.randn, (n_chains, zdim))
            a1 = a[:, None]
            z_new, p_new, g_new = z, momentum - 0.5 * a1 * grad_e, None
            for step in range(n_leapfrog):
                z_new = z_new + a1 * p_new
                h_new, grad_h_new = _log_ratio_and_grad(log_f, z_new)
                g_new = z_new - t * grad_h_new
                p_new = p_new - (a1 if step < n_leapfrog - 1 else 0.5 * a1) * g_new
            energy_new = 0.5 * z_new.square().sum(-1) - t * h_new
            log_ratio = energy + 0.5 * momentum.square().sum(-1) - energy_new - 0.5 * p_new.square().sum(-1)
        else:
            raise ValueError(f"unknown transition {transition!r}; allowed: mala, hmc")
        accepted = metropolis_accept(log_ratio, uniforms=draw(torch.rand, (n_chains,)))
        z = torch.where(accepted[:, None], z_new, z)
        h = torch.where(accepted, h_new, h)
        grad_h = torch.where(accepted[:, None], grad_h_new, grad_h)
        rate = accepted.view(n_seeds, n_chains).double().mean(1).cpu()
        acc_sum += rate
        alpha *= torch.exp(adapt_rate * (rate - target_accept))
        if callback is not None:
            callback("temps_done_fraction", k / n_temps, k)
    return log_w.view(n_seeds, n_chains), acc_sum / n_temps, alpha


def _check_kernel(transition: str, n_leapfrog: int, step_size: float) -> None:
    """ValueError unless the AIS kernel is MALA or HMC with n_leapfrog >= 1 and step_size > 0."""
    if transition not in ("mala", "hmc"):
        raise ValueError(f"unknown transition {transition!r}; allowed: mala, hmc")
    if n_leapfrog < 1 or not step_size > 0.0:
        raise ValueError(f"need n_leapfrog >= 1 and step_size > 0, got {n_leapfrog}, {step_size}")


def _ais_estimate(
    name: str, sign: float, log_w_all: Tensor, acc_rates: Tensor, alphas: Tensor, run: dict
) -> LogZEstimate:
    """The LogZEstimate of (forward, sign +1, or reverse, sign −1) AIS from each seed's final log
    weights (n_seeds, n_chains): log Z = sign·logmeanexp of all seeds' weights pooled, per seed
    sign·logmeanexp of its own; std_err = max(delta-method se of the pooled weights, sd over seeds /
    √n_seeds); ess that of the weights; `run` (temperatures, chains, kernel, seeds) joins extra."""
    pooled = LogMeanExp()
    per_seed_acc = LogMeanExp(rows=log_w_all.shape[0], device=log_w_all.device)
    pooled.update(log_w_all)
    per_seed_acc.update(log_w_all.T)  # (chains, seeds)
    per_seed = [sign * v for v in per_seed_acc.log_mean.tolist()]
    ess_per_seed = per_seed_acc.ess.tolist()
    seeds_t = torch.tensor(per_seed, dtype=torch.float64)
    seed_std = seeds_t.std().item() if len(per_seed) > 1 else None  # no spread from one seed
    std_err = pooled.std_err.item()
    if len(per_seed) > 1:
        std_err = max(std_err, seed_std / math.sqrt(len(per_seed)))
    return LogZEstimate(
        name=name,
        log_z=sign * pooled.log_mean.item(),
        std_err=std_err,
        n_samples=pooled.n,
        ess=pooled.ess.item(),
        extra={
            "log_z_per_seed": per_seed,
            "seed_mean": seeds_t.mean().item(),
            "seed_std": seed_std,
            "ess_per_seed": ess_per_seed,
            "acceptance_per_seed": acc_rates.tolist(),
            "final_step_size_per_seed": alphas.tolist(),
            **run,
        },
    )


def log_z_ais(
    log_f: LogF,
    zdim: int,
    *,
    n_chains: int = 1000,
    n_temps: int = 1000,
    transition: Literal["mala", "hmc"] = "mala",
    step_size: float = 0.5,
    n_leapfrog: int = 5,
    target_accept: float = 0.65,
    adapt_rate: float = 0.05,
    schedule: Literal["linear", "sigmoid"] = "sigmoid",
    seeds: Sequence[int] = (0, 1, 2),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    callback: Progress | None = None,
) -> LogZEstimate:
    """log Z by annealed importance sampling (Neal 2001) from N(0, I) to p_λ ("ais").

    Path: π_t(z) ∝ N(z; 0, I)^(1−t)·f(z)^t = N(z; 0, I)·exp(t·h(z)), h = log f − log N(z; 0, I),
    for t in `annealing_schedule(n_temps, schedule)`. Each chain starts at z ~ N(0, I) (Z₀ = 1),
    adds (t_k − t_{k−1})·h(z) to its log weight, then makes one transition leaving π_{t_k}
    invariant: a MALA step, or HMC with n_leapfrog leapfrog steps. The step size is shared by the
    chains and adapted after every temperature towards `target_accept` (log α += adapt_rate·(rate −
    target)); it depends on other chains' past states only through one scalar, a negligible
    departure from fixed kernels. log Ẑ = logmeanexp of the final weights: unbiased for Z, so in
    expectation a lower estimate of log Z that rises towards log Z as n_temps grows (check
    convergence by raising n_temps).

    Each seed is an independent run of n_chains chains. log_z pools all seeds' weights;
    std_err = max(delta-method se of the pooled weights, sd over seeds / √n_seeds);
    extra: per-seed log Z, their mean and sd, acceptance rates and final step sizes. In nats.

    callback: called after every temperature k of K as callback("temps_done_fraction", k / K, k),
    the fraction of the temperatures done (unitless, in (0, 1]) at step k; it reads no tensor and
    draws nothing, so the estimate is the same with or without it.
    """
    if n_chains < 1 or not seeds:
        raise ValueError("need n_chains >= 1 and at least one seed")
    _check_kernel(transition, n_leapfrog, step_size)
    temps = annealing_schedule(n_temps, schedule)
    with torch.inference_mode():
        log_w_all, acc_rates, alphas = _ais_seeds(
            log_f,
            zdim,
            n_chains,
            temps,
            transition,
            step_size,
            n_leapfrog,
            target_accept,
            adapt_rate,
            list(seeds),
            device,
            dtype,
            progress,
            callback=callback,
        )
    run = dict(n_temps=n_temps, n_chains=n_chains, transition=transition, schedule=schedule, seeds=list(seeds))
    return _ais_estimate("ais", 1.0, log_w_all, acc_rates, alphas, run)


def log_z_reverse_ais(
    log_f: LogF,
    start: Tensor,
    *,
    n_temps: int,
    transition: Literal["mala", "hmc"] = "mala",
    step_size: float = 0.5,
    n_leapfrog: int = 5,
    target_accept: float = 0.65,
    adapt_rate: float = 0.05,
    schedule: Literal["linear", "sigmoid"] = "sigmoid",
    seeds: Sequence[int] = (0, 1, 2),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    callback: Progress | None = None,
) -> LogZEstimate:
    """A stochastic UPPER estimate of log Z by reverse AIS from p ∝ f to N(0, I) ("reverse_ais"):
    the upper half of bidirectional Monte Carlo (Grosse et al. 2015).

    start: (S, M, zdim) exact samples of p(z) = f(z)/Z, one block of M chains per seed (S = len(seeds)),
    e.g. from a rejection sampler. The chains run the path of `log_z_ais` backwards, t = 1 → 0 over
    the reversed `annealing_schedule(n_temps, schedule)`, with the same kernels (MALA or HMC, step
    size adapted per seed): before the move at t_{k−1} each chain adds (t_{k−1} − t_k)·h(z) to its
    log weight, h = log f − log N(z; 0, I). The weight w = exp(−Σ_k (t_k − t_{k−1})·h(z_k)) is
    unbiased for Z₀/Z₁ = 1/Z, so log Ẑ_upper = −logmeanexp(log w) is by Jensen, in expectation, an
    UPPER estimate of log Z that falls towards log Z as n_temps grows; with forward AIS (a lower
    estimate) it brackets log Z in expectation. Exactness of `start` matters: approximate samples
    of p void the direction of the bias.

    log_z pools all seeds' weights; std_err = max(delta-method se of the pooled weights, sd over
    seeds / √n_seeds); ess is that of the reverse weights; extra: per-seed log Z (each −logmeanexp
    of its own weights), their mean and sd, acceptance rates and final step sizes. In nats.
    callback: as in `log_z_ais` (the fraction of the reversed temperatures done).
    """
    if start.dim() != 3:
        raise ValueError(f"start must be (n_seeds, n_chains, zdim), got shape {tuple(start.shape)}")
    n_seeds, n_chains, zdim = start.shape
    if n_seeds != len(seeds) or n_chains < 1:
        raise ValueError(f"start has {n_seeds} blocks of {n_chains} chains; need one non-empty block per seed {seeds}")
    _check_kernel(transition, n_leapfrog, step_size)
    temps = annealing_schedule(n_temps, schedule).flip(0)  # 1 = t_K > … > t₀ = 0
    with torch.inference_mode():
        log_w_all, acc_rates, alphas = _ais_seeds(
            log_f,
            zdim,
            n_chains,
            temps,
            transition,
            step_size,
            n_leapfrog,
            target_accept,
            adapt_rate,
            list(seeds),
            device,
            dtype,
            progress,
            start=start,
            callback=callback,
        )
    run = dict(n_temps=n_temps, n_chains=n_chains, transition=transition, schedule=schedule, seeds=list(seeds))
    return _ais_estimate("reverse_ais", -1.0, log_w_all, acc_rates, alphas, run)
