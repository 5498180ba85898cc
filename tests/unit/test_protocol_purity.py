"""protocol/ must stay pure: no clock, no randomness, no I/O, no concurrency primitives."""

from __future__ import annotations

import ast
from pathlib import Path

import protocol

FORBIDDEN_MODULES = {
    "asyncio", "socket", "time", "random", "os", "select", "selectors", "threading", "subprocess",
    "multiprocessing", "io", "pathlib", "shutil", "tempfile", "sqlite3", "logging", "signal", "ssl",
    "http", "urllib", "aiohttp", "uvloop", "structlog", "datetime", "secrets", "sys", "builtins",
}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval", "__import__"}
PACKAGE_DIRECTORY = Path(protocol.__file__).parent


def imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_package_has_sources() -> None:
    names = {path.name for path in PACKAGE_DIRECTORY.glob("*.py")}
    assert {"replica.py", "codec.py", "messages.py"} <= names


def test_no_forbidden_imports() -> None:
    offenders = {}
    for path in sorted(PACKAGE_DIRECTORY.glob("*.py")):
        bad = imported_roots(ast.parse(path.read_text(), str(path))) & FORBIDDEN_MODULES
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_no_io_builtins_or_dynamic_imports() -> None:
    offenders = []
    for path in sorted(PACKAGE_DIRECTORY.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
                offenders.append(f"{path.name}:{node.lineno} {node.func.id}()")
            if isinstance(node, ast.Attribute) and node.attr == "import_module":
                offenders.append(f"{path.name}:{node.lineno} import_module")
    assert offenders == []


def test_the_check_itself_detects_a_forbidden_import() -> None:
    assert imported_roots(ast.parse("import os.path\nfrom time import monotonic\n")) == {"os", "time"}
