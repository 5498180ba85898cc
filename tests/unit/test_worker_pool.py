"""The core's worker pool (tokenvault.api.workers): the listening sockets it makes for its workers,
and the back-off before it starts a dead worker again."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from node_support import free_ports, wait_until
from tokenvault.api import workers as workers_module
from tokenvault.api.channel import max_frame_bytes
from tokenvault.api.workers import WorkerPool, WorkerStartError
from tokenvault.config import LimitsConfig


def pool(port: int, count: int = 3) -> WorkerPool:
    calls: Any = SimpleNamespace(handlers={}, limits=LimitsConfig())
    return WorkerPool(Path("node.toml"), count, calls, max_body_bytes=1024, host="127.0.0.1", port=port)


async def test_every_listening_socket_exists_before_the_first_worker_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    (port,) = free_ports(1)
    workers = pool(port)
    seen: list[list[bool]] = []

    async def spawn(slot: Any) -> None:
        seen.append([other.listener is not None for other in workers._slots])
        raise WorkerStartError("stop here")

    monkeypatch.setattr(workers, "_spawn", spawn)
    with pytest.raises(WorkerStartError):
        await workers.start(1.0)
    assert seen == [[True, True, True]]  # the whole SO_REUSEPORT group, before any worker runs
    workers._close_listeners()


def test_the_sockets_share_the_port_and_a_port_taken_otherwise_is_a_start_error() -> None:
    (port,) = free_ports(1)
    workers = pool(port)
    first, second = workers._listen(), workers._listen()
    assert first.getsockname()[1] == second.getsockname()[1] == port
    first.close()
    second.close()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))  # no SO_REUSEPORT: the port is not the group's
    squatter.listen()
    try:
        with pytest.raises(WorkerStartError, match=f"cannot listen on 127.0.0.1:{port}"):
            workers._listen()
    finally:
        squatter.close()


async def test_a_start_that_cannot_listen_leaves_no_socket_open() -> None:
    (port,) = free_ports(1)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    workers = pool(port)
    try:
        with pytest.raises(WorkerStartError):
            await workers.start(1.0)
        assert all(slot.listener is None and slot.process is None for slot in workers._slots)
    finally:
        squatter.close()


def test_the_default_worker_count_is_the_usable_cores_minus_one_and_at_least_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/architecture.md: [http] workers defaults to the cores this process may run on, minus one for
    the core, and at least one."""
    from tokenvault.api import workers as workers_module
    for cores, expected in ((16, 15), (2, 1), (1, 1)):
        monkeypatch.setattr(workers_module.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert workers_module.default_worker_count() == expected



# ---------------------------------------------------------------- restarts: the back-off, on a fake clock


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _FakeProcess:
    """A worker process that dies when the test says so."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = asyncio.Event()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    def kill(self) -> None:
        self.exit(-9)

    def send_signal(self, signal_number: int) -> None:
        self.exit(-signal_number)


class _FakeChannel:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.closed = asyncio.Event()
        self.kwargs = kwargs

    def start(self) -> "_FakeChannel":
        return self

    def push(self, topic: str, payload: object) -> None:
        pass

    async def close(self) -> None:
        self.closed.set()


class _PoolAsyncio:
    """asyncio as tokenvault.api.workers sees it: a sleep only advances the fake clock (and is
    recorded), and a worker process is a _FakeProcess; everything else is the real module."""

    def __init__(self, clock: _FakeClock) -> None:
        self.clock = clock
        self.sleeps: list[float] = []
        self.processes: list[_FakeProcess] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.clock.now += delay
        await asyncio.sleep(0)

    async def create_subprocess_exec(self, *args: Any, **kwargs: Any) -> _FakeProcess:
        process = _FakeProcess(pid=10_000 + len(self.processes))
        self.processes.append(process)
        return process

    async def open_unix_connection(self, sock: socket.socket) -> tuple[None, None]:
        sock.close()
        return None, None


def faked_pool(monkeypatch: pytest.MonkeyPatch, count: int,
               max_inflight_requests: int = 256) -> tuple[WorkerPool, _PoolAsyncio]:
    """A pool of ``count`` workers whose own code runs over fake processes, channels, clock and sleeps."""
    clock = _FakeClock()
    fake_asyncio = _PoolAsyncio(clock)
    monkeypatch.setattr(workers_module, "asyncio", fake_asyncio)
    monkeypatch.setattr(workers_module, "time", SimpleNamespace(monotonic=clock))
    monkeypatch.setattr(workers_module, "Channel", _FakeChannel)
    calls: Any = SimpleNamespace(handlers={}, api_key_rows=lambda: [], active_epoch_keys=lambda: [],
                                 limits=LimitsConfig())
    return WorkerPool(Path("node.toml"), count, calls, max_body_bytes=1024, host="127.0.0.1", port=0,
                      max_inflight_requests=max_inflight_requests), fake_asyncio


async def test_a_dead_worker_is_started_again_after_0_1_0_5_1_2_then_5_s_and_afresh_once_one_ran_10_s(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/architecture.md, "Failure": the back-off before a dead worker's successor starts is 0.1, 0.5,
    1, 2, then 5 s for each death in a row, and starts afresh once a worker has run 10 s. The pool's own
    _spawn and _supervise run; only the process, its channel, the clock and the sleeps are fakes."""
    workers, fake_asyncio = faked_pool(monkeypatch, 1)
    clock = fake_asyncio.clock
    monkeypatch.setattr(workers, "_listen", socket.socket)  # an unbound socket: nothing listens
    slot = workers._slots[0]
    await workers._spawn(slot)
    supervisor = asyncio.get_running_loop().create_task(workers._supervise(slot))

    async def back_off_after_a_death(ran_seconds: float) -> list[float]:
        """The running worker dies after ``ran_seconds``; the sleeps before its successor started."""
        clock.now += ran_seconds
        spawned, slept = len(fake_asyncio.processes), len(fake_asyncio.sleeps)
        fake_asyncio.processes[-1].exit(1)
        await wait_until(lambda: len(fake_asyncio.processes) > spawned, 5.0, "the worker to be started again")
        assert slot.process is fake_asyncio.processes[-1] and slot.process.returncode is None
        return fake_asyncio.sleeps[slept:]

    try:
        # The first death since the node started, within the worker's first 10 s: the first step.
        assert await back_off_after_a_death(1.0) == [0.1]
        assert [await back_off_after_a_death(1.0) for _ in range(6)] == [[0.5], [1.0], [2.0], [5.0], [5.0], [5.0]]
        assert await back_off_after_a_death(12.0) == [0.1]  # it had run 10 s: the first death in a row
        assert await back_off_after_a_death(10.0) == [0.1]  # a worker that ran 10 s: afresh
        assert await back_off_after_a_death(9.9) == [0.5]   # 9.9 s is not 10: still in a row
        assert await back_off_after_a_death(0.0) == [1.0]
        assert await back_off_after_a_death(60.0) == [0.1]
        # A start that fails (the port taken meanwhile) counts as one more in the row.
        listen = workers._listen
        refusals = [WorkerStartError("cannot listen: taken")]

        def listen_once_refused() -> socket.socket:
            if refusals:
                raise refusals.pop()
            return listen()

        monkeypatch.setattr(workers, "_listen", listen_once_refused)
        assert await back_off_after_a_death(60.0) == [0.1, 0.5]
        assert await back_off_after_a_death(1.0) == [1.0]
    finally:
        await workers.close(grace_seconds=1.0)
        await asyncio.gather(supervisor, return_exceptions=True)  # cancelled by close()


async def test_a_worker_killed_during_the_start_whose_successor_cannot_listen_fails_the_start_saying_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed by a signal while the node starts is started again within the start's deadline
    (docs/architecture.md, "Failure"); when its successor cannot listen (the port taken meanwhile), the
    start fails with that reason, not with the earlier death, and leaves no worker or socket behind."""
    workers, fake_asyncio = faked_pool(monkeypatch, 2)
    listens: list[socket.socket] = []

    def listen() -> socket.socket:
        if len(listens) == 2:  # both first sockets made: every later one finds the port taken
            raise WorkerStartError("cannot listen on 127.0.0.1:1: Address already in use")
        listens.append(socket.socket())  # unbound: nothing listens
        return listens[-1]

    monkeypatch.setattr(workers, "_listen", listen)
    start = asyncio.get_running_loop().create_task(workers.start(30.0))
    await wait_until(lambda: len(fake_asyncio.processes) == 2, 5.0, "both workers to be spawned")
    fake_asyncio.processes[0].kill()  # before it said it serves
    with pytest.raises(WorkerStartError, match="cannot listen on 127.0.0.1:1"):
        await start
    assert len(fake_asyncio.processes) == 2  # no successor ran
    assert fake_asyncio.sleeps == [0.1]  # it waited the first back-off step, then tried once
    assert all(process.returncode is not None for process in fake_asyncio.processes)
    assert all(slot.listener is None for slot in workers._slots) and all(sock.fileno() == -1 for sock in listens)


async def test_a_worker_killed_during_the_start_is_started_again_and_the_start_completes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same death with the port free: its successor is spawned after the first back-off step and the
    start completes once both workers serve."""
    workers, fake_asyncio = faked_pool(monkeypatch, 2)
    monkeypatch.setattr(workers, "_listen", socket.socket)
    start = asyncio.get_running_loop().create_task(workers.start(30.0))
    await wait_until(lambda: len(fake_asyncio.processes) == 2, 5.0, "both workers to be spawned")
    fake_asyncio.processes[0].kill()
    await wait_until(lambda: len(fake_asyncio.processes) == 3, 5.0, "the killed worker's successor")
    assert workers._slots[0].process is fake_asyncio.processes[2] and fake_asyncio.sleeps == [0.1]
    for slot in workers._slots:
        slot.ready.set()  # each says it serves
    try:
        await asyncio.wait_for(start, 5.0)
        assert workers.pids() == [fake_asyncio.processes[2].pid, fake_asyncio.processes[1].pid]
    finally:
        await workers.close(grace_seconds=1.0)


@pytest.mark.parametrize("failure", [
    ("create_subprocess_exec", BlockingIOError(11, "Resource temporarily unavailable")),  # EAGAIN: no process
    ("create_subprocess_exec", OSError(12, "Cannot allocate memory")),  # ENOMEM
    ("socketpair", OSError(24, "Too many open files")),  # EMFILE: no channel
], ids=["fork-eagain", "fork-enomem", "socketpair-emfile"])
async def test_a_restart_whose_fork_fails_once_is_tried_again_and_the_slot_is_not_lost(
        monkeypatch: pytest.MonkeyPatch, failure: tuple[str, OSError]) -> None:
    """A worker dies and its successor's start fails once for want of a process, memory or a descriptor:
    the start is tried again after the back-off (worker.restart_failed) and the slot gets its worker;
    the supervisor does not end, leaving the node one worker short (none, with W = 1)."""
    workers, fake_asyncio = faked_pool(monkeypatch, 1)
    monkeypatch.setattr(workers, "_listen", socket.socket)
    slot = workers._slots[0]
    await workers._spawn(slot)
    supervisor = asyncio.get_running_loop().create_task(workers._supervise(slot))
    where, error = failure
    failures = [error]
    opened: list[socket.socket] = []
    if where == "socketpair":
        real_socketpair = socket.socketpair

        def socketpair_failing_once(*args: Any) -> tuple[socket.socket, socket.socket]:
            if failures:
                raise failures.pop()
            pair = real_socketpair(*args)
            opened.extend(pair)
            return pair

        monkeypatch.setattr(workers_module.socket, "socketpair", socketpair_failing_once)
    else:
        real_exec = fake_asyncio.create_subprocess_exec
        real_socketpair = socket.socketpair

        def socketpair_recorded(*args: Any) -> tuple[socket.socket, socket.socket]:
            pair = real_socketpair(*args)
            opened.extend(pair)
            return pair

        async def exec_failing_once(*args: Any, **kwargs: Any) -> Any:
            if failures:
                raise failures.pop()
            return await real_exec(*args, **kwargs)

        monkeypatch.setattr(workers_module.socket, "socketpair", socketpair_recorded)
        monkeypatch.setattr(fake_asyncio, "create_subprocess_exec", exec_failing_once, raising=False)
    try:
        fake_asyncio.processes[-1].exit(1)
        await wait_until(lambda: len(fake_asyncio.processes) == 2 or supervisor.done(), 5.0,
                         "a successor, or the supervisor's end")
        assert not supervisor.done(), f"the supervisor ended: {supervisor.exception()!r}"
        assert slot.process is fake_asyncio.processes[-1] and slot.process.returncode is None
        assert fake_asyncio.sleeps == [0.1, 0.5]  # the failed start counts as one more in the row
        assert all(sock.fileno() == -1 for sock in opened)  # the failed try's channel ends are closed too
    finally:
        await workers.close(grace_seconds=1.0)
        await asyncio.gather(supervisor, return_exceptions=True)


@pytest.mark.parametrize(("count", "max_inflight_requests", "share"), [(1, 256, 256), (3, 256, 86), (4, 10, 3)])
async def test_the_core_holds_of_a_workers_calls_a_frame_for_each_request_of_its_share_and_one_more(
        monkeypatch: pytest.MonkeyPatch, count: int, max_inflight_requests: int, share: int) -> None:
    """docs/security.md: the core holds unanswered at most max_call_bytes_in_flight of one worker's calls,
    a frame bound for each request the worker may work on at once (its share of [http]
    max_inflight_requests, rounded up as the worker's own bound) and one more; before, its channels had
    no byte budget, only the 4,096 calls of a frame each."""
    workers, _ = faked_pool(monkeypatch, count, max_inflight_requests)
    monkeypatch.setattr(workers, "_listen", socket.socket)  # an unbound socket: nothing listens
    slot = workers._slots[-1]
    try:
        await workers._spawn(slot)
        assert cast(Any, slot.channel).kwargs["max_call_bytes"] == (share + 1) * max_frame_bytes(1024)
    finally:
        await workers.close(grace_seconds=1.0)
