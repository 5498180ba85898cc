"""Abusive HTTP traffic against the application in process: the audit's probes, each showing its fix.

Slow and half-sent requests go over raw sockets (aiohttp's client always sends
whole requests). Timeouts are configured short (0.5 s) so that the tests wait
little; every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from _http_checks import check_problem
from _http_support import FakeBackupStream, FakeService, KeyRing, fake_token
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from tokenvault.api.http import HttpLimits, build_app, http_server
from tokenvault.crypto.tls import ClusterTlsFiles, create_cluster_tls, http_client_context, http_server_context
from tokenvault.metrics import Metrics
from tokenvault.api.ratelimit import BucketLimit

ClientFactory = Callable[[HttpLimits], Awaitable[TestClient]]
JSON = {"Content-Type": "application/json"}
SHORT_SECONDS = 0.5
DEADLINE_SECONDS = 10.0


class RawConnection:
    """One TCP connection to the test server, for requests sent piece by piece."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, client: TestClient) -> RawConnection:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_all(self, timeout_seconds: float = DEADLINE_SECONDS) -> bytes:
        """Everything until the server closes the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout_seconds)

    def close(self) -> None:
        self.writer.close()


def request_head(path: str, key: str, content_length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n").encode()


async def expect_problem(response, status: int, submitted: tuple[str, ...] = ()) -> dict:
    return check_problem(response.status, response.headers, await response.read(), status, submitted)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def poll(condition: Callable[[], bool], what: str, timeout_seconds: float = DEADLINE_SECONDS) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture
async def connections() -> AsyncIterator[list[RawConnection]]:
    opened: list[RawConnection] = []
    yield opened
    for connection in opened:
        connection.close()


# ---------------------------------------------------------------- headers and connections


async def test_half_sent_headers_are_closed_after_the_header_timeout(
    make_client: ClientFactory, connections: list[RawConnection]
) -> None:
    """Audit: 500 half-sent header connections were all open after 6 s, a lone one after 20 s."""
    client = await make_client(HttpLimits(header_timeout_seconds=SHORT_SECONDS))
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(500):
        connection = await RawConnection.open(client)
        await connection.send(b"POST /v1/tokenize HTTP/1.1\r\nHost: test\r\nContent-Type: appl")
        connections.append(connection)
    # Each is closed by the server without an answer, half a second after it opened.
    answers = await asyncio.gather(*(connection.read_all() for connection in connections))
    assert answers == [b""] * 500
    assert loop.time() - started >= SHORT_SECONDS
    lone = await RawConnection.open(client)
    connections.append(lone)
    await lone.send(b"GET /health HTTP/1.1\r\n")
    opened = loop.time()
    assert await lone.read_all() == b""
    assert SHORT_SECONDS * 0.9 <= loop.time() - opened < DEADLINE_SECONDS
    # The server goes on serving.
    assert (await client.get("/health")).status == 200


async def test_a_slow_handler_is_not_cut_off_by_the_header_timeout(
    make_client: ClientFactory, key_ring: KeyRing, service: FakeService
) -> None:
    """The header timeout covers waiting for a request, never the time the node takes to answer it."""
    client = await make_client(HttpLimits(header_timeout_seconds=0.2))
    service.tokenize_gate = asyncio.Event()
    pending = asyncio.ensure_future(client.post("/v1/tokenize", data=json.dumps({"values": ["slow"]}),
                                                headers={**JSON, **key_ring.bearer("tokenizer")}))
    await poll(lambda: service.tokenize_calls != [], "the tokenize to reach the service")
    loop = asyncio.get_running_loop()
    held_until = loop.time() + 0.6
    await poll(lambda: loop.time() >= held_until, "three header timeouts to pass")
    service.tokenize_gate.set()
    assert (await pending).status == 200


async def test_connections_past_the_cap_are_refused_and_the_server_goes_on(
    make_client: ClientFactory, metrics: Metrics, connections: list[RawConnection]
) -> None:
    client = await make_client(HttpLimits(max_connections=8))
    for _ in range(8):
        connection = await RawConnection.open(client)
        await connection.send(b"GET /health HTTP/1.1\r\n")  # held open, headers unfinished
        connections.append(connection)
    extra = await RawConnection.open(client)
    connections.append(extra)
    refused = await extra.read_all()
    assert status_of(refused) == 503 and b"Retry-After: 1" in refused
    assert b'"type":"urn:tokenvault:problem:overloaded"' in refused
    assert sample(metrics, "tokenvault_http_connections_refused_total") == 1
    for connection in connections[:8]:
        connection.close()

    async def health_answers() -> bool:
        response = await client.get("/health")
        return response.status == 200

    # Closing the held connections frees their places (the server learns of each close asynchronously).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    while True:
        try:
            if await health_answers():
                break
        except Exception:  # a connection refused while the old ones are still being torn down
            pass
        assert loop.time() < deadline, "the server did not accept connections again"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- bodies


async def test_a_stalled_body_is_408_and_the_connection_is_closed(
    make_client: ClientFactory, key_ring: KeyRing, metrics: Metrics, service: FakeService,
    connections: list[RawConnection]
) -> None:
    client = await make_client(HttpLimits(body_timeout_seconds=SHORT_SECONDS))
    connection = await RawConnection.open(client)
    connections.append(connection)
    await connection.send(request_head("/v1/tokenize", key_ring.keys["tokenizer"], 100) + b'{"values": [')
    response = await connection.read_all()
    assert status_of(response) == 408
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    problem = json.loads(body)
    assert problem["status"] == 408 and problem["type"] == "urn:tokenvault:problem:request-timeout"
    assert sample(metrics, "tokenvault_http_body_timeouts_total") == 1
    assert service.tokenize_calls == []


async def test_a_request_refused_before_its_body_closes_the_connection_at_once(
    make_client: ClientFactory, connections: list[RawConnection]
) -> None:
    """A 401 sent before the body was read closes the connection, rather than aiohttp lingering up to 10 s
    to read and drop the rest of the body: a client without a key holds no connection slot meanwhile."""
    client = await make_client(HttpLimits())
    connection = await RawConnection.open(client)
    connections.append(connection)
    await connection.send(request_head("/v1/tokenize", "tvk_not-a-key", 100_000) + b'{"values": [')
    response = await connection.read_all(timeout_seconds=3.0)  # lingering would take 10 s
    assert status_of(response) == 401
    assert b"Connection: close" in response.partition(b"\r\n\r\n")[0]


async def test_a_body_that_keeps_arriving_is_not_cut_off(
    make_client: ClientFactory, key_ring: KeyRing, connections: list[RawConnection]
) -> None:
    """The body timeout bounds the gap between pieces, not the whole transfer."""
    client = await make_client(HttpLimits(body_timeout_seconds=0.3))
    body = json.dumps({"values": ["trickled"]}).encode()
    connection = await RawConnection.open(client)
    connections.append(connection)
    await connection.send(request_head("/v1/tokenize", key_ring.keys["tokenizer"], len(body)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    for position in range(0, len(body), 4):
        await connection.send(body[position:position + 4])
        pause_until = loop.time() + 0.1
        await poll(lambda: loop.time() >= pause_until, "a pause shorter than the body timeout")
    assert loop.time() - started > 0.3, "the transfer must take longer than one body timeout"
    head = await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), DEADLINE_SECONDS)
    assert status_of(head) == 200


async def test_slow_bodies_from_one_key_do_not_starve_another_key(
    make_client: ClientFactory, key_ring: KeyRing, metrics: Metrics, service: FakeService,
    connections: list[RawConnection]
) -> None:
    """Audit: 256 slow bodies sent with a detokenize-only key made another key's tokenize get 503.

    Default limits: 256 in-flight slots, 256 bodies being received per node, 32 per key.
    """
    limits = HttpLimits()
    client = await make_client(limits)
    slow_key = key_ring.keys["detokenizer"]
    for _ in range(256):
        connection = await RawConnection.open(client)
        await connection.send(request_head("/v1/detokenize", slow_key, 1000) + b'{"tokens": ["')
        connections.append(connection)
    refused = 256 - limits.max_body_reads_per_key
    labels = {"key": "detokenizer", "kind": "detokenize", "reason": "bodies"}
    await poll(lambda: sample(metrics, "tokenvault_rate_limited_requests_total", labels) == refused,
               "the slow bodies past the key's share to be refused")
    # The key's own share is held by its slow bodies; other keys are served, whatever their kind.
    tokenized = await client.post("/v1/tokenize", data=json.dumps({"values": ["other key"]}),
                                  headers={**JSON, **key_ring.bearer("tokenizer")})
    assert tokenized.status == 200
    token = (await tokenized.json())["tokens"][0]
    detokenized = await client.post("/v1/detokenize", data=json.dumps({"tokens": [token]}),
                                    headers={**JSON, **key_ring.bearer("full")})
    assert detokenized.status == 200 and (await detokenized.json()) == {"values": ["other key"]}
    # The slow key itself is told to send fewer at once (429), not that the node is down.
    extra = await client.post("/v1/detokenize", data=json.dumps({"tokens": [token]}),
                              headers={**JSON, "Authorization": f"Bearer {slow_key}"})
    await expect_problem(extra, 429, (slow_key, token))
    assert int(extra.headers["Retry-After"]) >= 1
    assert service.detokenize_calls == [[token]]


async def test_past_the_nodes_body_reads_a_request_is_503_overloaded_with_retry_after_1(
    make_client: ClientFactory, key_ring: KeyRing, service: FakeService, connections: list[RawConnection]
) -> None:
    """docs/api.md, [http] max_body_reads: once the node receives that many bodies at once, whatever their
    keys, another request is 503 `overloaded` with Retry-After: 1, and is served again once they are gone."""
    client = await make_client(HttpLimits(max_body_reads=4, max_body_reads_per_key=2))
    # Two keys, each at its own share: the node's four are held.
    for name, path, start in (("detokenizer", "/v1/detokenize", b'{"tokens": ["'),
                              ("tokenizer", "/v1/tokenize", b'{"values": ["')):
        for _ in range(2):
            connection = await RawConnection.open(client)
            await connection.send(request_head(path, key_ring.keys[name], 1000) + start)
            connections.append(connection)
    body = json.dumps({"tokens": [fake_token(1, "v")]})
    headers = {**JSON, **key_ring.bearer("full")}
    refused = None
    deadline = asyncio.get_running_loop().time() + DEADLINE_SECONDS
    while asyncio.get_running_loop().time() < deadline:  # until the server has taken all four bodies
        refused = await client.post("/v1/detokenize", data=body, headers=headers)
        if refused.status == 503:
            break
        await asyncio.sleep(0.01)
    assert refused is not None
    problem = await expect_problem(refused, 503, (key_ring.keys["full"],))
    assert problem["type"].endswith(":overloaded") and refused.headers["Retry-After"] == "1"
    for connection in connections:
        connection.close()
    connections.clear()
    served = None
    while asyncio.get_running_loop().time() < deadline + DEADLINE_SECONDS:
        served = await client.post("/v1/detokenize", data=body, headers=headers)
        if served.status == 200:
            break
        await asyncio.sleep(0.01)
    assert served is not None and served.status == 200


async def test_eight_mib_of_empty_objects_is_refused_before_parsing(
    client: TestClient, key_ring: KeyRing, service: FakeService
) -> None:
    """Audit: one 8 MiB {"tokens":[{},{},...]} was parsed whole (RSS 62 -> 300 MB, 0.93 s stall).

    The structure bound refuses it from a count of its bytes; tests/http/test_http_abuse_real_node.py
    measures memory and the event loop on a real node.
    """
    headers = {**JSON, **key_ring.bearer("full")}
    limit = HttpLimits().max_body_bytes
    objects = b'{"tokens":[' + b",".join([b"{}"] * ((limit - 20) // 3)) + b"]}"
    numbers = b'{"tokens":[' + b",".join([b"0"] * ((limit - 20) // 2)) + b"]}"
    assert len(objects) <= limit and len(numbers) <= limit
    response = await client.post("/v1/detokenize", data=objects, headers=headers)
    problem = await expect_problem(response, 400)
    assert "arrays and objects" in problem["detail"]
    response = await client.post("/v1/detokenize", data=numbers, headers=headers)
    problem = await expect_problem(response, 413)
    assert "JSON values" in problem["detail"]
    assert service.detokenize_calls == []


# ---------------------------------------------------------------- rate limits


async def test_a_key_past_its_rate_limit_gets_429_while_another_key_is_served(
    make_client: ClientFactory, key_ring: KeyRing, metrics: Metrics, service: FakeService
) -> None:
    # A rate of one request per 1000 s: nothing refills while the test runs.
    limits = HttpLimits(rate_limits={"tokenize": BucketLimit(rate_per_second=0.001, burst=2)})
    client = await make_client(limits)
    value = "rate-limited-value-4711"
    body = json.dumps({"values": [value]})
    tokenizer = {**JSON, **key_ring.bearer("tokenizer")}
    assert [(await client.post("/v1/tokenize", data=body, headers=tokenizer)).status for _ in range(2)] == [200, 200]
    limited = await client.post("/v1/tokenize", data=body, headers=tokenizer)
    await expect_problem(limited, 429, (key_ring.keys["tokenizer"], value))
    retry_after = limited.headers["Retry-After"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 1000
    assert len(service.tokenize_calls) == 2
    # Another key, and the same key's other kinds, are still served.
    assert (await client.post("/v1/tokenize", data=body, headers={**JSON, **key_ring.bearer("full")})).status == 200
    token = fake_token(1, value)
    assert (await client.post("/v1/detokenize", data=json.dumps({"tokens": [token]}),
                              headers={**JSON, **key_ring.bearer("full")})).status == 200
    labels = {"key": "tokenizer", "kind": "tokenize", "reason": "rate"}
    assert sample(metrics, "tokenvault_rate_limited_requests_total", labels) == 1
    rendered = (await (await client.get("/metrics")).text())
    assert key_ring.keys["tokenizer"] not in rendered


async def test_delete_and_retokenize_draw_from_the_keys_tokenize_bucket(
    make_client: ClientFactory, key_ring: KeyRing, service: FakeService
) -> None:
    """docs/api.md, scopes: delete and re-tokenize requests count against a key's `tokenize` rate limit, so a
    key cannot dodge its write limit through them."""
    limits = HttpLimits(rate_limits={"tokenize": BucketLimit(rate_per_second=0.001, burst=2)})
    client = await make_client(limits)
    full = {**JSON, **key_ring.bearer("full")}
    tokens = json.dumps({"tokens": [fake_token(1, "v")]})
    assert (await client.post("/v1/tokens/delete", data=tokens, headers=full)).status == 200
    assert (await client.post("/v1/retokenize", data=tokens, headers=full)).status == 200
    for path, body in (("/v1/tokenize", json.dumps({"values": ["v"]})), ("/v1/tokens/delete", tokens),
                       ("/v1/retokenize", tokens)):
        limited = await client.post(path, data=body, headers=full)
        await expect_problem(limited, 429, (key_ring.keys["full"],))
    assert len(service.lifecycle_calls) == 2 and service.tokenize_calls == []


async def test_a_rate_limited_request_is_refused_before_its_body_is_read(
    make_client: ClientFactory, key_ring: KeyRing, connections: list[RawConnection]
) -> None:
    limits = HttpLimits(rate_limits={"detokenize": BucketLimit(rate_per_second=0.001, burst=1)},
                        body_timeout_seconds=DEADLINE_SECONDS * 3)
    client = await make_client(limits)
    token = fake_token(1, "v")
    headers = {**JSON, **key_ring.bearer("detokenizer")}
    assert (await client.post("/v1/detokenize", data=json.dumps({"tokens": [token]}), headers=headers)).status == 200
    connection = await RawConnection.open(client)
    connections.append(connection)
    # Headers only: the answer comes at once, without waiting for the body (nor its timeout).
    await connection.send(request_head("/v1/detokenize", key_ring.keys["detokenizer"], 1000))
    head = await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), DEADLINE_SECONDS)
    assert status_of(head) == 429 and b"Retry-After: " in head


async def test_admin_endpoints_share_the_admin_bucket(
    make_client: ClientFactory, key_ring: KeyRing
) -> None:
    client = await make_client(HttpLimits(rate_limits={"admin": BucketLimit(rate_per_second=0.001, burst=2)}))
    admin = key_ring.bearer("admin")
    assert (await client.get("/v1/admin/epochs", headers=admin)).status == 200
    assert (await client.get("/v1/admin/cluster", headers=admin)).status == 200
    limited = await client.post("/v1/admin/epochs", data="{}", headers={**JSON, **admin})
    await expect_problem(limited, 429)
    # Unauthenticated endpoints are never rate limited by key.
    assert (await client.get("/health")).status == 200


# ---------------------------------------------------------------- the log of refused connections


async def test_connections_past_the_cap_are_logged_summed_at_most_a_line_a_second_with_their_count(
    make_client: ClientFactory, metrics: Metrics, connections: list[RawConnection], tmp_path: Path
) -> None:
    """docs/logs.md, `http.connection_refused` (docs/failure-modes.md, Slowloris): a connection past the cap
    is logged at warning with `reason` "max_connections", `max_connections` (the bound in force) and `count`;
    refusals within the second after a line are summed into the next line, a second later. Connections
    within the cap log nothing."""
    from datetime import datetime

    from tokenvault.api import http as http_module
    from tokenvault.logs import configure_logging, reset_logging

    summed = http_module._REFUSED_CONNECTIONS  # the emitter's own (module-level) summed event
    summed.flush()  # what an earlier test may have left waiting is logged now, before this test's log
    log_path = tmp_path / "node.log"
    configure_logging("test", log_path, "debug")
    try:
        client = await make_client(HttpLimits(max_connections=8))
        server = client.server.http_server
        for _ in range(8):
            connection = await RawConnection.open(client)
            await connection.send(b"GET /health HTTP/1.1\r\n")  # held open, headers unfinished
            connections.append(connection)
        await poll(lambda: len(server.connections) == 8, "the eight held connections to be counted")

        def refused_lines() -> list[dict]:
            return [line for line in map(json.loads, log_path.read_text().splitlines())
                    if line["event"] == "http.connection_refused"]

        assert refused_lines() == [] and sample(metrics, "tokenvault_http_connections_refused_total") == 0

        async def refused_once() -> None:
            extra = await RawConnection.open(client)
            connections.append(extra)
            assert status_of(await extra.read_all()) == 503

        await refused_once()
        await poll(lambda: len(refused_lines()) == 1, "the first refusal's line")
        # Two more, within the second after that line: summed into one line, written when the second ends.
        await asyncio.gather(refused_once(), refused_once())
        assert len(refused_lines()) == 1, "a refusal within the second after a line was written at once"
        await poll(lambda: len(refused_lines()) == 2, "the summed line of the next two refusals")
    finally:
        reset_logging()
    lines = refused_lines()
    assert [(line["level"], line["reason"], line["max_connections"], line["count"]) for line in lines] == [
        ("warning", "max_connections", 8, 1), ("warning", "max_connections", 8, 2)]
    assert sample(metrics, "tokenvault_http_connections_refused_total") == 3
    # At most one line a second: the second line was written an interval after the first. (The interval is
    # kept on the loop's clock, a line's `ts` read from the wall clock just after: 10 ms allows for that.)
    first, second = (datetime.fromisoformat(line["ts"]) for line in lines)
    assert (second - first).total_seconds() >= http_module.FLOOD_LOG_INTERVAL_SECONDS - 0.01


# ---------------------------------------------------------------- clients that stop reading or go away


async def test_a_backup_client_that_reads_nothing_is_cut_off_and_its_backup_slot_freed(
    make_client: ClientFactory, key_ring: KeyRing, service: FakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that stops reading GET /v1/admin/backup is disconnected after the header timeout, as for
    any answer: the backup ends as `backup.aborted` (client gone), its checkpoint is closed, and the
    node's backup slot is free for the next."""
    closed: list[FakeBackupStream] = []

    class EndlessBackup(FakeBackupStream):
        total_bytes = 1 << 40

        async def chunks(self, chunk_bytes: int) -> AsyncIterator[bytes]:
            piece = b"\0" * chunk_bytes
            while True:
                self.sent_bytes += len(piece)
                yield piece

        async def close(self) -> None:
            closed.append(self)

    streams: list[FakeBackupStream] = [EndlessBackup(), FakeBackupStream()]

    async def open_backup() -> FakeBackupStream:
        return streams.pop(0)

    monkeypatch.setattr(service, "open_backup", open_backup)
    client = await make_client(HttpLimits(header_timeout_seconds=SHORT_SECONDS, max_backup_streams=1))
    admin = key_ring.bearer("admin")
    reader, writer = await asyncio.open_connection(client.host, client.port, limit=1024)
    try:
        with capture_logs() as logs:
            writer.write(f"GET /v1/admin/backup HTTP/1.1\r\nHost: test\r\nAuthorization: {admin['Authorization']}"
                         f"\r\n\r\n".encode())  # and nothing of the answer is read
            await poll(lambda: closed != [], "the backup of a client that reads nothing to end")
        assert [entry["reason"] for entry in logs if entry["event"] == "backup.aborted"] == ["client gone"]
        assert (await client.get("/v1/admin/backup", headers=admin)).status == 200  # the slot is free
    finally:
        writer.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> ClusterTlsFiles:
    return create_cluster_tls(tmp_path_factory.mktemp("abuse-tls") / "tls", {"n1": ["127.0.0.1"]})


async def test_a_tls_client_gone_right_after_expect_100_continue_is_not_a_500(
    tls_files: ClusterTlsFiles, key_ring: KeyRing, service: FakeService, metrics: Metrics
) -> None:
    """A client that sends `Expect: 100-continue` and closes at once (over TLS the server's side closes
    with it) is gone before its 100 Continue: its body read fails as a client gone mid-body does (400,
    which no one reads), never logged as `http.unexpected_error` nor counted as a 500."""
    server = http_server(build_app(service, key_ring.table(), HttpLimits(), metrics))
    await server.start("127.0.0.1", 0, ssl_context=http_server_context(tls_files.nodes["n1"]))
    address = server.addresses[0][:2]
    labels = {"route": "/v1/tokenize", "method": "POST"}
    try:
        with capture_logs() as logs:
            for _ in range(5):
                reader, writer = await asyncio.open_connection(
                    *address, ssl=http_client_context(tls_files.ca_cert_file))
                writer.write(request_head("/v1/tokenize", key_ring.keys["tokenizer"], 20)[:-2]
                             + b"Expect: 100-continue\r\n\r\n")
                writer.close()  # close_notify right behind the head
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            await poll(lambda: sample(metrics, "tokenvault_http_requests_total", {**labels, "status": "400"})
                       + sample(metrics, "tokenvault_http_requests_total", {**labels, "status": "500"}) == 5,
                       "the five requests to be answered")
        failures = [entry for entry in logs if entry["event"] == "http.unexpected_error"]
        assert not failures, f"{len(failures)} clients gone before 100 Continue were logged as errors"
        assert sample(metrics, "tokenvault_http_requests_total", {**labels, "status": "500"}) == 0
    finally:
        await server.close(0)
