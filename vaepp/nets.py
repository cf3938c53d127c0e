"""Encoder, decoder and critic networks: an MLP family and the authors' pre-activation ResNet
family (LeakyReLU 0.2, no normalisation), sized from explicit arguments. The ResNet family comes
in two forms: `resnet` maps the trunk's features to the latent with a dense head (the authors'
binary-image networks); `resnet_map` lays the latent out as a small feature map with convolutional
heads (the authors' CIFAR-10 networks: dim z 1024 as an 8×8×16 map).

Shapes: images (B, C, H, W) in [0, 1]; the encoder returns (μ, log σ_raw), each (B, zdim); the
decoder returns its raw output (B, n_out·C, H, W) which the model splits into likelihood
parameters; the critic returns D(x), (B,). LOW D means "looks real" (as in the authors' code;
the paper's Algorithm 1 line 14 swaps the roles).
"""

from __future__ import annotations

import math

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .options import Arch

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


def zero_output_layers(*networks: nn.Module) -> None:
    """Set the weights and biases of each network's `output_layer` to zero: the authors' start,
    where an encoder's μ and log σ heads give q = N(0, I) and a decoder gives a flat image."""
    for net in networks:
        layer = net.output_layer
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


class MLPEncoder(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], zdim: int, hidden: list[int]):
        super().__init__()
        self.net = _mlp([math.prod(image_shape), *hidden, 2 * zdim])

    @property
    def output_layer(self) -> nn.Module:  # the μ and log σ heads
        return self.net[-1]

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.net(e.flatten(1)).chunk(2, dim=-1)  # (B, zdim) each
        return mu, log_sigma


class MLPDecoder(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], zdim: int, hidden: list[int], n_out: int):
        super().__init__()
        c, h, w = image_shape
        self.out_shape = (n_out * c, h, w)
        self.net = _mlp([zdim, *hidden, n_out * c * h * w])

    @property
    def output_layer(self) -> nn.Module:
        return self.net[-1]

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


def _trunk_map_size(image_shape: tuple[int, int, int], channels: list[int]) -> tuple[int, int]:
    """(h', w'): the trunk's output map, one halving per channel count after the first."""

    def down(n: int) -> int:
        for _ in range(len(channels) - 1):
            n = (n + 1) // 2  # a 3×3 conv with stride 2 and padding 1
        return n

    return down(image_shape[1]), down(image_shape[2])


class ResNetEncoder(nn.Module):
    """MNIST default: 16 → 32 (s2) → 64 (s2) channels, then a linear map to (μ, log σ)."""

    def __init__(self, image_shape: tuple[int, int, int], zdim: int, channels: list[int]):
        super().__init__()
        self.trunk = _down_trunk(image_shape[0], channels)
        hh, ww = _trunk_map_size(image_shape, channels)
        self.head = nn.Linear(channels[-1] * hh * ww, 2 * zdim)

    @property
    def output_layer(self) -> nn.Module:  # the μ and log σ heads
        return self.head

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.head(self.trunk(e).flatten(1)).chunk(2, dim=-1)
        return mu, log_sigma


class ResNetCritic(nn.Module):
    """Like the encoder, with a linear head to one number D(x)."""

    def __init__(self, image_shape: tuple[int, int, int], channels: list[int]):
        super().__init__()
        self.trunk = _down_trunk(image_shape[0], channels)
        hh, ww = _trunk_map_size(image_shape, channels)
        self.head = nn.Linear(channels[-1] * hh * ww, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x).flatten(1)).squeeze(-1)


class ResNetDecoder(nn.Module):
    """The encoder's mirror: linear to 64×⌈H/4⌉×⌈W/4⌉, up-blocks 64 → 32 → 16, conv out, crop."""

    def __init__(self, image_shape: tuple[int, int, int], zdim: int, channels: list[int], n_out: int):
        super().__init__()
        c, h, w = image_shape
        self.image_hw = (h, w)
        self.hh, self.ww = _trunk_map_size(image_shape, channels)
        rev = list(reversed(channels))
        self.head = nn.Linear(zdim, rev[0] * self.hh * self.ww)
        self.c0 = rev[0]
        self.blocks = nn.Sequential(*[PreActBlock(a, b, up=True) for a, b in zip(rev[:-1], rev[1:], strict=True)])
        self.out = nn.Conv2d(rev[-1], n_out * c, 3, padding=1)

    @property
    def output_layer(self) -> nn.Module:
        return self.out

    def forward(self, z: Tensor) -> Tensor:
        h = self.head(z).view(z.shape[0], self.c0, self.hh, self.ww)
        h = self.blocks(h)
        h = self.out(F.leaky_relu(h, SLOPE))
        H, W = self.image_hw
        return h[:, :, :H, :W]  # upsampling overshoots odd sizes (7 → 14 → 28 is exact)


def latent_map_shape(image_shape: tuple[int, int, int], zdim: int, channels: list[int]) -> tuple[int, int, int]:
    """(L, h', w') of the `resnet_map` latent: h' × w' is the trunk's output map (one halving per
    channel count after the first) and L = zdim / (h'·w') latent channels, which must be whole."""
    hh, ww = _trunk_map_size(image_shape, channels)
    if zdim % (hh * ww) != 0:
        raise ValueError(
            f"model.zdim = {zdim} does not fill the {hh}×{ww} latent map of arch resnet_map (channels "
            f"{list(channels)} on {image_shape[1]}×{image_shape[2]} images): dim z must be a multiple of {hh * ww}"
        )
    return zdim // (hh * ww), hh, ww


class ResNetMapEncoder(nn.Module):
    """The ResNet trunk, then a 3×3 conv head to 2L channels on the h'×w' map: μ and log σ are
    its first and last L channels, each flattened (channel-major) to (B, L·h'·w') = (B, zdim). The
    model floors log σ at `model.log_sigma_min` (−3 in the authors' CIFAR-10 runs)."""

    def __init__(self, image_shape: tuple[int, int, int], zdim: int, channels: list[int]):
        super().__init__()
        self.n_latent, _, _ = latent_map_shape(image_shape, zdim, channels)
        self.trunk = _down_trunk(image_shape[0], channels)
        self.head = nn.Conv2d(channels[-1], 2 * self.n_latent, 3, padding=1)

    @property
    def output_layer(self) -> nn.Module:  # the μ and log σ heads
        return self.head

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.head(self.trunk(e)).chunk(2, dim=1)  # (B, L, h', w') each
        return mu.flatten(1), log_sigma.flatten(1)


class ResNetMapDecoder(nn.Module):
    """The map encoder's mirror: z (B, zdim) viewed as (B, L, h', w') in the encoder's layout, a 3×3
    conv to the top channel count, up-blocks back through `channels`, conv out, crop to H × W."""

    def __init__(self, image_shape: tuple[int, int, int], zdim: int, channels: list[int], n_out: int):
        super().__init__()
        c, h, w = image_shape
        self.image_hw = (h, w)
        self.map_shape = latent_map_shape(image_shape, zdim, channels)
        rev = list(reversed(channels))
        self.head = nn.Conv2d(self.map_shape[0], rev[0], 3, padding=1)
        self.blocks = nn.Sequential(*[PreActBlock(a, b, up=True) for a, b in zip(rev[:-1], rev[1:], strict=True)])
        self.out = nn.Conv2d(rev[-1], n_out * c, 3, padding=1)

    @property
    def output_layer(self) -> nn.Module:
        return self.out

    def forward(self, z: Tensor) -> Tensor:
        h = self.head(z.reshape(z.shape[0], *self.map_shape))
        h = self.blocks(h)
        h = self.out(F.leaky_relu(h, SLOPE))
        H, W = self.image_hw
        return h[:, :, :H, :W]  # upsampling overshoots odd sizes


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
    logistic mean with a scalar scale, 2 for a logistic mean and a per-pixel log-scale).
    `resnet_map` raises ValueError when zdim is not a multiple of the trunk's map size h'·w'."""
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
    if arch == "resnet_map":
        return (
            ResNetMapEncoder(image_shape, zdim, channels),
            ResNetMapDecoder(image_shape, zdim, channels, n_out),
            ResNetCritic(image_shape, channels),
        )
    raise ValueError(f"unknown architecture {arch!r}; allowed: mlp, resnet, resnet_map")
