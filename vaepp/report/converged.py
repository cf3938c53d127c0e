"""The converged study (studies/converged, made by scripts/study_converged.py): each run trained to
early stopping on the log-Z monitor's validation NLL and scored once on all test images. Its
table (`converged_table`: one row per run, with the paired gain over the plain VAE of the same
training seed), each prior's gain over its seeds beside its gain at 10 epochs in the default
study (`converged_gains`), the gain against epochs from the monitor's validation NLL
(`gain_curves`, `gain_series`: its lines for `dvc plots`), and the sentences that say whether
each prior's 10-epoch gain held (`converged_findings`). `converged_study` reads them all.

Gain = the plain VAE's NLL minus the prior's, in nats: positive means the prior is better (the
paired table's `difference` has the other sign).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from vaepp.config import Params

from .collect import per_image_table, study_runs
from .findings import method_label, verdict
from .rows import _num
from .studies import paired_difference, same_images

CONVERGED_TITLE = "The converged study: each prior's gain at convergence"

CONVERGED_NOTE = (
    "Each run of studies/converged (scripts/study_converged.py; `source` names the commit that made it) "
    "trained with the default networks on the 50k/10k train/validation split until early stopping on "
    "the log-Z monitor's validation NLL (a check every train.log_z_every epochs on a seeded sample of "
    "validation images; it stops after train.patience checks with no new best and keeps the best "
    "check's weights) or to the cap train.epochs, and was scored once, at its best check, on all "
    "test images with the default protocol: S importance samples per image from the full-support "
    "proposal (nll_s10: the same with S/10, a check that S suffices), the run's headline log Z "
    "(exact for N(0, I) and the VampPrior, the certificate's upper end for a certified prior, AIS "
    "otherwise). nll_paper_q: the same images and log Z with the paper's proposal q(z|e); "
    "nll_under_normal: the same encoder and decoder with N(0, I) as the prior. gain = the plain "
    "VAE's NLL minus the run's, image by image on the same test images and binarisations, against "
    "the plain VAE of the same training seed (positive: the prior is better); gain_se = sd of the "
    "per-image differences / √n, the test-set error only."
)

GAINS_NOTE = (
    "Per prior, its gain over the plain VAE averaged over its training seeds (each seed against the "
    "plain VAE of the same seed). test_se: the test-set error of that mean, √(Σ gain_se²) / k for k "
    "seeds; seed_sd: the between-seed standard deviation of the k gains (k ≥ 2; it includes the "
    "test-set noise), so the error of the mean is error = √(test_se² + seed_sd² / k). The 10-epoch "
    "gain is the default study's (its paired table: 10 epochs, a random sample of test images); "
    "verdicts at two errors: `held` (a gain at 10 epochs that is still a gain; `grew` or `shrank` "
    "when the change from 10 epochs exceeds two errors, √(error² + se_10²)), `vanished` "
    "(indistinguishable from 0 now), `reversed` (a loss now)."
)

GAIN_CURVE_NOTE = (
    "The gain against epochs: at every monitor check both runs made, the plain VAE's validation NLL "
    "minus the prior's, on the same validation images and binarisations (the monitor's seeded "
    "sample; each NLL under that check's monitored log Z). It is a difference of the two means "
    "(paired in expectation; the monitor keeps no per-image values), so its error is shown as the "
    "between-seed range where a prior has two or more seeds (the band), each seed against the plain "
    "VAE of the same seed. A seed's line ends where either of its runs stopped; past the epoch where one seed "
    "stopped, a prior's line is the mean of the seeds still running."
)

# Published gains over N(0, I) at convergence, matched networks, dynamically binarised MNIST:
# (method, gain in nats, source). Their networks (gated MLPs) differ from this study's.
PUBLISHED_GAINS = (
    ("VampPrior", 2.02, "Tomczak & Welling, 2018"),
    ("Exemplar VAE", 2.36, "Norouzi et al., 2020"),
)
# Burda et al. (2016), 'Importance Weighted Autoencoders': the one-stochastic-layer MLP VAE (k = 1).
IWAE_ONE_LAYER_VAE = 86.76
WITHIN_NATS = 3.0  # the plain VAE should come within this of IWAE_ONE_LAYER_VAE


def _seed(row: pd.Series) -> int:
    s = _num(row, "param.train.seed")
    return 0 if s is None else int(s)


def converged_table(root: str | Path, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run of the study (`collect.study_runs` rows), finished or not: run, algorithm,
    seed, status ("finished", else "not run yet"), epochs_trained, best_epoch, stopped_early,
    n_images, nll, nll_se, nll_s10, nll_paper_q, nll_under_normal, log_z (headline estimator), fid,
    against (the plain VAE of the same seed), gain, gain_se (CONVERGED_NOTE)."""
    root = Path(root)
    per_image = {
        r["run"]: per_image_table(root, r["file.per_image"], "")
        for _, r in runs.iterrows()
        if r.get("has_nll") and isinstance(r.get("file.per_image"), str) and r["file.per_image"]
    }
    plain = {_seed(r): r["run"] for _, r in runs[runs["algorithm"] == "vae"].iterrows()}
    recs = []
    for _, r in runs.iterrows():
        done = bool(r.get("has_nll"))
        rec = {
            "run": r["run"],
            "algorithm": r["algorithm"],
            "seed": _seed(r),
            "status": "finished" if done else "not run yet",
            "epochs_trained": _int(r, "train.epochs_trained"),
            "best_epoch": _int(r, "train.best_epoch"),
            "stopped_early": r.get("train.stopped_early") if r.get("has_train") else None,
            "n_images": _int(r, "nll.n_test_images"),
            "nll": _num(r, "nll.nll_nats"),
            "nll_se": _num(r, "nll.nll_stderr"),
            "nll_s10": _num(r, "nll.nll_nats_sub"),
            "nll_paper_q": _num(r, "nll.paper_protocol.nll_nats"),
            "nll_under_normal": _num(r, "nll.nll_vae_prior_nats"),
            "log_z": r.get("nll.log_z_headline") if done else None,
            "fid": _num(r, "fid.fid"),
            "against": None,
            "gain": None,
            "gain_se": None,
        }
        v = plain.get(rec["seed"])
        if r["algorithm"] != "vae" and v is not None:
            rec["against"] = v
            mine, theirs = per_image.get(r["run"]), per_image.get(v)
            if mine is not None and theirs is not None and same_images(mine, theirs):
                rec["gain"], rec["gain_se"] = paired_difference(theirs["nll_nats"], mine["nll_nats"])  # theirs − mine
        recs.append(rec)
    return pd.DataFrame(recs)


def _int(row: pd.Series, key: str) -> int | None:
    v = _num(row, key)
    return None if v is None else int(v)


def _held(ten: str, now: str) -> str:
    """Whether a 10-epoch verdict held at convergence, in a word."""
    if ten == "better":
        return {"better": "held", "indistinguishable": "vanished", "worse": "reversed"}[now]
    if ten == "worse":
        return {"better": "reversed to a gain", "indistinguishable": "loss vanished", "worse": "still a loss"}[now]
    return {"better": "a gain appeared", "indistinguishable": "still none", "worse": "a loss appeared"}[now]


def ten_epoch_gains(paired: pd.DataFrame | None, own: pd.DataFrame, dataset: str = "mnist") -> dict:
    """{algorithm: (gain, paired se, run)} of the default study's runs on `dataset` against its
    plain VAE (the paired table's rows of `own`, this study's runs), sign turned to a gain."""
    if paired is None or not len(paired):
        return {}
    mine = own[own["dataset"] == dataset]["run"]
    rows = paired[paired["run"].isin(mine)]
    return {r["algorithm"]: (-float(r["difference"]), float(r["paired_se"]), r["run"]) for _, r in rows.iterrows()}


def converged_gains(table: pd.DataFrame, ten_epoch: dict) -> pd.DataFrame:
    """Per prior with a finished, paired run (GAINS_NOTE): algorithm, seeds, gain (mean over seeds),
    test_se, seed_sd (empty for one seed), error, verdict; gain_10, se_10, verdict_10 (the default
    study's at 10 epochs, where it has the prior) and held."""
    recs = []
    scored = table.dropna(subset=["gain"])
    for alg, g in scored.groupby("algorithm", sort=False):
        k = len(g)
        gain = float(g["gain"].mean())
        test_se = math.sqrt(float((g["gain_se"].astype(float) ** 2).sum())) / k
        seed_sd = float(g["gain"].std(ddof=1)) if k >= 2 else None
        error = math.sqrt(test_se**2 + (seed_sd**2 / k if seed_sd is not None else 0.0))
        now = verdict(-gain, error)  # the verdict of the difference, −gain
        rec = {
            "algorithm": alg,
            "seeds": ", ".join(str(s) for s in g["seed"]),
            "gain": gain,
            "test_se": test_se,
            "seed_sd": seed_sd,
            "error": error,
            "verdict": now,
            "gain_10": None,
            "se_10": None,
            "verdict_10": None,
            "held": None,
        }
        if alg in ten_epoch:
            g10, se10, _ = ten_epoch[alg]
            ten = verdict(-g10, se10)
            held = _held(ten, now)
            if held == "held":  # and how its size moved, at two errors of the change
                moved = verdict(g10 - gain, math.hypot(error, se10))
                held += {"better": ", grew", "worse": ", shrank"}.get(moved, "")
            rec |= {"gain_10": g10, "se_10": se10, "verdict_10": ten, "held": held}
        recs.append(rec)
    return pd.DataFrame(recs)


def gain_curves(root: str | Path, runs: pd.DataFrame) -> pd.DataFrame:
    """The gain against epochs (GAIN_CURVE_NOTE), one row per (prior run, monitor check both it and
    the plain VAE of its seed made): algorithm, run, seed, against, epoch, nll (the run's
    monitor_valid_nll), nll_vae, gain = nll_vae − nll. Runs without a copied curve are left out."""
    root = Path(root)

    def curve(r) -> pd.DataFrame | None:
        f = r.get("file.train_curve")
        if not isinstance(f, str) or not f or not (root / f).is_file():
            return None
        d = pd.read_csv(root / f)
        if "monitor_valid_nll" not in d:
            return None
        return d.dropna(subset=["monitor_valid_nll"])[["epoch", "monitor_valid_nll"]]

    plain = {_seed(r): (r["run"], curve(r)) for _, r in runs[runs["algorithm"] == "vae"].iterrows()}
    parts = []
    for _, r in runs[runs["algorithm"] != "vae"].iterrows():
        mine = curve(r)
        against, theirs = plain.get(_seed(r), (None, None))
        if mine is None or theirs is None:
            continue
        both = mine.merge(theirs, on="epoch", suffixes=("", "_vae"))
        parts.append(
            pd.DataFrame(
                {
                    "algorithm": r["algorithm"],
                    "run": r["run"],
                    "seed": _seed(r),
                    "against": against,
                    "epoch": both["epoch"].astype(int),
                    "nll": both["monitor_valid_nll"],
                    "nll_vae": both["monitor_valid_nll_vae"],
                    "gain": both["monitor_valid_nll_vae"] - both["monitor_valid_nll"],
                }
            )
        )
    cols = ["algorithm", "run", "seed", "against", "epoch", "nll", "nll_vae", "gain"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)


def gain_series(curves: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each prior's gain against epochs as a file for `dvc plots`: {"<algorithm>.csv": columns
    epoch, gain (mean over the seeds that reached the epoch), gain_low, gain_high (their range),
    n_seeds}."""
    out = {}
    for alg, g in curves.groupby("algorithm", sort=False):
        by = g.groupby("epoch")["gain"]
        out[f"{alg}.csv"] = pd.DataFrame(
            {"gain": by.mean(), "gain_low": by.min(), "gain_high": by.max(), "n_seeds": by.size()}
        ).reset_index()
    return out


def gain_table(curves: pd.DataFrame) -> pd.DataFrame:
    """The gain against epochs as one table: a row per epoch, per prior its mean gain over seeds
    ("<algorithm>") and, where it has two or more seeds, their range ("<algorithm> range")."""
    table = pd.DataFrame({"epoch": pd.Series(dtype=int)})
    for name, s in gain_series(curves).items():
        alg = name.removesuffix(".csv")
        cols = {"epoch": s["epoch"], alg: s["gain"]}
        if (s["n_seeds"] >= 2).any():
            cols[f"{alg} range"] = [
                f"[{lo:+.2f}, {hi:+.2f}]" if n >= 2 else ""
                for lo, hi, n in s[["gain_low", "gain_high", "n_seeds"]].itertuples(index=False)
            ]
        table = table.merge(pd.DataFrame(cols), on="epoch", how="outer")
    return table.sort_values("epoch").reset_index(drop=True)


@dataclass
class ConvergedStudy:
    """What the report shows of the converged study (`converged_study`)."""

    source: str
    table: pd.DataFrame
    gains: pd.DataFrame
    curves: pd.DataFrame
    sentences: list[str] = field(default_factory=list)


def converged_findings(table: pd.DataFrame, gains: pd.DataFrame) -> list[str]:
    """The study in sentences: each prior's gain beside its 10-epoch gain (did it hold), the plain
    VAE against the IWAE paper's one-layer VAE, and the certified prior's gain against the
    VampPrior's; published gains for context."""
    out = []
    for _, g in gains.iterrows():
        seeds = len(g["seeds"].split(", "))
        spread = f", between-seed sd {g['seed_sd']:.2f}" if seeds >= 2 else ", one seed"
        now = f"{g['gain']:+.2f} ± {g['error']:.2f} nats at convergence ({g['verdict']}{spread})"
        if pd.isna(g["held"]):
            out.append(f"{method_label(g['algorithm'])}: {now}; no 10-epoch run to compare.")
        else:
            out.append(
                f"{method_label(g['algorithm'])}: {g['gain_10']:+.2f} ± {g['se_10']:.2f} at 10 epochs "
                f"({g['verdict_10']}), {now}: {g['held']}."
            )
    vae = table[(table["algorithm"] == "vae") & (table["status"] == "finished")]
    if len(vae):
        nll = float(vae["nll"].mean())
        each = ", ".join(f"{v:.2f}" for v in vae["nll"])
        far = nll - IWAE_ONE_LAYER_VAE
        met = "within" if far <= WITHIN_NATS else "not within"
        out.append(
            f"Plain VAE: {nll:.2f} nats (seeds: {each}), {far:+.2f} against the IWAE paper's one-layer VAE "
            f"({IWAE_ONE_LAYER_VAE}): {met} {WITHIN_NATS:g} nats."
        )
    by = {r["algorithm"]: r for _, r in gains.iterrows()}
    if "certified" in by and "vampprior" in by:
        c, v = by["certified"], by["vampprior"]
        d, err = c["gain"] - v["gain"], math.hypot(c["error"], v["error"])
        out.append(
            f"Certified prior against VampPrior: gain {c['gain']:+.2f} ± {c['error']:.2f} against "
            f"{v['gain']:+.2f} ± {v['error']:.2f}, a difference of {d:+.2f} ± {err:.2f}: the certified prior's "
            f"gain is {'at least' if d >= 0 else 'below'} the VampPrior's"
            f"{'' if abs(d) > 2 * err else ' (within two errors)'}."
        )
    if len(gains):
        pub = "; ".join(f"{name} {gain:+.2f} ({src})" for name, gain, src in PUBLISHED_GAINS)
        out.append(f"Published gains over N(0, I) at convergence, with other networks, for context: {pub}.")
    return out


def converged_study(
    root: str | Path, study: str | Path, params: Params, files: dict[str, str], ten_epoch: dict
) -> ConvergedStudy | None:
    """The converged study at `study` (relative to root) for the report; None without a manifest.
    ten_epoch: `ten_epoch_gains` of the default study."""
    runs = study_runs(root, study, params, files)
    if runs.empty:
        return None
    table = converged_table(root, runs)
    gains = converged_gains(table, ten_epoch)
    return ConvergedStudy(
        source=str(runs["source"].iloc[0]),
        table=table,
        gains=gains,
        curves=gain_curves(root, runs),
        sentences=converged_findings(table, gains),
    )
