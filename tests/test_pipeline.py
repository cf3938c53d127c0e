"""End to end: the whole DAG under `dvc repro` on the tiny profile, in a temporary copy of the
repository, then `dvc exp run -S` in the workspace and with `--temp`; MLflow's own API must find
the parent and child runs of each execution.

Runs in a few minutes on 2 CPU cores (most of it is process start-up and the FID network).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUNS = ("vae", "naive_vaepp", "vaepp", "certified")

pytestmark = pytest.mark.slow  # end to end: `make test-slow`


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 2400) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return proc


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git copy of the working tree (tracked and new files) with the tiny profile as params.yaml."""
    dst = tmp_path_factory.mktemp("pipeline") / "repo"

    def listed(*flags):
        return subprocess.run(
            ["git", "ls-files", *flags], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()

    # tracked files plus new ones, but not the outputs of a pipeline run (the committed baseline
    # study included): the copy starts a study of its own
    outputs = ("metrics/", "plots/", "reports/", "dvc.lock")
    files = [f for f in listed("-c") + listed("-o", "--exclude-standard") if not f.startswith(outputs)]
    for f in files:
        src = REPO / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    shutil.copy2(REPO / "tests" / "profiles_tiny.yaml", dst / "params.yaml")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "MLFLOW_TRACKING_URI", "VAEPP_MLFLOW"):
        env.pop(var, None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny profile"]):
        _run(cmd, dst, env)
    first = _run([str(BIN / "dvc"), "repro"], dst, env)
    # the README's baseline commit: lock, metrics, curves and report in git; models in DVC's cache
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "baseline study"]):
        _run(cmd, dst, env)
    return dst, env, first


def _parents_and_children(root: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="pandas")
    parent_ids = runs["tags.mlflow.parentRunId"].dropna().unique() if "tags.mlflow.parentRunId" in runs else []
    parents = runs[runs["run_id"].isin(parent_ids)]
    children = runs[runs["tags.mlflow.parentRunId"].notna()] if "tags.mlflow.parentRunId" in runs else runs.iloc[:0]
    return runs, parents, children


def test_repro_writes_every_declared_output(repo):
    root, _, _ = repo
    for run in RUNS:
        for path in (
            f"models/{run}/vae.pt",
            f"models/{run}/latent_gan.pt",
            f"samples/{run}/grid.png",
            f"plots/{run}/train_curve.csv",
        ):
            assert (root / path).is_file(), path
        train = json.loads((root / f"metrics/{run}/train.json").read_text())
        assert {"elbo_under_train_log_z", "log_z_monitor", "beta", "epochs", "seconds"} <= train.keys()
        nll = json.loads((root / f"metrics/{run}/nll.json").read_text())
        assert {"nll_nats", "nll_stderr", "n_importance_total", "log_z", "bpd"} <= nll.keys()
        assert nll["n_importance_total"] == 32 * 2 * 8  # n_test × n_passes × S of the tiny profile
        fid = json.loads((root / f"metrics/{run}/fid.json").read_text())
        assert {"fid", "fid_gan", "n_samples", "protocol", "mala_acceptance"} <= fid.keys()
    vaepp_nll = json.loads((root / "metrics/vaepp/nll.json").read_text())
    assert set(vaepp_nll["log_z"]) == {"paper_q", "prior_is", "ais"}
    cert = json.loads((root / "metrics/certified/nll.json").read_text())
    assert set(cert["log_z"]) == {"paper_q", "prior_is", "ais", "certificate", "reverse_ais"}
    assert cert["log_z_headline"] == "certificate"
    assert json.loads((root / "metrics/certified/fid.json").read_text())["sampler"] == "exact (rejection) + MALA"
    for name in ("index.html", "tables.md", "metrics.csv"):
        assert (root / "reports" / name).is_file(), name


def test_second_repro_reruns_only_the_always_changed_report(repo):
    root, env, _ = repo
    out = _run([str(BIN / "dvc"), "repro"], root, env).stdout
    ran = [line for line in out.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'report':"], out


def test_mlflow_finds_parent_and_children_after_repro(repo):
    root, _, _ = repo
    _, parents, children = _parents_and_children(root)
    assert len(parents) == 1
    stages = set(children["tags.dvc.stage"])
    assert {"train", "fit-latent-gan", "estimate-nll", "sample-mala", "compute-fid"} <= stages
    for run, prior, method in (("vae", "standard", "vae"), ("naive_vaepp", "pullback", "naive_vaepp")):
        mine = children[children["tags.dvc.run"] == run]
        assert set(mine["tags.vaepp.prior"]) == {prior} and set(mine["tags.vaepp.method"]) == {method}, run
    nll_child = children[(children["tags.dvc.stage"] == "estimate-nll") & (children["tags.dvc.run"] == "vaepp")]
    expected = json.loads((root / "metrics/vaepp/nll.json").read_text())["nll_nats"]
    assert nll_child["metrics.nll_nats"].iloc[0] == pytest.approx(expected)


# The --temp experiment's targets: every run's sampling stage, and the FID stage of one run (each
# FID stage takes two 2048×2048 eigendecompositions; the first repro ran all three).
TEMP_TARGETS = ("sample-mala@vae", "sample-mala@naive_vaepp", "sample-mala@certified", "compute-fid@vaepp")


def test_exp_run_in_workspace_and_temp_are_listed_and_tracked(repo):
    """`dvc exp run -S model.zdim=8` (a shared setting) in the workspace and a shared sampling
    setting with `--temp`; `dvc exp show` lists both with their own params and metrics, and MLflow
    holds a parent run for each with its stages' children. The sampling change reruns every run's
    sampling stage and nothing upstream of it (no training: the checkpoints are no DVC outputs, so
    the temporary copy misses nothing). To keep the suite short each experiment runs a few stages:
    the sampling one every run's sampling and one run's FID (TEMP_TARGETS), the zdim one
    `estimate-nll@vae` and what it needs; `dvc status` then shows that the same setting has changed
    every other run's training too."""
    root, env, _ = repo
    dvc = str(BIN / "dvc")
    base = {run: json.loads((root / f"metrics/{run}/train.json").read_text())["elbo_under_train_log_z"] for run in RUNS}
    # --temp first: it starts from the workspace, which the workspace experiment then changes
    out = _run([dvc, "exp", "run", "--temp", "-n", "seed2", "-S", "mala.seed=2", *TEMP_TARGETS], root, env).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {f"sample-mala@{run}" for run in RUNS} | {"compute-fid@vaepp"}, out
    out = _run([dvc, "exp", "run", "-n", "zdim8", "-S", "model.zdim=8", "estimate-nll@vae"], root, env).stdout
    assert "Running stage 'train@vae'" in out and "Running stage 'estimate-nll@vae'" in out, out
    assert torch_load_zdim(root / "models/vae/vae.pt") == 8
    status = json.loads(_run([dvc, "status", "--json"], root, env).stdout)
    for run in ("naive_vaepp", "vaepp"):  # the shared setting reaches every run's training
        changed = [
            c["changed deps"]["params.yaml"]
            for c in status.get(f"train@{run}", [])
            if "params.yaml" in c.get("changed deps", {})
        ]
        assert changed and changed[0].get("model") == "modified", (run, status.get(f"train@{run}"))
    shown = json.loads(_run([dvc, "exp", "show", "--json"], root, env).stdout)
    # every experiment row carries its own metrics (they live in git, so the experiment commit
    # has them), not just the workspace row
    revs = {r["name"]: r["data"] for row in shown for e in row.get("experiments") or [] for r in e.get("revs", [])}
    assert {"zdim8", "seed2"} <= set(revs), sorted(revs)
    assert revs["zdim8"]["params"]["params.yaml"]["data"]["model"]["zdim"] == 8
    assert revs["seed2"]["params"]["params.yaml"]["data"]["model"]["zdim"] == 4
    for name in ("zdim8", "seed2"):
        metrics = revs[name]["metrics"]
        for path, key in [
            ("metrics/vae/nll.json", "nll_nats"),
            ("metrics/vae/fid.json", "fid_gan"),
            ("metrics/vaepp/train.json", "elbo_under_train_log_z"),
        ]:
            assert key in metrics[path].get("data", {}), (name, path, metrics[path])
    assert revs["zdim8"]["metrics"]["metrics/vae/train.json"]["data"]["elbo_under_train_log_z"] != base["vae"]
    _, parents, children = _parents_and_children(root)
    by_name = set(parents["tags.mlflow.runName"])
    assert {"zdim8", "seed2"} <= by_name, by_name
    for name, stages in (("zdim8", {"train", "estimate-nll"}), ("seed2", {"sample-mala", "compute-fid"})):
        pid = parents[parents["tags.mlflow.runName"] == name]["run_id"].iloc[0]
        kids = children[children["tags.mlflow.parentRunId"] == pid]
        assert stages <= set(kids["tags.dvc.stage"]), name
    fid_kid = children[
        (children["tags.mlflow.parentRunId"] == parents[parents["tags.mlflow.runName"] == "seed2"]["run_id"].iloc[0])
        & (children["tags.dvc.stage"] == "compute-fid")
    ]
    assert len(fid_kid) == 1 and fid_kid["metrics.fid"].notna().all()


def torch_load_zdim(path: Path) -> int:
    import torch

    return int(torch.load(path, weights_only=True)["model_spec"]["zdim"])
