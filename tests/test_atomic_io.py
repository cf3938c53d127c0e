"""Atomic writes (vaepp.files): outputs appear whole or not at all, with the mode a plain open() gives."""

from __future__ import annotations

import json

import pytest


def test_outputs_get_the_umask_mode_and_no_temporaries(tmp_path):
    """atomic writes: the file has the mode a plain open() gives (not mkstemp's 0600); a failure
    inside the write leaves neither the file nor a temporary; an existing file is kept intact."""
    from vaepp.files import atomic_write_bytes, atomic_write_json

    plain = tmp_path / "plain"
    plain.write_text("x")
    out = atomic_write_json(tmp_path / "m" / "metrics.json", {"a": 1.0})
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "m" / "model.pt", "not bytes")  # fails inside the write
    with pytest.raises(TypeError):
        atomic_write_bytes(out, "not bytes")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["metrics.json"]
    assert json.loads(out.read_text()) == {"a": 1.0}
