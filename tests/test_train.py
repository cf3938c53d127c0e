"""One step of each method (a prior and a training algorithm): finite, moves the weights, learns,
reproducible."""

import math

import pytest
import torch

from factories import model_spec, train_params
from vaepp.model import VAEPP
from vaepp.optim import NonFiniteLossError
from vaepp.train import make_optimizers, train, train_step

# the paper's method → (the model's prior, train.algorithm)
METHODS = {"vae": ("standard", "vaepp"), "naive_vaepp": ("pullback", "naive"), "vaepp": ("pullback", "vaepp")}
ALGOS = list(METHODS)


def make(method, arch="mlp", likelihood="bernoulli", seed=0, prior=None, algorithm=None, **kw):
    """A 12×12 model of `method`'s prior and its train params; `prior` and `algorithm` (train.algorithm)
    replace the method's when given."""
    prior = prior or METHODS[method][0]
    algorithm = algorithm or METHODS[method][1]
    torch.manual_seed(seed)
    spec = model_spec(
        (1, 12, 12),
        arch=arch,
        hidden=(32, 32),
        channels=(4, 8),
        likelihood=likelihood,
        prior=prior,
        **kw,
    )
    params = train_params(batch_size=16, n_prior_samples=16, lr=1e-3, epochs=2, seed=seed, algorithm=algorithm)
    return VAEPP(spec), params


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 12, 12, generator=g) > 0.6).float() * 0.9 + 0.05


@pytest.mark.parametrize("method", ALGOS)
@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_one_step_is_finite_and_changes_the_weights(method, arch):
    model, params = make(method, arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = make_optimizers(model, params)
    m = train_step(model, opts, batch(), params, n_train=1000)
    assert all(math.isfinite(v) for v in m.values())
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("encoder") for k in changed)
    assert any(k.startswith("decoder") for k in changed)
    if method == "vae":
        assert not any(k.startswith("critic") for k in changed) and "prior.xi" not in changed
    else:
        assert any(k.startswith("critic") for k in changed) and "prior.xi" in changed


@pytest.mark.parametrize("method", ALGOS)
def test_loss_falls_on_a_repeated_batch(method):
    model, params = make(method)
    opts = make_optimizers(model, params)
    e = batch()
    losses = [train_step(model, opts, e, params, n_train=1000)["loss"] for _ in range(40)]
    # step-to-step noise is ~0.3 nats here; a real decrease over 40 steps is ~4 nats
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 2.0


@pytest.mark.parametrize("method", ALGOS)
def test_same_seed_is_bitwise_reproducible(method):
    images = (batch(3, 64) * 255).to(torch.uint8)
    states = []
    for _ in range(2):
        model, params = make(method, seed=7)
        train(model, images, params)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_logistic_and_flow_models_train():
    model, params = make("vaepp", likelihood="logistic", posterior="normal", n_flows=3, logistic_scale="scalar")
    flows_before = {k: v.clone() for k, v in model.flows.state_dict().items()}
    opts = make_optimizers(model, params)
    e = torch.round(torch.rand(16, 1, 12, 12) * 255) / 255
    m = train_step(model, opts, e, params, n_train=100)
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
        train(model, images, params)


def test_a_prior_trains_only_with_the_algorithms_it_accepts():
    """N(0, I) has no critic: Algorithms 1 and 2 train it alike, to the bit. A certified prior
    trains with Algorithm 2 only: Algorithm 1 is refused before any step."""
    images = (batch(3, 64) * 255).to(torch.uint8)
    states = []
    for algorithm in ("naive", "vaepp"):
        model, params = make("vae", seed=7, algorithm=algorithm)
        train(model, images, params)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    model, params = make("vaepp", prior="certified", algorithm="naive")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"train.algorithm = 'naive': the certified prior trains with vaepp only"):
        train(model, images, params)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["naive_vaepp", "vaepp"])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, method):
    """Stopped after epoch 1 of 3 (its checkpoint written) and rerun from a different start, the
    fit ends bitwise equal to an uninterrupted one: weights, both Adam states, RNG streams."""
    from vaepp.checkpoints import Checkpoint

    images = (batch(5, 48) * 255).to(torch.uint8)
    model, params = make(method, seed=3)
    params = params.model_copy(update={"epochs": 3})
    whole = train(model, images, params, checkpoint=Checkpoint(tmp_path / "a.ckpt"))

    def crash_after_one(epoch, metrics):
        if epoch == 1:
            raise _Crash

    stopped, _ = make(method, seed=3)
    with pytest.raises(_Crash):
        train(stopped, images, params, callback=crash_after_one, checkpoint=Checkpoint(tmp_path / "b.ckpt"))
    resumed, _ = make(method, seed=11)  # other initial weights: the checkpoint decides
    rest = train(resumed, images, params, checkpoint=Checkpoint(tmp_path / "b.ckpt"))
    assert rest.resumed_from_epoch == 1
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in model.state_dict().items())
    drop = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert drop(rest.history) == drop(whole.history)


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    from vaepp.checkpoints import Checkpoint
    from vaepp.files import CheckpointError

    images = (batch(5, 32) * 255).to(torch.uint8)
    model, params = make("vaepp")
    train(model, images, params.model_copy(update={"epochs": 1}), checkpoint=Checkpoint(tmp_path / "c.ckpt"))
    with pytest.raises(CheckpointError, match="other settings"):
        train(
            make("vaepp")[0],
            images,
            params.model_copy(update={"epochs": 1, "lr": 1e-4}),
            checkpoint=Checkpoint(tmp_path / "c.ckpt"),
        )
    with pytest.raises(CheckpointError, match="other settings"):  # the training algorithm is a setting too
        train(
            make("vaepp")[0],
            images,
            params.model_copy(update={"epochs": 1, "algorithm": "naive"}),
            checkpoint=Checkpoint(tmp_path / "c.ckpt"),
        )


def test_model_file_rebuilds_the_trained_model(tmp_path):
    from vaepp.artifacts import load_vae, save_vae
    from vaepp.train import train_settings

    model, params = make("vaepp", n_flows=2, posterior="normal")
    train(model, (batch(1, 32) * 255).to(torch.uint8), params.model_copy(update={"epochs": 1}))
    settings = train_settings(model.spec, params)
    save_vae(tmp_path / "vae.pt", model, settings, history=[{"loss": 1.0}], run={"name": "r"})
    loaded, ckpt = load_vae(tmp_path / "vae.pt", "cpu")
    assert loaded.spec == model.spec and not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert ckpt["train_spec"] == settings["train_spec"] and ckpt["run"] == {"name": "r"}
    z = torch.randn(4, model.zdim)
    with torch.no_grad():
        assert torch.equal(loaded.log_f(z), model.eval().log_f(z))


@pytest.mark.parametrize("prior", ["standard", "pullback", "certified"])
def test_a_model_file_of_the_former_layout_still_loads(tmp_path, prior):
    """A model file written when the spec held the booleans pullback and certified, and the prior's
    weights (ξ, c, h, the EMA of Ẑ) sat on the model itself, loads into the same weights."""
    from vaepp import files
    from vaepp.artifacts import load_vae
    from vaepp.checkpoints import FORMAT
    from vaepp.train import train_settings

    kw = {"acceptance_mlp": (8,)} if prior == "certified" else {}
    model, params = make("vaepp", seed=5, prior=prior, **kw)
    with torch.no_grad():  # weights away from their initial values, the prior's included
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if prior == "certified":
        model.prior.z_ema.fill_(0.3)
    state = {k.removeprefix("prior."): v.clone() for k, v in model.state_dict().items()}
    if prior == "standard":
        state["xi"] = torch.zeros(())  # the former model held ξ whatever its prior
    assert "xi" in state and not any(k.startswith("prior.") for k in state)
    spec = model.spec.to_dict()
    del spec["prior"]
    spec.update(pullback=prior != "standard", certified=prior == "certified")
    settings = {**train_settings(model.spec, params), "model_spec": spec}
    path = files.atomic_torch_save({"format": FORMAT, **settings, "model": state, "history": []}, tmp_path / "vae.pt")

    loaded, ckpt = load_vae(path, "cpu")
    assert loaded.spec == model.spec and loaded.spec.prior == prior and ckpt["model_spec"] == spec
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    z = torch.randn(4, model.zdim)
    with torch.no_grad():
        assert torch.equal(loaded.log_f(z), model.eval().log_f(z))
