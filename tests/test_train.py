"""One step of each training algorithm: finite, moves the weights, learns, reproducible."""

import math

import pytest
import torch

from factories import model_spec, train_params
from vaepp.model import VAEPP
from vaepp.train import NonFiniteLossError, make_optimizers, train, train_step

ALGOS = ["vae", "naive_vaepp", "vaepp"]


def make(algorithm, arch="mlp", likelihood="bernoulli", seed=0, **kw):
    torch.manual_seed(seed)
    spec = model_spec(
        (1, 12, 12),
        arch=arch,
        hidden=(32, 32),
        channels=(4, 8),
        likelihood=likelihood,
        pullback=algorithm != "vae",
        **kw,
    )
    return VAEPP(spec), train_params(batch_size=16, n_prior_samples=16, lr=1e-3, epochs=2, seed=seed)


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 12, 12, generator=g) > 0.6).float() * 0.9 + 0.05


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_one_step_is_finite_and_changes_the_weights(algorithm, arch):
    model, params = make(algorithm, arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = make_optimizers(model, params, algorithm)
    m = train_step(model, opts, batch(), params, algorithm, n_train=1000)
    assert all(math.isfinite(v) for v in m.values())
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("encoder") for k in changed)
    assert any(k.startswith("decoder") for k in changed)
    if algorithm == "vae":
        assert not any(k.startswith("critic") for k in changed) and "xi" not in changed
    else:
        assert any(k.startswith("critic") for k in changed) and "xi" in changed


@pytest.mark.parametrize("algorithm", ALGOS)
def test_loss_falls_on_a_repeated_batch(algorithm):
    model, params = make(algorithm)
    opts = make_optimizers(model, params, algorithm)
    e = batch()
    losses = [train_step(model, opts, e, params, algorithm, n_train=1000)["loss"] for _ in range(40)]
    # step-to-step noise is ~0.3 nats here; a real decrease over 40 steps is ~4 nats
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 2.0


@pytest.mark.parametrize("algorithm", ALGOS)
def test_same_seed_is_bitwise_reproducible(algorithm):
    images = (batch(3, 64) * 255).to(torch.uint8)
    states = []
    for _ in range(2):
        model, params = make(algorithm, seed=7)
        train(model, images, params, algorithm)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_logistic_and_flow_models_train():
    model, params = make("vaepp", likelihood="logistic", posterior="normal", n_flows=3, logistic_scale="scalar")
    flows_before = {k: v.clone() for k, v in model.flows.state_dict().items()}
    opts = make_optimizers(model, params, "vaepp")
    e = torch.round(torch.rand(16, 1, 12, 12) * 255) / 255
    m = train_step(model, opts, e, params, "vaepp", n_train=100)
    assert math.isfinite(m["loss"])
    assert model.log_gamma.grad is not None and torch.isfinite(model.log_gamma.grad)
    # every flow parameter (u, w, b of each planar map) is trained by the step
    assert all(not torch.equal(flows_before[k], v) for k, v in model.flows.state_dict().items())


def test_non_finite_loss_stops_with_epoch_and_step():
    model, params = make("vaepp")
    with torch.no_grad():
        model.decoder.net[0].weight.fill_(float("nan"))
    images = (batch(0, 64) * 255).to(torch.uint8)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 0"):
        train(model, images, params, "vaepp")


def test_vae_algorithm_needs_a_plain_model():
    model, params = make("vaepp")
    with pytest.raises(ValueError, match="pullback"):
        train(model, (batch() * 255).to(torch.uint8), params, "vae")


class _Crash(Exception):
    pass


@pytest.mark.parametrize("algorithm", ["naive_vaepp", "vaepp"])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, algorithm):
    """Stopped after epoch 1 of 3 (its checkpoint written) and rerun from a different start, the
    fit ends bitwise equal to an uninterrupted one: weights, both Adam states, RNG streams."""
    from vaepp.checkpoints import Checkpoint

    images = (batch(5, 48) * 255).to(torch.uint8)
    model, params = make(algorithm, seed=3)
    params = params.model_copy(update={"epochs": 3})
    whole = train(model, images, params, algorithm, checkpoint=Checkpoint(tmp_path / "a.ckpt"))

    def crash_after_one(epoch, metrics):
        if epoch == 1:
            raise _Crash

    stopped, _ = make(algorithm, seed=3)
    with pytest.raises(_Crash):
        train(stopped, images, params, algorithm, callback=crash_after_one, checkpoint=Checkpoint(tmp_path / "b.ckpt"))
    resumed, _ = make(algorithm, seed=11)  # other initial weights: the checkpoint decides
    rest = train(resumed, images, params, algorithm, checkpoint=Checkpoint(tmp_path / "b.ckpt"))
    assert rest.resumed_from_epoch == 1
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in model.state_dict().items())
    drop = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert drop(rest.history) == drop(whole.history)


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    from vaepp.checkpoints import Checkpoint
    from vaepp.files import CheckpointError

    images = (batch(5, 32) * 255).to(torch.uint8)
    model, params = make("vaepp")
    train(model, images, params.model_copy(update={"epochs": 1}), "vaepp", checkpoint=Checkpoint(tmp_path / "c.ckpt"))
    with pytest.raises(CheckpointError, match="other settings"):
        train(
            make("vaepp")[0],
            images,
            params.model_copy(update={"epochs": 1, "lr": 1e-4}),
            "vaepp",
            checkpoint=Checkpoint(tmp_path / "c.ckpt"),
        )


def test_model_file_rebuilds_the_trained_model(tmp_path):
    from vaepp.checkpoints import load_vae, save_vae
    from vaepp.train import train_settings

    model, params = make("vaepp", n_flows=2, posterior="normal")
    train(model, (batch(1, 32) * 255).to(torch.uint8), params.model_copy(update={"epochs": 1}), "vaepp")
    settings = train_settings(model.spec, params, "vaepp")
    save_vae(tmp_path / "vae.pt", model, settings, history=[{"loss": 1.0}], run={"name": "r"})
    loaded, ckpt = load_vae(tmp_path / "vae.pt", "cpu")
    assert loaded.spec == model.spec and not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert ckpt["train_spec"] == settings["train_spec"] and ckpt["run"] == {"name": "r"}
    z = torch.randn(4, model.zdim)
    with torch.no_grad():
        assert torch.equal(loaded.log_f(z), model.eval().log_f(z))
