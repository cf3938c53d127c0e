"""A stage's start-up: nothing at import of a stage module, then `stages.boot.boot()` (environment
defaults, the OpenMP wait-policy sample before torch, the exit handler and the tracking process:
MLflow imported beside the stage, not in it, when a stage starts one). The in-process tracker is
tests/test_tracking.py's."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import boot, track
from tracking.process import TrackerProcess
from tracking.store import sqlite_uri

ROOT = Path(__file__).resolve().parents[1]
WARNING = "MLflow logging disabled:"
TAIL = "metrics are still in the DVC files"


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "params.yaml").write_text("model:\n  zdim: 16\n")
    return tmp_path


@pytest.fixture
def started():
    procs = []

    def start():
        procs.append(TrackerProcess.start(ROOT))
        return procs[-1]

    yield start
    for p in procs:
        p.close(timeout_s=10)


def runs(repo):
    import mlflow

    mlflow.set_tracking_uri(sqlite_uri(repo))
    try:
        return mlflow.search_runs(experiment_names=["vaepp"], order_by=["attributes.start_time ASC"])
    finally:
        mlflow.set_tracking_uri(None)


def test_runs_logged_through_the_process_share_one_parent(repo, started, capsys):
    curve = repo / "curve.csv"
    curve.write_text("epoch,elbo\n0,-1.5\n")
    for stage in ("train", "estimate-nll"):
        t = started().open(repo, repo / "params.yaml", exp_name="exp-p", git_rev="abc123")
        with t.stage_run(stage, "vae", {"model.zdim": 16, "train.lr": 1e-3}) as log:
            for epoch, elbo in enumerate([-3.0, -2.0, -1.0]):
                log.log_metrics({"elbo": elbo, "note": "text is skipped", "flag": True}, step=epoch)
            log.log_artifact(curve)
        assert t.enabled and t.tags["dvc.exp_name"] == "exp-p" and t.parent_id
    df = runs(repo)
    parents, children = df[df["tags.vaepp.role"] == "parent"], df[df["tags.vaepp.role"] == "stage"]
    assert len(parents) == 1 and len(children) == 2 and set(df.status) == {"FINISHED"}
    assert set(children["tags.mlflow.parentRunId"]) == {parents.run_id.iloc[0]}
    assert list(children["tags.dvc.stage"]) == ["train", "estimate-nll"]
    train = children.iloc[0]
    assert train["params.model.zdim"] == "16" and float(train["params.train.lr"]) == 1e-3
    assert train["metrics.elbo"] == -1.0 and train["metrics.flag"] == 1.0 and "metrics.note" not in df.columns
    assert (Path(train.artifact_uri) / "curve.csv").read_text() == curve.read_text()
    assert WARNING not in capsys.readouterr().err


def test_failed_and_interrupted_bodies_end_their_runs(repo, started):
    t = started().open(repo, repo / "params.yaml", exp_name="e", git_rev="r")
    with pytest.raises(ValueError, match="boom"):
        with t.stage_run("train", "vae", {}):
            raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt):
        with t.stage_run("estimate-nll", "vae", {}):
            raise KeyboardInterrupt
    with t.parent_log() as log:
        log.log_metrics({"vae/nll_nats": 95.5})
    df = runs(repo).set_index("tags.mlflow.runName")
    assert df.loc["train:vae"].status == "FAILED" and df.loc["estimate-nll:vae"].status == "KILLED"
    assert df.loc["e"].status == "FINISHED" and df.loc["e"]["metrics.vae/nll_nats"] == 95.5


@pytest.mark.parametrize("trouble", ["unreachable", "process killed"])
def test_trouble_degrades_with_one_warning(repo, started, capsys, trouble):
    uri = "http://127.0.0.1:9" if trouble == "unreachable" else None
    t = started().open(repo, repo / "params.yaml", exp_name="x", git_rev="r", tracking_uri=uri, timeout_s=1.0)
    ran = []
    with t.stage_run("train", "vae", {"a": 1}) as log:
        if trouble == "process killed":
            t.proc.kill()
            t.proc.wait()
        for epoch in range(3):
            log.log_metrics({"elbo": -1.0}, step=epoch)
        ran.append(True)
    with t.parent_log() as log:
        log.log_metrics({"x": 1.0})
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if WARNING in line]
    assert ran == [True] and not t.enabled
    assert len(lines) == 1 and TAIL in lines[0], err
    assert ("127.0.0.1:9" if trouble == "unreachable" else "tracking process ended") in lines[0]


STAGE = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tracking.process import TrackerProcess
t = TrackerProcess.start(Path({root!r})).open(Path({repo!r}), Path({repo!r}) / "params.yaml", exp_name="k", git_rev="r")
with t.stage_run("train", "vae", {{}}) as log:
    log.log_metrics({{"elbo": -1.0}}, step=0)
    assert t.enabled
    print("running", flush=True)
    time.sleep(600)
"""


def test_a_killed_stage_leaves_its_run_killed(repo):
    """SIGKILL of the stage process: its tracking process sees the end of its input and ends
    the open run KILLED (a stage killed while tracking in process left it RUNNING)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", STAGE.format(root=str(ROOT), repo=str(repo))], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "running"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        df = runs(repo)
        child = df[df["tags.vaepp.role"] == "stage"]
        if len(child) and child.status.iloc[0] != "RUNNING":
            break
        time.sleep(0.5)
    assert child.status.iloc[0] == "KILLED" and child["metrics.elbo"].iloc[0] == -1.0


def test_tracker_hands_the_stage_params_to_the_started_process(repo, monkeypatch):
    monkeypatch.chdir(repo)
    for k in ("MLFLOW_TRACKING_URI", "VAEPP_MLFLOW"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_EXP_NAME", "from-env")
    monkeypatch.setattr(track, "_PROCESS", TrackerProcess.start(ROOT))
    t = track.tracker("params.yaml")
    try:
        assert isinstance(t, TrackerProcess) and track._PROCESS is None
        assert t.enabled and t.tags["dvc.exp_name"] == "from-env" and (repo / "mlflow.db").is_file()
        assert not isinstance(track.tracker("params.yaml"), TrackerProcess)  # one process, one use
        from mlflow import MlflowClient

        assert MlflowClient(sqlite_uri(repo)).get_run(t.parent_id).data.params == {"model.zdim": "16"}
    finally:
        t.close()


def test_dataset_input_tags_and_parent_params_through_the_process(repo, started, capsys):
    from mlflow import MlflowClient

    shared = {"model.zdim": "16", "profile": "tiny", "runs": "vae,vaepp"}
    dataset = {"name": "mnist", "source": '{"uri": "data/mnist"}', "digest": "0123abcd0123abcd", "context": "eval"}
    for _ in range(2):  # a second stage process: the same params again, no warning
        t = started().open(repo, repo / "params.yaml", exp_name="ds", git_rev="r", parent_params=shared)
        with t.stage_run("estimate-nll", "vae", {}, dataset=dataset) as log:
            log.set_tags({"vaepp.phase": "estimating"})
            log.log_metrics({"log_z.ais": -0.5}, step=3)
            log.set_tags({"vaepp.phase": "done"})
        assert t.enabled
    client = MlflowClient(sqlite_uri(repo))
    assert client.get_run(t.parent_id).data.params == shared
    children = runs(repo)
    children = children[children["tags.vaepp.role"] == "stage"]
    assert len(children) == 2
    for run_id in children.run_id:
        run = client.get_run(run_id)
        (inp,) = run.inputs.dataset_inputs
        assert (inp.dataset.name, inp.dataset.source, inp.dataset.digest) == (
            "mnist",
            dataset["source"],
            dataset["digest"],
        )
        assert {tag.key: tag.value for tag in inp.tags} == {"mlflow.data.context": "eval"}
        assert run.data.tags["vaepp.phase"] == "done" and run.data.metrics["log_z.ais"] == -0.5
    assert WARNING not in capsys.readouterr().err


def test_only_a_stage_script_starts_a_tracking_process():
    stage = str(ROOT / "stages" / "train.py")
    for argv, env in [
        (["-c"], {}),
        ([str(ROOT / "bench" / "run_all.py")], {}),
        ([stage], {"VAEPP_MLFLOW": "0"}),
        ([stage], {"RANK": "1"}),
    ]:
        assert boot.start_tracking_process(argv, env) is None
    p = boot.start_tracking_process([stage], {"RANK": "0"})
    try:
        assert isinstance(p, TrackerProcess) and p.proc.poll() is None
    finally:
        start = time.monotonic()
        p.close()  # never opened: ended at once, not waited for
        assert p.proc.returncode is not None and time.monotonic() - start < 5


def test_one_core_takes_no_load_sample(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)

    def never():
        raise AssertionError("sampled")

    assert boot.choose_omp_wait_policy({}, busy=never) == "default"


IMPORT_ONLY = """
import atexit, os, sys, time

def no_sleep(_):
    raise AssertionError("a load sample at import")

time.sleep = no_sleep
environ, path, exits = dict(os.environ), list(sys.path), atexit._ncallbacks()
import {module}
assert dict(os.environ) == environ, "the environment changed"
assert sys.path == path, "sys.path changed"
assert atexit._ncallbacks() == exits, "an exit handler was registered"
heavy = sorted(m for m in ("torch", "mlflow", "vaepp", "tracking") if m in sys.modules)
assert not heavy, heavy
children = [
    f.read_text().split() for f in __import__("pathlib").Path("/proc/self/task").glob("*/children")
]
assert not any(children), children
"""


def stage_modules() -> list[str]:
    return sorted(f"stages.{p.stem}" for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", stage_modules())
def test_importing_a_stage_module_does_nothing(module):
    """Importing any module of stages/ only defines things: no environment defaults, no sys.path
    entry, no exit handler, no load sample, no tracking process, and neither torch nor mlflow nor
    the library imported (so that `boot()` can still choose the OpenMP wait policy before torch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "OMP_"))}
    env.update(VAEPP_MLFLOW="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ONLY.format(module=module)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


BOOT = """
import atexit, logging, os, sys  # logging registers an exit handler of its own when first imported
sys.argv = [{argv0!r}, "--run", "vae"]
import stages.train
from stages import boot, track
exits = atexit._ncallbacks()
policy = boot.boot()
assert "torch" not in sys.modules, "torch imported before the wait policy was chosen"
assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and os.environ["DVC_NO_ANALYTICS"] == "1"
assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "20"
added = atexit._ncallbacks() - exits
assert boot.boot() == policy and atexit._ncallbacks() - exits == added, "a second boot() did more"
print(policy, added, type(track._PROCESS).__name__)
"""


@pytest.mark.parametrize(
    ("argv0", "mlflow", "expected"),
    [
        (str(ROOT / "stages" / "train.py"), "1", "ACTIVE 2 TrackerProcess"),  # exit handler + tracking process
        (str(ROOT / "stages" / "train.py"), "0", "ACTIVE 1 NoneType"),  # the exit handler only
        ("-c", "1", "ACTIVE 0 NoneType"),  # not a stage's process: neither
    ],
)
def test_boot_prepares_a_stage_process_once(argv0, mlflow, expected):
    """boot(): environment defaults, the wait policy (the user's setting kept) with torch not yet
    imported; in a stage's own process the gc.freeze exit handler and, with tracking on, the
    tracking process, kept for `stages.track.tracker()`; a second call does nothing more."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "RANK"))}
    env.update(VAEPP_MLFLOW=mlflow, OMP_WAIT_POLICY="ACTIVE", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", BOOT.format(argv0=argv0)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == expected


def test_stage_module_runs_with_dash_m_from_the_repository_root():
    """`python -m stages.train --help` as DVC runs it (the repository root the working directory,
    nothing else on the path): usage, exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(VAEPP_MLFLOW="0")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--checkpoint PATH" in proc.stdout, proc.stderr


def test_bench_rows_state_the_target_and_the_parts():
    from bench import startup

    res = {
        "measured": True,
        "stage": "train@vae",
        "repeats": 5,
        "fixed_cost_s": 4.2,
        "dvc_part_s": 1.0,
        "process_part_s": 3.2,
        "work_s": 0.05,
        "dvc_noop_s": 0.5,
        "mlflow_in_process": {
            "import_torch_s": 2.9,
            "import_mlflow_after_torch_s": 1.5,
            "mlflow_open_s": 0.1,
            "mlflow_stage_run_s": 0.1,
        },
    }
    rows = startup.rows(res)
    assert rows[0].figure == "7 stage fixed cost (per stage)" and rows[0].target == "<= 5 s" and rows[0].met
    assert rows[0].value.startswith("4.2 s") and "1.0 s" in rows[1].value and "3.2 s" in rows[2].value
    assert startup.rows({**res, "fixed_cost_s": 5.5})[0].met is False
    missing = startup.rows({"measured": False, "reason": "no dvc"})
    assert len(missing) == 1 and "not measured: no dvc" in missing[0].value
    assert "less the training loop's own seconds" in startup.NOTE.format(repeats=5)


FAULTS = """
import resource, sys
import torch
from stages import boot
if sys.argv[1] == "keep":
    assert boot.keep_freed_memory({}) == "kept"
torch.set_num_threads(1)
w = torch.randn(300, 784)


def chunk():  # an evaluation chunk's pattern: activations in, a 16384 x 784 float output (49 MiB) out
    return torch.sigmoid(torch.randn(16384, 300) @ w).sum()


for _ in range(12):  # the heap grows to the pattern's peak: its three blocks settle within ten chunks
    chunk()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    chunk()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_is_reused_without_page_faults():
    """With `boot.keep_freed_memory`, once the heap has grown to an evaluation chunk's peak (the
    input and the two 49 MiB outputs change places in it for up to ten chunks, so twelve come
    first), ten more chunks reuse its memory: fewer than a fifth of their output's pages are faulted in
    again. Without it glibc maps each 49 MiB output (above its largest adaptive mmap threshold,
    32 MiB) anew, and every page of it faults, each time (measured: 251 000 faults against 0
    kept, for 125 440 output pages)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(PYTHONPATH=str(ROOT))

    def faults(mode: str) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", FAULTS, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.split()[-1])

    pages = 10 * 16384 * 784 * 4 // 4096
    assert faults("default") >= 0.9 * pages
    assert faults("keep") < 0.2 * pages


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "user"),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "user"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "user"),
        ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}, "kept"),  # not a malloc setting
        ({}, "kept"),
    ],
)
def test_keep_freed_memory_keeps_a_users_allocator_settings(monkeypatch, environ, expected):
    calls = []
    monkeypatch.setattr(boot, "_allocator", None)  # restored after the test: this process's own record
    monkeypatch.setattr(boot, "_mallopt", lambda param, value: calls.append((param, value)) or True)
    assert boot.keep_freed_memory(environ) == expected
    assert boot.allocator() == expected
    assert calls == (
        []
        if expected == "user"
        else [(boot.M_MMAP_THRESHOLD, boot.KEEP_BYTES), (boot.M_TRIM_THRESHOLD, boot.KEEP_BYTES)]
    )


def test_keep_freed_memory_without_mallopt(monkeypatch):
    monkeypatch.setattr(boot, "_allocator", None)
    monkeypatch.setattr(boot, "_mallopt", lambda param, value: False)
    assert boot.keep_freed_memory({}) == "unavailable"
