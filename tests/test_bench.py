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
@pytest.mark.parametrize(
    ("run", "penalty_k"), [("vae", None), ("vaepp", None), ("certified", None), ("certified", 0.0)]
)
def test_train_step_flops_match_executed_matmuls(tmp_path, arch, run, penalty_k):
    """The shape-based count of one step (3F per trained layer, 6F for the penalty, no input
    gradient into data) equals torch's FlopCounterMode total: to 0.1% for the MLPs; for the
    ResNets torch's conv double backward executes ~6.35F instead of 6F for the penalty, so the
    count stays below the executed total by less than 2%. The certified prior's step, with its
    penalty and without (train.penalty_k = 0, its default run), is counted as Algorithm 2's.
    (Algorithm 1's critic step differentiates w.r.t. a leaf inside autograd.grad, which
    FlopCounterMode cannot trace.)"""
    from vaepp.resolve import method, train_params
    from vaepp.train import make_optimizers, train_step

    params = _params(tmp_path, arch=arch, channels=[4, 8, 8])
    if penalty_k is not None:
        raw = yaml.safe_load(params.read_text())
        raw["train"]["penalty_k"] = penalty_k
        params.write_text(yaml.safe_dump(raw))
    b = compute.build(params, run)
    train = train_params(b.run, b.binary)
    assert method(b.run) == run
    model = b.model.train()
    opts = make_optimizers(model, train)
    e = compute.random_images(train.batch_size, b.image_shape)
    with FlopCounterMode(display=False) as counter:
        train_step(model, opts, e, train, n_train=b.n_train)
    penalty = train.penalty_k > 0
    counted = compute.train_step_flops(method(b.run), b, train.batch_size, train.n_prior_samples, penalty=penalty)
    executed = counter.get_total_flops()
    if arch == "mlp" or not penalty:
        assert counted == pytest.approx(executed, rel=1e-3)
    else:
        assert executed * (1 - 0.02) < counted <= executed * (1 + 1e-3)
    if run == "certified":  # the penalty's 6D per pair is the whole difference
        without = compute.train_step_flops("certified", b, train.batch_size, train.n_prior_samples, penalty=False)
        m = min(train.batch_size, train.n_prior_samples)
        assert counted - without == (6 * m * b.crit.forward if penalty else 0)


def test_minimal_vae_loss_is_the_plain_vae_loss(tmp_path, monkeypatch):
    """The bench's minimal step (its reference for the plain VAE's step) computes the same loss and
    gradients as `vaepp.train.model_loss` of a plain VAE with a Normal posterior, given the same ε:
    the Normals' constants cancel. Random output layers, so μ and log σ are not zero and the
    log-σ floor does not bind; float32 rounding only."""
    from vaepp import model as model_module
    from vaepp.resolve import train_params
    from vaepp.train import model_loss

    b = compute.build(_params(tmp_path, posterior="normal"), "vae")
    model = b.model.train()
    torch.manual_seed(3)
    for layer in (model.encoder.output_layer, model.decoder.output_layer):
        nn.init.normal_(layer.weight, std=0.1)
        nn.init.normal_(layer.bias, std=0.1)
    spec = train_params(b.run, b.binary)
    e = compute.random_images(spec.batch_size, b.image_shape)
    eps = torch.randn(spec.batch_size, model.zdim)
    monkeypatch.setattr(model_module, "sample_standard", lambda kind, shape, **kw: eps.reshape(shape))
    ours, _ = model_loss(model, e, spec.batch_size, spec, n_train=b.n_train)
    theirs = compute.minimal_vae_loss(model, e, eps)
    assert float(model.encode(e)[1].min()) > b.run.model.log_sigma_min  # the floor does not bind
    assert float(theirs) == pytest.approx(float(ours), rel=1e-5)
    params = [*model.encoder.parameters(), *model.decoder.parameters()]
    for g_ours, g_theirs in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params), strict=True):
        torch.testing.assert_close(g_theirs, g_ours, rtol=1e-4, atol=1e-6)


def test_minimal_vae_step_refuses_other_models(tmp_path):
    with pytest.raises(ValueError, match="Bernoulli plain VAE"):
        compute.minimal_vae_step(compute.build(_params(tmp_path, n_flows=2), "vae"), 1e-3)


def test_train_step_flops_refuse_what_they_do_not_count(tmp_path):
    """An acceptance MLP on z and a prior without a count (LARS) are errors, not silent undercounts."""
    b = compute.build(_params(tmp_path, acceptance_mlp=[8]), "certified")
    with pytest.raises(ValueError, match="acceptance MLP"):
        compute.train_step_flops("certified", b, 64, 64)
    with pytest.raises(ValueError, match="no FLOP count for the method 'lars'"):
        compute.train_step_flops("lars", b, 64, 64)


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


def test_ais_flops_are_two_network_passes(tmp_path):
    """One AIS transition per chain evaluates log f and its input gradient: FlopCounterMode's count
    equals 2·(G + D) from the layer shapes (decoder and critic forward, then their input gradients;
    no weight gradients), as MALA's chain-step."""
    b = compute.build(_params(tmp_path), "vaepp")
    res = compute.ais_bench(b, n_temps=2, repeats=1, peak_gflops=10.0)
    assert res["flops_per_transition"] == 2 * (b.dec.forward + b.crit.forward)
    assert res["limit_transitions_per_s"] == pytest.approx(10e9 / res["flops_per_transition"])
    assert res["n_chains"] == 16 and res["n_seeds"] == 2  # the tiny profile's nll.log_z
    assert res["transitions_per_s"] == pytest.approx(16 * 2 * 2 / res["seconds_best"])


def test_inception_flops_count_the_299_input():
    """The count runs on 299×299 inputs through vaepp.fid's feature path: a 3×3 stride-2
    convolution to 2 channels costs 2·(3·9)·2·149² FLOPs per image."""
    net = nn.Conv2d(3, 2, 3, stride=2)
    assert fid_bench.inception_flops_per_image(net) == 2 * (3 * 9) * 2 * 149 * 149


def test_run_all_quick_writes_table_and_json(tmp_path, capsys, monkeypatch):
    """Every path of the bench on tiny sizes, FID included (its two end-to-end processes skipped:
    no budget left for them), and the four headline figures in the table and the JSON."""
    monkeypatch.setattr(run_all, "BUDGET_S", run_all.RESERVE_S)  # no time left for the end-to-end FID
    out = tmp_path / "bench.json"
    assert run_all.main(["--quick", "--params", str(TINY), "--no-pipeline", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["quick"] is True
    threads = run_all.thread_counts()
    assert sorted(res["compute"]) == sorted(str(n) for n in threads)
    for block in res["compute"].values():
        assert block["matmul"]["peak_gflops"] > 0
        nll = block["nll"]
        assert nll["n_images"] * nll["n_importance"] == pytest.approx(nll["samples_per_s"] * nll["seconds_best"])
        assert nll["seconds_for_1e8_samples"] == pytest.approx(1e8 / nll["samples_per_s"])
        assert set(block["train"]) == {"vae", "naive_vaepp", "vaepp", "certified", compute.MINIMAL}
        for r in block["train"].values():
            assert r["seconds_per_epoch"] == pytest.approx(r["seconds_per_step"] * (512 // 64))
            assert r["seconds_per_epoch_median"] >= r["seconds_per_epoch"]
            assert math.isfinite(r["gflops"]) and r["gflops"] > 0
        assert block["train"]["vae"]["gflops_ratio_to_vae"] == 1.0
        assert block["mala"]["n_chains"] == 20 and block["mala"]["chain_steps_per_s"] > 0
        ais = block["ais"]
        assert (ais["n_seeds"], ais["n_chains"], ais["n_temps"]) == (2, 16, run_all.QUICK["ais_temps"])
        assert ais["ratio_to_limit"] == pytest.approx(ais["transitions_per_s"] / ais["limit_transitions_per_s"])
    assert torch.get_num_threads() == threads[0]  # restored after the single-thread block
    printed = capsys.readouterr().out
    for figure in (
        "NLL achieved / matmul limit",
        "train vaepp GFLOP/s / vae's",
        "train vae GFLOP/s / vae_minimal's",
        "MALA / FLOP limit",
        "AIS / FLOP limit",
        "whole bench",
    ):
        assert figure in printed
        assert any(row["figure"].endswith(figure) for row in res["table"])

    fid = res["fid"]
    assert fid["end_to_end"]["measured"] is False
    assert fid["batch_images"] == run_all.QUICK["fid_rate_batch"] and fid["batch_images_per_s"] > 0
    assert 1.1e10 < fid["inception_flops_per_image"] < 1.2e10  # Inception v3 at 299²: 5.7 G multiply-adds

    head = res["headline"]
    default = res["compute"][str(threads[0])]
    assert head["threads"] == threads[0]
    assert head["matmul_gflops"] == pytest.approx(default["matmul"]["peak_gflops"])
    figures = head["figures"]
    assert set(figures) == set(run_all.TARGETS)
    assert run_all.TARGETS == {
        "fid_inception": 0.65,
        "nll": 0.6,
        "ais": 0.6,
        "train_vae": 0.5,
        "train_certified": 0.5,
    }
    assert run_all.TARGETS_ONE_THREAD == {"train_vae": 0.6, "train_certified": 0.6}
    for name, f in figures.items():
        for key in ("measured", "flops_per_unit", "limit", "ratio"):
            assert math.isfinite(f[key]) and f[key] > 0, (name, key)
        assert f["limit"] == pytest.approx(head["matmul_gflops"] * 1e9 / f["flops_per_unit"])
        assert f["ratio"] == pytest.approx(f["measured"] / f["limit"])
        assert f["target"] == run_all.TARGETS[name] and f["met"] == (f["ratio"] >= f["target"])
        rows = [r for r in res["table"] if r["figure"] == f"★ [{threads[0]} thr] {f['figure']}"]
        assert len(rows) == 1 and rows[0]["target"] == f">= {f['target']:.2f}" and rows[0]["met"] == f["met"]
        assert rows[0]["value"].startswith(f"{f['ratio']:.2f} (") and rows[0]["figure"] in printed
    # the headline figures are the default thread count's block, against its final matmul limit
    assert figures["fid_inception"]["measured"] == fid["batch_images_per_s"]
    assert figures["fid_inception"]["flops_per_unit"] == fid["inception_flops_per_image"]
    assert figures["nll"]["ratio"] == pytest.approx(default["nll"]["ratio_to_matmul"])
    assert figures["ais"]["ratio"] == pytest.approx(default["ais"]["ratio_to_limit"])
    assert figures["train_vae"]["ratio"] == pytest.approx(default["train"]["vae"]["ratio_to_matmul"])
    assert figures["train_certified"]["ratio"] == pytest.approx(default["train"]["certified"]["ratio_to_matmul"])
    # the training figures at one thread too, against their own targets, when the default is more
    one = head["one_thread"]
    if threads[0] > 1:
        assert one["threads"] == 1 and set(one["figures"]) == set(run_all.TARGETS_ONE_THREAD)
        for name, f in one["figures"].items():
            run = name.removeprefix("train_")
            assert f["ratio"] == pytest.approx(res["compute"]["1"]["train"][run]["ratio_to_matmul"])
            assert f["target"] == run_all.TARGETS_ONE_THREAD[name] and f["met"] == (f["ratio"] >= f["target"])
            assert any(r["figure"] == f"★ [1 thr] {f['figure']}" for r in res["table"])
    else:
        assert one is None
    # one group, right after the machine rows
    marked = [i for i, r in enumerate(res["table"]) if r["figure"].startswith("★")]
    n_marked = len(run_all.TARGETS) + (len(run_all.TARGETS_ONE_THREAD) if threads[0] > 1 else 0)
    assert marked == list(range(2, 2 + n_marked))


def test_headline_without_fid_says_so():
    """Under --no-fid the FID headline row is printed with its target and the reason, no value."""
    block = {
        "matmul": {"peak_gflops": 100.0},
        "nll": {"samples_per_s": 30e3, "flops_per_sample": 2e6},
        "ais": {"transitions_per_s": 20e3, "flops_per_transition": 2.5e6},
        "train": {
            "vae": {"seconds_per_step": 0.01, "flops_per_step": 4e8},
            "certified": {"seconds_per_step": 0.02, "flops_per_step": 1e9},
        },
    }
    head = run_all.headline({"compute": {"2": block}}, 2)
    assert head["one_thread"] is None  # no one-thread block measured
    fid = head["figures"]["fid_inception"]
    assert fid["ratio"] is None and fid["met"] is None and "--no-fid" in fid["reason"]
    assert head["figures"]["nll"]["ratio"] == pytest.approx(30e3 * 2e6 / 100e9)  # 0.6: met
    assert head["figures"]["nll"]["met"] is True
    assert head["figures"]["train_vae"]["ratio"] == pytest.approx(100 * 4e8 / 100e9)  # 0.4 < 0.5
    assert head["figures"]["train_vae"]["met"] is False
    assert head["figures"]["train_certified"]["ratio"] == pytest.approx(50 * 1e9 / 100e9)  # 0.5: met
    assert head["figures"]["train_certified"]["met"] is True
    rows = run_all.headline_rows(head)
    assert rows[0].figure == "★ [2 thr] FID Inception images/s / FLOP limit"
    assert rows[0].value.startswith("not measured") and rows[0].target == ">= 0.65" and rows[0].met is None


def test_every_registry_dataset_builds_at_its_shape(tmp_path):
    """The bench reads image shapes and split sizes from the dataset registry, so any dataset a
    params file may name builds (CelebA: 3×64×64, 162 770 prepared training images)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["dataset"] = "celeba"
    raw["datasets"] = ["celeba"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    b = compute.build(path, "vae")
    assert b.image_shape == (3, 64, 64) and not b.binary
    assert b.n_train == min(162_770 - raw["data"]["n_valid"], raw["data"]["n_train"] or 10**9)
    from vaepp.datasets import DATASETS

    assert compute.DATASETS == {r.name: (r.shape, r.binary, r.n_train) for r in DATASETS.values()}


def test_png_round_trip_is_exact(tmp_path):
    """The CLI and vaepp read the same pixels: PNG save/load returns the uint8 values / 255."""
    raw = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fid_bench.save_pngs(raw, tmp_path)
    assert torch.equal(fid_bench.load_pngs(tmp_path), raw.float() / 255.0)
    assert float(fid_bench.FID_LINE.findall("100%|##| 1/1\nFID:  12.5\n")[-1]) == 12.5


def test_pipeline_overhead_paths(tmp_path):
    assert "stages.train" in pipeline.stage_modules() and "stages.__init__" not in pipeline.stage_modules()
    assert pipeline.dvc_noop(tmp_path) == {"measured": False, "reason": "no pipeline outputs (no dvc.lock)"}
    times = pipeline.import_times(["stages.cli"])
    assert times["python_start_s"] > 0 and times["modules"]["stages.cli"] >= 0


@pytest.mark.slow
def test_fid_bench_agrees_with_pytorch_fid_cli(tmp_path):
    """Two images per set through vaepp.fid in process, in a fresh process from PNGs and cached
    statistics, and through `python -m pytorch_fid` on the same PNGs and vaepp's cache file: the
    same FID. Slow: two fresh processes each load Inception and take a 2048² matrix square root."""
    torch_home, wheels = run_all._stage_paths()
    res = fid_bench.fid_bench(
        tmp_path, torch_home, wheels, n_images=2, batch_size=50, n_reference=10, rate_batch=2, rate_repeats=1
    )
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
    res = fid_bench.fid_bench(
        tmp_path,
        torch_home,
        wheels,
        n_images=2,
        batch_size=50,
        n_reference=10,
        rate_batch=2,
        rate_repeats=1,
        seconds_left=1.0,
    )
    assert res["end_to_end"]["measured"] is False and "budget" in res["end_to_end"]["reason"]
    assert res["vaepp_images_per_s"] > 0 and res["fid_in_process"] > 1.0
