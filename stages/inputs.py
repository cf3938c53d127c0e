"""What a stage reads: its run from the params file, the prepared data cut into the run's splits,
the images it scores, and the records of them its metrics and MLflow runs carry.

Everything here reads files named by the stage's arguments (params.yaml, data/<dataset>/) and
hands the `vaepp` library explicit values, so that the library never reads them itself.
"""

from __future__ import annotations

import json
from pathlib import Path

SHARED_SECTIONS = ("data", "model", "train", "latent_gan", "nll", "mala", "fid")


def load_run(args):
    """The run `args.run` of the params file `args.params`, validated, overrides applied."""
    from vaepp.config import load_run as _load_run

    return _load_run(args.params, args.run)


def load_data(data_root: Path, run):
    """The run's prepared dataset under data_root/<dataset> cut into its splits
    (`vaepp.data.split_prepared` with data.n_train, n_valid, n_test, subset_seed): a `Splits`.
    Sizes that do not fit the dataset raise DataError here, before any model is fitted or read."""
    from vaepp.data import load_prepared, split_prepared

    prepared = load_prepared(Path(data_root) / run.data.dataset)
    d = run.data
    return split_prepared(prepared, n_train=d.n_train, n_valid=d.n_valid, n_test=d.n_test, subset_seed=d.subset_seed)


def subset_record(indices, n_all: int, seed: int | None) -> dict:
    """Which images a stage scored, for its metrics JSON: seed (None when every image of the split
    is used, in order), n (images scored), of (images in the split) and indices_sha256
    (`vaepp.data.indices_digest` of the indices into the split, in order)."""
    from vaepp.data import indices_digest

    return {"seed": seed, "n": int(indices.numel()), "of": int(n_all), "indices_sha256": indices_digest(indices)}


def record_of_test_images(splits, run) -> dict:
    """`subset_record` of the run's test images (data.n_test of all the test images, seeded)."""
    seed = run.data.subset_seed if run.data.n_test is not None else None
    return subset_record(splits.test_indices, splits.meta["n_test"], seed)


def scored_images(splits, run):
    """The images estimate-nll scores, by nll.split: (uint8 images, indices into their split, record).
    test: the run's test images. valid: a seeded random sample of data.n_test validation images
    (all when null; seed data.subset_seed, the permutation whose prefix the monitor scores), for
    choices made by looking at numbers."""
    from vaepp.data import subset_indices

    if run.nll.split == "test":
        return splits.test, splits.test_indices, record_of_test_images(splits, run)
    n_all = int(splits.valid.shape[0])
    n = None if run.data.n_test is None else min(run.data.n_test, n_all)
    indices = subset_indices(n_all, n, run.data.subset_seed)
    return splits.valid[indices], indices, subset_record(indices, n_all, run.data.subset_seed if n else None)


def shared_params(params_path: str | Path) -> dict[str, str]:
    """The params file's shared sections flattened with dots (`model.zdim`), its `profile` and
    `runs` (the run names, comma-separated): what the parent MLflow run carries. {} if unreadable."""
    import yaml

    from vaepp.files import flat

    try:
        raw = yaml.safe_load(Path(params_path).read_text()) or {}
    except Exception:  # noqa: BLE001 - an unreadable params file fails in load_run, not here
        return {}
    if not isinstance(raw, dict):
        return {}
    out = flat({k: raw[k] for k in SHARED_SECTIONS if isinstance(raw.get(k), dict)})
    if "profile" in raw:
        out["profile"] = raw["profile"]
    if isinstance(raw.get("runs"), dict):
        out["runs"] = ",".join(map(str, raw["runs"]))
    return {k: str(v) for k, v in out.items()}


def dataset_input(run, meta: dict, data_root: Path | None = None, context: str = "eval") -> dict[str, str] | None:
    """The MLflow dataset input of a stage: name (the dataset), source (JSON: the prepared data
    directory `<data_root>/<dataset>` when known, and meta.json's source description), digest (the
    first 16 hex digits of SHA-256 over the prepared files' SHA-256s, in file-name order), context.
    None without meta (no prepared data known)."""
    import hashlib

    if not meta:
        return None
    files = sorted((meta.get("sha256") or {}).items())
    digest = (
        hashlib.sha256("".join(f"{f}:{h}\n" for f, h in files).encode()).hexdigest()[:16] if files else "unrecorded"
    )
    source = {"uri": f"{Path(data_root).as_posix()}/{run.data.dataset}"} if data_root is not None else {}
    source["description"] = str(meta.get("source", "unknown"))
    return {"name": run.data.dataset, "source": json.dumps(source), "digest": digest, "context": context}
