"""A prior with a bounded acceptance and a certified normaliser: the math, on callables and tensors.

The prior is p(z) = N(z; 0, I)·a(z)/Z with an acceptance a(z) = sigmoid(ℓ(z)) ∈ (0, 1] and
Z = E_{ε~N(0,I)}[a(ε)] ∈ (0, 1] (Bauer & Mnih 2019, "resampled priors"). Because a is bounded, Z
has finite-sample confidence bounds from i.i.d. N(0, I) draws alone, which no importance-sampling
estimate of an unbounded weight has. This module holds:

- `log_z_certificate`: a two-sided (1 − δ) interval on Z from Hoeffding and empirical Bernstein
  bounds, with the sample count chosen from a pilot for a target width on log Z.
- `rejection_sample`: exact samples of p, or of LARS's truncated p_T (at most T proposals each).
- `log_prior_density`: log p(z) or log p_T(z), differentiable.
- `lars_log_z`: LARS's smoothed training estimate of log Z with its straight-through gradient.

`log_acceptance` callables map z (n, zdim) → log a(z) (n,), in nats. Every log value is in nats.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .importance import CHUNK, Moments, stream
from .logz import LogZEstimate

LogAcceptance = Callable[[Tensor], Tensor]
LOG_A_SLACK = 1e-6  # log a up to this far above 0 is float rounding of a = 1, clamped; beyond is an error


# ------------------------------------------------------------------------------------------------
# Certificate on Z
# ------------------------------------------------------------------------------------------------


def hoeffding_width(m: int, delta: float) -> float:
    """One-sided Hoeffding width for the mean of m i.i.d. values in [0, 1] at confidence 1 − δ:
    P(Z > Ẑ + w) ≤ δ with w = √(ln(1/δ)/(2m)) (and the same for Z < Ẑ − w)."""
    return math.sqrt(math.log(1.0 / delta) / (2.0 * m))


def bernstein_width(m: int, sample_var: float, delta: float) -> float:
    """One-sided empirical Bernstein width (Maurer & Pontil 2009, Thm 4) for the mean of m ≥ 2 i.i.d.
    values in [0, 1] at confidence 1 − δ: w = √(2V·ln(2/δ)/m) + 7·ln(2/δ)/(3(m − 1)), V the unbiased
    sample variance. The ln(2/δ) already pays for estimating the variance. Applied to 1 − a (same V)
    it gives the lower bound with the same width."""
    log_term = math.log(2.0 / delta)
    return math.sqrt(2.0 * max(sample_var, 0.0) * log_term / m) + 7.0 * log_term / (3.0 * (m - 1))


def _upper_width(m: int, sample_var: float, delta_each: float) -> float:
    """The tighter of the two one-sided widths, each at δ_each."""
    return min(hoeffding_width(m, delta_each), bernstein_width(m, sample_var, delta_each))


def _acceptance_moments(
    log_acceptance: LogAcceptance,
    zdim: int,
    n: int,
    chunk: int,
    generator: torch.Generator | None,
    device,
    dtype: torch.dtype,
    progress: bool,
    desc: str,
) -> Moments:
    """Mean and variance of a(ε) over n fresh draws ε ~ N(0, I), streamed by `importance.stream`
    (draws of RNG_BLOCK rows, one chunk in memory), so the draws, hence the moments up to float64
    summation order, do not depend on the chunk size."""
    acc = Moments()
    with torch.inference_mode():
        stream(
            lambda k: (torch.randn(k, 1, zdim, generator=generator, device=device, dtype=dtype),),
            lambda z: (_checked_log_a(log_acceptance(z)).exp(),),  # (k, 1)
            n,
            1,
            [acc],
            chunk=chunk,
            progress=progress,
            desc=desc,
        )
    return acc


def _checked_log_a(log_a: Tensor) -> Tensor:
    """log a as float64, with rounding above 0 clamped; NaN or a > 1 beyond rounding is an error."""
    log_a = log_a.detach().to(torch.float64)
    if torch.isnan(log_a).any():
        raise ValueError("log_acceptance returned NaN")
    if (log_a > LOG_A_SLACK).any():
        raise ValueError(f"log_acceptance returned log a > 0 (max {log_a.max().item():.3g}): a must lie in (0, 1]")
    return log_a.clamp(max=0.0)


def _plan_samples(
    z_pilot: float, var_pilot: float, sd_pilot: float, target_half_width: float, delta_each: float, limit: int
) -> int:
    """Smallest m in [2, limit] whose planned half-width on log Z meets the target, or limit + 1 if none.

    The plan is pessimistic about both samples: the main Ẑ may fall 3 standard errors below the
    pilot's pessimistic Ẑ, and its V may rise by as much, so m must satisfy
    log(Ẑ_m + w(m)) − log Ẑ_m ≤ target at Ẑ_m = z_pilot − 3·√(V/m), V_m = var_pilot + 3·√(V/m), V =
    var_pilot, w the tighter upper width. The margin shrinks and w falls as m grows, so the
    condition is monotone in m and bisection finds the smallest m.
    """

    def ok(m: int) -> bool:
        sd_main = math.sqrt(var_pilot / m)
        z_m = z_pilot - 3.0 * sd_main
        var_m = var_pilot + 3.0 * (sd_pilot + sd_main)
        return z_m > 0.0 and _upper_width(m, var_m, delta_each) <= z_m * math.expm1(target_half_width)

    if not ok(limit):
        return limit + 1
    lo, hi = 2, limit
    if ok(lo):
        return lo
    while hi - lo > 1:  # invariant: not ok(lo), ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def log_z_certificate(
    log_acceptance: LogAcceptance,
    zdim: int,
    *,
    delta: float = 1e-6,
    target_half_width: float = 0.05,
    pilot_samples: int = 100_000,
    max_samples: int = 10**9,
    chunk: int = CHUNK,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> LogZEstimate:
    """A (1 − δ) confidence interval [Z_lo, Z_hi] on Z = E_{ε~N(0,I)}[a(ε)], a(ε) ∈ (0, 1] ("certificate").

    log_acceptance: z (n, zdim) → log a(z) (n,). Steps:
    1. Pilot: Ẑ₀ and V₀ from `pilot_samples` draws. M is the smallest count with
       log(Ẑ_M + w(M)) − log Ẑ_M ≤ target_half_width, w the tighter upper width below, evaluated at
       pessimistic values of the main run's Ẑ and V: Ẑ_M = max(Ẑ₀ − 3·s₀, Ẑ₀/2) − 3·√(V₀/M) and
       V_M = V₀ + 3·(s₀ + √(V₀/M)), s₀ = √(V₀/n₀) (for values in [0, 1] the sd of a sample variance
       from n draws is at most √(V/n)). If even max_samples cannot reach the target, ValueError (it
       names the M that would).
    2. Main run: M FRESH draws ε_m ~ N(0, I) (the pilot's are not reused: M then depends on data
       independent of the sample it is applied to, so the bounds below keep their level), streamed in
       chunks: memory is one chunk whatever M is; Ẑ = mean a(ε_m), V the unbiased sample variance,
       accumulated in float64.
    3. Four one-sided bounds, each at δ/4 (union bound: all hold together with probability ≥ 1 − δ):
       Hoeffding  Ẑ ± √(ln(4/δ)/(2M));
       empirical Bernstein (Maurer & Pontil 2009, Thm 4)  Ẑ ± (√(2V·ln(8/δ)/M) + 7·ln(8/δ)/(3(M − 1))).
       Z_hi = min(uppers, 1); Z_lo = max(lowers, 0). A lower end at 0 is left at 0 (log Z_lo = −inf):
       the bound is then vacuous, and a made-up positive floor would claim more than was shown.

    log p(z) = log N(z; 0, I) + log a(z) − log Z decreases in Z, so a headline NLL must use the UPPER
    end: with log Z_hi the log-Z part of −log p(x) is not optimistic with probability ≥ 1 − δ. Hence
    log_z = log Z_hi. std_err is the delta-method se of log Ẑ, √(V/M)/Ẑ (nats); n_samples = M (the
    pilot excluded); ess = M (equal weights). extra: z_hat, z_lo, z_hi and their logs, delta, m,
    the four bounds, sample_var, pilot_samples, pilot_z_hat, pilot_var, target_half_width,
    log_half_width = log Z_hi − log Ẑ (nats) and target_met (the plan is from the pilot, so the
    realised width can in rare cases exceed the target slightly; the bounds are valid regardless).
    The noise is drawn in `dtype` (a(ε) is accumulated in float64 whatever it is).
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if not target_half_width > 0.0:
        raise ValueError(f"target_half_width must be > 0, got {target_half_width}")
    if pilot_samples < 2 or max_samples < 2:
        raise ValueError(f"need pilot_samples >= 2 and max_samples >= 2, got {pilot_samples}, {max_samples}")
    delta_each = delta / 4.0

    pilot = _acceptance_moments(
        log_acceptance, zdim, pilot_samples, chunk, generator, device, dtype, progress, "log Z certificate (pilot)"
    )
    if not pilot.mean > 0.0:
        raise ValueError(
            f"every one of the {pilot_samples} pilot acceptances is 0: Z is too small to certify from this pilot"
        )
    s0 = math.sqrt(pilot.var / pilot.n)
    z_plan = max(pilot.mean - 3.0 * s0, 0.5 * pilot.mean)
    m = _plan_samples(z_plan, pilot.var, s0, target_half_width, delta_each, max_samples)
    if m > max_samples:
        needed = _plan_samples(z_plan, pilot.var, s0, target_half_width, delta_each, 10**18)
        needed_text = f"about {needed:.3g}" if needed <= 10**18 else "more than 1e18"
        raise ValueError(
            f"a half-width of {target_half_width} nats on log Z at delta={delta} needs {needed_text} samples "
            f"(pilot Z ≈ {pilot.mean:.4g}, var ≈ {pilot.var:.3g}), more than max_samples={max_samples}"
        )

    main = _acceptance_moments(log_acceptance, zdim, m, chunk, generator, device, dtype, progress, "log Z certificate")
    z_hat, var = main.mean, main.var
    h_width = hoeffding_width(m, delta_each)
    b_width = bernstein_width(m, var, delta_each)
    hoeffding_hi, bernstein_hi = z_hat + h_width, z_hat + b_width
    hoeffding_lo, bernstein_lo = z_hat - h_width, z_hat - b_width
    z_hi = min(hoeffding_hi, bernstein_hi, 1.0)
    z_lo = max(hoeffding_lo, bernstein_lo, 0.0)

    def log_or_minus_inf(x: float) -> float:
        return math.log(x) if x > 0.0 else -math.inf

    log_z_hat, log_z_hi = log_or_minus_inf(z_hat), math.log(z_hi)
    return LogZEstimate(
        name="certificate",
        log_z=log_z_hi,
        std_err=math.sqrt(var / m) / z_hat if z_hat > 0.0 else math.inf,
        n_samples=m,
        ess=float(m),
        extra={
            "z_hat": z_hat,
            "z_lo": z_lo,
            "z_hi": z_hi,
            "log_z_hat": log_z_hat,
            "log_z_lo": math.log(z_lo) if z_lo > 0.0 else None,  # None: the interval reaches Z = 0
            "log_z_hi": log_z_hi,
            "delta": delta,
            "m": m,
            "hoeffding_hi": hoeffding_hi,
            "bernstein_hi": bernstein_hi,
            "hoeffding_lo": hoeffding_lo,
            "bernstein_lo": bernstein_lo,
            "sample_var": var,
            "pilot_samples": pilot_samples,
            "pilot_z_hat": pilot.mean,
            "pilot_var": pilot.var,
            "target_half_width": target_half_width,
            "log_half_width": log_z_hi - log_z_hat,
            "target_met": log_z_hi - log_z_hat <= target_half_width,
        },
    )


# ------------------------------------------------------------------------------------------------
# Exact samples
# ------------------------------------------------------------------------------------------------


def _sample_ends(accepted: Tensor, carry: int, truncation: int | None) -> tuple[Tensor, int]:
    """Positions in one batch of proposals where a sample ends, in draw order, and the new carry.

    Proposals form one stream; a sample takes proposals until one is accepted or, with truncation T,
    until its T-th, which is taken whatever its coin says. `carry` (< T) is the number of proposals
    the pending sample already spent in earlier batches. A run of g rejections followed by an
    acceptance, starting fresh, holds ⌊g/T⌋ forced samples (every T-th proposal of the run) and then
    a sample ending at the acceptance after g mod T < T rejections. Vectorised over the batch.
    accepted: bool (P,) → (sorted end positions (n_ends,) int64, rejections pending at the batch end).
    """
    n_prop = accepted.numel()
    pos = torch.nonzero(accepted).flatten()  # (n_acc,) sorted
    if truncation is None:
        return pos, 0
    t = truncation
    run_starts = torch.cat([pos.new_tensor([-carry]), pos + 1])  # each run of rejections, and the tail run
    run_ends = torch.cat([pos, pos.new_tensor([n_prop])])  # exclusive: the acceptance, or the batch end
    n_forced = (run_ends - run_starts) // t  # (n_acc + 1,)
    total = int(n_forced.sum().item())
    tail = n_prop - run_starts[-1].item()
    new_carry = int(tail - n_forced[-1].item() * t)
    if total == 0:
        return pos, new_carry
    first_of_run = torch.cumsum(n_forced, 0) - n_forced
    j = torch.arange(total, device=pos.device) - torch.repeat_interleave(first_of_run, n_forced) + 1
    forced = torch.repeat_interleave(run_starts, n_forced) + t * j - 1  # (total,)
    ends, _ = torch.sort(torch.cat([pos, forced]))
    return ends, new_carry


def rejection_sample(
    log_acceptance: LogAcceptance,
    zdim: int,
    n: int,
    *,
    truncation: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    batch: int = 65536,
    chunk: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, dict]:
    """n exact samples of p(z) ∝ N(z; 0, I)·a(z), or of LARS's truncated p_T.

    Proposals ε ~ N(0, I) are drawn `batch` at a time with a uniform u each (float64, so tiny a are
    not rounded), and ε is accepted when u < a(ε), vectorised over the batch; draws continue until
    n samples are accepted, and the first n in draw order are kept. a(ε) is evaluated `chunk` rows
    at a time, so a network's activations stay small; the chunking leaves the random stream, and so
    the samples, unchanged. Untruncated, each sample costs
    1/Z proposals on average and has density p(z) = N(z; 0, I)·a(z)/Z.

    truncation = T (int ≥ 1): each sample makes at most T proposals and its T-th is taken always
    (LARS). Its density is p_T(z) = N(z; 0, I)·[a(z)(1 − α)/Z + α], α = (1 − Z)^(T−1), and it costs
    (1 − (1 − Z)^T)/Z proposals on average; T = 1 is N(0, I).

    Returns z (n, zdim) in `dtype` and {"proposals": proposals used up to and including the n-th
    sample's last, "acceptance_rate": n / proposals}. The samples carry no graph but are ordinary
    tensors, usable as inputs to a model under training. Untruncated, the loop ends only once n
    proposals are accepted, so a(z) must not vanish almost everywhere (sigmoid logits never do).
    """
    if n < 1 or batch < 1 or chunk < 1:
        raise ValueError(f"need n >= 1, batch >= 1 and chunk >= 1, got {n}, {batch}, {chunk}")
    if truncation is not None and (int(truncation) != truncation or truncation < 1):
        raise ValueError(f"truncation must be None or an integer >= 1, got {truncation}")
    truncation = None if truncation is None else int(truncation)
    taken: list[Tensor] = []
    count, used, carry = 0, 0, 0
    proposals = 0
    # no_grad, not inference_mode: the samples may feed a network that is being trained.
    with torch.no_grad():
        while count < n:
            eps = torch.randn(batch, zdim, generator=generator, device=device, dtype=dtype)
            u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
            log_a = torch.cat([_checked_log_a(log_acceptance(part)) for part in eps.split(chunk)]).to(u.device)
            ends, carry = _sample_ends(torch.log(u) < log_a, carry, truncation)
            ends = ends[: n - count]
            if ends.numel() > 0:
                taken.append(eps[ends.to(eps.device)])
                count += ends.numel()
                if count == n:
                    proposals = used + int(ends[-1].item()) + 1
            used += batch
    z = torch.cat(taken)
    return z, {"proposals": proposals, "acceptance_rate": n / proposals}


# ------------------------------------------------------------------------------------------------
# Densities and training estimate
# ------------------------------------------------------------------------------------------------


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate at both ends (Mächler 2012), with both branches evaluated on
    inputs clamped to their own range so the branch not taken has a finite gradient (× 0, not NaN)."""
    cut = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near_zero, far)


def log_prior_density(log_n: Tensor, log_a: Tensor, log_z: Tensor | float, truncation: int | None = None) -> Tensor:
    """log p(z) of the resampled prior, from its parts (all in nats, broadcast together).

    log_n = log N(z; 0, I), log_a = log a(z) (…), log_z = log Z (usually a scalar).
    Untruncated: log p(z) = log_n + log_a − log_z, decreasing in Z.
    Truncated at T: log p_T(z) = log_n + log(a(1 − α)/Z + α), α = (1 − Z)^(T−1), computed as
    logaddexp(log_a + log(1 − α) − log_z, log α) with log α = (T − 1)·log(1 − Z), so a → 0 and Z → 0
    stay finite. Differentiable in all three arguments; for finite T ≥ 2 the gradient in log Z needs
    Z < 1. T = 1 is N(0, I): log_n (broadcast).
    """
    log_z = torch.as_tensor(log_z, dtype=log_a.dtype, device=log_a.device)
    if truncation is None:
        return log_n + log_a - log_z
    if int(truncation) != truncation or truncation < 1:
        raise ValueError(f"truncation must be None or an integer >= 1, got {truncation}")
    if truncation == 1:
        return log_n + torch.zeros_like(log_a + log_z)
    log_alpha = (truncation - 1) * _log1mexp(log_z)
    return log_n + torch.logaddexp(log_a + _log1mexp(log_alpha) - log_z, log_alpha)


def lars_log_z(
    log_a_prior: Tensor,
    log_a_post: Tensor,
    log_ratio_post: Tensor,
    z_ema: Tensor | float,
    *,
    decay: float = 0.99,
) -> tuple[Tensor, Tensor]:
    """LARS's training estimate of log Z for one batch: smoothed value, current-batch gradient.

    log_a_prior (K,) = log a(ε_k), ε_k ~ N(0, I) shared by the batch; log_a_post (B,) = log a(z_i),
    z_i ~ q(z | e_i) one per image; log_ratio_post (B,) = log N(z_i; 0, I) − log q(z_i | e_i),
    treated as a constant (stop-gradient). z_ema: the running Z estimate (a number; LARS starts it at
    0.5). Per image, with d = decay,

        Z_cur,i = (Σ_k a(ε_k) + a(z_i)·N(z_i; 0, I)/q(z_i | e_i)) / (K + 1)   (unbiased for Z),
        Z_smooth,i = d·z_ema + (1 − d)·Z_cur,i,
        Z_i = Z_cur,i + sg[Z_smooth,i − Z_cur,i]:  value Z_smooth,i, gradient ∇Z_cur,i.

    Returns (log Z_i (B,), new z_ema = mean_i Z_smooth,i, a detached 0-d tensor). The value of log Z_i
    is log Z_smooth,i and its gradient is ∇Z_cur,i / Z_smooth,i. Everything is formed in log space
    (logsumexp over the K + 1 terms; log Z_i = sg[log Z_smooth] + r·(log Z_cur − sg[log Z_cur]),
    r = sg[Z_cur/Z_smooth]), so neither tiny acceptances nor large ratios underflow or overflow.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must lie in [0, 1), got {decay}")
    k = log_a_prior.shape[0]
    log_sum_prior = torch.logsumexp(log_a_prior, 0)  # log Σ_k a(ε_k)
    log_post_term = log_a_post + log_ratio_post.detach()  # (B,)
    log_z_cur = torch.logaddexp(log_sum_prior, log_post_term) - math.log(k + 1)  # (B,)
    z_ema_t = torch.as_tensor(z_ema, dtype=log_z_cur.dtype, device=log_z_cur.device).detach()
    log_cur_d = log_z_cur.detach()
    log_z_smooth = torch.logaddexp(
        math.log(decay) + torch.log(z_ema_t) if decay > 0.0 else torch.full_like(log_cur_d, -math.inf),
        math.log1p(-decay) + log_cur_d,
    )  # (B,), detached
    ratio = torch.exp(log_cur_d - log_z_smooth)  # Z_cur / Z_smooth ≤ 1/(1 − d)
    log_z = log_z_smooth + ratio * (log_z_cur - log_cur_d)
    return log_z, torch.exp(log_z_smooth).mean()
