"""Smoke tests of the benchmarks (`make bench`): every code path on tiny sizes, and the FLOP
counts from layer shapes checked against torch's own count of the matmuls a step executes.
No timing is asserted: the numbers depend on the machine and its load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench import compute, fid_bench, pipeline, run_all
from bench.common import net_flops

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "profiles_tiny.yaml"


def _params(tmp_path: Path, **model) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["model"].update(model)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_net_flops_from_shapes():
    """Linear: 2·in·out per row; Conv2d: 2·(C_in·k²)·C_out·H_out·W_out per image."""
    mlp = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))
    f = net_flops(mlp, torch.randn(5, 10))
    assert f.forward == 2 * (10 * 7 + 7 * 3) and f.first_layer == 2 * 10 * 7
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Conv2d(4, 6, 1))
    f = net_flops(conv, torch.randn(2, 1, 28, 28))  # 28 → 14
    assert f.forward == 2 * (1 * 9 * 4 * 14 * 14 + 4 * 1 * 6 * 14 * 14)


@pytest.mark.parametrize("arch", ["mlp", "resnet"])
@pytest.mark.parametrize("run", ["vae", "vaepp"])
def test_train_step_flops_match_executed_matmuls(tmp_path, arch, run):
    """The shape-based count of one step (3F per trained layer, 6F for the penalty, no input
    gradient into data) equals torch's FlopCounterMode total: to 0.1% for the MLPs; for the
    ResNets torch's conv double backward executes ~6.35F instead of 6F for the penalty, so the
    count stays below the executed total by less than 2%. (Algorithm 1's critic step
    differentiates w.r.t. a leaf inside autograd.grad, which FlopCounterMode cannot trace.)"""
    from vaepp.study import train_algorithm, train_params
    from vaepp.train import make_optimizers, train_step

    params = _params(tmp_path, arch=arch, channels=[4, 8, 8])
    b = compute.build(params, run)
    train, algorithm = train_params(b.run, b.binary), train_algorithm(b.run)
    model = b.model.train()
    opts = make_optimizers(model, train, algorithm)
    e = compute.random_images(train.batch_size, b.image_shape)
    with FlopCounterMode(display=False) as counter:
        train_step(model, opts, e, train, algorithm, n_train=b.n_train)
    counted = compute.train_step_flops(algorithm, b, train.batch_size, train.n_prior_samples)
    executed = counter.get_total_flops()
    if arch == "mlp":
        assert counted == pytest.approx(executed, rel=1e-3)
    else:
        assert executed * (1 - 0.02) < counted <= executed * (1 + 1e-3)


def test_vaepp_step_costs_about_three_vae_steps():
    """FLOP arithmetic for the default networks: a VAEPP step ≈ 3× a VAE step, and Naive
    VAEPP (two steps) more than VAEPP."""
    params = ROOT / "params.yaml"
    cost = {
        run: compute.train_step_flops(
            {"vae": "vae", "naive": "naive_vaepp", "vaepp": "vaepp"}[run],
            compute.build(params, "vae" if run == "vae" else "vaepp"),
            128,
            128,
        )
        for run in ("vae", "naive", "vaepp")
    }
    assert 3.0 < cost["vaepp"] / cost["vae"] < 4.5
    assert cost["naive"] > cost["vaepp"]


def test_run_all_quick_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert run_all.main(["--quick", "--params", str(TINY), "--no-fid", "--no-pipeline", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["quick"] is True
    threads = run_all.thread_counts()
    assert sorted(res["compute"]) == sorted(str(n) for n in threads)
    for block in res["compute"].values():
        assert block["matmul"]["peak_gflops"] > 0
        nll = block["nll"]
        assert nll["n_images"] * nll["n_importance"] == pytest.approx(nll["samples_per_s"] * nll["seconds_best"])
        assert nll["seconds_for_1e8_samples"] == pytest.approx(1e8 / nll["samples_per_s"])
        assert set(block["train"]) == {"vae", "naive_vaepp", "vaepp"}
        for r in block["train"].values():
            assert r["seconds_per_epoch"] == pytest.approx(r["seconds_per_step"] * (512 // 64))
            assert r["seconds_per_epoch_median"] >= r["seconds_per_epoch"]
            assert math.isfinite(r["gflops"]) and r["gflops"] > 0
        assert block["train"]["vae"]["gflops_ratio_to_vae"] == 1.0
        assert block["mala"]["n_chains"] == 20 and block["mala"]["chain_steps_per_s"] > 0
    assert torch.get_num_threads() == threads[0]  # restored after the single-thread block
    printed = capsys.readouterr().out
    for figure in ("NLL achieved / matmul limit", "train vaepp GFLOP/s / vae's", "MALA / FLOP limit", "whole bench"):
        assert figure in printed
        assert any(row["figure"].endswith(figure) for row in res["table"])


def test_unknown_dataset_is_named(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["dataset"] = "celeba"
    raw["datasets"] = ["celeba"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"p\.yaml: data\.dataset = 'celeba'"):
        compute.build(path, "vae")


def test_png_round_trip_is_exact(tmp_path):
    """The CLI and vaepp read the same pixels: PNG save/load returns the uint8 values / 255."""
    raw = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fid_bench.save_pngs(raw, tmp_path)
    assert torch.equal(fid_bench.load_pngs(tmp_path), raw.float() / 255.0)
    assert float(fid_bench.FID_LINE.findall("100%|##| 1/1\nFID:  12.5\n")[-1]) == 12.5


def test_pipeline_overhead_paths(tmp_path):
    assert "stages.train" in pipeline.stage_modules() and "stages.__init__" not in pipeline.stage_modules()
    assert pipeline.dvc_noop(tmp_path) == {"measured": False, "reason": "no pipeline outputs (no dvc.lock)"}
    times = pipeline.import_times(["stages.common"])
    assert times["python_start_s"] > 0 and times["modules"]["stages.common"] >= 0


@pytest.mark.slow
def test_fid_bench_agrees_with_pytorch_fid_cli(tmp_path):
    """Two images per set through vaepp.fid in process, in a fresh process from PNGs and cached
    statistics, and through `python -m pytorch_fid` on the same PNGs and vaepp's cache file: the
    same FID. Slow: two fresh processes each load Inception and take a 2048² matrix square root."""
    torch_home, wheels = run_all._stage_paths()
    res = fid_bench.fid_bench(tmp_path, torch_home, wheels, n_images=2, batch_size=50, n_reference=10)
    e2e = res["end_to_end"]
    assert e2e["measured"]
    assert e2e["fid_vaepp_process"] == pytest.approx(res["fid_in_process"], rel=1e-6)
    assert e2e["fid_relative_difference_cli"] < 1e-3
    assert res["fid_in_process"] > 1.0  # B is a darker copy of A: clearly different sets
    assert res["reference_cache_hit_s"] < res["reference_cache_miss_s"]


def test_fid_bench_skips_end_to_end_when_over_budget(tmp_path):
    """Under a budget too small for two Inception processes, the comparison is skipped and says
    why, while the in-process figures are still measured."""
    torch_home, wheels = run_all._stage_paths()
    res = fid_bench.fid_bench(tmp_path, torch_home, wheels, n_images=2, batch_size=50, n_reference=10, seconds_left=1.0)
    assert res["end_to_end"]["measured"] is False and "budget" in res["end_to_end"]["reason"]
    assert res["vaepp_images_per_s"] > 0 and res["fid_in_process"] > 1.0
