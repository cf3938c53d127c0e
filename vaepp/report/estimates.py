"""The per-run tables of the NLL estimate: every log-Z estimate with the NLL under it
(`logz_table`), and how the NLL depends on its proposal and on the number of importance samples
(`nll_estimator_table`).
"""

from __future__ import annotations

import pandas as pd

from .rows import _by_log_z, _num, _proposal, _under_q


def logz_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every log-Z estimate per run side by side, with the NLL (nats) computed under it. Columns: run,
    estimator (paper_q, prior_is, ais, exact; the training estimate's last-epoch mean; the model under
    N(0, I)), log_z, std_err, ess, n_samples, seed_sd (AIS spread over seeds), nll_nats, headline."""
    recs = []
    for _, r in runs[runs["has_nll"]].iterrows():
        for name, nll in _by_log_z(r).items():
            got = {
                k: _num(r, f"nll.log_z.{name}.{k}") for k in ("log_z", "std_err", "ess", "n_samples", "extra.seed_std")
            }
            recs.append(
                {
                    "run": r["run"],
                    "estimator": name,
                    "log_z": got["log_z"] if name != "exact" else 0.0,
                    "std_err": got["std_err"],
                    "ess": got["ess"],
                    "n_samples": got["n_samples"],
                    "seed_sd": got["extra.seed_std"],
                    "nll_nats": nll,
                    "headline": name == r["nll.log_z_headline"],
                }
            )
        if r["algorithm"] != "vae":  # pull-back runs: the training estimate; the same model under N(0, I)
            recs += [
                {"run": r["run"], "estimator": "train (epoch mean)", "log_z": _num(r, "train.log_z_train")},
                {
                    "run": r["run"],
                    "estimator": "plain VAE prior N(0, I)",
                    "log_z": 0.0,
                    "nll_nats": _num(r, "nll.nll_vae_prior_nats"),
                },
            ]
    cols = ["run", "estimator", "log_z", "std_err", "ess", "n_samples", "seed_sd", "nll_nats", "headline"]
    return pd.DataFrame(recs, columns=cols).fillna({"headline": False}).astype({"n_samples": "Int64"})


NLL_ESTIMATOR_TITLE = "The NLL estimator"
NLL_ESTIMATOR_NOTE = (
    "One row per run with an NLL, in nats, each under the run's headline log Z unless said. proposal: the "
    "density r(z|x) the headline NLL draws its S samples per image from; by default the full-support "
    "defensive mixture ½N(μ, σ²) + ½N(μ, (2σ)²) around the encoder's μ, σ, untruncated, so E[p̂(x)] = p(x). "
    "nll_nats ± nll_stderr (over test images) and mc_stderr (the importance sampler's). nll_nats_sub: the "
    "same estimate from each image's first S/10 of the same draws; shift_sub = nll_nats_sub − nll_nats. "
    "log p̂(x) is a stochastic lower bound on log p(x) (Jensen), so the NLL falls as S grows: the S/10 → S "
    "shift shows how far the estimate still moves with S, and a shift over 0.5 nats means S is not enough "
    "for that run. ess_median, ess_min: the per-image effective sample size (Σw)²/Σw² out of S. nll_nats_q: "
    "the same images and binarisations with the paper's proposal q(z|e) (which, truncated, loses the "
    "posterior mass outside its box whatever S), shift_q = nll_nats_q − nll_nats; nll_nats_paper_protocol: "
    "the paper's whole protocol, q(z|e) and its q-based log Ẑ_q (pull-back runs). A run scored before the "
    "proposal was recorded used q(z|e) on the first n test images: its proposal says so and nll_nats_q is "
    "its headline."
)


def nll_estimator_table(runs: pd.DataFrame) -> pd.DataFrame:
    """How the NLL estimate depends on its proposal and on S, one row per run with an NLL
    (NLL_ESTIMATOR_NOTE). Columns: run, proposal, S (samples per image), nll_nats, nll_stderr,
    mc_stderr, nll_nats_sub, shift_sub, ess_median, ess_min, nll_nats_q, shift_q,
    nll_nats_paper_protocol; nats, empty where the run's nll.json has no such value."""
    recs = []
    for _, r in runs[runs["has_nll"]].iterrows():
        nll, sub = _num(r, "nll.nll_nats"), _num(r, "nll.nll_nats_sub")
        q, _, q_full = _under_q(r)
        recs.append(
            {
                "run": r["run"],
                "proposal": _proposal(r),
                "S": _num(r, "nll.n_importance_per_image"),
                "nll_nats": nll,
                "nll_stderr": _num(r, "nll.nll_stderr"),
                "mc_stderr": _num(r, "nll.nll_mc_stderr"),
                "nll_nats_sub": sub,
                "shift_sub": None if sub is None else sub - nll,
                "ess_median": _num(r, "nll.ess_median"),
                "ess_min": _num(r, "nll.ess_min"),
                "nll_nats_q": q,
                "shift_q": None if q is None else q - nll,
                "nll_nats_paper_protocol": q_full,
            }
        )
    cols = "run proposal S nll_nats nll_stderr mc_stderr nll_nats_sub shift_sub ess_median ess_min nll_nats_q shift_q"
    return pd.DataFrame(recs, columns=[*cols.split(), "nll_nats_paper_protocol"]).astype({"S": "Int64"})
