"""docs/logs.md lists every event the node logs, and only those: the event names are read from the code.

Every ``.py`` file under tokenvault/ and protocol/ is parsed with ``ast``; the events are the literal first
argument of each call of a logger method (``log.info("peer.up", ...)``, ``_log.exception(...)``) and the
event argument of each ``SummedEvent(logger, event, keys, ...)``, whose lines are logged under that name.
The doc's events are the backticked names in the first column of its tables. Set
``TOKENVAULT_LOG_REFERENCE_ROOT`` to check another tree (a scratch copy) instead of this one.
"""

from __future__ import annotations

import ast
import os
import re
from collections import Counter
from pathlib import Path

ROOT = Path(os.environ.get("TOKENVAULT_LOG_REFERENCE_ROOT") or Path(__file__).resolve().parents[2])
SOURCE_DIRECTORIES = ("tokenvault", "protocol")
REFERENCE = Path("docs") / "logs.md"
# The methods of a structlog bound logger that log an event (``msg`` is ``info``'s alias).
LOG_METHODS = frozenset({"debug", "info", "warning", "error", "critical", "exception", "msg"})
# Modules whose objects also have methods of those names but are not the node's structlog loggers: the
# standard library's ``logging`` (its records are bridged into the node log with the library's message as
# ``event``, not an event of this reference) and ``argparse`` (``parser.error("usage ...")``). Calls on a
# name imported from them, or bound to a call into them (``logger = logging.getLogger(...)``), are left
# out. None of the code calls them today; this keeps a future one from reading as an event.
NOT_STRUCTLOG_MODULES = frozenset({"logging", "argparse"})
# What an event name looks like: lower-case dotted words (``node.fatal``, ``store_reader.reopening``). A
# literal of another shape (a sentence) means the call collected is no logger, or an event misnamed.
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+\Z")
SUMMED_EVENT = "SummedEvent"
SUMMED_EVENT_NAME_POSITION = 1  # SummedEvent(logger, event, keys, interval_seconds=1.0, *, level, max_keys)


def _called_name(call: ast.Call) -> str | None:
    function = call.func
    if isinstance(function, ast.Attribute):
        return function.attr
    if isinstance(function, ast.Name):
        return function.id
    return None


def _root_name(expression: ast.expr) -> str | None:
    """``log`` for ``log``, ``self`` for ``self._log``, ``logging`` for ``logging.getLogger("x")``."""
    while True:
        if isinstance(expression, ast.Name):
            return expression.id
        if isinstance(expression, ast.Attribute):
            expression = expression.value
        elif isinstance(expression, ast.Call):
            expression = expression.func
        else:
            return None


def _names_from_other_loggers(tree: ast.Module) -> set[str]:
    """Names in this module that stand for ``logging`` or ``argparse`` or an object made by them."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.asname or alias.name for alias in node.names if alias.name in NOT_STRUCTLOG_MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module in NOT_STRUCTLOG_MODULES:
            names.update(alias.asname or alias.name for alias in node.names)
    for node in ast.walk(tree):  # after the imports: ``log = logging.getLogger(__name__)``
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call) \
                and _root_name(node.value) in names:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return names


def _string(expression: ast.expr | None) -> str | None:
    if isinstance(expression, ast.Constant) and isinstance(expression.value, str):
        return expression.value
    return None


def scan(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """(event name -> its call sites, call sites whose event name is not a literal) in ``root``'s code.

    A call of a bare name (``error("...")`` in store_layout.py, where ``error`` is an exception class passed
    in) is no logger method and is not read; nor is a method call without arguments (``future.exception()``).
    SummedEvent's own line (``getattr(self._logger, self._level)(self._event, ...)``) is its constructions'."""
    events: dict[str, list[str]] = {}
    dynamic: list[str] = []
    for directory in SOURCE_DIRECTORIES:
        for path in sorted((root / directory).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            other_loggers = _names_from_other_loggers(tree)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                site = f"{path.relative_to(root)}:{node.lineno}"
                name = _called_name(node)
                if name == SUMMED_EVENT:
                    argument = (node.args[SUMMED_EVENT_NAME_POSITION] if len(node.args) > SUMMED_EVENT_NAME_POSITION
                                else next((keyword.value for keyword in node.keywords if keyword.arg == "event"),
                                          None))
                elif (name in LOG_METHODS and isinstance(node.func, ast.Attribute) and node.args
                      and _root_name(node.func.value) not in other_loggers):
                    argument = node.args[0]
                else:
                    continue
                event = _string(argument)
                if event is None:
                    dynamic.append(site)
                else:
                    events.setdefault(event, []).append(site)
    return events, dynamic


def documented_events(root: Path) -> list[str]:
    """The event of each table row of docs/logs.md (the backticked name in its first column), in order."""
    events = []
    for line in (root / REFERENCE).read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        first_cell = line.strip().strip("|").split("|")[0].strip()
        if first_cell == "event" or set(first_cell) <= set("-: "):
            continue  # a table's header and its separator
        match = re.fullmatch(r"`([^`]+)`", first_cell)
        assert match, f"a row of {REFERENCE} whose first column is not one `event`: {line[:120]}"
        events.append(match.group(1))
    return events


def test_the_scan_reads_plain_summed_and_replica_events_and_every_event_name_is_a_literal() -> None:
    """The scan is not vacuous and nothing slips past it: an event name it cannot read (a variable, an
    f-string) or of another shape would be an event this reference cannot list."""
    events, dynamic = scan(ROOT)
    assert {"node.started", "http.unexpected_error", "token.issued", "peer.handshake_failed",
            "primary.elected", "membership.changed"} <= set(events)
    assert dynamic == [], f"event names the scan cannot read (make them literals): {dynamic}"
    misnamed = {event: sites for event, sites in events.items() if not EVENT_NAME.match(event)}
    assert misnamed == {}, f"not event names (a call that is no logger? exclude it in this test): {misnamed}"


def test_every_event_the_code_logs_is_in_docs_logs_md() -> None:
    events, _ = scan(ROOT)
    missing = {event: sites for event, sites in sorted(events.items())
               if event not in set(documented_events(ROOT))}
    assert missing == {}, f"logged but not in {REFERENCE}'s tables: {missing}"


def test_every_event_in_docs_logs_md_is_logged_by_the_code_and_has_one_row() -> None:
    events, _ = scan(ROOT)
    documented = documented_events(ROOT)
    assert sorted(set(documented) - set(events)) == [], f"in {REFERENCE} but logged nowhere in the code"
    assert [event for event, rows in Counter(documented).items() if rows > 1] == [], f"rows repeated in {REFERENCE}"
