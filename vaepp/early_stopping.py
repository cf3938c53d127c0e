"""Early stopping on the log-Z monitor's validation NLL, decided from a fit's epoch history alone.

The monitored quantity is `monitor_valid_nll` (`log_z_monitor.log_z_monitor`): −log p(x) in nats,
averaged over the monitor's validation images, with p(x) importance-sampled under the monitored
log Z. It is present only in the epochs the monitor checked (every `train.log_z_every` epochs and
after the last); the other epochs are not evaluations and do not count.

With patience P, the fit stops after the evaluation that makes P consecutive evaluations without
a new best: an NLL strictly below every earlier one (a tie is not an improvement). A non-finite
NLL (NaN or ±inf: a failed estimate) is never a new best and counts as an evaluation without
one. Evaluations before the first finite NLL count too, so a fit whose monitor never returns a
finite NLL stops after P evaluations with no best epoch.

Because the decision reads nothing but the history, which the training checkpoint stores, a fit
killed and resumed decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MONITORED = "monitor_valid_nll"  # the log-Z monitor's validation NLL, nats


@dataclass(frozen=True)
class StopDecision:
    """Where a fit stands after the epochs of a history.

    best_epoch: the epoch (counted from 1) of the lowest finite NLL, its first occurrence; None
    before any finite one. best_nll_nats: that NLL. stale: evaluations since the best (since the
    start without one). stop: whether `stale` has reached the patience."""

    best_epoch: int | None
    best_nll_nats: float | None
    stale: int
    stop: bool


def stop_decision(history: list[dict], patience: int) -> StopDecision:
    """The early-stopping decision after `history` (one dict per epoch, with "epoch" and, in the
    monitored epochs, `MONITORED`), with `patience` ≥ 1 evaluations without a new best allowed.

    The decision is final once `stop` is true: the fit ends after that epoch, so a history never
    runs past it."""
    if patience < 1:
        raise ValueError(f"patience = {patience}: must be at least 1")
    best_epoch, best, stale = None, None, 0
    for h in history:
        if MONITORED not in h:
            continue
        nll = float(h[MONITORED])
        if math.isfinite(nll) and (best is None or nll < best):
            best_epoch, best, stale = int(h["epoch"]), nll, 0
        else:
            stale += 1
    return StopDecision(best_epoch=best_epoch, best_nll_nats=best, stale=stale, stop=stale >= patience)
