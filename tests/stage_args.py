"""A stage's command-line arguments as dvc.yaml gives them, for tests that call `stage.main(argv)`.

The paths a stage reads and writes live only in dvc.yaml; tests take them from there instead of
repeating them.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"


def stage_command(stage: str, key: str | None = None, dvc_yaml: Path = DVC_YAML) -> list[str]:
    """`stage`'s cmd split into words (`python -m stages.<name> ARGS`), ${key}/${item} replaced by
    `key`. For a foreach stage `key` is the run (or dataset) name."""
    spec = yaml.safe_load(Path(dvc_yaml).read_text())["stages"][stage]
    cmd = spec["do"]["cmd"] if "do" in spec else spec["cmd"]
    if key is not None:
        cmd = cmd.replace("${key}", key).replace("${item}", key)
    return shlex.split(cmd)


def stage_module(stage: str, dvc_yaml: Path = DVC_YAML) -> str:
    """The module `stage`'s cmd runs with `python -m` ("stages.train" for "train")."""
    words = stage_command(stage, dvc_yaml=dvc_yaml)
    return words[words.index("-m") + 1]


def stage_argv(stage: str, key: str | None = None, *extra: str, dvc_yaml: Path = DVC_YAML) -> list[str]:
    """The arguments after the module in `stage`'s cmd, ${key}/${item} replaced by `key`, plus
    `extra`. For a foreach stage `key` is the run (or dataset) name."""
    words = stage_command(stage, key, dvc_yaml)
    return words[words.index("-m") + 2 :] + list(extra)


def report_files(dvc_yaml: Path = DVC_YAML) -> dict[str, str]:
    """The report stage's input path patterns ({"metrics": "metrics/{run}/{kind}.json", ...})."""
    argv = stage_argv("report", dvc_yaml=dvc_yaml)
    pairs = dict(zip(argv[::2], argv[1::2], strict=True))
    names = ("metrics", "meta", "train_curve", "grid", "grid_gan")
    return {name: pairs[f"--{name.replace('_', '-')}"] for name in names}
