"""Chromium for the tests that render pages: a test that needs it fails where it is missing, naming
the install command, and scripts/ensure_chromium.py (run by `make test` first) fails unless it is there."""

from __future__ import annotations

from pathlib import Path

import pytest

import chromium
from imports import load_script


def _ensure_chromium():
    return load_script("ensure_chromium")


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_a_test_that_needs_chromium_fails_where_it_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(chromium, "CHROMIUM", str(tmp_path / "chromium"))
    with pytest.raises(pytest.fail.Exception) as err:
        chromium.require_chromium()
    message = str(err.value)
    assert str(tmp_path / "chromium") in message and "not installed" in message
    assert "python scripts/ensure_chromium.py" in message and "apt-get install -y chromium" in message
    with pytest.raises(pytest.fail.Exception):  # render() checks first, before starting anything
        chromium.render(tmp_path / "page.html", width=10, height=10, dom=True)


def test_a_test_that_needs_chromium_goes_on_where_it_is_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(chromium, "CHROMIUM", str(_executable(tmp_path / "chromium")))
    chromium.require_chromium()


def test_ensure_chromium_and_the_tests_look_at_the_same_binary():
    assert _ensure_chromium().CHROMIUM == chromium.CHROMIUM


def test_ensure_chromium_exits_0_when_chromium_is_there_without_calling_apt(tmp_path, monkeypatch, capsys):
    ensure = _ensure_chromium()
    binary = _executable(tmp_path / "chromium")
    monkeypatch.setattr(ensure, "CHROMIUM", str(binary))

    def no_apt(*args, **kwargs):
        raise AssertionError("apt-get called although Chromium is installed")

    monkeypatch.setattr(ensure, "_apt", no_apt)
    monkeypatch.setattr(ensure, "_has_candidate", no_apt)
    assert ensure.main([]) == 0
    assert capsys.readouterr().out == f"chromium: present at {binary}\n"


@pytest.mark.parametrize(
    ("why", "says"), [("no apt-get", "no apt-get"), ("not root", "sudo apt-get install -y chromium")]
)
def test_ensure_chromium_exits_1_when_it_cannot_install_chromium(tmp_path, monkeypatch, capsys, why, says):
    ensure = _ensure_chromium()
    monkeypatch.setattr(ensure, "CHROMIUM", str(tmp_path / "chromium"))
    if why == "no apt-get":
        monkeypatch.setattr(ensure.shutil, "which", lambda name: None)
    else:
        monkeypatch.setattr(ensure.shutil, "which", lambda name: "/usr/bin/apt-get")
        monkeypatch.setattr(ensure.os, "geteuid", lambda: 1000)
    assert ensure.main([]) == 1
    out = capsys.readouterr().out
    assert out.startswith("chromium: not installed (") and says in out and out.count("\n") == 1
    assert "the tests that render pages will fail" in out
