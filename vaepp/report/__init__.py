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

The modules, each importing only those before it: `rows` (reading one run's row), `collect` (the
run table, a committed study's runs, per-image files, headline metrics), `paper_tables` (Tables
1-4), `dimz` (Figure 4's points), `estimates` (log-Z and NLL-estimator tables), `studies` (log-Z
monitor, paired and training-length tables), `findings` (the sentences that open the report),
`converged` (the converged study: its tables, gains and gain against epochs), `figures`
(matplotlib), `render` (Markdown and HTML). This package exposes the names callers use,
so `from vaepp import report; report.collect(...)` reads as before.
"""

from vaepp.paper_numbers import NOT_A_BOUND

from .collect import FILE_KEYS, KINDS, THIS_STUDY, collect, headline_metrics, per_image_nll, per_image_table, study_runs
from .converged import (
    CONVERGED_NOTE,
    GAIN_CURVE_NOTE,
    GAINS_NOTE,
    ConvergedStudy,
    converged_findings,
    converged_gains,
    converged_study,
    converged_table,
    gain_curves,
    gain_series,
    ten_epoch_gains,
)
from .dimz import DIMZ_NOTE, dimz_points, dimz_series, dimz_study_points, figure4_points
from .estimates import NLL_ESTIMATOR_NOTE, NLL_ESTIMATOR_TITLE, logz_table, nll_estimator_table
from .figures import (
    CURVE_PANELS,
    EARLIER_LEGEND,
    NLL_MARKERS,
    OTHER_LEGEND,
    curves_figure,
    dimz_figure,
    figure_id,
    gain_figure,
)
from .findings import Finding, findings
from .paper_tables import (
    NOT_RUN,
    PAPER_FID_MIN_REFERENCE,
    PAPER_FID_SAMPLES,
    Measured,
    measure,
    not_run_note,
    tables,
)
from .render import render_html, render_markdown
from .rows import EARLIER_PROPOSAL
from .studies import (
    MONITOR_IMAGES,
    MONITOR_NLL,
    MONITOR_NOTE,
    PAIRED_NOTE,
    TRAINING_LENGTH_NOTE,
    monitor_table,
    paired_table,
    training_length_table,
)

__all__ = [
    "CONVERGED_NOTE",
    "CURVE_PANELS",
    "DIMZ_NOTE",
    "EARLIER_LEGEND",
    "EARLIER_PROPOSAL",
    "FILE_KEYS",
    "GAINS_NOTE",
    "GAIN_CURVE_NOTE",
    "KINDS",
    "MONITOR_IMAGES",
    "MONITOR_NLL",
    "MONITOR_NOTE",
    "NLL_ESTIMATOR_NOTE",
    "NLL_ESTIMATOR_TITLE",
    "NLL_MARKERS",
    "NOT_A_BOUND",
    "NOT_RUN",
    "OTHER_LEGEND",
    "PAIRED_NOTE",
    "PAPER_FID_MIN_REFERENCE",
    "PAPER_FID_SAMPLES",
    "THIS_STUDY",
    "TRAINING_LENGTH_NOTE",
    "ConvergedStudy",
    "Finding",
    "Measured",
    "collect",
    "converged_findings",
    "converged_gains",
    "converged_study",
    "converged_table",
    "curves_figure",
    "dimz_figure",
    "dimz_points",
    "dimz_series",
    "dimz_study_points",
    "figure4_points",
    "figure_id",
    "findings",
    "gain_curves",
    "gain_figure",
    "gain_series",
    "headline_metrics",
    "logz_table",
    "measure",
    "monitor_table",
    "nll_estimator_table",
    "not_run_note",
    "paired_table",
    "per_image_nll",
    "per_image_table",
    "render_html",
    "render_markdown",
    "study_runs",
    "tables",
    "ten_epoch_gains",
    "training_length_table",
]
