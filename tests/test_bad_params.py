"""Bad params fail fast: every stage, by hand and as DVC runs it, and a fuzz of malformed files;
so does a stage started by a Python without the project's packages.

Each failure is one line on stderr naming the file, the key, the value and what is allowed;
exit code 2, no traceback, nothing written, before any data or model is read.
"""

from __future__ import annotations

import copy
import os
import random
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

import annotated_types as at
import pytest
import yaml
from pydantic import BaseModel

from stage_args import stage_argv
from stage_helpers import PY, ROOT, RUN, TINY, assert_clean_failure, env, set_path, stage_cmd, train_cmd, workspace


def stage_commands() -> dict[str, list[str]]:
    """Each stage's command from dvc.yaml with ${key} = vaepp and ${item} = mnist, minus `python`:
    `-m stages.<name> ARGS`."""
    commands = {}
    for name, st in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        cmd = (st.get("do") or st)["cmd"].replace("${key}", RUN).replace("${item}", "mnist")
        argv = shlex.split(cmd)
        assert argv[:2] == ["python", "-m"] and argv[2].startswith("stages."), cmd
        commands[name] = argv[1:]
    return commands


BAD_PARAMS = [  # (id, change to the tiny profile, needles of the one line)
    ("zdim-negative", {"model.zdim": -3}, ["model.zdim = -3", "greater than 0"]),
    ("lr-negative", {"train.lr": -1.0e-4}, ["train.lr = -0.0001", "greater than 0"]),
    ("dataset-unknown", {"data.dataset": "imagenet"}, ["data.dataset = 'imagenet'", "'mnist'"]),
    ("prior-unknown", {"runs.vaepp.prior": "gan"}, ["runs.vaepp.prior = 'gan'", "'pullback'"]),
    ("algorithm-unknown", {"train.algorithm": "gan"}, ["train.algorithm = 'gan'", "'naive' or 'vaepp'"]),
    ("penalty-unknown", {"train.penalty": "wgan"}, ["train.penalty = 'wgan'", "'wgan_gp'"]),
    ("key-misspelt", {"model.zdm": 3}, ["model.zdm = 3", "unknown key"]),
    ("run-override-bad", {"runs.vaepp.model": {"zdim": 0}}, ["runs.vaepp.model.zdim = 0", "greater than 0"]),
    (
        "run-dataset-unprepared",
        {"runs.vaepp.data": {"dataset": "fashion_mnist"}},
        ["runs.vaepp", "'fashion_mnist'", "not prepared", "datasets"],
    ),
    ("run-missing", {"runs": {"vae": {"prior": "standard"}}}, ["runs.vaepp", "no such run", "vae"]),
    ("beta-max-infinite", {"model.beta_max": float("inf")}, ["model.beta_max = inf", "finite"]),
    ("zdim-boolean", {"model.zdim": True}, ["model.zdim = True", "boolean"]),
    ("yaml-syntax", "runs: [\n", ["not valid YAML", "line"]),
    ("not-utf8", b"\xff\xfe m\x00o\x00", ["not UTF-8"]),
]
CORE = ("zdim-negative", "prior-unknown", "run-missing", "yaml-syntax")  # the rest: slow


def write_bad(path: Path, change) -> None:
    if isinstance(change, bytes):
        path.write_bytes(change)
    elif isinstance(change, str):
        path.write_text(change)
    else:
        raw = copy.deepcopy(TINY)
        for key, value in change.items():
            set_path(raw, key.split("."), value)
        path.write_text(yaml.safe_dump(raw))


def stage_cases():
    """(stage, case) for every stage and bad params file; `run-missing` only for stages with --run."""
    for name, argv in stage_commands().items():
        for case in BAD_PARAMS:
            if case[0] == "run-missing" and "--run" not in argv:
                continue
            marks = () if case[0] in CORE else pytest.mark.slow
            yield pytest.param(name, case, id=f"{case[0]}-{name}", marks=marks)


@pytest.mark.parametrize(("name", "case"), list(stage_cases()))
def test_each_stage_rejects_bad_params_in_one_line(tmp_path, name, case):
    """`python -m stages.<x> <dvc.yaml args> --params bad.yaml` by hand, in an empty directory:
    exit 2, one line naming the file, the key, the value and what is allowed, before any data
    or model is read and with nothing written."""
    argv = stage_commands()[name]
    case_id, change, needles = case
    bad = tmp_path / f"{case_id}.yaml"
    write_bad(bad, change)
    start = time.monotonic()
    proc = subprocess.run(
        [PY, *argv, "--params", bad.name],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - start
    assert_clean_failure(proc, bad.name, *needles)
    assert proc.stdout == ""
    assert seconds < 30, f"{seconds:.1f} s to report a bad params file"  # measured: ~0.2 s
    assert [p.name for p in tmp_path.iterdir()] == [bad.name]


def leaf_fields(model: type[BaseModel], prefix: str = ""):
    """(dotted key, FieldInfo) for every scalar/list field of the params schema."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from leaf_fields(ann, f"{prefix}{name}.")
        elif name != "runs":
            yield f"{prefix}{name}", info


def bad_values(info) -> list:
    """Values each field must refuse, derived from its type and bounds."""
    ann = info.annotation
    if get_origin(ann) is Literal:
        return ["not_a_choice", 3, ["mnist"]]
    if get_origin(ann) is tuple:
        return ["300", [], {"a": 1}, [True]] if get_args(ann)[0] is int else [7, "mnist", ["imagenet"]]
    metadata, out = list(info.metadata), []
    if get_origin(ann) is Union:  # Optional[int], or a bounded number or "auto"
        arms = [a for a in get_args(ann) if a is not type(None)]
        if any(get_origin(a) is Literal for a in arms):
            out.append("not_a_choice")
        rest = [a for a in arms if get_origin(a) is not Literal]
        if not rest:  # choices only, e.g. "auto" or a likelihood (`vaepp.options`)
            return ["not_a_choice", 3, ["mnist"]]
        (ann,) = rest
        if get_origin(ann) is Annotated:
            ann, *extra = get_args(ann)
            metadata += [m for e in extra for m in getattr(e, "metadata", [e])]
    for m in metadata:
        if isinstance(m, at.Gt):
            out.append(m.gt)
        if isinstance(m, at.Ge):
            out.append(m.ge - 1)
        if isinstance(m, at.Le):
            out.append(m.le + 1)
    if ann is int:
        out += ["abc", 2.5, True]
    elif ann is float:
        out += ["fast", float("inf"), float("nan"), [1.0]]
    elif ann is bool:
        out += ["sometimes", 7]
    elif ann is str:
        out += [["a"], {"b": 1}]
    assert out, f"no bad values for {ann}"
    return out


def schema_mutations() -> list[tuple[str, object]]:
    from vaepp.config import Params

    # an empty acceptance_mlp is valid (no h(z)); every other list needs at least one size
    return [
        (key, value)
        for key, info in leaf_fields(Params)
        for value in bad_values(info)
        if not (key.endswith("acceptance_mlp") and value == [])
    ]


def test_schema_mutations_are_all_refused_in_one_line():
    """Every bound and type of the schema, exercised in-process (fast): each one-line message
    names the key and the value; nothing is accepted."""
    from vaepp.config import ParamsError, parse_params, resolve_run

    cases = schema_mutations()
    assert len(cases) > 150
    accepted = []
    for key, value in cases:
        raw = set_path(copy.deepcopy(TINY), key.split("."), value)
        try:
            resolve_run(parse_params(raw, source="params.yaml"), RUN)
        except ParamsError as err:
            msg = str(err)
            assert "\n" not in msg and msg.startswith("params.yaml: ") and key in msg, (key, value, msg)
            if not isinstance(value, (dict, list)):
                assert repr(value) in msg, (key, value, msg)
        else:
            accepted.append((key, value))
    assert not accepted, f"malformed values accepted: {accepted}"


TEXT_CASES = [  # whole-file problems: (id, content or None for special files, needles)
    ("empty", "", ["expected a mapping"]),
    ("list", "[1, 2]\n", ["expected a mapping"]),
    ("no-runs", yaml.safe_dump({k: v for k, v in TINY.items() if k != "runs"}), ["runs", "missing"]),
    ("unclosed", "model: {zdim: 4\n", ["not valid YAML"]),
    ("tab-indent", "model:\n\tzdim: 4\n", ["not valid YAML"]),
    ("undefined-alias", "model: *nothing\n", ["not valid YAML"]),
    ("runs-scalar", "runs: 3\n", ["runs = 3"]),
    ("section-misspelt", yaml.safe_dump({**TINY, "trian": {"epochs": 3}}), ["trian", "unknown key"]),
    ("section-null", yaml.safe_dump({**TINY, "model": None}), ["model = None"]),
    ("binary", bytes(range(256)), ["not UTF-8"]),
    ("utf16", yaml.safe_dump(TINY).encode("utf-16"), ["not UTF-8"]),
    ("directory", None, ["cannot read params file"]),
    ("dangling-symlink", None, ["cannot read params file"]),
]


def fuzz_cases(n_schema: int = 40, n_runs: int = 8) -> list[tuple[str, object, list[str]]]:
    """A seeded sample of schema mutations (shared sections and per-run overrides) plus the
    whole-file cases: at least 50 malformed params files."""
    rng = random.Random(6)
    schema = schema_mutations()
    cases = []
    for key, value in rng.sample(schema, n_schema):
        needles = [key] + ([] if isinstance(value, (dict, list)) else [repr(value)])
        cases.append((f"{key}={value!r}", {key: value}, needles))
    sections = [
        (k, v)
        for k, v in schema
        if k.split(".")[0] in ("data", "model", "train", "latent_gan") and not k.startswith("data.dataset")
    ]
    for key, value in rng.sample(sections, n_runs):
        section, field = key.split(".", 1)
        change = {f"runs.{RUN}.{section}": set_path({}, field.split("."), value)}
        cases.append((f"runs.{RUN}.{key}={value!r}", change, [f"runs.{RUN}.{key}"]))
    cases += [(cid, content, needles) for cid, content, needles in TEXT_CASES]
    return cases


def test_fuzz_malformed_params_files_fail_cleanly_in_every_process(tmp_path):
    """≥ 50 malformed params.yaml files, each in a workspace as `dvc repro` runs the train stage
    (`python -m stages.train --run vaepp`, params.yaml in the working directory): each fails in
    one line naming params.yaml (and the key), exit 2, no traceback, nothing written."""
    cases = fuzz_cases()
    assert len(cases) >= 50
    times = []
    for i, (case_id, change, needles) in enumerate(cases):
        work = tmp_path / f"case{i}"
        work.mkdir()
        target = work / "params.yaml"
        if case_id == "directory":
            target.mkdir()
        elif case_id == "dangling-symlink":
            target.symlink_to(work / "nowhere.yaml")
        else:
            write_bad(target, change)
        start = time.monotonic()
        proc = subprocess.run(train_cmd(), cwd=work, env=env(), capture_output=True, text=True, timeout=120)
        times.append(time.monotonic() - start)
        try:
            assert_clean_failure(proc, "params.yaml", *needles)
        except AssertionError as err:
            raise AssertionError(f"case {case_id}: {err}") from None
        assert [p.name for p in work.iterdir()] == ["params.yaml"], case_id
    times.sort()
    print(f"{len(cases)} malformed params files: median {times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s")
    assert times[-1] < 30


SIZES_THAT_DO_NOT_FIT = [  # (id, data.* of the tiny profile, needles); the workspace: 576 training, 64 test images
    ("n-valid-all", {"n_valid": 576}, ["data.n_valid = 576", "576 prepared training images", "n_valid < 576"]),
    ("n-test-over", {"n_test": 65}, ["data.n_test = 65", "64 test images", "null for all"]),
    ("n-train-over", {"n_train": 513}, ["data.n_train = 513", "512 images", "n_valid 64", "n_train <= 512"]),
]


@pytest.mark.parametrize(
    ("name", "case"),
    [pytest.param("train", c, id=f"{c[0]}-train") for c in SIZES_THAT_DO_NOT_FIT]
    + [
        pytest.param(name, SIZES_THAT_DO_NOT_FIT[1], id=f"n-test-over-{name}", marks=pytest.mark.slow)
        for name in ("fit-latent-gan", "estimate-nll", "compute-fid")
    ],
)
def test_split_sizes_that_do_not_fit_the_data_fail_in_one_line_before_any_work(tmp_path, name, case):
    """Valid params whose data.n_train / n_valid / n_test do not fit the prepared dataset: every
    stage that reads the data stops in one line naming the key, its value, the dataset's size and
    the remedy, exit 2, before any model is read or fitted and with nothing written."""
    case_id, data, needles = case
    raw = copy.deepcopy(TINY)
    raw["data"].update(data)
    work = workspace(tmp_path / case_id, raw)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    start = time.monotonic()
    proc = subprocess.run(stage_cmd(name), cwd=work, env=env(), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert_clean_failure(proc, *needles)
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
    assert seconds < 30, f"{seconds:.1f} s to report sizes that do not fit"


@pytest.mark.slow  # `dvc exp run` in a copy of the repository
def test_dvc_exp_run_with_bad_param_fails_in_the_first_stage(tmp_path):
    """`dvc exp run -S model.zdim=-3`: DVC writes the value into params.yaml and the first stage
    to run (train) reports it in one line; DVC fails the experiment. No traceback."""
    repo = tmp_path / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith("tests/"):
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    workspace(repo)  # params.yaml and data/ (ignored by git, as in a real checkout)
    e = env(
        PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=repo, env=e, check=True, capture_output=True)
    start = time.monotonic()
    proc = subprocess.run(
        [str(Path(PY).parent / "dvc"), "exp", "run", "-s", "-S", "model.zdim=-3", f"train@{RUN}"],
        cwd=repo,
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - start
    both = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in both, both
    lines = [line for line in both.splitlines() if line.startswith("error: ")]
    assert lines == ["error: params.yaml: model.zdim = -3: Input should be greater than 0"], both
    assert "exited with 2" in both
    print(f"dvc exp run -S model.zdim=-3: failed in {seconds:.1f} s")


@pytest.mark.parametrize("script", ["train.py", "estimate_nll.py", "report.py"])
def test_stage_under_a_python_without_the_packages_fails_in_one_line(tmp_path, script):
    """DVC runs `python -m stages...` with whatever `python` is first on PATH. Started by a Python
    that lacks the project's packages (here: this one with site-packages switched off), a stage
    says so in one line, with the remedy, before anything else."""
    proc = subprocess.run(
        [
            PY,
            "-S",
            "-m",
            f"stages.{script.removesuffix('.py')}",
            *stage_argv(script.removesuffix(".py").replace("_", "-"), RUN),
        ],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = assert_clean_failure(proc, "has no torch", "source .venv/bin/activate")
    assert PY in line
