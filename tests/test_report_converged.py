"""The report's converged study (`vaepp.report.converged`) on a synthetic studies/converged whose
answers are known: per-image NLLs built with set differences, so each paired gain, its standard
error, the between-seed spread and the verdicts are checked against numpy's own arithmetic; the gain
against epochs on the checks both runs made; the report stage's page, Markdown and `dvc plots`
files; the figure in headless Chromium, each marker at its epoch on a log axis; and the committed
report, which shows every prior whose runs have finished."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from chromium import render, require_chromium
from stage_args import report_files
from test_report import _figure_markers, _report_stage, study  # noqa: F401  (the fixture, used by name)
from vaepp import report
from vaepp.config import load_params
from vaepp.files import read_json

ROOT = Path(__file__).resolve().parents[1]
STUDY = "studies/converged"
N_IMAGES = 400
EVERY = 5  # the study's monitor interval (runs.yaml: train.log_z_every)
# run → (per-image shift against the plain VAE of its seed, the epoch it stopped at); the gain is
# −shift in expectation, and each run's curve is checked every EVERY epochs up to its stop.
SHIFTS = {
    "converged_vae": (0.0, 60),
    "converged_vae_seed1": (0.0, 45),
    "converged_certified": (-1.5, 50),
    "converged_certified_seed1": (-0.9, 70),
    "converged_vampprior": (0.0, 40),
    "converged_lars": (0.8, 35),
}  # converged_vaepp is defined and has not run


def _runs_yaml() -> dict:
    return yaml.safe_load((ROOT / STUDY / "runs.yaml").read_text())


def _seed(name: str) -> int:
    return 1 if name.endswith("_seed1") else 0


def _write_study(root: Path, shifts: dict = SHIFTS, *, other_images: str | None = None) -> dict:
    """studies/converged under root: the manifest (the real runs' definitions) and, for each run of
    `shifts`, its metrics, per-image NLLs and training curve; returns {run: per-image NLLs}. The
    plain VAE of seed s has per-image NLLs base_s; a prior's are base_s + shift + noise.
    other_images: a run whose file scores other test images (its test_index is shifted)."""
    rng = np.random.default_rng(7)
    base = {s: 95.0 + 12.0 * rng.standard_normal(N_IMAGES) for s in (0, 1)}
    folder = root / STUDY
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"commit": "0123456789abcdef" * 2 + "01234567", "machine": "test", "runs": _runs_yaml()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    nlls = {}
    for run, (shift, stop) in shifts.items():
        noise = 0.0 if run.startswith("converged_vae") else 0.3 * rng.standard_normal(N_IMAGES)
        nll = base[_seed(run)] + shift + noise
        nlls[run] = nll
        d = folder / run
        d.mkdir(exist_ok=True)
        index = np.arange(N_IMAGES) + (1 if run == other_images else 0)
        pd.DataFrame({"image": np.arange(N_IMAGES), "nll_nats": nll, "test_index": index}).to_csv(
            d / "nll_per_image.csv", index=False
        )
        (d / "nll.json").write_text(
            json.dumps(
                {
                    "dataset": "mnist",
                    "nll_nats": float(nll.mean()),
                    "nll_stderr": float(nll.std(ddof=1) / math.sqrt(N_IMAGES)),
                    "nll_nats_sub": float(nll.mean()) + 0.4,
                    "n_test_images": N_IMAGES,
                    "log_z_headline": "exact",
                    "nll_vae_prior_nats": float(nll.mean()) + 2.0,
                    "paper_protocol": {"nll_nats": float(nll.mean()) + 1.0},
                }
            )
        )
        (d / "train.json").write_text(
            json.dumps({"epochs_trained": stop, "best_epoch": stop - 20, "stopped_early": run != "converged_vae"})
        )
        (d / "fid.json").write_text(json.dumps({"fid": 50.0 + shift}))
        epoch = np.arange(1, stop + 1)
        valid = np.where(epoch % EVERY == 0, 150.0 / np.sqrt(epoch) + 85.0 + shift * np.log(epoch), np.nan)
        pd.DataFrame({"epoch": epoch, "loss": 100.0 + 0 * epoch, "monitor_valid_nll": valid}).to_csv(
            d / "train_curve.csv", index=False
        )
    return nlls


def _load(root: Path, ten_epoch: dict | None = None) -> report.ConvergedStudy:
    params = load_params(ROOT / "params.yaml")
    return report.converged_study(root, STUDY, params, report_files(), ten_epoch or {})


def _paired(mine: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    d = theirs - mine
    return d.mean(), d.std(ddof=1) / math.sqrt(len(d))


def test_each_run_gains_over_the_plain_vae_of_its_seed_image_by_image(tmp_path):
    nlls = _write_study(tmp_path)
    c = _load(tmp_path)
    t = c.table.set_index("run")
    assert set(t.index) == set(_runs_yaml())  # every defined run has a row
    for run in SHIFTS:
        assert t.loc[run, "nll"] == pytest.approx(nlls[run].mean(), rel=1e-12)
        assert t.loc[run, "status"] == "finished" and t.loc[run, "n_images"] == N_IMAGES
        if run.startswith("converged_vae"):
            assert pd.isna(t.loc[run, "against"]) and pd.isna(t.loc[run, "gain"])
            continue
        vae = "converged_vae_seed1" if _seed(run) else "converged_vae"
        gain, se = _paired(nlls[run], nlls[vae])
        assert t.loc[run, "against"] == vae
        assert t.loc[run, "gain"] == pytest.approx(gain, rel=1e-10) and t.loc[run, "gain_se"] == pytest.approx(se)
        # the per-image noise is 0.3 nats: the paired se is its sd / √n, not the NLL's 12-nat spread
        assert se == pytest.approx(0.3 / math.sqrt(N_IMAGES), rel=0.15)
        assert abs(gain + SHIFTS[run][0]) < 4 * se
    assert t.loc["converged_vaepp", "status"] == "not run yet" and pd.isna(t.loc["converged_vaepp", "gain"])
    assert t.loc["converged_certified", "epochs_trained"] == 50 and t.loc["converged_certified", "best_epoch"] == 30


def test_runs_scoring_other_images_are_not_paired(tmp_path):
    _write_study(tmp_path, other_images="converged_lars")
    t = _load(tmp_path).table.set_index("run")
    assert t.loc["converged_lars", "against"] == "converged_vae" and pd.isna(t.loc["converged_lars", "gain"])
    assert not pd.isna(t.loc["converged_certified", "gain"])


def test_gains_over_seeds_carry_the_test_and_between_seed_errors_and_the_verdicts(tmp_path):
    _write_study(tmp_path)
    ten = {"certified": (1.1, 0.1, "certified"), "vampprior": (4.3, 0.12, "vampprior"), "lars": (0.9, 0.09, "lars")}
    c = _load(tmp_path, ten)
    t = c.table.set_index("run")
    g = c.gains.set_index("algorithm")
    both = t.loc[["converged_certified", "converged_certified_seed1"]]
    gains, ses = both["gain"].astype(float).to_numpy(), both["gain_se"].astype(float).to_numpy()
    assert g.loc["certified", "seeds"] == "0, 1"
    assert g.loc["certified", "gain"] == pytest.approx(gains.mean())
    assert g.loc["certified", "test_se"] == pytest.approx(math.sqrt((ses**2).sum()) / 2)
    assert g.loc["certified", "seed_sd"] == pytest.approx(abs(gains[0] - gains[1]) / math.sqrt(2))
    err = math.sqrt(g.loc["certified", "test_se"] ** 2 + g.loc["certified", "seed_sd"] ** 2 / 2)
    assert g.loc["certified", "error"] == pytest.approx(err)
    # certified: a gain at 10 epochs and now (≈ 1.2 ± 0.3); VampPrior: ≈ 0 now; LARS: a loss now
    assert (g.loc["certified", "verdict"], g.loc["certified", "held"]) == ("better", "held")  # 1.1 → 1.2 ± 0.3
    assert (g.loc["vampprior", "verdict"], g.loc["vampprior", "held"]) == ("indistinguishable", "vanished")
    assert (g.loc["lars", "verdict"], g.loc["lars", "held"]) == ("worse", "reversed")
    # one seed: no between-seed sd, the error is the test-set one
    assert pd.isna(g.loc["lars", "seed_sd"]) and g.loc["lars", "error"] == pytest.approx(g.loc["lars", "test_se"])
    assert g.loc["lars", "gain_10"] == 0.9 and g.loc["lars", "verdict_10"] == "better"


@pytest.mark.parametrize(("gain_10", "word"), [(0.3, "held, grew"), (1.1, "held"), (2.5, "held, shrank")])
def test_a_gain_that_held_says_whether_it_grew_or_shrank_beyond_two_errors(tmp_path, gain_10, word):
    _write_study(tmp_path)
    g = _load(tmp_path, {"certified": (gain_10, 0.1, "certified")}).gains.set_index("algorithm")
    assert g.loc["certified", "gain"] == pytest.approx(1.19, abs=0.01) and g.loc["certified", "error"] < 0.33
    assert g.loc["certified", "held"] == word


@pytest.mark.parametrize(
    ("ten", "now", "word"),
    [
        ("better", "better", "held"),
        ("better", "indistinguishable", "vanished"),
        ("worse", "worse", "still a loss"),
        ("worse", "better", "reversed to a gain"),
        ("indistinguishable", "better", "a gain appeared"),
    ],
)
def test_held_says_what_became_of_the_10_epoch_verdict(ten, now, word):
    from vaepp.report.converged import _held

    assert _held(ten, now) == word


def test_sentences_say_whether_each_gain_held_the_anchor_and_the_target(tmp_path):
    nlls = _write_study(tmp_path)
    c = _load(tmp_path, {"certified": (1.1, 0.1, "certified"), "vampprior": (4.3, 0.12, "vampprior")})
    text = "\n".join(c.sentences)
    assert "certified prior: +1.10 ± 0.10 at 10 epochs (better)" in text and ": held." in text
    assert "VampPrior: +4.30 ± 0.12 at 10 epochs (better)" in text and ": vanished." in text
    assert "LARS:" in text and "no 10-epoch run to compare" in text
    plain = (nlls["converged_vae"].mean() + nlls["converged_vae_seed1"].mean()) / 2
    assert f"Plain VAE: {plain:.2f} nats" in text
    assert f"{plain - 86.76:+.2f} against the IWAE paper's one-layer VAE (86.76): not within 3 nats" in text
    assert "the certified prior's gain is at least the VampPrior's" in text
    assert "VampPrior +2.02 (Tomczak & Welling, 2018); Exemplar VAE +2.36 (Norouzi et al., 2020)" in text


def test_the_plain_vae_within_3_nats_of_the_anchor_says_so(tmp_path):
    _write_study(tmp_path, {k: v for k, v in SHIFTS.items() if k.startswith("converged_vae")})
    for run in ("converged_vae", "converged_vae_seed1"):
        f = tmp_path / STUDY / run / "nll.json"
        f.write_text(json.dumps({**read_json(f), "nll_nats": 88.0}))  # 1.24 nats above 86.76
    text = "\n".join(_load(tmp_path).sentences)
    assert "Plain VAE: 88.00 nats (seeds: 88.00, 88.00), +1.24 against" in text and ": within 3 nats." in text


def test_gain_against_epochs_uses_the_checks_both_runs_made(tmp_path):
    _write_study(tmp_path)
    curves = _load(tmp_path).curves
    cert = curves[curves["run"] == "converged_certified"]
    assert list(cert["epoch"]) == list(range(EVERY, 51, EVERY))  # it stopped at 50, its VAE at 60
    seed1 = curves[curves["run"] == "converged_certified_seed1"]
    assert list(seed1["epoch"]) == list(range(EVERY, 46, EVERY))  # its VAE (seed 1) stopped at 45
    expect = -SHIFTS["converged_certified"][0] * np.log(cert["epoch"].to_numpy())
    assert np.allclose(cert["gain"], expect) and np.allclose(cert["gain"], cert["nll_vae"] - cert["nll"])
    series = report.gain_series(curves)
    assert sorted(series) == ["certified.csv", "lars.csv", "vampprior.csv"]
    s = series["certified.csv"].set_index("epoch")
    both = curves[curves["algorithm"] == "certified"].pivot(index="epoch", columns="run", values="gain")
    assert np.allclose(s["gain"], both.mean(axis=1)) and np.allclose(s["gain_low"], both.min(axis=1))
    assert list(s["n_seeds"]) == [2] * 9 + [1]  # epoch 50: only seed 0 made both checks


def test_runs_are_read_with_the_shared_sections_the_study_recorded_under_any_profile(tmp_path):
    """Under a profile whose settings reject the study's runs (the tiny one: 64 validation images
    against the monitor's 1000), the manifest's `shared` sections resolve them as they ran; without
    them the runs are resolved on the profile's, which is a clear error."""
    from vaepp.config import ParamsError

    nlls = _write_study(tmp_path)
    tiny = load_params(ROOT / "tests" / "profiles_tiny.yaml")
    with pytest.raises(ParamsError, match="valid_images = 1000: more than the 64 validation images"):
        report.converged_study(tmp_path, STUDY, tiny, report_files(), {})
    manifest = read_json(tmp_path / STUDY / "manifest.json")
    shared = yaml.safe_load((ROOT / "params.yaml").read_text())
    manifest["shared"] = {k: v for k, v in shared.items() if k != "runs"}
    (tmp_path / STUDY / "manifest.json").write_text(json.dumps(manifest))
    c = report.converged_study(tmp_path, STUDY, tiny, report_files(), {})
    t = c.table.set_index("run")
    assert t.loc["converged_lars", "gain"] == pytest.approx(_paired(nlls["converged_lars"], nlls["converged_vae"])[0])


def test_a_study_without_a_manifest_is_not_shown(tmp_path):
    assert _load(tmp_path) is None


def _marks(page: str) -> dict[str, list[float]]:
    """{gid: marker x positions} of the converged study's figure groups (ids "converged-…")."""
    return _figure_markers(page, "converged-")


def _assert_log_axis(xs: list[float], epochs: np.ndarray) -> None:
    """Marker x positions are a + b·log(epoch), b > 0: each check drawn at its epoch on a log axis."""
    assert len(xs) == len(epochs)
    slope, icpt = np.polyfit(np.log(epochs), xs, 1)
    assert slope > 0 and np.abs(icpt + slope * np.log(epochs) - xs).max() < 1e-3 * np.ptp(xs) + 0.01


def test_report_stage_shows_the_study_and_writes_its_plot_files(study, monkeypatch):  # noqa: F811
    root, params, _ = study
    _write_study(root)
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    assert _report_stage(root, params, monkeypatch) == 0
    page = (root / "reports" / "index.html").read_text()
    assert "id='converged'" in page and "studies/converged @ 01234567" in page
    marks = _marks(page)
    curves = _load(root).curves
    for alg in ("certified", "vampprior", "lars"):
        epochs = np.sort(curves.loc[curves["algorithm"] == alg, "epoch"].unique())
        _assert_log_axis(marks[f"converged-gain-{alg}"], epochs)
    assert "converged-band-certified" in marks and "converged-band-lars" not in marks  # a band needs two seeds
    files = sorted(p.name for p in (root / "reports" / "converged").iterdir())
    assert files == ["certified.csv", "lars.csv", "vampprior.csv"]
    line = pd.read_csv(root / "reports" / "converged" / "lars.csv")
    assert list(line.columns) == ["epoch", "gain", "gain_low", "gain_high", "n_seeds"]
    md = (root / "reports" / "tables.md").read_text()
    assert "## The converged study's runs" in md and "not run yet" in md and "converged_vaepp" in md
    assert "| converged_certified | certified | 0 | 50 | 30 | yes | 400 |" in md  # counts as integers
    assert "| converged_vaepp | vaepp | 0 |  |  |  |  | not run yet |" in md
    assert "| converged_vae | vae | 0 | 60 | 40 | no: the cap | 400 |" in md  # reached the cap (SHIFTS)
    wide = md.split("## The gain against epochs")[1].split("\n| epoch | ")[1].split("\n")[0]
    assert wide == "certified | certified range | vampprior | lars |"
    at10 = curves[(curves["algorithm"] == "certified") & (curves["epoch"] == 10)]["gain"].mean()
    assert f"| 10 | {at10:.2f} | [" in md


def test_a_study_with_no_pair_yet_says_so(study, monkeypatch):  # noqa: F811
    root, params, _ = study
    _write_study(root, {k: v for k, v in SHIFTS.items() if k.startswith("converged_certified")})
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    assert _report_stage(root, params, monkeypatch) == 0
    md = (root / "reports" / "tables.md").read_text()
    assert md.count(report.render.NO_GAIN_YET) == 2 and "| 90." not in md.split("## The gain against epochs")[1]
    assert not list((root / "reports" / "converged").iterdir())
    assert "no prior has finished beside a plain VAE of its seed" in (root / "reports" / "index.html").read_text()


def test_chromium_draws_the_gain_against_epochs_on_a_log_axis(study, monkeypatch):  # noqa: F811
    require_chromium()
    root, params, _ = study
    _write_study(root)
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    assert _report_stage(root, params, monkeypatch) == 0
    dom = render(root / "reports" / "index.html", width=1400, height=3000, dom=True)
    marks = _marks(dom)
    curves = _load(root).curves
    for alg in ("certified", "vampprior", "lars"):
        epochs = np.sort(curves.loc[curves["algorithm"] == alg, "epoch"].unique())
        _assert_log_axis(marks[f"converged-gain-{alg}"], epochs)


def test_committed_report_draws_every_prior_whose_runs_finished():
    """The committed report (what `make repro` writes from the committed studies/converged) draws
    the gain against epochs of every prior that has a finished run and a finished plain VAE of the
    same seed, one marker per check both made, in Chromium as in the file."""
    require_chromium()
    manifest = read_json(ROOT / STUDY / "manifest.json")
    finished = set(manifest.get("finished", {}))
    runs = _runs_yaml()
    vae = {
        int(spec.get("train", {}).get("seed", 0))
        for r, spec in runs.items()
        if spec["prior"] == "standard" and r in finished
    }
    algorithm = {"certified": "certified", "vampprior": "vampprior", "lars": "lars", "pullback": "vaepp"}
    want = {
        algorithm[spec["prior"]]
        for r, spec in runs.items()
        if r in finished and spec["prior"] != "standard" and int(spec.get("train", {}).get("seed", 0)) in vae
    }
    page = ROOT / "reports" / "index.html"
    dom_marks = _marks(render(page, width=1400, height=9000, dom=True))
    file_marks = _marks(page.read_text())
    drawn = {k.removeprefix("converged-gain-") for k in file_marks if k.startswith("converged-gain-")}
    assert drawn == want
    for alg in want:
        assert len(dom_marks[f"converged-gain-{alg}"]) == len(file_marks[f"converged-gain-{alg}"]) >= 2
        line = pd.read_csv(ROOT / "reports" / "converged" / f"{alg}.csv")
        _assert_log_axis(file_marks[f"converged-gain-{alg}"], line["epoch"].to_numpy())
