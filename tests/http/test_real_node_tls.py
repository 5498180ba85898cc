"""A real `tokenvault serve` node serves its HTTP API over TLS by default, verified against the cluster CA."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _real_node import RealNode, running_real_node
from tokenvault.client.vault import Client, NoNodeAvailable
from tokenvault.crypto.tls import http_client_context

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    with running_real_node(tmp_path_factory.mktemp("tls-node")) as node:
        yield node


def _host_port(node: RealNode) -> tuple[str, int]:
    return "127.0.0.1", node.node.http_port


def test_the_node_url_is_https_and_cluster_json_names_the_ca(tls_node: RealNode) -> None:
    document = json.loads(tls_node.spec.cluster_file.read_text())
    assert document["ca_file"] == str(tls_node.ca_file) and Path(document["ca_file"]).is_absolute()
    assert document["nodes"][0]["http_url"].startswith("https://127.0.0.1:")


def test_requests_over_tls_verified_against_the_ca(tls_node: RealNode) -> None:
    reply = tls_node.request("GET", "/health")
    assert reply.status == 200 and reply.json()["node_id"] == "n1"
    with Client(tls_node.base_url, tls_node.full_key, ca_file=tls_node.ca_file) as vault:
        tokens = vault.tokenize(["over-tls"]).tokens
        assert vault.detokenize(tokens) == ("over-tls",)


def test_without_the_ca_the_node_is_not_trusted(tls_node: RealNode) -> None:
    with Client(tls_node.base_url, tls_node.full_key, deadline_seconds=0.2) as vault:
        with pytest.raises(NoNodeAvailable, match="certificate verify failed"):
            vault.health(tls_node.base_url)


def test_plain_http_on_the_tls_port_gets_no_api_answer(tls_node: RealNode) -> None:
    received = b""
    with socket.create_connection(_host_port(tls_node), timeout=5) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            while chunk := raw.recv(65536):
                received += chunk
        except ConnectionError:
            pass
    # At most a TLS alert comes back, never an HTTP answer.
    assert not received.startswith(b"HTTP/") and b'"status"' not in received


def _handshake(node: RealNode, context: ssl.SSLContext) -> tuple[bytes, str, bytes]:
    """One TLS handshake with the node through memory buffers: the first record this client sent (its
    ClientHello), the outcome (the version agreed, or the client's reason for failing) and the first
    bytes the node sent back (empty if it only closed)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    first = answer = b""
    with socket.create_connection(_host_port(node), timeout=5) as raw:
        while True:
            try:
                tls.do_handshake()
                return first, tls.version() or "", answer
            except ssl.SSLWantReadError:
                sent = outgoing.read()
                first = first or sent
                raw.sendall(sent)
                try:
                    received = raw.recv(65536)
                except ConnectionResetError:
                    received = b""
                answer = answer or received
                if received:
                    incoming.write(received)
                else:
                    incoming.write_eof()
            except ssl.SSLError as error:
                return first, str(error.reason), answer


# A ClientHello record: type 22, record version, length, then handshake type 1, length, and client_version.
CLIENT_HELLO_VERSION = slice(9, 11)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused_by_the_node_and_1_2_accepted(tls_node: RealNode) -> None:
    """docs/security.md: the HTTP port takes TLS 1.2 and later. The 1.1 hello is shown to have been sent,
    so the refusal is the node's, not this client's OpenSSL declining to offer 1.1."""
    outcomes = {}
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_1):
        context = http_client_context(tls_node.ca_file)
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = version
        with contextlib.suppress(ssl.SSLError):
            context.set_ciphers("DEFAULT:@SECLEVEL=0")  # lets this client offer 1.1 at all
        outcomes[version] = _handshake(tls_node, context)
    assert outcomes[ssl.TLSVersion.TLSv1_2][1] == "TLSv1.2"
    hello, outcome, answer = outcomes[ssl.TLSVersion.TLSv1_1]
    if not hello:
        pytest.skip(f"this OpenSSL will not offer TLS 1.1 ({outcome}): the node is never asked")
    assert hello[0] == 22 and hello[5] == 1 and hello[CLIENT_HELLO_VERSION] == b"\x03\x02", hello[:11]
    # The node answers a fatal protocol_version alert (a record of type 21: level 2, description 70),
    # or only closes the connection. A 1.1 client may read that alert's record as a wrong version.
    if answer:
        assert answer[0] == 21 and answer[5:7] == b"\x02\x46", answer[:8]
        assert outcome in ("TLSV1_ALERT_PROTOCOL_VERSION", "WRONG_VERSION_NUMBER"), outcome
    else:
        assert outcome in ("UNEXPECTED_EOF_WHILE_READING", "EOF"), outcome


# The node's default [http] header_timeout_ms, and how much later than it a close may come.
HEADER_TIMEOUT_SECONDS = 10.0
CLOSE_MARGIN_SECONDS = 3.0


def test_a_connection_that_never_finishes_its_tls_handshake_is_closed_within_the_header_timeout(
        tls_node: RealNode) -> None:
    """docs/failure-modes.md, slow clients: a TLS connection is a connection of the HTTP server (counted,
    its header timer started) only once its handshake is done; one that opens and sends nothing is
    closed after the header timeout, not the event loop's own 60 s."""
    started = time.monotonic()
    with socket.create_connection(_host_port(tls_node), timeout=HEADER_TIMEOUT_SECONDS * 3) as raw:
        try:
            closed = raw.recv(1) == b""
        except ConnectionError:
            closed = True
        except TimeoutError:
            closed = False
    waited = time.monotonic() - started
    assert closed and waited <= HEADER_TIMEOUT_SECONDS + CLOSE_MARGIN_SECONDS, waited


def test_its_http_worker_logs_worker_started_and_with_one_worker_opens_no_view_of_the_store(
        tls_node: RealNode) -> None:
    """docs/logs.md, `worker.started` (`index`, `pid`): the node's one HTTP worker serves its listening
    socket. The workers read the store themselves only from 2 workers on ([http] store_reads absent), so
    this node logs no `worker.store_view_opened`."""
    lines = [json.loads(line) for line in tls_node.node.log_file.read_text().splitlines() if line.strip()]
    started = [line for line in lines if line["event"] == "worker.started"]
    assert [(line["level"], line["index"], line["process"]) for line in started] == [("info", 1, "worker-1")]
    worker = started[0]["pid"]
    command = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
    parent = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert b"tokenvault.api.worker" in command and parent == tls_node.pid
    assert command[command.index(b"--index") + 1] == b"1"
    assert [line for line in lines if line["event"] == "worker.store_view_opened"] == []
