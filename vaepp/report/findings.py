"""What the study found, in a few sentences that open the report: per dataset, each prior's paired
gain over the plain VAE with its error (`paired_table`), how far the paper's q-based log Ẑ sits
from the honest estimate (the log-Z table) and the FID ranking with its floor (Table 4). Every
number is read from the run table and the paired table; each finding names the table (an anchor
of the rendered page) that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .collect import THIS_STUDY
from .rows import _by_log_z, _num

# The names a reader knows the runs' methods by (`resolve.method`; a prior's name otherwise).
METHOD_LABELS = {
    "vae": "plain VAE",
    "naive_vaepp": "Naive VAEPP",
    "vaepp": "VAEPP",
    "vaepp_flow": "VAEPP+Flow",
    "certified": "certified prior",
    "vampprior": "VampPrior",
    "lars": "LARS",
}

# Anchors of the rendered report's sections that findings point to.
ANCHORS = {"paired": "paired", "logz": "logz", "table4": "table4"}


@dataclass(frozen=True)
class Finding:
    text: str
    anchor: str  # the section that holds the numbers
    link: str  # its name in a sentence


def method_label(algorithm: str) -> str:
    """A method's name as the report writes it (`METHOD_LABELS`), else its algorithm key."""
    return METHOD_LABELS.get(algorithm, algorithm)


def verdict(diff: float, se: float) -> str:
    """How a paired difference reads at two standard errors (negative: better than the plain VAE)."""
    if abs(diff) <= 2 * se:
        return "indistinguishable"
    return "better" if diff < 0 else "worse"


def _gains(ds_runs: pd.DataFrame, paired: pd.DataFrame | None) -> Finding | None:
    if paired is None or not len(paired):
        return None
    mine = paired[paired["run"].isin(ds_runs["run"])].sort_values("difference")
    if not len(mine):
        return None
    first = mine.iloc[0]
    plain = ds_runs[ds_runs["run"] == first["against"]]
    how = ""
    if len(plain):
        p = plain.iloc[0]
        s = _num(p, "nll.n_importance_per_image")
        how = f", S = {int(s)} importance samples per image" if s is not None else ""
    parts = [
        f"{method_label(r['algorithm'])} {r['difference']:+.2f} ± {r['paired_se']:.2f} "
        f"({verdict(r['difference'], r['paired_se'])})"
        for _, r in mine.iterrows()
    ]
    return Finding(
        f"Each prior against the plain VAE ({first['nll_against']:.2f} nats), image by image on the same "
        f"{int(first['n_images'])} test images{how}: " + "; ".join(parts) + " (nats, paired se; negative is better).",
        ANCHORS["paired"],
        "paired table",
    )


def _log_z_gap(ds_runs: pd.DataFrame) -> Finding | None:
    parts = []
    for _, r in ds_runs[ds_runs["has_nll"]].iterrows():
        by, head = _by_log_z(r), r.get("nll.log_z_headline")
        if "paper_q" not in by or head not in by or head == "paper_q":
            continue
        gap = by[head] - by["paper_q"]  # log Z − log Ẑ_q: the NLL moves by the log-Z difference
        parts.append(
            f"{method_label(r['algorithm'])} {abs(gap):.2f} nats {'below' if gap > 0 else 'above'} it (NLL "
            f"{by['paper_q']:.2f} under log Ẑ_q, {by[head]:.2f} under {head})"
        )
    if not parts:
        return None
    return Finding(
        "The paper's q-based log Ẑ against the honest estimate of log Z (AIS, or a certificate's upper end): "
        + "; ".join(parts)
        + ". Below it, log Ẑ_q makes a prior look better than it is.",
        ANCHORS["logz"],
        "log-Z table",
    )


def _fid_ranking(ds_runs: pd.DataFrame) -> Finding | None:
    scored = ds_runs[ds_runs["has_fid"]]
    if not len(scored):
        return None
    scored = scored.assign(_fid=scored["fid.fid"].astype(float)).sort_values("_fid")
    parts = []
    for _, r in scored.iterrows():
        lo, hi = _num(r, "fid.fid_ci_low"), _num(r, "fid.fid_ci_high")
        ci = f" [{lo:.1f}, {hi:.1f}]" if lo is not None and hi is not None else ""
        parts.append(f"{method_label(r['algorithm'])} {r['_fid']:.1f}{ci}")
    first = scored.iloc[0]
    n, n_ref, floor = (_num(first, f"fid.{k}") for k in ("n_samples", "n_reference", "fid_floor"))
    size = f" ({int(n)} samples against {int(n_ref)} training images)" if n is not None and n_ref is not None else ""
    floor_text = (
        f"; real held-out images score {floor:.1f} at the same N, the floor a perfect model would reach"
        if floor is not None
        else ""
    )
    return Finding(
        f"FID{size}, best first with 95% intervals: " + ", ".join(parts) + floor_text + ".",
        ANCHORS["table4"],
        "Table 4",
    )


def findings(runs: pd.DataFrame, paired: pd.DataFrame | None) -> dict[str, list[Finding]]:
    """{dataset label (and the study that made its runs): its findings}, in the runs' order."""
    out: dict[str, list[Finding]] = {}
    runs = runs if "source" in runs else runs.assign(source=THIS_STUDY)
    for (_, source), ds_runs in runs.groupby(["dataset", "source"], sort=False):
        found = [f for f in (_gains(ds_runs, paired), _log_z_gap(ds_runs), _fid_ranking(ds_runs)) if f]
        if found:
            label = ds_runs["dataset_label"].iloc[0]
            out[label if source == THIS_STUDY else f"{label} ({source})"] = found
    return out
