"""The report's figures: Figure 4 analogue (NLL and FID against dim z) as inline SVG whose lines
and markers carry ids, and Figure 2 analogue (training curves) as a base64 PNG. matplotlib draws on
its Agg canvas without pyplot state, so the page needs no network and no display.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pandas as pd

from .converged import gain_series
from .findings import method_label


def _png(fig) -> str:
    fig.savefig(buf := io.BytesIO(), format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# Figure 4's NLL markers by comparability with this study's protocol (`figure4_points`):
# comparable → (gid suffix, marker, line style, paper-q marker)
NLL_MARKERS = {True: ("", "o", "-", "s"), False: ("-other-protocol", "x", ":", "D")}
EARLIER_LEGEND = ", earlier protocol: q(z|e), first n test images (not comparable)"
OTHER_LEGEND = ", another NLL protocol (not comparable; see its source)"


def figure_id(*parts: str) -> str:
    """An SVG element id made of `parts` (lower case, "-"-joined, other characters dropped)."""
    clean = ("".join(ch for ch in str(p).lower().replace(" ", "_") if ch.isalnum() or ch in "_.-") for p in parts)
    return "-".join(clean)


def dimz_figure(points: pd.DataFrame) -> str:
    """Figure 4 analogue as inline SVG: per dataset, the NLL against dim z (nats on Bernoulli
    data, bits/dim otherwise) under each run's headline log Z (filled markers, one line per
    algorithm) and under the paper's q-based log Ẑ (hollow squares, same colour); then FID against
    dim z, one line per (dataset, algorithm), with the real-vs-real floor dashed. Every line and
    marker set carries an id, `figure_id("dimz", panel, dataset, algorithm)` with panel "nll",
    "nll-paper-q" or "fid", and one marker per point, so the page can be checked point by point.
    NLL points not comparable with this study's protocol (`points["comparable"]` False, from
    `figure4_points`) are drawn apart, panels "nll-other-protocol" and "nll-paper-q-other-protocol"
    (NLL_MARKERS), their legend naming the earlier protocol where they have no `proposal`."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    if "comparable" not in points:  # `dimz_points`: this study's own, comparable by definition
        points = points.assign(comparable=True)
    datasets = list(dict.fromkeys(points["dataset_label"])) or ["no run"]
    algorithms = list(dict.fromkeys(points["algorithm"]))
    colour = {a: f"C{i}" for i, a in enumerate(algorithms)}
    fig = Figure(figsize=(5 * (len(datasets) + 1), 3.8))
    axes = fig.subplots(1, len(datasets) + 1, squeeze=False)[0]
    for ax, ds in zip(axes[:-1], datasets, strict=True):
        d = points[points["dataset_label"] == ds]
        nats = (d["likelihood"] == "bernoulli").all()
        unit = "nats" if nats else "bits/dim"
        for (alg, same), g in d.dropna(subset=["nll_nats"]).groupby(["algorithm", "comparable"], sort=False):
            suffix, marker, ls, q_marker = NLL_MARKERS[bool(same)]
            what = "" if same else EARLIER_LEGEND if g["proposal"].isna().all() else OTHER_LEGEND
            to_unit = 1.0 if nats else g["bpd"] / g["nll_nats"]
            ax.plot(
                g["zdim"],
                g["nll_nats"] * to_unit,
                ls=ls,
                marker=marker,
                color=colour[alg],
                label=f"{alg}{what}",
                gid=figure_id("dimz", f"nll{suffix}", ds, alg),
            )
            q = g.dropna(subset=["nll_paper_q_nats"])
            if len(q):
                ax.plot(
                    q["zdim"],
                    q["nll_paper_q_nats"] * (1.0 if nats else q["bpd"] / q["nll_nats"]),
                    ls="none",
                    marker=q_marker,
                    mfc="none",
                    color=colour[alg],
                    label=f"{alg}, paper's log Ẑ{what}",
                    gid=figure_id("dimz", f"nll-paper-q{suffix}", ds, alg),
                )
        ax.set(xlabel="dim z", ylabel=f"NLL ({unit})", title=f"{ds}: NLL against dim z")
    ax = axes[-1]
    for (ds, alg), g in points.dropna(subset=["fid"]).groupby(["dataset_label", "algorithm"], sort=False):
        style = "-" if ds == datasets[0] else ":"
        ax.plot(
            g["zdim"],
            g["fid"],
            style,
            color=colour[alg],
            marker="o",
            label=f"{ds} · {alg}",
            gid=figure_id("dimz", "fid", ds, alg),
        )
    for ds, g in points.dropna(subset=["fid_floor"]).groupby("dataset_label", sort=False):
        ax.axhline(g["fid_floor"].iloc[0], color="grey", ls="--", lw=1, label=f"{ds} · real vs real (floor)")
    ax.set(xlabel="dim z", ylabel="FID", title="FID against dim z")
    for ax in axes:
        if ax.lines:
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no run has this metric yet", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    with mpl.rc_context({"svg.hashsalt": "vaepp-dimz", "svg.fonttype": "none"}):
        fig.savefig(buf := io.StringIO(), format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]  # inline: no XML prolog or doctype


# Panels of the training-curve figure: (title, [(column, style)]); a solid line is what training
# optimises, a dashed one the independent check of the log-Z monitor (`log_z_monitor.log_z_monitor`).
CURVE_PANELS = (
    (
        "ELBO: objective (—) vs under monitored log Z (--)",
        [("elbo_under_train_log_z", "-"), ("elbo_under_monitor_log_z", "--")],
    ),
    ("log Z: training estimate (—) vs monitored (--)", [("log_z", "-"), ("monitor_log_z", "--")]),
    (
        "NLL under monitored log Z: validation images (—), the first test images in older curves (··)",
        [("monitor_valid_nll", "-"), ("monitor_test_nll", ":")],
    ),
    ("β", [("beta", "-")]),
    ("penalty", [("penalty", "-")]),
)


def curves_figure(root: Path, runs: pd.DataFrame, dataset: str) -> str | None:
    """Figure 2 analogue: per-epoch training curves of the runs on `dataset`, one colour per run.
    For every pull-back run it draws the training estimate of log Z against the monitored one
    (with the AIS seed spread as error bars) and the objective's ELBO against the ELBO under the
    monitored log Z. Base64 PNG or None."""
    from matplotlib.figure import Figure

    curves = {
        r["run"]: (r["algorithm"], pd.read_csv(root / r["file.train_curve"]))
        for _, r in runs[runs["dataset"] == dataset].iterrows()
        if r["file.train_curve"]
    }
    panels = [(t, cols) for t, cols in CURVE_PANELS if any(c in d for _, d in curves.values() for c, _ in cols)]
    if not curves or not panels:
        return None
    fig = Figure(figsize=(3.6 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, cols) in zip(axes, panels, strict=True):
        for i, (name, (alg, d)) in enumerate(curves.items()):
            for col, style in cols:
                if col not in d or d[col].isna().all():
                    continue
                if col == "log_z" and alg == "vae":
                    continue  # log Z = 0 exactly: nothing to compare
                g = d.dropna(subset=[col])
                label = f"{name} ({alg})" if style == "-" or len(cols) == 1 else None
                err = g.get("monitor_log_z_ais_seed_sd") if col == "monitor_log_z" else None
                ax.errorbar(g["epoch"], g[col], yerr=err, ls=style, marker=".", color=f"C{i}", label=label, capsize=2)
        ax.set(xlabel="epoch", title=title)
        ax.title.set_fontsize(8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _png(fig)


def gain_figure(curves: pd.DataFrame) -> str:
    """The converged study's headline figure as inline SVG: each prior's gain over the plain VAE
    (`converged.gain_curves`, drawn from its `gain_series`: nats, positive is better) against epochs
    on a log axis, the mean over its seeds with one marker per monitor check, and the between-seed
    range as a band where it has two or more seeds. The mean line and its markers carry the id
    `figure_id("converged", "gain", algorithm)`, the band `figure_id("converged", "band", algorithm)`."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for i, (name, line) in enumerate(gain_series(curves).items()):
        alg = name.removesuffix(".csv")
        seeds = int(line["n_seeds"].max())
        if seeds >= 2:
            band = dict(color=f"C{i}", alpha=0.2, lw=0, gid=figure_id("converged", "band", alg))
            ax.fill_between(line["epoch"], line["gain_low"], line["gain_high"], **band)
        prior = method_label(alg)
        label = f"{prior} ({seeds} seeds: mean, band = range)" if seeds >= 2 else f"{prior} (one seed)"
        gid = figure_id("converged", "gain", alg)
        ax.plot(line["epoch"], line["gain"], "-", marker="o", ms=3, color=f"C{i}", label=label, gid=gid)
    ax.axhline(0.0, color="grey", lw=1, ls="--", label="plain VAE")
    ax.set(xlabel="epoch (log scale)", ylabel="gain over the plain VAE (nats; > 0 better)")
    ax.set_title("Validation NLL: plain VAE − prior, at each monitor check", fontsize=9)
    if len(curves):
        ax.set_xscale("log")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, off the lines
    else:
        ax.text(
            0.5,
            0.5,
            "no prior has finished beside a plain VAE of its seed",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.grid(alpha=0.3, which="both")
    with mpl.rc_context({"svg.hashsalt": "vaepp-converged", "svg.fonttype": "none"}):
        fig.savefig(buf := io.StringIO(), format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]
