"""Reading one run's row of the table `collect` returns: a number or a text that may be missing
(NaN in pandas), and the facts of a run's NLL that several tables show (the NLL under each log Z,
the importance-sampling proposal, which test images were scored, the NLL with the paper's proposal).
Kept in one place so that every table reads a run's nll.json the same way.
"""

from __future__ import annotations

import math

import pandas as pd


def _num(row: pd.Series, key: str) -> float | None:
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _text(row: pd.Series, key: str) -> str | None:
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _by_log_z(row: pd.Series) -> dict[str, float]:
    """The run's NLL (nats) under each log-Z estimate: {estimator name: nll}."""
    pre = "nll.nll_nats_by_log_z."
    return {c[len(pre) :]: float(row[c]) for c in row.index if c.startswith(pre) and _num(row, c) is not None}


# nll.json files written before the proposal was recorded drew from q(z|e) on the first n test images.
EARLIER_PROPOSAL = "q(z|e) (the earlier protocol: nll.json records no proposal)"


def _proposal(row: pd.Series) -> str:
    """The density the run's headline NLL drew its importance samples from, as nll.json names it."""
    return _text(row, "nll.proposal_density") or EARLIER_PROPOSAL


def _test_images(row: pd.Series) -> str:
    """Which test images the run's NLL scored (nll.json's test_subset; the first n before it existed)."""
    n, of, seed = (_num(row, f"nll.test_subset.{k}") for k in ("n", "of", "seed"))
    if n is None:
        old = _num(row, "nll.n_test_images")
        return f"the first {int(old)} test images" if old is not None else "the first test images"
    if seed is None:
        return f"all {int(of)} test images"
    return f"a random sample of {int(n)} of the {int(of)} test images (seed {int(seed)})"


def _under_q(row: pd.Series) -> tuple[float | None, float | None, float | None]:
    """The run's NLL (nats) with the paper's proposal q(z|e): (under the headline log Z, its
    standard error over test images, under the paper's whole protocol: q(z|e) and log Ẑ_q, i.e.
    the estimator paper_q). From nll.json's paper_protocol when the headline proposal is another;
    the headline itself when that is q(z|e) (proposal "posterior", or an nll.json from before the
    proposal was recorded); (None, None, None) when the run has neither."""
    if _num(row, "nll.paper_protocol.nll_nats") is not None:
        pre = "nll.paper_protocol."
    elif _text(row, "nll.proposal") in (None, "posterior"):
        pre = "nll."
    else:
        return None, None, None
    return _num(row, f"{pre}nll_nats"), _num(row, f"{pre}nll_stderr"), _num(row, f"{pre}nll_nats_by_log_z.paper_q")
