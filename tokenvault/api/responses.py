"""Responses shared by the HTTP API's modules (tokenvault/api/http.py, http_lifecycle.py)."""

from __future__ import annotations

import json
from typing import Any

from tokenvault.api.httpserver import Response
from tokenvault.errors import Outcome

JSON_CONTENT_TYPE = "application/json"
REPLAYED_HEADER = "Idempotent-Replayed"
# Responses to API calls may carry plaintext values: no cache may keep them.
NO_STORE_HEADERS = {"Cache-Control": "no-store"}
# Marks "no body at all", which differs from a JSON body of `null`.
EMPTY_BODY = object()


def json_response(document: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(body=body, status=status, content_type=JSON_CONTENT_TYPE, headers=headers)


def outcome_response(outcome: Outcome) -> Response:
    # Response copies the headers it is given, so the shared mapping goes as it is.
    headers = {**NO_STORE_HEADERS, REPLAYED_HEADER: "true"} if outcome.replayed else NO_STORE_HEADERS
    return Response(body=outcome.body, status=outcome.status, content_type=JSON_CONTENT_TYPE, headers=headers)
