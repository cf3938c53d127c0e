"""Experiment tracking in MLflow: one parent run per pipeline execution, one child per stage.

The only module of the project that imports mlflow (lazily: a disabled tracker never does).

Store: by default the SQLite file `<root>/mlflow.db` with artifacts under the absolute
`<root>/mlartifacts` (root = DVC_ROOT, so `dvc exp run --temp`/`--queue` copies keep their runs);
experiment "vaepp" tagged mlflow.experimentKind=custom_model_development (classic runs table).
Parent run: named after the DVC experiment (or repro-<HEAD[:8]>-<params sha256[:8]>), found by
its tag `vaepp.pipeline_key` = `exp:<DVC_EXP_NAME>` or `repro:<HEAD>:<params sha256>`, so every
stage process of one execution shares it; creation holds a flock on the SQLite file, and if two
processes still race, all settle on the oldest and the younger duplicate is deleted.
Child run per (stage, run): named "<stage>:<run>", tags mlflow.parentRunId, dvc.stage, dvc.run,
dvc.exp_name, dvc.git_rev; flattened params; metrics per step; artifacts.

Failure policy: tracking never costs a training run. The store is probed at start with a short
timeout (HTTP `/health`; SQLite: a schema read and the write lock); any failure then or later
switches to no-op logging after ONE line on stderr:
    MLflow logging disabled: <why>; metrics are still in the DVC files
Exceptions raised inside a `with` body are never swallowed.

Usage (stages):
    tracker = Tracker.for_pipeline(root, params_path, exp_name=..., tracking_uri=...)
    with tracker.stage_run("train", "vaepp", flat_params) as log:
        log.log_metrics({"elbo": -92.1}, step=epoch)
        log.log_artifact(Path("plots/vaepp/train_curve.csv"))
    with tracker.parent_log() as log:      # the final report stage: logs to the parent run
        log.log_metrics({"vaepp/nll_nats": 88.0})
        log.log_artifacts(Path("reports"))  # and marks the parent FINISHED (FAILED on error)
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import numbers
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

EXPERIMENT = "vaepp"
MAX_KEY, MAX_PARAM, MAX_TAG, BATCH_PARAMS, BATCH_METRICS = 250, 6000, 8000, 100, 1000


def sqlite_uri(root: Path) -> str:
    """`sqlite:////abs/root/mlflow.db`: absolute, so every checkout copy writes one store."""
    return f"sqlite:///{(Path(root).resolve() / 'mlflow.db').as_posix()}"


def mlflow_key(key: str) -> str:
    """A metric/param name MLflow accepts: [\\w./- :], no empty/`.`/`..` path parts, ≤ 250 chars."""
    parts = [p for p in re.sub(r"[^\w./\- :]", "_", str(key)).split("/") if p not in ("", ".", "..")]
    return ("/".join(parts) or "_")[:MAX_KEY]


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def probe(uri: str, timeout_s: float) -> str | None:
    """Why the store at `uri` is unusable (checked within ~timeout_s), or None if it looks fine."""
    try:
        if uri.startswith(("http://", "https://")):
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                return None if resp.status == 200 else f"{uri}/health answered HTTP {resp.status}"
        if (path := _sqlite_path(uri)) is not None:
            con = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
            try:
                con.execute("PRAGMA schema_version").fetchone()  # fails on a non-database file
                con.execute("BEGIN IMMEDIATE")  # fails if another process holds the write lock
                con.execute("ROLLBACK")
            finally:
                con.close()
    except Exception as err:  # noqa: BLE001 - any failure means "do not track"
        return f"{uri}: {_short(err)}"
    return None


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def git_head(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class RunLog:
    """Logging into one MLflow run; every call is a no-op once the tracker is disabled."""

    def __init__(self, tracker: "Tracker", run_id: str | None):
        self.tracker, self.run_id = tracker, run_id

    def _ok(self) -> bool:
        return self.run_id is not None and self.tracker.enabled

    def _batch(self, kind: str, items: list, size: int) -> None:
        for i in range(0, len(items), size):  # MLflow's per-request limits
            self.tracker._call(self.tracker.client.log_batch, self.run_id, **{kind: items[i:i + size]})

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Numeric (and bool) values of `metrics` at `step` (0 if None); others are skipped."""
        if self._ok():
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._batch("metrics", [Metric(mlflow_key(k), float(v), now, int(step or 0))
                                    for k, v in metrics.items() if isinstance(v, numbers.Real)], BATCH_METRICS)

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


class Tracker:
    """The pipeline's tracking state; `Tracker.for_pipeline` builds it, never raising."""

    def __init__(self, client: Any = None, experiment_id: str | None = None, parent_id: str | None = None,
                 tags: dict[str, str] | None = None, reason: str | None = None):
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.tags, self.reason = dict(tags or {}), reason

    @property
    def enabled(self) -> bool:
        return self.client is not None and self.reason is None

    def disable(self, why: str) -> None:
        """Stop logging; print the one warning line the first time."""
        if self.reason is None:
            print(f"MLflow logging disabled: {why}; metrics are still in the DVC files", file=sys.stderr)
        self.reason = self.reason or why

    def _call(self, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs) if self.enabled else None
        except Exception as err:  # noqa: BLE001 - tracking must not stop the stage
            self.disable(_short(err))

    @classmethod
    def for_pipeline(cls, root: Path, params_path: Path, *, exp_name: str = "", git_rev: str | None = None,
                     tracking_uri: str | None = None, experiment: str = EXPERIMENT, enabled: bool = True,
                     timeout_s: float = 3.0) -> "Tracker":
        """Connect to the store and find or create this execution's parent run.

        root: the real repository (DVC_ROOT); default store `sqlite_uri(root)` and artifacts in
        `<root>/mlartifacts`. params_path: the params file whose sha256 keys plain repros.
        exp_name: DVC_EXP_NAME ("" for `dvc repro`). git_rev: defaults to `git rev-parse HEAD`
        in root. enabled=False gives a silent no-op tracker. Never raises: on failure the tracker
        is disabled with one warning line.
        """
        if not enabled:
            return cls(reason="turned off")
        root = Path(root).resolve()
        uri = tracking_uri or sqlite_uri(root)
        why = probe(uri, timeout_s)
        tracker = cls()
        if why:
            tracker.disable(why)
            return tracker
        try:
            rev = git_rev or git_head(root)
            params_hash = hashlib.sha256(Path(params_path).read_bytes()).hexdigest() \
                if Path(params_path).is_file() else "missing"
            exp_name = exp_name.replace("'", "_")
            key = f"exp:{exp_name}" if exp_name else f"repro:{rev}:{params_hash}"
            name = exp_name or f"repro-{rev[:8]}-{params_hash[:8]}"
            tracker.tags = {"dvc.exp_name": exp_name, "dvc.git_rev": rev, "mlflow.source.git.commit": rev,
                            "vaepp.pipeline_key": key, "dvc.params_sha256": params_hash}
            logging.getLogger("alembic").setLevel(logging.WARNING)  # schema-migration chatter
            from mlflow import MlflowClient

            tracker.client = MlflowClient(tracking_uri=uri)
            db = _sqlite_path(uri)  # a local store: artifacts beside it in the repo, a file to lock
            tracker.experiment_id = _experiment(tracker.client, experiment, root / "mlartifacts" if db else None)
            with _lock(db, timeout_s):
                tracker.parent_id = _parent(tracker.client, tracker.experiment_id, key, name, tracker.tags,
                                            params_path)
        except Exception as err:  # noqa: BLE001
            tracker.disable(f"{uri}: {_short(err)}")
        return tracker

    @contextmanager
    def stage_run(self, stage: str, run: str, params: dict[str, Any]) -> Iterator[RunLog]:
        """A child run `<stage>:<run>` of the parent, FINISHED/FAILED/KILLED with the body."""
        tags = {**self.tags, "dvc.stage": stage, "dvc.run": run, "vaepp.role": "stage",
                "mlflow.parentRunId": self.parent_id}
        info = self._call(self.client.create_run, self.experiment_id, run_name=f"{stage}:{run}",
                          tags={k: str(v)[:MAX_TAG] for k, v in tags.items()}) if self.enabled else None
        log = RunLog(self, info.info.run_id if info else None)
        log.log_params(params)
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
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            for run_id in filter(None, run_ids):
                self._call(self.client.set_terminated, run_id, status=status)


def _experiment(client: Any, name: str, artifacts: Path | None) -> str:
    """Id of the experiment `name`, created (absolute artifact root) or restored if needed."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=str(artifacts) if artifacts else None,
                                            tags={"mlflow.experimentKind": "custom_model_development"})
        except Exception:  # noqa: BLE001 - created meanwhile by another stage process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp.tags.get("mlflow.experimentKind") is None:
        client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "custom_model_development")
    return exp.experiment_id


@contextmanager
def _lock(path: Path | None, timeout_s: float) -> Iterator[None]:
    """An advisory flock on the SQLite file while one process finds or creates the parent
    (SQLite's own locks are fcntl locks, independent of flock); after timeout_s, go on unlocked."""
    fd = os.open(path, os.O_RDONLY) if path is not None and path.exists() else None
    deadline = time.monotonic() + timeout_s
    try:
        while fd is not None and time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def _parent(client: Any, experiment_id: str, key: str, name: str, tags: dict, params_path: Path) -> str:
    """Find or create the parent run tagged `vaepp.pipeline_key=key`; the oldest wins a race."""
    query = f"tags.`vaepp.role` = 'parent' and tags.`vaepp.pipeline_key` = '{key}'"

    def oldest() -> list:
        runs = client.search_runs([experiment_id], query, max_results=50, order_by=["attributes.start_time ASC"])
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    found = oldest()
    if found:
        return found[0].info.run_id
    mine = client.create_run(experiment_id, run_name=name,
                             tags={**{k: str(v)[:MAX_TAG] for k, v in tags.items()}, "vaepp.role": "parent"})
    winner = oldest()[0].info.run_id
    if winner != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    elif Path(params_path).is_file():
        client.log_artifact(winner, str(params_path))
    return winner

