"""Progress of the evaluation protocols: each protocol returns bitwise the same results with a
progress callback as without one, and the callback gets the documented names at increasing steps,
a few dozen times at most, ending with the end of the work."""

import math
from collections import defaultdict

import pytest
import torch

from factories import latent_gan_params, model_spec
from test_evaluate import PullbackLinearVAE, images, params
from test_fid import FakeInception, _images
from vaepp import evaluate
from vaepp.config import FIDParams, MALAParams
from vaepp.distributed import DistContext
from vaepp.fid_protocol import fid_protocol
from vaepp.latent_gan import LatentGAN
from vaepp.model import VAEPP
from vaepp.nll_protocol import nll_protocol
from vaepp.sampling_protocol import sampling_protocol


class Recorder:
    """A progress callback that keeps every (name, value, step) it is given."""

    def __init__(self):
        self.calls: list[tuple[str, float, int]] = []

    def __call__(self, name: str, value: float, step: int) -> None:
        self.calls.append((name, value, step))

    def series(self) -> dict[str, list[tuple[int, float]]]:
        out = defaultdict(list)
        for name, value, step in self.calls:
            out[name].append((step, value))
        return dict(out)


def without_seconds(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("seconds")}


def assert_increasing(series: dict[str, list[tuple[int, float]]]) -> None:
    for name, points in series.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)) and steps[0] >= 1, (name, steps)


def test_throttle_passes_on_at_most_reports_steps_with_every_value_of_a_step_and_the_last():
    rec = Recorder()
    report = evaluate.throttled(rec, "x.", 1000, 20)
    for k in range(1, 1001):
        report("a", k / 1000, k)
        report("b", -k, k)
    steps = [s for name, _, s in rec.calls if name == "x.a"]
    assert steps == list(range(50, 1001, 50))  # every 5%, the last included
    assert [s for name, _, s in rec.calls if name == "x.b"] == steps  # a step's values travel together
    coarse = Recorder()
    report = evaluate.throttled(coarse, "", 40, 10)
    for k in (16, 32, 40):  # batches of 16 images of 40; the last batch is short
        report("images_done", k, k)
    assert [s for _, _, s in coarse.calls] == [16, 32, 40]
    assert evaluate.throttled(None, "x.", 10, 10) is None


def test_nll_protocol_is_the_same_with_progress_and_reports_log_z_and_the_running_nll():
    model = PullbackLinearVAE(beta=1.0)
    small = params(prior_is_samples=4096, ais_chains=32, ais_temps=100, ais_seeds=2, q_based_per_image=4)
    small = small.model_copy(update={"n_importance": 50, "n_passes": 2, "batch_images": 4})
    train, test = images(16, 1), images(40, 2)
    plain = nll_protocol(model, DistContext(), train, test, small, device="cpu")
    rec = Recorder()
    watched = nll_protocol(model, DistContext(), train, test, small, device="cpu", callback=rec)
    assert without_seconds(watched) == without_seconds(plain)  # bitwise: floats compared with ==

    series = rec.series()
    assert set(series) == {
        "log_z.ais.temps_done_fraction",
        "log_z.paper_q",
        "log_z.prior_is",
        "log_z.ais",
        "nll.images_done",
        "nll.nats_running",
        "nll_paper.images_done",  # the paper's proposal q(z|e), scored after the headline one
        "nll_paper.nats_running",
    }
    assert_increasing(series)
    # AIS: every 5% of the 100 temperatures, as the fraction done
    assert series["log_z.ais.temps_done_fraction"] == [(k, k / 100) for k in range(5, 101, 5)]
    # each estimate as it is finished, at its place in the protocol, before the NLL starts
    for step, name in enumerate(("paper_q", "prior_is", "ais"), 1):
        assert series[f"log_z.{name}"] == [(step, plain["log_z"][name]["log_z"])]
    names = [name for name, _, _ in rec.calls]
    assert names.index("log_z.ais") < names.index("nll.images_done")
    # NLL: ten batches of 4 images, every 10% of the 40 images, the running mean ending at nll_nats
    assert series["nll.images_done"] == [(k, float(k)) for k in range(4, 41, 4)]
    per_image = plain["nll_per_image"]
    for prefix, column in (("nll", "nll_nats"), ("nll_paper", "nll_nats_paper_protocol")):
        for step, value in series[f"{prefix}.nats_running"]:
            assert value == pytest.approx(sum(per_image[column][:step]) / step, rel=1e-12)
    assert series["nll.nats_running"][-1][1] == pytest.approx(plain["nll_nats"], rel=1e-12)
    assert series["nll_paper.nats_running"][-1][1] == pytest.approx(plain["paper_protocol"]["nll_nats"], rel=1e-12)
    assert names.index("nll.nats_running") < names.index("nll_paper.images_done")
    assert len(rec.calls) <= 80


def test_nll_progress_of_the_plain_vae_is_the_nll_alone():
    model = PullbackLinearVAE(beta=1.0, prior="standard")
    small = params().model_copy(update={"n_importance": 20, "batch_images": 8})
    train, test = images(8, 1), images(16, 2)
    plain = nll_protocol(model, DistContext(), train, test, small, device="cpu")
    rec = Recorder()
    watched = nll_protocol(model, DistContext(), train, test, small, device="cpu", callback=rec)
    assert without_seconds(watched) == without_seconds(plain)
    series = rec.series()
    assert set(series) == {"nll.images_done", "nll.nats_running", "nll_paper.images_done", "nll_paper.nats_running"}
    assert [s for s, _ in series["nll.nats_running"]] == [8, 16]
    assert series["nll.nats_running"][-1][1] == pytest.approx(plain["nll_nats"], rel=1e-12)


def sampling_setup(seed: int = 0, **spec):
    torch.manual_seed(seed)
    model = VAEPP(model_spec((1, 12, 12), hidden=(16,), **spec))
    gan = LatentGAN.from_params(model.zdim, latent_gan_params())
    return model, gan


@pytest.mark.parametrize("n_steps", [7, 60])
def test_sampling_protocol_is_the_same_with_progress_and_reports_steps_and_acceptance(n_steps):
    model, gan = sampling_setup()
    with torch.no_grad():
        model.prior.xi.fill_(2.0)  # a pull-back strong enough that some large steps are rejected
    p = MALAParams(n_samples=12, n_steps=n_steps, step_size=0.5, seed=3)
    images_a, gan_a, plain = sampling_protocol(model, gan, DistContext(), p, device="cpu")
    rec = Recorder()
    images_b, gan_b, watched = sampling_protocol(model, gan, DistContext(), p, device="cpu", callback=rec)
    assert torch.equal(images_a, images_b) and torch.equal(gan_a, gan_b)
    assert without_seconds(watched) == without_seconds(plain)

    series = rec.series()
    assert set(series) == {"mala.steps_done", "mala.acceptance_running"}
    assert_increasing(series)
    steps = [s for s, _ in series["mala.steps_done"]]
    assert steps[-1] == n_steps and len(steps) == min(n_steps, evaluate.REPORTS_PER_LOOP)
    assert series["mala.steps_done"] == [(s, float(s)) for s in steps]
    assert [s for s, _ in series["mala.acceptance_running"]] == steps
    assert all(0.0 <= v <= 1.0 for _, v in series["mala.acceptance_running"])
    assert series["mala.acceptance_running"][-1][1] == pytest.approx(plain["mala_acceptance"], rel=1e-12)
    assert 0.0 < plain["mala_acceptance"] < 1.0  # the running rate is not trivially 0 or 1


def test_sampling_progress_is_silent_where_no_mala_runs():
    model, gan = sampling_setup(prior="standard")
    rec = Recorder()
    p = MALAParams(n_samples=6, n_steps=5, step_size=1e-3, seed=0)
    _, _, metrics = sampling_protocol(model, gan, DistContext(), p, device="cpu", callback=rec)
    assert metrics["sampler"] == "prior N(0, I)" and rec.calls == []


def run_fid(stats_dir, callback=None) -> dict:
    train = (_images(50, 10) * 255).round().to(torch.uint8)
    test = (_images(35, 11) * 255).round().to(torch.uint8)
    samples = (_images(32, 12) ** 2 * 255).round().to(torch.uint8)
    samples_gan = (_images(32, 13) * 255).round().to(torch.uint8)
    return fid_protocol(
        FakeInception(),
        DistContext(),
        samples,
        samples_gan,
        train,
        test,
        FIDParams(n_samples=30, reference="train", n_reference=40, batch_size=4, latent_gan_samples=True),
        sampler={},
        dataset="toy",
        reference_digest="a" * 64,
        held_out_digest="b" * 64,
        stats_dir=stats_dir,
        device="cpu",
        callback=callback,
    )


def test_fid_protocol_is_the_same_with_progress_and_reports_images_per_set(tmp_path):
    plain = run_fid(tmp_path / "plain")
    rec = Recorder()
    watched = run_fid(tmp_path / "watched", rec)  # a cache of its own: every set goes through the network
    assert without_seconds(watched) == without_seconds(plain)

    series = rec.series()
    sets = ("reference", "held_out", "samples", "samples_gan")
    assert list(series) == [f"fid.{s}.images_done" for s in sets]  # in the order they are scored
    assert_increasing(series)
    for name, total in zip(series, (40, 30, 30, 30), strict=True):
        points = series[name]
        assert points[-1] == (total, float(total)) and len(points) <= evaluate.REPORTS_PER_IMAGE_SET
        assert all(value == step for step, value in points)
    assert series["fid.reference.images_done"] == [(k, float(k)) for k in range(4, 41, 4)]

    cached = Recorder()
    again = run_fid(tmp_path / "watched", cached)  # reference and held-out features from the cache
    assert without_seconds(again) == without_seconds(plain)
    assert list(cached.series()) == ["fid.samples.images_done", "fid.samples_gan.images_done"]


def test_certified_nll_reports_the_certificate_and_reverse_ais():
    torch.manual_seed(0)
    model = VAEPP(model_spec((1, 12, 12), hidden=(16,), prior="certified"))
    small = params(prior_is_samples=2048, ais_chains=8, ais_temps=30, ais_seeds=2, q_based_per_image=2)
    small = small.model_copy(
        update={
            "n_importance": 8,
            "log_z": small.log_z.model_copy(
                update={"certificate_pilot": 2000, "certificate_max_samples": 10**6, "certificate_half_width": 0.2}
            ),
        }
    )
    train = ((torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(1)) > 0.6) * 255).to(torch.uint8)
    test = ((torch.rand(8, 1, 12, 12, generator=torch.Generator().manual_seed(2)) > 0.6) * 255).to(torch.uint8)
    plain = nll_protocol(model, DistContext(), train, test, small, device="cpu")
    rec = Recorder()
    watched = nll_protocol(model, DistContext(), train, test, small, device="cpu", callback=rec)
    assert without_seconds(watched) == without_seconds(plain)
    series = rec.series()
    estimates = ("paper_q", "prior_is", "ais", "certificate", "reverse_ais")
    for step, name in enumerate(estimates, 1):
        (point,) = series[f"log_z.{name}"]
        assert point[0] == step
        assert point[1] == plain["log_z"][name]["log_z"] or math.isnan(point[1])
    for name in ("log_z.ais.temps_done_fraction", "log_z.reverse_ais.temps_done_fraction"):
        assert series[name][-1] == (30, 1.0) and len(series[name]) == 20  # every 5% of 30 temperatures
    names = [name for name, _, _ in rec.calls]
    assert names.index("log_z.certificate") < names.index("log_z.reverse_ais.temps_done_fraction")
