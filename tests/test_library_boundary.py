"""The library's boundary: no module of `vaepp/` (subpackages included) imports a module that runs
programs, opens connections or talks to MLflow, or reads the process environment. That is the
edge code's (`acquire/`, the stages); the library takes every path and setting as an argument.

Every module file is parsed (not imported) with `ast`, so a violation anywhere in it counts,
inside functions too; the modules are found when the tests are collected."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "vaepp"

# Top-level modules the library must not import (any submodule: urllib.request, http.client, ...).
FORBIDDEN_MODULES = frozenset({"subprocess", "urllib", "socket", "requests", "http", "mlflow"})
# Names of the os module that read or change the process environment.
ENVIRONMENT = frozenset({"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"})
DYNAMIC_IMPORTS = frozenset({"__import__", "import_module"})


def library_modules() -> list[Path]:
    """Every .py file under vaepp/, recursively, sorted."""
    return sorted(LIBRARY.rglob("*.py"))


def _top(module: str) -> str:
    return module.split(".")[0]


def _os_names(tree: ast.AST) -> set[str]:
    """Names bound to the os module anywhere in `tree` (`import os`, `import os as x`), plus "os"."""
    names = {"os"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name == "os"}
    return names


def _call_violation(node: ast.Call, os_names: set[str]) -> str | None:
    """A dynamic import of a forbidden module by literal name (`__import__("socket")`,
    `importlib.import_module("urllib.request")`) or `getattr(os, "environ")`; else None."""
    func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
    args = [a.value if isinstance(a, ast.Constant) else a for a in node.args]
    if func in DYNAMIC_IMPORTS and args and isinstance(args[0], str) and _top(args[0]) in FORBIDDEN_MODULES:
        return f"imports {args[0]} ({func})"
    if func == "getattr" and len(args) >= 2 and isinstance(args[0], ast.Name) and args[0].id in os_names:
        if args[1] in ENVIRONMENT:
            return f"reads the environment (getattr({args[0].id}, {args[1]!r}))"
    return None


def boundary_violations(source: str, filename: str = "<source>") -> list[str]:
    """One "<filename>:<line>: <what>" per violation in `source`, in line order: an import of a
    FORBIDDEN_MODULES module or submodule (static, or `__import__` / `importlib.import_module`
    with a literal name), and a read or change of the environment (`os.environ`, `os.getenv`,
    `os.putenv`, `os.unsetenv`, the same through an alias of os or `getattr`, and
    `from os import environ / getenv / ... / *`). Relative imports name the library's own
    modules and are allowed."""
    tree = ast.parse(source, filename)
    os_names = _os_names(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"imports {a.name}") for a in node.names if _top(a.name) in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _top(node.module) in FORBIDDEN_MODULES:
                found.append((node.lineno, f"imports {', '.join(a.name for a in node.names)} from {node.module}"))
            elif node.module == "os":
                bad = [a.name for a in node.names if a.name in ENVIRONMENT or a.name == "*"]
                found += [(node.lineno, f"imports os.{name} (the environment)") for name in bad]
        elif isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT:
            if isinstance(node.value, ast.Name) and node.value.id in os_names:
                found.append((node.lineno, f"reads the environment ({node.value.id}.{node.attr})"))
        elif isinstance(node, ast.Call) and (what := _call_violation(node, os_names)):
            found.append((node.lineno, what))
    return [f"{filename}:{line}: {what}" for line, what in sorted(found)]


# --------------------------------------------------------------------------- the library


def test_every_library_module_is_checked():
    """The glob finds the library's modules (an empty parameter set would check nothing)."""
    modules = library_modules()
    assert LIBRARY / "__init__.py" in modules and LIBRARY / "data.py" in modules, modules


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_library_module_stays_inside_the_boundary(path):
    """No import of subprocess, urllib, socket, requests, http or mlflow and no access to the
    environment in this module; the message names the module, the line and what it imports."""
    found = boundary_violations(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    assert not found, (
        "the library reaches the outside world (move this into acquire/ or the stages, and pass "
        "the result in as an argument):\n" + "\n".join(found)
    )


# --------------------------------------------------------------------------- the checker itself

BAD = [
    ("import subprocess\n", "imports subprocess"),
    ("import urllib.request as ur\n", "imports urllib.request"),
    ("from urllib.error import URLError\n", "imports URLError from urllib.error"),
    ("def f():\n    import socket\n", "imports socket"),
    ("import requests\n", "imports requests"),
    ("from http import client\n", "imports client from http"),
    ("import mlflow.tracking\n", "imports mlflow.tracking"),
    ("import os\nx = os.environ['HOME']\n", "reads the environment (os.environ)"),
    ("import os\nx = os.getenv('HOME')\n", "reads the environment (os.getenv)"),
    ("import os\nos.putenv('A', '1')\n", "reads the environment (os.putenv)"),
    ("import os\nos.unsetenv('A')\n", "reads the environment (os.unsetenv)"),
    ("import os as _os\nx = _os.environ.get('A')\n", "reads the environment (_os.environ)"),
    ("from os import environ\n", "imports os.environ (the environment)"),
    ("from os import path, getenv\n", "imports os.getenv (the environment)"),
    ("import os\nx = getattr(os, 'environ')\n", "reads the environment (getattr(os, 'environ'))"),
    ("x = __import__('subprocess')\n", "imports subprocess (__import__)"),
    ("import importlib\nm = importlib.import_module('http.client')\n", "imports http.client (import_module)"),
]


@pytest.mark.parametrize("snippet,what", BAD, ids=[what for _, what in BAD])
def test_checker_catches_a_bad_snippet(snippet, what):
    """Each forbidden import or environment access is reported with the file, its line and what it does."""
    line = snippet.rstrip("\n").count("\n") + 1  # the violation is on the snippet's last line
    assert boundary_violations(snippet, "vaepp/bad.py") == [f"vaepp/bad.py:{line}: {what}"]


def test_checker_passes_clean_code():
    """The library's everyday imports are not violations: os.path, relative modules whose names
    look like forbidden ones, attributes named like the environment on other objects."""
    clean = (
        "import os\n"
        "from os import path\n"
        "from . import socket_free, http_free\n"
        "from .files import atomic_write_json\n"
        "import json, httpx_like\n"
        "x = os.path.join('a', 'b')\n"
        "y = config.environ\n"
        "z = getattr(config, 'getenv', None)\n"
    )
    assert boundary_violations(clean) == []
