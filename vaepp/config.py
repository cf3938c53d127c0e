"""params.yaml, validated once at the edge into frozen typed objects.

A study is a set of named runs. Each run names its prior (`prior`) and may override any key of the
shared sections `data`, `model`, `train`, `latent_gan`, `nll`, `mala`, `fid` (a run's
`model: {zdim: 32}` changes only that run); everything else is shared, so
`dvc exp run -S model.zdim=256` changes every run that does not pin its own zdim. Unknown keys,
wrong types and out-of-range values raise ParamsError with one line naming the key, the value and
what is allowed.

Every setting that changes a result is required: the library has no silent default for it, so
params.yaml (or a profile) states the whole study. Only `checkpoint_every` (how often a fit saves
its state), `profile` (a label), `device` and `distributed` (neither changes a number beyond
float rounding) may be left out, and `train.patience`, whose absence (null) is a fit without
early stopping, as every params file written before it had.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .datasets import DatasetName
from .options import (
    Arch,
    Auto,
    Backend,
    Device,
    FIDReference,
    GeneratorOutput,
    Init,
    LatentInputs,
    LikelihoodKind,
    LogisticScale,
    PenaltyKind,
    PosteriorKind,
    PriorKind,
    ProposalKind,
    Split,
    TrainAlgorithm,
)

Dataset = DatasetName  # the registry's names (vaepp.datasets)
PositiveInt = Field(gt=0)
# "auto" follows the likelihood (vaepp.resolve): the authors' Bernoulli scripts raise ‖∇D‖ to 3 and
# weight the naive critic's penalty by w; their discretised-logistic scripts use 6 and 1.
PenaltyExponent = Annotated[float, Field(gt=0.0)] | Auto
PenaltyWeight = Annotated[float, Field(ge=0.0)] | Auto


class ParamsError(Exception):
    """A params file that cannot be used; the message is one line per problem."""


def _positive_sizes(cls, v):
    if not v or any(int(x) <= 0 for x in v):
        raise ValueError("must be a non-empty list of positive layer sizes")
    return v


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf`/`.nan` in YAML would pass one-sided bounds (beta_max > 0).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, v, info):
        """YAML's true/yes/on would otherwise pass as 1 (`zdim: yes` → zdim = 1)."""
        if cls.model_fields[info.field_name].annotation is bool:
            return v
        if isinstance(v, bool) or (isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v)):
            raise ValueError("a boolean is not allowed here")
        return v


class DataParams(_Section):
    """The splits every stage uses (`vaepp.data.split_prepared`). Of the prepared training images
    the last `n_valid` are the validation split (train[50 000:] on MNIST with 10 000: the
    VampPrior / IWAE convention) and the rest the training split; the test split is scored once
    per run, never looked at to choose anything."""

    dataset: Dataset
    n_train: int | None = Field(gt=0)  # the first n of the training split (validation removed); None = all
    n_valid: int = Field(ge=1)  # the last n prepared training images are the validation split
    # None = every test image in order; n = a seeded random sample of all test images (the first
    # n of one fixed permutation, so a smaller n is a prefix of a larger one), never the first n
    n_test: int | None = Field(gt=0)
    subset_seed: int = Field(ge=0)  # the seed of the test sample and of the monitor's validation images


class ModelParams(_Section):
    arch: Arch
    zdim: int = Field(gt=0, le=65536)
    hidden: tuple[int, ...]
    channels: tuple[int, ...]
    likelihood: Auto | LikelihoodKind  # auto: from the dataset (vaepp.resolve)
    logistic_scale: LogisticScale
    posterior: Auto | PosteriorKind  # auto: truncated on binary data
    log_sigma_min: float = Field(le=0.0)
    beta_max: float = Field(gt=0.0)
    n_flows: int = Field(ge=0, le=200)  # planar flows on the posterior (paper: VAEPP+flow); 0 = none
    init: Init
    # The bounded pull-back prior (prior: certified): N(z; 0, I)·sigmoid(c − β·D(G(z)) + h(z))/Z.
    acceptance_c_init: float  # c at the start (learnable)
    acceptance_mlp: tuple[int, ...]  # hidden sizes of h(z), an MLP on z in the logit; [] = no h
    truncation: int | None = Field(ge=1)  # LARS's truncated sampler: at most T proposals; null = T = ∞
    # The LARS prior (prior: lars): N(z; 0, I)·sigmoid(MLP(z))/Z, the MLP's tanh hidden sizes (LARS: [100, 100]).
    lars_mlp: tuple[int, ...]
    # The VampPrior (prior: vampprior): p(z) = (1/K)·Σ_k q(z | u_k) over K learnable pseudo-inputs u_k.
    vampprior_components: int = Field(gt=0)  # K (Tomczak & Welling 2018: 500)

    _sizes = field_validator("hidden", "channels", "lars_mlp")(_positive_sizes)

    @field_validator("acceptance_mlp")
    @classmethod
    def _mlp_sizes(cls, v):
        if any(int(x) <= 0 for x in v):
            raise ValueError("must be a list of positive layer sizes ([] for none)")
        return v


class MonitorParams(_Section):
    """The training-time log-Z monitor (`log_z_monitor.log_z_monitor`): an independent estimate of the
    current prior's log Z (AIS plus N(0, I)-IS) and the validation NLL under it, every
    `train.log_z_every` epochs."""

    ais_chains: int = Field(gt=0)
    ais_temps: int = Field(gt=1)
    ais_seeds: int = Field(gt=0)
    prior_is_samples: int = Field(gt=0)
    # validation images scored: the first n of a permutation of the validation split seeded by
    # data.subset_seed (a random sample, the same at every check); at most data.n_valid
    valid_images: int = Field(gt=0)
    n_importance: int = Field(gt=0)  # importance samples per validation image
    seed: int = Field(ge=0)


class TrainParams(_Section):
    algorithm: TrainAlgorithm  # a prior with a critic: naive (Algorithm 1) or vaepp (Algorithm 2)
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0.0, le=1.0)
    lr_halve_every: int = Field(gt=0)
    weight_decay: float = Field(ge=0.0)
    n_prior_samples: int = Field(gt=0)
    penalty: PenaltyKind
    penalty_k: float = Field(ge=0.0)
    penalty_p: PenaltyExponent  # auto: 3 on Bernoulli data, 6 on discretised-logistic data
    critic_lr: float = Field(gt=0.0, le=1.0)
    critic_penalty_weight: PenaltyWeight  # Algorithm 1's c; auto: w (beta_max) on Bernoulli data, else 1
    clamp_kl: bool
    max_steps_per_epoch: int | None = Field(gt=0)
    log_z_every: int | None = Field(ge=0)  # epochs between log-Z monitor checks; 0 or None: off
    # early stopping (`vaepp.early_stopping`): stop after this many consecutive monitor checks
    # without a new best validation NLL and keep the best check's weights; None: train every epoch
    patience: int | None = Field(default=None, ge=1)
    lars_decay: float = Field(ge=0.0, lt=1.0)  # prior certified: the EMA of LARS's Ẑ (0.99)
    # prior certified: whether the acceptance term trains the decoder G through D(G(z)); false
    # holds G's weights fixed there, so only the reconstruction trains G.
    acceptance_trains_decoder: bool
    monitor: MonitorParams
    checkpoint_every: int = Field(default=1, gt=0)
    seed: int = Field(ge=0)


class LatentGANParams(_Section):
    inputs: Auto | LatentInputs  # auto: posterior means on Bernoulli data, else z ~ q
    noise_dim: Annotated[int, Field(gt=0)] | Auto  # auto: dim z
    hidden: tuple[int, ...]  # the generator's hidden layers
    critic_hidden: tuple[int, ...]
    weight_norm: bool  # weight normalisation on the hidden layers (authors)
    generator_output: GeneratorOutput  # authors: LeakyReLU on the output too
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0.0, le=1.0)
    lr_halve_every: int = Field(gt=0)  # the VAE's schedule, restarted at `lr`
    n_critic: int = Field(gt=0)
    penalty: PenaltyKind
    penalty_k: float = Field(ge=0.0)
    penalty_p: PenaltyExponent
    max_steps_per_epoch: int | None = Field(gt=0)
    checkpoint_every: int = Field(default=1, gt=0)
    seed: int = Field(ge=0)

    _sizes = field_validator("hidden", "critic_hidden")(_positive_sizes)


class LogZParams(_Section):
    prior_is_samples: int = Field(gt=0)  # N(0,I)-proposal IS
    ais_chains: int = Field(gt=0)
    ais_temps: int = Field(gt=1)
    ais_seeds: int = Field(gt=0)
    q_based_per_image: int = Field(gt=0)  # paper protocol: 1000 on MNIST
    q_based_images: int | None = Field(gt=0)  # None = the whole training set
    # resampled priors (`certified`, `lars`): the certificate on Z = E_N[a] at confidence 1 − delta, with M samples
    # chosen (from an independent pilot) so that log Z's upper end is within the half-width of log Ẑ
    certificate_delta: float = Field(gt=0.0, lt=1.0)
    certificate_half_width: float = Field(gt=0.0)
    certificate_pilot: int = Field(gt=1)
    certificate_max_samples: int = Field(gt=1)


class ProposalParams(_Section):
    """The NLL's importance proposal r(z|x) (`vaepp.importance`). defensive: the full-support
    mixture (1 − weight)·N(μ, σ²) + weight·N(μ, (width·σ)²) around the encoder's μ, σ, untruncated;
    posterior: the paper's protocol, q(z|e) itself (with a truncated q, not unbiased for p(x))."""

    kind: ProposalKind
    weight: float = Field(gt=0.0, le=1.0)
    width: float = Field(ge=1.0)
    # also score every run under the paper's proposal q(z|e), beside the headline (nll.json paper_protocol)
    paper_protocol: bool


class NLLParams(_Section):
    n_importance: int = Field(gt=0)  # S per image per pass
    n_passes: int = Field(gt=0)  # P, fresh binarisation each pass on binary data
    chunk: int = Field(gt=0)  # rows of z per decoder call
    batch_images: int = Field(gt=0)
    seed: int = Field(ge=0)
    # the images scored: test (the run's test split, scored once at the end) or valid (a seeded random
    # sample of data.n_test validation images, for choices made by looking at numbers: studies/attempts)
    split: Split
    proposal: ProposalParams
    log_z: LogZParams


class MALAParams(_Section):
    n_samples: int = Field(gt=0)
    n_steps: int = Field(ge=0)
    step_size: float = Field(gt=0.0)
    seed: int = Field(ge=0)


class FIDParams(_Section):
    n_samples: int = Field(gt=0)
    reference: FIDReference  # paper: generated vs the training set
    n_reference: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    # also score the latent-GAN samples z₀ decoded without MALA (fid_gan, kid_gan_*: GAN-VAEPP)
    latent_gan_samples: bool


class DistributedParams(_Section):
    """Processes per stage (docs/distributed.md). Results do not depend on them, so no stage
    lists this section as a DVC param: changing it never reruns anything."""

    nproc_per_node: int = Field(default=1, gt=0, le=1024)  # > 1: the stage starts itself under torchrun
    backend: Backend = "auto"  # auto: nccl on CUDA devices, gloo on the CPU


class RunParams(_Section):
    """One named run: its prior plus optional per-run overrides of shared sections."""

    prior: PriorKind
    data: dict[str, Any] = {}
    model: dict[str, Any] = {}
    train: dict[str, Any] = {}
    latent_gan: dict[str, Any] = {}
    nll: dict[str, Any] = {}
    mala: dict[str, Any] = {}
    fid: dict[str, Any] = {}


class Params(_Section):
    profile: str = "default"
    device: Device = "cpu"
    distributed: DistributedParams = DistributedParams()
    datasets: tuple[Dataset, ...]  # prepared by the prepare-data stage
    data: DataParams
    model: ModelParams
    train: TrainParams
    latent_gan: LatentGANParams
    nll: NLLParams
    mala: MALAParams
    fid: FIDParams
    runs: dict[str, RunParams]

    @field_validator("runs")
    @classmethod
    def _run_names(cls, v):
        if not v:
            raise ValueError("at least one run is needed")
        for name in v:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"run name {name!r} may hold only letters, digits, '_' and '-'")
        return v

    @model_validator(mode="after")
    def _runs_resolve(self):
        for name in self.runs:
            run = resolve_run(self, name)  # every override must name a real key with a valid value
            if run.data.dataset not in self.datasets:
                raise ParamsError(
                    f"runs.{name}: dataset {run.data.dataset!r} is not prepared; add it to "
                    f"`datasets` (now {list(self.datasets)})"
                )
        return self


class RunConfig(_Section):
    """A run with its overrides applied: what the stages use."""

    name: str
    prior: PriorKind
    device: Device
    distributed: DistributedParams = DistributedParams()
    data: DataParams
    model: ModelParams
    train: TrainParams
    latent_gan: LatentGANParams
    nll: NLLParams
    mala: MALAParams
    fid: FIDParams


# A run written before `prior` replaced `algorithm` (studies' manifests record their runs as run):
# each old algorithm as a prior plus the overrides it implied.
_OLD_ALGORITHMS = {
    "vae": ("standard", {}),
    "naive_vaepp": ("pullback", {"train": {"algorithm": "naive"}}),
    "vaepp": ("pullback", {}),
    "vaepp_flow": ("pullback", {"model": {"n_flows": 20}}),
    "certified": ("certified", {}),
}


def upgrade_run_spec(spec: dict) -> dict:
    """A run definition in today's form: one recorded with the old `algorithm` key (vae,
    naive_vaepp, vaepp, vaepp_flow, certified) becomes its `prior` plus the train or model
    override that algorithm implied (Algorithm 1; the 20 planar flows every profile used);
    anything else is returned as it is."""
    if "algorithm" not in spec or "prior" in spec:
        return spec
    spec = dict(spec)
    old = spec.pop("algorithm")
    if old not in _OLD_ALGORITHMS:
        raise ParamsError(f"algorithm = {old!r}: not a recorded algorithm ({', '.join(_OLD_ALGORITHMS)})")
    prior, implied = _OLD_ALGORITHMS[old]
    for key, value in implied.items():
        spec[key] = deep_merge(spec.get(key, {}), value)
    return {"prior": prior, **spec}


def resolve_run(params: Params, name: str) -> RunConfig:
    """Apply run `name`'s overrides to the shared sections and validate the result."""
    if name not in params.runs:
        raise ParamsError(f"runs.{name}: no such run; defined runs: {', '.join(params.runs)}")
    run = params.runs[name]
    sections = {}
    for key, cls in _SECTIONS.items():
        base = getattr(params, key).model_dump()
        try:
            sections[key] = cls(**deep_merge(base, getattr(run, key)))
        except ValidationError as err:
            raise ParamsError(_format(err, prefix=f"runs.{name}.{key}")) from None
    data, monitor = sections["data"], sections["train"].monitor
    if sections["train"].log_z_every and monitor.valid_images > data.n_valid:
        raise ParamsError(
            f"runs.{name}.train.monitor.valid_images = {monitor.valid_images}: more than the "
            f"{data.n_valid} validation images (data.n_valid); lower it or raise data.n_valid"
        )
    train = sections["train"]
    if train.patience is not None and not train.log_z_every:
        raise ParamsError(
            f"runs.{name}.train.patience = {train.patience}: early stopping counts the log-Z monitor's "
            f"checks of the validation NLL, and train.log_z_every = {train.log_z_every!r} turns the "
            "monitor off; set train.log_z_every >= 1 or train.patience: null"
        )
    if run.prior == "certified" and sections["train"].algorithm != "vaepp":
        raise ParamsError(
            f"runs.{name}.train.algorithm = {sections['train'].algorithm!r}: a certified prior trains with "
            "Algorithm 2 only (its critic's penalty is in the one loss); set train.algorithm: vaepp"
        )
    if run.prior in ("certified", "lars") and sections["model"].truncation is not None:
        raise ParamsError(
            f"runs.{name}.model.truncation = {sections['model'].truncation}: a {run.prior} prior with LARS's "
            "truncated sampler has no NLL protocol here (its density is not f(z)/Z, so no log Z constant gives "
            "its log p(x)); set model.truncation: null"
        )
    if run.prior == "vampprior" and sections["model"].n_flows > 0:
        raise ParamsError(
            f"runs.{name}.model.n_flows = {sections['model'].n_flows}: a VampPrior is a mixture of the encoder's "
            "posteriors, whose density at given points planar flows do not give; set model.n_flows: 0"
        )
    return RunConfig(name=name, prior=run.prior, device=params.device, distributed=params.distributed, **sections)


_SECTIONS = {
    "data": DataParams,
    "model": ModelParams,
    "train": TrainParams,
    "latent_gan": LatentGANParams,
    "nll": NLLParams,
    "mala": MALAParams,
    "fid": FIDParams,
}


def deep_merge(base: dict, override: dict) -> dict:
    """base with override's keys replaced; nested mappings merge key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _format(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{…}"
        shown = shown if len(shown) <= 80 else shown[:77] + "…"  # the message stays one short line
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{key} = {shown}: {msg}" if e["type"] != "missing" else f"{key}: {msg}")
    return "; ".join(lines)


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate a mapping (as read from YAML) into Params; ParamsError on any problem."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params(**raw)
    except ValidationError as err:
        raise ParamsError(f"{source}: {_format(err)}") from None
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None


def load_params(path: str | Path) -> Params:
    """Read and validate a params YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ParamsError(f"{path}: cannot read params file ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8 YAML") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{path}: not valid YAML{where}") from None
    return parse_params(raw, source=str(path))


def load_run(path: str | Path, name: str) -> RunConfig:
    """Read and validate a params file and resolve run `name`; errors name the file."""
    params = load_params(path)
    try:
        return resolve_run(params, name)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
