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
