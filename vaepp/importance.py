"""Streamed importance sampling: the one kernel behind every Monte-Carlo mean in the project's
estimators — the test NLL, the paper's q-based log Ẑ, N(0, I)-proposal log Ẑ and the certificate's
moments of a(ε).

For R independent targets ("rows": the test images of a batch, or a single log Z), `stream` draws
n samples per row in RNG blocks of about `RNG_BLOCK` rows (samples × targets), evaluates whole
blocks in chunks of about `chunk` rows, and feeds each chunk's values to running accumulators, so
memory is one chunk whatever n is. The random stream depends on the generator, R and n but not on
`chunk`, so a result does not depend on `chunk` beyond float64 summation order.

`LogMeanExp` is the running per-row log((1/n)·Σ wₛ) of importance weights given as log wₛ, with
the ESS (Σw)²/Σw² and the delta-method standard error of log ŵ: the one error formula every
importance-sampling estimate here states.

`defensive_proposal` is the full-support proposal of the test NLL: r(z|x) = (1 − α)·N(z; μ, σ²) +
α·N(z; μ, (kσ)²), untruncated, around the encoder's μ(x), σ(x) (Hesterberg 1995's defensive
mixture). Every z has r(z|x) > 0, so E_r[p(x, z)/r(z|x)] = p(x) exactly, whatever the posterior
family (truncated, Normal, or with flows): the estimate of p(x) is unbiased, and log p̂(x) is a
stochastic lower bound on log p(x) (Jensen) whose gap shrinks as 1/S.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from .posteriors import LOG_2PI

RNG_BLOCK = 1024  # rows (samples × targets) per random draw; chunks are whole draws
# Rows per evaluation, the estimators' default chunk: with the default networks a chunk's
# activations (1024 × 784 floats, 3 MB) stay in cache; 4096-row chunks ran 25-45% slower on the
# 2-core EPYC machine and 65536-row ones slower still, at one thread and at two.
CHUNK = 1024

# The NLL's default full-support proposal (README "The NLL estimator"): weight α of the wide
# component and its width k in units of σ.
DEFENSIVE_WEIGHT = 0.5
DEFENSIVE_WIDTH = 2.0


class Accumulator(Protocol):
    def update(self, values: Tensor) -> None:
        """Take one chunk of values (k, R) (k samples of each of R rows)."""


class LogMeanExp:
    """Running per-row log w̄ = log((1/n)·Σₛ wₛ) of weights given as log wₛ, in constant memory.

    Keeps per row the running max m, s₁ = Σ exp(log w − m) and s₂ = Σ exp(2(log w − m)) in float64,
    rescaled when m grows, so no weight overflows whatever its range. Zero weights (log w = −inf,
    e.g. z outside a truncated posterior's box) are counted; NaN or +inf is an error.
    rows = 1 pools every value it is given into one mean (the log-Z estimators).
    """

    def __init__(self, rows: int = 1, device: torch.device | str | None = None) -> None:
        self.rows = rows
        self.m = torch.full((rows,), -math.inf, dtype=torch.float64, device=device)
        self.s1 = torch.zeros(rows, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(rows, dtype=torch.float64, device=device)
        self.n = 0  # values per row

    def update(self, log_w: Tensor) -> None:
        """log_w (k, R), or any shape when R = 1 (then pooled)."""
        log_w = log_w.detach().to(torch.float64).reshape(-1, self.rows)
        if log_w.shape[0] == 0:
            return
        if torch.isnan(log_w).any() or torch.isposinf(log_w).any():
            raise ValueError("log importance weights contain NaN or +inf")
        self.n += log_w.shape[0]
        new_m = torch.maximum(self.m.to(log_w.device), log_w.max(0).values)  # (R,)
        seen = new_m > -math.inf  # rows with at least one non-zero weight
        safe_m = torch.where(seen, new_m, torch.zeros_like(new_m))
        scale = torch.where(seen, torch.exp(self.m - safe_m), torch.zeros_like(new_m))  # exp(−inf) = 0
        shifted = torch.exp(log_w - safe_m)  # (k, R), ≤ 1
        self.s1 = self.s1 * scale + shifted.sum(0)
        self.s2 = self.s2 * scale.square() + shifted.square().sum(0)
        self.m = new_m

    @property
    def log_mean(self) -> Tensor:
        """log w̄ = m + log s₁ − log n per row, (R,); −inf where every weight was 0."""
        if self.n == 0:
            return torch.full_like(self.m, -math.inf)
        return torch.where(self.s1 > 0, self.m + torch.log(self.s1) - math.log(self.n), -math.inf)

    @property
    def ess(self) -> Tensor:
        """(Σw)² / Σw² = s₁² / s₂ per row, (R,); 0 where every weight was 0."""
        return torch.where(self.s2 > 0, self.s1.square() / self.s2.clamp(min=1e-300), 0.0)

    @property
    def std_err(self) -> Tensor:
        """Delta-method se of log w̄ per row: √(var(w)/n)/w̄ = √((n·s₂/s₁² − 1)/(n − 1)) = √((n/ESS − 1)
        /(n − 1)), (R,); inf with fewer than two values or no non-zero weight."""
        if self.n < 2:
            return torch.full_like(self.m, math.inf)
        rel_var = (self.n * self.s2 / self.s1.square() - 1.0).clamp(min=0.0)
        return torch.where(self.s1 > 0, torch.sqrt(rel_var / (self.n - 1)), math.inf)


class Moments:
    """Running count, mean and Σ(a − mean)² of values, in float64, merged chunk by chunk (Chan et
    al.); pooled over rows. The plain running sums Σa, Σa² lose the variance to cancellation when
    V ≪ mean² at 10⁹ values; the pairwise merge of per-chunk centred sums does not."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, a: Tensor) -> None:
        a = a.detach().reshape(-1).to(torch.float64)
        n_c = a.numel()
        if n_c == 0:
            return
        mean_c = a.mean().item()
        m2_c = (a - mean_c).square().sum().item()
        n_new = self.n + n_c
        diff = mean_c - self.mean
        self.mean += diff * n_c / n_new
        self.m2 += m2_c + diff * diff * self.n * n_c / n_new
        self.n = n_new

    @property
    def var(self) -> float:
        """The unbiased sample variance (0 with fewer than two values)."""
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0


def plan(rows: int, chunk: int, block: int = RNG_BLOCK) -> tuple[int, int]:
    """(samples per row in one random draw, samples per row in one chunk): a draw holds about
    `block` rows (at least one sample of every row) and a chunk the whole draws that fit in
    `chunk` rows (at least one)."""
    per_draw = max(1, block // rows)
    return per_draw, per_draw * max(1, chunk // (per_draw * rows))


def stream(
    draw: Callable[[int], tuple[Tensor, ...]],
    evaluate: Callable[..., Sequence[Tensor]],
    n: int,
    rows: int,
    accumulators: Sequence[Accumulator],
    *,
    chunk: int = CHUNK,
    block: int = RNG_BLOCK,
    prefix: int | None = None,
    prefix_accumulators: Sequence[Accumulator] = (),
    progress: bool = False,
    desc: str = "",
) -> None:
    """Draw n samples for each of `rows` targets and feed their values to the accumulators.

    draw(k) → a tuple of tensors whose first dimension holds k samples of every row (e.g. z
    (k, R, zdim) and log r (k, R)); called with k ≤ the plan's per-draw count (`plan`), in order, so
    the random stream is fixed by n, rows and `block` (RNG_BLOCK everywhere but in tests).
    evaluate(*draws concatenated along dim 0) → one tensor of
    values (k, R) per accumulator. With `prefix`, the values of each row's first `prefix` samples
    also go to `prefix_accumulators` (the same draws: a read-out of how far an estimate moves with
    n; they may be fewer than the accumulators: they take the first values). Nothing is returned: read the accumulators.
    """
    if min(n, rows, chunk, block) < 1:
        raise ValueError(f"n, rows, chunk and block must be >= 1, got {n}, {rows}, {chunk}, {block}")
    per_draw, per_chunk = plan(rows, chunk, block)
    starts = range(0, n, per_chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    for start in starts:
        k = min(per_chunk, n - start)
        parts = [draw(min(per_draw, k - i)) for i in range(0, k, per_draw)]
        values = evaluate(*(torch.cat(group) for group in zip(*parts, strict=True)))
        for acc, v in zip(accumulators, values, strict=True):
            acc.update(v)
        if prefix is not None and start < prefix:
            for acc, v in zip(prefix_accumulators, values, strict=False):  # the first values
                acc.update(v[: prefix - start])


def defensive_proposal(
    mu: Tensor,
    log_sigma: Tensor,
    n: int,
    *,
    weight: float = DEFENSIVE_WEIGHT,
    width: float = DEFENSIVE_WIDTH,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """z (n, B, zdim) ~ r(z|x) = (1 − α)·N(z; μ, σ²) + α·N(z; μ, (kσ)²) and log r(z|x) (n, B), nats.

    μ, log σ: (B, zdim), the encoder's (for a truncated posterior its untruncated parent, for flows
    their base Gaussian); α = weight ∈ (0, 1], k = width ≥ 1. Each sample picks its component
    (u < α: the wide one) and is μ + s·σ·ε, s ∈ {1, k}, ε ~ N(0, I); its density sums both
    components, log r = logaddexp(log(1 − α) + log N(z; μ, σ²), log α + log N(z; μ, (kσ)²)), with
    log N(z; μ, (sσ)²) = Σ_d [−ε'²_d/2 − log σ_d − log s − ½ log 2π], ε' = (z − μ)/(sσ).
    Draws: ε then u, from `generator`.
    """
    if not 0.0 < weight <= 1.0 or not width >= 1.0:
        raise ValueError(f"need weight in (0, 1] and width >= 1, got {weight}, {width}")
    eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)  # (n, B, zdim)
    wide = torch.rand((n, mu.shape[0]), generator=generator, device=mu.device, dtype=mu.dtype) < weight
    scale = torch.where(wide, width, 1.0).unsqueeze(-1)  # (n, B, 1)
    sigma = torch.exp(log_sigma)
    z = mu + scale * sigma * eps
    sq = eps.square() * scale.square()  # ((z − μ)/σ)², (n, B, zdim)
    base = -log_sigma.sum(-1) - 0.5 * mu.shape[-1] * LOG_2PI  # (B,)
    zdim = mu.shape[-1]
    log_narrow = -0.5 * sq.sum(-1) + base
    log_wide = -0.5 * sq.sum(-1) / width**2 + base - zdim * math.log(width)
    if weight == 1.0:
        return z, log_wide
    return z, torch.logaddexp(math.log1p(-weight) + log_narrow, math.log(weight) + log_wide)
