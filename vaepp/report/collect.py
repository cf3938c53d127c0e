"""The report's input: one row per run of the study (`collect`) with its resolved settings and
every metric, flattened, from the metrics files; a run's per-image NLL file (`per_image_table`);
the headline numbers logged to the pipeline's parent run (`headline_metrics`). A run's settings are
resolved here, through `vaepp.resolve`, once: every table and figure reads them from this table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vaepp import resolve
from vaepp.config import Params, RunParams, parse_params, resolve_run, upgrade_run_spec
from vaepp.datasets import DATASETS, is_binary
from vaepp.files import flat, read_json

from .rows import _by_log_z, _num, _under_q

KINDS = ("train", "nll", "latent_gan", "mala", "fid")  # the metrics files of a run
FILE_KEYS = ("train_curve", "grid", "grid_gan")  # the curve and sample grids shown per run
THIS_STUDY = "this study"  # the `source` of the runs of params.yaml (a committed study's: "<dir> @ <commit>")


def collect(root: str | Path, params: Params, files: dict[str, str], source: str = THIS_STUDY) -> pd.DataFrame:
    """One row per run of `params.runs` (in order): settings, availability and every metric.

    Columns: run, source (which study made it: `source`), algorithm (the paper's name of the run's
    method, `resolve.method`), dataset, dataset_label, dataset_source, stand_in, zdim, penalty
    ("none" for the plain VAE and for penalty_k = 0), likelihood ("auto" resolved by
    `resolve.likelihood`), logistic_scale; has_<kind> for each metrics file;
    "<kind>.<key>" for every (flattened) metric; "param.<section>.<key>" for the resolved params;
    "file.<name>" the path (relative to root) of the curve and grids, or "" when missing, and
    "file.per_image" that of estimate-nll's per-image NLLs when `files` has a "per_image" pattern.
    files: the path patterns of the package docstring (`vaepp.report`), relative to root.
    """
    missing = {"metrics", "meta", *FILE_KEYS} - set(files)
    if missing:
        raise ValueError(f"report inputs: no path pattern for {', '.join(sorted(missing))}")
    root = Path(root)
    rows = []
    for name in params.runs:
        run = resolve_run(params, name)
        ds = run.data.dataset
        meta = read_json(root / files["meta"].format(dataset=ds), missing_ok=True) or {}
        binary = meta.get("binary", is_binary(ds))  # what training read (meta.json), else the registry's
        method = resolve.method(run)
        row = {
            "run": name,
            "source": source,
            "algorithm": method,
            "dataset": ds,
            "dataset_label": meta.get("label", DATASETS[ds].label if ds in DATASETS else ds),
            "dataset_source": meta.get("source", "not prepared"),
            "stand_in": bool(meta.get("stand_in", False)),
            "zdim": run.model.zdim,
            "penalty": "none" if method == "vae" or run.train.penalty_k == 0 else run.train.penalty,
            "likelihood": resolve.likelihood(run, binary),
            "logistic_scale": run.model.logistic_scale,
        }
        for kind in KINDS:
            found = read_json(root / files["metrics"].format(run=name, kind=kind), missing_ok=True)
            row[f"has_{kind}"] = found is not None
            row.update({f"{kind}.{k}": v for k, v in flat(found or {}, lists_as_json=True).items()})
        paths = {key: files[key].format(run=name) for key in (*FILE_KEYS, "per_image") if key in files}
        row.update({f"file.{key}": rel if (root / rel).is_file() else "" for key, rel in paths.items()})
        settings = flat(run.model_dump(mode="json", exclude={"name"}), lists_as_json=True)
        row.update({f"param.{k}": v for k, v in settings.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def study_runs(root: str | Path, study: str | Path, params: Params, files: dict[str, str]) -> pd.DataFrame:
    """The runs of a committed study as `collect` rows: the directory `study` (relative to root)
    holds manifest.json (`runs`: the study's run definitions, `commit`: the code that made them)
    and <run>/<kind>.json, train_curve.csv and nll_per_image.csv per run (scripts/run_study.py).
    Each run is resolved on the shared sections the study ran with where the manifest records them
    (`shared`: its params.yaml without the runs, so another profile's settings cannot make a
    finished run invalid or different), else on `params`' shared sections; the dataset
    and its likelihood are those its nll.json names (params of another profile may differ);
    source = "<study> @ <commit[:8]>". Empty when the study has no manifest."""
    manifest = read_json(Path(root) / study / "manifest.json", missing_ok=True)
    if not manifest:
        return pd.DataFrame()
    specs = {name: upgrade_run_spec(spec) for name, spec in manifest["runs"].items()}
    if manifest.get("shared"):  # the shared sections the study ran with, whatever profile reads it
        study_params = parse_params({**manifest["shared"], "runs": specs}, source=f"{study}/manifest.json")
    else:
        runs = {name: RunParams(**spec) for name, spec in specs.items()}
        study_params = params.model_copy(update={"runs": runs})
    pattern = {
        "metrics": f"{study}/{{run}}/{{kind}}.json",
        "train_curve": f"{study}/{{run}}/train_curve.csv",
        "per_image": f"{study}/{{run}}/nll_per_image.csv",
    }
    rows = collect(root, study_params, {**files, **pattern}, source=f"{study} @ {manifest['commit'][:8]}")
    for col in ("dataset", "dataset_label", "dataset_source", "stand_in"):  # what it read, as nll.json says
        if f"nll.{col}" in rows:
            rows[col] = rows[f"nll.{col}"].fillna(rows[col])
    if "nll.dataset" in rows:  # "auto" resolved on the dataset the study ran on
        rows["likelihood"] = [
            resolve.likelihood(resolve_run(study_params, name), is_binary(ds))
            for name, ds in zip(rows["run"], rows["dataset"], strict=True)
        ]
    return rows


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
