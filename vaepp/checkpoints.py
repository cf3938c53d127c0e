"""The resumable state of a fit (`Checkpoint`), used by both `vaepp.train.train` and
`vaepp.latent_gan.fit_latent_gan`: the network, every optimiser's state, the global, CUDA and
data-order RNG states, the epoch and the history, written every `checkpoint_every` epochs and
after the last. A fit killed at any moment and rerun resumes from the last file written and ends
bitwise equal to an uninterrupted fit; a file of other settings is refused. Written atomically and
loaded with `weights_only=True` after every member's CRC-32 is checked (`vaepp.files`); the trained
models the fits produce are `vaepp.artifacts`.

File layout (format 1): {"format", **settings, "model": state_dict, ...}; a checkpoint adds
"optimizers", "rng", "epoch", "history" and what the fit stores beside them (a fit with early
stopping: "best_model", the state_dict of its best epoch so far, or None before there is one).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from . import files

FORMAT = 1


# ----- random number generators ------------------------------------------------------------------
def rng_state(data_gen: torch.Generator, device: torch.device | str) -> dict:
    """The global CPU RNG, the data-order generator and, on CUDA, the device's RNG."""
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, data_gen: torch.Generator, device: torch.device | str) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if torch.device(device).type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----- resumable fits ----------------------------------------------------------------------------
class Checkpoint:
    """The resumable state of one fit in the file `path`.

    write=False: resume from the file but never write it (every rank of a W-process fit resumes
    from the same file; only rank 0 writes). extra: fields stored beside the state (e.g. which
    data and which VAE the fit used), for the caller to check before resuming. A writer clears
    the temporaries that a process killed inside a write left behind.
    """

    def __init__(self, path: str | Path, *, write: bool = True, extra: dict | None = None):
        self.path = Path(path)
        self.write = write
        self.extra = dict(extra or {})
        if write:
            files.remove_stale_temporaries(self.path)

    def resume(
        self,
        settings: dict,
        module: nn.Module,
        opts: dict[str, torch.optim.Optimizer],
        data_gen: torch.Generator,
        device: torch.device | str,
        *,
        epochs: int,
        every: int,
    ) -> dict | None:
        """Bind the fit (its settings, network, optimisers, data-order generator, device, length
        and `checkpoint_every`), which `after_epoch` then saves. None when there is no file.
        Otherwise load it, refuse it (CheckpointError) unless it holds every `settings` field with
        that value, restore the module, the optimisers and the RNG states, and return the file's
        dict ("epoch", "history", and what `after_epoch` stored)."""
        self._fit = dict(
            settings=settings, module=module, opts=opts, data_gen=data_gen, device=device, epochs=epochs, every=every
        )
        if not self.path.exists():
            return None
        ckpt = files.load_checkpoint(self.path, map_location=device)
        if any(ckpt.get(key) != value for key, value in settings.items()):
            raise files.CheckpointError(
                f"{self.path}: checkpoint was written with other settings; delete it to start "
                "afresh, or restore the settings it was written with"
            )
        module.load_state_dict(ckpt["model"])
        for name, opt in opts.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        set_rng_state(ckpt["rng"], data_gen, device)
        return ckpt

    def after_epoch(self, epoch: int, *, last: bool = False, **state) -> None:
        """Write the bound fit's state after `epoch` (counted from 1) if it is a multiple of
        `every` or the last epoch: the fit's length, or an earlier one the fit ends at (`last`,
        an early stop); `state` (e.g. history) is stored beside it."""
        fit = self._fit
        if not self.write or not (epoch % fit["every"] == 0 or epoch == fit["epochs"] or last):
            return
        files.atomic_torch_save(
            {
                "format": FORMAT,
                **fit["settings"],
                "model": fit["module"].state_dict(),
                "optimizers": {k: o.state_dict() for k, o in fit["opts"].items()},
                "rng": rng_state(fit["data_gen"], fit["device"]),
                "epoch": epoch,
                **state,
                **self.extra,
            },
            self.path,
        )


def keep_or_discard(path: str | Path, expected: dict) -> str | None:
    """Before a resumable fit: keep the checkpoint at `path` if it loads and holds every
    `expected` field with that value (the same settings, data and inputs); otherwise delete it, so
    the fit starts afresh. Returns what was done, for the log (None when there is no file). Call
    on one process only (rank 0), before the others look for the file."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        old = files.load_checkpoint(path, map_location="cpu")
    except files.CheckpointError as err:
        path.unlink()
        return f"warning: {err}; starting afresh"
    if any(old.get(k) != v for k, v in expected.items()):
        path.unlink()
        return f"{path}: written with other settings; starting afresh"
    return f"{path}: resuming from epoch {old['epoch']}"


def finish(path: str | Path) -> None:
    """After a fit's outputs are written: its checkpoint has served (it only resumes a killed
    fit), so remove it. A finished checkpoint left behind would make the next run of the stage,
    after a code change, "resume" at the last epoch and write the old result again."""
    Path(path).unlink(missing_ok=True)


__all__ = [
    "Checkpoint",
    "FORMAT",
    "finish",
    "keep_or_discard",
    "rng_state",
    "set_rng_state",
]
