"""The tables of training and of the studies beside the main runs: what the log-Z monitor saw in
training (`monitor_table`), each other prior against the plain VAE image by image
(`paired_table`), and the training-length study (`training_length_table`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from vaepp.files import flat, read_json

from .collect import per_image_table
from .rows import _proposal, _test_images

MONITOR_NOTE = (
    "Every train.log_z_every epochs, training pauses for an independent estimate of the current prior's log Z: "
    "AIS from N(0, I) on a small budget (its spread over seeds as error bars) and N(0, I)-IS, the larger heading "
    "(both are lower estimates in expectation), and the NLL of a seeded sample of the validation images "
    "(train[50 000:], never the test images) under it; curves written before the monitor moved to validation "
    "images scored the first test images instead. The table's columns say which: valid_nll (validation images) "
    "or test_nll (test images), each beside the plain VAE's on the same images (_vae). The training "
    "objective uses the per-batch training estimate log(½(Ẑ_N + Ẑ_q)); its gap to the monitored log Z is what "
    "training can exploit. log_z_train is the epoch's mean training estimate; gap = monitored − training; "
    "behind_from_epoch: the first monitored epoch from which the run's monitored NLL stays above the "
    "plain VAE's; cost: monitor time over training time."
)

# The monitor's NLL column in a training curve, newest first, and the images it scored.
MONITOR_NLL = (("monitor_valid_nll", "valid"), ("monitor_test_nll", "test"))


def _monitor_nll(curve: pd.DataFrame) -> tuple[str, str] | None:
    """(the column, "valid" or "test") of the monitor's NLL in a training curve: monitor_valid_nll
    (validation images) or, in curves written before the monitor scored validation images,
    monitor_test_nll (the first test images); None when the curve has neither."""
    return next(((c, what) for c, what in MONITOR_NLL if c in curve and curve[c].notna().any()), None)


def monitor_table(root: str | Path, runs: pd.DataFrame) -> pd.DataFrame:
    """What the log-Z monitor saw in training, one row per pull-back run: at its last monitored
    epoch the training estimate of log Z beside the monitored one (AIS seed sd), their gap, the
    objective's ELBO beside the ELBO under the monitored log Z, and the monitor's NLL beside
    the plain VAE's of the same dataset and epoch on the same kind of images: columns valid_nll,
    valid_nll_vae (validation images) or test_nll, test_nll_vae (older curves: the first test
    images); `behind_from_epoch` is the first monitored epoch from which the pull-back run's NLL
    stays above the plain VAE's ("" if never); cost: monitor seconds over training seconds."""
    root = Path(root)

    def curve(r) -> pd.DataFrame | None:
        f = r.get("file.train_curve")
        if not f or not (root / f).is_file():
            return None
        d = pd.read_csv(root / f)
        return d if "monitor_log_z" in d else None

    # the plain VAE of the same dataset and dim z (else of the same dataset) is the comparison
    plain = {(r["dataset"], r["zdim"]): curve(r) for _, r in runs[runs["algorithm"] == "vae"].iterrows()}
    plain.update({(ds, None): d for (ds, _), d in reversed(list(plain.items()))})
    recs = []
    for _, r in runs[runs["algorithm"] != "vae"].iterrows():
        d = curve(r)
        if d is None:
            continue
        m = d.dropna(subset=["monitor_log_z"])
        last = m.iloc[-1]
        rec = {
            "run": r["run"],
            "algorithm": r["algorithm"],
            "epoch": int(last["epoch"]),
            "log_z_train": last["log_z"],
            "log_z_monitor": last["monitor_log_z"],
            "ais_seed_sd": last.get("monitor_log_z_ais_seed_sd", math.nan),
            "gap": last["monitor_log_z"] - last["log_z"],
            "elbo_objective": last["elbo_under_train_log_z"],
            "elbo_monitor": last["elbo_under_monitor_log_z"],
        }
        if (src := _monitor_nll(m)) is not None:
            col, images = src
            rec |= {f"{images}_nll": last[col], f"{images}_nll_vae": math.nan}
        rec |= {"behind_from_epoch": "", "cost": m["monitor_seconds"].sum() / d["seconds"].sum()}
        v = plain.get((r["dataset"], r["zdim"]), plain.get((r["dataset"], None)))
        if src is not None and v is not None and col in v:  # the plain VAE on the same kind of images
            both = m.merge(v.dropna(subset=[col])[["epoch", col]], on="epoch", suffixes=("", "_vae"))
            if len(both):
                rec[f"{images}_nll_vae"] = both[f"{col}_vae"].iloc[-1]
                behind = (both[col] > both[f"{col}_vae"]).tolist()
                trailing = len(behind) - next((i for i, b in enumerate(reversed(behind)) if not b), len(behind))
                if trailing < len(behind):  # behind at every monitored epoch from this one on
                    rec["behind_from_epoch"] = int(both["epoch"].iloc[trailing])
        recs.append(rec)
    return pd.DataFrame(recs)


PAIRED_NOTE = (
    "Each run with another prior against the plain VAE of the same dataset and study (and dim z where "
    "one exists), image by image on the same test images and binarisations: difference = mean over "
    "images of the run's −log p̂(x) "
    "minus the plain VAE's (negative: the run is better), paired se = sd of the per-image differences / √n. "
    "nll, nll_against, difference, paired_se: under each run's headline protocol (its proposal, by default "
    "the full-support defensive mixture, and its headline log Z: a certified run's is the certificate's "
    "upper end, so its log-Z part is not optimistic with probability ≥ 1 − δ). The _q columns: the same "
    "images and log Z with the paper's proposal q(z|e), where both runs scored it, so difference_q beside "
    "difference shows how the paper's proposal moves the run's gap to the plain VAE (a truncated q loses "
    "more posterior mass the more the prior pulls). The log-Z estimate's own error is not in the paired se."
)


def same_images(mine: pd.DataFrame, theirs: pd.DataFrame) -> bool:
    """Two per-image NLL tables score the same test images in the same order: as many rows and,
    where both record it, the same test_index."""
    if len(mine) != len(theirs):
        return False
    return not ("test_index" in mine and "test_index" in theirs and not mine["test_index"].equals(theirs["test_index"]))


def paired_difference(mine: pd.Series, theirs: pd.Series) -> tuple[float, float]:
    """(mean of mine − theirs, its paired standard error sd/√n), nats."""
    diff = mine - theirs
    return diff.mean(), diff.std() / math.sqrt(len(diff))


def _per_image(root: str | Path, row: pd.Series, pattern: str) -> pd.DataFrame | None:
    """A run's per-image NLL table: its own file (`file.per_image`, a committed study's run) or `pattern`'s."""
    own = row.get("file.per_image")
    return per_image_table(root, own if isinstance(own, str) and own else pattern, row["run"])


def paired_table(root: str | Path, runs: pd.DataFrame, pattern: str) -> pd.DataFrame:
    """Per-image paired comparison of every run with another prior against the plain VAE of its
    dataset (PAIRED_NOTE), from the estimate-nll stage's per-image files (a row's `file.per_image`,
    else `pattern` with {run}; two files pair when they have as many rows and, where both record
    it, the same test_index in the same order). Columns: run,
    algorithm, against, n_images, nll, nll_against, difference, paired_se (headline protocol), then
    nll_q, nll_against_q, difference_q, paired_se_q (the paper's proposal q(z|e), from the files'
    nll_nats_paper_protocol; empty unless both runs have it), log_z (the run's headline estimator)."""
    plain = runs[runs["algorithm"] == "vae"]
    recs = []
    q = "nll_nats_paper_protocol"
    for _, r in runs[runs["algorithm"] != "vae"].iterrows():
        mine = _per_image(root, r, pattern)
        if mine is None:
            continue
        same = plain[plain["dataset"] == r["dataset"]]
        same = same[same["source"] == r["source"]] if "source" in same else same
        same = same[same["zdim"] == r["zdim"]] if (same["zdim"] == r["zdim"]).any() else same
        for _, v in same.iterrows():
            theirs = _per_image(root, v, pattern)
            if theirs is None or not same_images(mine, theirs):
                continue  # other test images (or as many different ones): no pairing
            difference, paired_se = paired_difference(mine["nll_nats"], theirs["nll_nats"])
            rec = {
                "run": r["run"],
                "algorithm": r["algorithm"],
                "against": v["run"],
                "n_images": len(mine),
                "nll": mine["nll_nats"].mean(),
                "nll_against": theirs["nll_nats"].mean(),
                "difference": difference,
                "paired_se": paired_se,
                "nll_q": math.nan,
                "nll_against_q": math.nan,
                "difference_q": math.nan,
                "paired_se_q": math.nan,
                "log_z": r.get("nll.log_z_headline", ""),
            }
            if q in mine and q in theirs:
                difference_q, paired_se_q = paired_difference(mine[q], theirs[q])
                rec |= {
                    "nll_q": mine[q].mean(),
                    "nll_against_q": theirs[q].mean(),
                    "difference_q": difference_q,
                    "paired_se_q": paired_se_q,
                }
            recs.append(rec)
            break
    return pd.DataFrame(recs)


TRAINING_LENGTH_NOTE = (
    "The same study at the authors' MNIST hyperparameters (lr 1e-4, ‖∇D‖³, c = w, zero-initialised heads: "
    "`authors`) and with PyTorch's initialisation and c = 1 (`probe`), 30 epochs with the log-Z monitor "
    "after every epoch. NLL: the monitor's NLL under the monitored log Z at each epoch, of the images the "
    "`images` column names: validation images (train[50 000:]), or, in curves written before the monitor "
    "moved to them, the first test images; log Z: the training estimate (epoch mean) and the monitored one; "
    "gap = monitored − training. The last rows per variant: estimate-nll at the end (AIS at the default "
    "budget; `images` names its test images and its proposal)."
)

MONITOR_IMAGES = {"valid": "validation images", "test": "the first test images"}


def training_length_table(root: str | Path, pattern: str) -> pd.DataFrame:
    """The training-length study: for every variant directory that `pattern` ("…/{variant}/{run}")
    matches under root, one row per monitored epoch with the plain VAE's monitored NLL and, per
    pull-back run, its monitored NLL, training and monitored log Z and their gap (`images`: which
    images the monitor scored, `_monitor_nll`); then a row "end" with each run's estimate-nll NLL
    (headline log Z) where its nll.json exists (`images`: its test images and proposal). Empty when
    no variant has curves."""
    root = Path(root)
    head, _, _ = pattern.partition("{variant}")
    base = root / head
    recs = []
    for vdir in sorted(p for p in base.glob("*") if p.is_dir()) if base.is_dir() else []:
        variant = vdir.name
        runs, images = {}, set()
        for rdir in sorted(p for p in vdir.glob("*") if (p / "train_curve.csv").is_file()):
            d = pd.read_csv(rdir / "train_curve.csv")
            if (src := _monitor_nll(d)) is not None:
                runs[rdir.name] = d.dropna(subset=[src[0]]).rename(columns={src[0]: "monitor_nll"})
                images.add(MONITOR_IMAGES[src[1]])
        if not runs:
            continue
        epochs = sorted(set.intersection(*(set(d["epoch"].astype(int)) for d in runs.values())))
        for epoch in epochs:
            rec: dict = {"variant": variant, "epoch": epoch, "images": " and ".join(sorted(images))}
            for name, d in runs.items():
                row = d[d["epoch"] == epoch].iloc[0]
                rec[f"{name} NLL"] = row["monitor_nll"]
                if "monitor_log_z_ais" in d and not math.isnan(row.get("monitor_log_z_ais", math.nan)):
                    rec[f"{name} log Z train"] = row["log_z"]
                    rec[f"{name} log Z monitored"] = row["monitor_log_z"]
                    rec[f"{name} gap"] = row["monitor_log_z"] - row["log_z"]
            recs.append(rec)
        end: dict = {"variant": variant, "epoch": "end"}
        scored = set()
        for name in runs:
            nll = read_json(vdir / name / "nll.json", missing_ok=True)
            if nll is not None:
                end[f"{name} NLL"] = nll["nll_nats"]
                if nll.get("log_z"):
                    end[f"{name} log Z monitored"] = nll["log_z"][nll["log_z_headline"]]["log_z"]
                as_row = pd.Series(flat(nll, "nll.", lists_as_json=True), dtype=object)  # as a row of `collect`
                scored.add(f"{_test_images(as_row)}, proposal {_proposal(as_row)}")
        if len(end) > 2:
            recs.append({**end, "images": "estimate-nll: " + " and ".join(sorted(scored))})
    return pd.DataFrame(recs)
