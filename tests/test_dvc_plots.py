"""The training curves as DVC plots, rendered offline.

In a throwaway git + DVC repository holding this project's dvc.yaml, params.yaml, .dvc/config and
offline page template, plus synthetic plots/<run>/train_curve.csv files in two commits:
`dvc plots show` and `dvc plots diff` write pages that load nothing from the network, and headless
Chromium with name resolution and proxying switched off draws every declared curve. A curve counts
as drawn when the page's SVG holds a line mark for it whose vertices are an affine image of the CSV
(x pixels ∝ epoch, or dim z for Figure 4's lines, or log epoch for the converged study's gain,
y pixels ∝ value, one vertex per row); DVC's own
CDN page, rendered the same way, draws nothing (the control that shows the check can fail).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from chromium import render

ROOT = Path(__file__).resolve().parents[1]
# dvc-render's revision colours (VegaRenderer's colour range), in the order the revisions are given.
REV_COLOURS = ("#945dd6", "#13adc7")
EPOCHS = {"baseline": 8, "candidate": 11}  # the two commits' curves differ in length and values
CROSS_RUN = {
    "train-loss": "loss",
    "train-beta": "beta",
    "train-log-z": "log_z",
    "train-log-z-monitored": "monitor_log_z",
    "train-valid-nll-monitored": "monitor_valid_nll",
}
DIMZ = {"dimz-nll": "nll_nats", "dimz-fid": "fid"}  # Figure 4's lines, x = dim z
DIMZ_VALUES = [4, 8, 16, 32]
CONVERGED = {"converged-gain": "gain"}  # the converged study's gain against epochs, x on a log scale
CONVERGED_EPOCHS = [5, 10, 15, 20, 30, 50, 80]
LINE_RE = re.compile(
    r'<path aria-label="([^"]*)" role="graphics-symbol" aria-roledescription="line mark" '
    r'd="([^"]*)"([^>]*)>'
)


def _runs() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())["runs"]


def _declared() -> dict[str, dict]:
    """dvc.yaml's top-level plots as {plot id: properties}."""
    return {k: v for item in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"] for k, v in item.items()}


def _curve(run: str, prior: str, tag: str) -> dict[str, np.ndarray]:
    """Training-curve columns shaped like the train stage's: a falling loss, β rising towards its
    bound and a drifting log Z for pull-back runs; 0 for β and log Z in the plain VAE."""
    n = EPOCHS[tag]
    epoch = np.arange(1, n + 1)
    offset = 3.0 * (sum(map(ord, run)) % 7) + (0.0 if tag == "baseline" else -6.0)
    recon = 80.0 + 70.0 * np.exp(-(epoch - 1) / 2.0) + offset
    kl = 15.0 + 5.0 * (1 - np.exp(-epoch / 3.0))
    pull = prior != "standard"
    beta = (5.0 + offset / 10 + 4.0 * (1 - np.exp(-epoch / (3.0 if tag == "baseline" else 5.0)))) if pull else 0 * epoch
    log_z = (11.0 + offset / 3 - 0.9 * epoch + 0.3 * np.sin(epoch)) if pull else 0.0 * epoch
    return {
        "epoch": epoch,
        "beta": beta,
        "elbo_under_train_log_z": -(recon + kl),
        "kl": kl,
        "log_z": log_z,
        "monitor_log_z": log_z + 0.5 * epoch if pull else 0.0 * epoch,
        "monitor_valid_nll": recon + kl + 3.0 + (0.2 * epoch if pull else 0.0),
        "loss": recon + kl,
        "lr": np.full(n, 1.0e-3),
        "recon": recon,
    }


def _write_curves(repo: Path, tag: str) -> dict[str, dict[str, np.ndarray]]:
    curves = {}
    for run, spec in _runs().items():
        curves[run] = cols = _curve(run, spec["prior"], tag)
        path = repo / "plots" / run / "train_curve.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [",".join(cols)] + [
            ",".join(repr(float(cols[c][i])) if c != "epoch" else str(cols[c][i]) for c in cols)
            for i in range(len(cols["epoch"]))
        ]
        path.write_text("\n".join(rows) + "\n")
    return curves


def _write_dimz(repo: Path, tag: str) -> dict[str, dict[str, np.ndarray]]:
    """The report stage's dim-z files for the declared lines: NLL falling and FID rising with dim z."""
    lines = {}
    for f in sorted({f for plot_id in DIMZ for f in _declared()[plot_id]["y"]}):
        shift = (3.0 if "vaepp" in f else 0.0) + (0.0 if tag == "baseline" else -1.5)
        z = np.array(DIMZ_VALUES)
        cols = {"zdim": z, "nll_nats": 95.0 + 20.0 / z + shift, "fid": 40.0 + 3.0 * np.log2(z) + shift}
        lines[Path(f).name] = _write_csv(repo / f, cols)
    return lines


def _write_csv(path: Path, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Equal-length numeric columns as a CSV file at `path` (every value a float); returns `cols`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(cols.values())))
    rows = [",".join(cols)] + [",".join(repr(float(cols[c][i])) for c in cols) for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return cols


def _write_converged(repo: Path, tag: str) -> dict[str, dict[str, np.ndarray]]:
    """The report stage's converged-study files: each prior's gain against epochs."""
    lines = {}
    for i, f in enumerate(sorted({f for plot_id in CONVERGED for f in _declared()[plot_id]["y"]})):
        e = np.array(CONVERGED_EPOCHS)
        gain = (i - 1.0) + 0.4 * np.log(e) + (0.0 if tag == "baseline" else 0.5)
        cols = {"epoch": e, "gain": gain, "gain_low": gain - 0.2, "gain_high": gain + 0.2, "n_seeds": 1 + 0 * e}
        lines[Path(f).name] = _write_csv(repo / f, cols)
    return lines


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC repository with this project's plot declarations and page template, and the
    synthetic curves committed twice (tags `baseline` and `candidate`)."""
    repo = tmp_path_factory.mktemp("dvc-plots") / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    _dvc("init", "-q", cwd=repo)
    for rel in ("dvc.yaml", "params.yaml", ".dvc/config"):
        shutil.copy(ROOT / rel, repo / rel)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    curves = {}
    for tag in EPOCHS:
        curves[tag] = {**_write_curves(repo, tag), **_write_dimz(repo, tag), **_write_converged(repo, tag)}
        _run(["git", "add", "-A"], repo)
        _run(["git", "commit", "-q", "-m", tag], repo)
        _run(["git", "tag", tag], repo)
    return repo, curves


def _chromium(page: Path, out: Path, *, n_charts: int) -> str:
    """Render `page` with the network off; write a screenshot to `out` and return the DOM."""
    height = 200 + 420 * math.ceil(n_charts / 2)  # two 300-pixel charts (with legends) per row
    dom = render(page, width=1400, height=height, screenshot=out, dom=True, offline=True)
    assert "</html>" in dom, "Chromium returned no DOM"
    return dom


def _lines(dom: str, chart_ids: list[str]) -> dict[str, list[dict]]:
    """The drawn (full-opacity) line marks of each chart: label fields, stroke, vertices (V, 2)."""
    starts = sorted((dom.index(f'<div id="{cid}"'), cid) for cid in chart_ids)
    out: dict[str, list[dict]] = {}
    for (start, cid), (end, _) in zip(starts, [*starts[1:], (len(dom), "")], strict=True):
        out[cid] = []
        for label, d, attrs in LINE_RE.findall(dom[start:end]):
            if 'opacity="' in attrs.replace("stroke-opacity", ""):
                continue  # DVC's linear template draws each series twice: smoothed, and raw at opacity 0.2
            fields = dict(part.split(": ", 1) for part in label.split("; "))
            stroke = re.search(r'stroke="([^"]+)"', attrs).group(1)
            xy = np.array([[float(v) for v in p.split(",")] for p in re.split(r"[ML]", d) if p])
            out[cid].append({**fields, "stroke": stroke, "xy": xy})
    return out


def _assert_affine(xy: np.ndarray, epoch: np.ndarray, value: np.ndarray, what: str, *, log_x: bool = False) -> None:
    """Vertices are (a + b·epoch, c − e·value) with b, e > 0: the CSV curve, drawn to scale."""
    assert xy.shape == (len(epoch), 2), f"{what}: {xy.shape[0]} vertices for {len(epoch)} epochs"
    epoch = np.log(epoch) if log_x else epoch  # a log axis: x pixels ∝ log epoch
    for k, (col, sign) in enumerate(((epoch, 1), (value, -1))):
        if np.ptp(col) == 0:
            assert np.ptp(xy[:, k]) < 1e-6, f"{what}: a constant column is drawn flat"
            continue
        slope, icpt = np.polyfit(col, xy[:, k], 1)
        assert sign * slope > 0, f"{what}: axis {k} runs the wrong way"
        # vega rounds coordinates to 3 decimals; the smoothed series (DVC's slider at 0.001) moves
        # a point by at most 0.1% of its step to the next
        assert np.abs(icpt + slope * col - xy[:, k]).max() < 0.01 * np.ptp(xy[:, k]) + 0.01, what


def _charts(runs: dict) -> dict[str, list[tuple[str, str]]]:
    """Each chart's id in DVC's page and the (run, column) curves it must draw."""
    charts = {f"plots_{run}_train_curve_csv": [(run, "loss")] for run in runs}
    for plot_id, column in CROSS_RUN.items():
        files = _declared()[plot_id]["y"]
        charts[plot_id] = [(Path(f).parent.name, column) for f in files]
    for plot_id, column in {**DIMZ, **CONVERGED}.items():  # keyed by file name: DVC labels these lines by it
        charts[plot_id] = [(Path(f).name, column) for f in _declared()[plot_id]["y"]]
    return charts


def _check_page(dom: str, curves: dict, revs: list[str]) -> int:
    """Every declared curve of every revision is drawn, in that revision's colour; returns the count."""
    charts = _charts(_runs())
    drawn = _lines(dom, list(charts))
    n = 0
    for cid, wanted in charts.items():
        x = "zdim" if cid in DIMZ else "epoch"
        key = (lambda f: f) if cid in DIMZ or cid in CONVERGED else (lambda f: f.split("/")[0])
        got = {(line["rev"], key(line.get("filename", "")) or wanted[0][0]): line for line in drawn[cid]}
        assert set(got) == {(rev, run) for rev in revs for run, _ in wanted}, f"{cid}: drew {sorted(got)}"
        for rev, colour in zip(revs, REV_COLOURS, strict=False):
            for run, column in wanted:
                line, cols = got[rev, run], curves[rev][run]
                assert line["stroke"] == colour, f"{cid} {rev} {run}: stroke {line['stroke']}"
                what = f"{cid} {rev} {run} {column}"
                _assert_affine(line["xy"], cols[x], cols[column], what, log_x=cid in CONVERGED)
                n += 1
    return n


def _colour_pixels(png: Path, colour: str) -> int:
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)  # (H, W, 3)
    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - target).max(axis=-1) < 30).sum())


def test_template_is_the_locked_npm_bundles():
    """The committed page inlines exactly the bundles whose SHA-256 the lock records, keeps DVC's
    {plot_divs} placeholder and has no {scripts} placeholder (so no CDN tags)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "vega_template.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = (ROOT / ".dvc" / "config").read_text()
    assert re.search(r"^\[plots\]\n(?:\s+\S.*\n)*?\s+html_template = plots/offline\.html$", config, re.MULTILINE)


def test_cross_run_charts_name_every_run_of_params():
    """DVC has no globs in a plot's file map, so the cross-run charts list the runs: they must be
    params.yaml's runs (β: the priors with a critic; the log Zs: the priors whose log Z is estimated)."""
    from vaepp.priors import PRIORS

    runs = _runs()
    declared = _declared()
    assert declared["plots"]["y"] == "loss" and declared["plots"]["x"] == "epoch"

    def charted(prior, column: str) -> bool:  # β: a critic's; log Z: an estimated one
        if column == "beta":
            return prior.has_critic
        return column in ("loss", "monitor_valid_nll") or not prior.exact_log_z

    for plot_id, column in CROSS_RUN.items():
        want = {f"plots/{run}/train_curve.csv" for run, spec in runs.items() if charted(PRIORS[spec["prior"]], column)}
        got = declared[plot_id]["y"]
        assert set(got) == want and set(got.values()) == {column}, (
            f"dvc.yaml plots → {plot_id} lists {sorted(got)}; params.yaml's runs need {sorted(want)}"
        )


def test_plots_show_draws_every_curve_offline(repo, tmp_path):
    repo, curves = repo
    proc = _dvc("plots", "show", "-o", str(tmp_path / "show"), cwd=repo)
    page = tmp_path / "show" / "index.html"
    assert page.is_file(), proc.stdout + proc.stderr
    html = page.read_text()
    markup = re.sub(r"(<script[^>]*>).*?</script>", r"\1", html, flags=re.DOTALL)  # tags, not the JavaScript
    assert not re.search(r"<[a-z]+[^>]+\b(?:src|href)=", markup), "the page loads something"
    assert "cdn.jsdelivr" not in html
    n_charts = len(_charts(_runs()))
    dom = _chromium(page, tmp_path / "show.png", n_charts=n_charts)
    assert dom.count('class="marks"') == n_charts  # one vega SVG per declared chart
    n = _check_page(dom, {"workspace": curves["candidate"]}, ["workspace"])
    assert n == len(_runs()) + sum(len(_declared()[p]["y"]) for p in (*CROSS_RUN, *DIMZ, *CONVERGED))
    # The screenshot too: the curves' colour covers far more than the legends' 10-pixel dots.
    assert _colour_pixels(tmp_path / "show.png", REV_COLOURS[0]) > 150 * n


def test_dvc_default_page_draws_nothing_offline(repo, tmp_path):
    """The control: DVC's built-in page (vega from the CDN) under the same network-off Chromium."""
    from dvc_render.html import PAGE_HTML

    repo, _ = repo
    default = tmp_path / "default.html"
    default.write_text(PAGE_HTML)
    _dvc("plots", "show", "--html-template", str(default), "-o", str(tmp_path / "cdn"), cwd=repo)
    page = tmp_path / "cdn" / "index.html"
    assert "cdn.jsdelivr.net/npm/vega@" in page.read_text()
    dom = _chromium(page, tmp_path / "cdn.png", n_charts=len(_charts(_runs())))
    assert 'class="marks"' not in dom and not LINE_RE.search(dom)


def test_plots_diff_overlays_both_commits(repo, tmp_path):
    repo, curves = repo
    _dvc("plots", "diff", "baseline", "candidate", "-o", str(tmp_path / "diff"), cwd=repo)
    page = tmp_path / "diff" / "index.html"
    html = page.read_text()
    assert '"rev": "baseline"' in html and '"rev": "candidate"' in html
    n_charts = len(_charts(_runs()))
    dom = _chromium(page, tmp_path / "diff.png", n_charts=n_charts)
    n = _check_page(dom, curves, ["baseline", "candidate"])
    assert n == 2 * (len(_runs()) + sum(len(_declared()[p]["y"]) for p in (*CROSS_RUN, *DIMZ, *CONVERGED)))
    for colour in REV_COLOURS:
        assert _colour_pixels(tmp_path / "diff.png", colour) > 150 * n // 2
