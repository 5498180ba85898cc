"""The docs name the tests that show each guarantee; a test renamed or removed must not leave a name
behind that no longer runs. Every file of the project a document names (``tests/...py``,
``bench/...``, ``tokenvault/...``, ``protocol/...``) exists, and every test it names exists in its
file: ``tests/unit/test_x.py::test_name``, ``test_x.py::test_name`` without its folder (the one file of
that name under tests/), ``::test_name`` alone for one more test of the file the document named last
before it, or a test's name alone in backquotes (```test_name```), defined in some test file under tests/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md", ROOT / "bench" / "README.md"]

# A project file, perhaps with a test or class after "::"; a test file without its folder, with a test after
# "::"; or "::name" on its own.
_REFERENCE = re.compile(r"\b((?:tests|bench|tokenvault|protocol)/[\w/]+\.(?:py|sh))(?:::(\w+))?"
                        r"|(?<![\w/.])(test_\w+\.py)::(\w+)|(?<![\w/])::(\w+)|`(test_\w+)`")


def stale_references(text: str, root: Path) -> list[str]:
    """What ``text`` names that ``root`` does not hold, one line each."""
    stale: list[str] = []
    current: Path | None = None
    definitions: dict[Path, str] = {}
    test_files: dict[str, list[Path]] | None = None  # file name -> its paths under tests/, read once

    def defines(path: Path, name: str) -> bool:
        if path not in definitions:
            definitions[path] = path.read_text(encoding="utf-8")
        return re.search(rf"^\s*(?:async\s+def|def|class)\s+{re.escape(name)}\b", definitions[path],
                         re.MULTILINE) is not None

    defined_anywhere: set[str] | None = None  # every test name under tests/, read once

    for match in _REFERENCE.finditer(text):
        named, name, bare, bare_name, short, alone = match.groups()
        if alone is not None:
            if defined_anywhere is None:
                defined_anywhere = {found for path in (root / "tests").rglob("*.py")
                                    for found in re.findall(r"^\s*(?:async\s+def|def)\s+(test_\w+)",
                                                            path.read_text(encoding="utf-8"), re.MULTILINE)}
            if alone not in defined_anywhere:
                stale.append(f"{alone}: no test of that name under tests/")
            continue
        if bare is not None:
            if test_files is None:
                test_files = {}
                for path in (root / "tests").rglob("test_*.py"):
                    test_files.setdefault(path.name, []).append(path)
            found = test_files.get(bare, [])
            if len(found) != 1:
                stale.append(f"{bare}: {len(found)} files of that name under tests/, not one")
                current = None
                continue
            named, name = str(found[0].relative_to(root)), bare_name
        if named is not None:
            path = root / named
            if not path.is_file():
                stale.append(f"{named}: no such file")
                current = None
                continue
            current = path if named.startswith("tests/") else None
            if name is not None and not defines(path, name):
                stale.append(f"{named}::{name}: not defined there")
        elif current is None:
            stale.append(f"::{short}: no test file named before it")
        elif not defines(current, short):
            stale.append(f"{current.relative_to(root)}::{short}: not defined there")
    return stale


def test_every_test_and_file_the_docs_name_exists() -> None:
    stale = [f"{document.relative_to(ROOT)}: {line}"
             for document in DOCUMENTS for line in stale_references(document.read_text(encoding="utf-8"), ROOT)]
    assert stale == []


def test_the_check_sees_a_renamed_test_a_missing_file_and_a_short_name_of_the_wrong_file(tmp_path: Path) -> None:
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    (tmp_path / "tests" / "unit" / "test_a.py").write_text("def test_here():\n    pass\n\n\n"
                                                            "async def test_async_here():\n    pass\n")
    (tmp_path / "tests" / "unit" / "test_b.py").write_text("class TestGroup:\n    def test_inner(self):\n"
                                                            "        pass\n")
    text = ("`tests/unit/test_a.py::test_here`, `::test_async_here`, `::test_gone`; "
            "`tests/unit/test_b.py::TestGroup`, `::test_inner`, `::test_here`; "
            "`tests/unit/test_c.py`; `bench/nothing.py`; `::test_after_a_missing_file`; "
            "`test_a.py::test_here`, `::test_gone_too`; `test_b.py::test_missing`; `test_d.py::test_x`; "
            "`test_async_here` and `test_nowhere` alone")
    assert stale_references(text, tmp_path) == [
        "tests/unit/test_a.py::test_gone: not defined there",
        "tests/unit/test_b.py::test_here: not defined there",
        "tests/unit/test_c.py: no such file",
        "bench/nothing.py: no such file",
        "::test_after_a_missing_file: no test file named before it",
        "tests/unit/test_a.py::test_gone_too: not defined there",
        "tests/unit/test_b.py::test_missing: not defined there",
        "test_d.py: 0 files of that name under tests/, not one",
        "test_nowhere: no test of that name under tests/",
    ]
