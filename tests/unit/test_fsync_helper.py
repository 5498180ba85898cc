"""The fsync helper process: syncs the node's own descriptor, reports errors, and its loss is never silent."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
from pathlib import Path

import pytest

from tokenvault import fsync_helper
from tokenvault.fsync_helper import FsyncHelper, FsyncHelperGone
from tokenvault.wal import WalFatal, WriteAheadLog

from node_support import start_cluster, wait_until


async def test_it_syncs_the_descriptor_it_is_given_and_keeps_serving(tmp_path: Path) -> None:
    helper = FsyncHelper()
    try:
        descriptor = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(3):
                os.write(descriptor, b"x" * 100)
                await helper.fdatasync(descriptor)
        finally:
            os.close(descriptor)
    finally:
        helper.close()
    assert helper._process.returncode == 0  # it left on its own once the socket closed


async def test_an_fsync_error_is_reported_with_its_errno() -> None:
    helper = FsyncHelper()
    reading, writing = os.pipe()
    try:
        with pytest.raises(OSError) as raised:
            await helper.fdatasync(reading)  # a pipe cannot be fsynced
        assert raised.value.errno == errno.EINVAL
        assert not isinstance(raised.value, FsyncHelperGone)
    finally:
        os.close(reading)
        os.close(writing)
        helper.close()


async def test_a_killed_helper_makes_every_later_fsync_fail(tmp_path: Path) -> None:
    helper = FsyncHelper()
    descriptor = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        await helper.fdatasync(descriptor)
        os.kill(helper.pid, signal.SIGKILL)
        helper._process.wait(5)
        with pytest.raises(FsyncHelperGone):
            await helper.fdatasync(descriptor)
        with pytest.raises(FsyncHelperGone):
            await helper.fdatasync(descriptor)
    finally:
        os.close(descriptor)
        helper.close()


def test_the_child_refuses_malformed_requests_and_leaves_on_end_of_file(tmp_path: Path) -> None:
    node_end, child_end = socket.socketpair()
    descriptor = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        socket.send_fds(node_end, [b"X"], [descriptor])   # unknown request
        node_end.sendall(b"S")                           # a sync without a descriptor
        socket.send_fds(node_end, [b"S"], [descriptor])  # a good one
        node_end.shutdown(socket.SHUT_WR)
        assert fsync_helper.serve(child_end) == 0
        replies = node_end.recv(64)
        assert [int.from_bytes(replies[i:i + 4], "big") for i in range(0, len(replies), 4)] == [
            errno.EINVAL, errno.EINVAL, 0]
    finally:
        os.close(descriptor)
        node_end.close()
        child_end.close()


def test_write_pending_is_durable_only_after_complete_sync_and_close_finishes_it(tmp_path: Path) -> None:
    from protocol import Entry, EntryKind

    wal, _ = WriteAheadLog.open(tmp_path / "wal")
    wal.append(truncate_from=None, entries=[Entry(1, 1, EntryKind.COMMAND, b"a")], hard_state=None)
    pending = wal.write_pending()
    assert pending is not None and pending.needs_fsync
    assert wal._durable_last == (0, 0)
    with pytest.raises(RuntimeError):
        wal.write_pending()  # one outstanding write at a time
    os.fdatasync(pending.descriptor)
    wal.complete_sync(pending)
    assert wal._durable_last == (1, 1)
    assert wal.write_pending() is None  # nothing buffered
    # A write whose fsync was never confirmed (the node stopped waiting) is synced by close().
    wal.append(truncate_from=None, entries=[Entry(2, 1, EntryKind.COMMAND, b"b")], hard_state=None)
    wal.write_pending()
    wal.close()
    reopened, recovered = WriteAheadLog.open(tmp_path / "wal")
    assert [entry.payload for entry in recovered.entries] == [b"a", b"b"]
    reopened.close()


async def test_a_node_whose_fsync_helper_dies_stops_instead_of_acknowledging(tmp_path: Path) -> None:
    cluster = await start_cluster(tmp_path, 1)
    try:
        await cluster.wait_for_stable_primary()
        node = cluster.nodes[0]
        await node.service.tokenize("p", ["before"], None)
        os.kill(node.node._fsyncer.pid, signal.SIGKILL)
        node.node._fsyncer._process.wait(5)
        with pytest.raises(Exception):
            await asyncio.wait_for(node.service.tokenize("p", ["after"], None), 10)
        await wait_until(lambda: node.node.stopped.is_set(), 5, "the node to stop")
        assert "fsync" in (node.node.fatal_error or "")
        assert node.node.wal._failed
        with pytest.raises(WalFatal):
            node.node.wal.sync()
    finally:
        await cluster.close()
