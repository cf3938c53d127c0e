"""The MLflow store: its address, the names it accepts, its health, and the experiment and the
parent run every stage process of one pipeline execution shares.

The functions that talk to the store take an MlflowClient made by the caller (`tracker`); mlflow
itself is imported only inside the one that needs its entities. `git_head` runs
`git rev-parse HEAD`, which keys the parent run of a plain `dvc repro`.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
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


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store (a file to lock, artifacts beside it); None for
    any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def probe(uri: str, timeout_s: float) -> str | None:
    """Why the store at `uri` is unusable (checked within ~timeout_s), or None if it looks fine."""
    import sqlite3
    import urllib.request

    try:
        if uri.startswith(("http://", "https://")):
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                return None if resp.status == 200 else f"{uri}/health answered HTTP {resp.status}"
        if (path := sqlite_path(uri)) is not None:
            con = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
            try:
                con.execute("PRAGMA schema_version").fetchone()  # fails on a non-database file
                con.execute("BEGIN IMMEDIATE")  # fails if another process holds the write lock
                con.execute("ROLLBACK")
            finally:
                con.close()
    except Exception as err:  # noqa: BLE001 - any failure means "do not track"
        return f"{uri}: {short_error(err)}"
    return None


def short_error(err: BaseException) -> str:
    """`<type>: <first line>` of an exception: what the one warning line names."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def warning_line(why: str) -> str:
    """The one line printed when tracking turns itself off."""
    return f"MLflow logging disabled: {why}; metrics are still in the DVC files"


def print_warning(line: str) -> None:
    """Where the warning goes by default: stderr (stdout carries each stage's one-line result)."""
    print(line, file=sys.stderr)


def git_head(root: Path) -> str:
    """`git rev-parse HEAD` in root, or "unknown" outside a git checkout or without git."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def find_experiment(client: Any, name: str, artifacts: Path | None) -> str:
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
def parent_lock(path: Path | None, timeout_s: float) -> Iterator[None]:
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


def find_parent(client: Any, experiment_id: str, key: str, name: str, tags: dict, params_path: Path) -> str:
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


def log_parent_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
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
