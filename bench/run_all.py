"""`make bench`: every benchmark in one run, printed as a table with each figure's
target and written to reports/bench.json.

Order, once per thread count (torch's default, then 1): matmul limit, NLL, training, MALA, AIS,
matmul limit again (the limit used for every ratio of the block is the larger of the two, so a
slow phase of a shared machine cannot make the ratios look better). Then, at the default thread
count: FID, pipeline overhead (a no-op `dvc repro`, import times, and the stage fixed cost:
bench/startup.py).

The headline figures (rows marked ★, key "headline" of the JSON) are rates against their FLOP
limits, limit = matmul limit (FLOP/s) / FLOPs per unit of work, at the default thread count: the
FID Inception network's images/s, the NLL's importance samples/s, AIS's transitions/s and the
training steps/s of the plain VAE and of the certified prior; the two training figures at one
thread as well (`headline`). Beside them, a minimal plain-VAE step (`compute.minimal_vae_step`, row
`vae_minimal`) is the training figures' reference: the rate eager torch reaches for the same layers
and loss with nothing else around them.

`--quick` runs every code path on tiny sizes (for the test suite; its numbers mean nothing).
`--only startup` measures the stage fixed cost alone (about a minute and a half).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import compute, fid_bench, pipeline, startup  # noqa: E402
from bench.common import ROOT, Row, format_table  # noqa: E402
from stages.boot import allocator, boot  # noqa: E402

OMP_WAIT_POLICY = boot()  # as a stage starts: environment defaults and check, the OpenMP wait policy

BUDGET_S = 15 * 60  # the whole of `make bench` in under 15 minutes
RESERVE_S = 250  # kept for what follows FID (pipeline overhead and stage fixed cost, matmul again), a margin
RUNS = ["vae", "naive_vaepp", "vaepp", "certified"]
# Targets of the ratios to the FLOP limit (measured rate / limit) of the headline figures at
# torch's default number of threads, and of the training figures at one thread.
TARGETS = {"fid_inception": 0.65, "nll": 0.6, "ais": 0.6, "train_vae": 0.5, "train_certified": 0.5}
TARGETS_ONE_THREAD = {"train_vae": 0.6, "train_certified": 0.6}

# Short timed blocks, many of them: on a shared machine the best block is the least disturbed.
FULL = dict(
    matmul_sizes=[256, 512, 768, 1024, 2048],
    matmul_repeats=10,
    nll_images=64,
    nll_samples=1000,
    nll_repeats=5,
    train_steps=5,
    train_repeats=12,
    train_warmup=3,
    mala_steps=10,
    mala_repeats=6,
    ais_temps=25,  # × 3 seeds × 256 chains: about 0.5 s per run on 2 cores
    ais_repeats=4,
    fid_images=64,
    fid_rate_batch=None,  # the params' fid.batch_size (50: about 5 s per pass on 2 cores)
    fid_rate_repeats=2,
    import_repeats=1,
    matmul_seconds=1.5,
    layer_mm_seconds=0.5,
    startup_repeats=5,
)
QUICK = dict(
    matmul_sizes=[64],
    matmul_repeats=1,
    nll_images=4,
    nll_samples=16,
    nll_repeats=1,
    train_steps=1,
    train_repeats=1,
    train_warmup=1,
    mala_steps=2,
    mala_repeats=1,
    ais_temps=2,
    ais_repeats=1,
    fid_images=2,
    fid_rate_batch=2,
    fid_rate_repeats=1,
    import_repeats=1,
    matmul_seconds=0.0,
    layer_mm_seconds=0.0,
    startup_repeats=1,
)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min": os.getloadavg()[0],
        "omp_wait_policy": OMP_WAIT_POLICY,
        "allocator": allocator(),  # stages.boot.keep_freed_memory: "kept" unless the user set malloc's own
    }


def _stage_paths() -> tuple[Path, Path]:
    """Inception weights and downloads where the stages keep them (TORCH_HOME, VAEPP_CACHE)."""
    from stages import cli

    return cli.torch_home(), cli.cache_dir() / "wheels"


def thread_counts() -> list[int]:
    """torch's default number of threads, and 1 as well when the default is more: on a machine
    shared with other work, two OpenMP threads wait on each other at every operation."""
    default = torch.get_num_threads()
    return [default] + ([1] if default > 1 else [])


def compute_block(params: Path, sizes: dict, say) -> dict:
    """Matmul limit, NLL, training, MALA, AIS, matmul limit again, at the current number of threads."""
    say("matmul limit")
    mm_start = compute.matmul_gflops(sizes["matmul_sizes"], sizes["matmul_repeats"], sizes["matmul_seconds"])
    peak = mm_start["peak_gflops"]
    res: dict = {}
    say("NLL importance sampling")
    built = compute.build(params, "vaepp")
    res["nll"] = compute.nll_bench(
        built,
        n_images=sizes["nll_images"],
        n_importance=sizes["nll_samples"],
        repeats=sizes["nll_repeats"],
        peak_gflops=peak,
        mm_seconds=sizes["layer_mm_seconds"],
    )
    say("training steps")
    res["train"] = compute.train_bench(
        params,
        RUNS,
        steps=sizes["train_steps"],
        repeats=sizes["train_repeats"],
        warmup=sizes["train_warmup"],
        peak_gflops=peak,
    )
    say("MALA")
    res["mala"] = compute.mala_bench(
        built,
        n_chains=built.run.mala.n_samples,
        n_steps=sizes["mala_steps"],
        repeats=sizes["mala_repeats"],
        peak_gflops=peak,
    )
    say("AIS")
    res["ais"] = compute.ais_bench(built, n_temps=sizes["ais_temps"], repeats=sizes["ais_repeats"], peak_gflops=peak)
    say("matmul limit again")
    mm_end = compute.matmul_gflops(sizes["matmul_sizes"], sizes["matmul_repeats"], sizes["matmul_seconds"])
    res["matmul"] = {"start": mm_start, "end": mm_end, "peak_gflops": max(peak, mm_end["peak_gflops"])}
    rescale(res, res["matmul"]["peak_gflops"] / peak)
    return res


def run(params: Path, sizes: dict, *, do_fid: bool = True, do_pipeline: bool = True) -> tuple[dict, list[Row]]:
    t_start = time.perf_counter()
    res: dict = {"machine": machine(), "params": str(params), "sizes": sizes, "compute": {}}
    threads = thread_counts()

    def say(msg: str, tag: str = "") -> None:
        print(f"[bench {time.perf_counter() - t_start:6.1f} s] {tag}{msg}", file=sys.stderr, flush=True)

    for n in threads:
        torch.set_num_threads(n)
        res["compute"][str(n)] = compute_block(params, sizes, partial(say, tag=f"{n} thread(s): "))
    torch.set_num_threads(threads[0])
    if do_fid:
        say("FID (Inception on the CPU: the slow part)")
        torch_home, wheels = _stage_paths()
        fid_params = compute.build(params, "vaepp").run.fid
        with tempfile.TemporaryDirectory(prefix="vaepp-bench-fid-") as tmp:
            res["fid"] = fid_bench.fid_bench(
                Path(tmp),
                torch_home,
                wheels,
                n_images=sizes["fid_images"],
                batch_size=fid_params.batch_size,
                n_reference=fid_params.n_reference,
                rate_batch=sizes["fid_rate_batch"],
                rate_repeats=sizes["fid_rate_repeats"],
                seconds_left=BUDGET_S - RESERVE_S - (time.perf_counter() - t_start),
            )
    if do_pipeline:
        say("pipeline overhead")
        res["pipeline"] = {
            "dvc_noop": pipeline.dvc_noop(),
            "imports": pipeline.import_times(pipeline.stage_modules(), repeats=sizes["import_repeats"]),
        }
        say("stage fixed cost (a tiny copy of the project, its train stage through dvc repro)")
        res["pipeline"]["stage_fixed_cost"] = startup.measure(sizes["startup_repeats"])
    res["headline"] = headline(res, threads[0])
    res["total_seconds"] = time.perf_counter() - t_start
    res["load_average_1min_end"] = os.getloadavg()[0]
    return res, rows(res)


def rescale(res: dict, factor: float) -> None:
    """Ratios were taken against the first matmul peak; divide them by `factor` = final/first."""
    res["nll"]["ratio_to_matmul"] /= factor
    for r in res["train"].values():
        r["ratio_to_matmul"] /= factor
    res["mala"]["limit_chain_steps_per_s"] *= factor
    res["mala"]["ratio_to_limit"] /= factor
    res["ais"]["limit_transitions_per_s"] *= factor
    res["ais"]["ratio_to_limit"] /= factor


def headline(res: dict, threads: int) -> dict:
    """The headline figures, each a rate against its FLOP limit, with the matmul limit P (FLOP/s)
    of the same thread count's block:

        limit = P / FLOPs per unit,   ratio = measured rate / limit,   met = ratio >= target.

      fid_inception    images/s of one batch of fid.batch_size images through
                       `vaepp.fid.features_and_stats`; FLOPs per image of the Inception forward
                       pass (FlopCounterMode, `fid_bench.inception_flops_per_image`)
      nll              importance samples/s of `vaepp.nll.estimate_nll`; FLOPs per sample from the
                       layer shapes (`compute.nll_bench`)
      ais              transitions/s of `vaepp.logz.log_z_ais` (one chain, one temperature);
                       FLOPs of one log f and its gradient per chain (FlopCounterMode,
                       `compute.ais_bench`)
      train_vae,       training steps/s of `vaepp.train.train_step`, the plain VAE and the
      train_certified  certified prior; FLOPs per step from the layer shapes
                       (`compute.train_step_flops`)

    All at `threads` (torch's default), against TARGETS; the two training figures also at one
    thread when the default is more ("one_thread", against TARGETS_ONE_THREAD).

    Returns {"threads", "matmul_gflops", "figures": {name: {"figure", "per" (the unit of work),
    "measured" (per second), "flops_per_unit", "limit" (per second), "ratio", "target", "met"}},
    "one_thread": the same for the training figures at one thread, or None}; a figure that was
    not measured (FID under --no-fid) has None for its numbers and a "reason".
    """
    out = _headline_block(res["compute"][str(threads)], threads, TARGETS, res.get("fid"))
    one = res["compute"].get("1") if threads != 1 else None
    out["one_thread"] = None if one is None else _headline_block(one, 1, TARGETS_ONE_THREAD, None)
    return out


def _headline_block(block: dict, threads: int, targets: dict[str, float], fid: dict | None) -> dict:
    """The figures named in `targets` of one thread count's block (see `headline`)."""
    peak = block["matmul"]["peak_gflops"] * 1e9

    def figure(name: str, label: str, per: str, measured: float | None, flops: float | None) -> dict:
        out = {"figure": label, "per": per, "target": targets[name]}
        if measured is None or flops is None:
            return {**out, "measured": None, "flops_per_unit": None, "limit": None, "ratio": None, "met": None}
        limit = peak / flops
        ratio = measured / limit
        return {
            **out,
            "measured": measured,
            "flops_per_unit": flops,
            "limit": limit,
            "ratio": ratio,
            "met": ratio >= targets[name],
        }

    def train(run: str) -> dict:
        r = block["train"][run]
        rate = 1.0 / r["seconds_per_step"]
        return figure(f"train_{run}", f"train {run} steps/s / matmul limit", "step", rate, r["flops_per_step"])

    nll, ais = block["nll"], block["ais"]
    every = {
        "fid_inception": lambda: figure(
            "fid_inception",
            "FID Inception images/s / FLOP limit",
            "image",
            fid["batch_images_per_s"] if fid else None,
            fid["inception_flops_per_image"] if fid else None,
        ),
        "nll": lambda: figure(
            "nll", "NLL importance samples/s / matmul limit", "sample", nll["samples_per_s"], nll["flops_per_sample"]
        ),
        "ais": lambda: figure(
            "ais", "AIS transitions/s / FLOP limit", "transition", ais["transitions_per_s"], ais["flops_per_transition"]
        ),
        "train_vae": lambda: train("vae"),
        "train_certified": lambda: train("certified"),
    }
    figures = {name: every[name]() for name in targets}
    if "fid_inception" in figures and not fid:
        figures["fid_inception"]["reason"] = "FID not run (--no-fid)"
    return {"threads": threads, "matmul_gflops": peak / 1e9, "figures": figures}


def _rate(x: float) -> str:
    """A rate with three significant figures, thousands separated: 16.7, 145,000."""
    return f"{x:.3g}" if x < 1000 else f"{float(f'{x:.3g}'):,.0f}"


def _flops(x: float) -> str:
    return f"{x / 1e9:.2f} GFLOP" if x >= 1e9 else f"{x / 1e6:.2f} MFLOP"


def headline_rows(head: dict) -> list[Row]:
    """The headline figures as one group of rows marked ★ (see `headline`), the default thread
    count's first, then the one-thread training figures."""
    out = []
    for block in (head, head.get("one_thread")):
        if block is None:
            continue
        for f in block["figures"].values():
            label, target = f"★ [{block['threads']} thr] {f['figure']}", f">= {f['target']:.2f}"
            if f["ratio"] is None:
                out.append(Row(label, f"not measured: {f['reason']}", target))
                continue
            value = (
                f"{f['ratio']:.2f} ({_rate(f['measured'])} {f['per']}s/s, limit {_rate(f['limit'])}; "
                f"{_flops(f['flops_per_unit'])}/{f['per']})"
            )
            out.append(Row(label, value, target, f["met"]))
    return out


def rows(res: dict) -> list[Row]:
    load = (res["machine"]["load_average_1min"], res["load_average_1min_end"])
    out = [
        Row(
            "0 machine load (1-min load average)",
            f"{load[0]:.1f} at start, {load[1]:.1f} at end on {res['machine']['cores']} cores",
            "quiet: < cores",
        ),
        Row("0 OpenMP wait policy (stages' choice)", res["machine"]["omp_wait_policy"], "—"),
        *headline_rows(res["headline"]),
    ]
    default = str(res["headline"]["threads"])
    for threads, block in res["compute"].items():
        train_targets = TARGETS if threads == default else TARGETS_ONE_THREAD
        out += compute_rows(block, f"[{threads} thr] ", train_targets)
    out += other_rows(res)
    return out


def compute_rows(block: dict, tag: str, train_targets: dict[str, float]) -> list[Row]:
    """The rows of one thread count's block; `train_targets` holds the training figures' targets
    at that thread count (train_vae, train_certified)."""
    mm, nll, tr, ma, ais = block["matmul"], block["nll"], block["train"], block["mala"], block["ais"]
    out = [
        Row(
            f"1 {tag}matmul float32 limit (best size)",
            f"{mm['peak_gflops']:.0f} GFLOP/s (start {mm['start']['peak_gflops']:.0f}, "
            f"end {mm['end']['peak_gflops']:.0f})",
            "reference",
        )
    ]
    out += [
        Row(
            f"2 {tag}NLL importance samples/s",
            f"{nll['samples_per_s']:,.0f} ({nll['flops_per_sample'] / 1e6:.2f} "
            f"MFLOP/sample, {nll['gflops']:.0f} GFLOP/s)",
        ),
        Row(
            f"2 {tag}NLL achieved / matmul limit",
            f"{nll['ratio_to_matmul']:.2f}",
            f">= {TARGETS['nll']:.2f}",
            nll["ratio_to_matmul"] >= TARGETS["nll"],
        ),
        Row(
            f"2 {tag}NLL / its layers' matmuls alone",
            f"{nll['ratio_to_layer_matmuls']:.2f} (matmuls alone: {nll['layer_matmuls_samples_per_s']:,.0f} samples/s)",
        ),
        Row(
            f"2 {tag}NLL 10^8 samples (extrapolated)",
            f"{nll['seconds_for_1e8_samples']:,.0f} s",
            "< 3600 s",
            nll["seconds_for_1e8_samples"] < 3600,
        ),
    ]
    for name, r in tr.items():
        out.append(
            Row(
                f"3 {tag}train {name} s/epoch",
                f"{r['seconds_per_epoch']:.1f} s best block, "
                f"{r['seconds_per_epoch_median']:.1f} s median ({r['flops_per_step'] / 1e9:.2f} "
                f"GFLOP/step, {r['gflops']:.0f} GFLOP/s best)",
            )
        )
    for name in (n for n in ("vae", "certified") if n in tr):
        target = train_targets[f"train_{name}"]
        out.append(
            Row(
                f"3 {tag}train {name} GFLOP/s / matmul limit",
                f"{tr[name]['ratio_to_matmul']:.2f}",
                f">= {target:.2f}",
                tr[name]["ratio_to_matmul"] >= target,
            )
        )
    if compute.MINIMAL in tr:
        ref = tr[compute.MINIMAL]
        out.append(
            Row(f"3 {tag}train {compute.MINIMAL} (reference) GFLOP/s / matmul limit", f"{ref['ratio_to_matmul']:.2f}")
        )
        out.append(Row(f"3 {tag}train vae GFLOP/s / {compute.MINIMAL}'s", f"{1.0 / ref['gflops_ratio_to_vae']:.2f}"))
    if "vae" in tr:
        for name in (n for n in tr if n not in ("vae", compute.MINIMAL)):
            r = tr[name]
            out.append(
                Row(f"3 {tag}train {name} FLOPs/step / vae's", f"{r['flops_ratio_to_vae']:.2f}", "≈ 3 (arithmetic)")
            )
            out.append(
                Row(
                    f"3 {tag}train {name} GFLOP/s / vae's",
                    f"{r['gflops_ratio_to_vae']:.2f}",
                    ">= 0.80",
                    r["gflops_ratio_to_vae"] >= 0.8,
                )
            )
    out += [
        Row(
            f"4 {tag}MALA chain-steps/s",
            f"{ma['chain_steps_per_s']:,.0f} (limit {ma['limit_chain_steps_per_s']:,.0f}, {ma['n_chains']} chains)",
        ),
        Row(f"4 {tag}MALA / FLOP limit", f"{ma['ratio_to_limit']:.2f}"),
        Row(
            f"4 {tag}AIS transitions/s",
            f"{ais['transitions_per_s']:,.0f} (limit {ais['limit_transitions_per_s']:,.0f}; "
            f"{ais['n_seeds']} seeds × {ais['n_chains']} chains × {ais['n_temps']} temperatures)",
        ),
        Row(
            f"4 {tag}AIS / FLOP limit",
            f"{ais['ratio_to_limit']:.2f}",
            f">= {TARGETS['ais']:.2f}",
            ais["ratio_to_limit"] >= TARGETS["ais"],
        ),
    ]
    return out


def other_rows(res: dict) -> list[Row]:
    out: list[Row] = []
    if "fid" in res:
        f = res["fid"]
        out += [
            Row(
                "5 FID vaepp Inception images/s",
                f"{f['vaepp_images_per_s']:.2f} (in process, "
                f"{2 * f['n_images_per_set']} images; Fréchet distance {f['seconds_frechet']:.1f} s)",
            ),
        ]
        e2e = f["end_to_end"]
        if e2e["measured"]:
            out += [
                Row(
                    "5 FID end to end vs pytorch-fid CLI",
                    f"{e2e['vaepp_process_wall_s']:.1f} s vs "
                    f"{e2e['cli_wall_s']:.1f} s (speed ratio {e2e['speed_ratio_vaepp_to_cli']:.2f})",
                    ">= 1.00",
                    e2e["speed_ratio_vaepp_to_cli"] >= 1.0,
                ),
                Row(
                    "5 FID values vaepp / pytorch-fid CLI",
                    f"{e2e['fid_vaepp_process']:.3f} / {e2e['fid_cli']:.3f} "
                    f"(rel. diff {e2e['fid_relative_difference_cli']:.1e})",
                ),
            ]
        else:
            out.append(Row("5 FID end to end vs pytorch-fid CLI", f"not measured: {e2e['reason']}", ">= 1.00"))
        out += [
            Row(
                "5 FID reference stats: cache, reuse",
                f"{f['reference_cache_miss_s']:.1f} s, "
                f"{f['reference_cache_hit_s'] * 1e3:.0f} ms ({f['n_images_per_set']} images)",
                "reuse < 10% of cache",
                f["reference_cache_hit_s"] < 0.1 * f["reference_cache_miss_s"],
            ),
            Row(
                "5 FID reference stats for params",
                f"{f['reference_seconds_for_params']:.0f} s once ({f['n_reference_params']} images)",
            ),
        ]
    if "pipeline" in res:
        p = res["pipeline"]
        noop = p["dvc_noop"]
        out.append(
            Row(
                "6 dvc repro (no-op)",
                f"{noop['seconds']:.1f} s" if noop["measured"] else f"not measured: {noop['reason']}",
            )
        )
        imp = p["imports"]
        out.append(
            Row("6 python start / import torch", f"{imp['python_start_s']:.2f} s / {imp['import_torch_s']:.2f} s")
        )
        for m, s in imp["modules"].items():
            out.append(Row(f"6 import {m}", f"{s:.2f} s"))
        if "stage_fixed_cost" in p:
            out += startup.rows(p["stage_fixed_cost"])
    out.append(Row("whole bench", f"{res['total_seconds']:.0f} s", f"< {BUDGET_S} s", res["total_seconds"] < BUDGET_S))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--out", default=str(ROOT / "reports" / "bench.json"), help="JSON output file")
    p.add_argument("--quick", action="store_true", help="tiny sizes: exercise every path, numbers meaningless")
    p.add_argument("--no-fid", action="store_true", help="skip the FID benchmark")
    p.add_argument("--no-pipeline", action="store_true", help="skip dvc and import timings and the stage fixed cost")
    p.add_argument("--only", choices=["startup"], help="only this figure: startup = the stage fixed cost")
    args = p.parse_args(argv)
    if args.only == "startup":
        return only_startup(
            args.out if args.out != p.get_default("out") else None,
            QUICK["startup_repeats"] if args.quick else FULL["startup_repeats"],
        )
    from vaepp.config import ParamsError
    from vaepp.files import atomic_write_json

    params = Path(args.params)
    if not params.is_absolute():
        params = Path.cwd() / params
    try:
        res, table = run(
            params, QUICK if args.quick else FULL, do_fid=not args.no_fid, do_pipeline=not args.no_pipeline
        )
    except ParamsError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    res["quick"] = args.quick
    res["table"] = [r.__dict__ for r in table]
    atomic_write_json(args.out, res)
    print(
        f"Benchmarks, {res['machine']['date']}, {res['machine']['cpu']}, {res['machine']['torch_threads']} "
        f"torch threads{' (QUICK: sizes too small to mean anything)' if args.quick else ''}"
    )
    print(format_table(table))
    fixed = res.get("pipeline", {}).get("stage_fixed_cost", {})
    if fixed.get("measured"):
        print(startup.NOTE.format(repeats=fixed["repeats"]))
    print(f"written: {args.out}")
    return 0


def only_startup(out: str | None, repeats: int) -> int:
    """`--only startup`: the stage fixed cost alone, printed (and written to `out` if given:
    the whole bench's reports/bench.json is left as it is)."""
    from vaepp.files import atomic_write_json

    res = {"machine": machine(), "stage_fixed_cost": startup.measure(repeats)}
    if out:
        atomic_write_json(out, res)
    print(
        f"Stage fixed cost, {res['machine']['date']}, {res['machine']['cpu']}, load average "
        f"{res['machine']['load_average_1min']:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    )
    print(format_table(startup.rows(res["stage_fixed_cost"])))
    if res["stage_fixed_cost"].get("measured"):
        print(startup.NOTE.format(repeats=repeats))
    if out:
        print(f"written: {out}")
    return 0 if res["stage_fixed_cost"].get("measured") else 1


if __name__ == "__main__":
    sys.exit(main())
