"""docs/openapi.yaml documents the statuses every operation can get from the HTTP layer itself.

- Every authenticated operation's handler calls ``admit`` first (tokenvault/api/http.py), which
  enforces the key's rate limit for the endpoint's kind: 429 ``rate-limited`` with Retry-After.
- Every operation, authenticated or not, can get the server's 429 for too many pipelined requests
  on one connection (tokenvault/api/httpserver.py, ``MAX_PIPELINED``).
- Every operation that takes a body reads it through ``receive_body`` under ``body_timeout_ms``:
  408 when it stops arriving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

OPENAPI_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
RATE_LIMITED = "#/components/responses/TooManyRequests"
TIMED_OUT = "#/components/responses/RequestTimeout"


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, operation) for path, item in document["paths"].items()
            for method, operation in item.items()]


def _authenticated(document: dict[str, Any], operation: dict[str, Any]) -> bool:
    return bool(operation.get("security", document.get("security", [])))


def missing_statuses(document: dict[str, Any]) -> list[str]:
    """One line per status an operation of ``document`` fails to document."""
    missing = []
    for method, path, operation in _operations(document):
        responses = operation["responses"]
        if "429" not in responses:
            missing.append(f"{method} {path}: no 429")
        elif _authenticated(document, operation) and responses["429"].get("$ref") != RATE_LIMITED:
            missing.append(f"{method} {path}: 429 is not TooManyRequests (rate limit)")
        if "requestBody" in operation and responses.get("408", {}).get("$ref") != TIMED_OUT:
            missing.append(f"{method} {path}: reads a body, no 408 RequestTimeout")
    return missing


def test_every_operation_documents_429_and_every_body_reading_operation_408() -> None:
    assert missing_statuses(yaml.safe_load(OPENAPI_PATH.read_text(encoding="utf-8"))) == []


def test_the_check_sees_a_missing_429_and_a_missing_408() -> None:
    document = {
        "security": [{"bearerAuth": []}],
        "paths": {
            "/open": {"get": {"security": [], "responses": {"200": {}}}},
            "/admin": {"get": {"responses": {"200": {}, "429": {"$ref": RATE_LIMITED}}},
                       "post": {"requestBody": {}, "responses": {"200": {}, "429": {"$ref": RATE_LIMITED}}}},
            "/keys": {"get": {"responses": {"429": {"$ref": "#/components/responses/TooManyPipelined"}}}},
        },
    }
    assert missing_statuses(document) == [
        "get /open: no 429",
        "post /admin: reads a body, no 408 RequestTimeout",
        "get /keys: 429 is not TooManyRequests (rate limit)",
    ]
