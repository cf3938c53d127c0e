"""Experiment tracking in MLflow: one parent run per pipeline execution, one child per stage.

The only package of the project that imports mlflow (lazily: a disabled tracker never does, nor
does a stage process, whose tracking process imports it). It sits beside the `vaepp` library, not
in it, because it deals with the outside world: it runs git, probes the store over HTTP or SQLite,
locks files, and runs a process of its own that it talks to through a pipe.

Modules:
- `store`: the store's address, names MLflow accepts, the store probe, git's HEAD, and finding or
  creating the experiment and the parent run (under a file lock);
- `tracker`: `Tracker` and `RunLog`, the tracker of one process, and its failure policy;
- `serve`: the tracking process's loop (requests on stdin, replies on stdout);
- `process`: `TrackerProcess`, the stage's side of that process: Tracker's interface over the pipe.

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
