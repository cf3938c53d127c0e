"""The stages' MLflow tracking: which tracker a stage gets, its child run, the numbers it logs.

Tracking itself (the store, the parent and child runs, the tracking process) is the `tracking`
package; this module is the stage side of it that reads the environment (VAEPP_MLFLOW, DVC_ROOT,
DVC_EXP_NAME, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME) and holds the tracking process that
`stages.boot.boot()` started, until the stage knows its params.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

_PROCESS = None  # the tracking process boot() started (a TrackerProcess), until tracker() takes it


def tracking_on(environ=None) -> bool:
    """False when VAEPP_MLFLOW turns MLflow tracking off (0, false, no, off); environ defaults to
    os.environ."""
    environ = os.environ if environ is None else environ
    return environ.get("VAEPP_MLFLOW", "1").strip().lower() not in ("0", "false", "no", "off")


def tracking_root() -> Path:
    """The real repository (DVC_ROOT), also for `dvc exp run --temp` copies, so the MLflow
    database at its root keeps every run."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def adopt_process(process) -> None:
    """Keep the tracking process `stages.boot.boot()` started (or None) for `tracker()`."""
    global _PROCESS
    _PROCESS = process


def tracker(params_path: str):
    """The pipeline's MLflow tracker (degrades to no logging with a warning if MLflow fails).

    Environment: DVC_EXP_NAME keys the parent run; MLFLOW_TRACKING_URI overrides the SQLite
    store at the repository root; MLFLOW_EXPERIMENT_NAME overrides "vaepp"; VAEPP_MLFLOW=0
    turns tracking off. In a stage's own process the tracker runs in the tracking process
    started by `boot()` (same interface, same failure policy), which serves one tracker; elsewhere
    in this process.
    """
    global _PROCESS
    from stages.inputs import shared_params
    from tracking.store import EXPERIMENT
    from tracking.tracker import Tracker

    settings = dict(
        exp_name=os.environ.get("DVC_EXP_NAME", ""),
        git_rev=os.environ.get("DVC_EXP_BASELINE_REV") or None,
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
        experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT,
        parent_params=shared_params(params_path) if tracking_on() else {},
    )
    if _PROCESS is not None and tracking_on():
        proc, _PROCESS = _PROCESS, None
        return proc.open(tracking_root(), Path(params_path), **settings)
    return Tracker.for_pipeline(tracking_root(), params_path=Path(params_path), enabled=tracking_on(), **settings)


def numbers(metrics: dict) -> dict:
    """The numeric leaves of a (nested) metrics dict, flattened with dots; booleans left out."""
    from vaepp.files import flat

    return {k: v for k, v in flat(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextmanager
def stage_run(args, stage: str, run, params: dict, ctx=None, dataset: dict | None = None):
    """The stage's MLflow child run (a context manager giving its log), with `params` flattened,
    `dataset` (`stages.inputs.dataset_input`) as its dataset input and the tags vaepp.prior (the
    run's `prior`) and vaepp.method (`resolve.method`: the paper's name, or the prior's), so every
    prior can be told apart by name; on ranks other than 0 a silent no-op."""
    from vaepp.files import flat
    from vaepp.resolve import method

    if ctx is not None and not ctx.is_writer:
        from tracking.tracker import Tracker

        with Tracker(reason=f"rank {ctx.rank}").stage_run(stage, run.name, {}) as log:
            yield log
        return
    with tracker(args.params).stage_run(stage, run.name, flat(params), dataset=dataset) as log:
        log.set_tags({"vaepp.prior": run.prior, "vaepp.method": method(run)})
        yield log


def progress_logger(log, ctx=None):
    """The evaluation protocols' `callback` (vaepp.evaluate): each progress value logged at once
    to the stage's MLflow run `log` as metric `name` at `step`; None on ranks other than 0, so
    that only the writing rank logs."""
    if ctx is not None and not ctx.is_writer:
        return None
    return lambda name, value, step: log.log_metrics({name: value}, step=step)
