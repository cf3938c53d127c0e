"""The report as Markdown (`render_markdown`: tables with numbered protocol notes) and as one
self-contained HTML page (`render_html`: tables, figures and sample grids inlined).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

from vaepp.paper_numbers import FIGURE4, NOT_A_BOUND, VARIANCE_Z_HAT_MNIST

from .collect import THIS_STUDY
from .converged import CONVERGED_NOTE, CONVERGED_TITLE, GAIN_CURVE_NOTE, GAINS_NOTE, ConvergedStudy, gain_table
from .dimz import DIMZ_NOTE, figure4_points
from .estimates import NLL_ESTIMATOR_NOTE, NLL_ESTIMATOR_TITLE, logz_table, nll_estimator_table
from .figures import curves_figure, dimz_figure, gain_figure
from .findings import Finding, findings
from .paper_tables import Measured, not_run_note
from .studies import MONITOR_NOTE, PAIRED_NOTE, TRAINING_LENGTH_NOTE, monitor_table


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


PAIRED_TITLE = "Each prior against the plain VAE, image by image"


def _all_findings(runs, paired, converged: ConvergedStudy | None) -> dict[str, list[Finding]]:
    """`findings`, then the converged study's sentences as one more group."""
    out = findings(runs, paired)
    if converged is not None and converged.sentences:
        label = f"MNIST at convergence ({converged.source})"
        out[label] = [Finding(s, "converged", "converged study") for s in converged.sentences]
    return out


NO_GAIN_YET = "No prior has a finished run beside a finished plain VAE of the same seed yet."


def _converged_frames(c: ConvergedStudy) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The gains, the run table and the gain against epochs as shown: counts as integers, and a run
    not finished says so in its NLL cell."""
    table = c.table.astype({k: "Int64" for k in ("epochs_trained", "best_epoch", "n_images")})
    table = table.astype(object).where(table.notna(), None)
    table.loc[table["status"] != "finished", "nll"] = "not run yet"
    stopped = {True: "yes", False: "no: the cap"}  # a run that reached the cap says so, not a blank
    table["stopped_early"] = [stopped.get(v) if isinstance(v, bool) else v for v in table["stopped_early"]]
    return c.gains, table.drop(columns=["status"]), gain_table(c.curves)


def render_markdown(
    runs: pd.DataFrame,
    tabs: dict[str, pd.DataFrame],
    root: str | Path | None = None,
    training_length: pd.DataFrame | None = None,
    paired: pd.DataFrame | None = None,
    figure4: pd.DataFrame | None = None,
    converged: ConvergedStudy | None = None,
) -> str:
    """Tables 1-4 (with numbered protocol notes), the log-Z estimates, Figure 4's points
    (`figure4`, from `figure4_points`; default: the runs' own) and the converged study's tables
    (`converged`, from `converged.converged_study`)."""
    parts = ["# VAEPP: measured results beside the paper's", "", "## What the study found", ""]
    for label, found in _all_findings(runs, paired, converged).items():
        parts += [f"- **{label}.**"]
        parts += [f"  - {f.text} ([{f.link}](#{f.anchor}))" for f in found]
    parts += [
        "",
        "Paper columns are the paper's numbers; ours "
        "columns are this project's measurements (NLL: mean ± standard error); [n] names a cell's protocol. "
        + not_run_note(),
        "",
    ]
    for df in tabs.values():
        notes = _notes(df)
        parts += [f'<a id="{df.attrs["key"]}"></a>', "", f"## {df.attrs['title']}", "", df.attrs["caption"], ""]
        parts += [_md_table(df, notes), ""]
        parts += [f"[{n}] {text}" for text, n in notes.items()] + [""]
    parts += ['<a id="logz"></a>', "", "## log Z estimates and the NLL under each", "", NOT_A_BOUND, ""]
    parts += [_md_table(logz_table(runs)), ""]
    parts += [f"## {NLL_ESTIMATOR_TITLE}", "", NLL_ESTIMATOR_NOTE, "", _md_table(nll_estimator_table(runs)), ""]
    if paired is not None and len(paired):
        parts += ['<a id="paired"></a>', "", f"## {PAIRED_TITLE}", "", PAIRED_NOTE, ""]
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
    if converged is not None:
        gains, table, curve = _converged_frames(converged)
        parts += ['<a id="converged"></a>', "", f"## {CONVERGED_TITLE} ({converged.source})", ""]
        parts += [f"- {s}" for s in converged.sentences] + ["", GAINS_NOTE, ""]
        parts += [_md_table(gains) if len(gains) else NO_GAIN_YET, ""]
        parts += ["## The converged study's runs", "", CONVERGED_NOTE, "", _md_table(table), ""]
        parts += ["## The gain against epochs", "", GAIN_CURVE_NOTE, ""]
        parts += [_md_table(curve) if len(curve) else NO_GAIN_YET, ""]
    return "\n".join(parts)


_CSS = """body{font-family:sans-serif;margin:24px;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:8px 0 4px;font-size:13px}th,td{border:1px solid #bbb;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#eee}td.ours{background:#eef6ff}td.paper{background:#fafafa}
td.missing{color:#888}small{color:#555}ol.notes{font-size:11px;color:#444}img{max-width:100%}
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
    converged: ConvergedStudy | None = None,
) -> str:
    """One self-contained HTML page: tables, Figure 4 (its points `figure4`, from
    `figure4_points`; default: the runs' own) and 2 analogues, log-Z estimates, the converged
    study (`converged`, from `converged.converged_study`: its tables and the gain against
    epochs), sample grids."""
    root, e = Path(root), html.escape
    out = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
        f"</head><body><h1>{e(title)}</h1>",
        "<h2 id='findings'>What the study found</h2>",
    ]
    for label, found in _all_findings(runs, paired, converged).items():
        items = "".join(f"<li>{e(f.text)} <a href='#{e(f.anchor)}'>({e(f.link)})</a></li>" for f in found)
        out.append(f"<p><b>{e(label)}</b></p><ul>{items}</ul>")
    out.append(
        "<p>Grey columns: the numbers printed in the paper. Blue columns: "
        "this project's measurements (NLL: mean ± standard error over test images and passes), each with its "
        "run and a numbered protocol note (dataset source, sample counts, which log Z, FID protocol). "
        f"{e(not_run_note())}</p>"
    )
    for df in tabs.values():
        notes = _notes(df)
        out += [
            f"<h2 id='{e(df.attrs['key'])}'>{e(df.attrs['title'])}</h2><p><small>{e(df.attrs['caption'])}</small></p>",
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
    if converged is not None:
        gains, table, _ = _converged_frames(converged)
        out += [
            f"<h2 id='converged'>{e(CONVERGED_TITLE)} ({e(converged.source)})</h2>",
            "<ul>" + "".join(f"<li>{e(s)}</li>" for s in converged.sentences) + "</ul>",
            f"<figure class='converged'>{gain_figure(converged.curves)}</figure>",
            f"<p><small>{e(GAIN_CURVE_NOTE)}</small></p>",
            _html_table(gains) if len(gains) else f"<p>{e(NO_GAIN_YET)}</p>",
            f"<p><small>{e(GAINS_NOTE)}</small></p>",
            _html_table(table),
            f"<p><small>{e(CONVERGED_NOTE)}</small></p>",
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
        "<h2 id='logz'>log Z estimates and the NLL under each</h2>",
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
            f"<h2 id='paired'>{e(PAIRED_TITLE)}</h2>",
            f"<p><small>{e(PAIRED_NOTE)}</small></p>",
            _html_table(paired),
        ]
    out.append("<h2>Samples</h2><div class='grids'>")
    for _, r in runs.iterrows():
        if r.get("source", THIS_STUDY) != THIS_STUDY:
            continue  # a committed study keeps metrics only
        pull = r["algorithm"] != "vae"
        sampler = r.get("mala.sampler")
        for key, what in (
            ("grid", f"sampler: {sampler}" if isinstance(sampler, str) else "latent GAN + MALA" if pull else "N(0, I)"),
            ("grid_gan", "GAN-VAEPP: z₀ decoded" if pull else "VAE + latent GAN"),
        ):
            path = r[f"file.{key}"]  # "" when missing
            body = _img(base64.b64encode((root / path).read_bytes()).decode(), what) if path else "<p>not run</p>"
            out.append(f"<figure>{body}<figcaption>{e(r['run'])}: {e(what)}</figcaption></figure>")
    out.append("</div></body></html>")
    return "\n".join(out)
