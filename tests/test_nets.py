"""The `resnet_map` family (the authors' CIFAR-10 networks): the latent as an h'×w'×L map with
convolutional μ / log σ heads, its decoder the mirror; shapes, the dim-z check, the zero start and
one training step."""

import pytest
import torch

from factories import model_spec, train_params
from vaepp.model import VAEPP
from vaepp.nets import ResNetMapDecoder, ResNetMapEncoder, build_networks, latent_map_shape
from vaepp.train import make_optimizers, train_step

CIFAR = (3, 32, 32)
SMALL = (8, 16, 16)  # the paper's [96, 192, 192] scaled down: 32×32 → 16×16 → 8×8


def test_paper_size_shapes():
    """[96, 192, 192] on 32×32 images: an 8×8 map, so dim z 1024 is 16 latent channels."""
    torch.manual_seed(0)
    assert latent_map_shape(CIFAR, 1024, [96, 192, 192]) == (16, 8, 8)
    enc, dec, critic = build_networks("resnet_map", CIFAR, 1024, hidden=[8], channels=[96, 192, 192], n_out=2)
    assert enc.output_layer.weight.shape == (32, 192, 3, 3)  # a conv head to 2L channels
    x = torch.rand(2, *CIFAR)
    mu, log_sigma = enc(x)
    assert mu.shape == log_sigma.shape == (2, 1024)
    assert dec(mu).shape == (2, 2 * 3, 32, 32)
    assert critic(x).shape == (2,)


def test_latent_layout_is_the_same_in_encoder_and_decoder():
    """z[:, l·h'·w' + i·w' + j] is latent channel l at (i, j) on both sides: a z that is nonzero
    only in channel 0 reaches the decoder as a map nonzero only in channel 0."""
    enc = ResNetMapEncoder(CIFAR, 128, list(SMALL))
    dec = ResNetMapDecoder(CIFAR, 128, list(SMALL), n_out=1)
    assert dec.map_shape == (2, 8, 8)
    x = torch.rand(1, *CIFAR)
    mu, log_sigma = enc(x)
    head = enc.head(enc.trunk(x))  # (1, 4, 8, 8): μ is channels 0-1, log σ channels 2-3
    torch.testing.assert_close(mu.view(1, 2, 8, 8), head[:, :2])
    torch.testing.assert_close(log_sigma.view(1, 2, 8, 8), head[:, 2:])
    z = torch.zeros(1, 128)
    z[0, :64] = 1.0
    seen = {}
    dec.head.register_forward_pre_hook(lambda m, inp: seen.update(map=inp[0]))  # returns None: input kept
    dec(z)
    assert seen["map"].shape == (1, 2, 8, 8)
    assert (seen["map"][:, 0] == 1).all() and (seen["map"][:, 1] == 0).all()


@pytest.mark.parametrize("zdim", [1000, 96, 32])
def test_zdim_that_does_not_fill_the_map_is_refused(zdim):
    with pytest.raises(ValueError, match=rf"zdim = {zdim}.*8×8.*multiple of 64"):
        build_networks("resnet_map", CIFAR, zdim, hidden=[8], channels=list(SMALL), n_out=1)


def test_odd_image_sizes_are_cropped():
    """28×28 → 14×14 → 7×7: dim z 49·L, and the decoder returns 28×28 (7 → 14 → 28 is exact)."""
    enc, dec, _ = build_networks("resnet_map", (1, 28, 28), 98, hidden=[8], channels=[4, 8, 8], n_out=1)
    mu, _ = enc(torch.rand(3, 1, 28, 28))
    assert mu.shape == (3, 98) and dec(mu).shape == (3, 1, 28, 28)


def _map_model(**overrides) -> VAEPP:
    spec = model_spec(
        CIFAR,
        binary=False,
        arch="resnet_map",
        zdim=1024,
        channels=SMALL,
        likelihood="logistic",
        posterior="normal",
        log_sigma_min=-3.0,
        **overrides,
    )
    return VAEPP(spec)


def test_zero_heads_start_q_at_the_standard_normal_and_g_flat():
    torch.manual_seed(0)
    model = _map_model(init="zero_heads")
    x = torch.rand(4, *CIFAR)
    mu, log_sigma = model.encoder(x)
    assert (mu == 0).all() and (log_sigma == 0).all()
    out = model.decoder(torch.randn(4, 1024))
    assert (out == 0).all()  # a flat image


def test_one_training_step_runs_on_the_cpu():
    torch.manual_seed(0)
    model = _map_model(init="zero_heads")
    params = train_params(batch_size=4, n_prior_samples=4).model_copy(
        update={"penalty_p": 6.0, "critic_penalty_weight": 1.0}
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert params.algorithm == "vaepp"
    opts = make_optimizers(model, params)
    e = torch.randint(0, 256, (4, *CIFAR)).float() / 255
    metrics = train_step(model, opts, e, params, n_train=100)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.head") for k in moved) and any(k.startswith("decoder.out") for k in moved)
