"""dvc.yaml's Python deps follow the imports: each stage lists exactly the project files it runs.

The closure of a stage's imports (scripts/dvc_deps.py: `python -m stages.<name>`, then every module
of stages/, vaepp/, tracking/ and acquire/ it imports, directly or not, function bodies included,
with the packages' __init__.py) must equal the `.py` entries of its deps: a module missing there
and DVC would not rerun the stage when it changes; one too many and it reruns for nothing.
`make dvc-deps` (`python scripts/dvc_deps.py --write`) rewrites them after a module moves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imports import load_script

ROOT = Path(__file__).resolve().parents[1]


dvc_deps = load_script("dvc_deps")
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


@pytest.mark.parametrize("stage", STAGES)
def test_stage_py_deps_are_the_closure_of_its_imports(stage):
    want = set(dvc_deps.expected_deps(ROOT)[stage])
    have = dvc_deps.declared_deps(ROOT)[stage]
    missing, extra = sorted(want - set(have)), sorted(set(have) - want)
    assert not missing and not extra, (
        f"dvc.yaml stage {stage!r}: .py deps differ from its imports\n"
        f"  missing: {', '.join(missing) or '-'}\n  extra: {', '.join(extra) or '-'}\n"
        "run `make dvc-deps` (python scripts/dvc_deps.py --write)"
    )
    assert len(have) == len(set(have)), f"{stage}: a .py dep is listed twice"


def test_every_stage_runs_a_stage_module():
    for name, spec in dvc_deps.stage_specs(yaml.safe_load((ROOT / "dvc.yaml").read_text())).items():
        start = dvc_deps.stage_start(spec["cmd"])
        assert spec["cmd"].startswith("python -m stages.") and (ROOT / start).is_file(), name


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_closure_follows_every_kind_of_import(tmp_path):
    """Absolute and relative imports, `from package import module` against `from module import
    name`, imports inside functions, packages' __init__.py; nothing outside the project."""
    write(
        tmp_path,
        {
            "stages/__init__.py": "",
            "stages/run.py": "import os\nfrom stages import helper\n\ndef main():\n    from vaepp.sub import deep\n",
            "stages/helper.py": "from vaepp.files import flat  # a name, not a module\n",
            "stages/unused.py": "",
            "vaepp/__init__.py": "",
            "vaepp/files.py": "import torch\n",
            "vaepp/sub/__init__.py": "from . import shared\n",
            "vaepp/sub/deep.py": "from ..files import flat\nfrom .. import cousin\n",
            "vaepp/sub/shared.py": "",
            "vaepp/cousin.py": "import tracking.store\n",
            "vaepp/lonely.py": "",
            "tracking/__init__.py": "",
            "tracking/store.py": "import acquire\n",
            "acquire/__init__.py": "",
        },
    )
    got = [p.as_posix() for p in dvc_deps.closure(tmp_path, Path("stages/run.py"))]
    assert got == [
        "stages/run.py",
        "acquire/__init__.py",
        "stages/__init__.py",
        "stages/helper.py",
        "tracking/__init__.py",
        "tracking/store.py",
        "vaepp/__init__.py",
        "vaepp/cousin.py",
        "vaepp/files.py",
        "vaepp/sub/__init__.py",
        "vaepp/sub/deep.py",
        "vaepp/sub/shared.py",
    ]


DVC_YAML = """\
# a comment at the top
stages:
  one:
    foreach: ${runs}
    do:
      cmd: python -m stages.one --run ${key}
      deps:
        - stages/one.py
        - vaepp/old.py  # moved away
        - data
        # the model of the run
        - models/${key}/vae.pt
      outs:
        - out/${key}

  two:
    cmd: python -m stages.two
    deps:
      - stages/two.py
      - metrics
    always_changed: true
"""


def test_write_replaces_only_the_py_entries(tmp_path):
    write(
        tmp_path,
        {
            "dvc.yaml": DVC_YAML,
            "stages/__init__.py": "",
            "stages/one.py": "from vaepp import new\n",
            "stages/two.py": "",
            "vaepp/__init__.py": "",
            "vaepp/new.py": "",
        },
    )
    assert dvc_deps.main(["--check", "--root", str(tmp_path)]) == 1
    assert dvc_deps.main(["--write", "--root", str(tmp_path)]) == 0
    assert (tmp_path / "dvc.yaml").read_text() == DVC_YAML.replace(
        "        - stages/one.py\n        - vaepp/old.py  # moved away\n",
        "        - stages/one.py\n        - stages/__init__.py\n        - vaepp/__init__.py\n        - vaepp/new.py\n",
    ).replace("      - stages/two.py\n", "      - stages/two.py\n      - stages/__init__.py\n")
    assert dvc_deps.main(["--check", "--root", str(tmp_path)]) == 0
