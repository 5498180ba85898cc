"""docs/configuration.md has a row for every key of the node config that tokenvault/config.py reads, and for no
other, with the code's type, default and range; no document names a ``[table] key`` the code does not read.

What the code reads is taken from the loader itself: a document holding every table is parsed while
``config._check_known_keys``, the check that refuses any other key, records the keys it allows in each table.
The ranges are the bounds ``config._check_int`` and ``config._check_fraction`` are given while the parsed
records are checked, again with each key that is absent by default set; a string's length bound is the one
``config._check_string`` is first given for the key. The defaults are the records' own.

The page's rows are those of its tables whose header begins ``| key |``: the first column names the key
(`` `node_id` ``, `` `[http] port` ``, `` `[[members]] id` ``), then its type, its default (``required``,
``absent``, or its TOML value in backquotes, perhaps followed by words), what is allowed (for a number, beginning
"`low` to `high`", where ``high`` may name a key of the same table, or that key ``- 1``; for a string whose
length the code bounds below the general 4096 characters, saying "at most N characters" or "1–N characters")
and what it does.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock

from tokenvault import config

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"
DOCUMENTS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

# A document that holds every table the loader reads: each section of config._SECTIONS, and the tables it
# reads apart from them. Values are the least each table needs.
PROBE = "\n".join([
    'node_id = "n1"',
    'data_dir = "/probe/data"',
    *(f"[{name}]" for name in config._SECTIONS),
    "[[rate_limits.keys]]", 'name = "probe"',
    "[pkcs11]", 'module = "/probe/module.so"', 'token_label = "probe"', 'key_label = "probe"',
    "[tls]", 'cert_file = "/probe/n1.crt"', 'key_file = "/probe/n1.key"', 'ca_file = "/probe/ca.crt"',
    "[[members]]", 'id = "n1"', 'peer_addr = "127.0.0.1:8201"', 'http_url = "https://127.0.0.1:8101"',
    "[[api_keys]]", 'name = "probe"', f'sha256 = "{"0" * 64}"', 'scopes = ["admin"]',
])
# The word of the type column for each annotation of a record's field (``X | None``: that of X).
TYPE_WORDS = {"str": "string", "int": "integer", "bool": "boolean", "float": "number", "Path": "path",
              "frozenset[str]": "array of strings"}
# `` `[table] key` `` or `` `[[table]] key` `` in a document's text, the line breaks of prose allowed.
TABLE_KEY = re.compile(r"`(\[\[?)([a-z][a-z0-9_.]*)(\]\]?)\s+([a-z][a-z0-9_]*)`")
ROW_KEY = re.compile(r"`(?:(\[\[?)([a-z][a-z0-9_.]*)(\]\]?) )?([a-z][a-z0-9_]*)`")
RANGE = re.compile(r"`([^`]+)` to `([^`]+)`")
LENGTH = re.compile(r"(?:at most |1–)(\d+) characters")
# What the page says of every string ("A string is not empty and, unless its row says less, at most 4096").
GENERAL_STRING_CHARACTERS = 4096


class Table(NamedTuple):
    keys: frozenset[str]  # its own keys, not the tables below it
    array: bool  # an array of tables ([[members]]) rather than one table ([http])
    record: Any  # the record the loader made of it in the probe


class Row(NamedTuple):
    key: tuple[str, str]  # (table, key); the table is "" for the top level, "rate_limits.keys" for [[rate_limits.keys]]
    array: bool
    type: str
    default: str
    allowed: str


def _label(table: str, key: str, array: bool) -> str:
    if not table:
        return f"`{key}`"
    return f"`[[{table}]] {key}`" if array else f"`[{table}] {key}`"


def code_tables() -> dict[str, Table]:
    """Every table the loader reads, by name ("" the top level), with the keys it allows there."""
    allowed: dict[str, tuple[frozenset[str], bool]] = {}

    def record(name: str, table: Any, known: set[str]) -> None:
        match = re.fullmatch(r"config|\[([\w.]+)\]|([\w.]+)\[0\]", name)
        assert match, f"config._check_known_keys was called for a table this test cannot name: {name!r}"
        allowed[match[1] or match[2] or ""] = (frozenset(known), match[2] is not None)

    with mock.patch.object(config, "_check_known_keys", record):
        node = config.parse_config(PROBE)
    tables = {}
    for name, (known, array) in allowed.items():
        record_of_table: Any = node
        for part in name.split(".") if name else ():
            record_of_table = getattr(record_of_table, part)
            if isinstance(record_of_table, tuple):
                record_of_table = record_of_table[0]
        own = frozenset(key for key in known if (f"{name}.{key}" if name else key) not in allowed)
        tables[name] = Table(own, array, record_of_table)
    return tables


def _annotation(field: dataclasses.Field[Any]) -> str:
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    return annotation.removesuffix(" | None")


def code_bounds(tables: dict[str, Table]) -> dict[tuple[str, str], tuple[Any, Any]]:
    """(table, key) -> the (least, greatest) value the validation allows, as it is given them with every other
    key at its default: each parsed record is made again, with each integer that is absent by default set."""
    bounds: dict[tuple[str, str], tuple[Any, Any]] = {}
    check_int, check_fraction = config._check_int, config._check_fraction

    def recording(check: Any) -> Any:
        def record(name: str, value: object, minimum: Any, maximum: Any) -> None:
            # "http.port", "rate_limits.keys[probe].admin_burst"; not "members[n1].peer_addr port", a part.
            match = re.fullmatch(r"([a-z][a-z0-9_.]*?)(?:\[[^\]]*\])?\.([a-z][a-z0-9_]*)", name)
            if match:
                bounds[(match[1], match[2])] = (minimum, maximum)
            check(name, value, minimum, maximum)
        return record

    with mock.patch.object(config, "_check_int", recording(check_int)), \
            mock.patch.object(config, "_check_fraction", recording(check_fraction)):
        config.parse_config(PROBE)
        for table in tables.values():
            absent = {field.name: 0 for field in dataclasses.fields(table.record)
                      if field.default is None and _annotation(field) == "int"}
            if absent:
                dataclasses.replace(table.record, **absent)
    return bounds


def code_string_bounds() -> dict[tuple[str, str], int]:
    """(table, key) -> the most characters ``config._check_string`` allows the key's value: the least bound it
    is given for the key, but not the one of the host inside a member's peer_addr or http_url, which
    ``config._check_host`` checks after the whole value (node_id is checked as a string, then as an id)."""
    bounds: dict[tuple[str, str], int] = {}
    check_string, check_host = config._check_string, config._check_host
    in_host_check = []

    def record(name: str, value: object, max_chars: int = GENERAL_STRING_CHARACTERS) -> str:
        # "node_id", "http.host", "members[n1].peer_addr", "tls.cert_file"; not "rate_limits.keys: ...".
        match = re.fullmatch(r"(?:([a-z][a-z0-9_.]*?)(?:\[[^\]]*\])?\.)?([a-z][a-z0-9_]*)", name)
        if match:
            key = (match[1] or "", match[2])
            if key not in bounds or not in_host_check:
                bounds[key] = min(bounds.get(key, max_chars), max_chars)
        return check_string(name, value, max_chars)

    def record_host(name: str, value: object) -> None:
        in_host_check.append(name)
        try:
            check_host(name, value)
        finally:
            in_host_check.pop()

    with mock.patch.object(config, "_check_string", record), mock.patch.object(config, "_check_host", record_host):
        config.parse_config(PROBE)
    return bounds


def documented_rows(text: str) -> tuple[list[Row], list[str]]:
    """The rows of the page's key tables, and what is malformed in them."""
    rows: list[Row] = []
    problems: list[str] = []
    in_key_table = False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_key_table = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == "key":
            in_key_table = True
            continue
        if not in_key_table or set(cells[0]) <= set("-: "):
            continue
        match = ROW_KEY.fullmatch(cells[0])
        if len(cells) != 5 or not match or (match[1] or "").replace("[", "]") != (match[3] or ""):
            problems.append(f"a row that is not | `[table] key` | type | default | allowed | what |: {line[:100]}")
            continue
        rows.append(Row((match[2] or "", match[4]), match[1] == "[[", cells[1], cells[2], cells[3]))
    return rows, problems


def _toml_value(literal: str) -> Any:
    return tomllib.loads(f"value = {literal}")["value"]


def _code_default(field: dataclasses.Field[Any]) -> tuple[str, Any]:
    """("required" or "absent", None) or ("value", the default as TOML reads it: a path as its text)."""
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return "required", None
    if default is None:
        return "absent", None
    return "value", str(default) if isinstance(default, Path) else default


def _documented_default(cell: str) -> tuple[str, Any]:
    """("required" or "absent", None) or ("value", the value), or ("unreadable", the cell)."""
    for word in ("required", "absent"):
        if cell == word or cell.startswith(word + " "):
            return word, None
    match = re.match(r"`([^`]+)`", cell)
    try:
        return ("value", _toml_value(match[1])) if match else ("unreadable", cell)
    except tomllib.TOMLDecodeError:
        return "unreadable", cell


def _bound(token: str, defaults: dict[str, Any]) -> Any:
    """A TOML number, or a key of the same table (its default), perhaps ``- n``."""
    match = re.fullmatch(r"([a-z][a-z0-9_]*)(?: - (\d+))?", token)
    if match and match[1] in defaults:
        return defaults[match[1]] - int(match[2] or 0)
    try:
        return _toml_value(token)
    except tomllib.TOMLDecodeError:
        return token


def references(text: str) -> set[tuple[str, str, bool]]:
    """Each (table, key, array) a text names as `` `[table] key` `` or `` `[[table]] key` ``."""
    return {(table, key, opening == "[[") for opening, table, closing, key in TABLE_KEY.findall(text)
            if opening.replace("[", "]") == closing}


def stale_references(text: str, tables: dict[str, Table]) -> list[str]:
    """The `` `[table] key` `` a text names that config.py does not read, or names with the wrong brackets."""
    stale = []
    for table, key, array in references(text):
        if table not in tables or key not in tables[table].keys:
            stale.append(f"{_label(table, key, array)}: config.py reads no such key")
        elif tables[table].array != array:
            stale.append(f"{_label(table, key, array)}: it is {_label(table, key, not array)}")
    return sorted(stale)


def reference_problems(text: str) -> list[str]:
    """Everything on which the page ``text`` and tokenvault/config.py disagree, one line each."""
    tables = code_tables()
    bounds = code_bounds(tables)
    string_bounds = code_string_bounds()
    rows, problems = documented_rows(text)
    by_key: dict[tuple[str, str], Row] = {}
    for row in rows:
        if row.key in by_key:
            problems.append(f"{_label(*row.key, row.array)}: two rows")
        by_key[row.key] = row
    for name, table in sorted(tables.items()):
        problems.extend(f"{_label(name, key, table.array)}: read by config.py, no row"
                        for key in sorted(table.keys) if (name, key) not in by_key)
    for (name, key), row in by_key.items():
        label = _label(name, key, row.array)
        code_table = tables.get(name)
        if code_table is None or key not in code_table.keys:
            if not name:  # a row of a table names `[table] key`: stale_references below says what is wrong
                problems.append(f"{label}: a row, but config.py reads no such key")
            continue
        record_fields = {field.name: field for field in dataclasses.fields(code_table.record)}
        field = record_fields[key]
        expected_type = TYPE_WORDS.get(_annotation(field), _annotation(field))
        if row.type != expected_type:
            problems.append(f"{label}: type {row.type!r}, the code's is {expected_type!r}")
        expected = _code_default(field)
        documented = _documented_default(row.default)
        if documented[0] != expected[0] or (expected[0] == "value" and (
                type(documented[1]) is not type(expected[1]) or documented[1] != expected[1])):
            code_default = repr(expected[1]) if expected[0] == "value" else expected[0]
            problems.append(f"{label}: default {row.default!r}, the code's is {code_default}")
        defaults = {item.name: _code_default(item)[1] for item in record_fields.values()}
        span = RANGE.match(row.allowed)
        if (name, key) in bounds:
            documented_range = (_bound(span[1], defaults), _bound(span[2], defaults)) if span else None
            if documented_range != bounds[(name, key)]:
                low, high = bounds[(name, key)]
                problems.append(f"{label}: allowed {row.allowed[:40]!r}..., the code's range is {low!r} to {high!r}")
        elif span:
            problems.append(f"{label}: a range, but config.py checks none")
        length = LENGTH.search(row.allowed)
        code_length = string_bounds.get((name, key), GENERAL_STRING_CHARACTERS)
        # A row that names no length has the general one; a name checked by a pattern (an API key's) is not seen.
        if (length and (name, key) in string_bounds and int(length[1]) != code_length) or (
                not length and code_length != GENERAL_STRING_CHARACTERS):
            problems.append(f"{label}: at most {length[1] if length else GENERAL_STRING_CHARACTERS} characters, "
                            f"the code's bound is {code_length}")
    problems.extend(stale_references(text, tables))
    return problems


def test_the_probe_reads_every_kind_of_table_its_keys_and_their_ranges() -> None:
    """Not vacuous: the tables, arrays of tables, sub-tables and ranges the checks below compare."""
    tables = code_tables()
    assert set(config._SECTIONS) | {"", "rate_limits.keys", "members", "api_keys", "pkcs11", "tls"} <= set(tables)
    assert {"node_id", "cluster_secret_file", "join"} <= tables[""].keys and "http" not in tables[""].keys
    assert "keys" not in tables["rate_limits"].keys and "admin_burst" in tables["rate_limits.keys"].keys
    assert tables["members"].array and not tables["wal"].array and "max_segment_bytes" in tables["wal"].keys
    bounds = code_bounds(tables)
    assert bounds[("http", "port")] == (1, 65535)
    assert bounds[("http", "workers")] == (0, config.MAX_HTTP_WORKERS)  # absent by default: set to be checked
    assert bounds[("rate_limits.keys", "admin_burst")] == (0, 10_000_000)
    assert bounds[("shred", "max_busy_fraction")] == (0.01, 1.0)
    string_bounds = code_string_bounds()
    assert string_bounds[("", "node_id")] == 32 and string_bounds[("members", "peer_addr")] == 300
    assert string_bounds[("http", "host")] == 253 and string_bounds[("tls", "ca_file")] == GENERAL_STRING_CHARACTERS


def test_docs_configuration_md_has_a_row_for_every_key_and_only_those_with_the_codes_type_default_and_range() -> None:
    assert reference_problems(REFERENCE.read_text(encoding="utf-8")) == []


def test_every_table_key_a_document_names_is_one_config_py_reads() -> None:
    tables = code_tables()
    stale = [f"{document.relative_to(ROOT)}: {line}" for document in DOCUMENTS
             for line in stale_references(document.read_text(encoding="utf-8"), tables)]
    assert stale == []


def test_the_example_in_docs_configuration_md_is_a_valid_config() -> None:
    example = re.search(r"```toml\n(.*?)```", REFERENCE.read_text(encoding="utf-8"), re.DOTALL)
    assert example, "docs/configuration.md has no ```toml example"
    node = config.parse_config(example[1])
    assert node.tls is not None and len(node.members) == 3


def test_every_key_the_store_is_opened_with_is_listed_as_one_every_node_must_share() -> None:
    """Apply is a function of the log and of what the store was opened with: a config key that reaches
    VaultStore.open (in Node's constructor) shapes the replicated state, so the page must say every node needs
    the same value."""
    node_source = (ROOT / "tokenvault" / "core" / "node.py").read_text(encoding="utf-8")
    start = node_source.index("VaultStore.open(")
    depth, end = 0, start
    for end in range(start + len("VaultStore.open"), len(node_source)):
        depth += {"(": 1, ")": -1}.get(node_source[end], 0)
        if depth == 0:
            break
    # A property of a table stands for the key it is derived from ([idempotency] retention_ms: retention_hours).
    derived = {("idempotency", "retention_ms"): ("idempotency", "retention_hours")}
    keys = {derived.get(key, key) for key in re.findall(r"config\.([a-z_]+)\.([a-z_]+)", node_source[start:end])}
    assert ("idempotency", "retention_hours") in keys
    page = REFERENCE.read_text(encoding="utf-8")
    shared = page[page.index("## What every node of a cluster must share"):]
    shared = shared[:shared.index("\n## ", 1)]
    assert {(table, key) for table, key in keys if f"`[{table}] {key}`" not in shared} == set()
    # And the peer handshake carries each (NodeConfig.replicated_settings), so nodes that differ never link.
    carried = {name.split(".")[0] for name, _ in config.parse_config(PROBE).replicated_settings}
    assert {table for table, _ in keys} <= carried, "a setting the store is opened with is not in the handshake"


# `` `[http] max_connections` (1024) ``, `` `peer.max_unauthenticated_connections` (default 8) ``, `` `body_timeout_ms`
# (10 s) ``, `` `max_inflight_requests` (256 by default ``: a default stated in prose beside the key it is of.
PROSE_DEFAULT = re.compile(r"`(?:\[\[?[a-z_.]+\]\]? |[a-z_]+\.)?([a-z_]+)`\s+\((?:default\s+)?(\d[\d,]*)"
                           r"(?:\s+(s|ms|MiB))?(?:[),;]| by default)")
UNITS = {None: 1, "ms": 1, "s": 1000, "MiB": 1 << 20}
# The rows of docs/api.md's "| key | default | ..." tables: `` | `max_body_reads` | 256 | `` and
# `` | `tokenize_per_second`, `tokenize_burst` | 0, 0 | ``.
KEY_DEFAULT_ROW = re.compile(r"^\| ((?:`[a-z_]+`(?:, )?)+) \| (\d[\d, ]*)(?: \(at most (\d+)\))?(?: \||\s\()", re.MULTILINE)


def stated_defaults(text: str) -> list[tuple[str, int, int | None]]:
    """(key, the default the text gives it, the most it says the key allows or None) for every default stated
    beside a key's name, as a number of the key's own unit (a timeout's 10 s is 10000 ms)."""
    stated: list[tuple[str, int, int | None]] = []
    for key, number, unit in PROSE_DEFAULT.findall(text):
        scale = UNITS[unit or None] if unit != "s" or key.endswith("_ms") else 0
        stated.append((key, int(number.replace(",", "")) * scale, None))
    for keys, numbers, most in KEY_DEFAULT_ROW.findall(text):
        names, values = re.findall(r"`([a-z_]+)`", keys), [int(value) for value in numbers.split(",")]
        if len(names) == len(values):
            stated.extend((name, value, int(most) if most else None) for name, value in zip(names, values))
    return stated


def default_problems(text: str, tables: dict[str, Table]) -> list[str]:
    """The defaults (and "at most" bounds) ``text`` states beside a key's name that are not the code's. A key name
    that more than one table holds with a number as its default cannot be told apart, and is not checked."""
    numeric: dict[str, list[tuple[Any, Any]]] = {}
    bounds = code_bounds(tables)
    for name, table in tables.items():
        for field in dataclasses.fields(table.record):
            kind, value = _code_default(field)
            if field.name in table.keys and kind == "value" and type(value) in (int, float):
                numeric.setdefault(field.name, []).append((value, bounds.get((name, field.name), (None, None))[1]))
    problems = []
    for key, value, most in stated_defaults(text):
        if len(numeric.get(key, [])) != 1:
            continue
        (code_value, code_most), = numeric[key]
        if value != code_value:
            problems.append(f"`{key}`: default {value}, the code's is {code_value}")
        if most is not None and most != code_most:
            problems.append(f"`{key}`: at most {most}, the code's bound is {code_most}")
    return problems


def test_every_default_a_document_states_beside_a_key_is_the_codes() -> None:
    tables = code_tables()
    stated = {key for document in DOCUMENTS for key, _, _ in stated_defaults(document.read_text(encoding="utf-8"))}
    assert {"max_connections", "header_timeout_ms", "max_unauthenticated_connections", "retention_hours",
            "max_body_bytes", "tokenize_burst", "max_backup_streams"} <= stated  # not vacuous
    problems = [f"{document.relative_to(ROOT)}: {problem}" for document in DOCUMENTS
                for problem in default_problems(document.read_text(encoding="utf-8"), tables)]
    assert problems == []
    wrong = ("`[http] max_connections` (1000), `body_timeout_ms` (5 s), `max_body_bytes` (8 MiB)\n"
             "| `max_backup_streams` | 1 (at most 8) | x |\n| `admin_per_second`, `admin_burst` | 0, 5 | x |\n")
    assert default_problems(wrong, tables) == [
        "`max_connections`: default 1000, the code's is 1024", "`body_timeout_ms`: default 5000, the code's is 10000",
        "`max_backup_streams`: at most 8, the code's bound is 16", "`admin_burst`: default 5, the code's is 0"]


def test_the_check_sees_a_missing_row_a_wrong_default_type_or_range_and_a_key_the_code_does_not_read() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    edits = [
        (r"^\| `\[wal\] max_segment_bytes` \|.*\n", ""),
        (r"(\| `\[http\] port` \| integer \| )`8101`", r"\1`8102`"),
        (r"(\| `log_level` \| string \| )`\"info\"`", r"\1`info`"),
        (r"(\| `\[audit\] flush_ms` \| )integer", r"\1number"),
        (r"(\| `\[timing\] tick_ms` \|[^|]*\|[^|]*\| )`1` to `10_000`", r"\1`1` to `1000`"),
        (r"(\| `\[http\] max_body_reads_per_key` \|[^|]*\|[^|]*\| )`1` to `max_body_reads`",
         r"\1`1` to `max_connections`"),
        (r"(\| `\[\[members\]\] id` \| string \| )required", r"\1absent"),
        (r"\| `\[\[members\]\] peer_addr` \|", "| `[members] peer_addr` |"),
        (r"(\| `\[sealer\] enabled` \|[^|]*\|[^|]*\| )`true` or `false`", r"\1`0` to `1`"),
        (r"^## `\[peer\]`\n", "## `[peer]`\n\nSee also `[peer] max_links`.\n"),
        (r"(\| `\[pkcs11\] key_label` \|[^|]*\|[^|]*\| )at most 256 characters", r"\1at most 255 characters"),
        (r"(\| `\[\[members\]\] http_url` \|[^|]*\|[^|]*\| )at most 300 characters of", r"\1"),
    ]
    for pattern, replacement in edits:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count == 1, pattern
    text += ("\n| key | type | default | allowed | what it does |\n|---|---|---|---|---|\n"
             "| `[wal] fsync` | boolean | `true` | `true` or `false` | again |\n"
             "| `log_format` | string | `\"json\"` | `\"json\"` | none such |\n")
    assert reference_problems(text) == [
        "`[wal] fsync`: two rows",
        "`[wal] max_segment_bytes`: read by config.py, no row",
        "`log_level`: default '`info`', the code's is 'info'",
        "`[[members]] id`: default 'absent', the code's is required",
        "`[[members]] http_url`: at most 4096 characters, the code's bound is 300",
        "`[http] port`: default '`8102`', the code's is 8101",
        "`[http] max_body_reads_per_key`: allowed '`1` to `max_connections`'..., the code's range is 1 to 256",
        "`[timing] tick_ms`: allowed '`1` to `1000`'..., the code's range is 1 to 10000",
        "`[sealer] enabled`: a range, but config.py checks none",
        "`[audit] flush_ms`: type 'number', the code's is 'integer'",
        "`[pkcs11] key_label`: at most 255 characters, the code's bound is 256",
        "`log_format`: a row, but config.py reads no such key",
        "`[members] peer_addr`: it is `[[members]] peer_addr`",
        "`[peer] max_links`: config.py reads no such key",
    ]
