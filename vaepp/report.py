"""The study's report: every run's metrics beside the paper's Tables 1-4, the dim-z plot (paper
Figure 4), training curves (Figure 2), the log-Z estimates and sample grids.

    runs = collect(root, params, files)  # one row per run: resolved settings + every metric, flattened
    tabs = tables(runs)               # the paper's layout; measured cells are `Measured`
    render_html(runs, tabs, root), render_markdown(runs, tabs, root), runs.to_csv(index=False)

Inputs under `root` for each run <r> of `params.runs` (any may be missing: its cells then say "not
run"), at the path patterns `files` names (the report stage takes them from dvc.yaml): "metrics"
(with {run} and {kind} for train, nll, latent_gan, mala, fid), "meta" (with {dataset}), and
"train_curve", "grid", "grid_gan" (with {run}). Measured cells come only from these files; the paper's
numbers (paper_numbers.py) sit in their own columns. Figures: matplotlib PNGs (Agg canvas, no
pyplot state) inlined as base64, so the page needs no network.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import Params, resolve_run
from .paper_numbers import FIGURE4, NOT_A_BOUND, TABLES, VARIANCE_Z_HAT_MNIST, Column, Row

KINDS = ("train", "nll", "latent_gan", "mala", "fid")  # the metrics files of a run
FILE_KEYS = ("train_curve", "grid", "grid_gan")  # the curve and sample grids shown per run
BINARY = ("mnist", "fashion_mnist", "static_mnist", "static_mnist_standin", "omniglot")
# Datasets with no offline source (vaepp/fetch_data.py): offline, their cells say why they were not run.
NEEDS_INTERNET = {
    "static_mnist": "needs the internet (torchvision download_url of the Larochelle files)",
    "omniglot": "needs the internet (torchvision download)",
    "cifar10": "needs the internet (torchvision download)",
    "celeba": "needs the internet (torchvision download from Google Drive)",
}


NO_SUCH_RUN = "no run of the params matches (add one under `runs:`)"


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rerun the stage that writes it") from None


def _flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}; lists become JSON text so that every cell is a scalar."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def collect(root: str | Path, params: Params, files: dict[str, str]) -> pd.DataFrame:
    """One row per run of `params.runs` (in order): settings, availability and every metric.

    Columns: run, algorithm, dataset, dataset_label, dataset_source, stand_in, zdim, penalty ("none"
    for the plain VAE and for penalty_k = 0), likelihood, logistic_scale; has_<kind> for each metrics file;
    "<kind>.<key>" for every (flattened) metric; "param.<section>.<key>" for the resolved params;
    "file.<name>" the path (relative to root) of the curve and grids, or "" when missing.
    files: the path patterns of the module docstring, relative to root.
    """
    missing = {"metrics", "meta", *FILE_KEYS} - set(files)
    if missing:
        raise ValueError(f"report inputs: no path pattern for {', '.join(sorted(missing))}")
    root = Path(root)
    rows = []
    for name in params.runs:
        run = resolve_run(params, name)
        ds = run.data.dataset
        meta = _read_json(root / files["meta"].format(dataset=ds)) or {}
        lik = run.model.likelihood  # "auto": Bernoulli on binary data (the rule of study.model_spec)
        row = {
            "run": name,
            "algorithm": run.algorithm,
            "dataset": ds,
            "dataset_label": meta.get("label", ds),
            "dataset_source": meta.get("source", "not prepared"),
            "stand_in": bool(meta.get("stand_in", False)),
            "zdim": run.model.zdim,
            "penalty": "none" if run.algorithm == "vae" or run.train.penalty_k == 0 else run.train.penalty,
            "likelihood": lik if lik != "auto" else "bernoulli" if meta.get("binary", ds in BINARY) else "logistic",
            "logistic_scale": run.model.logistic_scale,
        }
        for kind in KINDS:
            found = _read_json(root / files["metrics"].format(run=name, kind=kind))
            row[f"has_{kind}"] = found is not None
            row.update({f"{kind}.{k}": v for k, v in _flat(found or {}).items()})
        paths = {key: files[key].format(run=name) for key in FILE_KEYS}
        row.update({f"file.{key}": rel if (root / rel).is_file() else "" for key, rel in paths.items()})
        row.update({f"param.{k}": v for k, v in _flat(run.model_dump(mode="json", exclude={"name"})).items()})
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Measured:
    """A measured cell: `value` (None when not run) ± `stderr`, the run it came from, its protocol."""

    text: str
    value: float | None = None
    stderr: float | None = None
    run: str | None = None
    protocol: str = ""

    def __str__(self) -> str:
        return f"{self.text} ({self.run})" if self.value is not None else self.text


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


def _describe(row: pd.Series) -> str:
    pen = "" if row["penalty"] in ("none", "wgan_div_1") else f", {row['penalty']}"
    stand = " — a STAND-IN, not the paper's data" if row["stand_in"] else ""
    return (
        f"{row['run']} ({row['algorithm']}, dim z {row['zdim']}{pen}): {row['dataset_label']} "
        f"from {row['dataset_source']}{stand}"
    )


def _nll_protocol(row: pd.Series) -> str:
    """A Table 1-3 cell's note: the run, its NLL protocol (proposal, test images, log Z), the S/10
    read-out, the ESS and the NLL under the paper's proposal and whole protocol where scored."""
    head = row.get("nll.log_z_headline")
    lz, se = _num(row, f"nll.log_z.{head}.log_z"), _num(row, f"nll.log_z.{head}.std_err")
    lz_text = f" = {lz:.2f} ± {se:.2f}" if lz is not None and se is not None else ""
    under = ", ".join(f"{name} {v:.2f}" for name, v in _by_log_z(row).items())
    protocol, proposal = str(row.get("nll.protocol")), _proposal(row)
    parts = [
        f"{_describe(row)}; {protocol}{lz_text}",
        *([] if proposal in protocol else [f"proposal {proposal}"]),  # the newer protocol texts name it
        f"test images: {_test_images(row)}",
        f"{int(row['nll.n_importance_total'])} importance samples in all",
        f"NLL (nats) under each log Z: {under}",
    ]
    nll, s, sub, n_sub = (
        _num(row, f"nll.{k}") for k in ("nll_nats", "n_importance_per_image", "nll_nats_sub", "n_importance_sub")
    )
    if sub is not None and n_sub is not None:
        parts.append(
            f"from each image's first S/10 = {int(n_sub)} of the same draws {sub:.2f} "
            f"(shift {sub - nll:+.2f} from S = {int(s)}; log p̂ is a stochastic lower bound, so it falls with S)"
        )
    med, low = _num(row, "nll.ess_median"), _num(row, "nll.ess_min")
    if med is not None and low is not None:
        parts.append(f"ESS per image: median {med:.1f}, min {low:.1f} of S = {int(s)}")
    q, q_se, q_full = _under_q(row)
    if q is not None and _text(row, "nll.proposal") not in (None, "posterior"):
        pm = f" ± {q_se:.2f}" if q_se is not None else ""
        parts.append(f"with the paper's proposal q(z|e) (log Z {head}): {q:.2f}{pm} (shift {q - nll:+.2f})")
    if q_full is not None:
        parts.append(f"the paper's whole protocol (q(z|e) and log Ẑ_q): {q_full:.2f}")
    return "; ".join(parts)


# The paper's FID protocol (§4.3): 5000 samples against the training set (50k-60k images here).
PAPER_FID_SAMPLES, PAPER_FID_MIN_REFERENCE = 5000, 50_000


def _kid_keys(metric: str) -> tuple[str, str]:
    """fid.json's KID mean and sd beside `metric` (fid → kid_*, fid_gan → kid_gan_*)."""
    prefix = "fid.kid" if metric == "fid" else "fid.kid_gan"
    return f"{prefix}_mean", f"{prefix}_std"


def _kid_spread_is_zero(row: pd.Series) -> bool:
    """True for a fid.json from before the half-sample error bars (no bootstrap_resamples) whose KID subsets are
    the whole sets (m = n): its sd over subsets is 0 by construction. A half-sample sd is a real
    error bar whatever m."""
    if _num(row, "fid.bootstrap_resamples") is not None:
        return False
    m, n, n_ref = (_num(row, f"fid.{k}") for k in ("kid_subset_size", "n_samples", "n_reference"))
    return m is not None and n is not None and n_ref is not None and m >= min(n, n_ref)


def _fid_interval(row: pd.Series, metric: str) -> str:
    """ " [low, high]": fid.json's half-sample 95% interval of `metric` (fid, fid_gan, fid_floor), or
    "" for a fid.json from before the half-sample error bars (or a set that was not scored)."""
    low, high = _num(row, f"fid.{metric}_ci_low"), _num(row, f"fid.{metric}_ci_high")
    return f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""


def _paper_fid_comparable(row: pd.Series) -> bool:
    return (
        _num(row, "fid.n_samples") == PAPER_FID_SAMPLES
        and row.get("fid.reference") == "train"
        and (_num(row, "fid.n_reference") or 0) >= PAPER_FID_MIN_REFERENCE
        and not row["stand_in"]
    )


def _fid_protocol(row: pd.Series, metric: str) -> str:
    acc = _num(row, "fid.mala_acceptance")
    mala = (
        f", {int(row['fid.mala_steps'])} MALA steps of size {row['fid.mala_step_size']:g}, acceptance {acc:.3f}"
        if acc is not None
        else ""
    )
    how = "latent GAN z₀ decoded directly (no MALA)" if metric == "fid_gan" else f"sampler {row['fid.sampler']}{mala}"
    floor, k_floor, k_floor_sd = (_num(row, f"fid.{k}") for k in ("fid_floor", "kid_floor_mean", "kid_floor_std"))
    boot = _num(row, "fid.bootstrap_resamples")
    if floor is None:
        beside = "no floor or KID recorded (fid.json predates them: rerun compute-fid)"
    else:
        if boot is not None:
            spread = (
                f"; [low, high]: the 95% interval of the FID at this n from {int(boot)} random half-samples of "
                "the images (`fid.error_bars`), KID: mean ± its half-sample sd"
            )
        elif _kid_spread_is_zero(row):
            spread = "; KID subsets are the whole sets (m = n), so no spread over subsets is shown"
        else:
            spread = "; KID: mean ± sd over subsets"
        beside = (
            f"floor (real held-out images scored the same way) FID {floor:.2f}{_fid_interval(row, 'fid_floor')}, "
            f"KID {k_floor:.4f} ± {k_floor_sd:.4f}; FID is biased upward at small N (real images score the "
            f"floor), KID is not{spread}"
        )
    n, ref, n_ref = _num(row, "fid.n_samples"), row.get("fid.reference"), _num(row, "fid.n_reference")
    if _paper_fid_comparable(row):
        verdict = (
            f"COMPARABLE with the paper's FID: made with its protocol ({PAPER_FID_SAMPLES} samples vs the training set)"
        )
    else:
        verdict = (
            f"NOT comparable with the paper's FID ({PAPER_FID_SAMPLES} samples vs the training set): "
            f"{int(n) if n is not None else '?'} samples vs {int(n_ref) if n_ref is not None else '?'} {ref} "
            "images; compare it with its floor and with our other runs at the same protocol only"
        )
    return f"{_describe(row)}; FID: {row.get('fid.protocol')}; {how}; {beside}. {verdict}."


def measure(row: pd.Series, metric: str) -> Measured:
    """The cell of `metric` (nll_nats, bpd, fid, fid_gan) for one run; "not run" if its file is missing."""
    kind = "fid" if metric.startswith("fid") else "nll"
    if not row[f"has_{kind}"]:
        why = NEEDS_INTERNET.get(row["dataset"])
        return Measured(
            f"not run — {why}" if why else "not run",
            run=row["run"],
            protocol=f"{row['run']}: metrics/{row['run']}/{kind}.json is missing",
        )
    if kind == "fid":
        value = float(row[f"fid.{metric}"])
        floor = _num(row, "fid.fid_floor")
        kid, kid_sd = (_num(row, k) for k in _kid_keys(metric))
        text = f"{value:.2f}{_fid_interval(row, metric)}"
        if floor is not None and kid is not None:  # fid.json files before floor and KID have neither
            sd = "" if _kid_spread_is_zero(row) or kid_sd is None else f" ± {kid_sd:.3f}"
            text += f" (floor {floor:.1f}; KID {kid:.3f}{sd})"
        return Measured(text, value, None, row["run"], _fid_protocol(row, metric))
    nats, err = float(row["nll.nll_nats"]), float(row["nll.nll_stderr"])
    value = nats if metric == "nll_nats" else float(row["nll.bpd"])
    err = err if metric == "nll_nats" else err * value / nats  # bits/dim = nats / (H·W·C·ln 2)
    return Measured(f"{value:.2f} ± {err:.2f}", value, err, row["run"], _nll_protocol(row))


def _allowed(value: str | tuple[str, ...]) -> tuple[str, ...]:  # a Match condition as a tuple
    return value if isinstance(value, tuple) else (value,)


def _matches(runs: pd.DataFrame, match: dict) -> pd.Series:
    """Runs meeting every condition of `match` (key → allowed value or tuple of them)."""
    return pd.concat(
        [runs[k].isin(_allowed(v)) for k, v in match.items()] or [pd.Series(True, index=runs.index)], axis=1
    ).all(axis=1)


def _cells(runs: pd.DataFrame, row: Row, col: Column) -> list[Measured | str]:
    if row.match is None:
        return [""]  # a peer model: never measured here
    sel = runs[_matches(runs, row.match) & _matches(runs, col.match)]
    if sel.empty:
        datasets = _allowed(col.match.get("dataset", ()))
        why = [NEEDS_INTERNET[d] for d in datasets if d in NEEDS_INTERNET]
        return [
            Measured(f"not run — {why[0]}" if datasets and len(why) == len(datasets) else f"not run — {NO_SUCH_RUN}")
        ]
    return [measure(r, row.metric or col.metric) for _, r in sel.iterrows()]


def tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Tables 1-4 in the paper's layout: columns Group, Model, then "<col> · paper" (the paper's
    text) and "<col> · ours" (a `Measured`, or "" for peers) per paper column. A cell matched by
    several runs adds sub-rows, one per run; `df.attrs` holds title and caption."""
    out = {}
    for t in TABLES:
        records = []
        for row in t.rows:
            cells = {c.key: _cells(runs, row, c) for c in t.columns}
            if row.ours_only and not any(isinstance(m, Measured) and m.run for ms in cells.values() for m in ms):
                continue
            for i in range(max(len(ms) for ms in cells.values())):
                rec = {"Group": row.group, "Model": row.label}
                for c in t.columns:
                    rec[f"{c.label} · paper"] = row.values.get(c.key, "–") if i == 0 else ""
                    rec[f"{c.label} · ours"] = cells[c.key][i] if i < len(cells[c.key]) else ""
                records.append(rec)
        (df := pd.DataFrame(records)).attrs.update(title=t.title, caption=t.caption, key=t.key)
        out[t.key] = df
    return out


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
    """Figure 4's points of a committed dim-z study: the directory `study` (relative to root) holds
    manifest.json (`runs`: the study's run definitions, `commit`: the code that made them) and
    <run>/<kind>.json per run (scripts/run_study.py dimz). Each run is resolved on `params`' shared
    sections, as the study added it to them; columns as `dimz_points`, plus source = "<study>
    @ <commit[:8]>". Empty when the study has no manifest."""
    from .config import RunParams

    manifest = _read_json(Path(root) / study / "manifest.json")
    if not manifest:
        return pd.DataFrame()
    runs = {name: RunParams(**spec) for name, spec in manifest["runs"].items()}
    study_params = params.model_copy(update={"runs": runs})
    pattern = {"metrics": f"{study}/{{run}}/{{kind}}.json", "train_curve": f"{study}/{{run}}/train_curve.csv"}
    rows = collect(root, study_params, {**files, **pattern})
    # the dataset the study ran on, as its nll.json names it (params of another profile may differ)
    for col in ("dataset", "dataset_label"):
        if f"nll.{col}" in rows:
            rows[col] = rows[f"nll.{col}"].fillna(rows[col])
    if "nll.dataset" in rows:
        rows["likelihood"] = rows["dataset"].map(lambda ds: "bernoulli" if ds in BINARY else "logistic")
    return dimz_points(rows).assign(source=f"{study} @ {manifest['commit'][:8]}")


def per_image_table(root: str | Path, pattern: str, run: str) -> pd.DataFrame | None:
    """Run `run`'s per-image file (estimate-nll's, `pattern` with {run}, relative to root): one row
    per scored test image in scoring order, columns image, test_index (older files: none),
    nll_nats, nll_nats_sub, ess, nll_nats_paper_protocol (when the paper's proposal was scored);
    None when the file is missing."""
    f = Path(root) / pattern.format(run=run)
    return pd.read_csv(f) if f.is_file() else None


def per_image_nll(root: str | Path, pattern: str, run: str, column: str = "nll_nats") -> pd.Series | None:
    """Run `run`'s per-image NLLs in nats (`column` of `per_image_table`: by default the headline
    protocol's), in scoring order; None when the file or the column is missing."""
    d = per_image_table(root, pattern, run)
    return d[column] if d is not None and column in d else None


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


MONITOR_NOTE = (
    "Every train.log_z_every epochs, training pauses for an independent estimate of the current prior's log Z: "
    "AIS from N(0, I) on a small budget (its spread over seeds as error bars) and N(0, I)-IS, the larger heading "
    "(both are lower estimates in expectation), and the NLL of a seeded sample of the validation images "
    "(train[50 000:], never the test images) under it; curves written before the monitor moved to validation "
    "images scored the first test images instead. The table's columns say which: valid_nll (validation images) "
    "or test_nll (test images), each beside the plain VAE's on the same images (_vae). The training "
    "objective uses the per-batch training estimate log(½(Ẑ_N + Ẑ_q)); its gap to the monitored log Z is what "
    "training can exploit. log_z_train is the epoch's mean training estimate; gap = monitored − training; "
    "behind_from_epoch: the first monitored epoch from which the run's monitored NLL stays above the "
    "plain VAE's; cost: monitor time over training time."
)

# The monitor's NLL column in a training curve, newest first, and the images it scored.
MONITOR_NLL = (("monitor_valid_nll", "valid"), ("monitor_test_nll", "test"))


def _monitor_nll(curve: pd.DataFrame) -> tuple[str, str] | None:
    """(the column, "valid" or "test") of the monitor's NLL in a training curve: monitor_valid_nll
    (validation images) or, in curves written before the monitor scored validation images,
    monitor_test_nll (the first test images); None when the curve has neither."""
    return next(((c, what) for c, what in MONITOR_NLL if c in curve and curve[c].notna().any()), None)


def monitor_table(root: str | Path, runs: pd.DataFrame) -> pd.DataFrame:
    """What the log-Z monitor saw in training, one row per pull-back run: at its last monitored
    epoch the training estimate of log Z beside the monitored one (AIS seed sd), their gap, the
    objective's ELBO beside the ELBO under the monitored log Z, and the monitor's NLL beside
    the plain VAE's of the same dataset and epoch on the same kind of images: columns valid_nll,
    valid_nll_vae (validation images) or test_nll, test_nll_vae (older curves: the first test
    images); `behind_from_epoch` is the first monitored epoch from which the pull-back run's NLL
    stays above the plain VAE's ("" if never); cost: monitor seconds over training seconds."""
    root = Path(root)

    def curve(r) -> pd.DataFrame | None:
        f = r.get("file.train_curve")
        if not f or not (root / f).is_file():
            return None
        d = pd.read_csv(root / f)
        return d if "monitor_log_z" in d else None

    # the plain VAE of the same dataset and dim z (else of the same dataset) is the comparison
    plain = {(r["dataset"], r["zdim"]): curve(r) for _, r in runs[runs["algorithm"] == "vae"].iterrows()}
    plain.update({(ds, None): d for (ds, _), d in reversed(list(plain.items()))})
    recs = []
    for _, r in runs[runs["algorithm"] != "vae"].iterrows():
        d = curve(r)
        if d is None:
            continue
        m = d.dropna(subset=["monitor_log_z"])
        last = m.iloc[-1]
        rec = {
            "run": r["run"],
            "algorithm": r["algorithm"],
            "epoch": int(last["epoch"]),
            "log_z_train": last["log_z"],
            "log_z_monitor": last["monitor_log_z"],
            "ais_seed_sd": last.get("monitor_log_z_ais_seed_sd", math.nan),
            "gap": last["monitor_log_z"] - last["log_z"],
            "elbo_objective": last["elbo_under_train_log_z"],
            "elbo_monitor": last["elbo_under_monitor_log_z"],
        }
        if (src := _monitor_nll(m)) is not None:
            col, images = src
            rec |= {f"{images}_nll": last[col], f"{images}_nll_vae": math.nan}
        rec |= {"behind_from_epoch": "", "cost": m["monitor_seconds"].sum() / d["seconds"].sum()}
        v = plain.get((r["dataset"], r["zdim"]), plain.get((r["dataset"], None)))
        if src is not None and v is not None and col in v:  # the plain VAE on the same kind of images
            both = m.merge(v.dropna(subset=[col])[["epoch", col]], on="epoch", suffixes=("", "_vae"))
            if len(both):
                rec[f"{images}_nll_vae"] = both[f"{col}_vae"].iloc[-1]
                behind = (both[col] > both[f"{col}_vae"]).tolist()
                trailing = len(behind) - next((i for i, b in enumerate(reversed(behind)) if not b), len(behind))
                if trailing < len(behind):  # behind at every monitored epoch from this one on
                    rec["behind_from_epoch"] = int(both["epoch"].iloc[trailing])
        recs.append(rec)
    return pd.DataFrame(recs)


PAIRED_NOTE = (
    "Each pull-back run against the plain VAE of the same dataset (and dim z where one exists), image by "
    "image on the same test images and binarisations: difference = mean over images of the run's −log p̂(x) "
    "minus the plain VAE's (negative: the run is better), paired se = sd of the per-image differences / √n. "
    "nll, nll_against, difference, paired_se: under each run's headline protocol (its proposal, by default "
    "the full-support defensive mixture, and its headline log Z: a certified run's is the certificate's "
    "upper end, so its log-Z part is not optimistic with probability ≥ 1 − δ). The _q columns: the same "
    "images and log Z with the paper's proposal q(z|e), where both runs scored it, so difference_q beside "
    "difference shows how the paper's proposal moves the run's gap to the plain VAE (a truncated q loses "
    "more posterior mass the more the prior pulls). The log-Z estimate's own error is not in the paired se."
)


def _paired(mine: pd.Series, theirs: pd.Series) -> tuple[float, float]:
    """(mean of mine − theirs, its paired standard error sd/√n), nats."""
    diff = mine - theirs
    return diff.mean(), diff.std() / math.sqrt(len(diff))


def paired_table(root: str | Path, runs: pd.DataFrame, pattern: str) -> pd.DataFrame:
    """Per-image paired comparison of every pull-back run with the plain VAE (PAIRED_NOTE), from the
    estimate-nll stage's per-image files (`pattern` with {run}; two files pair when they have as
    many rows and, where both record it, the same test_index in the same order). Columns: run,
    algorithm, against, n_images, nll, nll_against, difference, paired_se (headline protocol), then
    nll_q, nll_against_q, difference_q, paired_se_q (the paper's proposal q(z|e), from the files'
    nll_nats_paper_protocol; empty unless both runs have it), log_z (the run's headline estimator)."""
    plain = runs[runs["algorithm"] == "vae"]
    recs = []
    q = "nll_nats_paper_protocol"
    for _, r in runs[runs["algorithm"] != "vae"].iterrows():
        mine = per_image_table(root, pattern, r["run"])
        if mine is None:
            continue
        same = plain[plain["dataset"] == r["dataset"]]
        same = same[same["zdim"] == r["zdim"]] if (same["zdim"] == r["zdim"]).any() else same
        for _, v in same.iterrows():
            theirs = per_image_table(root, pattern, v["run"])
            if theirs is None or len(theirs) != len(mine):
                continue
            if "test_index" in mine and "test_index" in theirs and not mine["test_index"].equals(theirs["test_index"]):
                continue  # the same number of different test images: no pairing
            difference, paired_se = _paired(mine["nll_nats"], theirs["nll_nats"])
            rec = {
                "run": r["run"],
                "algorithm": r["algorithm"],
                "against": v["run"],
                "n_images": len(mine),
                "nll": mine["nll_nats"].mean(),
                "nll_against": theirs["nll_nats"].mean(),
                "difference": difference,
                "paired_se": paired_se,
                "nll_q": math.nan,
                "nll_against_q": math.nan,
                "difference_q": math.nan,
                "paired_se_q": math.nan,
                "log_z": r.get("nll.log_z_headline", ""),
            }
            if q in mine and q in theirs:
                difference_q, paired_se_q = _paired(mine[q], theirs[q])
                rec |= {
                    "nll_q": mine[q].mean(),
                    "nll_against_q": theirs[q].mean(),
                    "difference_q": difference_q,
                    "paired_se_q": paired_se_q,
                }
            recs.append(rec)
            break
    return pd.DataFrame(recs)


TRAINING_LENGTH_NOTE = (
    "The same study at the authors' MNIST hyperparameters (lr 1e-4, ‖∇D‖³, c = w, zero-initialised heads: "
    "`authors`) and with PyTorch's initialisation and c = 1 (`probe`), 30 epochs with the log-Z monitor "
    "after every epoch. NLL: the monitor's NLL under the monitored log Z at each epoch, of the images the "
    "`images` column names: validation images (train[50 000:]), or, in curves written before the monitor "
    "moved to them, the first test images; log Z: the training estimate (epoch mean) and the monitored one; "
    "gap = monitored − training. The last rows per variant: estimate-nll at the end (AIS at the default "
    "budget; `images` names its test images and its proposal)."
)

MONITOR_IMAGES = {"valid": "validation images", "test": "the first test images"}


def training_length_table(root: str | Path, pattern: str) -> pd.DataFrame:
    """The training-length study: for every variant directory that `pattern` ("…/{variant}/{run}")
    matches under root, one row per monitored epoch with the plain VAE's monitored NLL and, per
    pull-back run, its monitored NLL, training and monitored log Z and their gap (`images`: which
    images the monitor scored, `_monitor_nll`); then a row "end" with each run's estimate-nll NLL
    (headline log Z) where its nll.json exists (`images`: its test images and proposal). Empty when
    no variant has curves."""
    root = Path(root)
    head, _, _ = pattern.partition("{variant}")
    base = root / head
    recs = []
    for vdir in sorted(p for p in base.glob("*") if p.is_dir()) if base.is_dir() else []:
        variant = vdir.name
        runs, images = {}, set()
        for rdir in sorted(p for p in vdir.glob("*") if (p / "train_curve.csv").is_file()):
            d = pd.read_csv(rdir / "train_curve.csv")
            if (src := _monitor_nll(d)) is not None:
                runs[rdir.name] = d.dropna(subset=[src[0]]).rename(columns={src[0]: "monitor_nll"})
                images.add(MONITOR_IMAGES[src[1]])
        if not runs:
            continue
        epochs = sorted(set.intersection(*(set(d["epoch"].astype(int)) for d in runs.values())))
        for epoch in epochs:
            rec: dict = {"variant": variant, "epoch": epoch, "images": " and ".join(sorted(images))}
            for name, d in runs.items():
                row = d[d["epoch"] == epoch].iloc[0]
                rec[f"{name} NLL"] = row["monitor_nll"]
                if "monitor_log_z_ais" in d and not math.isnan(row.get("monitor_log_z_ais", math.nan)):
                    rec[f"{name} log Z train"] = row["log_z"]
                    rec[f"{name} log Z monitored"] = row["monitor_log_z"]
                    rec[f"{name} gap"] = row["monitor_log_z"] - row["log_z"]
            recs.append(rec)
        end: dict = {"variant": variant, "epoch": "end"}
        scored = set()
        for name in runs:
            nll = _read_json(vdir / name / "nll.json")
            if nll is not None:
                end[f"{name} NLL"] = nll["nll_nats"]
                if nll.get("log_z"):
                    end[f"{name} log Z monitored"] = nll["log_z"][nll["log_z_headline"]]["log_z"]
                flat = pd.Series(_flat(nll, "nll."), dtype=object)  # as a row of `collect`
                scored.add(f"{_test_images(flat)}, proposal {_proposal(flat)}")
        if len(end) > 2:
            recs.append({**end, "images": "estimate-nll: " + " and ".join(sorted(scored))})
    return pd.DataFrame(recs)


def headline_metrics(runs: pd.DataFrame) -> dict[str, float]:
    """ "<run>/<metric>" → value for the pipeline's parent run (numbers only): nll.json's and
    fid.json's headline values (nll_nats_sub: from S/10 samples; fid_ci_low, fid_ci_high: FID's
    half-sample 95% interval), nll_nats_<estimator> under each log Z, and nll_nats_paper_protocol,
    the NLL with the paper's proposal q(z|e) under the headline log Z (`_under_q`)."""
    keys = {
        "nll_nats": "nll.nll_nats",
        "nll_stderr": "nll.nll_stderr",
        "bpd": "nll.bpd",
        "nll_vae_prior_nats": "nll.nll_vae_prior_nats",
        "nll_nats_sub": "nll.nll_nats_sub",
        "ess_median": "nll.ess_median",
        "fid": "fid.fid",
        "fid_ci_low": "fid.fid_ci_low",
        "fid_ci_high": "fid.fid_ci_high",
        "fid_gan": "fid.fid_gan",
        "mala_acceptance": "mala.mala_acceptance",
        "elbo_under_train_log_z": "train.elbo_under_train_log_z",
        "elbo_under_monitor_log_z": "train.elbo_under_monitor_log_z",
        "log_z_monitor": "train.log_z_monitor",
        "beta": "train.beta",
    }
    out = {}
    for _, r in runs.iterrows():
        out.update({f"{r['run']}/{name}": float(r[col]) for name, col in keys.items() if _num(r, col) is not None})
        out.update({f"{r['run']}/nll_nats_{name}": v for name, v in _by_log_z(r).items()})
        q = _under_q(r)[0]  # the paper's proposal q(z|e), headline log Z
        if q is not None:
            out[f"{r['run']}/nll_nats_paper_protocol"] = q
    return out


# --------------------------------------------------------------------------- figures


def _png(fig) -> str:
    fig.savefig(buf := io.BytesIO(), format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


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

# Figure 4's NLL markers by comparability with this study's protocol (`figure4_points`):
# comparable → (gid suffix, marker, line style, paper-q marker)
NLL_MARKERS = {True: ("", "o", "-", "s"), False: ("-other-protocol", "x", ":", "D")}
EARLIER_LEGEND = ", earlier protocol: q(z|e), first n test images (not comparable)"
OTHER_LEGEND = ", another NLL protocol (not comparable; see its source)"


def figure_id(*parts: str) -> str:
    """An SVG element id made of `parts` (lower case, "-"-joined, other characters dropped)."""
    clean = ("".join(ch for ch in str(p).lower().replace(" ", "_") if ch.isalnum() or ch in "_.-") for p in parts)
    return "-".join(clean)


def dimz_figure(points: pd.DataFrame) -> str:
    """Figure 4 analogue as inline SVG: per dataset, the NLL against dim z (nats on Bernoulli
    data, bits/dim otherwise) under each run's headline log Z (filled markers, one line per
    algorithm) and under the paper's q-based log Ẑ (hollow squares, same colour); then FID against
    dim z, one line per (dataset, algorithm), with the real-vs-real floor dashed. Every line and
    marker set carries an id, `figure_id("dimz", panel, dataset, algorithm)` with panel "nll",
    "nll-paper-q" or "fid", and one marker per point, so the page can be checked point by point.
    NLL points not comparable with this study's protocol (`points["comparable"]` False, from
    `figure4_points`) are drawn apart, panels "nll-other-protocol" and "nll-paper-q-other-protocol"
    (NLL_MARKERS), their legend naming the earlier protocol where they have no `proposal`."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    if "comparable" not in points:  # `dimz_points`: this study's own, comparable by definition
        points = points.assign(comparable=True)
    datasets = list(dict.fromkeys(points["dataset_label"])) or ["no run"]
    algorithms = list(dict.fromkeys(points["algorithm"]))
    colour = {a: f"C{i}" for i, a in enumerate(algorithms)}
    fig = Figure(figsize=(5 * (len(datasets) + 1), 3.8))
    axes = fig.subplots(1, len(datasets) + 1, squeeze=False)[0]
    for ax, ds in zip(axes[:-1], datasets, strict=True):
        d = points[points["dataset_label"] == ds]
        nats = (d["likelihood"] == "bernoulli").all()
        unit = "nats" if nats else "bits/dim"
        for (alg, same), g in d.dropna(subset=["nll_nats"]).groupby(["algorithm", "comparable"], sort=False):
            suffix, marker, ls, q_marker = NLL_MARKERS[bool(same)]
            what = "" if same else EARLIER_LEGEND if g["proposal"].isna().all() else OTHER_LEGEND
            to_unit = 1.0 if nats else g["bpd"] / g["nll_nats"]
            ax.plot(
                g["zdim"],
                g["nll_nats"] * to_unit,
                ls=ls,
                marker=marker,
                color=colour[alg],
                label=f"{alg}{what}",
                gid=figure_id("dimz", f"nll{suffix}", ds, alg),
            )
            q = g.dropna(subset=["nll_paper_q_nats"])
            if len(q):
                ax.plot(
                    q["zdim"],
                    q["nll_paper_q_nats"] * (1.0 if nats else q["bpd"] / q["nll_nats"]),
                    ls="none",
                    marker=q_marker,
                    mfc="none",
                    color=colour[alg],
                    label=f"{alg}, paper's log Ẑ{what}",
                    gid=figure_id("dimz", f"nll-paper-q{suffix}", ds, alg),
                )
        ax.set(xlabel="dim z", ylabel=f"NLL ({unit})", title=f"{ds}: NLL against dim z")
    ax = axes[-1]
    for (ds, alg), g in points.dropna(subset=["fid"]).groupby(["dataset_label", "algorithm"], sort=False):
        style = "-" if ds == datasets[0] else ":"
        ax.plot(
            g["zdim"],
            g["fid"],
            style,
            color=colour[alg],
            marker="o",
            label=f"{ds} · {alg}",
            gid=figure_id("dimz", "fid", ds, alg),
        )
    for ds, g in points.dropna(subset=["fid_floor"]).groupby("dataset_label", sort=False):
        ax.axhline(g["fid_floor"].iloc[0], color="grey", ls="--", lw=1, label=f"{ds} · real vs real (floor)")
    ax.set(xlabel="dim z", ylabel="FID", title="FID against dim z")
    for ax in axes:
        if ax.lines:
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no run has this metric yet", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    with mpl.rc_context({"svg.hashsalt": "vaepp-dimz", "svg.fonttype": "none"}):
        fig.savefig(buf := io.StringIO(), format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]  # inline: no XML prolog or doctype


# Panels of the training-curve figure: (title, [(column, style)]); a solid line is what training
# optimises, a dashed one the independent check of the log-Z monitor (`evaluate.log_z_monitor`).
CURVE_PANELS = (
    (
        "ELBO: objective (—) vs under monitored log Z (--)",
        [("elbo_under_train_log_z", "-"), ("elbo_under_monitor_log_z", "--")],
    ),
    ("log Z: training estimate (—) vs monitored (--)", [("log_z", "-"), ("monitor_log_z", "--")]),
    (
        "NLL under monitored log Z: validation images (—), the first test images in older curves (··)",
        [("monitor_valid_nll", "-"), ("monitor_test_nll", ":")],
    ),
    ("β", [("beta", "-")]),
    ("penalty", [("penalty", "-")]),
)


def curves_figure(root: Path, runs: pd.DataFrame, dataset: str) -> str | None:
    """Figure 2 analogue: per-epoch training curves of the runs on `dataset`, one colour per run.
    For every pull-back run it draws the training estimate of log Z against the monitored one
    (with the AIS seed spread as error bars) and the objective's ELBO against the ELBO under the
    monitored log Z. Base64 PNG or None."""
    from matplotlib.figure import Figure

    curves = {
        r["run"]: (r["algorithm"], pd.read_csv(root / r["file.train_curve"]))
        for _, r in runs[runs["dataset"] == dataset].iterrows()
        if r["file.train_curve"]
    }
    panels = [(t, cols) for t, cols in CURVE_PANELS if any(c in d for _, d in curves.values() for c, _ in cols)]
    if not curves or not panels:
        return None
    fig = Figure(figsize=(3.6 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, cols) in zip(axes, panels, strict=True):
        for i, (name, (alg, d)) in enumerate(curves.items()):
            for col, style in cols:
                if col not in d or d[col].isna().all():
                    continue
                if col == "log_z" and alg == "vae":
                    continue  # log Z = 0 exactly: nothing to compare
                g = d.dropna(subset=[col])
                label = f"{name} ({alg})" if style == "-" or len(cols) == 1 else None
                err = g.get("monitor_log_z_ais_seed_sd") if col == "monitor_log_z" else None
                ax.errorbar(g["epoch"], g[col], yerr=err, ls=style, marker=".", color=f"C{i}", label=label, capsize=2)
        ax.set(xlabel="epoch", title=title)
        ax.title.set_fontsize(8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _png(fig)


# --------------------------------------------------------------------------- rendering


def _fmt(v, digits: int = 2) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) or v is False:
        return ""
    return "yes" if v is True else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _notes(df: pd.DataFrame) -> dict[str, int]:
    """Protocol text → note number, in reading order."""
    notes: dict[str, int] = {}
    for v in df.to_numpy().ravel():
        if isinstance(v, Measured) and v.protocol and v.protocol not in notes:
            notes[v.protocol] = len(notes) + 1
    return notes


def _md_table(df: pd.DataFrame, notes: dict[str, int] | None = None) -> str:
    def cell(v) -> str:
        ref = f" [{notes[v.protocol]}]" if isinstance(v, Measured) and notes and v.protocol in notes else ""
        return (_fmt(v) + ref).replace("|", "∣").replace("\n", " ")  # U+2223: no column break

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in rec) + " |" for rec in df.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(
    runs: pd.DataFrame,
    tabs: dict[str, pd.DataFrame],
    root: str | Path | None = None,
    training_length: pd.DataFrame | None = None,
    paired: pd.DataFrame | None = None,
    figure4: pd.DataFrame | None = None,
) -> str:
    """Tables 1-4 (with numbered protocol notes), the log-Z estimates and Figure 4's points
    (`figure4`, from `figure4_points`; default: the runs' own)."""
    parts = [
        "# VAEPP: measured results beside the paper's",
        "",
        "Paper columns are the paper's numbers; ours "
        "columns are this project's measurements (NLL: mean ± standard error); [n] names a cell's protocol.",
        "",
    ]
    for df in tabs.values():
        notes = _notes(df)
        parts += [f"## {df.attrs['title']}", "", df.attrs["caption"], "", _md_table(df, notes), ""]
        parts += [f"[{n}] {text}" for text, n in notes.items()] + [""]
    parts += ["## log Z estimates and the NLL under each", "", NOT_A_BOUND, "", _md_table(logz_table(runs)), ""]
    parts += [f"## {NLL_ESTIMATOR_TITLE}", "", NLL_ESTIMATOR_NOTE, "", _md_table(nll_estimator_table(runs)), ""]
    if paired is not None and len(paired):
        parts += ["## Each pull-back run against the plain VAE, image by image", "", PAIRED_NOTE, ""]
        parts += [_md_table(paired), ""]
    if root is not None and len(mon := monitor_table(root, runs)):
        parts += ["## The log-Z monitor in training", "", MONITOR_NOTE, "", _md_table(mon), ""]
    if training_length is not None and len(training_length):
        parts += ["## Training length and the drift of log Z", "", TRAINING_LENGTH_NOTE, ""]
        parts += [_md_table(training_length), ""]
    pts = (figure4_points(runs) if figure4 is None else figure4).pipe(
        lambda d: d.assign(bpd=d["bpd"].map(lambda v: _fmt(v, 4)))
    )
    parts += ["## Figure 4 points: NLL and FID against dim z", "", DIMZ_NOTE, "", _md_table(pts), ""]
    return "\n".join(parts)


_CSS = """body{font-family:sans-serif;margin:24px;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:8px 0 4px;font-size:13px}th,td{border:1px solid #bbb;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#eee}td.ours{background:#eef6ff}td.paper{background:#fafafa}
td.missing{color:#a33}small{color:#555}ol.notes{font-size:11px;color:#444}img{max-width:100%}
.grids{display:flex;flex-wrap:wrap;gap:16px}.grids figure{margin:0}p.warn{background:#fff4e0;padding:8px}"""


def _html_table(df: pd.DataFrame, notes: dict[str, int] | None = None) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in df.columns)
    body, group = [], None
    for rec in df.itertuples(index=False):
        tds = []
        for col, v in zip(df.columns, rec, strict=True):
            if col == "Group":  # shown once per group, as the paper prints it
                v, group = ("" if v == group else v), v
            if isinstance(v, Measured):
                cls = "ours" if v.value is not None else "ours missing"
                ref = f"<sup>[{notes[v.protocol]}]</sup>" if notes and v.protocol in notes else ""
                run = f"<br><small>{e(v.run)}</small>" if v.run and v.value is not None else ""
                tds.append(f'<td class="{cls}" title="{e(v.protocol)}">{e(v.text)}{ref}{run}</td>')
            else:
                tds.append(f'<td class="{"paper" if str(col).endswith("paper") else ""}">{e(_fmt(v))}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def render_html(
    runs: pd.DataFrame,
    tabs: dict[str, pd.DataFrame],
    root: str | Path,
    title: str = "VAEPP reproduction report",
    training_length: pd.DataFrame | None = None,
    paired: pd.DataFrame | None = None,
    figure4: pd.DataFrame | None = None,
) -> str:
    """One self-contained HTML page: tables, Figure 4 (its points `figure4`, from
    `figure4_points`; default: the runs' own) and 2 analogues, log-Z estimates, sample grids."""
    root, e = Path(root), html.escape
    out = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
        f"</head><body><h1>{e(title)}</h1><p>Grey columns: the numbers printed in the paper. Blue columns: "
        "this project's measurements (NLL: mean ± standard error over test images and passes), each with its "
        "run and a numbered protocol note (dataset source, sample counts, which log Z, FID protocol). "
        "“not run”: no metrics file exists for that cell.</p>"
    ]
    for df in tabs.values():
        notes = _notes(df)
        out += [
            f"<h2>{e(df.attrs['title'])}</h2><p><small>{e(df.attrs['caption'])}</small></p>",
            _html_table(df, notes),
            "<ol class='notes'>" + "".join(f"<li>{e(text)}</li>" for text in notes) + "</ol>",
        ]
    pts = figure4_points(runs) if figure4 is None else figure4
    out += [
        "<h2>Figure 4 analogue: NLL and FID against dim z</h2>",
        f"<p><small>Paper: {e(FIGURE4)}</small></p>",
        f"<p><small>{e(DIMZ_NOTE)}</small></p>",
        f"<figure class='dimz'>{dimz_figure(pts)}</figure>",
        _html_table(pts.assign(bpd=pts["bpd"].map(lambda v: _fmt(v, 4)))),
    ]
    out.append("<h2>Figure 2 analogue: training curves, and the log-Z monitor</h2>")
    out.append(f"<p><small>{e(MONITOR_NOTE)}</small></p>")
    for ds in dict.fromkeys(runs["dataset"]):
        b64 = curves_figure(root, runs, ds)
        label = runs.loc[runs["dataset"] == ds, "dataset_label"].iloc[0]
        out.append(f"<h3>{e(label)}</h3>" + (_img(b64, f"training curves {ds}") if b64 else "<p>not run</p>"))
    if len(mon := monitor_table(root, runs)):
        out.append(_html_table(mon))
    if training_length is not None and len(training_length):
        out += [
            "<h2>Training length and the drift of log Z</h2>",
            f"<p><small>{e(TRAINING_LENGTH_NOTE)}</small></p>",
            _html_table(training_length),
        ]
    var = ", ".join(f"{v:g} ({k} q)" for k, v in VARIANCE_Z_HAT_MNIST.items())
    out += [
        "<h2>log Z estimates and the NLL under each</h2>",
        f"<p class='warn'>{e(NOT_A_BOUND)}</p>",
        _html_table(logz_table(runs)),
        f"<p><small>Paper, MNIST: variance of Ẑ with 10⁹ samples {e(var)}."
        " ESS: effective sample size (Σw)²/Σw² of each importance-sampling estimate; seed_sd: AIS "
        "spread over seeds; nll_nats: the NLL computed with that log Z.</small></p>",
        f"<h2>{e(NLL_ESTIMATOR_TITLE)}</h2>",
        f"<p><small>{e(NLL_ESTIMATOR_NOTE)}</small></p>",
        _html_table(nll_estimator_table(runs)),
    ]
    if paired is not None and len(paired):
        out += [
            "<h2>Each pull-back run against the plain VAE, image by image</h2>",
            f"<p><small>{e(PAIRED_NOTE)}</small></p>",
            _html_table(paired),
        ]
    out.append("<h2>Samples</h2><div class='grids'>")
    for _, r in runs.iterrows():
        pull = r["algorithm"] != "vae"
        for key, what in (
            ("grid", "latent GAN + MALA" if pull else "plain VAE, z ~ N(0, I)"),
            ("grid_gan", "GAN-VAEPP: z₀ decoded" if pull else "VAE + latent GAN"),
        ):
            path = r[f"file.{key}"]  # "" when missing
            body = _img(base64.b64encode((root / path).read_bytes()).decode(), what) if path else "<p>not run</p>"
            out.append(f"<figure>{body}<figcaption>{e(r['run'])}: {e(what)}</figcaption></figure>")
    out.append("</div></body></html>")
    return "\n".join(out)
