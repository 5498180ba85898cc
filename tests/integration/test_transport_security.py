"""Real node processes: TLS by default, the explicit plain mode, and what an unauthenticated peer costs.

The audit probe this answers: one unauthenticated 16 MiB frame on the peer port
raised a node's RSS from 29 to 205 MB (three at once: 684 MB) because the frame
was buffered whole before the handshake. Now the handshake reads at most 1 KiB
of frame and a bounded number of unauthenticated connections.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import socket
import ssl
import struct
import time
from collections.abc import Callable

import pytest
from cryptography import x509

from harness import HTTP_WORKERS, ClusterHarness, fast_settings, memory_bytes, reset_peak_memory, wait_for
from tokenvault.config import PeerConfig, load_config
from tokenvault.core.transport import GREETING, HANDSHAKE_TIMEOUT_SECONDS
from tokenvault.crypto.tls import create_node_certificate, http_client_context

pytestmark = pytest.mark.integration

FRAME_BYTES = 16 * 1024 * 1024
ATTACKERS = 3
RSS_GROWTH_BYTES_MAX = 8 * 1024 * 1024
CLOSE_TIMEOUT_SECONDS = 5.0
MAX_UNAUTHENTICATED = PeerConfig().max_unauthenticated_connections  # 8 (docs/failure-modes.md)


def send_unauthenticated_frame(port: int) -> tuple[str, bool]:
    """Connect and send a 16 MiB frame at once; returns (our address, whether the node closed the link)."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLOSE_TIMEOUT_SECONDS) as connection:
        address = "%s:%d" % connection.getsockname()[:2]
        try:
            connection.sendall(struct.pack(">I", FRAME_BYTES) + b"\x00" * FRAME_BYTES)
        except (BrokenPipeError, ConnectionResetError):
            return address, True  # closed before we could even write it all
        except TimeoutError:
            return address, False  # the node kept the link open and stopped reading: not what we want
        try:
            while connection.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return address, False
        return address, True


def attack(harness: ClusterHarness, node_id: str) -> list[tuple[str, bool]]:
    port = harness.node(node_id).peer_port
    with concurrent.futures.ThreadPoolExecutor(max_workers=ATTACKERS) as pool:
        return list(pool.map(send_unauthenticated_frame, [port] * ATTACKERS))


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
async def test_unauthenticated_16_mib_frames_cost_a_node_almost_no_memory(
        make_cluster: Callable[..., ClusterHarness], tls: bool) -> None:
    harness = make_cluster(settings=dataclasses.replace(fast_settings(), tls=tls))
    primary = harness.wait_for_primary()
    target = next(node_id for node_id in harness.node_ids if node_id != primary)
    pid = harness.pid(target)
    assert pid is not None
    reset_peak_memory(pid)
    before = memory_bytes(pid, "VmRSS")
    mark = harness.log_mark(target)
    results = attack(harness, target)
    assert all(closed for _, closed in results), results
    # The peak, not the RSS afterwards: frames buffered and freed on close must show too.
    peak = memory_bytes(pid, "VmHWM")
    assert peak - before < RSS_GROWTH_BYTES_MAX, f"peak RSS rose from {before} to {peak} bytes"
    # Every refusal is counted in the log under the attacker's host (at most a line a second per host and
    # reason, so a flood is not a flood of lines); the node stays in the cluster and serves.
    failures = wait_for(lambda: (lambda found: found if sum(event["count"] for event in found) >= ATTACKERS
                                 else None)(harness.find_events(target, "peer.handshake_failed", mark)),
                        5, "the refusals in the log")
    assert {event["remote"] for event in failures} == {address.rsplit(":", 1)[0] for address, _ in results}
    if not tls:
        assert {event["reason"] for event in failures} == {"ProtocolError"}
    async with harness.client(target) as client:
        tokens = (await client.tokenize(["after-the-attack"])).tokens
    async with harness.client() as client:
        assert await client.detokenize(tokens) == ("after-the-attack",)


async def test_a_plain_cluster_works_when_asked_for_and_warns(make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster(settings=dataclasses.replace(fast_settings(), tls=False))
    assert harness.ca_file is None
    assert all(harness.url(node_id).startswith("http://") for node_id in harness.node_ids)
    primary = harness.wait_for_primary()
    backup = next(node_id for node_id in harness.node_ids if node_id != primary)
    async with harness.client(backup) as client:  # a backup forwards the write over a plain peer link
        tokens = (await client.tokenize(["plain-value"])).tokens
    async with harness.client() as client:
        assert await client.detokenize(tokens) == ("plain-value",)
    for node_id in harness.node_ids:
        assert harness.find_events(node_id, "node.tls_disabled"), f"{node_id} did not warn about plain mode"


async def test_a_tls_cluster_uses_https_and_mutual_tls_links(make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster()
    assert harness.ca_file is not None and harness.ca_file.is_file()
    assert all(harness.url(node_id).startswith("https://") for node_id in harness.node_ids)
    primary = harness.wait_for_primary()
    backup = next(node_id for node_id in harness.node_ids if node_id != primary)
    async with harness.client(backup) as client:  # forwarded to the primary over a mutual-TLS peer link
        tokens = (await client.tokenize(["tls-value"])).tokens
    async with harness.client() as client:
        assert await client.detokenize(tokens) == ("tls-value",)
    for node_id in harness.node_ids:
        assert not harness.find_events(node_id, "node.tls_disabled")
        assert not harness.find_events(node_id, "peer.handshake_failed")
    # A plain-TCP stranger on the peer port is refused at the TLS layer and logged with its address.
    target = harness.node_ids[-1]
    mark = harness.log_mark(target)
    with socket.create_connection(("127.0.0.1", harness.node(target).peer_port), timeout=5) as stranger:
        address = "%s:%d" % stranger.getsockname()[:2]
        stranger.sendall(b"\x00\x00\x00\x10" + b"hello, let me in")
        deadline = time.monotonic() + CLOSE_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                if not stranger.recv(65536):
                    break
            except ConnectionResetError:
                break
    refused = harness.wait_for_event(target, "peer.handshake_failed", mark, remote=address.rsplit(":", 1)[0])
    # The bytes went to the TLS layer, which waited for a handshake that never came; a plain link would
    # have read them as a frame and refused it as one (ProtocolError, the plain-mode test above).
    assert refused["reason"] != "ProtocolError", refused
    # A TLS client that trusts the cluster CA but has no certificate of its own is refused by the TLS
    # handshake itself (mutual TLS), before any frame.
    mark = harness.log_mark(target)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(harness.ca_file)
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", harness.node(target).peer_port), timeout=5) as raw:
        assert raw.recv(len(GREETING), socket.MSG_WAITALL) == GREETING
        try:
            with context.wrap_socket(raw) as certless:  # TLS 1.3: the refusal arrives with the first read
                certless.sendall(b"\x00\x00\x00\x10" + b"hello, let me in")
                answered = certless.recv(1)
        except (ssl.SSLError, ConnectionError):
            answered = b""
        assert answered == b"", "a peer without a certificate was answered"
    certless_refused = harness.wait_for_event(target, "peer.handshake_failed", mark)
    assert certless_refused["reason"] in ("SSLError", "SSLCertVerificationError"), certless_refused


def _wait_closed(connection: socket.socket, timeout_seconds: float) -> float | None:
    """Read until the node closes the connection; the monotonic time it did, or None if it did not in time."""
    deadline = time.monotonic() + timeout_seconds
    while (left := deadline - time.monotonic()) > 0:
        connection.settimeout(left)
        try:
            if not connection.recv(65536):
                return time.monotonic()
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic()
        except TimeoutError:
            return None
    return None


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
async def test_peer_port_squatters_are_capped_and_closed_after_the_handshake_deadline(
        make_cluster: Callable[..., ClusterHarness], tls: bool) -> None:
    """docs/failure-modes.md, "many connect and say nothing": on a real node, past
    `peer.max_unauthenticated_connections` unauthenticated connections a new one is closed at once (it is
    not even greeted), each squatter is closed once the handshake deadline passes, and the node serves on."""
    harness = make_cluster(settings=dataclasses.replace(fast_settings(), tls=tls))
    primary = harness.wait_for_primary()
    target = next(node_id for node_id in harness.node_ids if node_id != primary)
    port = harness.node(target).peer_port
    mark = harness.log_mark(target)
    squatters: list[tuple[socket.socket, float]] = []
    try:
        for _ in range(MAX_UNAUTHENTICATED):
            squatter = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_TIMEOUT_SECONDS)
            # The greeting shows the node has taken this connection and counts it as unauthenticated.
            assert squatter.recv(len(GREETING), socket.MSG_WAITALL) == GREETING
            squatters.append((squatter, time.monotonic()))
        with socket.create_connection(("127.0.0.1", port), timeout=CLOSE_TIMEOUT_SECONDS) as one_too_many:
            opened = time.monotonic()
            closed = _wait_closed(one_too_many, CLOSE_TIMEOUT_SECONDS)
            assert closed is not None and closed - opened < 1.0, "the connection past the cap was not closed at once"
        refused = harness.wait_for_event(target, "peer.connection_refused", mark)
        assert (refused["reason"], refused["limit"], refused["count"]) == ("too_many_unauthenticated",
                                                                           MAX_UNAUTHENTICATED, 1), refused
        for squatter, greeted in squatters:
            closed = _wait_closed(squatter, HANDSHAKE_TIMEOUT_SECONDS + CLOSE_TIMEOUT_SECONDS)
            assert closed is not None, "a squatter outlived the handshake deadline"
            # Closed by the deadline (counted from the accept, just before the greeting), not before it.
            assert HANDSHAKE_TIMEOUT_SECONDS - 0.5 < closed - greeted < HANDSHAKE_TIMEOUT_SECONDS + 2.0, closed - greeted
    finally:
        for squatter, _ in squatters:
            squatter.close()
    timed_out = harness.wait_for_event(target, "peer.handshake_failed", mark)
    assert timed_out["reason"] == "TimeoutError", timed_out
    # The members' own links were never refused, and the node serves through them.
    async with harness.client(target) as client:
        tokens = (await client.tokenize(["after-the-squatters"])).tokens
    async with harness.client() as client:
        assert await client.detokenize(tokens) == ("after-the-squatters",)


def _served_certificate(port: int, context: ssl.SSLContext, peer_port: bool = False) -> x509.Certificate:
    """The certificate a node presents on a new TLS connection to `port` (a peer port greets first)."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLOSE_TIMEOUT_SECONDS) as raw:
        if peer_port:
            assert raw.recv(len(GREETING), socket.MSG_WAITALL) == GREETING
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as wrapped:
            der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_a_node_loads_new_certificate_files_on_sighup_and_keeps_the_old_ones_when_they_are_bad(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    """docs/security.md, certificate rotation: new files for n1, signed by the cluster CA, and a SIGHUP to its
    core. New HTTPS connections (through every HTTP worker) and new peer connections get the new certificate,
    the expiry gauge follows, and the cluster serves on; files that do not check out are refused
    (tls.reload_failed) and the node goes on with the ones it had."""
    harness = make_cluster()
    node = "n1"
    files = load_config(harness.node(node).config).tls
    assert files is not None and harness.ca_file is not None
    http_port, peer_port = harness.node(node).http_port, harness.node(node).peer_port
    https = http_client_context(harness.ca_file)
    # The peer port wants a member's certificate: n3's, as a member dialling n1 would present.
    peer = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    peer.check_hostname, peer.verify_mode = False, ssl.CERT_NONE
    member = load_config(harness.node("n3").config).tls
    assert member is not None
    peer.load_cert_chain(member.cert_file, member.key_file)
    old = _served_certificate(http_port, https)
    assert _served_certificate(peer_port, peer, peer_port=True).serial_number == old.serial_number

    # Written beside the old files and renamed over them, as a rotation should: never half a file.
    staged_cert, staged_key = files.cert_file.with_suffix(".new.crt"), files.key_file.with_suffix(".new.key")
    new = create_node_certificate(harness.ca_file, harness.directory / "tls" / "ca.key", node, ["127.0.0.1"],
                                  staged_cert, staged_key, valid_days=30)
    os.replace(staged_key, files.key_file)
    os.replace(staged_cert, files.cert_file)
    assert new.serial_number != old.serial_number
    mark = harness.log_mark(node)
    pid = harness.pid(node)
    assert pid is not None
    os.kill(pid, signal.SIGHUP)
    reloaded = harness.wait_for_event(node, "tls.reloaded", mark)
    assert reloaded["node_expires_at"] == new.not_valid_after_utc.isoformat()
    wait_for(lambda: len(harness.find_events(node, "worker.tls_reloaded", mark)) == HTTP_WORKERS, 5,
             "every HTTP worker to reload")
    for _ in range(16):  # new connections, spread over the workers by the kernel
        assert _served_certificate(http_port, https).serial_number == new.serial_number
    assert _served_certificate(peer_port, peer, peer_port=True).serial_number == new.serial_number
    gauge = [line for line in harness.metrics_text(node).splitlines()
             if line.startswith('tokenvault_tls_certificate_expiry_timestamp_seconds{certificate="node"}')]
    assert [float(line.split()[-1]) for line in gauge] == [new.not_valid_after_utc.timestamp()]

    # Files that do not check out (a certificate for another node) are refused; nothing changes.
    other = load_config(harness.node("n2").config).tls
    assert other is not None
    saved = files.cert_file.read_bytes()
    files.cert_file.write_bytes(other.cert_file.read_bytes())
    mark = harness.log_mark(node)
    os.kill(pid, signal.SIGHUP)
    failed = harness.wait_for_event(node, "tls.reload_failed", mark)
    assert "does not name node 'n1'" in failed["reason"] or "does not belong" in failed["reason"], failed
    assert not harness.find_events(node, "worker.tls_reloaded", mark)
    assert _served_certificate(http_port, https).serial_number == new.serial_number
    files.cert_file.write_bytes(saved)
    async with harness.client("n2") as client:  # forwarded over the peer links
        tokens = (await client.tokenize(["after-the-rotation"])).tokens
    async with harness.client(node) as client:
        assert await client.detokenize(tokens) == ("after-the-rotation",)


def test_a_sighup_while_the_node_starts_is_a_reload_and_never_ends_it(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    """docs/security.md, certificate rotation: the SIGHUP may come at any time, the node's start included. One
    sent as soon as the node says it started, while its HTTP workers are still starting, reloads the files
    and the node serves on (it used to end the node, unlogged: the handler was set once the workers served)."""
    harness = make_cluster(nodes=1)
    pid, mark = harness.relaunch_in_its_start("n1")
    os.kill(pid, signal.SIGHUP)
    harness.wait_for_event("n1", "tls.reloaded", mark)
    harness.wait_for_event("n1", "workers.started", mark, timeout_seconds=30)
    health = wait_for(lambda: harness.health("n1"), 10, "n1 to answer /health")
    assert health["role"] == "primary" and harness.exit_status("n1") is None and harness.pid("n1") == pid


def test_a_sigterm_while_the_node_starts_is_a_graceful_stop_once_the_start_is_done(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    """docs/security.md: the signals are taken from the node's first moment. A SIGTERM while the workers
    start is a stop like any other: the start finishes, then node.stopping and node.stopped, exit 0 (it
    used to end the process by the default action, exit -15, nothing logged)."""
    harness = make_cluster(nodes=1)
    pid, mark = harness.relaunch_in_its_start("n1")
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: harness.exit_status("n1") is not None, 30, "n1 to exit")
    assert harness.exit_status("n1") == 0
    assert [event["reason"] for event in harness.find_events("n1", "node.stopping", mark)] == ["signal"]
    assert harness.find_events("n1", "workers.started", mark) and harness.find_events("n1", "node.stopped", mark)
