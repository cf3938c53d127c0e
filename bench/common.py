"""Shared pieces of the benchmarks: timing, FLOP counting from layer shapes, the results table.

FLOPs count only the matrix products of `nn.Linear` and `nn.Conv2d` layers (one multiply-add =
2 FLOPs); activations, likelihoods and optimiser updates are elementwise and left out, so an
achieved rate is "useful matmul FLOPs per second", comparable with the matmul limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]


# ----- timing ------------------------------------------------------------------------------------
def best_time(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    """Smallest wall time in seconds of `fn()` over `repeats` calls after `warmup` untimed ones.
    On a machine shared with other work the minimum is the least disturbed measurement."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ----- FLOPs from layer shapes -------------------------------------------------------------------
def layer_flops(module: nn.Module, inputs: tuple, output: Tensor) -> int:
    """Forward FLOPs of one call of a Linear or Conv2d layer, from its shapes.

    Linear: 2·rows·in·out, rows = every leading element of the input.
    Conv2d: 2·B·H_out·W_out·C_out·(C_in/groups)·k_h·k_w.
    Biases are an addition per output and are not counted.
    """
    if isinstance(module, nn.Linear):
        rows = inputs[0].numel() // module.in_features
        return 2 * rows * module.in_features * module.out_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_out = (module.in_channels // module.groups) * kh * kw
        return 2 * output.numel() * per_out
    return 0


@dataclass(frozen=True)
class NetFlops:
    """Forward FLOPs per input row of one network, and of its first layer alone (whose input
    gradient is not needed when the input is data)."""

    forward: float
    first_layer: float


def net_flops(net: nn.Module, example: Tensor, call: Callable[[Tensor], object] | None = None) -> NetFlops:
    """FLOPs per row of `net` on `example` (rows = example.shape[0]), counted by forward hooks on
    its Linear and Conv2d layers. `call(example)` runs it (default: `net(example)`)."""
    calls: list[int] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: calls.append(layer_flops(m, i, o)))
        for m in net.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            (call or net)(example)
    finally:
        for h in hooks:
            h.remove()
    if not calls:
        raise ValueError(f"{type(net).__name__} has no Linear or Conv2d layer to count")
    rows = example.shape[0]
    return NetFlops(forward=sum(calls) / rows, first_layer=calls[0] / rows)


# ----- the table ---------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the printed table: a figure, its value with unit, its target and whether the
    target is met (None when the figure has no target)."""

    figure: str
    value: str
    target: str = "—"
    met: bool | None = None


def format_table(rows: list[Row]) -> str:
    heads = ("figure", "value", "target", "met")
    cells = [(r.figure, r.value, r.target, {True: "yes", False: "NO", None: ""}[r.met]) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    line = lambda c: "  ".join(s.ljust(w) for s, w in zip(c, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(heads), line(["-" * w for w in widths]), *map(line, cells)])
