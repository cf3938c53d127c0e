"""Settings for library tests, all from the tiny profile (tests/profiles_tiny.yaml) with per-test
overrides: one source of values, validated as params.yaml is."""

from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path

from vaepp.config import LatentGANParams, Params, TrainParams, deep_merge, load_params, resolve_run
from vaepp.model import ModelSpec
from vaepp.resolve import model_spec as _model_spec
from vaepp.resolve import train_params as _train_params

TINY = Path(__file__).with_name("profiles_tiny.yaml")


@cache
def tiny() -> Params:
    return load_params(TINY)


def train_params(**overrides) -> TrainParams:
    """The tiny profile's `train` section with "auto" resolved for Bernoulli data (penalty_p 3,
    critic_penalty_weight w) and `overrides`, validated (a misspelt key fails)."""
    resolved = _train_params(resolve_run(tiny(), "vaepp"), binary=True)
    return TrainParams(**{**resolved.model_dump(), **overrides})


def latent_gan_params(**overrides) -> LatentGANParams:
    """The tiny profile's `latent_gan` section resolved as for binary data (inputs "mean", noise
    of the profile's dim z, penalty_p 3), with `overrides` (which may restore an "auto"), validated."""
    from vaepp.resolve import latent_gan_params as _resolved

    base = _resolved(resolve_run(tiny(), "vaepp"), True).model_dump()
    return LatentGANParams(**{**base, **overrides})


def model_spec(image_shape: tuple[int, int, int] = (1, 28, 28), *, binary: bool = True, **overrides) -> ModelSpec:
    """The tiny profile's VAEPP model for images of `image_shape` ("auto" resolved for binary or
    grey-level data), with `overrides` of ModelSpec fields (e.g. prior="standard", hidden=(8,))."""
    return dataclasses.replace(_model_spec(resolve_run(tiny(), "vaepp"), image_shape, binary), **overrides)


def tiny_params_yaml(overrides: dict) -> str:
    """The tiny profile as YAML with `overrides` merged in key by key (a nested mapping merges,
    anything else replaces), validated: a params file for a stage test."""
    import yaml

    raw = deep_merge(yaml.safe_load(TINY.read_text()), overrides)
    from vaepp.config import parse_params

    parse_params(raw, source="test params")
    return yaml.safe_dump(raw, sort_keys=False)
