"""Experiment tracking in MLflow: one parent run per pipeline execution, one child per stage.

The only module of the project that imports mlflow (lazily: a disabled tracker never does, nor
does a stage process, whose tracking process imports it).

Store: by default the SQLite file `<root>/mlflow.db` with artifacts under the absolute
`<root>/mlartifacts` (root = DVC_ROOT, so `dvc exp run --temp`/`--queue` copies keep their runs);
experiment "vaepp" tagged mlflow.experimentKind=custom_model_development (classic runs table).
Parent run: named after the DVC experiment (or repro-<HEAD[:8]>-<params sha256[:8]>), found by
its tag `vaepp.pipeline_key` = `exp:<DVC_EXP_NAME>` or `repro:<HEAD>:<params sha256>`, so every
stage process of one execution shares it; creation holds a flock on the SQLite file, and if two
processes still race, all settle on the oldest and the younger duplicate is deleted. The parent
carries the execution's shared params (`parent_params`, e.g. `model.zdim`, `profile`, `runs`), so
the runs table compares executions without opening children: every stage process logs those not
yet on it (a value already logged differently, as MLflow forbids changing it, is kept and named
in the tag `vaepp.params_differ`).
Child run per (stage, run): named "<stage>:<run>", tags mlflow.parentRunId, dvc.stage, dvc.run,
dvc.exp_name, dvc.git_rev; flattened params; its dataset as an MLflow dataset input (name,
source, digest; the runs table's "Dataset" column); metrics per step; tags; artifacts.

Failure policy: tracking never costs a training run. The store is probed at start with a short
timeout (HTTP `/health`; SQLite: a schema read and the write lock); any failure then or later
switches to no-op logging after ONE line on stderr:
    MLflow logging disabled: <why>; metrics are still in the DVC files
Exceptions raised inside a `with` body are never swallowed.

In a stage, the same tracker runs in a tracking process of its own (TrackerProcess, started
before the stage imports torch, so that importing mlflow takes the other core): same interface,
same failure policy, and a run is closed when its `with` block exits.

Usage (stages):
    tracker = Tracker.for_pipeline(root, params_path, exp_name=..., tracking_uri=...)
    with tracker.stage_run("train", "vaepp", flat_params, dataset={"name": "mnist", ...}) as log:
        log.set_tags({"vaepp.phase": "training"})
        log.log_metrics({"elbo": -92.1}, step=epoch)
        log.log_artifact(Path("plots/vaepp/train_curve.csv"))
    with tracker.parent_log() as log:      # the final report stage: logs to the parent run
        log.log_metrics({"vaepp/nll_nats": 88.0})
        log.log_artifacts(Path("reports"))  # and marks the parent FINISHED (FAILED on error)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import numbers
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def probe(uri: str, timeout_s: float) -> str | None:
    """Why the store at `uri` is unusable (checked within ~timeout_s), or None if it looks fine."""
    import sqlite3
    import urllib.request

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


def warning_line(why: str) -> str:
    return f"MLflow logging disabled: {why}; metrics are still in the DVC files"


def _print_warning(line: str) -> None:
    print(line, file=sys.stderr)


def git_head(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


@contextmanager
def _ending(end: Callable[[str], None]) -> Iterator[None]:
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
        self.warn = warn or _print_warning  # where the one warning line goes

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
            self.disable(_short(err))

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
            db = _sqlite_path(uri)  # a local store: artifacts beside it in the repo, a file to lock
            tracker.experiment_id = _experiment(tracker.client, experiment, root / "mlartifacts" if db else None)
            with _lock(db, timeout_s):
                tracker.parent_id = _parent(tracker.client, tracker.experiment_id, key, name, tracker.tags, params_path)
                _parent_params(tracker.client, tracker.parent_id, parent_params or {})
        except Exception as err:  # noqa: BLE001
            tracker.disable(f"{uri}: {_short(err)}")
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

        with _ending(end):
            yield


def _experiment(client: Any, name: str, artifacts: Path | None) -> str:
    """Id of the experiment `name`, created (absolute artifact root) or restored if needed."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=str(artifacts) if artifacts else None,
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
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
    mine = client.create_run(
        experiment_id, run_name=name, tags={**{k: str(v)[:MAX_TAG] for k, v in tags.items()}, "vaepp.role": "parent"}
    )
    winner = oldest()[0].info.run_id
    if winner != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    elif Path(params_path).is_file():
        client.log_artifact(winner, str(params_path))
    return winner


def _parent_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """Log on the parent the params not yet on it. MLflow refuses to change a logged value (and
    accepts the same value again, so stage processes racing here are fine); a differing value is
    kept and its key named in the tag `vaepp.params_differ`."""
    from mlflow.entities import Param

    wanted = {mlflow_key(k): str(v)[:MAX_PARAM] for k, v in params.items()}
    logged = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in wanted.items() if k not in logged]
    for i in range(0, len(new), BATCH_PARAMS):
        client.log_batch(run_id, params=new[i : i + BATCH_PARAMS])
    differ = sorted(k for k, v in wanted.items() if k in logged and logged[k] != v)
    if differ:
        client.set_tag(run_id, "vaepp.params_differ", ", ".join(differ)[:MAX_TAG])


# ----- the same tracker in a process of its own --------------------------------------------------
# `import mlflow` and its SQLAlchemy store take 1.5-2.5 s of one core, and `import torch` in a stage
# leaves the machine's other core idle for about as long. So a stage process starts a tracking
# process first (TrackerProcess.start) that imports mlflow while the stage imports torch; the stage
# then talks to it through one JSON request per line on its stdin. Requests after the first
# ("open": the arguments of Tracker.for_pipeline) are not answered, except "end" (the end of a run,
# so that a run is closed when its `with` block exits); warnings come back on its stdout.
END_TIMEOUT_S = 120.0  # longest wait for the tracking process to close a run (artifacts included)
OPEN_TIMEOUT_S = 60.0  # longest wait for its answer to "open" (imports and store probe included)


def serve() -> None:
    """The tracking process's loop (`TrackerProcess` starts it): requests on stdin, replies on
    stdout, mlflow's own log lines on stderr. A stage that goes away mid-run leaves it KILLED."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the replies
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the stage, which ends the run

    def send(**msg: Any) -> None:
        replies.write(json.dumps(msg) + "\n")
        replies.flush()

    try:  # the imports Tracker.for_pipeline needs, before the stage asks
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow import MlflowClient  # noqa: F401
        from mlflow.entities import Metric, Param  # noqa: F401

        if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except Exception:  # noqa: BLE001 - Tracker.for_pipeline reports it
        pass
    tracker, run = Tracker(reason="not opened"), None
    log = RunLog(tracker, None)
    for line in sys.stdin:
        op = None
        try:
            req = json.loads(line)
            op = req.pop("op")
            if op == "open":
                tracker = Tracker.for_pipeline(
                    Path(req.pop("root")), Path(req.pop("params_path")), **req, warn=lambda text: send(warning=text)
                )
                send(
                    opened={
                        "enabled": tracker.enabled,
                        "reason": tracker.reason,
                        "tags": tracker.tags,
                        "parent_id": tracker.parent_id,
                        "experiment_id": tracker.experiment_id,
                    }
                )
            elif op in ("stage_run", "parent_log"):
                run = tracker.stage_run(**req) if op == "stage_run" else tracker.parent_log()
                log = run.__enter__()
            elif op == "log":
                getattr(log, req["method"])(*req["args"])
            elif op == "end":
                run, ending = None, run
                _end(ending, req["status"])
        except Exception as err:  # noqa: BLE001 - a bad request must not end the stage's tracking
            tracker.disable(f"tracking process: {_short(err)}")
        if op == "end":
            send(ended=True)
    _end(run, "KILLED")  # the stage went away inside a run
    import gc

    gc.freeze()  # exit without walking mlflow's object graph once more (see stages/common.py)


def _end(run: Any, status: str) -> None:
    """Leave a stage_run/parent_log context as the stage's `with` block ended: FINISHED, FAILED or KILLED."""
    if run is None:
        return
    err = {"FINISHED": None, "FAILED": RuntimeError("the stage failed"), "KILLED": KeyboardInterrupt()}[status]
    run.__exit__(type(err) if err else None, err, None)  # runs end with `status`; nothing is raised here


class TrackerProcess:
    """A Tracker in a process of its own, for stage scripts: `stage_run` and `parent_log` as
    Tracker's, every call returns at once except a run's end. Failure policy as Tracker's: one
    warning line on stderr (also if the process dies or stops answering), then no-op logging."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self._buf, self._info, self._replies = proc, b"", None, {}
        self.reason: str | None = None
        self._warned = self._used = self._pending = False

    @classmethod
    def start(cls, code_root: Path) -> TrackerProcess:
        """Start the process (it imports mlflow at once); `open` it once the stage knows its params.
        code_root: the directory holding the `vaepp` package."""
        code = f"import sys; sys.path.insert(0, {str(code_root)!r}); from vaepp.tracking import serve; serve()"
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self = cls(proc)
        import atexit

        atexit.register(self.close)
        return self

    def open(self, root: Path, params_path: Path, **kwargs: Any) -> TrackerProcess:
        """Find or create the parent run, as Tracker.for_pipeline(root, params_path, **kwargs)."""
        self._used = True
        self._send(op="open", root=str(Path(root).resolve()), params_path=str(Path(params_path).resolve()), **kwargs)
        return self

    # --- Tracker's interface
    @property
    def enabled(self) -> bool:
        return self._opened().get("enabled", False) and self.reason is None

    @property
    def tags(self) -> dict[str, str]:
        return self._opened().get("tags") or {}

    @property
    def parent_id(self) -> str | None:
        return self._opened().get("parent_id")

    @property
    def experiment_id(self) -> str | None:
        return self._opened().get("experiment_id")

    def disable(self, why: str) -> None:
        if not self._warned:
            _print_warning(warning_line(why))
        self._warned = True
        self.reason = self.reason or why

    @contextmanager
    def stage_run(
        self, stage: str, run: str, params: dict[str, Any], dataset: dict[str, str] | None = None
    ) -> Iterator[_RemoteLog]:
        """A child run `<stage>:<run>` of the parent, FINISHED/FAILED/KILLED with the body."""
        self._send(
            op="stage_run",
            stage=stage,
            run=run,
            params={str(k): str(v) for k, v in params.items()},
            dataset={str(k): str(v) for k, v in dataset.items()} if dataset else None,
        )
        with self._finishing():
            yield _RemoteLog(self)

    @contextmanager
    def parent_log(self) -> Iterator[_RemoteLog]:
        """Log to the parent run itself; marks it FINISHED on exit (FAILED on error)."""
        self._send(op="parent_log")
        with self._finishing():
            yield _RemoteLog(self)

    def close(self, timeout_s: float = 30.0) -> None:
        """End the process's input. Never opened (a stage that does not track): kill it. With
        requests sent since the last run's end: wait up to timeout_s for it to carry them out,
        then kill it. Otherwise every run is closed already: let it exit on its own."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                if not self._used or self._pending:
                    self.proc.wait(timeout=timeout_s if self._used else 0.0)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode is not None:
            self._drain()

    # --- the pipe
    @contextmanager
    def _finishing(self) -> Iterator[None]:
        """Ask the tracking process to end the open run with the body's status (`_ending`)."""

        def end(status: str) -> None:
            self._send(op="end", status=status)
            if self._wait("ended", END_TIMEOUT_S):
                self._pending = False

        with _ending(end):
            yield

    def _send(self, **msg: Any) -> None:
        if self.reason is not None:
            return
        self._pending = True
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except (OSError, ValueError) as err:
            self.disable(f"the tracking process ended ({_short(err)})")

    def _opened(self) -> dict:
        if self._info is None:
            self._info = self._wait("opened", OPEN_TIMEOUT_S) or {}
        return self._info

    def _wait(self, key: str, timeout_s: float) -> Any:
        """Read replies until one holds `key` and return its value; None after a failure."""
        deadline = time.monotonic() + timeout_s
        while self.reason is None or key == "opened":
            value = self._take(key)
            if value is not None:
                return value
            if self.proc.stdout.closed:
                return None
            left = deadline - time.monotonic()
            ready = select.select([self.proc.stdout], [], [], max(left, 0.0))[0] if left > 0 else []
            if not ready:
                self.disable(f"the tracking process did not answer within {timeout_s:.0f} s")
                self.proc.kill()
                return None
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                self.proc.stdout.close()
                self.disable(f"the tracking process ended (exit code {self.proc.wait()})")
                return None
            self._buf += chunk
        return None

    def _take(self, key: str) -> Any:
        """Handle the complete replies received so far; the value of the first holding `key`."""
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "warning" in msg:  # the process's tracker disabled itself: print its one line
                text = msg.pop("warning")
                if not self._warned:
                    _print_warning(text)
                self._warned = True
                self.reason = self.reason or "disabled in the tracking process"
            self._replies.update(msg)  # kept until asked for ("opened" may come while waiting for "ended")
        return self._replies.pop(key, None)

    def _drain(self) -> None:
        """Print a warning still in the pipe after the process ended."""
        if not self.proc.stdout.closed:
            try:
                self._buf += self.proc.stdout.read() or b""
            except (OSError, ValueError):
                pass
            self._take("-")


class _RemoteLog:
    """RunLog's interface, sent to the tracking process (numbers as floats, params as strings)."""

    def __init__(self, tracker: TrackerProcess):
        self.tracker = tracker

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        values = {str(k): float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}
        self.tracker._send(op="log", method="log_metrics", args=[values, None if step is None else int(step)])

    def log_params(self, params: dict[str, Any]) -> None:
        self.tracker._send(op="log", method="log_params", args=[{str(k): str(v) for k, v in params.items()}])

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        self.tracker._send(op="log", method="log_artifact", args=[str(path), artifact_path])

    log_artifacts = log_artifact

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tracker._send(op="log", method="set_tags", args=[{str(k): str(v) for k, v in tags.items()}])

    def log_dataset(self, name: str, source: str, digest: str, context: str = "") -> None:
        self.tracker._send(op="log", method="log_dataset", args=[str(name), str(source), str(digest), str(context)])
