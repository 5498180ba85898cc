"""Assertions shared by the HTTP tests: problem+json shape and no echo of submitted data."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_MEMBERS = {"type", "title", "status", "detail"}


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
    assert set(document) == PROBLEM_MEMBERS, document
    assert document["status"] == expected_status
    assert isinstance(document["type"], str) and document["type"].startswith("urn:tokenvault:problem:")
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
