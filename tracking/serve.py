"""The tracking process: a `Tracker` in a process of its own, driven by the stage through a pipe.

`import mlflow` and its SQLAlchemy store take 1.5-2.5 s of one core, and `import torch` in a stage
leaves the machine's other core idle for about as long. So a stage process starts a tracking
process first (`tracking.process.TrackerProcess.start`) that imports mlflow while the stage imports
torch; the stage then talks to it through one JSON request per line on its stdin. Requests after
the first ("open": the arguments of Tracker.for_pipeline) are not answered, except "end" (the end
of a run, so that a run is closed when its `with` block exits); warnings come back on its stdout.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tracking.store import short_error
from tracking.tracker import RunLog, Tracker


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
            tracker.disable(f"tracking process: {short_error(err)}")
        if op == "end":
            send(ended=True)
    _end(run, "KILLED")  # the stage went away inside a run
    import gc

    gc.freeze()  # exit without walking mlflow's object graph once more (see stages/boot.py)


def _end(run: Any, status: str) -> None:
    """Leave a stage_run/parent_log context as the stage's `with` block ended: FINISHED, FAILED or KILLED."""
    if run is None:
        return
    err = {"FINISHED": None, "FAILED": RuntimeError("the stage failed"), "KILLED": KeyboardInterrupt()}[status]
    run.__exit__(type(err) if err else None, err, None)  # runs end with `status`; nothing is raised here
