"""tokenvault.api.validation: the structure bound that runs before JSON parsing, and the shared item checks."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenvault.config import LimitsConfig
from tokenvault.errors import InvalidRequest, PayloadTooLarge
from tokenvault.api.validation import (
    STRUCTURE_SLACK_VALUES,
    check_json_structure,
    max_json_values,
    require_item_list,
    validate_idempotency_key,
    validate_values,
)

# Strings with everything that could confuse a byte-level scan: quotes, backslashes, escapes, structure.
TRICKY_TEXT = st.text(alphabet=st.sampled_from(list('ab",:[]{}\\/\n\t\u00e9\u2028\U0001f600 ')), max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | TRICKY_TEXT,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(TRICKY_TEXT, children, max_size=6),
    max_leaves=40,
)


def count_containers(document: Any) -> int:
    if isinstance(document, list):
        return 1 + sum(count_containers(item) for item in document)
    if isinstance(document, dict):
        return 1 + sum(count_containers(item) for item in document.values())
    return 0


def count_values(document: Any) -> int:
    """Every JSON value in the document, member names included."""
    if isinstance(document, list):
        return 1 + sum(count_values(item) for item in document)
    if isinstance(document, dict):
        return 1 + sum(1 + count_values(item) for item in document.values())
    return 1


@settings(max_examples=150, deadline=None)
@given(document=JSON_VALUES, ensure_ascii=st.booleans(), indent=st.sampled_from([None, 1]))
def test_the_structure_bound_counts_the_values_of_any_json_document(
    document: Any, ensure_ascii: bool, indent: int | None
) -> None:
    """Never fewer than there are (so the bound holds), at most one more per array or object."""
    body = json.dumps(document, ensure_ascii=ensure_ascii, indent=indent).encode("utf-8")
    values = count_values(document)
    check_json_structure(body, values + count_containers(document))
    with pytest.raises(PayloadTooLarge):
        check_json_structure(body, values - 1)


def test_the_largest_allowed_requests_pass() -> None:
    limits = LimitsConfig()
    awkward = ('a,b:[c]{d}"\\' * 400)[: limits.max_value_bytes]
    for member in ("values", "tokens"):
        body = json.dumps({member: [awkward] * limits.max_items}).encode()
        check_json_structure(body, max_json_values(limits))


@pytest.mark.parametrize(("body", "error", "message"), [
    (b'{"tokens":[' + b",".join([b"{}"] * 100_000) + b"]}", InvalidRequest, "arrays and objects"),
    (b"[" * 100_000 + b"]" * 100_000, InvalidRequest, "arrays and objects"),
    (b'{"tokens":[' + b",".join([b"1"] * 100_000) + b"]}", PayloadTooLarge, "JSON values"),
    (b'{"tokens":[' + b",".join([b'"x"'] * 100_000) + b"]}", PayloadTooLarge, "JSON strings"),
    (b'{"tokens":["unterminated]}', InvalidRequest, "not closed"),
])
def test_bodies_no_allowed_request_looks_like_are_refused(body: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        check_json_structure(body, max_json_values(LimitsConfig()))


@pytest.mark.parametrize(("body", "outcome"), [
    (b'"' + b'\\"' * (4 * 1024 * 1024), InvalidRequest),  # one string that never closes: a backtracking scan is quadratic here
    (b'"' * (8 * 1024 * 1024), PayloadTooLarge),
    (b'"' + b"\\" * (8 * 1024 * 1024) + b'"', None),
    (b"[" + b'"a",' * (2 * 1024 * 1024) + b"]", PayloadTooLarge),
])
def test_hostile_bodies_of_8_mib_are_refused_or_passed_from_their_bytes(body: bytes, outcome: type | None) -> None:
    """Each is judged from its bytes alone, in a few passes at C speed; the time per MiB, flat from 1 to 8 MiB,
    is bench/body_scan.py's (docs/performance.md, "The body scan"), not asserted here."""
    if outcome is None:
        check_json_structure(body, max_json_values(LimitsConfig()))
    else:
        with pytest.raises(outcome):
            check_json_structure(body, max_json_values(LimitsConfig()))


def test_the_slack_leaves_room_for_small_optional_members() -> None:
    body = json.dumps({"values": ["v"] * 1000, "metadata": {f"k{n}": n for n in range(200)}}).encode()
    assert STRUCTURE_SLACK_VALUES > 400
    check_json_structure(body, max_json_values(LimitsConfig()))


def test_item_checks_name_the_position_never_the_value() -> None:
    limits = LimitsConfig(max_items=3, max_value_bytes=8)
    with pytest.raises(PayloadTooLarge, match="4 items; at most 3"):
        require_item_list({"values": ["a"] * 4}, "values", limits)
    with pytest.raises(InvalidRequest) as caught:
        validate_values(["ok", "secret-too-long"], limits)
    assert "values[1]" in str(caught.value) and "secret" not in str(caught.value)
    with pytest.raises(InvalidRequest, match="printable ASCII"):
        validate_idempotency_key("\x7f")
    assert validate_idempotency_key("k" * 255) == "k" * 255
