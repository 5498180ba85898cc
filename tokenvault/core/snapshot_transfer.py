"""Snapshot transfers of one node: streaming its store to a backup, and staging and installing one.

The core (protocol.Replica) only counts offsets; this module moves the bytes.

Primary side: for each backup the core asks a snapshot for, a SnapshotSource
(a RocksDB checkpoint plus its manifest) is made in a worker thread, then
offered to the core. Each ``SnapshotRead`` the core emits is read from the
checkpoint's files in a worker thread and sent as one InstallSnapshot chunk.
While a transfer runs, the node does not compact its log past the snapshot's
index, so the backup can continue from the log once the snapshot is in.

Backup side: chunks are written into a staging directory in the data dir as
they arrive (in a worker thread, before the reply that acknowledges them
leaves). When the stream is whole, it is verified, the checkpoint is moved
into the store as its next generation and opened (worker thread); then, in the
driver task, the store switches to it atomically and the core is told. A
stream that fails verification, or that cannot be staged (disk full), is
dropped and the core asks the primary to start over: never fatal.

Crash safety of an install: the store's generation pointer is the commit
point. Before it moves the node restarts with its old state; after, with the
new one and a log that may not extend it, which the node resets on start
(Node._restored_state).
"""

from __future__ import annotations

import asyncio
import shutil
import time
import zlib
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from protocol import InstallSnapshot, Message, SnapshotChunk, SnapshotRead
from tokenvault.futures import cancel_and_wait
from tokenvault.logs import get_logger
from tokenvault.core.snapshots import (PendingShred, ShredState, SnapshotSource, SnapshotStager, StagedSnapshot,
                                       create_source)
from tokenvault.core.store_layout import SnapshotRejected, StoreError

log = get_logger("snapshot")

# Called in the driver once a verified snapshot is opened: (prepared install, index, view, what it may
# hold deleted and not yet shredded by its source).
Installed = Callable[[Any, int, int, PendingShred | None], None]

OUTGOING_DIRECTORY = "snapshots-outgoing"
INCOMING_DIRECTORY = "snapshot-incoming"


class SnapshotTransfers:
    """Owns the node's snapshot sources and its one staging area. Used from the event-loop thread only."""

    def __init__(self, data_dir: Path, store_of: Callable[[], Any], run_in_driver: Callable[[Callable[[], None]], None],
                 send: Callable[[str, Message], bool], shreds: ShredState,
                 backlog: Callable[[str], int] = lambda peer: 0) -> None:
        """``backlog(peer)``: bytes sent to ``peer`` that have not left this process yet (the peer link's)."""
        self._outgoing_dir = data_dir / OUTGOING_DIRECTORY
        self._incoming_dir = data_dir / INCOMING_DIRECTORY
        # Leftovers of a previous run: a source or a staging area is never resumed.
        shutil.rmtree(self._outgoing_dir, ignore_errors=True)
        shutil.rmtree(self._incoming_dir, ignore_errors=True)
        self._store_of = store_of
        self._run_in_driver = run_in_driver
        self._send = send
        self._backlog = backlog
        self._reading: dict[str, int] = {}  # bytes of chunks being read for each peer, not yet sent
        self._shreds = shreds  # whether a checkpoint may hold rows not yet shredded (manifest shred_pending)
        # One thread: checkpoints, chunk reads and staging writes never run at the same time,
        # and a chunk is always staged before the next one.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")
        self._sources: dict[str, SnapshotSource] = {}
        self._creating: set[str] = set()
        self._stager: SnapshotStager | None = None
        self._stager_key: tuple[int, int, int] | None = None  # (index, view, total bytes)
        self._staging_started = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ primary side
    def hold_index(self) -> int | None:
        """The log must keep entries after this index: a snapshot at it is being sent."""
        if not self._sources:
            return None
        return min(source.index for source in self._sources.values())

    def request(self, peer: str, offer: Callable[[str, int, int, int], bool]) -> None:
        """The core asks for a snapshot for ``peer``: make one off the loop, then offer it in the driver."""
        if peer in self._creating:
            return
        self._creating.add(peer)
        self._spawn(self._create_and_offer(peer, offer))

    async def _create_and_offer(self, peer: str, offer: Callable[[str, int, int, int], bool]) -> None:
        started = time.monotonic()
        try:
            source = await create_source(self._store_of(), self._outgoing_dir, self._shreds, self._in_thread)
        except (OSError, ValueError, StoreError) as error:
            # StoreError: a closed store, RocksDB's own failure (ENOSPC, EMFILE), or SnapshotRejected
            log.error("snapshot.source_failed", peer=peer, reason=_reason(error))
            self._creating.discard(peer)  # the core asks again after an election timeout
            return
        except BaseException:  # failed unexpectedly, or cancelled: the next request makes one
            self._creating.discard(peer)
            raise

        def offer_in_driver() -> None:
            self._creating.discard(peer)
            if offer(peer, source.index, source.view, source.total_bytes):
                previous = self._sources.pop(peer, None)
                if previous is not None:
                    self._close_source(previous)
                self._sources[peer] = source
                log.info("snapshot.sending", peer=peer, index=source.index, view=source.view,
                         bytes=source.total_bytes, files=len(source.manifest.files),
                         shred_pending=source.manifest.shred_pending,
                         shred_keys=source.manifest.shred_key_count,
                         prepare_seconds=round(time.monotonic() - started, 3))
            else:
                self._close_source(source)

        self._run_in_driver(offer_in_driver)

    def send_chunk(self, read: SnapshotRead) -> None:
        source = self._sources.get(read.peer)
        if source is None or (source.index, source.view, source.total_bytes) != (
                read.index, read.snapshot_view, read.total_bytes):
            return  # dropped meanwhile: the transfer stalls and the core asks again
        if read.length and self._reading.get(read.peer, 0) + self._backlog(read.peer) >= read.length:
            # A chunk's worth for this peer is still being read or waits to leave (a slow peer, whose
            # transfer the core finds stalled and resends): another copy would only add to memory. The
            # core asks again at its next stall.
            return
        self._reading[read.peer] = self._reading.get(read.peer, 0) + read.length
        self._spawn(self._read_and_send(source, read))

    async def _read_and_send(self, source: SnapshotSource, read: SnapshotRead) -> None:
        try:
            data = await self._in_thread(source.read, read.offset, read.length)
        except (OSError, ValueError) as error:
            log.error("snapshot.read_failed", peer=read.peer, reason=_reason(error))
            return
        finally:
            left = self._reading[read.peer] - read.length
            if left:
                self._reading[read.peer] = left
            else:  # keyed only while a read runs: a peer that left the cluster leaves no key
                del self._reading[read.peer]
        self._send(read.peer, InstallSnapshot(read.view, read.index, read.snapshot_view, read.offset,
                                              read.total_bytes, data, zlib.crc32(data), read.offer))

    def ended(self, peer: str, outcome: str) -> None:
        """The core ended ``peer``'s transfer (``outcome``: protocol.TransferEnd): its source is dropped."""
        source = self._sources.pop(peer, None)
        if source is not None:
            log.info("snapshot.sent", peer=peer, index=source.index, bytes=source.total_bytes, outcome=outcome)
            self._close_source(source)

    def drop_sources(self) -> None:
        """No longer primary: every outgoing transfer ends."""
        for peer in list(self._sources):
            self._close_source(self._sources.pop(peer))

    def _close_source(self, source: SnapshotSource) -> None:
        self._executor.submit(source.close)

    # ------------------------------------------------------------ backup side
    async def stage(self, chunks: tuple[SnapshotChunk, ...], installed: Installed,
                    failed: Callable[[int, int], None]) -> None:
        """Write chunks to the staging area in order; a complete stream starts its install."""
        for chunk in chunks:
            key = (chunk.index, chunk.view, chunk.total_bytes)
            if chunk.offset == 0:
                self._discard_stager()
                try:
                    self._stager = await self._in_thread(SnapshotStager, self._incoming_dir, chunk.total_bytes)
                except OSError as error:
                    self._fail_staging(chunk, failed, error)
                    continue
                self._stager_key = key
                self._staging_started = time.monotonic()
                log.info("snapshot.receiving", index=chunk.index, view=chunk.view, bytes=chunk.total_bytes)
            if self._stager is None or self._stager_key != key:
                continue  # the staging of this stream failed already; the core was told
            try:
                await self._in_thread(self._stager.write, chunk.offset, chunk.data)
            except (OSError, SnapshotRejected) as error:
                self._fail_staging(chunk, failed, error)
                continue
            if chunk.complete:
                stager, self._stager, self._stager_key = self._stager, None, None
                self._spawn(self._install(stager, chunk, installed, failed))

    def _fail_staging(self, chunk: SnapshotChunk, failed: Callable[[int, int], None], error: BaseException) -> None:
        log.error("snapshot.rejected", index=chunk.index, view=chunk.view, stage="staging", reason=_reason(error))
        self._discard_stager()
        self._run_in_driver(lambda: failed(chunk.index, chunk.view))

    async def _install(self, stager: SnapshotStager, chunk: SnapshotChunk,
                       installed: Installed, failed: Callable[[int, int], None]) -> None:
        started = time.monotonic()
        try:
            staged: StagedSnapshot = await self._in_thread(stager.finish)
            if (staged.index, staged.view) != (chunk.index, chunk.view):
                raise SnapshotRejected("snapshot manifest is not at the announced index and view")
            prepared = await self._in_thread(self._store_of().prepare_install, staged.checkpoint_dir,
                                             staged.index, staged.view)
        except (OSError, SnapshotRejected) as error:
            log.error("snapshot.rejected", index=chunk.index, view=chunk.view, stage="verify", reason=_reason(error))
            await self._in_thread(stager.discard)
            self._run_in_driver(lambda: failed(chunk.index, chunk.view))
            return
        log.info("snapshot.verified", index=chunk.index, bytes=chunk.total_bytes,
                 seconds=round(time.monotonic() - started, 3),
                 transfer_seconds=round(time.monotonic() - self._staging_started, 3))
        pending = staged.manifest.pending
        self._run_in_driver(lambda: installed(prepared, chunk.index, chunk.view, pending))
        self._executor.submit(stager.discard)

    def close_later(self, closer: Callable[[], None]) -> None:
        """Run a slow cleanup (closing a replaced store) off the loop."""
        self._executor.submit(closer)

    def _discard_stager(self) -> None:
        stager, self._stager, self._stager_key = self._stager, None, None
        if stager is not None:
            self._executor.submit(stager.discard)

    # ------------------------------------------------------------ plumbing
    async def _in_thread(self, function: Callable[..., Any], *arguments: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *arguments)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await cancel_and_wait(list(self._tasks))
        self.drop_sources()
        self._discard_stager()
        # Off the loop: a checkpoint or a discard still running in the executor may take seconds.
        await asyncio.to_thread(self._finish_closing)

    def _finish_closing(self) -> None:
        self._executor.shutdown(wait=True)
        # A checkpoint whose creation was cancelled above was still written by its thread: remove it now
        # rather than at the next start (nothing is left to send or install).
        shutil.rmtree(self._outgoing_dir, ignore_errors=True)
        shutil.rmtree(self._incoming_dir, ignore_errors=True)


def _reason(error: BaseException) -> str:
    """Our own errors carry messages written to be logged (the store's: RocksDB's status, bounded, no key in
    it); others only by type and errno text."""
    if isinstance(error, StoreError):  # SnapshotRejected is one
        return str(error)[:300]
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {error.strerror or 'I/O error'}"
    return type(error).__name__
