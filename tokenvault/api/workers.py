"""The core's side of a node's HTTP workers: start W of them, restart any that dies, stop them.

Each worker (tokenvault.api.worker) gets one end of a fresh Unix socket pair as
its channel; the core serves its calls with ``CoreCalls`` and pushes it the
runtime key table at start and after every change the core applies. A worker
that exits for any reason is logged (``worker.exited``) and started again
after a back-off (``worker.restarted``); a request it had in flight is lost
with its connection (the client sees a connection error, and the core finishes
or drops the operation exactly as for a client that hung up). Workers exit by
themselves when the core dies: their channel closes.

The core makes each worker's listening socket (the node's HTTP port, with
SO_REUSEPORT) and hands it over at start: every socket of the group exists
before any worker runs, so the kernel spreads the first connections over all W
workers. Were each worker to bind its own, the clients that connect while the
first workers are up and the last are still starting would all land, and with
keep-alive stay, on the first ones, and meet those workers' share of the
node's in-flight bound long before the node's. A dead worker's socket is
closed with it (the connections it had queued are refused, new ones go to the
others) and its successor gets a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenvault.api.channel import DEFAULT_REQUESTS_IN_FLIGHT, Channel, max_call_bytes_in_flight, max_frame_bytes
from tokenvault.api.core_calls import CoreCalls
from tokenvault.api.httpserver import listening_socket
from tokenvault.api.remote import CATCH_UP_TOPIC, EPOCH_TOPIC, KEYS_TOPIC, TLS_TOPIC
from tokenvault.core.sealer import child_environment
from tokenvault.logs import get_logger

log = get_logger("workers")

READY_TOPIC = "ready"
RESTART_BACKOFF_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)
# A worker that ran this long before it died starts the back-off afresh.
HEALTHY_RUN_SECONDS = 10.0


class WorkerStartError(Exception):
    """A worker could not start (its port taken, its certificate unreadable): the node refuses to start."""


def default_worker_count() -> int:
    """The machine's cores available to this process, minus one for the core, at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


@dataclass
class _Slot:
    index: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    failures: int = 0  # deaths and failed starts in a row (reset by a run of HEALTHY_RUN_SECONDS)
    listener: socket.socket | None = None


class WorkerPool:
    """W worker processes serving one node's HTTP port."""

    def __init__(self, config_path: Path, count: int, calls: CoreCalls, *, max_body_bytes: int,
                 host: str, port: int, max_inflight_requests: int = DEFAULT_REQUESTS_IN_FLIGHT) -> None:
        if count < 1:
            raise ValueError("a worker pool has at least one worker")
        self._config_path = config_path
        self._host = host
        self._port = port
        self._calls = calls
        # The same bound as the workers' own (tokenvault.api.worker), from the same [limits].
        limits = calls.limits
        self._frame_bytes = max_frame_bytes(max_body_bytes, limits.max_items, limits.max_value_bytes)
        # The bytes of one worker's calls the core holds unanswered at most: a frame for each request of the
        # worker's share of [http] max_inflight_requests (rounded up, as HttpLimits.from_config), and one.
        self._call_bytes = max_call_bytes_in_flight(self._frame_bytes, -(-max_inflight_requests // count))
        self._slots = [_Slot(index) for index in range(1, count + 1)]
        self._supervisors: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def count(self) -> int:
        return len(self._slots)

    def channels(self) -> list[tuple[str, Channel]]:
        """The channels of the workers running now, with their names (for the metrics' ``worker`` label)."""
        return [(str(slot.index), slot.channel) for slot in self._slots
                if slot.channel is not None and not slot.channel.closed.is_set()]

    def push_keys(self) -> None:
        """Send every running worker the runtime key table (after the core applied a change to it)."""
        self._push(KEYS_TOPIC, self._calls.api_key_rows())

    def push_epoch(self) -> None:
        """Send every running worker the active epoch's keys (after a rotation or a snapshot install)."""
        self._push(EPOCH_TOPIC, self._calls.active_epoch_keys())

    def push_catch_up(self) -> None:
        """The store's files were rewritten or replaced: every worker's view catches up, releasing the old ones."""
        self._push(CATCH_UP_TOPIC, None)

    def push_tls_reload(self) -> None:
        """The core loaded new certificate files (SIGHUP): every worker loads them into its HTTPS context.
        A worker started later reads them at its start."""
        self._push(TLS_TOPIC, None)

    def _push(self, topic: str, payload: object) -> None:
        for _, channel in self.channels():
            try:
                channel.push(topic, payload)
            except Exception as error:  # a worker that is going away: its successor gets it at start
                log.warning("worker.push_failed", topic=topic, error_type=type(error).__name__)

    def pids(self) -> list[int]:
        return [slot.process.pid for slot in self._slots if slot.process is not None]

    async def start(self, timeout_seconds: float) -> None:
        """Start every worker and wait until each serves; WorkerStartError if one cannot."""
        try:
            for slot in self._slots:
                slot.listener = self._listen()
        except WorkerStartError:
            self._close_listeners()
            raise
        for slot in self._slots:
            await self._spawn(slot)
        deadline = time.monotonic() + timeout_seconds
        for slot in self._slots:
            while True:
                assert slot.process is not None
                ready = asyncio.ensure_future(slot.ready.wait())
                exited = asyncio.ensure_future(slot.process.wait())
                await asyncio.wait({ready, exited}, timeout=max(0.0, deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                exited.cancel()
                if slot.ready.is_set():
                    break
                code = slot.process.returncode
                if code is not None and code < 0 and time.monotonic() < deadline:
                    # Killed by a signal as it started (the OOM killer, an operator): not a worker that
                    # refused to start, so started again as one that dies later is, within the deadline.
                    try:
                        if await self._restart(slot, code, retry=False):
                            continue
                    except WorkerStartError:  # its port taken meanwhile: the node refuses, saying so
                        await self.close(grace_seconds=1.0)
                        raise
                await self.close(grace_seconds=1.0)
                raise WorkerStartError(f"HTTP worker {slot.index} did not start "
                                       + (f"(it exited with {code}; its log says why)" if code is not None
                                          else f"within {timeout_seconds:g} s"))
        for slot in self._slots:
            task = asyncio.get_running_loop().create_task(self._supervise(slot), name=f"worker-{slot.index}")
            self._supervisors.add(task)
            task.add_done_callback(self._supervisors.discard)
        log.info("workers.started", count=len(self._slots), pids=self.pids())

    def _listen(self) -> socket.socket:
        """One listening socket on the node's HTTP port, in the port's SO_REUSEPORT group."""
        try:
            return listening_socket(self._host, self._port, reuse_port=True)
        except OSError as error:
            raise WorkerStartError(f"cannot listen on {self._host}:{self._port}: {error.strerror}") from None

    def _close_listeners(self) -> None:
        for slot in self._slots:
            if slot.listener is not None:
                slot.listener.close()
                slot.listener = None

    async def _spawn(self, slot: _Slot) -> None:
        """Start ``slot``'s worker; WorkerStartError (with nothing of this try left open) when it cannot: its
        port taken, or the system out of processes, memory or file descriptors (EAGAIN, ENOMEM, EMFILE)."""
        if slot.listener is None:
            slot.listener = self._listen()
        listener = slot.listener
        try:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as error:
            raise WorkerStartError(f"cannot make a worker's channel: {error.strerror or error}") from None
        process: asyncio.subprocess.Process | None = None
        try:
            try:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tokenvault.api.worker", "--config", str(self._config_path),
                    "--index", str(slot.index), "--workers", str(len(self._slots)), "--fd", str(child.fileno()),
                    "--listen-fd", str(listener.fileno()),
                    pass_fds=(child.fileno(), listener.fileno()), env=child_environment(),
                    stdin=asyncio.subprocess.DEVNULL)
            finally:
                child.close()
            reader, writer = await asyncio.open_unix_connection(sock=parent)
        except BaseException as error:
            parent.close()
            if process is not None and process.returncode is None:  # started, but cannot be talked to
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            if isinstance(error, OSError):
                raise WorkerStartError(f"cannot start a worker: {error.strerror or error}") from None
            raise
        slot.process = process
        slot.ready = asyncio.Event()
        slot.started_at = time.monotonic()

        def on_push(topic: str, payload: object) -> None:
            if topic == READY_TOPIC:
                slot.ready.set()

        slot.channel = Channel(reader, writer, handlers=self._calls.handlers, on_push=on_push,
                               max_frame_bytes=self._frame_bytes, max_call_bytes=self._call_bytes,
                               name=f"worker-{slot.index}").start()
        slot.channel.push(KEYS_TOPIC, self._calls.api_key_rows())
        slot.channel.push(EPOCH_TOPIC, self._calls.active_epoch_keys())

    async def _supervise(self, slot: _Slot) -> None:
        """Restart ``slot``'s worker whenever it dies, until the pool closes. Nothing ends it but the pool's
        close: a failure of its own (a bug) is logged and the restart tried again after the back-off."""
        while not self._closing:
            try:
                if not await self._supervise_once(slot):
                    return
            except Exception as error:  # never leave the slot without a worker for good
                delay = self._next_backoff(slot)
                log.error("worker.restart_failed", index=slot.index, reason=f"{type(error).__name__}: {error}",
                          restart_in_seconds=delay)
                # Then round again: a worker that is dead (or was never started) is restarted at once.
                await asyncio.sleep(delay)

    async def _supervise_once(self, slot: _Slot) -> bool:
        """Wait for the worker to die and start its successor; False once the pool is closing."""
        assert slot.process is not None and slot.channel is not None
        exited = asyncio.ensure_future(slot.process.wait())
        closed = asyncio.ensure_future(slot.channel.closed.wait())
        await asyncio.wait({exited, closed}, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        if slot.process.returncode is None:  # its channel broke: a worker that cannot talk is no use
            slot.process.kill()
        code = await exited
        if self._closing:
            await self._reap(slot)
            return False
        return await self._restart(slot, code, retry=True)

    async def _reap(self, slot: _Slot) -> None:
        """A dead worker's channel and listening socket closed: the connections it had queued are refused,
        new ones go to the others."""
        assert slot.channel is not None
        await slot.channel.close()
        if slot.listener is not None:
            slot.listener.close()
            slot.listener = None

    async def _restart(self, slot: _Slot, code: int, *, retry: bool) -> bool:
        """Start a dead worker's successor after its back-off (``code``: how the worker ended); False when
        the pool closed meanwhile. A start that fails (the port taken meanwhile) is tried again after a
        longer back-off with ``retry``, else raises WorkerStartError."""
        assert slot.process is not None
        await self._reap(slot)
        ran = time.monotonic() - slot.started_at
        if ran >= HEALTHY_RUN_SECONDS:
            slot.failures = 0
        delay = self._next_backoff(slot)
        log.warning("worker.exited", index=slot.index, pid=slot.process.pid, exit_code=code,
                    ran_seconds=round(ran, 3), restart_in_seconds=delay)
        while True:
            await asyncio.sleep(delay)
            if self._closing:
                return False
            try:
                await self._spawn(slot)
                break
            except WorkerStartError as error:
                if not retry:
                    raise
                delay = self._next_backoff(slot)
                log.error("worker.restart_failed", index=slot.index, reason=str(error), restart_in_seconds=delay)
        log.info("worker.restarted", index=slot.index, pid=slot.process.pid)
        return True

    @staticmethod
    def _next_backoff(slot: _Slot) -> float:
        """The wait before the next start: the schedule's step for the deaths (and failed starts) in a
        row so far, the first one included, so a first death waits its first step."""
        delay = RESTART_BACKOFF_SECONDS[min(slot.failures, len(RESTART_BACKOFF_SECONDS) - 1)]
        slot.failures += 1
        return delay

    async def close(self, grace_seconds: float) -> None:
        """SIGTERM every worker (each answers what it has in flight), SIGKILL what is left after the grace."""
        self._closing = True
        for task in list(self._supervisors):
            task.cancel()
        running = [slot for slot in self._slots if slot.process is not None and slot.process.returncode is None]
        for slot in running:
            assert slot.process is not None
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(signal.SIGTERM)
        waits = [slot.process.wait() for slot in running if slot.process is not None]
        if waits:
            await asyncio.wait([asyncio.ensure_future(wait) for wait in waits], timeout=grace_seconds)
            for slot in running:
                assert slot.process is not None
                if slot.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        slot.process.kill()
                    await slot.process.wait()
        for slot in self._slots:
            if slot.channel is not None:
                await slot.channel.close()
        self._close_listeners()

