"""params.yaml validation: every bad value fails fast with one line naming key, value, rule."""

import copy
from pathlib import Path

import pytest
import yaml

from vaepp.config import ParamsError, load_params, load_run, parse_params, resolve_run
from vaepp.resolve import method, model_spec

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: str, value, base: dict = DEFAULT):
    raw = copy.deepcopy(base)
    node = raw
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return raw


def test_committed_profiles_validate():
    for f in [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]:
        params = load_params(f)
        for name in params.runs:
            resolve_run(params, name)


BAD = [
    ("model.zdim", 0, "model.zdim"),
    ("model.zdim", -3, "greater than 0"),
    ("model.zdim", "big", "model.zdim"),
    ("model.zdm", 3, "unknown key"),
    ("model.hidden", [], "hidden"),
    ("model.hidden", [300, -1], "positive"),
    ("model.arch", "transformer", "'mlp', 'resnet' or 'resnet_map'"),
    ("model.beta_max", 0.0, "beta_max"),
    ("model.log_sigma_min", 1.0, "log_sigma_min"),
    ("train.lr", -1.0e-4, "train.lr"),
    ("train.lr", 0, "train.lr"),
    ("train.epochs", 0, "train.epochs"),
    ("train.epochs", 2.5, "train.epochs"),
    ("train.batch_size", -128, "train.batch_size"),
    ("train.penalty", "wgan", "wgan_gp"),
    ("train.penalty_k", -2.0, "penalty_k"),
    ("train.clamp_kl", "sometimes", "clamp_kl"),
    ("train.seed", -1, "seed"),
    ("train.optimiser", "sgd", "unknown key"),
    ("data.dataset", "imagenet", "data.dataset"),
    ("data.n_test", 0, "n_test"),
    ("data.n_valid", 0, "data.n_valid = 0"),
    ("data.n_valid", None, "data.n_valid"),
    ("data.n_valid", -10, "greater than or equal to 1"),
    ("data.n_train", 0, "data.n_train = 0"),
    ("data.subset_seed", -1, "data.subset_seed = -1"),
    ("data.subset_seed", 0.5, "data.subset_seed"),
    ("data.subset_seed", True, "boolean"),
    ("train.monitor.valid_images", 0, "valid_images"),
    ("train.monitor.test_images", 300, "unknown key"),
    ("train.monitor.valid_images", 10001, "more than the 10000 validation images (data.n_valid)"),
    ("runs.vae.data", {"n_valid": 100}, "runs.vae.train.monitor.valid_images = 300"),
    ("nll.n_importance", 0, "n_importance"),
    ("nll.split", "train", "nll.split"),
    ("nll.proposal.kind", "wide", "nll.proposal.kind"),
    ("nll.proposal.weight", 0.0, "nll.proposal.weight"),
    ("nll.proposal.weight", 1.5, "nll.proposal.weight"),
    ("nll.proposal.width", 0.5, "nll.proposal.width"),
    ("nll.proposal.paper_protocol", "maybe", "paper_protocol"),
    ("runs.certified.model", {"truncation": 8}, "runs.certified.model.truncation = 8"),
    ("nll.log_z.ais_temps", 1, "ais_temps"),
    ("nll.log_z.prior_is_sample", 10, "unknown key"),
    ("mala.step_size", -1.0, "step_size"),
    ("mala.n_steps", -5, "n_steps"),
    ("fid.reference", "valid", "reference"),
    ("fid.n_samples", 0, "n_samples"),
    ("latent_gan.n_critic", 0, "n_critic"),
    ("device", "tpu", "device"),
    ("runs", {}, "at least one run"),
    ("runs", {"a b": {"prior": "standard"}}, "run name"),
    ("runs.vae.prior", "gan", "runs.vae.prior"),
    ("runs.vae.algorithm", "vae", "runs.vae.algorithm = 'vae': unknown key"),  # the former vocabulary
    ("runs.vae.train", {"algorithm": "vaepp_flow"}, "runs.vae.train.algorithm = 'vaepp_flow'"),
    ("train.algorithm", "certified", "train.algorithm = 'certified'"),
    ("runs.vae.model", {"zdim": -1}, "runs.vae.model.zdim"),
    ("runs.vae.model", {"depth": 3}, "runs.vae.model.depth"),
    ("runs.vae.train", {"lr": "fast"}, "runs.vae.train.lr"),
    ("runs.vae.data", {"dataset": "fashion_mnist"}, "not prepared"),
    ("runs.vae.optimizer", {}, "unknown key"),
    ("datasets", ["mnist", "svhn"], "datasets"),
    ("profile", ["a"], "profile"),
    ("nll", "lots", "nll"),
    ("train", None, "train"),
    ("model.n_flows", -1, "n_flows"),
    ("model.n_flows", 201, "n_flows"),
    ("model.zdim", 10**9, "zdim"),
    ("train.weight_decay", -1.0, "weight_decay"),
    ("nll.chunk", 0, "chunk"),
    ("mala.seed", "x", "seed"),
    ("latent_gan.hidden", [0], "hidden"),
    ("fid.batch_size", 0, "batch_size"),
    ("train.max_steps_per_epoch", 0, "max_steps_per_epoch"),
    ("train.patience", 0, "train.patience = 0: Input should be greater than or equal to 1"),
    ("train.patience", -3, "train.patience = -3"),
    ("train.patience", 2.5, "train.patience = 2.5"),
    ("train.patience", "three", "train.patience = 'three'"),
    ("train.patience", True, "train.patience = True: a boolean is not allowed"),
    ("train.patiense", 3, "train.patiense = 3: unknown key"),
    ("runs.vae.train", {"patience": 0}, "runs.vae.train.patience = 0"),
]


@pytest.mark.parametrize("path,value,needle", BAD)
def test_bad_values_fail_with_one_line_naming_the_key(path, value, needle):
    with pytest.raises(ParamsError) as err:
        parse_params(with_change(path, value), source="params.yaml")
    msg = str(err.value)
    assert "\n" not in msg and needle in msg and msg.startswith("params.yaml")


@pytest.mark.parametrize("key", ["dataset", "n_train", "n_valid", "n_test", "subset_seed"])
def test_every_data_key_is_required(key):
    raw = copy.deepcopy(DEFAULT)
    del raw["data"][key]
    with pytest.raises(ParamsError, match=rf"data\.{key}: required key is missing"):
        parse_params(raw, source="params.yaml")


def test_the_monitor_may_ask_for_more_validation_images_only_when_it_is_off():
    raw = with_change("train.monitor.valid_images", 20000)
    raw["train"]["log_z_every"] = 0
    assert resolve_run(parse_params(raw), "vae").train.monitor.valid_images == 20000


def test_patience_defaults_to_no_early_stopping():
    """params.yaml lists train.patience as null; a file without the key means the same."""
    assert DEFAULT["train"]["patience"] is None
    raw = copy.deepcopy(DEFAULT)
    del raw["train"]["patience"]
    for params in (parse_params(DEFAULT), parse_params(raw)):
        assert all(resolve_run(params, name).train.patience is None for name in params.runs)
    assert resolve_run(parse_params(with_change("runs.vaepp.train", {"patience": 5})), "vaepp").train.patience == 5


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"train.patience": 3, "train.log_z_every": 0}, "runs.vae.train.patience = 3"),
        ({"train.patience": 3, "train.log_z_every": None}, "train.log_z_every = None turns the monitor off"),
        ({"train.log_z_every": 0, "runs.vaepp.train": {"patience": 2}}, "runs.vaepp.train.patience = 2"),
        ({"train.patience": 2, "runs.lars.train": {"log_z_every": 0}}, "runs.lars.train.patience = 2"),
    ],
)
def test_patience_without_the_monitor_is_refused(changes, needle):
    """Early stopping counts the monitor's checks: patience with the monitor off is an error."""
    raw = DEFAULT
    for path, value in changes.items():
        raw = with_change(path, value, raw)
    with pytest.raises(ParamsError) as err:
        parse_params(raw, source="params.yaml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("params.yaml") and needle in msg and "log_z_every" in msg


@pytest.mark.parametrize("text", ["", "[1, 2]", "runs: [", "a: b: c", "\x00\x01", "runs: 3"])
def test_malformed_files_fail_cleanly(tmp_path, text):
    f = tmp_path / "params.yaml"
    f.write_text(text)
    with pytest.raises(ParamsError):
        load_params(f)


def test_missing_file_and_missing_run(tmp_path):
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="no such run"):
        load_run(ROOT / "params.yaml", "vaepp_typo")


def test_run_overrides_apply_to_that_run_only():
    raw = with_change("runs.vaepp.model", {"zdim": 32})
    params = parse_params(raw)
    assert resolve_run(params, "vaepp").model.zdim == 32
    assert resolve_run(params, "vae").model.zdim == DEFAULT["model"]["zdim"]


def test_specs_from_runs():
    params = parse_params(with_change("runs.flow", {"prior": "pullback", "model": {"n_flows": 20}}))
    flow_run = resolve_run(params, "flow")
    flow = model_spec(flow_run, (1, 28, 28), binary=True)
    assert flow.n_flows == 20 and flow.prior == "pullback" and flow.posterior == "truncated"
    assert flow_run.train.algorithm == "vaepp" and method(flow_run) == "vaepp_flow"
    vae = model_spec(resolve_run(params, "vae"), (3, 32, 32), binary=False)
    assert vae.prior == "standard" and vae.likelihood == "logistic" and vae.posterior == "normal"
    assert vae.n_flows == DEFAULT["model"]["n_flows"] == 0


def test_a_vampprior_gets_normal_posteriors_unless_told():
    """Posterior "auto" on binary data: truncated, except for a VampPrior (its authors' Normal
    posteriors; a mixture of truncated ones has holes); an explicit choice is kept."""
    params = parse_params(with_change("runs.vamp", {"prior": "vampprior"}))
    assert model_spec(resolve_run(params, "vamp"), (1, 28, 28), binary=True).posterior == "normal"
    assert model_spec(resolve_run(params, "vae"), (1, 28, 28), binary=True).posterior == "truncated"
    told = parse_params(with_change("runs.vamp", {"prior": "vampprior", "model": {"posterior": "truncated"}}))
    assert model_spec(resolve_run(told, "vamp"), (1, 28, 28), binary=True).posterior == "truncated"


@pytest.mark.parametrize(
    ("run", "want"),
    [
        ({"prior": "standard"}, ("standard", "vae")),
        ({"prior": "standard", "train": {"algorithm": "naive"}}, ("standard", "vae")),
        ({"prior": "pullback", "train": {"algorithm": "naive"}}, ("pullback", "naive_vaepp")),
        ({"prior": "pullback"}, ("pullback", "vaepp")),
        ({"prior": "pullback", "model": {"n_flows": 3}}, ("pullback", "vaepp_flow")),
        ({"prior": "certified"}, ("certified", "certified")),
        ({"prior": "lars"}, ("lars", "lars")),
        ({"prior": "vampprior"}, ("vampprior", "vampprior")),
    ],
)
def test_each_method_is_a_prior_with_its_overrides(run, want):
    """The paper's methods (and the certified prior) as a prior plus per-run overrides."""
    resolved = resolve_run(parse_params(with_change("runs.r", run)), "r")
    assert (resolved.prior, method(resolved)) == want
    assert model_spec(resolved, (1, 28, 28), binary=True).prior == resolved.prior


def test_a_certified_prior_refuses_algorithm_1():
    with pytest.raises(ParamsError) as err:
        parse_params(with_change("runs.certified.train", {"algorithm": "naive"}), source="params.yaml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("params.yaml")
    assert "runs.certified.train.algorithm = 'naive'" in msg and "vaepp" in msg


def test_a_misspelt_prior_lists_the_allowed_values():
    with pytest.raises(ParamsError) as err:
        parse_params(with_change("runs.vaepp.prior", "pullbak"), source="params.yaml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("params.yaml")
    from vaepp.options import PriorKind, choices

    assert "runs.vaepp.prior = 'pullbak'" in msg and all(repr(p) in msg for p in choices(PriorKind))
