"""`python scripts/compare_proposals.py`: the measured comparison behind the NLL's proposal
(studies/proposal; README "The NLL estimator").

For every run of params.yaml with a trained model (models/<run>/vae.pt) and an nll.json (its
headline log Z), the NLL of a seeded random sample of VALIDATION images (train[50 000:], never test
images: the choice is made here) under several importance proposals r(z|x) and sample counts S:

- the paper's proposal q(z|e) (with a truncated q, not unbiased for p(x));
- defensive mixtures (1 − α)·N(μ, σ²) + α·N(μ, (kσ)²), untruncated, for a grid of (α, k);

each with the S/10 read-out of the same draws and the per-image ESS. Every full-support proposal is
unbiased for p(x), so log p̂ is a stochastic lower bound on log p(x) whose gap shrinks with S: the
best proposal is the one with the LOWEST NLL, and an estimate that still falls with S (or with a
wider component) has not converged. Writes studies/proposal/comparison.csv and manifest.json
(commit, machine, images, settings). About 10 minutes for four runs on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.inputs import load_data  # noqa: E402
from vaepp.artifacts import load_vae  # noqa: E402
from vaepp.config import load_params, resolve_run  # noqa: E402
from vaepp.data import subset_indices  # noqa: E402
from vaepp.evaluate import unit_batches  # noqa: E402
from vaepp.files import atomic_write_csv, atomic_write_json  # noqa: E402
from vaepp.importance import defensive_proposal  # noqa: E402
from vaepp.nll import estimate_nll  # noqa: E402
from vaepp.resolve import method  # noqa: E402

# (α, k): the weight of the wide component and its width in σ; None = the paper's q(z|e)
GRID = [None, (1.0, 1.0), (0.5, 1.5), (0.5, 2.0), (0.2, 2.0), (0.5, 3.0), (0.2, 4.0), (1.0 / 3.0, 4.0)]


def _name(setting) -> str:
    return "q(z|e)" if setting is None else f"defensive α={setting[0]:.3g} k={setting[1]:g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--images", type=int, default=200, help="validation images per run")
    ap.add_argument("--samples", default="1000,5000", help="comma-separated S values")
    ap.add_argument("--long", type=int, default=20000, help="one more S for the default proposal (0: none)")
    ap.add_argument("--runs", default=None, help="comma-separated runs (default: every run with a model)")
    ap.add_argument("--out", default=str(ROOT / "studies" / "proposal"))
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("REPRO_THREADS", torch.get_num_threads())))
    params = load_params(args.params)
    names = args.runs.split(",") if args.runs else list(params.runs)
    sample_counts = [int(s) for s in args.samples.split(",")]
    rows, t0 = [], time.perf_counter()
    for run_name in names:
        model_path = ROOT / "models" / run_name / "vae.pt"
        nll_path = ROOT / "metrics" / run_name / "nll.json"
        if not model_path.is_file() or not nll_path.is_file():
            print(f"{run_name}: no model or nll.json; run `make repro` first", file=sys.stderr)
            return 2
        run = resolve_run(params, run_name)
        nll_json = json.loads(nll_path.read_text())
        log_z = nll_json["log_z"][nll_json["log_z_headline"]]["log_z"] if nll_json["log_z"] else 0.0
        model, _ = load_vae(model_path, "cpu")
        model.eval()
        d = run.data
        splits = load_data(ROOT / "data", run)  # the stages' own split of the prepared data
        # a seeded random sample of the validation split (its own seed: not the monitor's images)
        pick = subset_indices(splits.valid.shape[0], args.images, d.subset_seed + 1)
        images = splits.valid[pick]
        binary = model.spec.likelihood == "bernoulli"
        settings = [(s, n) for s in GRID for n in sample_counts]
        if args.long:
            settings.append(((0.5, 2.0), args.long))
        for setting, n in settings:
            proposal = None if setting is None else partial(defensive_proposal, weight=setting[0], width=setting[1])
            t1 = time.perf_counter()
            out = estimate_nll(
                model,
                unit_batches(images, 64),
                n_importance=n,
                log_z=log_z,
                binarize=binary,
                proposal=proposal,
                generator=torch.Generator().manual_seed(5),
                binarize_generator=torch.Generator().manual_seed(4),
            )
            rows.append(
                {
                    "run": run_name,
                    "algorithm": method(run),
                    "proposal": _name(setting),
                    "weight": None if setting is None else setting[0],
                    "width": None if setting is None else setting[1],
                    "S": n,
                    "nll_nats": out["nll_nats"],
                    "nll_stderr": out["nll_stderr"],
                    "nll_mc_stderr": out["nll_mc_stderr"],
                    "nll_nats_sub": out["nll_nats_sub"],
                    "ess_median": out["ess_median"],
                    "ess_min": out["ess_min"],
                    "log_z": log_z,
                    "seconds": time.perf_counter() - t1,
                }
            )
            print(
                f"{run_name:12s} {_name(setting):28s} S={n:6d}: {out['nll_nats']:.3f} "
                f"(S/10 {out['nll_nats_sub']:.3f}, ESS median {out['ess_median']:.1f})",
                flush=True,
            )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    atomic_write_csv(out_dir / "comparison.csv", table.to_dict("records"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    atomic_write_json(
        out_dir / "manifest.json",
        {
            "commit": commit,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": "python scripts/compare_proposals.py " + " ".join(argv or sys.argv[1:]),
            "images": f"{args.images} validation images per run (seeded random sample, seed data.subset_seed + 1)",
            "seconds": time.perf_counter() - t0,
            "log_z": "each run's headline log Z from metrics/<run>/nll.json (a constant per run)",
        },
    )
    print(f"wrote {out_dir}/comparison.csv ({len(table)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
