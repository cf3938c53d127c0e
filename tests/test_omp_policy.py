"""The stages' OpenMP wait policy: the user's setting wins; PASSIVE only when the cores are busy."""

import os

from stages.boot import busy_cores, choose_omp_wait_policy


def _stat_file(tmp_path, user, idle):
    f = tmp_path / "stat"
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    f.write_text(f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    return f


def test_busy_cores_from_two_proc_stat_samples(tmp_path, monkeypatch):
    # between the two reads 300 busy and 100 idle ticks pass: 3/4 of every core is in use
    f = _stat_file(tmp_path, 1000, 5000)
    import time

    def advance(_):
        f.write_text(f.read_text().replace("cpu  1000 0 0 5000", "cpu  1300 0 0 5100"))

    monkeypatch.setattr(time, "sleep", advance)
    assert busy_cores(window=0.0, stat=f) == 0.75 * (os.cpu_count() or 1)


def test_busy_cores_unreadable_is_none(tmp_path):
    assert busy_cores(window=0.0, stat=tmp_path / "missing") is None
    bad = tmp_path / "bad"
    bad.write_text("not a stat file\n")
    assert busy_cores(window=0.0, stat=bad) is None


def test_policy_keeps_user_setting_and_follows_load():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert choose_omp_wait_policy(env, busy=lambda: 2.0) == "ACTIVE"
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    assert choose_omp_wait_policy(env, busy=lambda: 1.2) == "PASSIVE"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    assert choose_omp_wait_policy(env, busy=lambda: 0.1) == "default"
    assert env == {}
    env = {}
    assert choose_omp_wait_policy(env, busy=lambda: None) == "default"
    assert env == {}
