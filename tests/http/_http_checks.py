"""Assertions shared by the HTTP tests: problem+json shape and no echo of submitted data."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

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
