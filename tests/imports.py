"""What a module's source imports and which attributes it reads, for tests that a math module
stays away from the outside world; and a script of scripts/ loaded as a module."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (scripts/ is no package), without adding a path to sys.path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imports_and_attributes(module: ModuleType) -> tuple[set[str], set[str]]:
    """(top-level names of absolute imports and ".name" of relative ones, every attribute name
    read anywhere in the source)."""
    tree = ast.parse(open(module.__file__).read())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0] if node.level == 0 else f".{node.module}")
    return imported, {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
