"""The datasets the study knows: one row each. Config validation (`config.Dataset`), acquisition
(`acquire`, which looks up each row's fetcher by name), the report (which cells are binary, which
need the internet) and the benchmarks all read this table.

To add a dataset: one `DatasetInfo` row here, plus its fetcher in `acquire/datasets.py` when none
of the existing ones fits, plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # the key in params.yaml (`data.dataset`, `datasets`)
    label: str  # the display name
    shape: tuple[int, int, int]  # (C, H, W) of one prepared image
    binary: bool  # dynamic binarisation applies (x ~ Bernoulli(e)): the likelihood "auto" is Bernoulli
    n_train: int  # prepared training images (validation included: `data.split_prepared` cuts it)
    fetcher: str  # the name of its fetcher in `acquire.datasets.FETCHERS`
    needs_internet: str | None = None  # why it cannot be prepared offline; None: an offline source exists
    stand_in: bool = False  # stands in for the paper's data (smoke tests or a substitute), not its results


_ROWS = (
    DatasetInfo("mnist", "MNIST", (1, 28, 28), True, 60_000, "idx"),
    DatasetInfo("fashion_mnist", "Fashion-MNIST", (1, 28, 28), True, 60_000, "idx"),
    DatasetInfo(
        "static_mnist_standin",
        "Static MNIST stand-in",
        (1, 28, 28),
        True,
        50_000,
        "static_mnist_standin",
        stand_in=True,
    ),
    DatasetInfo(
        "static_mnist",
        "Static MNIST (Larochelle)",
        (1, 28, 28),
        True,
        50_000,
        "static_mnist",
        needs_internet="needs the internet (torchvision download_url of the Larochelle files)",
    ),
    DatasetInfo(
        "omniglot",
        "Omniglot",
        (1, 28, 28),
        True,
        19_280,
        "omniglot",
        needs_internet="needs the internet (torchvision download)",
    ),
    DatasetInfo(
        "cifar10",
        "CIFAR-10",
        (3, 32, 32),
        False,
        50_000,
        "cifar10",
        needs_internet="needs the internet (torchvision download)",
    ),
    DatasetInfo("cifar10_smoke", "CIFAR-10 smoke set", (3, 32, 32), False, 10, "cifar10_smoke", stand_in=True),
    DatasetInfo(
        "celeba",
        "CelebA 64×64",
        (3, 64, 64),
        False,
        162_770,
        "celeba",
        needs_internet="needs the internet (torchvision download from Google Drive)",
    ),
)

DATASETS: dict[str, DatasetInfo] = {row.name: row for row in _ROWS}
DatasetName = Literal[tuple(DATASETS)]  # the names params.yaml may use


def info(name: str) -> DatasetInfo:
    """The registry row of `name`; a ValueError listing the known names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}") from None


def is_binary(name: str) -> bool:
    return info(name).binary


def needs_internet(name: str) -> str | None:
    return info(name).needs_internet
