"""The dataset registry (vaepp/datasets.py): the one table config, acquisition, report and bench read."""

from __future__ import annotations

import typing

import pytest

from acquire.datasets import FETCHERS
from vaepp import datasets
from vaepp.config import DataParams, ParamsError, parse_params


def test_every_row_has_its_fetcher_and_a_sane_shape():
    for row in datasets.DATASETS.values():
        assert row.fetcher in FETCHERS, f"{row.name}: no fetcher {row.fetcher!r} in acquire.datasets.FETCHERS"
        c, h, w = row.shape
        assert c in (1, 3) and h > 0 and w > 0 and row.n_train > 0


def test_config_accepts_exactly_the_registry_names():
    assert set(typing.get_args(DataParams.model_fields["dataset"].annotation)) == set(datasets.DATASETS)


def test_a_misspelt_dataset_is_named_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnsit'; choose one of mnist, fashion_mnist"):
        datasets.info("mnsit")
    import yaml

    from tests.factories import TINY

    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["dataset"] = "mnsit"
    with pytest.raises(ParamsError, match=r"data.dataset = 'mnsit'.*'fashion_mnist'"):
        parse_params(raw)


def test_binary_and_internet_flags_are_the_papers():
    assert datasets.is_binary("mnist") and datasets.is_binary("omniglot") and not datasets.is_binary("cifar10")
    assert datasets.needs_internet("mnist") is None and datasets.needs_internet("fashion_mnist") is None
    assert "internet" in datasets.needs_internet("celeba")
