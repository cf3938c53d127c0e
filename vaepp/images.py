"""Images from latents: G(z) quantised to 8 bits, and sample grids as PNG."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import Tensor


@torch.inference_mode()
def decode_images(model, z: Tensor, *, batch_size: int = 1000) -> Tensor:
    """G(z) for z (N, zdim) as uint8 images (N, C, H, W), decoded in batches (on the CPU)."""
    out = []
    for i in range(0, z.shape[0], batch_size):
        img = model.image_mean(model.decode(z[i : i + batch_size]))
        out.append((img * 255.0).round().clamp(0, 255).to(torch.uint8).cpu())
    return torch.cat(out)


def grid_png(images: Tensor, *, nrow: int = 10) -> bytes:
    """A PNG of uint8 images (N, C, H, W) tiled nrow per line with a 2-pixel border."""
    from torchvision.utils import make_grid, save_image

    buf = io.BytesIO()
    save_image(make_grid(images.float() / 255.0, nrow=nrow, padding=2, pad_value=1.0), buf, format="png")
    return buf.getvalue()


def save_grid(images: Tensor, path: Path, *, nrow: int = 10) -> None:
    """`grid_png` of uint8 images (N, C, H, W) written to `path` (temp file, then os.replace)."""
    from .files import atomic_write_bytes

    atomic_write_bytes(Path(path), grid_png(images, nrow=nrow))
