"""scripts/study_converged.py: the converged study's runs, what is left of them, and how a finished
run is copied into the study (the runs themselves take hours: README "The converged study")."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.imports import load_script
from vaepp.config import parse_params, resolve_run

study = load_script("study_converged")
ROOT = study.ROOT


def _resolved() -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    runs = study.study_runs()
    raw["runs"].update(runs)
    params = parse_params(raw)
    return {name: resolve_run(params, name) for name in runs}


def test_every_run_trains_to_early_stopping_or_a_cap_of_200_and_scores_every_test_image():
    runs = _resolved()
    assert {r.prior for r in runs.values()} == {"standard", "vampprior", "lars", "certified", "pullback"}
    for name, r in runs.items():
        assert r.train.epochs >= 200 and r.train.patience is not None and r.train.log_z_every >= 1, name
        assert r.data.n_test is None and r.data.n_valid == 10000, name  # all 10 000; the 50k/10k split
        assert r.nll.n_importance >= 1000, name
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, r in runs.items():  # the default networks
        assert (r.model.arch, r.model.zdim, list(r.model.hidden)) == (
            default["model"]["arch"],
            default["model"]["zdim"],
            default["model"]["hidden"],
        ), name


def test_the_plain_vae_and_the_certified_prior_have_two_seeds_with_the_default_runs_settings():
    runs = _resolved()
    for prior in ("standard", "certified"):
        seeds = sorted(r.train.seed for r in runs.values() if r.prior == prior)
        assert len(seeds) >= 2 and len(set(seeds)) == len(seeds), prior
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = parse_params(raw)
    default_certified = resolve_run(params, "certified")
    for r in runs.values():
        if r.prior == "certified":  # its own settings, as the default study's certified run
            assert r.train.penalty_k == default_certified.train.penalty_k
            assert r.model.acceptance_c_init == default_certified.model.acceptance_c_init
            assert r.mala.n_steps == default_certified.mala.n_steps


def test_runs_left_skips_the_copied_ones(tmp_path):
    runs = {"a": {}, "b": {}, "c": {}}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "nll.json").write_text("{}")
    (tmp_path / "c").mkdir()  # a folder without its NLL is not a finished run
    assert study.runs_left(runs, tmp_path) == ["a", "c"]
    assert study.runs_left(runs, tmp_path, only=["b", "c"]) == ["c"]


def _fake_work(work, run):
    for sub in ("metrics", "plots", "models"):
        (work / sub / run).mkdir(parents=True)
    for kind in ("train", "latent_gan", "nll", "mala", "fid"):
        (work / "metrics" / run / f"{kind}.json").write_text(json.dumps({"kind": kind}))
    (work / "metrics" / run / "nll_per_image.csv").write_text("image,nll_nats\n0,90.0\n")
    (work / "plots" / run / "train_curve.csv").write_text("epoch,loss\n1,100.0\n")
    (work / "models" / run / "vae.pt").write_bytes(b"model")


def test_collect_copies_a_run_whole_with_its_model_and_records_it(tmp_path):
    work, dest = tmp_path / "work", tmp_path / "study"
    _fake_work(work, "r")
    dest.mkdir()
    (dest / "r").mkdir()
    (dest / "r" / "stale.json").write_text("{}")  # a leftover of an earlier attempt goes
    manifest = study.new_manifest("abc123", {"r": {"prior": "standard"}})
    study.collect(work, "r", manifest, 12.5, dest)
    files = sorted(p.name for p in (dest / "r").iterdir())
    assert files == sorted(
        ["train.json", "latent_gan.json", "nll.json", "mala.json", "fid.json"]
        + ["nll_per_image.csv", "train_curve.csv", "vae.pt"]
    )
    assert (dest / "r" / "vae.pt").read_bytes() == b"model"
    assert not (dest / ".r.partial").exists()
    saved = json.loads((dest / "manifest.json").read_text())
    assert saved["commit"] == "abc123" and saved["finished"]["r"]["lane_seconds"] == 12.5
    assert saved["runs"] == {"r": {"prior": "standard"}} and "cores" in saved["machine"]
    # a run whose outputs are incomplete is not collected, and leaves no folder that looks done
    _fake_work(work, "s")
    (work / "metrics" / "s" / "fid.json").unlink()
    with pytest.raises(FileNotFoundError):
        study.collect(work, "s", manifest, 1.0, dest)
    assert study.runs_left({"s": {}}, dest) == ["s"]


def test_a_clone_is_reused_at_the_studys_commit_only_and_gets_its_runs_once(tmp_path):
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for msg in ("one", "two"):
        (repo / "f").write_text(msg)
        subprocess.run(["git", "-C", str(repo), "add", "f"], check=True)
        subprocess.run(
            ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", msg], check=True
        )
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / "params.yaml").write_text(yaml.safe_dump({"datasets": ["mnist"], "runs": {"vae": {"prior": "standard"}}}))
    runs = {"r": {"prior": "lars", "data": {"dataset": "fashion_mnist"}}}
    study.ensure_clone(repo, head, runs)  # already there at the study's commit: its runs added once
    study.ensure_clone(repo, head, runs)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["runs"] == {"vae": {"prior": "standard"}, **runs} and params["datasets"] == ["mnist", "fashion_mnist"]
    with pytest.raises(RuntimeError, match="defined otherwise"):
        study.ensure_clone(repo, head, {"vae": {"prior": "lars"}})
    with pytest.raises(RuntimeError, match="the study's commit is 0000000000"):
        study.ensure_clone(repo, "0" * 40, {})


def test_bad_arguments_and_a_changed_definition_are_refused_before_any_work(capsys, monkeypatch, tmp_path):
    assert study.main(["--runs", "converged_vae,nope"]) == 2
    assert "no such run nope" in capsys.readouterr().err
    assert study.main(["--jobs", "0"]) == 2
    (tmp_path / "runs.yaml").write_text(yaml.safe_dump({"x": {"prior": "standard"}}))
    (tmp_path / "manifest.json").write_text(json.dumps(study.new_manifest("abc", {"x": {"prior": "lars"}})))
    monkeypatch.setattr(study, "STUDY", tmp_path)
    monkeypatch.setattr(study, "study_runs", lambda: study.yaml.safe_load((tmp_path / "runs.yaml").read_text()))
    monkeypatch.setattr(study, "read_manifest", lambda: json.loads((tmp_path / "manifest.json").read_text()))
    assert study.main(["--dry-run"]) == 2
    assert "differs from the manifest" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_does_nothing(capsys):
    assert study.main(["--dry-run", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "converged study at" in out and ("to run, 1 lane(s)" in out or "7 of 7 runs done" in out)


def test_the_manifest_records_the_shared_sections_the_runs_were_resolved_on(tmp_path, monkeypatch):
    """A finished study's manifest without them gets them from its clone (params.yaml without the
    runs), once; the committed study's are its commit's params.yaml without the runs."""
    work = tmp_path / "cache" / "studies" / "converged" / "abcdef012345" / "repo"
    work.mkdir(parents=True)
    shared = {"profile": "default", "datasets": ["mnist"], "train": {"epochs": 10}}
    (work / "params.yaml").write_text(yaml.safe_dump({**shared, "runs": {"vae": {"prior": "standard"}}}))
    assert study.shared_sections(work) == shared
    runs = {"x": {"prior": "standard"}}
    manifest = study.new_manifest("abcdef0123456789", runs)
    manifest["finished"] = {"x": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "nll.json").write_text("{}")
    monkeypatch.setenv("VAEPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(study, "STUDY", tmp_path)
    monkeypatch.setattr(study, "study_runs", lambda: runs)
    monkeypatch.setattr(study, "read_manifest", lambda: study.json.loads((tmp_path / "manifest.json").read_text()))
    monkeypatch.setattr(study, "write_manifest", lambda m: (tmp_path / "manifest.json").write_text(json.dumps(m)))
    monkeypatch.setattr(study, "runs_left", lambda runs, only=None: [])
    assert study.main(["--dry-run"]) == 0 and "shared" not in json.loads((tmp_path / "manifest.json").read_text())
    assert study.main([]) == 0
    assert json.loads((tmp_path / "manifest.json").read_text())["shared"] == shared
    committed = json.loads((ROOT / "studies" / "converged" / "manifest.json").read_text())
    head = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{committed['commit']}:params.yaml"], capture_output=True, text=True
    )
    if head.returncode == 0:  # a clone with the study's commit in its history
        at_commit = yaml.safe_load(head.stdout)
        assert committed["shared"] == {k: v for k, v in at_commit.items() if k != "runs"}
