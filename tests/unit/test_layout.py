"""The package's layers (docs/architecture.md, "The core process"): which subpackage may import which.

Imports are read from the source with ``ast``, wherever they stand (module level
or inside a function), so a late import cannot slip past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tokenvault"
# subpackage -> the tokenvault subpackages and modules it must never import
FORBIDDEN = {
    "core": ("tokenvault.api", "tokenvault.serve", "tokenvault.devcluster", "tokenvault.cli", "tokenvault.client"),
    "api": ("tokenvault.serve", "tokenvault.devcluster", "tokenvault.cli", "tokenvault.client"),
    "crypto": ("tokenvault.core", "tokenvault.api", "tokenvault.serve", "tokenvault.devcluster", "tokenvault.cli",
               "tokenvault.client"),
    # The client library users import: HTTP and TLS only, nothing of a node.
    "client": ("tokenvault.api", "tokenvault.core", "tokenvault.serve", "tokenvault.devcluster", "tokenvault.cli"),
    # The dev cluster tool starts nodes as processes (python -m tokenvault.cli serve), never in its own.
    "devcluster": ("tokenvault.api", "tokenvault.serve", "tokenvault.cli"),
}

def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("subpackage", sorted(FORBIDDEN))
def test_a_layer_never_imports_the_layers_above_it(subpackage: str) -> None:
    offences = []
    for path in sorted((PACKAGE / subpackage).glob("*.py")):
        for module in imported_modules(path):
            if any(module == banned or module.startswith(banned + ".") for banned in FORBIDDEN[subpackage]):
                offences.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    # The `tokenvault` command (tokenvault.cli) stands above them all: `serve` starts a node through
    # tokenvault.serve, `admin restore` fills a data directory with the core's code.
    assert offences == [], "\n".join(offences)


def test_the_layer_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "late.py"
    source.write_text("def f():\n    from tokenvault.api.http import create_app\n")
    assert "tokenvault.api.http" in imported_modules(source)


def package_imports(path: Path) -> set[str]:
    """The tokenvault modules ``path`` imports: at module level, inside a function or under ``if
    TYPE_CHECKING:`` (a module that names another's type for the checker depends on it all the same)."""
    return {name for name in imported_modules(path) if name.startswith("tokenvault")}


def test_no_module_of_the_package_imports_itself_through_others() -> None:
    """No import circles between the package's modules, not even through imports for the type checker
    alone (issue 10: a layout that shows the architecture). Where a module needs what its caller is, it
    says so with a Protocol of its own (http_lifecycle.Application, demo_lifecycle.Demo,
    custody.Pkcs11Source)."""
    modules = {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): path
               for path in PACKAGE.rglob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in modules.items()}
    graph = {name: {imported for imported in package_imports(path) if imported in modules and imported != name}
             for name, path in modules.items()}
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for imported in sorted(graph[name]):
            if state.get(imported) == 1:
                circles.append(" -> ".join(path[path.index(imported):] + [imported]))
            elif imported not in state:
                visit(imported, path + [imported])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == [], "\n".join(circles)


def test_the_circle_check_counts_imports_for_the_type_checker_and_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "typed.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tokenvault.api.http import _Api\n"
                      "def f():\n    from tokenvault.api.http_lifecycle import add_lifecycle_routes\n")
    assert package_imports(source) == {"tokenvault.api.http", "tokenvault.api.http._Api",
                                       "tokenvault.api.http_lifecycle",
                                       "tokenvault.api.http_lifecycle.add_lifecycle_routes"}
