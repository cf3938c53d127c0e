"""scripts/repro.py: the lanes that run the study's runs side by side."""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import repro  # noqa: E402


def test_costliest_runs_go_first_in_params_order():
    runs = {
        "vae": "standard",
        "naive_vaepp": "pullback",
        "vaepp": "pullback",
        "vae_z4": "standard",
        "certified": "certified",
    }
    assert repro.lane_order(runs) == ["naive_vaepp", "vaepp", "certified", "vae", "vae_z4"]


def test_lanes_run_every_item_side_by_side_and_keep_progress_bars_last_state(tmp_path):
    script = (
        "import sys, time; name = sys.argv[1]; sys.stdout.write('bar 1%\\rbar 50%\\rbar 100%\\n'); "
        "sys.stdout.flush(); time.sleep(0.5); print('done', name)"
    )
    out = io.StringIO()
    rc = repro.run_lanes(["a", "b", "c"], lambda item: [[sys.executable, "-c", script, item]], jobs=2, env={}, out=out)
    lines = out.getvalue().splitlines()
    assert rc == 0
    for item in "abc":
        assert f"[{item}] bar 100%" in lines and f"[{item}] done {item}" in lines
        assert not any(line.startswith(f"[{item}] bar 1%") for line in lines)
        assert any(line.startswith(f"[{item}] finished with status 0") for line in lines)
    # two lanes: b starts before a ends (a sleeps 0.5 s after its bar)
    assert lines.index("[b] bar 100%") < lines.index("[a] done a")


def test_a_failing_run_fails_the_lanes_and_stops_new_starts():
    out = io.StringIO()
    ok, bad = [sys.executable, "-c", "print('ran')"], [sys.executable, "-c", "import sys; sys.exit(3)"]
    cmds = {"bad": [ok, bad, ok], "later": [ok]}
    rc = repro.run_lanes(["bad", "later"], lambda item: cmds[item], jobs=1, env={}, out=out)
    # the failing item stops at its failing command, and no item starts after it
    assert rc == 3 and out.getvalue().count("[bad] ran") == 1 and "[later] ran" not in out.getvalue()


def test_each_run_goes_through_its_stages_in_dvc_yaml_order():
    import yaml

    stages = list(yaml.safe_load((Path(repro.ROOT) / "dvc.yaml").read_text())["stages"])
    per_run = [s for s in stages if s not in ("prepare-data", "report")]
    assert list(repro.RUN_STAGES) == per_run


def test_on_done_runs_after_each_successful_item_in_its_cwd(tmp_path):
    """on_done(item, seconds) follows an item's last command, not a failed one; the commands run in
    `cwd`, and an on_done that raises fails its item."""
    out, done = io.StringIO(), []
    here = [sys.executable, "-c", "import os; open('ran', 'a').write('x')"]
    bad = [sys.executable, "-c", "import sys; sys.exit(4)"]
    rc = repro.run_lanes(
        ["a", "b"],
        lambda item: [here],
        jobs=2,
        env={},
        out=out,
        cwd=tmp_path,
        on_done=lambda item, seconds: done.append((item, seconds)),
    )
    assert rc == 0 and sorted(i for i, _ in done) == ["a", "b"] and all(s > 0 for _, s in done)
    assert (tmp_path / "ran").read_text() == "xx"
    done.clear()
    assert repro.run_lanes(["c"], lambda item: [bad], jobs=1, env={}, out=out, on_done=lambda *a: done.append(a)) == 4
    assert done == []

    def refuse(item, seconds):
        raise OSError("disk full")

    out = io.StringIO()
    assert repro.run_lanes(["d"], lambda item: [here], jobs=1, env={}, out=out, cwd=tmp_path, on_done=refuse) == 1
    assert "[d] failed after its commands: disk full" in out.getvalue()
