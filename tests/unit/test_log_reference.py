"""docs/logs.md lists every event the node logs, and only those: the event names are read from the code.

Every ``.py`` file under tokenvault/ and protocol/ is parsed with ``ast``; the events are the literal first
argument of each call of a logger method (``log.info("peer.up", ...)``, ``_log.exception(...)``) and the
event argument of each ``SummedEvent(logger, event, keys, ...)``, whose lines are logged under that name.
The doc's events are the backticked names in the first column of its tables; each row's level is its
second column and its fields the backticked names of its fourth outside parentheses, which the calls'
levels and keywords must match. What the calls cannot show fails too unless listed as an exception here
(FIELDS_BUILT_AT_RUN_TIME): fields built at run time, fields or a level a call would add out of this scan's
sight; and the fields the log itself adds to every line are checked against the doc's "Format" paragraph
on a line logged for real. Set
``TOKENVAULT_LOG_REFERENCE_ROOT`` to check another tree (a scratch copy) instead of this one.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from tokenvault.logs import configure_logging, get_logger, is_sensitive_field, reset_logging

ROOT = Path(os.environ.get("TOKENVAULT_LOG_REFERENCE_ROOT") or Path(__file__).resolve().parents[2])
SOURCE_DIRECTORIES = ("tokenvault", "protocol")
REFERENCE = Path("docs") / "logs.md"
# The doc's level column for a call of ``log.exception``.
EXCEPTION_LEVEL = "error (`exception`)"
# The methods of a structlog bound logger that log an event, with the level the doc's column gives each:
# ``msg`` is ``info``'s alias, ``warn`` and ``fatal`` are ``warning``'s and ``critical``'s, and each has an
# ``a``-prefixed async form (``ainfo``). ``log(level, event)`` takes its level as an argument: see
# UNREAD_LOGGER_METHODS below.
_LEVELS_OF_METHODS = {"debug": "debug", "info": "info", "msg": "info", "warning": "warning", "warn": "warning",
                      "error": "error", "critical": "critical", "fatal": "critical", "exception": EXCEPTION_LEVEL}
METHOD_LEVELS = {**_LEVELS_OF_METHODS, **{f"a{method}": level for method, level in _LEVELS_OF_METHODS.items()}}
LOG_METHODS = frozenset(METHOD_LEVELS)
# Modules whose objects also have methods of those names but are not the node's structlog loggers: the
# standard library's ``logging`` (its records are bridged into the node log with the library's message as
# ``event``, not an event of this reference) and ``argparse`` (``parser.error("usage ...")``). Calls on a
# name imported from them, or bound to a call into them (``logger = logging.getLogger(...)``), are left
# out, as are ``warnings.warn("...")``'s. None of the code calls them today; this keeps a future one from
# reading as an event.
NOT_STRUCTLOG_MODULES = frozenset({"logging", "argparse", "warnings"})
# What an event name looks like: lower-case dotted words (``node.fatal``, ``store_reader.reopening``). A
# literal of another shape (a sentence) means the call collected is no logger, or an event misnamed.
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+\Z")
SUMMED_EVENT = "SummedEvent"
SUMMED_EVENT_NAME_POSITION = 1  # SummedEvent(logger, event, keys, interval_seconds=1.0, *, level, max_keys)
SUMMED_EVENT_KEYS_POSITION = 2


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


def _argument(call: ast.Call, position: int, keyword: str) -> ast.expr | None:
    """The argument ``call`` passes at ``position`` or as ``keyword=`` (``log.info(event="x")``)."""
    if len(call.args) > position:
        return call.args[position]
    return next((each.value for each in call.keywords if each.arg == keyword), None)


def _event_argument(name: str, call: ast.Call) -> ast.expr | None:
    """The expression a logger call or a SummedEvent construction passes as its event."""
    return _argument(call, SUMMED_EVENT_NAME_POSITION if name == SUMMED_EVENT else 0, "event")


def _modules(root: Path) -> Iterator[tuple[Path, ast.Module]]:
    """Each ``.py`` file under ``root``'s SOURCE_DIRECTORIES, parsed."""
    for directory in SOURCE_DIRECTORIES:
        for path in sorted((root / directory).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _log_calls(root: Path) -> Iterator[tuple[ast.Module, str, str, ast.Call]]:
    """Each call in ``root``'s code that logs an event, as (its module, its site, the name it calls, the call):
    a SummedEvent's construction, or a logger method called with an event (its first argument, or
    ``event=``) on no name of ``logging``, ``argparse`` or ``warnings``.

    A call of a bare name (``error("...")`` in store_layout.py, where ``error`` is an exception class passed
    in) is no logger method and is not read; nor is a method call without arguments (``future.exception()``).
    SummedEvent's own line (``getattr(self._logger, self._level)(self._event, ...)``) is its constructions'."""
    for path, tree in _modules(root):
        other_loggers = _names_from_other_loggers(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _called_name(node)
            if name == SUMMED_EVENT or (name in LOG_METHODS and isinstance(node.func, ast.Attribute)
                                        and _event_argument(name, node) is not None
                                        and _root_name(node.func.value) not in other_loggers):
                yield tree, f"{path.relative_to(root)}:{node.lineno}", name, node


def scan(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """(event name -> its call sites, call sites whose event name is not a literal) in ``root``'s code."""
    events: dict[str, list[str]] = {}
    dynamic: list[str] = []
    for _, site, name, node in _log_calls(root):
        event = _string(_event_argument(name, node))
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
# Events whose fields the code builds at run time, so that this test cannot read them: the doc names them
# in words. Each is an explicit exception, and test_each_event_carries_the_fields_docs_logs_md_lists_and_no_others
# fails when the calls this test cannot read are not exactly these.
FIELDS_BUILT_AT_RUN_TIME = frozenset({
    # node.py, Node.reload_tls: ``**{f"{name}_expires_at": ...}`` over what tls.reload_node_tls returns
    # (``node`` and ``ca`` today: the row names node_expires_at and ca_expires_at in its gloss).
    "tls.reloaded",
})
# What a dict unpacked into a call's fields (``**self._recovery``) must not be after its literal: changed in
# place, its keys would not be those this test reads from the literal.
DICT_MUTATING_METHODS = frozenset({"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__"})


class Call(NamedTuple):
    site: str
    level: str  # as the doc's level column writes it
    fields: frozenset[str] | None  # None: built at run time, not readable here
    summed: bool


def _dict_literal_keys(tree: ast.Module, target: ast.expr) -> frozenset[str] | None:
    """The keys of the one dict literal assigned to ``target`` (``self._recovery = {...}``) in the module;
    None (unread) when there is not exactly one, when it has a key that is no literal, or when the module
    changes the dict in place (``target[...] = ``, ``del target[...]``, ``target |= ``, ``target.update(...)``)."""
    wanted = ast.unparse(target)
    found = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
             and any(ast.unparse(each) == wanted for each in node.targets)]
    if len(found) != 1 or not all(_string(key) for key in found[0].keys):
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del))
                and ast.unparse(node.value) == wanted
                or isinstance(node, ast.AugAssign) and ast.unparse(node.target) == wanted
                or isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in DICT_MUTATING_METHODS and ast.unparse(node.func.value) == wanted):
            return None
    return frozenset(_string(key) or "" for key in found[0].keys)


def _keyword_fields(tree: ast.Module, call: ast.Call) -> frozenset[str] | None:
    fields: set[str] = set()
    for keyword in call.keywords:
        if keyword.arg == "event":
            continue  # the event itself, passed by name
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
        event = _string(_event_argument(name, node))
        if name == SUMMED_EVENT:
            level = next((_string(keyword.value) for keyword in node.keywords if keyword.arg == "level"), "info")
            keys = _argument(node, SUMMED_EVENT_KEYS_POSITION, "keys")
            assert isinstance(keys, ast.Tuple) and all(_string(key) for key in keys.elts), \
                f"{site}: a SummedEvent's keys are a literal tuple of names"
            fields = frozenset(_string(key) or "" for key in keys.elts) | {SUMMED_COUNT_FIELD}
            call = Call(site, level or "?", fields, True)
        else:
            fields_or_none = _keyword_fields(tree, node)
            level = METHOD_LEVELS[name]
            if level == EXCEPTION_LEVEL:
                fields_or_none = None if fields_or_none is None else fields_or_none | EXCEPTION_FIELDS
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


# ---------------------------------------------------------------- what the calls cannot show

# Calls that would put fields, or a level, on lines where the calls read above do not show them: a logger's
# ``log(level, event)`` (its level an argument), fields bound to a logger (``log.bind(peer=...)``,
# ``get_logger("x", peer=...)``) or to the context (``structlog.contextvars.bind_contextvars``). None of the
# code makes one; the node's id and the logger's name, which every line carries, are added by logs.py's
# processors and described once, in docs/logs.md's "Format" paragraph (the test after this one).
UNREAD_LOGGER_METHODS = frozenset({"log", "alog", "bind", "new", "unbind", "try_unbind"})
CONTEXT_BINDING_FUNCTIONS = frozenset({"bind_contextvars", "bound_contextvars", "unbind_contextvars"})
GET_LOGGER = "get_logger"


def _logger_names(tree: ast.Module) -> set[str]:
    """What a module assigns a ``get_logger(...)`` to (``log``, ``_log``, ``self._log``), as written."""
    return {ast.unparse(target) for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
            and _called_name(node.value) == GET_LOGGER for target in node.targets}


def test_no_call_gives_a_line_fields_or_a_level_the_scan_cannot_read() -> None:
    unread = []
    for path, tree in _modules(ROOT):
        loggers = _logger_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name, site = _called_name(node), f"{path.relative_to(ROOT)}:{node.lineno}"
            if name == GET_LOGGER and (node.keywords or len(node.args) > 1):
                unread.append(f"{site}: fields bound by get_logger")
            elif name in CONTEXT_BINDING_FUNCTIONS:
                unread.append(f"{site}: fields bound to the context by {name}")
            elif (name in UNREAD_LOGGER_METHODS and isinstance(node.func, ast.Attribute)
                  and ast.unparse(node.func.value) in loggers):
                unread.append(f"{site}: {ast.unparse(node.func)}")
    assert unread == [], "log as log.info(event, field=...) does, or teach this test to read these"


def _format_paragraph(root: Path) -> str:
    text = (root / REFERENCE).read_text(encoding="utf-8")
    start = text.index("**Format.**")
    return text[start:text.index("\n\n", start)]


def test_every_field_the_log_itself_adds_is_named_in_the_format_paragraph(tmp_path: Path) -> None:
    """The fields no call passes (the time, level, node, event, logger, process, an exception's type and
    frames, the list of fields redacted) are written on lines by logs.py's processors; docs/logs.md's
    "Format" paragraph describes them once, for every row. A line is logged for real, by a worker's logger,
    with an exception and a field the log drops: every name on it but the call's own field is in that
    paragraph."""
    path = tmp_path / "node.log"
    configure_logging("n1", path, "debug", process="worker-1")
    try:
        log = get_logger("test")
        log.info("test.plain", own_field=1)
        try:
            raise ValueError("not logged")
        except ValueError:
            log.exception("test.failed", own_field=2)
        log.warning("test.redacted", own_field=3, api_key="not logged")
    finally:
        reset_logging()
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [line["event"] for line in lines] == ["test.plain", "test.failed", "test.redacted"]
    added = set().union(*(set(line) for line in lines)) - {"own_field"}
    assert {"ts", "level", "node", "event", "logger", "process", "exception_type", "traceback",
            "redacted"} <= added, "the line logged is not the one this test means"
    named = set(re.findall(r"`([^`]+)`", _format_paragraph(ROOT)))
    assert sorted(added - named) == [], f"fields every line may carry that {REFERENCE}'s Format paragraph omits"


# /work/shared/CONTRACT.md, section 4 ("At rest and in logs"): events that appear where they happen, with
# token.issued's fields named ("count and epoch, never values") and node.recovered's ("how far it replayed
# and caught up").
CONTRACT_EVENTS = ("node.started", "token.issued", "epoch.rotated", "primary.elected", "peer.down", "peer.up",
                   "node.recovered")


def test_the_events_the_contract_names_are_logged_and_listed_with_the_fields_it_names() -> None:
    events, _ = scan(ROOT)
    rows = documented_rows(ROOT)
    assert [event for event in CONTRACT_EVENTS if event not in events or event not in rows] == []
    calls = scan_calls(ROOT)
    assert {call.fields for call in calls["token.issued"]} == {frozenset({"count", "epoch"})}
    recovered = frozenset().union(*(call.fields or frozenset() for call in calls["node.recovered"]))
    assert {"wal_entries", "store_applied_index", "caught_up_index"} <= recovered
