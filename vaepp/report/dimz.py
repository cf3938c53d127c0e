"""Figure 4's points, NLL and FID against dim z: this study's runs (`dimz_points`), a committed
dim-z study's (`dimz_study_points`), both on one set of lines where their NLLs were scored alike
(`figure4_points`), and the lines as files for `dvc plots` (`dimz_series`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vaepp.config import Params

from .collect import per_image_nll, study_runs

DIMZ_NOTE = (
    "One point per run: this study's runs and those of the committed dim-z study (studies/dimz, made by "
    "scripts/run_study.py dimz: trained exactly like this study's runs, evaluated on fewer test images; `source` "
    "names the commit that made it). A committed point's NLL joins this study's lines only when it was scored "
    "with this study's NLL protocol (the same proposal and the same seeded sample of test images); then this "
    "study's points beside it are their runs' mean over the study's images (the first m of the same seeded "
    "sample are its sample of size m; Tables 1–4 use all of them), so each line compares every dim z on the "
    "same images and binarisations. A point scored with another protocol is drawn apart, crosses on a dotted "
    "line, with its legend and `source` saying which: above all the earlier protocol (q(z|e) as the proposal, "
    "the first n test images, which are not a sample of the test set), marked “earlier protocol”; it is not "
    "comparable with this study's NLL (the truncated q loses posterior mass the full-support proposal keeps). "
    "A line joins one "
    "algorithm's runs on one dataset across dim z. Filled markers: the NLL under the run's headline log Z "
    "(exact for N(0, I), AIS for a pull-back prior, the certificate's upper end for a certified one); hollow "
    "squares (hollow diamonds for a point drawn apart): the same run under the paper's q-based log Ẑ, which sits "
    "below AIS (see the log-Z table), so the gap between the two markers is the paper's log Ẑ's optimism. "
    "FID: the run's samples (latent GAN + MALA; N(0, I) for the plain VAE; exact samples for a certified "
    "prior) at the protocol of Table 4 (fid_ci_low, fid_ci_high: its half-sample 95% interval where recorded), "
    "with the real-vs-real floor at the same N dashed: at N = 400 a perfect model would score the floor, not 0."
)


def dimz_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Figure 4's points: one per run with an NLL or FID; a line is a (dataset_label, algorithm)
    pair, sorted by zdim. Columns: dataset_label, algorithm, zdim, run, likelihood, log_z (the
    headline log-Z estimator), n_test_images, nll_nats (under it), nll_paper_q_nats (under the paper's q-based
    estimate, where the run has one), bpd, fid with its half-sample 95% interval fid_ci_low, fid_ci_high
    (where fid.json has one), fid_floor (real held-out images at the same N), proposal (nll.json's;
    empty for the earlier protocol) and subset_seed (the seed of its test sample, empty for all or
    the first n)."""
    cols = {
        "nll.log_z_headline": "log_z",
        "nll.n_test_images": "n_test_images",
        "nll.nll_nats": "nll_nats",
        "nll.nll_nats_by_log_z.paper_q": "nll_paper_q_nats",
        "nll.bpd": "bpd",
        "fid.fid": "fid",
        "fid.fid_ci_low": "fid_ci_low",
        "fid.fid_ci_high": "fid_ci_high",
        "fid.fid_floor": "fid_floor",
        "nll.proposal": "proposal",
        "nll.test_subset.seed": "subset_seed",
    }
    keep = ["dataset_label", "algorithm", "zdim", "run", "dataset", "likelihood", *cols]
    pts = runs[runs["has_nll"] | runs["has_fid"]].reindex(columns=keep).rename(columns=cols)
    pts = pts.astype({"subset_seed": "Int64"})
    return pts.sort_values(["dataset_label", "algorithm", "zdim", "run"]).reset_index(drop=True)


def dimz_study_points(root: str | Path, study: str | Path, params: Params, files: dict[str, str]) -> pd.DataFrame:
    """Figure 4's points of a committed dim-z study (`collect.study_runs`: the directory `study`
    relative to root, made by scripts/run_study.py dimz): columns as `dimz_points`, plus source =
    "<study> @ <commit[:8]>". Empty when the study has no manifest."""
    rows = study_runs(root, study, params, files)
    if rows.empty:
        return rows
    return dimz_points(rows).assign(source=rows["source"].iloc[0])


def figure4_points(
    runs: pd.DataFrame,
    study: pd.DataFrame | None = None,
    root: str | Path | None = None,
    per_image: str | None = None,
) -> pd.DataFrame:
    """Figure 4's points: the study's runs (`dimz_points`) and a committed dim-z study's
    (`dimz_study_points`), with columns `source` and `comparable` (the point's NLL was scored with
    this study's protocol, `_nll_protocol_key`: the same proposal and test sample). A committed
    study's point scored otherwise (an nll.json without `proposal`: q(z|e) on the first n test
    images) is kept, with comparable False and its source saying so, and is drawn apart.
    When the comparable study points evaluated fewer test images (m) and a run of this study has
    per-image NLLs (`per_image`, a pattern with {run}, relative to root), that run's point is its
    mean over its first m images, which are the study's m images (the same seeded sample: a prefix
    of it is the sample of size m; or the first m for the earlier protocol on both sides), so a
    line compares every dim z on the same images and binarisations: nll_nats becomes that mean,
    and the paper-protocol value and bits/dim move with it (a log-Z estimate shifts every image
    alike)."""
    pts = dimz_points(runs).assign(source="this study", comparable=True)
    if study is not None and len(study):
        # A study point is comparable only when scored with the protocol of this study's points on
        # its line (dataset, algorithm; all of this study's when the line has none), and the mean
        # over "the first m images" is taken only against comparable ones: this study's first m
        # images are the study's m only under the same protocol (the same seeded sample, or the
        # first n on both sides). An earlier-protocol point beside a random-sample one stays on the
        # page, labelled, and no point of this study is recomputed for it: that mean would be over
        # other images than the study's.
        our_keys, line = _nll_protocol_key(pts), ["dataset_label", "algorithm"]
        ours: dict = {}
        for key, at, has in zip(our_keys, pts[line].itertuples(index=False), pts["nll_nats"].notna(), strict=True):
            if has:
                ours.setdefault(tuple(at), set()).add(key)
                ours.setdefault(None, set()).add(key)
        keys = _nll_protocol_key(study)
        has_nll = study["nll_nats"].notna()
        at_line = study[line].itertuples(index=False)
        same = [k in ours.get(tuple(at), ours.get(None, ())) for k, at in zip(keys, at_line, strict=True)]
        same = pd.Series(same, index=study.index, dtype=bool) & has_nll
        apart = has_nll & ~same
        study = study.assign(comparable=~apart, source=study["source"].astype(object))
        for i, key in zip(study.index, keys, strict=True):
            if apart[i]:
                what = _nll_protocol_text(key, int(study.loc[i, "n_test_images"]))
                study.loc[i, "source"] += f", {what}: not comparable with this study's NLL"
        counts = study.loc[same, "n_test_images"].dropna()
        m = int(counts.min()) if len(counts) else None
        alike = {k for k, ok in zip(keys, same, strict=True) if ok}
        for (i, r), key in zip(pts.iterrows(), our_keys, strict=True) if m and per_image else ():
            nll = per_image_nll(root or ".", per_image, r["run"])
            if nll is None or not r["n_test_images"] > m or key not in alike:
                continue
            first = float(nll.iloc[:m].mean())
            pts.loc[i, "nll_paper_q_nats"] = r["nll_paper_q_nats"] + (first - r["nll_nats"])
            pts.loc[i, "bpd"] = r["bpd"] * first / r["nll_nats"]
            where = f"this study, on the committed study's {m} test images (its first {m})"
            pts.loc[i, ["nll_nats", "n_test_images", "source"]] = [first, m, where]
        pts = pd.concat([pts, study], ignore_index=True)
    return pts.sort_values(["dataset_label", "algorithm", "zdim", "run"]).reset_index(drop=True)


def _nll_protocol_key(points: pd.DataFrame) -> list[tuple[str, int | None]]:
    """Per point, what decides whether two Figure 4 NLLs are comparable: (the headline proposal,
    the seed of the test sample or None for all / the first n test images); ("earlier", None) for
    an nll.json without `proposal` (q(z|e) on the first n test images)."""
    return [
        ("earlier", None) if pd.isna(pr) else (str(pr), None if pd.isna(seed) else int(seed))
        for pr, seed in zip(points["proposal"], points["subset_seed"], strict=True)
    ]


def _nll_protocol_text(key: tuple[str, int | None], n: int) -> str:
    """A `_nll_protocol_key` in words, for a point that scored n test images."""
    proposal, seed = key
    if proposal == "earlier":
        return f"earlier NLL protocol: q(z|e) on the first {n} test images"
    images = f"all {n} test images" if seed is None else f"a random sample of {n} test images (seed {seed})"
    return f"NLL protocol: proposal {proposal}, {images}"


def dimz_series(points: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Figure 4's lines as files for `dvc plots`: {"<dataset>_<algorithm>.csv": that line's points
    by dim z, columns zdim, run, n_test_images, nll_nats, nll_paper_q_nats, fid, fid_floor, and
    source where `points` has it (which says when a point's NLL is not comparable)}."""
    cols = ["zdim", "run", "n_test_images", "nll_nats", "nll_paper_q_nats", "fid", "fid_floor"]
    cols += [c for c in ("source",) if c in points]
    return {
        f"{ds}_{alg}.csv": g[cols].sort_values("zdim").reset_index(drop=True)
        for (ds, alg), g in points.groupby(["dataset", "algorithm"], sort=False)
    }
