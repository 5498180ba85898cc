"""The node's snapshot transfers (tokenvault/core/snapshot_transfer.py) beyond what the node tests reach."""

from __future__ import annotations

import asyncio
import threading
import time
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
    def clean_mark(self) -> int | None:
        return None

    def clean_through(self, mark: int | None, index: int) -> bool:
        return True


async def test_closing_while_a_checkpoint_is_being_taken_leaves_no_checkpoint_behind(tmp_path: Path) -> None:
    store = SlowCheckpointStore()
    offered: list[Any] = []
    transfers = SnapshotTransfers(tmp_path, lambda: store, lambda call: call(), lambda peer, message: True,
                                  NothingToShred())
    transfers.request("n2", lambda *offer: offered.append(offer) or True)
    assert await asyncio.to_thread(store.started.wait, 10.0)
    # The checkpoint's thread finishes once close() has cancelled the transfer (its task is gone): its
    # files are written anyway.
    def release_once_cancelled() -> None:
        deadline = time.monotonic() + 10.0
        while transfers._tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        store.release.set()

    threading.Thread(target=release_once_cancelled).start()
    await transfers.close()
    assert offered == []
    assert not (tmp_path / OUTGOING_DIRECTORY).exists()
