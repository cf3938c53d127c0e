"""The `certified` prior: the bounded pull-back prior N(z; 0, I)·sigmoid(c − β·D(G(z)))/Z
trained with Algorithm 2's single optimiser and LARS's estimate of log Z."""

import math

import pytest
import torch

from factories import model_spec, train_params
from vaepp.model import VAEPP
from vaepp.posteriors import log_standard_normal
from vaepp.train import train, train_step


def make(seed=0, **kw):
    torch.manual_seed(seed)
    spec = model_spec((1, 12, 12), hidden=(16,), prior="certified", **kw)
    return VAEPP(spec), train_params(batch_size=16, n_prior_samples=16, lr=1e-3, epochs=2, seed=seed)


def images(n=48, seed=5):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, 1, 12, 12, generator=g) > 0.6).float() * 255).to(torch.uint8)


def test_the_prior_is_bounded_by_the_standard_normal():
    """f(z) = N(z; 0, I)·a(z) with a ∈ (0, 1): log f < log N everywhere, so Z = E_N[a] < 1."""
    model, _ = make()
    with torch.no_grad():
        model.prior.xi.fill_(2.0)
        z = 3 * torch.randn(200, model.zdim)
        assert (model.log_f(z) < log_standard_normal(z)).all()
        log_a = model.prior.log_acceptance_of(model, z)
        assert torch.allclose(model.log_f(z), log_standard_normal(z) + log_a)


@pytest.mark.parametrize("mlp", [(), (8,)])
def test_one_step_is_finite_moves_c_and_the_ema(mlp):
    model, params = make(acceptance_mlp=mlp)
    from vaepp.train import make_optimizers

    opts = make_optimizers(model, params)
    c0 = float(model.prior.acceptance_c.detach())
    e = images(16).float() / 255
    m = train_step(model, opts, e, params, n_train=48)
    assert all(math.isfinite(v) for v in m.values())
    assert float(model.prior.acceptance_c.detach()) != c0 and float(model.prior.z_ema) != 0.5
    assert m["z_ema"] == pytest.approx(float(model.prior.z_ema))
    assert 0.0 < m["z_ema"] <= 1.0 and "penalty" in m


def test_certified_training_resumes_bitwise_with_its_ema(tmp_path):
    from vaepp.checkpoints import Checkpoint

    class Crash(Exception):
        pass

    model, params = make(seed=3)
    params = params.model_copy(update={"epochs": 3})
    whole = train(model, images(), params, checkpoint=Checkpoint(tmp_path / "a.ckpt"))

    def crash(epoch, metrics):
        if epoch == 1:
            raise Crash

    stopped, _ = make(seed=3)
    with pytest.raises(Crash):
        train(stopped, images(), params, callback=crash, checkpoint=Checkpoint(tmp_path / "b.ckpt"))
    resumed, _ = make(seed=9)
    rest = train(resumed, images(), params, checkpoint=Checkpoint(tmp_path / "b.ckpt"))
    assert "prior.z_ema" in model.state_dict()
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in model.state_dict().items())  # z_ema included
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in whole.history]


def test_algorithm_and_model_must_agree():
    """A certified prior trains with Algorithm 2 only: Algorithm 1 is refused, naming the setting;
    a pull-back prior of the same networks accepts both."""
    model, params = make()
    assert params.algorithm == "vaepp"
    naive = params.model_copy(update={"algorithm": "naive", "epochs": 1})
    with pytest.raises(ValueError, match=r"train.algorithm = 'naive': the certified prior trains with vaepp only"):
        train(model, images(), naive)
    pullback = VAEPP(model_spec((1, 12, 12), hidden=(16,), prior="pullback"))
    assert pullback.spec.prior == "pullback" and pullback.prior.algorithms == ("naive", "vaepp")
    train(pullback, images(), naive)


def _grads(model, params, e):
    """Per-parameter gradients of one certified model loss on e, all from the same draws."""
    from vaepp.train import model_loss

    model.zero_grad()
    torch.manual_seed(11)
    loss, _ = model_loss(model, e, len(e), params, n_train=48)
    loss.backward()
    return {k: (None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()}


def test_a_fixed_decoder_in_the_acceptance_leaves_only_the_reconstruction_training_g():
    """acceptance_trains_decoder=False: G's gradient is the reconstruction's alone; the encoder's
    (through z, into D(G(z))), the critic's and c's are those of the full loss."""
    model, params = make(seed=4)
    with torch.no_grad():
        model.prior.xi.fill_(1.0)
        for p in model.decoder.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a G that is not flat, so D(G(z)) depends on G and z
    e = images(16).float() / 255
    full = _grads(model, params, e)
    fixed = _grads(model, params.model_copy(update={"acceptance_trains_decoder": False}), e)

    model.zero_grad()
    torch.manual_seed(11)
    mu, log_sigma = model.encode(e)
    z, _ = model.sample_q(mu, log_sigma, 1)
    (-model.log_px(e, model.decode(z[0])).sum() / len(e)).backward()
    recon_only = {k: p.grad for k, p in model.named_parameters() if k.startswith("decoder.")}

    for k, g in fixed.items():
        if k.startswith("decoder."):
            assert torch.allclose(g, recon_only[k], rtol=1e-5, atol=1e-7), k
            assert not torch.allclose(full[k], recon_only[k], rtol=1e-3, atol=1e-6), k
        else:
            assert torch.allclose(g, full[k], rtol=1e-5, atol=1e-7), k
