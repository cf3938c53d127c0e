"""Every option list of the study, written once: `config` validates params.yaml against these and
the library's modules type their arguments with them.

Each is a `Literal`; `choices(Option)` gives its values as a tuple.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

# The prior p(z): one module per prior in vaepp/priors/, named as params.yaml names it (standard:
# N(0, I); pullback: the paper's N(z; 0, I)·exp(−β·D(G(z)))/Z; certified: this project's bounded
# N(z; 0, I)·sigmoid(c − β·D(G(z)))/Z with a certified Z; lars: Bauer & Mnih's N(z; 0, I)·sigmoid(MLP(z))/Z).
# Read from the file names, so that a new prior is one new module (registered in
# `vaepp.priors.PRIORS`) and config needs no edit.
PriorKind = Literal[
    tuple(sorted(p.stem for p in (Path(__file__).parent / "priors").glob("*.py") if not p.stem.startswith("_")))
]
# How a prior with a critic trains (paper §3.3): "naive" is Algorithm 1 (the critic takes its own
# WGAN step), "vaepp" is Algorithm 2 (one step on the loss with the critic's penalty in it).
TrainAlgorithm = Literal["naive", "vaepp"]
Arch = Literal["mlp", "resnet", "resnet_map"]  # resnet_map: the latent as a feature map (vaepp.nets)
LikelihoodKind = Literal["bernoulli", "logistic"]
LogisticScale = Literal["per_pixel", "scalar"]
PosteriorKind = Literal["normal", "truncated"]
# zero_heads (authors): the encoder's μ and log σ heads and the decoder's output layer start at zero,
# so q starts as N(0, I) and G as a flat image; torch: PyTorch's default init.
Init = Literal["zero_heads", "torch"]
PenaltyKind = Literal["wgan_gp", "wgan_gp_classic", "wgan_div_1", "wgan_div_2"]
LatentInputs = Literal["mean", "sample"]  # what the latent GAN fits: μ(e), or one draw z ~ q(z|e)
GeneratorOutput = Literal["linear", "leaky_relu"]
Backend = Literal["auto", "gloo", "nccl"]  # auto: nccl on CUDA devices, gloo on the CPU
Device = Literal["cpu", "cuda", "auto"]
ProposalKind = Literal["defensive", "posterior"]
Split = Literal["test", "valid"]
FIDReference = Literal["train", "test"]
Auto = Literal["auto"]


def choices(option) -> tuple[str, ...]:
    """The values of an option `Literal`, in order."""
    return get_args(option)
