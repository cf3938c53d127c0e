"""The evaluation protocols' shared parts, and the metrics dicts of datasets and training runs.

Each protocol lives in its own module and is what one stage computes. It takes validated params
(`vaepp.config`), a trained model and a `DistContext` (identity on one process) and returns the
metrics dict that its stage writes as JSON, so the protocol is unit-tested without DVC:

- `nll_protocol.nll_protocol` (estimate-nll): test NLL by importance sampling (paper §5) under
  every estimate of log Z of the run (`log_z_protocol.log_z_protocol`).
- `sampling_protocol.sampling_protocol` (sample-mala): paper §4.3, latent GAN then MALA.
- `fid_protocol.fid_protocol` (compute-fid): FID and KID of both sample sets and the floor.
- `log_z_monitor.log_z_monitor`: the check of log Z that training runs every
  `train.log_z_every` epochs.

Progress: `nll_protocol`, `sampling_protocol` and `fid_protocol` take an optional
`callback(name, value, step)`, called as the work advances with the values each docstring lists,
at most every 5% of a loop of temperatures or MALA steps and every 10% of an image set, and at its
end (a few dozen calls per protocol; `throttled`). The callbacks read numbers the estimators
compute anyway and draw no random number, so every result is the same with or without one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# callback(name, value, step): a progress value of a protocol (see the module docstring)
Progress = Callable[[str, float, int], None]
# Progress reports per series: every 5% of a loop of temperatures or MALA steps, every 10% of a
# set of test or Inception images (their batches are coarser steps), and the last step.
REPORTS_PER_LOOP, REPORTS_PER_IMAGE_SET = 20, 10


def throttled(callback: Progress | None, prefix: str, total: int, reports: int) -> Progress | None:
    """`callback` for one series of progress values whose steps run up to `total`: names get
    `prefix`, and only the steps that complete another 1/reports of `total`, and the last, are
    passed on (every value of such a step), so at most `reports` steps whatever the loop's length.
    None without a callback."""
    if callback is None:
        return None
    total = max(total, 1)
    state = {"step": 0, "due": False}

    def report(name: str, value: float, step: int) -> None:
        if step != state["step"]:  # a new step: due if it crosses a multiple of total / reports
            state["due"] = step >= total or step * reports // total > state["step"] * reports // total
            state["step"] = step
        if state["due"]:
            callback(prefix + name, value, step)

    return report


def unit_batches(images: Tensor, batch: int, device: torch.device | str = "cpu") -> Iterator[Tensor]:
    """uint8 images (N, C, H, W) → float batches in [0, 1] of at most `batch` images on `device`."""
    for i in range(0, images.shape[0], batch):
        yield images[i : i + batch].to(device).float().div_(255.0)


def dataset_fields(dataset: str, meta: dict) -> dict:
    """Where a metric's data came from: the dataset, its source, and whether it is a stand-in."""
    return {
        "dataset": dataset,
        "dataset_source": meta.get("source", "unknown"),
        "stand_in": bool(meta.get("stand_in", False)),
        "dataset_label": meta.get("label", dataset),
    }


def training_summary(
    history: list[dict], *, algorithm: str, n_train: int, seconds: float, resumed_from_epoch: int
) -> dict:
    """metrics/<run>/train.json: the last epoch's ELBO terms, β, training log Z and, where the
    log-Z monitor ran, its last values and the training time it took."""
    last = history[-1]
    checked = [h for h in history if "monitor_log_z" in h]
    monitor = {}
    if checked:
        m = checked[-1]
        monitor = {
            "log_z_monitor": m["monitor_log_z"],
            "log_z_monitor_epoch": m["epoch"],
            "elbo_under_monitor_log_z": m["elbo_under_monitor_log_z"],
            "valid_nll_monitor": m["monitor_valid_nll"],
            "monitor_seconds": sum(h["monitor_seconds"] for h in checked),
        }
    return {
        "algorithm": algorithm,
        "n_train": n_train,
        "elbo_under_train_log_z": last["elbo_under_train_log_z"],
        "recon": last["recon"],
        "kl": last["kl"],
        "beta": last["beta"],
        "log_z_train": last.get("log_z", 0.0),
        "epochs": len(history),
        "seconds": seconds,
        "resumed_from_epoch": resumed_from_epoch,
        **monitor,
    }
