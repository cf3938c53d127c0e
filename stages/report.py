"""report: every run's metrics beside the paper's Tables 1-4, as one offline HTML page and for pandas.

Outputs in --out: index.html (self-contained: what the study found, tables, dim-z plot, the
converged study, training curves, log-Z estimates, sample grids), tables.md, metrics.csv (one row
per run, committed studies' runs of --table-study included, each with its `source`), dimz/ and
converged/ (Figure 4's lines and the converged study's gain against epochs, for `dvc plots`). Inputs are path patterns
from dvc.yaml (`vaepp.report.collect`). Also logs the report and the headline metrics to the
pipeline's MLflow parent run. Runs whose metrics are missing show "not run"; the stage fails only
on unreadable params or corrupt metrics files.
"""

from __future__ import annotations

from pathlib import Path

from stages import cli, track
from stages.boot import boot

PATTERNS = {
    "metrics": "{run} and {kind}",
    "meta": "{dataset}",
    "train_curve": "{run}",
    "grid": "{run}",
    "grid_gan": "{run}",
}


def _main(argv: list[str] | None) -> int:
    p = cli.parser(__doc__.splitlines()[0], run=False, paths=("out",))
    for name, fields in PATTERNS.items():
        p.add_argument(f"--{name.replace('_', '-')}", required=True, help=f"path pattern with {fields}")
    p.add_argument("--per-image", help="path pattern with {run} of estimate-nll's per-image NLL files (optional)")
    p.add_argument("--dimz-study", help="directory of a committed dim-z study for Figure 4 (optional)")
    p.add_argument(
        "--table-study",
        action="append",
        default=[],
        help="directory of a committed study whose runs fill the tables beside this study's (repeatable)",
    )
    p.add_argument(
        "--converged-study",
        help="directory of the committed converged study: its tables and the gain against epochs (optional)",
    )
    p.add_argument(
        "--training-length",
        help="path pattern with {variant} and {run} of the training-length study's curves and nll.json (optional)",
    )
    args = p.parse_args(argv)
    from vaepp.config import load_params

    params = load_params(args.params)  # validate before the heavy imports
    import pandas as pd

    from vaepp import report
    from vaepp.files import atomic_write_text

    files = {name: getattr(args, name) for name in PATTERNS}
    if args.per_image:
        files["per_image"] = args.per_image
    own = report.collect(Path("."), params, files)
    dimz = report.dimz_study_points(Path("."), args.dimz_study, params, files) if args.dimz_study else None
    figure4 = report.figure4_points(own, dimz, Path("."), args.per_image)
    studies = [report.study_runs(Path("."), study, params, files) for study in args.table_study]
    runs = pd.concat([own, *(s for s in studies if len(s))], ignore_index=True)  # every table's runs
    tabs = report.tables(runs)
    study = report.training_length_table(Path("."), args.training_length) if args.training_length else None
    paired = report.paired_table(Path("."), runs, args.per_image) if args.per_image else None
    converged = None
    if args.converged_study:
        ten = report.ten_epoch_gains(paired, own)
        converged = report.converged_study(Path("."), args.converged_study, params, files, ten)
    out = args.out
    atomic_write_text(
        out / "index.html",
        report.render_html(
            runs,
            tabs,
            Path("."),
            title=f"VAEPP reproduction — profile “{params.profile}”",
            training_length=study,
            paired=paired,
            figure4=figure4,
            converged=converged,
        ),
    )
    md = report.render_markdown(runs, tabs, Path("."), study, paired, figure4, converged=converged)
    atomic_write_text(out / "tables.md", md)
    atomic_write_text(out / "metrics.csv", runs.to_csv(index=False))
    (out / "dimz").mkdir(parents=True, exist_ok=True)
    for name, line in report.dimz_series(figure4).items():  # for `dvc plots`
        atomic_write_text(out / "dimz" / name, line.to_csv(index=False))
    if args.converged_study:  # the gain against epochs, one file per prior, for `dvc plots`
        (out / "converged").mkdir(parents=True, exist_ok=True)
        series = report.gain_series(converged.curves) if converged else {}
        for name, line in series.items():
            atomic_write_text(out / "converged" / name, line.to_csv(index=False))
    with track.tracker(args.params).parent_log() as log:
        log.log_metrics(report.headline_metrics(runs))
        for name in ("index.html", "tables.md", "metrics.csv"):
            log.log_artifact(out / name, "report")
    done = [r for r, ok in zip(runs["run"], runs["has_nll"] | runs["has_fid"], strict=True) if ok]
    print(f"report: {len(runs)} runs ({len(done)} with NLL or FID) → {out}/index.html, tables.md, metrics.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    boot()
    return cli.guarded(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
