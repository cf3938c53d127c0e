"""Each DVC stage's Python dependencies, computed from its imports: print them, check them, or write
them into dvc.yaml.

A stage runs `python -m stages.<name>`; the project code it runs is that module and every module of
the project's packages (PACKAGES) it imports, directly or through other project modules: absolute
and relative imports, at module level or inside functions (the stages import the library inside
their functions, after `boot()`), and the `__init__.py` of every package on the way (Python runs
it before the module). Imports of anything else (torch, the standard library) are not followed.
So a stage's `.py` deps in dvc.yaml should be exactly this closure: one missing and DVC would not
rerun the stage when that module changes; one extra and it would rerun for nothing.
tests/test_dvc_deps.py checks that they are.

    python scripts/dvc_deps.py            # each stage's expected .py deps, and what differs
    python scripts/dvc_deps.py --check    # the same; exit status 1 if any stage differs
    python scripts/dvc_deps.py --write    # rewrite the .py deps in dvc.yaml (`make dvc-deps`)

`--write` edits dvc.yaml as text: in each stage's `deps:` list the plain `.py` entries are replaced
by the closure (the stage's module first, then sorted by path), followed by the list's other lines
as they were: comments, data and model paths (`data`, `models/${key}/vae.pt`). Everything
else in the file (comments, `foreach`/`do`, params, outputs) is left as it is.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "vaepp", "tracking", "acquire")


def module_file(root: Path, name: str) -> Path | None:
    """The file Python runs for the project module `name` ("vaepp.data" → vaepp/data.py, a package
    → its __init__.py), relative to root; None for a module outside PACKAGES or not found (e.g. a
    name imported from a module, `from vaepp.files import flat`)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES or not all(parts):
        return None
    base = Path(*parts)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if (root / candidate).is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    """The dotted name of the module in `path` (relative to the repository root)."""
    parts = list(path.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _with_parents(name: str) -> list[str]:
    """The module and the packages above it, outermost first ("a.b.c" → ["a", "a.b", "a.b.c"]):
    importing a module runs every package's __init__.py on the way."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def imported_names(root: Path, path: Path) -> set[str]:
    """Every module name the source of `path` may import: each `import a.b` (a, a.b), each
    `from a.b import c` (a, a.b and a.b.c, which is kept later only if it is a module), with
    relative imports resolved against the module's package; anywhere in the file, function bodies
    included."""
    tree = ast.parse((root / path).read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.update(_with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, node.module] if node.module else up)
            else:
                base = node.module or ""
            if not base:
                continue
            names.update(_with_parents(base))
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def closure(root: Path, start: Path) -> list[Path]:
    """The project files `start` runs (itself included), through project imports and the
    packages' __init__.py files; `start` first, then sorted by path."""
    first = [module_file(root, name) for name in _with_parents(module_name(start))]
    todo = [start, *(f for f in first if f is not None)]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(root, path):
            found = module_file(root, name)
            if found is not None and found not in seen:
                todo.append(found)
    return [start, *sorted(seen - {start}, key=lambda p: p.as_posix())]


def stage_specs(dvc_yaml: dict) -> dict[str, dict]:
    """{stage name: its definition} (a foreach stage's `do`)."""
    return {name: spec.get("do", spec) for name, spec in dvc_yaml["stages"].items()}


def stage_start(cmd: str) -> Path:
    """The file of the module a stage's command runs: `python -m stages.train ...` → stages/train.py."""
    words = shlex.split(cmd)
    if "-m" not in words:
        raise ValueError(f"stage command is not `python -m <module> ...`: {cmd!r}")
    return Path(*words[words.index("-m") + 1].split(".")).with_suffix(".py")


def expected_deps(root: Path = ROOT) -> dict[str, list[str]]:
    """{stage: the .py files its deps should list, in the order --write writes them}."""
    import yaml

    specs = stage_specs(yaml.safe_load((root / "dvc.yaml").read_text()))
    return {name: [p.as_posix() for p in closure(root, stage_start(spec["cmd"]))] for name, spec in specs.items()}


def declared_deps(root: Path = ROOT) -> dict[str, list[str]]:
    """{stage: the .py files its deps list now, in dvc.yaml's order}."""
    import yaml

    specs = stage_specs(yaml.safe_load((root / "dvc.yaml").read_text()))
    return {
        name: [d for d in spec.get("deps", []) if isinstance(d, str) and d.endswith(".py")]
        for name, spec in specs.items()
    }


def differences(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """{stage: {"missing": [...], "extra": [...]}} for each stage whose .py deps are not its
    closure (as sets: the order in dvc.yaml does not matter)."""
    want, have = expected_deps(root), declared_deps(root)
    out = {}
    for name in want:
        missing = sorted(set(want[name]) - set(have.get(name, [])))
        extra = sorted(set(have.get(name, [])) - set(want[name]))
        if missing or extra:
            out[name] = {"missing": missing, "extra": extra}
    return out


_STAGE = re.compile(r"^  (?P<name>[^\s#][^:]*):\s*(#.*)?$")
_DEPS = re.compile(r"^(?P<indent>\s+)deps:\s*(#.*)?$")
_ITEM = re.compile(r"^(?P<indent>\s*)- (?P<value>[^#]*?)\s*(#.*)?$")


def rewrite(text: str, deps: dict[str, list[str]]) -> str:
    """dvc.yaml's `text` with each stage's plain `.py` deps replaced by `deps[stage]`, followed by
    the other lines of its deps list as they were; any other line unchanged."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    in_stages, stage, i = False, None, 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"^\S", line) and not line.startswith("#"):
            in_stages, stage = line.startswith("stages:"), None
        elif in_stages and (m := _STAGE.match(line)):
            stage = m["name"].strip()
        m = _DEPS.match(line)
        if not (in_stages and stage in deps and m):
            out.append(line)
            i += 1
            continue
        out.append(line)
        depth = len(m["indent"])
        block, item_indent = [], None
        i += 1
        while i < len(lines):
            nxt = lines[i]
            stripped, indent = nxt.strip(), len(nxt) - len(nxt.lstrip())
            if stripped and (indent < depth or (indent == depth and not stripped.startswith("- "))):
                break
            block.append(nxt)
            if item_indent is None and (it := _ITEM.match(nxt)):
                item_indent = it["indent"]
            i += 1
        item_indent = item_indent if item_indent is not None else " " * (depth + 2)
        kept = [
            b
            for b in block
            if not ((it := _ITEM.match(b)) and it["indent"] == item_indent and it["value"].endswith(".py"))
        ]
        trailing = []  # blank lines that end the block stay after it
        while kept and not kept[-1].strip():
            trailing.insert(0, kept.pop())
        out.extend(f"{item_indent}- {path}\n" for path in deps[stage])
        out.extend(kept)
        out.extend(trailing)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit status 1 if a stage's .py deps are not its closure")
    mode.add_argument("--write", action="store_true", help="rewrite the .py deps of every stage in dvc.yaml")
    p.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = p.parse_args(argv)
    root = args.root.resolve()
    want = expected_deps(root)
    if args.write:
        path = root / "dvc.yaml"
        text = path.read_text()
        new = rewrite(text, want)
        if new != text:
            path.write_text(new)
        left = differences(root)
        print(f"dvc.yaml: .py deps of {len(want)} stages {'rewritten' if new != text else 'already right'}")
        if left:
            print(f"still differing (not plain list entries?): {left}", file=sys.stderr)
            return 1
        return 0
    diff = differences(root)
    for name, files in want.items():
        print(f"{name}:")
        for f in files:
            print(f"  - {f}")
        for kind in ("missing", "extra"):
            if diff.get(name, {}).get(kind):
                print(f"  # {kind} in dvc.yaml: {', '.join(diff[name][kind])}")
    if diff:
        print(f"{len(diff)} stage(s) differ from their imports: `python scripts/dvc_deps.py --write` fixes them")
    return 1 if diff and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
