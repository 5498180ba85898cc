"""A real node checked against docs/openapi.yaml over real HTTP (issue 2, point 9).

One `tokenvault serve` process (a cluster of one, started by _real_node.py
through tokenvault.devcluster.cluster) serves this whole module. Against it run:

- schemathesis, with the same document, configuration and checks as
  test_openapi_conformance.py (every operation, valid and invalid requests,
  the 'full' API key from cluster.json): every response's status must be
  documented, its content type, headers and body must match the document, no
  5xx other than 503, and invalid input must be rejected;
- the hypothesis fuzz tests of test_http_fuzz.py, imported so that pytest
  runs them here with this module's ``http_target`` (the real node);
- last, checks that the node survived all of it: the same process still
  runs, /health answers, tokenize and detokenize still work, and its logs are
  JSON lines with no error, no traceback and no fuzzed string.

Tests run in the order written (pytest keeps definition order), so the
survival checks come after the fuzzing and the schemathesis run.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import test_openapi_conformance as conformance
from _http_checks import conformance_headers
from _http_support import HttpTarget
from _real_node import RealNode, running_real_node
from hypothesis import HealthCheck, settings

# Imported to be collected again in this module, where http_target is the real node.
from test_http_fuzz import (  # noqa: F401
    MARK,
    test_arbitrary_authorization_headers,
    test_arbitrary_body_bytes,
    test_arbitrary_header_bytes_never_5xx,
    test_arbitrary_idempotency_key_headers,
    test_arbitrary_json_documents,
    test_control_character_in_authorization_is_problem_without_the_key,
    test_oversized_header_line_is_problem_without_echo,
    test_tokenize_arbitrary_text_values,
)

from tokenvault.crypto.tokens import is_token

pytestmark = pytest.mark.integration

MAX_EXAMPLES_PER_OPERATION = 60
ERROR_LEVELS = {"error", "critical", "fatal", "exception"}
LOG_MEMBERS = {"ts", "level", "node", "event"}
APPLY_TIMEOUT_SECONDS = 5.0
POLL_INTERVAL_SECONDS = 0.05


@pytest.fixture(scope="module")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    # Plain HTTP on purpose: the raw-byte fuzz cases end a request by half-closing the TCP connection,
    # which TLS turns into a full close (no answer can come back). HTTP parsing is the same under TLS;
    # the TLS path of a real node is tests/http/test_real_node_tls.py.
    with running_real_node(tmp_path_factory.mktemp("real-node"), tls=False) as node:
        yield node


@pytest.fixture(scope="module")
def http_target(real_node: RealNode) -> HttpTarget:
    """Overrides conftest.py's target: the imported fuzz tests talk to the real node."""
    return HttpTarget(base_url=real_node.base_url, full_key=real_node.full_key, is_fake=False)


@conformance.schema.parametrize()
@settings(max_examples=MAX_EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_real_node_conforms_to_openapi(case: schemathesis.Case, real_node: RealNode) -> None:
    headers = conformance_headers(case, real_node.full_key)
    case.call_and_validate(base_url=real_node.base_url, headers=headers, checks=conformance.CHECKS)


# ---------------------------------------------------------------- after the run: the node survived


def _wait_until_applied_catches_up(real_node: RealNode, commit_index: int) -> None:
    """Every committed entry gets applied: poll /health until applied_index reaches `commit_index`."""
    deadline = time.monotonic() + APPLY_TIMEOUT_SECONDS
    while (applied := real_node.request("GET", "/health").json()["applied_index"]) < commit_index:
        assert time.monotonic() < deadline, f"applied index stuck at {applied} below commit index {commit_index}"
        time.sleep(POLL_INTERVAL_SECONDS)


def test_node_is_alive_and_healthy_after_the_run(real_node: RealNode) -> None:
    assert real_node.is_alive(), f"the node process is gone\n{real_node.output_tail()}"
    reply = real_node.request("GET", "/health")
    assert reply.status == 200, reply.body[:300]
    assert reply.headers["Content-Type"].split(";")[0] == "application/json"
    health = reply.json()
    assert health["status"] == "ok"
    assert health["node_id"] == real_node.node.node_id
    assert health["role"] == "primary" and health["primary_id"] == real_node.node.node_id
    assert 0 < health["applied_index"] <= health["commit_index"]
    _wait_until_applied_catches_up(real_node, health["commit_index"])
    epochs = real_node.request("GET", "/v1/admin/epochs", key=real_node.full_key)
    assert epochs.status == 200 and epochs.json()["active_epoch"] == health["active_epoch"] >= 1


def test_node_still_tokenizes_and_detokenizes_after_the_run(real_node: RealNode) -> None:
    values = [f"after-run-{secrets.token_hex(8)}-{index}" for index in range(5)]
    first = real_node.request("POST", "/v1/tokenize", {"values": values}, key=real_node.full_key)
    assert first.status == 200, first.body[:300]
    tokens = first.json()["tokens"]
    assert len(tokens) == len(values) and all(is_token(token) for token in tokens)
    assert len(set(tokens)) == len(values)
    # Nothing rotates the epoch during this test, so the same values give the same tokens.
    again = real_node.request("POST", "/v1/tokenize", {"values": values}, key=real_node.full_key)
    assert again.status == 200 and again.json() == first.json()
    found = real_node.request("POST", "/v1/detokenize", {"tokens": tokens}, key=real_node.full_key)
    assert found.status == 200 and found.json() == {"values": values}


def _read_log_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []


def test_node_logs_hold_no_error_traceback_or_fuzzed_string(real_node: RealNode) -> None:
    log_lines = _read_log_lines(real_node.node.log_file)
    assert log_lines, "the node wrote no log lines"
    for line in log_lines:
        record = json.loads(line)
        assert LOG_MEMBERS <= set(record), sorted(record)
        assert str(record["level"]).lower() not in ERROR_LEVELS, line[:500]
    for path in real_node.log_files():
        text = "\n".join(_read_log_lines(path))
        assert "Traceback" not in text, f"{path.name} holds a traceback\n{real_node.output_tail()}"
        # Every string the JSON fuzz submits starts with MARK; a log must never quote one.
        assert MARK not in text, f"{path.name} quotes a submitted string"
