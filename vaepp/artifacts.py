"""The trained models the fits produce, each carrying the settings that rebuild it (as nanoGPT's
checkpoints carry their config): models/<run>/vae.pt (`save_vae` / `load_vae`) and
models/<run>/latent_gan.pt (`save_latent_gan` / `load_latent_gan`). Written atomically and loaded
with `weights_only=True` after every member's CRC-32 is checked (`vaepp.files`).

File layout (format 1): {"format", **settings, "model": state_dict, ...}.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from pydantic import ValidationError

from . import files
from .checkpoints import FORMAT
from .config import LatentGANParams
from .latent_gan import LatentGAN
from .model import VAEPP, ModelSpec

PRIOR_KEYS = ("xi", "acceptance_c", "acceptance_mlp.", "z_ema")  # the prior's weights, once the model's own


def _prior_keys_moved(state: dict, model: VAEPP) -> dict:
    """A state dict of a file whose prior's weights sat on the model itself ("xi", …), with them
    moved under "prior." (and dropped where the prior has none: N(0, I) has no ξ)."""
    wanted = model.state_dict()
    out = {}
    for k, v in state.items():
        if k.startswith(PRIOR_KEYS):
            k = f"prior.{k}"
            if k not in wanted:
                continue
        out[k] = v
    return out


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_vae(path: str | Path, model: VAEPP, settings: dict, *, history: list[dict], **extra) -> Path:
    """models/<run>/vae.pt: {"format", **settings ("model_spec", "train_spec"; see
    `vaepp.train.train_settings`), "model" (CPU tensors), **extra (e.g. the run), "history"}."""
    return files.atomic_torch_save(
        {"format": FORMAT, **settings, "model": _cpu_state(model), **extra, "history": history}, path
    )


def load_vae(path: str | Path, device: torch.device | str) -> tuple[VAEPP, dict]:
    """The trained VAE of `save_vae`, in eval mode on `device`, and the file's dict."""
    ckpt = files.load_checkpoint(path, map_location=device)
    spec = ModelSpec.from_dict(ckpt["model_spec"])
    model = VAEPP(spec)
    state = ckpt["model"]
    if "prior" not in ckpt["model_spec"]:  # written before the prior was a module of its own
        state = _prior_keys_moved(state, model)
    model.load_state_dict(state)
    return model.to(device).eval(), ckpt


def save_latent_gan(path: str | Path, gan: nn.Module, settings: dict, *, history: list[dict]) -> Path:
    """models/<run>/latent_gan.pt: {"format", **settings ("spec", "zdim"; see
    `vaepp.latent_gan.latent_gan_settings`), "model" (CPU tensors), "history"}."""
    return files.atomic_torch_save({"format": FORMAT, **settings, "model": _cpu_state(gan), "history": history}, path)


def load_latent_gan(path: str | Path, device: torch.device | str):
    """The latent GAN of `save_latent_gan`, in eval mode on `device`: its networks rebuilt from
    the recorded (resolved) params and zdim, then its weights loaded."""
    ckpt = files.load_checkpoint(path, map_location=device)
    try:
        params = LatentGANParams(**ckpt["spec"])
    except ValidationError as err:  # e.g. a file from before a setting existed
        raise files.CheckpointError(f"{path}: its latent-GAN settings are not valid ones; refit it\n{err}") from err
    gan = LatentGAN.from_params(ckpt["zdim"], params)
    gan.load_state_dict(ckpt["model"])
    return gan.to(device).eval()


__all__ = ["load_latent_gan", "load_vae", "save_latent_gan", "save_vae"]
