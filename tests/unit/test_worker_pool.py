"""The core's worker pool (tokenvault.api.workers): the listening sockets it makes for its workers."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from node_support import free_ports
from tokenvault.api.workers import WorkerPool, WorkerStartError


def pool(port: int, count: int = 3) -> WorkerPool:
    calls: Any = SimpleNamespace(handlers={})
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

