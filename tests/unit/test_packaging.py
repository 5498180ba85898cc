"""What an installed package holds: every module of the source tree, not only those a list names.

`./run_tests.sh` installs the project in editable mode, which maps whole folders, so a package that
``pip install .`` or a wheel would leave out still imports in every other test. This one builds the
modules as an installation copies them (setuptools' build_py, from pyproject.toml) and compares."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
PACKAGES = ("tokenvault", "protocol")


def modules_under(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for package in PACKAGES for path in (root / package).rglob("*.py")
            if "__pycache__" not in path.parts}


def test_an_installation_holds_every_module_of_the_package(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPOSITORY / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = tmp_path / "built"
    subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py", "-d", str(built)],
                   cwd=source, check=True, capture_output=True, timeout=120)
    expected = modules_under(source)
    assert "tokenvault/cli/main.py" in expected  # the command's own module
    missing = sorted(expected - modules_under(built))
    assert not missing, f"an installation would lack {missing}"
