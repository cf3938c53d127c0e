"""MLflow tracking: runs found through MLflow's own API; trouble degrades to one warning line."""

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from stage_helpers import RUN, VAE, params, train_cmd, workspace
from stage_helpers import env as stage_env
from tracking.store import mlflow_key, sqlite_uri
from tracking.tracker import Tracker

ROOT = Path(__file__).resolve().parents[1]
WARNING = "MLflow logging disabled:"
TAIL = "metrics are still in the DVC files"


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "params.yaml").write_text("model:\n  zdim: 16\n")
    return tmp_path


def tracker(repo, **kw):
    kw.setdefault("git_rev", "0123456789abcdef")
    return Tracker.for_pipeline(repo, repo / "params.yaml", **kw)


def runs(repo):
    import mlflow

    mlflow.set_tracking_uri(sqlite_uri(repo))  # also sets MLFLOW_TRACKING_URI in os.environ...
    try:
        return mlflow.search_runs(experiment_names=["vaepp"], order_by=["attributes.start_time ASC"])
    finally:
        mlflow.set_tracking_uri(None)  # ...which this removes again


def two_stages(repo, exp_name="exp-a"):
    """Two stage processes of one pipeline execution (two independent Tracker objects)."""
    curve = repo / "plots" / "vae" / "train_curve.csv"
    curve.parent.mkdir(parents=True, exist_ok=True)
    curve.write_text("epoch,elbo\n0,-120.5\n1,-110.25\n2,-101.0\n")
    with tracker(repo, exp_name=exp_name).stage_run("train", "vae", {"model.zdim": 16, "train.lr": 1e-3}) as log:
        for epoch, elbo in enumerate([-120.5, -110.25, -101.0]):
            log.log_metrics({"elbo": elbo, "note": "text is skipped"}, step=epoch)
        log.log_artifact(curve)
    with tracker(repo, exp_name=exp_name).stage_run("estimate-nll", "vae", {"nll.n_importance": 1000}) as log:
        log.log_metrics({"nll_nats": 95.5, "nll_stderr": 0.25})


def test_stages_of_one_execution_share_one_parent(repo):
    two_stages(repo)
    df = runs(repo)
    parents = df[df["tags.vaepp.role"] == "parent"]
    children = df[df["tags.vaepp.role"] == "stage"]
    assert len(parents) == 1 and len(children) == 2
    parent_id = parents.run_id.iloc[0]
    assert parents["tags.mlflow.runName"].iloc[0] == "exp-a"
    assert set(children["tags.mlflow.parentRunId"]) == {parent_id}
    assert list(children["tags.dvc.stage"]) == ["train", "estimate-nll"]
    assert set(children["tags.dvc.run"]) == {"vae"} and set(children["tags.dvc.exp_name"]) == {"exp-a"}
    assert set(children["tags.dvc.git_rev"]) == {"0123456789abcdef"}
    train = children[children["tags.dvc.stage"] == "train"].iloc[0]
    nll = children[children["tags.dvc.stage"] == "estimate-nll"].iloc[0]
    assert train["params.model.zdim"] == "16" and float(train["params.train.lr"]) == 1e-3
    assert train["metrics.elbo"] == -101.0 and nll["metrics.nll_nats"] == 95.5
    assert "metrics.note" not in df.columns
    assert set(df.status) == {"FINISHED"}

    from mlflow import MlflowClient

    history = MlflowClient(sqlite_uri(repo)).get_metric_history(train.run_id, "elbo")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, -120.5),
        (1, -110.25),
        (2, -101.0),
    ]
    # artifacts under the absolute artifact root, as files a temp-run copy cannot take away
    assert train.artifact_uri == str(repo.resolve() / "mlartifacts" / train.run_id / "artifacts")
    logged = Path(train.artifact_uri) / "train_curve.csv"
    assert logged.read_text() == (repo / "plots" / "vae" / "train_curve.csv").read_text()
    assert (repo / "mlartifacts" / parent_id / "artifacts" / "params.yaml").is_file()
    exp = MlflowClient(sqlite_uri(repo)).get_experiment_by_name("vaepp")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_parent_keys_exp_name_or_head_and_params(repo):
    two_stages(repo, "exp-a")
    two_stages(repo, "exp-b")
    keys = []
    for rev in ["aaaa1111", "aaaa1111", "bbbb2222"]:  # plain repro: HEAD + params hash
        keys.append(tracker(repo, git_rev=rev).parent_id)
    (repo / "params.yaml").write_text("model:\n  zdim: 32\n")
    keys.append(tracker(repo, git_rev="aaaa1111").parent_id)
    df = runs(repo)
    parents = df[df["tags.vaepp.role"] == "parent"]
    assert list(parents["tags.mlflow.runName"][:2]) == ["exp-a", "exp-b"]
    assert keys[0] == keys[1] and len(set(keys)) == 3
    assert len(parents) == 5
    assert parents["tags.mlflow.runName"].iloc[2].startswith("repro-aaaa1111-")
    for name in ["exp-a", "exp-b"]:
        pid = parents[parents["tags.mlflow.runName"] == name].run_id.iloc[0]
        assert (df["tags.mlflow.parentRunId"] == pid).sum() == 2


def test_parent_log_and_failed_stage(repo):
    t = tracker(repo, exp_name="e")
    with pytest.raises(ValueError, match="boom"):
        with t.stage_run("train", "vae", {}) as log:
            log.log_metrics({"elbo": -1.0}, step=0)
            raise ValueError("boom")
    df = runs(repo)
    assert set(df.status) == {"FAILED"}  # the child and, until a later stage succeeds, the parent
    report = repo / "reports"
    report.mkdir()
    (report / "table.md").write_text("| run | nll |\n")
    with t.parent_log() as log:
        log.log_metrics({"vae/nll_nats": 95.5})
        log.log_artifacts(report, "report")
    parent = runs(repo).set_index("tags.vaepp.role").loc["parent"]
    assert parent.status == "FINISHED" and parent["metrics.vae/nll_nats"] == 95.5
    assert (Path(parent.artifact_uri) / "report" / "table.md").is_file()


def test_duplicate_parents_resolve_to_the_oldest(repo):
    first = tracker(repo, exp_name="race")
    from mlflow import MlflowClient

    client = MlflowClient(sqlite_uri(repo))
    dup = client.create_run(
        first.experiment_id, run_name="race", tags={**first.tags, "vaepp.role": "parent"}
    ).info.run_id
    assert tracker(repo, exp_name="race").parent_id == first.parent_id != dup


STAGE_PROCESS = """
import sys
from pathlib import Path
from tracking.tracker import Tracker
t = Tracker.for_pipeline(Path({repo!r}), Path({repo!r}) / "params.yaml", exp_name="together", git_rev="r")
with t.stage_run("train", sys.argv[1], {{"zdim": 16}}) as log:
    log.log_metrics({{"elbo": -100.0}}, step=0)
assert t.enabled
"""


def test_stage_processes_started_together_share_one_parent(repo):
    tracker(repo, exp_name="earlier")  # the store exists, as after any earlier execution
    code = STAGE_PROCESS.format(repo=str(repo))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}  # `tracking` importable, as in the test session
    procs = [
        subprocess.Popen([sys.executable, "-c", code, f"run{i}"], env=env, stderr=subprocess.PIPE) for i in range(3)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert not any(WARNING in e for e in errors), errors
    df = runs(repo)
    df = df[df["tags.dvc.exp_name"] == "together"]
    parents = df[df["tags.vaepp.role"] == "parent"]
    assert len(parents) == 1 and len(df) == 4
    assert set(df[df["tags.vaepp.role"] == "stage"]["tags.mlflow.parentRunId"]) == {parents.run_id.iloc[0]}


def test_names_made_valid():
    assert mlflow_key("a/../b") == "a/b" and mlflow_key("/x//y/") == "x/y"
    assert mlflow_key("log Ẑ (q)") == "log Ẑ _q_" and len(mlflow_key("k" * 400)) == 250


def garbage_db(repo):
    (repo / "mlflow.db").write_bytes(b"this is not a database\x00\x01" * 100)


def locked_db(repo):
    tracker(repo, exp_name="first")  # a real store...
    con = sqlite3.connect(repo / "mlflow.db", isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")  # ...held by another writer
    return con


@pytest.mark.parametrize("trouble", ["garbage", "locked", "unreachable"])
def test_trouble_degrades_with_one_warning(repo, capsys, trouble):
    con = locked_db(repo) if trouble == "locked" else None
    if trouble == "garbage":
        garbage_db(repo)
    capsys.readouterr()
    uri = "http://127.0.0.1:9" if trouble == "unreachable" else None
    try:
        start = time.monotonic()
        t = tracker(repo, exp_name="x", tracking_uri=uri, timeout_s=1.0)
        ran = []
        with t.stage_run("train", "vae", {"a": 1}) as log:
            log.log_metrics({"elbo": -1.0}, step=0)
            log.log_artifact(repo / "params.yaml")
            ran.append(True)
        with t.parent_log() as log:
            log.log_metrics({"x": 1.0})
        seconds = time.monotonic() - start
    finally:
        if con is not None:
            con.close()
    err = capsys.readouterr().err
    assert ran == [True] and not t.enabled and seconds < 10
    lines = [line for line in err.splitlines() if WARNING in line]
    assert len(lines) == 1 and TAIL in lines[0], err
    assert {"garbage": "not a database", "locked": "locked", "unreachable": "127.0.0.1:9"}[trouble] in lines[0]
    if trouble == "garbage":
        assert (repo / "mlflow.db").read_bytes().startswith(b"this is not a database")


def test_failure_mid_run_warns_once_and_the_body_goes_on(repo, capsys):
    t = tracker(repo, exp_name="mid")

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    with t.stage_run("train", "vae", {}) as log:
        t.client.log_batch = broken
        for epoch in range(5):
            log.log_metrics({"elbo": -1.0}, step=epoch)
        steps = epoch
    lines = [line for line in capsys.readouterr().err.splitlines() if WARNING in line]
    assert steps == 4 and len(lines) == 1 and "database is locked" in lines[0]


def test_stage_edge_reads_the_environment(repo, monkeypatch, capsys):
    from stages import track

    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_EXP_NAME", "from-env")
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    off = track.tracker("params.yaml")
    with off.stage_run("train", "vae", {}) as log:
        log.log_metrics({"elbo": -1.0})
    assert not off.enabled and not (repo / "mlflow.db").exists() and capsys.readouterr().err == ""
    monkeypatch.setenv("VAEPP_MLFLOW", "1")
    on = track.tracker("params.yaml")
    assert on.enabled and on.tags["dvc.exp_name"] == "from-env" and (repo / "mlflow.db").is_file()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert not track.tracker("params.yaml").enabled and WARNING in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_ui_serves_the_runs(repo):
    """`make ui` (the README's command) on a free port, pointed at this test's store: the UI page
    loads over HTTP on 127.0.0.1 and the REST API finds the parent and child runs."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".venv" / ".installed").is_file():
        pytest.skip("`make ui` runs from the project's .venv, which `make test` creates: run the tests with it")
    two_stages(repo)
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(root),
            "ui",
            f"UI_PORT={port}",
            f"MLFLOW_DB={repo / 'mlflow.db'}",
            f"MLFLOW_ARTIFACTS={repo / 'mlartifacts'}",
        ],
        env=env,
        stdout=(log := open(repo / "ui.log", "w")),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (repo / "ui.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 60 s"
            time.sleep(0.5)
        with urllib.request.urlopen(base + "/", timeout=10) as resp:
            assert resp.status == 200 and b'<div id="root"' in resp.read().lower().replace(b"'", b'"')

        def api(path, body):
            req = urllib.request.Request(
                base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())

        exp = api("/api/2.0/mlflow/experiments/search", {"max_results": 10, "filter": "name = 'vaepp'"})
        exp_id = exp["experiments"][0]["experiment_id"]
        found = api("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in found]
        parent = [r for r, t in zip(found, tags, strict=True) if t["vaepp.role"] == "parent"]
        assert len(found) == 3 and len(parent) == 1
        pid = parent[0]["info"]["run_id"]
        assert sorted(t["dvc.stage"] for t in tags if t.get("mlflow.parentRunId") == pid) == ["estimate-nll", "train"]
        train = next(r for r, t in zip(found, tags, strict=True) if t.get("dvc.stage") == "train")
        assert {m["key"]: m["value"] for m in train["data"]["metrics"]}["elbo"] == -101.0
        url = f"{base}/get-artifact?path=train_curve.csv&run_uuid={train['info']['run_id']}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.read().decode().startswith("epoch,elbo")
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
    assert f"MLflow UI: http://127.0.0.1:{port}/" in (repo / "ui.log").read_text()


@pytest.mark.parametrize("trouble", ["unreachable", pytest.param("locked", marks=pytest.mark.slow)])
def test_training_stage_survives_mlflow_trouble_with_one_warning(tmp_path, trouble):
    """A real train stage with the tracking server unreachable (port 9) or the SQLite store
    locked by another writer: it finishes, writes its outputs, warns exactly once."""
    work = workspace(tmp_path / "w", params(epochs=1))
    extra = {"VAEPP_MLFLOW": "1", "DVC_ROOT": str(work)}
    con = None
    if trouble == "unreachable":
        extra["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"
    else:
        con = sqlite3.connect(work / "mlflow.db", isolation_level=None)
        con.execute("CREATE TABLE t (x)")
        con.execute("BEGIN EXCLUSIVE")
    try:
        start = time.monotonic()
        proc = subprocess.run(
            train_cmd(), cwd=work, env=stage_env(**extra), capture_output=True, text=True, timeout=600
        )
        seconds = time.monotonic() - start
    finally:
        if con is not None:
            con.close()
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if WARNING in line]
    assert len(warnings) == 1, proc.stderr
    assert ("127.0.0.1:9" if trouble == "unreachable" else "locked") in warnings[0]
    assert "Traceback" not in proc.stderr
    assert (work / VAE).is_file() and (work / "metrics" / RUN / "train.json").is_file()
    print(f"train stage with MLflow {trouble}: {seconds:.1f} s")


def test_mlflow_ui_binds_to_localhost_unless_asked():
    """`make ui` serves on 127.0.0.1 by default, even when the shell exports HOST (tcsh does);
    `make ui UI_HOST=0.0.0.0` is the explicit opt-in."""
    text = (ROOT / "Makefile").read_text()
    assert "UI_HOST ?= 127.0.0.1" in text.splitlines()

    def server_line(*args: str) -> str:
        e = {k: v for k, v in os.environ.items() if k not in ("UI_HOST", "UI_PORT")}
        e.update(HOST="0.0.0.0", PORT="1")
        out = subprocess.run(["make", "-n", "ui", *args], cwd=ROOT, env=e, capture_output=True, text=True)
        lines = [line for line in out.stdout.replace("\\\n", " ").splitlines() if "mlflow server" in line]
        assert len(lines) == 1, out.stdout + out.stderr
        return lines[0]

    assert "--host 127.0.0.1 " in server_line()
    assert "--host 0.0.0.0 " in server_line("UI_HOST=0.0.0.0")
    line = server_line("UI_PORT=5999")
    assert "--port 5999" in line and f"sqlite:///{ROOT}/mlflow.db" in line


def test_parent_carries_the_shared_params_once(repo, capsys):
    from mlflow import MlflowClient

    from stages import inputs

    (repo / "params.yaml").write_text(
        "profile: tiny\ndevice: cpu\ndata: {dataset: mnist, n_test: 32}\nmodel: {zdim: 4, hidden: [32, 32]}\n"
        "nll: {log_z: {ais_chains: 16}}\nruns: {vae: {prior: standard}, vaepp: {prior: pullback}}\n"
    )
    shared = inputs.shared_params(repo / "params.yaml")
    assert shared == {
        "data.dataset": "mnist",
        "data.n_test": "32",
        "model.zdim": "4",
        "model.hidden": "[32, 32]",
        "nll.log_z.ais_chains": "16",
        "profile": "tiny",
        "runs": "vae,vaepp",
    }
    capsys.readouterr()
    first = tracker(repo, exp_name="shared", parent_params=shared)
    again = tracker(repo, exp_name="shared", parent_params={**shared, "model.zdim": "8", "fid.n_samples": "20"})
    assert first.parent_id == again.parent_id and first.enabled and again.enabled
    assert WARNING not in capsys.readouterr().err  # same values again: no warning; a changed one: a tag
    parent = MlflowClient(sqlite_uri(repo)).get_run(first.parent_id)
    assert parent.data.params == {**shared, "fid.n_samples": "20"}
    assert parent.data.tags["vaepp.params_differ"] == "model.zdim"


def test_stage_run_logs_its_dataset_input_and_tags(repo):
    from mlflow import MlflowClient

    t = tracker(repo, exp_name="ds")
    dataset = {"name": "mnist", "source": '{"uri": "data/mnist"}', "digest": "0123abcd0123abcd", "context": "train"}
    with t.stage_run("train", "vae", {}, dataset=dataset) as log:
        log.set_tags({"vaepp.phase": "done"})
    child = runs(repo).set_index("tags.vaepp.role").loc["stage"]
    run = MlflowClient(sqlite_uri(repo)).get_run(child.run_id)
    (inp,) = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.source, inp.dataset.digest) == (
        "mnist",
        '{"uri": "data/mnist"}',
        dataset["digest"],
    )
    assert {tag.key: tag.value for tag in inp.tags} == {"mlflow.data.context": "train"}
    assert run.data.tags["vaepp.phase"] == "done"


def test_stages_in_process_log_datasets_progress_and_parent_params(tmp_path, monkeypatch):
    """train, fit-latent-gan, estimate-nll, sample-mala and compute-fid (a pooling stand-in for
    Inception) of the tiny profile called in this process (`main(argv)`), tracked into the
    workspace's SQLite store: MLflow's API finds the shared params on the parent, the prepared
    dataset on every stage run, the log-Z estimates of estimate-nll at steps 1, 2, 3, and the
    progress the evaluation stages log while they run, at several steps each."""
    import hashlib

    import torch
    from mlflow import MlflowClient

    from acquire import fid_weights as fetch_fid_weights
    from stage_args import stage_argv
    from stages import compute_fid, estimate_nll, fit_latent_gan, sample_mala, train

    class Features(torch.nn.Module):  # stands in for Inception: 12 pooled features per image
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    monkeypatch.setattr(fetch_fid_weights, "ensure_inception_weights", lambda *a, **k: None)
    monkeypatch.setattr(fetch_fid_weights, "load_inception", lambda *a, **k: Features())
    monkeypatch.setenv("VAEPP_CACHE", str(tmp_path / "cache"))
    work = workspace(tmp_path / "w", params(epochs=1))
    monkeypatch.chdir(work)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(work))
    monkeypatch.setenv("DVC_EXP_NAME", "in-process")
    monkeypatch.setenv("VAEPP_MLFLOW", "1")
    stages = {
        "train": train,
        "fit-latent-gan": fit_latent_gan,
        "estimate-nll": estimate_nll,
        "sample-mala": sample_mala,
        "compute-fid": compute_fid,
    }
    for name, module in stages.items():
        assert module.main(stage_argv(name, RUN, "--no-progress")) == 0, name

    client = MlflowClient(sqlite_uri(work))
    df = runs(work)
    parent = client.get_run(df[df["tags.vaepp.role"] == "parent"].run_id.iloc[0])
    assert parent.data.params["model.zdim"] == "4" and parent.data.params["profile"] == "tiny"
    assert (
        parent.data.params["runs"] == ",".join(yaml.safe_load(Path("params.yaml").read_text())["runs"])
        and parent.data.params["nll.log_z.ais_chains"] == "16"
    )
    assert "device" not in parent.data.params  # not a shared section

    meta = json.loads((work / "data" / "mnist" / "meta.json").read_text())
    digest = hashlib.sha256("".join(f"{f}:{h}\n" for f, h in sorted(meta["sha256"].items())).encode()).hexdigest()
    children = df[df["tags.vaepp.role"] == "stage"]
    assert sorted(children["tags.dvc.stage"]) == sorted(stages) and set(children.status) == {"FINISHED"}
    context = {"train": "training", "fit-latent-gan": "training", "estimate-nll": "eval", "sample-mala": "training"}
    context["compute-fid"] = "eval"
    for run_id, stage in zip(children.run_id, children["tags.dvc.stage"], strict=True):
        (inp,) = client.get_run(run_id).inputs.dataset_inputs
        assert (inp.dataset.name, inp.dataset.digest) == ("mnist", digest[:16]), stage
        assert json.loads(inp.dataset.source)["description"] == "synthetic test data"
        assert {tag.key: tag.value for tag in inp.tags} == {"mlflow.data.context": context[stage]}

    nll_run = client.get_run(children[children["tags.dvc.stage"] == "estimate-nll"].run_id.iloc[0])
    nll = json.loads((work / "metrics" / RUN / "nll.json").read_text())
    assert nll_run.data.tags["vaepp.phase"] == "done" and nll_run.data.metrics["nll_nats"] == nll["nll_nats"]
    steps = {}
    for name, estimate in nll["log_z"].items():  # one point each, at its place in the protocol
        (point,) = client.get_metric_history(nll_run.info.run_id, f"log_z.{name}")
        assert point.value == estimate["log_z"]
        steps[name] = point.step
    assert steps == {"paper_q": 1, "prior_is": 2, "ais": 3}

    def history(run, name):
        return [
            (m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        ]

    tiny = yaml.safe_load(Path("params.yaml").read_text())
    temps = tiny["nll"]["log_z"]["ais_temps"]  # 10: fewer than 20, so every temperature is reported
    assert history(nll_run, "log_z.ais.temps_done_fraction") == [(k, k / temps) for k in range(1, temps + 1)]
    n_test, batch = tiny["data"]["n_test"], tiny["nll"]["batch_images"]
    assert history(nll_run, "nll.images_done") == [(k, float(k)) for k in range(batch, n_test + 1, batch)]
    running = history(nll_run, "nll.nats_running")
    assert [s for s, _ in running] == list(range(batch, n_test + 1, batch)) and len(running) > 1
    assert running[-1][1] == pytest.approx(nll["nll_nats"], rel=1e-9)

    mala_run = client.get_run(children[children["tags.dvc.stage"] == "sample-mala"].run_id.iloc[0])
    mala = json.loads((work / "metrics" / RUN / "mala.json").read_text())
    n_steps = tiny["mala"]["n_steps"]
    assert history(mala_run, "mala.steps_done") == [(k, float(k)) for k in range(1, n_steps + 1)]
    acceptance = history(mala_run, "mala.acceptance_running")
    assert [s for s, _ in acceptance] == list(range(1, n_steps + 1))
    assert acceptance[-1][1] == pytest.approx(mala["mala_acceptance"], rel=1e-9)
    fid_run = client.get_run(children[children["tags.dvc.stage"] == "compute-fid"].run_id.iloc[0])
    fid = json.loads((work / "metrics" / RUN / "fid.json").read_text())
    assert fid_run.data.tags["vaepp.phase"] == "done" and fid_run.data.metrics["fid"] == fid["fid"]
    n, batch = tiny["fid"]["n_samples"], tiny["fid"]["batch_size"]  # n_reference = n_samples here
    for name in ("reference", "held_out", "samples", "samples_gan"):  # an empty cache: every set runs
        assert history(fid_run, f"fid.{name}.images_done") == [(k, float(k)) for k in range(batch, n + 1, batch)]
