"""Unit tests of the integration suite's fault-injecting TCP proxy, against a local echo server.

Every wait polls with a deadline; a test that expects bytes NOT to arrive proves
it from the proxy's counters and from what arrives after healing, not by sleeping.
"""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from faultproxy import FaultProxy  # noqa: E402

DEADLINE_SECONDS = 5.0


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes every byte and remembers everything it received (all connections, in order)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.received = bytearray()
        self.lock = threading.Lock()
        self.connections = 0

    @property
    def port(self) -> int:
        return self.server_address[1]

    def received_bytes(self) -> bytes:
        with self.lock:
            return bytes(self.received)


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: EchoServer = self.server  # type: ignore[assignment]
        with server.lock:
            server.connections += 1
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            with server.lock:
                server.received.extend(data)
            try:
                self.request.sendall(data)
            except OSError:
                return


def wait_until(predicate: Callable[[], bool], what: str, timeout_seconds: float = DEADLINE_SECONDS) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def receive_exactly(sock: socket.socket, count: int) -> bytes:
    sock.settimeout(DEADLINE_SECONDS)
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {count} bytes")
        data.extend(chunk)
    return bytes(data)


def connection_ends(sock: socket.socket) -> bool:
    """True when the other side closed or reset the connection (within the deadline)."""
    sock.settimeout(DEADLINE_SECONDS)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ConnectionAbortedError):
        return True


def new_connection_is_refused(proxy: FaultProxy) -> bool:
    """True when a new connection is reset, whether during connect() or just after it."""
    try:
        client = connect(proxy)
    except (ConnectionResetError, ConnectionRefusedError):
        return True
    with client:
        return connection_ends(client)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(DEADLINE_SECONDS)


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port, name="test") as running:
        yield running


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE_SECONDS)


def test_passes_bytes_both_ways_on_an_ephemeral_port(proxy: FaultProxy, echo: EchoServer) -> None:
    assert proxy.port != echo.port and proxy.port > 0
    with connect(proxy) as client:
        client.sendall(b"hello")
        assert receive_exactly(client, 5) == b"hello"
    statistics = proxy.statistics()
    assert statistics.connections_accepted == 1
    assert statistics.forwarded_bytes == {"a->b": 5, "b->a": 5}
    assert statistics.dropped_bytes == {"a->b": 0, "b->a": 0}


def test_large_payload_arrives_intact_and_in_order(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    with connect(proxy) as client:
        sender = threading.Thread(target=client.sendall, args=(payload,))
        sender.start()
        assert receive_exactly(client, len(payload)) == payload
        sender.join(DEADLINE_SECONDS)


def test_drop_discards_bytes_until_healed(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as client:
        client.sendall(b"before")
        assert receive_exactly(client, 6) == b"before"
        proxy.drop()
        client.sendall(b"lost!")
        wait_until(lambda: proxy.statistics().dropped_bytes["a->b"] == 5, "the proxy to drop 5 bytes")
        proxy.heal()
        client.sendall(b"after")
        # Only the bytes sent after healing come back: the dropped ones never reached the server.
        assert receive_exactly(client, 5) == b"after"
    assert echo.received_bytes() == b"beforeafter"


def test_drop_applies_to_new_connections_which_stay_open(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.drop()
    with connect(proxy) as client:
        client.sendall(b"void")
        wait_until(lambda: proxy.statistics().dropped_bytes["a->b"] == 4, "the proxy to drop 4 bytes")
        assert proxy.statistics().connections_open == 1
        proxy.heal()
        client.sendall(b"ok")
        assert receive_exactly(client, 2) == b"ok"
    assert echo.received_bytes() == b"ok"


def test_cut_a_to_b_only_blocks_the_dialers_bytes(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as client:
        proxy.cut("a->b")
        client.sendall(b"request")
        wait_until(lambda: proxy.statistics().dropped_bytes["a->b"] == 7, "a->b bytes to be dropped")
        assert echo.received_bytes() == b""
        assert proxy.statistics().dropped_bytes["b->a"] == 0
        proxy.heal()
        client.sendall(b"next")
        assert receive_exactly(client, 4) == b"next"


def test_cut_b_to_a_only_blocks_the_answers(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as client:
        proxy.cut("b->a")
        client.sendall(b"one-way")
        # The server gets the bytes (a->b flows), but its echo is dropped on the way back.
        wait_until(lambda: echo.received_bytes() == b"one-way", "the server to receive the bytes")
        wait_until(lambda: proxy.statistics().dropped_bytes["b->a"] == 7, "the echo to be dropped")
        proxy.heal()
        client.sendall(b"back")
        assert receive_exactly(client, 4) == b"back"


def test_delay_holds_each_chunk_for_the_given_time(proxy: FaultProxy) -> None:
    delay_ms = 150
    with connect(proxy) as client:
        proxy.delay(delay_ms, "a->b")
        started = time.monotonic()
        client.sendall(b"slow")
        assert receive_exactly(client, 4) == b"slow"
        one_way_seconds = time.monotonic() - started
        proxy.delay(delay_ms)
        started = time.monotonic()
        client.sendall(b"slower")
        assert receive_exactly(client, 6) == b"slower"
        round_trip_seconds = time.monotonic() - started
        proxy.heal()
        started = time.monotonic()
        client.sendall(b"fast")
        assert receive_exactly(client, 4) == b"fast"
        healed_seconds = time.monotonic() - started
    assert one_way_seconds >= delay_ms / 1000
    assert round_trip_seconds >= 2 * delay_ms / 1000
    assert healed_seconds < one_way_seconds


def test_delay_is_latency_not_one_chunk_at_a_time(proxy: FaultProxy) -> None:
    delay_ms = 200
    with connect(proxy) as client:
        proxy.delay(delay_ms, "a->b")
        started = time.monotonic()
        for index in range(5):
            client.sendall(bytes([65 + index]))
            time.sleep(0.001)  # separate the chunks; not a wait for anything
        assert receive_exactly(client, 5) == b"ABCDE"
        elapsed_seconds = time.monotonic() - started
    # Five chunks each held 200 ms in a queue take about 200 ms, far less than 5 x 200 ms.
    assert delay_ms / 1000 <= elapsed_seconds < 4 * delay_ms / 1000


def test_refuse_resets_new_connections_but_keeps_existing_ones(proxy: FaultProxy) -> None:
    with connect(proxy) as existing:
        existing.sendall(b"up")
        assert receive_exactly(existing, 2) == b"up"
        proxy.refuse_new_connections()
        assert new_connection_is_refused(proxy)
        existing.sendall(b"still")
        assert receive_exactly(existing, 5) == b"still"
        proxy.refuse_new_connections(False)
        with connect(proxy) as accepted:
            accepted.sendall(b"again")
            assert receive_exactly(accepted, 5) == b"again"
    statistics = proxy.statistics()
    assert statistics.connections_refused == 1
    assert statistics.connections_accepted == 2


def test_close_connections_ends_existing_pairs(proxy: FaultProxy) -> None:
    with connect(proxy) as first, connect(proxy) as second:
        for client in (first, second):
            client.sendall(b"x")
            assert receive_exactly(client, 1) == b"x"
        assert proxy.close_connections() == 2
        assert connection_ends(first)
        assert connection_ends(second)
    assert proxy.statistics().connections_open == 0
    with connect(proxy) as fresh:
        fresh.sendall(b"new")
        assert receive_exactly(fresh, 3) == b"new"


def test_partition_closes_refuses_and_drops_then_heal_restores(proxy: FaultProxy) -> None:
    with connect(proxy) as client:
        client.sendall(b"x")
        assert receive_exactly(client, 1) == b"x"
        proxy.partition()
        assert connection_ends(client)
    assert new_connection_is_refused(proxy)
    proxy.heal()
    with connect(proxy) as healed:
        healed.sendall(b"healed")
        assert receive_exactly(healed, 6) == b"healed"


def test_server_closing_is_passed_on(echo: EchoServer) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy, connect(proxy) as client:
        client.sendall(b"bye")
        assert receive_exactly(client, 3) == b"bye"
        wait_until(lambda: echo.connections == 1, "the server to see the connection")
        # Stopping the target: a closed upstream must close the downstream side too.
        echo.shutdown()
        echo.server_close()
        proxy.close_connections()
        assert connection_ends(client)


def test_unreachable_target_closes_the_accepted_connection() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        closed_port = placeholder.getsockname()[1]
    with FaultProxy("127.0.0.1", closed_port) as proxy:
        assert new_connection_is_refused(proxy)
        assert proxy.statistics().connections_open == 0


def test_stop_closes_the_listener_and_is_idempotent(echo: EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port).start()
    port = proxy.port
    client = connect(proxy)
    proxy.stop()
    proxy.stop()
    with client:
        assert connection_ends(client)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_SECONDS).close()


def test_controls_are_validated_and_need_a_running_proxy(echo: EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port)
    with pytest.raises(RuntimeError):
        _ = proxy.port
    with pytest.raises(RuntimeError):
        proxy.heal()
    with proxy:
        with pytest.raises(ValueError):
            proxy.delay(-1)
        with pytest.raises(ValueError):
            proxy.cut("sideways")
