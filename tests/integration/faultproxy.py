"""A fault-injecting TCP proxy for the peer links of an integration-test cluster.

One `FaultProxy` stands between a dialing node ("a") and the node it dials
("b"): a's config names the proxy's port as b's peer address, and the proxy
forwards to b's real port. The proxy runs its own asyncio loop in a background
thread, so sync tests (and async ones) control it with plain method calls; a
control call returns only once the loop has applied the change, so the next byte
read after it sees the new rule.

Faults, each per direction ("a->b" is what the dialer sends, "b->a" the answers):

- pass: forward bytes unchanged (the default; `heal()` returns to it);
- drop: read and discard bytes, keeping connections open (a partition where
  packets vanish); `cut(direction)` drops one direction only;
- delay: hold every chunk for a fixed number of milliseconds before forwarding
  (latency, not bandwidth: chunks still flow back to back);
- refuse: new connections are accepted and reset at once (the dialer sees a
  connection reset, as if the port were closed);
- close: every existing connection pair is closed now.

An end of stream or an error on either side closes the whole pair; the peer
protocol does not use half-closed connections.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

READ_CHUNK_BYTES = 64 * 1024
QUEUE_MAX_CHUNKS = 256
CONTROL_TIMEOUT_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 2.0
LISTEN_HOST = "127.0.0.1"

Result = TypeVar("Result")


class Direction(StrEnum):
    A_TO_B = "a->b"
    B_TO_A = "b->a"


BOTH_DIRECTIONS = (Direction.A_TO_B, Direction.B_TO_A)


@dataclass(frozen=True, slots=True)
class DirectionRule:
    drop: bool = False
    delay_ms: int = 0


@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    """Counters since the proxy started (read on the proxy's loop, so consistent with each other)."""

    connections_accepted: int
    connections_refused: int
    connections_open: int
    forwarded_bytes: dict[str, int]
    dropped_bytes: dict[str, int]


def _directions(direction: Direction | str | None) -> tuple[Direction, ...]:
    if direction is None:
        return BOTH_DIRECTIONS
    return (Direction(direction),)


class _Pair:
    """One accepted connection and its upstream connection, with a reader and a writer task per direction."""

    def __init__(self, proxy: "FaultProxy", downstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.closed = False
        self.writers = (downstream[1], upstream[1])
        self.tasks: list[asyncio.Task[None]] = []
        for direction, reader, writer in ((Direction.A_TO_B, downstream[0], upstream[1]),
                                          (Direction.B_TO_A, upstream[0], downstream[1])):
            queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=QUEUE_MAX_CHUNKS)
            self.tasks.append(asyncio.create_task(self._read(direction, reader, queue)))
            self.tasks.append(asyncio.create_task(self._write(direction, writer, queue)))

    async def _read(self, direction: Direction, reader: asyncio.StreamReader,
                    queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                chunk = await reader.read(READ_CHUNK_BYTES)
                if not chunk:
                    break
                # Why decide at read time: a control call that returned must govern every later byte.
                rule = self.proxy.rules[direction]
                if rule.drop:
                    self.proxy.dropped_bytes[direction] += len(chunk)
                    continue
                await queue.put((loop.time() + rule.delay_ms / 1000.0, chunk))
        except (OSError, asyncio.IncompleteReadError):
            self.close()
            return
        # End of stream: let the writer forward what is queued, then it closes the pair.
        await queue.put(None)

    async def _write(self, direction: Direction, writer: asyncio.StreamWriter,
                     queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                due_time, chunk = item
                wait_seconds = due_time - loop.time()
                if wait_seconds > 0:
                    await asyncio.sleep(wait_seconds)
                writer.write(chunk)
                await writer.drain()
                self.proxy.forwarded_bytes[direction] += len(chunk)
        except (OSError, ConnectionError):
            pass
        self.close(graceful=True)

    def close(self, graceful: bool = False) -> None:
        """Close both sides (a reset unless `graceful`) and stop the pumps; idempotent."""
        if self.closed:
            return
        self.closed = True
        for writer in self.writers:
            if graceful:
                writer.close()
            else:
                _reset(writer)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        self.proxy.pairs.discard(self)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0) so the other side learns at once, as when a peer vanishes."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.close()


class FaultProxy:
    """A TCP proxy from an ephemeral local port to (target_host, target_port), with runtime faults."""

    def __init__(self, target_host: str, target_port: int, *, name: str = "proxy") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.name = name
        self.rules: dict[Direction, DirectionRule] = {direction: DirectionRule() for direction in BOTH_DIRECTIONS}
        self.refuse_new = False
        self.pairs: set[_Pair] = set()
        self._connecting: set[asyncio.StreamWriter] = set()
        self.forwarded_bytes: dict[Direction, int] = {direction: 0 for direction in BOTH_DIRECTIONS}
        self.dropped_bytes: dict[Direction, int] = {direction: 0 for direction in BOTH_DIRECTIONS}
        self.connections_accepted = 0
        self.connections_refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._port: int | None = None

    def __repr__(self) -> str:
        return f"FaultProxy({self.name}: :{self._port} -> {self.target_host}:{self.target_port})"

    # ------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def address(self) -> str:
        return f"{LISTEN_HOST}:{self.port}"

    def start(self) -> "FaultProxy":
        """Start the loop thread and listen on an ephemeral port; returns self."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(started.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"faultproxy-{self.name}", daemon=True)
        self._thread.start()
        if not started.wait(CONTROL_TIMEOUT_SECONDS):
            raise RuntimeError("the proxy loop did not start")
        self._server = self._call(self._listen())
        return self

    async def _listen(self) -> asyncio.AbstractServer:
        server = await asyncio.start_server(self._accept, LISTEN_HOST, 0)
        self._port = server.sockets[0].getsockname()[1]
        return server

    def stop(self) -> None:
        """Close the listener and every connection, then end the loop thread. Safe to call twice."""
        if self._loop is None or self._thread is None:
            return
        if self._loop.is_running():
            self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_SECONDS)
        if not self._loop.is_running():
            self._loop.close()
        self._thread = None
        self._loop = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._connecting):
            _reset(writer)
        for pair in list(self.pairs):
            pair.close()
        # The loop belongs to this proxy: every other task on it is a pump or a pending accept.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def __enter__(self) -> "FaultProxy":
        return self.start() if self._thread is None else self

    def __exit__(self, *exception_info: object) -> None:
        self.stop()

    def _call(self, coroutine: Coroutine[Any, Any, Result]) -> Result:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the proxy is not started")
        future: concurrent.futures.Future[Result] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(CONTROL_TIMEOUT_SECONDS)

    def _apply(self, change: Callable[[], Result]) -> Result:
        """Run `change` on the proxy loop and wait for it, so it is in force when this returns."""

        async def run() -> Result:
            return change()

        return self._call(run())

    # ------------------------------------------------------------ accepting

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse_new:
            self.connections_refused += 1
            _reset(writer)
            return
        self.connections_accepted += 1
        # Why remember it: a shutdown while the upstream connect is pending must close this side too.
        self._connecting.add(writer)
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(self.target_host, self.target_port),
                                              CONNECT_TIMEOUT_SECONDS)
        except (OSError, asyncio.TimeoutError):
            _reset(writer)
            return
        finally:
            self._connecting.discard(writer)
        if writer.is_closing():
            _reset(upstream[1])
            return
        self.pairs.add(_Pair(self, (reader, writer), upstream))

    # ------------------------------------------------------------ controls

    def heal(self) -> None:
        """Back to plain forwarding in both directions, accepting new connections."""

        def change() -> None:
            self.rules = {direction: DirectionRule() for direction in BOTH_DIRECTIONS}
            self.refuse_new = False

        self._apply(change)

    def drop(self, direction: Direction | str | None = None) -> None:
        """Discard bytes in one direction, or both when `direction` is None; connections stay open."""
        chosen = _directions(direction)

        def change() -> None:
            for item in chosen:
                self.rules[item] = DirectionRule(drop=True, delay_ms=self.rules[item].delay_ms)

        self._apply(change)

    def cut(self, direction: Direction | str) -> None:
        """Drop one direction only ("a->b" or "b->a"); the other keeps flowing."""
        self.drop(Direction(direction))

    def delay(self, delay_ms: int, direction: Direction | str | None = None) -> None:
        """Hold every chunk `delay_ms` milliseconds before forwarding it (0 removes the delay)."""
        if not 0 <= delay_ms <= 60_000:
            raise ValueError("delay_ms must be between 0 and 60000")
        chosen = _directions(direction)

        def change() -> None:
            for item in chosen:
                self.rules[item] = DirectionRule(drop=self.rules[item].drop, delay_ms=delay_ms)

        self._apply(change)

    def refuse_new_connections(self, refuse: bool = True) -> None:
        """Reset every new connection at once (True) or accept them again (False)."""

        def change() -> None:
            self.refuse_new = refuse

        self._apply(change)

    def close_connections(self) -> int:
        """Close every existing connection pair (both sides see a reset); returns how many."""

        def change() -> int:
            pairs = list(self.pairs)
            for pair in pairs:
                pair.close()
            return len(pairs)

        return self._apply(change)

    def partition(self) -> None:
        """Cut the link completely: drop both directions, refuse new connections, close existing ones."""
        self.drop()
        self.refuse_new_connections(True)
        self.close_connections()

    def statistics(self) -> ProxyStatistics:
        def read() -> ProxyStatistics:
            return ProxyStatistics(
                connections_accepted=self.connections_accepted, connections_refused=self.connections_refused,
                connections_open=len(self.pairs),
                forwarded_bytes={str(key): value for key, value in self.forwarded_bytes.items()},
                dropped_bytes={str(key): value for key, value in self.dropped_bytes.items()})

        return self._apply(read)
