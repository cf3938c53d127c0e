"""Early stopping on the log-Z monitor's validation NLL (`vaepp.early_stopping`, `train.patience`):
the decision on hand-made histories; tiny real fits that stop early and end with their best
epoch's weights; a killed and resumed fit that stops at the same epoch with the same weights; a
fit without patience that is untouched; the train stage's metrics.

The fits see 64 training images that are all the same deterministic 8×8 pattern (the top half on)
and are monitored on 16 validation images of that pattern with 10% of the pixels flipped. Training
keeps sharpening the decoder towards the noiseless pattern, so the validation NLL falls while the
decoder's probabilities approach 0.9 and rises (by nats per epoch) once they pass it: a best
epoch in the middle of the fit, whatever the last digits of the arithmetic.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from factories import model_spec, tiny_params_yaml, train_params
from stage_args import stage_argv
from vaepp.checkpoints import Checkpoint
from vaepp.early_stopping import MONITORED, stop_decision
from vaepp.files import load_checkpoint
from vaepp.log_z_monitor import log_z_monitor
from vaepp.model import VAEPP
from vaepp.train import train

NAN, INF = float("nan"), float("inf")


# ----- the decision, on hand-made histories -----------------------------------------------------
def history(nlls: list[float | None]) -> list[dict]:
    """One epoch per entry, counted from 1; None: an epoch the monitor did not check."""
    return [{"epoch": i + 1, "loss": 1.0} | ({} if v is None else {MONITORED: v}) for i, v in enumerate(nlls)]


def first_stop(nlls: list[float | None], patience: int) -> int | None:
    """The epoch after which the decision first says stop (None: never)."""
    h = history(nlls)
    return next((i for i in range(1, len(h) + 1) if stop_decision(h[:i], patience).stop), None)


@pytest.mark.parametrize("patience", [1, 2, 3, 5])
def test_it_stops_exactly_after_patience_checks_without_a_new_best(patience):
    nlls = [5.0, 4.0] + [4.5 - 0.01 * i for i in range(patience + 2)]  # all worse than 4.0
    assert first_stop(nlls, patience) == 2 + patience
    d = stop_decision(history(nlls[: 2 + patience]), patience)
    assert (d.best_epoch, d.best_nll_nats, d.stale, d.stop) == (2, 4.0, patience, True)
    d = stop_decision(history(nlls[: 1 + patience]), patience)
    assert (d.stale, d.stop) == (patience - 1, False)


def test_a_new_best_starts_the_count_again():
    nlls = [5.0, 4.0, 4.5, 3.9, 4.2, 4.1, 4.0]
    assert first_stop(nlls, 2) == 6  # 4.5 counts, 3.9 resets, then 4.2 and 4.1
    d = stop_decision(history(nlls), 3)
    assert (d.best_epoch, d.best_nll_nats, d.stale, d.stop) == (4, 3.9, 3, True)
    assert first_stop(nlls, 4) is None


def test_a_tie_is_not_an_improvement():
    assert first_stop([5.0, 4.0, 4.0], 1) == 3
    d = stop_decision(history([5.0, 4.0, 4.0, 4.0]), 3)
    assert (d.best_epoch, d.stale, d.stop) == (2, 2, False)  # the first epoch at the best keeps it
    assert first_stop([5.0, 4.0, math.nextafter(4.0, 0.0)], 1) is None  # the least improvement counts


def test_epochs_the_monitor_did_not_check_do_not_count():
    nlls = [None, 5.0, None, 4.0, None, 4.5, None, 4.6]  # checks every 2nd epoch
    assert first_stop(nlls, 2) == 8
    assert [stop_decision(history(nlls[:i]), 2).stale for i in range(1, 9)] == [0, 0, 0, 0, 0, 1, 1, 2]
    assert stop_decision(history(nlls), 2).best_epoch == 4
    assert stop_decision(history([None, None]), 1) == stop_decision([], 1)  # nothing checked yet
    assert not stop_decision([], 1).stop and stop_decision([], 1).best_epoch is None


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_a_non_finite_nll_is_never_a_best_and_counts_against_patience(bad):
    d = stop_decision(history([5.0, bad]), 1)
    assert (d.best_epoch, d.best_nll_nats, d.stale, d.stop) == (1, 5.0, 1, True)
    d = stop_decision(history([5.0, bad, 4.0]), 2)  # a finite improvement after it still counts
    assert (d.best_epoch, d.stale, d.stop) == (3, 0, False)
    d = stop_decision(history([bad, bad]), 2)  # none finite: it stops with no best epoch
    assert (d.best_epoch, d.best_nll_nats, d.stop) == (None, None, True)
    d = stop_decision(history([bad, 7.0]), 2)
    assert (d.best_epoch, d.stale, d.stop) == (2, 0, False)


def test_patience_below_one_is_refused():
    with pytest.raises(ValueError, match="patience = 0"):
        stop_decision(history([1.0]), 0)


# ----- tiny real fits ---------------------------------------------------------------------------
def images(n: int, flip: float, seed: int) -> torch.Tensor:
    """n uint8 8×8 images of the top-half pattern with each pixel flipped with probability `flip`."""
    x = torch.zeros(n, 1, 8, 8, dtype=torch.bool)
    x.view(n, -1)[:, :32] = True
    x ^= torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) < flip
    return (x * 255).to(torch.uint8)


TRAIN, VALID = images(64, 0.0, 0), images(16, 0.1, 1)


def fit(
    patience: int | None,
    epochs: int,
    *,
    seed: int = 0,
    checkpoint: Checkpoint | None = None,
    callback=None,
    log_z_every: int = 1,
    checkpoint_every: int = 1,
    prior: str = "standard",
):
    """A 64-16-16-2 VAE of `prior` fitted with the real log-Z monitor; (model, result). The
    weights start from `seed` (a resumed fit takes them from its checkpoint); training draws
    from train.seed 0 whatever `seed` is."""
    params = train_params(
        batch_size=16,
        n_prior_samples=16,
        lr=1e-2,
        epochs=epochs,
        patience=patience,
        log_z_every=log_z_every,
        checkpoint_every=checkpoint_every,
    )
    torch.manual_seed(seed)
    model = VAEPP(model_spec((1, 8, 8), hidden=(16, 16), zdim=2, prior=prior))
    monitor = lambda m: log_z_monitor(m, VALID, params.monitor, device="cpu")  # noqa: E731
    result = train(model, TRAIN, params, monitor=monitor, checkpoint=checkpoint, callback=callback)
    return model, result


def no_times(hs: list[dict]) -> list[dict]:
    """A history without its wall-clock columns (the epoch's seconds, the monitor's)."""
    return [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in hs]


def same_weights(a: VAEPP, b: VAEPP) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


PATIENCE, CAP = 2, 12


@pytest.fixture(scope="module")
def stopped():
    """The uninterrupted early-stopped fit that the other fits are compared with."""
    return fit(PATIENCE, CAP)


def test_a_fit_stops_early_and_ends_with_its_best_epochs_weights(stopped):
    model, result = stopped
    checked = {h["epoch"]: h["monitor_valid_nll"] for h in result.history if "monitor_valid_nll" in h}
    best = min(checked, key=checked.get)
    assert result.stopped_early and result.epochs == len(result.history) == best + PATIENCE < CAP
    assert result.best_epoch == best and 1 < best  # the NLL fell at first, so a middle epoch
    assert all(checked[e] > checked[best] for e in range(best + 1, result.epochs + 1))
    # the same fit without early stopping, for as many epochs as the best: the same weights
    at_best, _ = fit(None, best)
    assert same_weights(model, at_best)
    # ... and for as many as were trained: the same history, the last epoch's weights differ
    at_last, whole = fit(None, result.epochs)
    assert no_times(whole.history) == no_times(result.history)
    assert not same_weights(model, at_last)


def test_without_patience_nothing_changes(tmp_path):
    """patience null: no early stopping, nothing extra in the checkpoint; and patience that never
    runs out trains bitwise as no patience (the best epoch is then the last: the NLL falls)."""
    model, result = fit(None, 4, checkpoint=Checkpoint(tmp_path / "a.ckpt"))
    assert (result.best_epoch, result.stopped_early, result.epochs) == (None, False, 4)
    assert "best_model" not in load_checkpoint(tmp_path / "a.ckpt")
    patient, kept = fit(100, 4, checkpoint=Checkpoint(tmp_path / "b.ckpt"))
    assert (kept.best_epoch, kept.stopped_early, kept.epochs) == (4, False, 4)
    assert no_times(kept.history) == no_times(result.history) and same_weights(patient, model)
    ckpt = load_checkpoint(tmp_path / "b.ckpt")
    assert all(torch.equal(v, ckpt["best_model"][k]) for k, v in model.state_dict().items())


def test_patience_without_the_monitor_is_refused_before_any_step():
    params = train_params(patience=2, log_z_every=1)
    torch.manual_seed(0)
    model = VAEPP(model_spec((1, 8, 8), hidden=(16, 16), zdim=2, prior="standard"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"train.patience = 2: early stopping needs the log-Z monitor"):
        train(model, TRAIN, params)  # no monitor
    monitor = lambda m: log_z_monitor(m, VALID, params.monitor, device="cpu")  # noqa: E731
    with pytest.raises(ValueError, match=r"train.patience = 2"):
        train(model, TRAIN, params.model_copy(update={"log_z_every": 0}), monitor=monitor)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _Crash(Exception):
    pass


def crash_after(epoch: int):
    def callback(e, metrics):
        if e == epoch:
            raise _Crash

    return callback


@pytest.mark.parametrize("crash", ["after_best", "at_stop"])
def test_a_killed_and_resumed_fit_stops_at_the_same_epoch_with_the_same_weights(stopped, tmp_path, crash):
    """Killed after the best epoch but before the stop (the resumed process never sees the best
    epoch: its weights come from the checkpoint), or after the stopping epoch's checkpoint was
    written (the resumed fit trains no further epoch); resumed from other initial weights."""
    model, result = stopped
    epoch = result.best_epoch + 1 if crash == "after_best" else result.epochs
    path = tmp_path / "t.ckpt"
    with pytest.raises(_Crash):
        fit(PATIENCE, CAP, checkpoint=Checkpoint(path), callback=crash_after(epoch))
    assert load_checkpoint(path)["epoch"] == epoch
    resumed, rest = fit(PATIENCE, CAP, seed=11, checkpoint=Checkpoint(path))
    assert rest.resumed_from_epoch == epoch
    assert (rest.best_epoch, rest.stopped_early, rest.epochs) == (result.best_epoch, True, result.epochs)
    assert no_times(rest.history) == no_times(result.history)
    assert same_weights(resumed, model)


def test_an_early_stop_writes_its_checkpoint_between_the_regular_ones(tmp_path):
    """Checks every 2nd epoch, a checkpoint every 3rd: the fit stops at a check that is not a
    checkpoint epoch and writes one there, and a rerun from it trains nothing."""
    kw = dict(log_z_every=2, checkpoint_every=3, prior="pullback")
    model, result = fit(PATIENCE, CAP, **kw)
    assert result.stopped_early and result.epochs % 3 != 0 and result.epochs % 2 == 0
    assert [h["epoch"] for h in result.history if MONITORED in h] == list(range(2, result.epochs + 1, 2))
    path = tmp_path / "t.ckpt"
    with pytest.raises(_Crash):
        fit(PATIENCE, CAP, checkpoint=Checkpoint(path), callback=crash_after(result.epochs), **kw)
    assert load_checkpoint(path)["epoch"] == result.epochs
    resumed, rest = fit(PATIENCE, CAP, seed=11, checkpoint=Checkpoint(path), **kw)
    assert (rest.resumed_from_epoch, rest.epochs, rest.best_epoch) == (result.epochs, result.epochs, result.best_epoch)
    assert same_weights(resumed, model)


# ----- the train stage --------------------------------------------------------------------------
OVERRIDES = {
    "data": {"n_train": None, "n_valid": 16, "n_test": 8, "subset_seed": 0},
    "model": {"hidden": [16, 16], "zdim": 2},
    "train": {"epochs": CAP, "batch_size": 16, "lr": 1.0e-2, "log_z_every": 1, "monitor": {"valid_images": 16}},
}
EARLY_KEYS = {"best_epoch", "stopped_early", "epochs_trained"}


@pytest.mark.parametrize("patience", [None, PATIENCE])
def test_the_train_stage_records_the_early_stop_only_with_patience(tmp_path, monkeypatch, patience):
    from stages import train as train_stage
    from vaepp.data import save_prepared

    meta = {"dataset": "mnist", "binary": True, "label": "MNIST (pattern stand-in)", "stand_in": True}
    save_prepared(tmp_path / "data" / "mnist", torch.cat([TRAIN, VALID]), images(8, 0.1, 2), meta | {"source": "test"})
    overrides = {**OVERRIDES, "train": {**OVERRIDES["train"], "patience": patience}}
    (tmp_path / "params.yaml").write_text(tiny_params_yaml(overrides))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VAEPP_MLFLOW", "0")
    monkeypatch.setenv("VAEPP_CACHE", str(tmp_path / "cache"))
    assert train_stage.main(stage_argv("train", "vae", "--no-progress")) == 0
    metrics = json.loads((tmp_path / "metrics" / "vae" / "train.json").read_text())
    saved = load_checkpoint(tmp_path / "models" / "vae" / "vae.pt")
    if patience is None:
        assert not EARLY_KEYS & metrics.keys() and metrics["epochs"] == len(saved["history"]) == CAP
        return
    checked = {h["epoch"]: h["monitor_valid_nll"] for h in saved["history"] if "monitor_valid_nll" in h}
    best = min(checked, key=checked.get)
    assert metrics["best_epoch"] == best and metrics["stopped_early"] is True
    assert metrics["epochs_trained"] == metrics["epochs"] == len(saved["history"]) == best + PATIENCE < CAP
