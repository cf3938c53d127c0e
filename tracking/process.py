"""`TrackerProcess`: the stage's side of the tracking process (`tracking.serve`), with Tracker's
interface; every call is one JSON line down the pipe and returns at once, except a run's end.
"""

from __future__ import annotations

import json
import numbers
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tracking.store import print_warning, short_error, warning_line
from tracking.tracker import ending

END_TIMEOUT_S = 120.0  # longest wait for the tracking process to close a run (artifacts included)
OPEN_TIMEOUT_S = 60.0  # longest wait for its answer to "open" (imports and store probe included)


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
        code_root: the directory holding the `tracking` package (the repository root). The process
        keeps this process's working directory, so that relative artifact paths name the same files."""
        code = f"import sys; sys.path.insert(0, {str(code_root)!r}); from tracking.serve import serve; serve()"
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
            print_warning(warning_line(why))
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
        """Ask the tracking process to end the open run with the body's status (`ending`)."""

        def end(status: str) -> None:
            self._send(op="end", status=status)
            if self._wait("ended", END_TIMEOUT_S):
                self._pending = False

        with ending(end):
            yield

    def _send(self, **msg: Any) -> None:
        if self.reason is not None:
            return
        self._pending = True
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except (OSError, ValueError) as err:
            self.disable(f"the tracking process ended ({short_error(err)})")

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
                    print_warning(text)
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
