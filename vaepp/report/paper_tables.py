"""The paper's Tables 1-4 with this project's measurements beside its numbers: which runs measure
a cell (the `match` conditions of `paper_numbers`, against `collect`'s columns), each measured cell
as a `Measured` value with its protocol note (dataset source, sample counts, log Z, FID protocol),
and compact "not run" cells (`not_run_note` says why, once).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from vaepp.datasets import DATASETS, needs_internet
from vaepp.paper_numbers import TABLES, Column, Row

from .collect import THIS_STUDY
from .rows import _by_log_z, _num, _proposal, _test_images, _text, _under_q

NOT_RUN = "not run"  # a cell no run measures; `not_run_note` says why, once per report


def not_run_note() -> str:
    """Why a cell says "not run", stated once: which datasets need the internet (registry)."""
    online = [d.label for d in DATASETS.values() if d.needs_internet]
    offline = [d.label for d in DATASETS.values() if not d.needs_internet and not d.stand_in]
    return (
        "“not run”: no run of this study, nor of a committed study the report shows, measures the cell. "
        f"{', '.join(online[:-1])} and {online[-1]} need the internet (torchvision downloads): "
        "profiles/paper.yaml runs them on a machine that has it. "
        f"{' and '.join(offline)} have offline sources; a cell of theirs that says “not run” has no run "
        "defined under `runs:` (add one), and one that names a missing metrics file has a run that has not "
        "finished. A blank cell is a model quoted from the paper, never run here."
    )


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


def _describe(row: pd.Series) -> str:
    pen = "" if row["penalty"] in ("none", "wgan_div_1") else f", {row['penalty']}"
    stand = " — a STAND-IN, not the paper's data" if row["stand_in"] else ""
    source = row.get("source", THIS_STUDY)
    study = "" if source == THIS_STUDY else f", {source}"
    return (
        f"{row['run']} ({row['algorithm']}, dim z {row['zdim']}{pen}{study}): {row['dataset_label']} "
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
                "the images (`fid_error_bars.error_bars`), KID: mean ± its half-sample sd"
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
    if not row[f"has_{kind}"]:  # data that needs the internet: `not_run_note` says so, once
        missing = f"{row['run']}: metrics/{row['run']}/{kind}.json is missing"
        return Measured(NOT_RUN, run=row["run"], protocol="" if needs_internet(row["dataset"]) else missing)
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
        return [Measured(NOT_RUN)]
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
