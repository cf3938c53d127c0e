"""The tracker of one process: `Tracker` (the pipeline's parent run and a child run per stage) and
`RunLog` (logging into one run), with the failure policy of the package (`tracking`): any trouble
turns logging into no-ops after one warning line, and never raises into the stage.
"""

from __future__ import annotations

import hashlib
import logging
import numbers
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tracking.store import (
    BATCH_METRICS,
    BATCH_PARAMS,
    EXPERIMENT,
    MAX_PARAM,
    MAX_TAG,
    find_experiment,
    find_parent,
    git_head,
    log_parent_params,
    mlflow_key,
    parent_lock,
    print_warning,
    probe,
    short_error,
    sqlite_path,
    sqlite_uri,
    warning_line,
)


@contextmanager
def ending(end: Callable[[str], None]) -> Iterator[None]:
    """Call end(status) after the body: FINISHED, KILLED on Ctrl-C, FAILED on any other
    exception (which propagates)."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        end(status)


class RunLog:
    """Logging into one MLflow run; every call is a no-op once the tracker is disabled."""

    def __init__(self, tracker: Tracker, run_id: str | None):
        self.tracker, self.run_id = tracker, run_id

    def _ok(self) -> bool:
        return self.run_id is not None and self.tracker.enabled

    def _batch(self, kind: str, items: list, size: int) -> None:
        for i in range(0, len(items), size):  # MLflow's per-request limits
            self.tracker._call(self.tracker.client.log_batch, self.run_id, **{kind: items[i : i + size]})

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Numeric (and bool) values of `metrics` at `step` (0 if None); others are skipped."""
        if self._ok():
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._batch(
                "metrics",
                [
                    Metric(mlflow_key(k), float(v), now, int(step or 0))
                    for k, v in metrics.items()
                    if isinstance(v, numbers.Real)
                ],
                BATCH_METRICS,
            )

    def log_params(self, params: dict[str, Any]) -> None:
        """Params as strings truncated to MLflow's 6000 characters."""
        if self._ok():
            from mlflow.entities import Param

            unique = {mlflow_key(k): str(v)[:MAX_PARAM] for k, v in params.items()}  # no duplicate keys
            self._batch("params", [Param(k, v) for k, v in unique.items()], BATCH_PARAMS)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Copy a file (or a directory's contents) into the run's artifacts."""
        path = Path(path)
        if self._ok() and not path.exists():
            print(f"MLflow: {path} does not exist; not logged as an artifact", file=sys.stderr)
        elif self._ok():
            fn = self.tracker.client.log_artifacts if path.is_dir() else self.tracker.client.log_artifact
            self.tracker._call(fn, self.run_id, str(path), artifact_path)

    log_artifacts = log_artifact  # a directory's files, under artifact_path

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Tags of the run (values as strings, truncated to MLflow's 8000 characters)."""
        if self._ok():
            from mlflow.entities import RunTag

            self._batch("tags", [RunTag(mlflow_key(k), str(v)[:MAX_TAG]) for k, v in tags.items()], BATCH_PARAMS)

    def log_dataset(self, name: str, source: str, digest: str, context: str = "") -> None:
        """The run's dataset as an MLflow dataset input: `name` (e.g. "mnist"), `source` (a JSON
        string, source type "local"), `digest` (MLflow keys a dataset by name and digest, so the
        first source logged with a digest is the one shown), `context` (tag mlflow.data.context)."""
        if self._ok():
            from mlflow.entities import Dataset, DatasetInput, InputTag

            tags = [InputTag("mlflow.data.context", context)] if context else []
            dataset = Dataset(name=name, digest=digest, source_type="local", source=source)
            self.tracker._call(self.tracker.client.log_inputs, self.run_id, [DatasetInput(dataset, tags)])


class Tracker:
    """The pipeline's tracking state; `Tracker.for_pipeline` builds it, never raising."""

    def __init__(
        self,
        client: Any = None,
        experiment_id: str | None = None,
        parent_id: str | None = None,
        tags: dict[str, str] | None = None,
        reason: str | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.tags, self.reason = dict(tags or {}), reason
        self.warn = warn or print_warning  # where the one warning line goes

    @property
    def enabled(self) -> bool:
        return self.client is not None and self.reason is None

    def disable(self, why: str) -> None:
        """Stop logging; print the one warning line the first time."""
        if self.reason is None:
            self.warn(warning_line(why))
        self.reason = self.reason or why

    def _call(self, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs) if self.enabled else None
        except Exception as err:  # noqa: BLE001 - tracking must not stop the stage
            self.disable(short_error(err))

    @classmethod
    def for_pipeline(
        cls,
        root: Path,
        params_path: Path,
        *,
        exp_name: str = "",
        git_rev: str | None = None,
        tracking_uri: str | None = None,
        experiment: str = EXPERIMENT,
        enabled: bool = True,
        timeout_s: float = 3.0,
        warn: Callable[[str], None] | None = None,
        parent_params: dict[str, Any] | None = None,
    ) -> Tracker:
        """Connect to the store and find or create this execution's parent run.

        root: the real repository (DVC_ROOT); default store `sqlite_uri(root)` and artifacts in
        `<root>/mlartifacts`. params_path: the params file whose sha256 keys plain repros.
        exp_name: DVC_EXP_NAME ("" for `dvc repro`). git_rev: defaults to `git rev-parse HEAD`
        in root. parent_params: the execution's shared params, logged on the parent run (those
        already there are left as they are). enabled=False gives a silent no-op tracker. Never
        raises: on failure the tracker is disabled with one warning line, passed to `warn`
        (default: printed on stderr).
        """
        if not enabled:
            return cls(reason="turned off")
        root = Path(root).resolve()
        uri = tracking_uri or sqlite_uri(root)
        why = probe(uri, timeout_s)
        tracker = cls(warn=warn)
        if why:
            tracker.disable(why)
            return tracker
        try:
            rev = git_rev or git_head(root)
            params_hash = (
                hashlib.sha256(Path(params_path).read_bytes()).hexdigest() if Path(params_path).is_file() else "missing"
            )
            exp_name = exp_name.replace("'", "_")
            key = f"exp:{exp_name}" if exp_name else f"repro:{rev}:{params_hash}"
            name = exp_name or f"repro-{rev[:8]}-{params_hash[:8]}"
            tracker.tags = {
                "dvc.exp_name": exp_name,
                "dvc.git_rev": rev,
                "mlflow.source.git.commit": rev,
                "vaepp.pipeline_key": key,
                "dvc.params_sha256": params_hash,
            }
            logging.getLogger("alembic").setLevel(logging.WARNING)  # schema-migration chatter
            from mlflow import MlflowClient

            tracker.client = MlflowClient(tracking_uri=uri)
            db = sqlite_path(uri)  # a local store: artifacts beside it in the repo, a file to lock
            tracker.experiment_id = find_experiment(tracker.client, experiment, root / "mlartifacts" if db else None)
            with parent_lock(db, timeout_s):
                tracker.parent_id = find_parent(
                    tracker.client, tracker.experiment_id, key, name, tracker.tags, params_path
                )
                log_parent_params(tracker.client, tracker.parent_id, parent_params or {})
        except Exception as err:  # noqa: BLE001
            tracker.disable(f"{uri}: {short_error(err)}")
        return tracker

    @contextmanager
    def stage_run(
        self, stage: str, run: str, params: dict[str, Any], dataset: dict[str, str] | None = None
    ) -> Iterator[RunLog]:
        """A child run `<stage>:<run>` of the parent, FINISHED/FAILED/KILLED with the body.
        dataset: RunLog.log_dataset's arguments (name, source, digest, context), or None."""
        tags = {
            **self.tags,
            "dvc.stage": stage,
            "dvc.run": run,
            "vaepp.role": "stage",
            "mlflow.parentRunId": self.parent_id,
        }
        info = (
            self._call(
                self.client.create_run,
                self.experiment_id,
                run_name=f"{stage}:{run}",
                tags={k: str(v)[:MAX_TAG] for k, v in tags.items()},
            )
            if self.enabled
            else None
        )
        log = RunLog(self, info.info.run_id if info else None)
        log.log_params(params)
        if dataset:
            log.log_dataset(**dataset)
        if log.run_id:
            self._call(self.client.update_run, self.parent_id, status="RUNNING")
        with self._finishing(log.run_id, log.run_id and self.parent_id):
            yield log

    @contextmanager
    def parent_log(self) -> Iterator[RunLog]:
        """Log to the parent run itself (the final report stage); marks it FINISHED on exit."""
        run_id = self.parent_id if self.enabled else None
        with self._finishing(run_id):
            yield RunLog(self, run_id)

    @contextmanager
    def _finishing(self, *run_ids: str | None) -> Iterator[None]:
        """End the runs FINISHED, or FAILED/KILLED if the body raises (the exception propagates)."""

        def end(status: str) -> None:
            for run_id in filter(None, run_ids):
                self._call(self.client.set_terminated, run_id, status=status)

        with ending(end):
            yield
