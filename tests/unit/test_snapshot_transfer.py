"""The node's snapshot transfers (tokenvault/core/snapshot_transfer.py) beyond what the node tests reach."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from tokenvault.core.snapshot_transfer import OUTGOING_DIRECTORY, SnapshotTransfers


class SlowCheckpointStore:
    """Writes a checkpoint only once ``release`` is set, so that a transfer can close meanwhile."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def create_checkpoint(self, directory: Path) -> tuple[int, int]:
        self.started.set()
        assert self.release.wait(10.0)
        directory.mkdir()
        (directory / "000001.sst").write_bytes(b"rows")
        return 7, 1


class NothingToShred:
    def shred_mark(self) -> None:
        return None

    def pending_through(self, mark: None, index: int) -> None:
        return None


async def test_closing_while_a_checkpoint_is_being_taken_waits_off_the_loop_and_leaves_no_checkpoint_behind(tmp_path: Path) -> None:
    store = SlowCheckpointStore()
    offered: list[Any] = []
    transfers = SnapshotTransfers(tmp_path, lambda: store, lambda call: call(), lambda peer, message: True,
                                  NothingToShred())
    transfers.request("n2", lambda *offer: offered.append(offer) or True)
    assert await asyncio.to_thread(store.started.wait, 10.0)
    closing = asyncio.create_task(transfers.close())
    deadline = asyncio.get_running_loop().time() + 10.0
    while transfers._tasks:  # close() cancels the transfer's task first
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    # It then waits for the checkpoint's thread off the event loop: the loop goes on meanwhile.
    for _ in range(5):
        await asyncio.sleep(0.01)
    assert not closing.done()
    store.release.set()  # the thread finishes: its checkpoint's files are written anyway
    await asyncio.wait_for(closing, 10.0)
    assert offered == []
    assert not (tmp_path / OUTGOING_DIRECTORY).exists()


class FakeSource:
    index, view, total_bytes = 7, 1, 3 * 1024

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return b"x" * length


async def test_a_chunk_is_not_sent_again_while_a_chunk_s_worth_for_that_peer_has_not_left() -> None:
    """A slow backup makes the core find its transfer stalled and ask for the same chunk again; while a
    chunk's worth of bytes for that peer is still being read or waits in its link's queue, another copy
    would only add to memory (a 24 MB stream once grew a loaded primary by 8.25 MiB this way)."""
    from protocol import SnapshotRead

    sent: list[Any] = []
    backlog = {"n2": 0}
    transfers = SnapshotTransfers(Path("/nonexistent"), lambda: None, lambda call: call(),
                                  lambda peer, message: sent.append(message) or True, NothingToShred(),
                                  lambda peer: backlog[peer])
    source = FakeSource()
    transfers._sources["n2"] = source  # type: ignore[assignment]
    chunk = SnapshotRead("n2", 3, 7, 1, 0, 1024, source.total_bytes, 1)
    transfers.send_chunk(chunk)
    transfers.send_chunk(chunk)  # asked again while the first copy is still being read
    await asyncio.gather(*transfers._tasks)
    assert len(sent) == 1 and source.reads == [(0, 1024)]
    backlog["n2"] = 1024 + 40  # that copy waits in the link's queue
    transfers.send_chunk(chunk)
    transfers.send_chunk(SnapshotRead("n2", 3, 7, 1, 1024, 0, source.total_bytes, 1))  # an empty probe goes
    await asyncio.gather(*transfers._tasks)
    assert [len(message.data) for message in sent] == [1024, 0]
    backlog["n2"] = 0  # it left: the next ask sends again
    transfers.send_chunk(chunk)
    await asyncio.gather(*transfers._tasks)
    assert [len(message.data) for message in sent] == [1024, 0, 1024]
    assert transfers._reading == {}, "a peer is keyed only while a read for it runs"
    transfers._sources.clear()
    await transfers.close()


async def test_a_checkpoint_rocksdb_fails_to_take_is_logged_and_the_peer_s_next_request_makes_one(
        tmp_path: Path, monkeypatch: Any) -> None:
    """RocksDB's errors reach Python as a plain Exception ("IO error: ..."; ENOSPC, EMFILE): a checkpoint
    that fails once is logged, as an OSError is, and the core's next request for that peer (after an election
    timeout) makes one; the peer is not left waiting on a creation that died, until the primary restarts."""
    from rocksdict import Checkpoint
    from structlog.testing import capture_logs

    from tokenvault.core import store as store_module
    from tokenvault.core.store import VaultStore

    failures = [Exception("IO error: While appending to file: MANIFEST-000005: No space left on device")]

    class FailingOnce:
        def __init__(self, database: Any) -> None:
            self._checkpoint = Checkpoint(database)

        def create_checkpoint(self, path: str) -> None:
            if failures:
                raise failures.pop()
            self._checkpoint.create_checkpoint(path)

    monkeypatch.setattr(store_module, "Checkpoint", FailingOnce)
    store = VaultStore.open(tmp_path / "store")
    offered: list[Any] = []
    transfers = SnapshotTransfers(tmp_path / "data", lambda: store, lambda call: call(), lambda peer, message: True,
                                  NothingToShred())
    try:
        with capture_logs() as logs:
            transfers.request("n2", lambda *offer: offered.append(offer) or True)
            await asyncio.wait_for(asyncio.gather(*transfers._tasks), 10.0)
        assert [(entry["event"], entry["peer"]) for entry in logs] == [("snapshot.source_failed", "n2")]
        assert "No space left on device" in logs[0]["reason"]
        assert offered == []
        transfers.request("n2", lambda *offer: offered.append(offer) or True)  # the core asks again
        await asyncio.wait_for(asyncio.gather(*transfers._tasks), 10.0)
        assert [peer for peer, *_ in offered] == ["n2"]
    finally:
        await transfers.close()
        store.close()


async def test_a_checkpoint_that_fails_unexpectedly_does_not_keep_the_peer_from_its_next_request(
        tmp_path: Path) -> None:
    """An error nobody foresaw ends the task that made the checkpoint: the core's next request for that peer
    still makes one."""

    class FailingOnce:
        calls = 0

        def create_checkpoint(self, directory: Path) -> tuple[int, int]:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("unforeseen")
            directory.mkdir()
            (directory / "000001.sst").write_bytes(b"rows")
            return 7, 1

    offered: list[Any] = []
    store = FailingOnce()
    transfers = SnapshotTransfers(tmp_path, lambda: store, lambda call: call(), lambda peer, message: True,
                                  NothingToShred())
    transfers.request("n2", lambda *offer: offered.append(offer) or True)
    failed = await asyncio.gather(*transfers._tasks, return_exceptions=True)
    assert [type(error) for error in failed] == [RuntimeError]
    transfers.request("n2", lambda *offer: offered.append(offer) or True)
    await asyncio.wait_for(asyncio.gather(*transfers._tasks), 10.0)
    assert [peer for peer, *_ in offered] == ["n2"] and store.calls == 2
    await transfers.close()
