"""Encoder, decoder and critic networks: an MLP family and the authors' pre-activation ResNet
family (LeakyReLU 0.2, no normalisation), sized from explicit arguments.

Shapes: images (B, C, H, W) in [0, 1]; the encoder returns (μ, log σ_raw), each (B, Z); the
decoder returns its raw output (B, n_out·C, H, W) which the model splits into likelihood
parameters; the critic returns D(x), (B,). LOW D means "looks real" (as in the authors' code;
the paper's Algorithm 1 line 14 swaps the roles).
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

Arch = Literal["mlp", "resnet"]
SLOPE = 0.2  # LeakyReLU negative slope used throughout (authors' code)


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with LeakyReLU(0.2) between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(SLOPE))
    return nn.Sequential(*layers)


class PreActBlock(nn.Module):
    """Pre-activation residual block: y = shortcut(x) + conv(act(conv(act(x)))).

    stride 2 halves H and W (conv); `up=True` doubles them (nearest upsampling before the first
    conv and on the shortcut). A 1×1 conv matches channels on the shortcut where needed.
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1, up: bool = False):
        super().__init__()
        self.up = up
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.conv1(F.leaky_relu(x, SLOPE))
        h = self.conv2(F.leaky_relu(h, SLOPE))
        return self.shortcut(x) + h


class MLPEncoder(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], zdim: int, hidden: list[int]):
        super().__init__()
        self.net = _mlp([math.prod(image_shape), *hidden, 2 * zdim])

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.net(e.flatten(1)).chunk(2, dim=-1)  # (B, Z) each
        return mu, log_sigma


class MLPDecoder(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], zdim: int, hidden: list[int], n_out: int):
        super().__init__()
        c, h, w = image_shape
        self.out_shape = (n_out * c, h, w)
        self.net = _mlp([zdim, *hidden, n_out * c * h * w])

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[0], *self.out_shape)


class MLPCritic(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], hidden: list[int]):
        super().__init__()
        self.net = _mlp([math.prod(image_shape), *hidden, 1])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).squeeze(-1)


def _down_trunk(c_in: int, channels: list[int]) -> nn.Sequential:
    """conv to channels[0], then one stride-2 pre-activation block per further channel count."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, channels[0], 3, padding=1)]
    for a, b in zip(channels[:-1], channels[1:], strict=True):
        layers.append(PreActBlock(a, b, stride=2))
    layers.append(nn.LeakyReLU(SLOPE))
    return nn.Sequential(*layers)


def _down_size(h: int, n_down: int) -> int:
    for _ in range(n_down):
        h = (h + 1) // 2  # a 3×3 conv with stride 2 and padding 1
    return h


class ResNetEncoder(nn.Module):
    """MNIST default: 16 → 32 (s2) → 64 (s2) channels, then a linear map to (μ, log σ)."""

    def __init__(self, image_shape: tuple[int, int, int], zdim: int, channels: list[int]):
        super().__init__()
        c, h, w = image_shape
        self.trunk = _down_trunk(c, channels)
        hh, ww = _down_size(h, len(channels) - 1), _down_size(w, len(channels) - 1)
        self.head = nn.Linear(channels[-1] * hh * ww, 2 * zdim)

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.head(self.trunk(e).flatten(1)).chunk(2, dim=-1)
        return mu, log_sigma


class ResNetCritic(nn.Module):
    """Like the encoder, with a linear head to one number D(x)."""

    def __init__(self, image_shape: tuple[int, int, int], channels: list[int]):
        super().__init__()
        c, h, w = image_shape
        self.trunk = _down_trunk(c, channels)
        hh, ww = _down_size(h, len(channels) - 1), _down_size(w, len(channels) - 1)
        self.head = nn.Linear(channels[-1] * hh * ww, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x).flatten(1)).squeeze(-1)


class ResNetDecoder(nn.Module):
    """The encoder's mirror: linear to 64×⌈H/4⌉×⌈W/4⌉, up-blocks 64 → 32 → 16, conv out, crop."""

    def __init__(self, image_shape: tuple[int, int, int], zdim: int, channels: list[int], n_out: int):
        super().__init__()
        c, h, w = image_shape
        self.image_hw = (h, w)
        n_up = len(channels) - 1
        self.hh, self.ww = _down_size(h, n_up), _down_size(w, n_up)
        rev = list(reversed(channels))
        self.head = nn.Linear(zdim, rev[0] * self.hh * self.ww)
        self.c0 = rev[0]
        self.blocks = nn.Sequential(*[PreActBlock(a, b, up=True) for a, b in zip(rev[:-1], rev[1:], strict=True)])
        self.out = nn.Conv2d(rev[-1], n_out * c, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.head(z).view(z.shape[0], self.c0, self.hh, self.ww)
        h = self.blocks(h)
        h = self.out(F.leaky_relu(h, SLOPE))
        H, W = self.image_hw
        return h[:, :, :H, :W]  # upsampling overshoots odd sizes (7 → 14 → 28 is exact)


def build_networks(
    arch: Arch,
    image_shape: tuple[int, int, int],
    zdim: int,
    *,
    hidden: list[int],
    channels: list[int],
    n_out: int,
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(encoder, decoder, critic) of the chosen family. `hidden` sizes the MLPs, `channels` the
    ResNets; `n_out` is the number of decoder maps per image channel (1 for Bernoulli logits or a
    logistic mean with a scalar scale, 2 for a logistic mean and a per-pixel log-scale)."""
    if arch == "mlp":
        return (
            MLPEncoder(image_shape, zdim, hidden),
            MLPDecoder(image_shape, zdim, list(reversed(hidden)), n_out),
            MLPCritic(image_shape, hidden),
        )
    if arch == "resnet":
        return (
            ResNetEncoder(image_shape, zdim, channels),
            ResNetDecoder(image_shape, zdim, channels, n_out),
            ResNetCritic(image_shape, channels),
        )
    raise ValueError(f"unknown architecture {arch!r}; allowed: mlp, resnet")
