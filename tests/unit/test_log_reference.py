"""docs/logs.md lists every event the node logs, and only those: the event names are read from the code.

Every ``.py`` file under tokenvault/ and protocol/ is parsed with ``ast``; the events are the literal first
argument of each call of a logger method (``log.info("peer.up", ...)``, ``_log.exception(...)``) and the
event argument of each ``SummedEvent(logger, event, keys, ...)``, whose lines are logged under that name.
The doc's events are the backticked names in the first column of its tables; each row's level is its
second column and its fields the backticked names of its fourth outside parentheses, which the calls'
levels and keywords must match. Set
``TOKENVAULT_LOG_REFERENCE_ROOT`` to check another tree (a scratch copy) instead of this one.
"""

from __future__ import annotations

import ast
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from tokenvault.logs import is_sensitive_field

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


def _log_calls(root: Path) -> Iterator[tuple[ast.Module, str, str, ast.Call]]:
    """Each call in ``root``'s code that logs an event, as (its module, its site, the name it calls, the call):
    a SummedEvent's construction, or a logger method called with arguments on no name of ``logging`` or
    ``argparse``.

    A call of a bare name (``error("...")`` in store_layout.py, where ``error`` is an exception class passed
    in) is no logger method and is not read; nor is a method call without arguments (``future.exception()``).
    SummedEvent's own line (``getattr(self._logger, self._level)(self._event, ...)``) is its constructions'."""
    for directory in SOURCE_DIRECTORIES:
        for path in sorted((root / directory).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            other_loggers = _names_from_other_loggers(tree)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                name = _called_name(node)
                if name == SUMMED_EVENT or (name in LOG_METHODS and isinstance(node.func, ast.Attribute) and node.args
                                            and _root_name(node.func.value) not in other_loggers):
                    yield tree, f"{path.relative_to(root)}:{node.lineno}", name, node


def scan(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """(event name -> its call sites, call sites whose event name is not a literal) in ``root``'s code."""
    events: dict[str, list[str]] = {}
    dynamic: list[str] = []
    for _, site, name, node in _log_calls(root):
        if name == SUMMED_EVENT:
            argument = (node.args[SUMMED_EVENT_NAME_POSITION] if len(node.args) > SUMMED_EVENT_NAME_POSITION
                        else next((keyword.value for keyword in node.keywords if keyword.arg == "event"), None))
        else:
            argument = node.args[0]
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


# ---------------------------------------------------------------- each event's level and fields

# What a call logs besides its keywords: ``log.exception`` and an ``exc_info`` keyword become these two
# fields (logs.py, exception_without_message); a SummedEvent's line adds ``count`` to its key fields.
EXCEPTION_FIELDS = frozenset({"exception_type", "traceback"})
SUMMED_COUNT_FIELD = "count"
SUMMED_EVENT_KEYS_POSITION = 2
# The doc's level column for a call of ``log.exception``.
EXCEPTION_LEVEL = "error (`exception`)"
# Events whose fields the code builds at run time (a dict comprehension): the doc names them in words.
FIELDS_BUILT_AT_RUN_TIME = frozenset({"tls.reloaded"})


class Call(NamedTuple):
    site: str
    level: str  # as the doc's level column writes it
    fields: frozenset[str] | None  # None: built at run time, not readable here
    summed: bool


def _dict_literal_keys(tree: ast.Module, target: ast.expr) -> frozenset[str] | None:
    """The keys of the one dict literal assigned to ``target`` (``self._recovery = {...}``) in the module."""
    wanted = ast.unparse(target)
    found = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
             and any(ast.unparse(each) == wanted for each in node.targets)]
    if len(found) != 1 or not all(_string(key) for key in found[0].keys):
        return None
    return frozenset(_string(key) or "" for key in found[0].keys)


def _keyword_fields(tree: ast.Module, call: ast.Call) -> frozenset[str] | None:
    fields: set[str] = set()
    for keyword in call.keywords:
        if keyword.arg == "exc_info":
            fields |= EXCEPTION_FIELDS
        elif keyword.arg is not None:
            fields.add(keyword.arg)
        else:
            unpacked = _dict_literal_keys(tree, keyword.value)
            if unpacked is None:
                return None
            fields |= unpacked
    return frozenset(fields)


def scan_calls(root: Path) -> dict[str, list[Call]]:
    """Each event's call sites with the level and fields each logs (the events of ``scan``)."""
    calls: dict[str, list[Call]] = {}
    for tree, site, name, node in _log_calls(root):
        if name == SUMMED_EVENT:
            if len(node.args) <= SUMMED_EVENT_KEYS_POSITION:
                continue
            level = next((_string(keyword.value) for keyword in node.keywords if keyword.arg == "level"), "info")
            keys = node.args[SUMMED_EVENT_KEYS_POSITION]
            assert isinstance(keys, ast.Tuple), f"{site}: a SummedEvent's keys are a literal tuple"
            fields = frozenset(_string(key) or "" for key in keys.elts) | {SUMMED_COUNT_FIELD}
            event = _string(node.args[SUMMED_EVENT_NAME_POSITION])
            call = Call(site, level or "?", fields, True)
        else:
            fields_or_none = _keyword_fields(tree, node)
            if name == "exception":
                level = EXCEPTION_LEVEL
                fields_or_none = None if fields_or_none is None else fields_or_none | EXCEPTION_FIELDS
            else:
                level = "info" if name == "msg" else name
            event = _string(node.args[0])
            call = Call(site, level, fields_or_none, False)
        if event is not None:
            calls.setdefault(event, []).append(call)
    return calls


def _without_parentheses(text: str) -> str:
    """``text`` less every parenthesised part, nested ones included: the fields column's glosses."""
    kept, depth = [], 0
    for character in text:
        if character == "(":
            depth += 1
        elif character == ")":
            depth = max(0, depth - 1)
        elif depth == 0:
            kept.append(character)
    return "".join(kept)


class Row(NamedTuple):
    level: str
    when: str
    fields: frozenset[str]


def documented_rows(root: Path) -> dict[str, Row]:
    """Each row of docs/logs.md: its level, its "when" text and the fields its fields column names: the
    backticked names outside parentheses; "none" for no fields; "the fields of `other.event`" adds those
    of that event's row (written above it); a level of "error (`exception`)" adds EXCEPTION_FIELDS."""
    rows: dict[str, Row] = {}
    for line in (root / REFERENCE).read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == "event" or set(cells[0]) <= set("-: "):
            continue
        event, level, when, fields_text = cells[0].strip("`"), cells[1], cells[2], _without_parentheses(cells[3])
        fields: set[str] = set()
        for included in re.findall(r"the fields of `([^`]+)`", fields_text):
            fields |= rows[included].fields
        fields_text = re.sub(r"the fields of `[^`]+`", "", fields_text)
        fields |= set(re.findall(r"`([^`]+)`", fields_text))
        assert fields or fields_text.strip() == "none", f"{REFERENCE}, {event}: no field named and not 'none'"
        if level == EXCEPTION_LEVEL:
            fields |= EXCEPTION_FIELDS
        rows[event] = Row(level, when, frozenset(fields))
    return rows


def test_the_field_scan_reads_keywords_unpacked_dicts_exceptions_and_summed_keys() -> None:
    calls = scan_calls(ROOT)
    assert {call.fields for call in calls["node.started"]} == {
        frozenset({"members", "http_port", "peer_port", "applied_index", "view"})}
    assert {call.fields for call in calls["node.replayed"]} == {frozenset(
        {"wal_entries", "log_base_index", "store_applied_index", "commit_index", "truncated_tail_bytes", "view"})}
    assert {call.fields for call in calls["loop.exception"]} == {frozenset({"involved"}) | EXCEPTION_FIELDS}
    assert {(call.level, call.fields) for call in calls["http.unexpected_error"]} == {
        (EXCEPTION_LEVEL, frozenset({"route", "method"}) | EXCEPTION_FIELDS)}
    assert {(call.level, call.fields, call.summed) for call in calls["token.issued"]} == {
        ("info", frozenset({"epoch", "count"}), True)}
    rows = documented_rows(ROOT)
    assert rows["node.recovered"].fields >= rows["node.replayed"].fields | {"caught_up_index", "seconds"}
    assert rows["node.stopped"].fields == frozenset()
    assert rows["peer.down"].fields == {"peer", "reason"}  # `closed`, `silent`, ... are its values, in parentheses


def test_each_event_is_logged_at_the_level_docs_logs_md_gives_it() -> None:
    rows = documented_rows(ROOT)
    wrong = {event: sorted({f"{call.site}: {call.level}" for call in calls})
             for event, calls in sorted(scan_calls(ROOT).items())
             if event in rows and {call.level for call in calls} != {rows[event].level}}
    assert wrong == {}, f"logged at another level than {REFERENCE}'s row says ({ {e: rows[e].level for e in wrong} })"


def test_each_event_carries_the_fields_docs_logs_md_lists_and_no_others() -> None:
    """The fields of all of an event's call sites together are its row's: a field the code adds or drops,
    or the doc names wrongly, fails. A summed event's row says it is summed."""
    rows = documented_rows(ROOT)
    calls = scan_calls(ROOT)
    unread = sorted(event for event, sites in calls.items() if any(call.fields is None for call in sites))
    assert unread == sorted(FIELDS_BUILT_AT_RUN_TIME), "fields this test cannot read: list them in words and here"
    wrong = {}
    for event, sites in sorted(calls.items()):
        if event not in rows or event in FIELDS_BUILT_AT_RUN_TIME:
            continue
        logged = frozenset().union(*(call.fields or frozenset() for call in sites))
        if logged != rows[event].fields:
            wrong[event] = {"logged only": sorted(logged - rows[event].fields),
                            "listed only": sorted(rows[event].fields - logged)}
    assert wrong == {}, f"fields that differ between the code and {REFERENCE}"
    not_said = sorted(event for event, sites in calls.items()
                      if any(call.summed for call in sites) and "summed" not in rows[event].when.lower())
    assert not_said == [], f"summed events whose row in {REFERENCE} does not say so"


def test_no_event_passes_a_field_the_log_would_drop_as_sensitive() -> None:
    """docs/logs.md: "no call below passes one" (a field named like a value or key)."""
    sensitive = {event: sorted(name for name in call.fields if is_sensitive_field(name))
                 for event, sites in scan_calls(ROOT).items() for call in sites
                 if call.fields is not None and any(is_sensitive_field(name) for name in call.fields)}
    assert sensitive == {}
