"""Assertions shared by the HTTP tests: problem+json shape and no echo of submitted data."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_MEMBERS = {"type", "title", "status", "detail"}
# docs/api.md, Errors: every 503 also says whether the request certainly had no effect; overload always did.
EFFECTS = ("none", "unknown")
NO_EFFECT_PROBLEM_TYPES = ("overloaded", "backup-busy")
PROBLEM_TYPE_PREFIX = "urn:tokenvault:problem:"
API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


@functools.cache
def documented_problem_types() -> dict[int, frozenset[str]]:
    """Each status's problem types as docs/api.md's "Errors" table lists them (the table is the contract
    every problem answered in these tests is held to)."""
    text = API_DOC.read_text(encoding="utf-8")
    start = text.index("\n## Errors")
    end = text.find("\n## ", start + 1)
    section = text[start:] if end < 0 else text[start:end]
    types: dict[int, set[str]] = {}
    for line in section.splitlines():
        match = re.match(r"^\| (\d{3}) \| ([^|]+) \|", line)
        if match:
            types.setdefault(int(match.group(1)), set()).update(re.findall(r"`([a-z-]+)`", match.group(2)))
    return {status: frozenset(names) for status, names in types.items()}


def check_problem(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    expected_status: int,
    submitted: Iterable[str] = (),
) -> dict:
    """Assert ``body`` is a problem+json document for ``expected_status`` quoting none of ``submitted``."""
    assert status == expected_status, (status, body[:300])
    content_type = headers.get("Content-Type", "")
    assert content_type.split(";")[0].strip() == PROBLEM_CONTENT_TYPE, content_type
    document = json.loads(body)
    assert set(document) == (PROBLEM_MEMBERS | {"effect"} if expected_status == 503 else PROBLEM_MEMBERS), document
    assert document["status"] == expected_status
    assert isinstance(document["type"], str) and document["type"].startswith(PROBLEM_TYPE_PREFIX)
    problem_type = document["type"][len(PROBLEM_TYPE_PREFIX):]
    if expected_status == 503:
        assert document["effect"] in EFFECTS, document
        assert problem_type not in NO_EFFECT_PROBLEM_TYPES or document["effect"] == "none", document
    assert problem_type in documented_problem_types().get(expected_status, ()), \
        f"{expected_status} {problem_type!r} is not in docs/api.md's Errors table"
    assert isinstance(document["title"], str) and document["title"]
    assert isinstance(document["detail"], str) and document["detail"]
    assert_not_echoed(body, headers, submitted)
    return document


def assert_not_echoed(body: bytes, headers: Mapping[str, str], submitted: Iterable[str]) -> None:
    """No submitted string appears in the body or any header, raw or JSON-escaped."""
    text = body.decode("utf-8", errors="replace")
    header_text = "\n".join(f"{name}: {value}" for name, value in headers.items())
    for item in submitted:
        escaped = json.dumps(item)[1:-1]
        for form in {item, escaped}:
            assert form not in text, "a submitted string was echoed in the body"
            assert form not in header_text, "a submitted string was echoed in a header"


def conformance_headers(case: Any, key: str) -> dict[str, str] | None:
    """The headers a schemathesis case is sent with, or a rejected example when it is not really invalid.

    The suite authenticates every case with a valid key, except where a
    negative case left the Authorization header out on purpose (that must be
    answered 401, not be mended by the test). A negative case whose only
    invalid part is query members with empty-list values is not invalid once
    sent (an empty list puts nothing in the query string), so it is skipped
    rather than blamed on the server.
    """
    from hypothesis import reject
    from schemathesis import GenerationMode
    from schemathesis.core.parameters import ParameterLocation

    components = getattr(case.meta, "components", None) or {}
    negative = {location for location, info in components.items() if info.mode is GenerationMode.NEGATIVE}
    if ParameterLocation.QUERY in negative and case.query:
        known = {parameter.name for parameter in case.operation.query}
        extra = {name: value for name, value in case.query.items() if name not in known}
        if extra and all(value == [] for value in extra.values()) and negative == {ParameterLocation.QUERY}:
            reject()
    if ParameterLocation.HEADER in negative and "Authorization" not in (case.headers or {}):
        return None  # the case left Authorization out on purpose: the answer must be 401
    return {"Authorization": f"Bearer {key}"}
