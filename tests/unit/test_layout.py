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
    "core": ("tokenvault.api", "tokenvault.serve", "tokenvault.devcluster", "tokenvault.client.cli"),
    "api": ("tokenvault.serve", "tokenvault.devcluster", "tokenvault.client"),
    "crypto": ("tokenvault.core", "tokenvault.api", "tokenvault.serve", "tokenvault.devcluster",
               "tokenvault.client"),
    "client": ("tokenvault.api", "tokenvault.devcluster"),
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
    # The client's `tokenvault serve` command starts a node through tokenvault.serve, which is allowed.
    assert offences == [], "\n".join(offences)


def test_the_layer_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "late.py"
    source.write_text("def f():\n    from tokenvault.api.http import create_app\n")
    assert "tokenvault.api.http" in imported_modules(source)
