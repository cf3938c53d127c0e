"""Two epochs of each method (VAE, Naive VAEPP, VAEPP) on real MNIST (the offline-verified 60k
training images, the embedded default's networks) on the CPU: the loss must fall from the first
epoch to the second and stay finite. About a minute in all on 2 cores."""

import math

import pytest
import torch

from acquire import datasets as fetch_data
from stages import cli
from stages.boot import ROOT
from vaepp import data
from vaepp.config import load_run
from vaepp.model import VAEPP
from vaepp.resolve import method, model_spec, train_params
from vaepp.train import train

pytestmark = pytest.mark.slow  # real training on 60 000 images: `make test-slow`


@pytest.fixture(scope="module")
def mnist_train():
    cache = cli.cache_dir()
    fetch_data.ensure_idx("mnist", cache)
    train_images, _ = data.load_idx("mnist", cache)
    assert train_images.shape == (60000, 1, 28, 28)
    return train_images


@pytest.mark.parametrize("run_name", ["vae", "naive_vaepp", "vaepp"])
def test_two_mnist_epochs_lower_the_loss(mnist_train, run_name):
    run = load_run(ROOT / "params.yaml", run_name)
    assert method(run) == run_name  # the run named after the method is that method
    params = train_params(run, binary=True).model_copy(update={"epochs": 2})
    torch.manual_seed(params.seed)
    model = VAEPP(model_spec(run, (1, 28, 28), True))
    result = train(model, mnist_train, params, device="cpu")
    first, second = result.history
    assert all(math.isfinite(v) for v in second.values() if isinstance(v, float))
    # Epoch means over 468 batches each: the second epoch's loss is lower by far more than the
    # batch-to-batch noise of a mean (a few tenths of a nat).
    assert second["loss"] < first["loss"] - 1.0, (first["loss"], second["loss"])
    print(
        f"{run_name}: loss {first['loss']:.2f} → {second['loss']:.2f} nats, "
        f"{first['seconds']:.1f} + {second['seconds']:.1f} s"
    )
