"""Write-ahead log of the replication log and the hard state.

The log lives in a directory of segment files ``segment-<sequence>.wal``. Each
file is a sequence of records::

    u32 length | u32 crc32 | u8 type | payload (msgpack, ``length`` bytes)

all big-endian. The CRC covers the length, the type and the payload, so a
damaged header is detected like a damaged payload. Record types:

- ``BASE [index, view, reset, hard_state]``: the first record of every
  segment. It names the log position the segment continues from; ``reset``
  marks a segment written after a snapshot install, which replaces everything
  before it. ``hard_state`` (``[view, voted_for, commit_index]`` or nil) is a
  copy of the hard state when the segment was started, so deleting old
  segments never loses it. The copy is inside the BASE record rather than in a
  record of its own so that a segment header is whole or absent, never half.
- ``HARD_STATE [view, voted_for, commit_index]``: the latest one wins.
- ``ENTRY [index, view, kind, payload]``: the next log entry.
- ``TRUNCATE [from_index]``: drop the entries from ``from_index`` on (a
  conflicting suffix the primary replaced).

Writes are group commits: ``append`` only encodes records into a buffer, and
``sync`` writes the whole buffer with one ``write`` and makes it durable with
one ``fdatasync``. Recovery (``open``) replays every segment in order from the
newest one that starts with a valid reset BASE record (everything before it is
superseded, gaps included, and deleted), or from the first. Damage at the very
end of the last segment that looks like an interrupted write (a cut record with
nothing valid after it, or a record or header running into never-written zero
sectors) is cut off: it was never synced, so never acknowledged. Any other
damage raises WalCorruption naming the file and offset, and the node refuses
to start. A failed write or
fsync raises WalFatal and poisons the log: the page cache state after a failed
fsync is unknown, so the node must exit rather than retry.
"""

from __future__ import annotations

import fcntl
import os
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack

from protocol import Entry, EntryKind, HardState
# Record framing and segment replay live in tokenvault.core.wal_segments; the public
# names are re-exported here so callers keep importing them from tokenvault.core.wal.
from tokenvault.core.wal_segments import (HEADER_BYTES, MAX_LOG_INTEGER, MAX_RECORD_PAYLOAD_BYTES, MAX_VOTED_FOR_CHARS,
                                     SECTOR_BYTES, SEGMENT_PATTERN, RecordType, WalCorruption, _base_record,
                                     _check_contiguous, _hard_state_record, _HEADER, _LENGTH_AND_TYPE, _list_segments,
                                     _newest_reset_position, _replay_file, _ReplayState, _SegmentInfo, _valid_integer,
                                     encode_record, segment_name)
from tokenvault.smallfiles import fsync_directory, write_whole

DEFAULT_MAX_SEGMENT_BYTES = 64 * 1024 * 1024
LOCK_FILE_NAME = "wal.lock"


class WalFatal(Exception):
    """A write, fsync or file operation failed: the node must log it and exit."""


@dataclass(frozen=True, slots=True)
class RecoveredLog:
    """What ``open`` rebuilt: the log holds ``entries`` after position (base_index, base_view)."""

    hard_state: HardState | None
    base_index: int
    base_view: int
    entries: tuple[Entry, ...]
    truncated_tail_bytes: int
    records_replayed: int


class _Tail:
    """The in-memory shape of the log (no entries): base, last index and the views by index.

    Views change rarely, so they are kept as runs: (first index, view) pairs.
    """

    def __init__(self, base_index: int, base_view: int, entries: Sequence[Entry]) -> None:
        self.base_index = base_index
        self.base_view = base_view
        self.last_index = base_index
        self.runs: list[tuple[int, int]] = []
        for entry in entries:
            self.append(entry.index, entry.view)

    @property
    def last_view(self) -> int:
        return self.runs[-1][1] if self.runs else self.base_view

    def view_at(self, index: int) -> int:
        view = self.base_view
        for first_index, run_view in self.runs:
            if first_index > index:
                break
            view = run_view
        return view

    def append(self, index: int, view: int) -> None:
        if not self.runs or self.runs[-1][1] != view:
            self.runs.append((index, view))
        self.last_index = index

    def truncate(self, from_index: int) -> None:
        self.runs = [run for run in self.runs if run[0] < from_index]
        self.last_index = from_index - 1

    def rebase(self, index: int, view: int) -> None:
        """The log now starts after (index, view): older segments were deleted."""
        self.base_index, self.base_view = index, view
        self.runs = [run for run in self.runs if run[0] > index]


def _lock_directory(directory: Path) -> int:
    """Hold an exclusive lock so that two processes never write one log."""
    descriptor = os.open(directory / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise WalFatal(f"write-ahead log directory {directory} is in use by another process") from None
    return descriptor


def _recover(directory: Path, fsync: bool) -> tuple[_ReplayState, list[_SegmentInfo], int]:
    """Replay all segments, cut a torn tail and drop leftovers; returns state, segments, cut bytes."""
    listed = _list_segments(directory)
    start = _newest_reset_position(listed)
    superseded, found = listed[:start], listed[start:]
    _check_contiguous(found)
    state = _ReplayState()
    segments: list[_SegmentInfo] = []
    cut_bytes = 0
    for position, (sequence, path) in enumerate(found):
        segment, cut_bytes = _replay_file(path, sequence, position == len(found) - 1, state, position == 0)
        segments.append(segment)
    if cut_bytes:
        with open(segments[-1].path, "r+b") as file:
            os.ftruncate(file.fileno(), segments[-1].size_bytes)
            if fsync:
                os.fsync(file.fileno())
    removed = False
    if segments and segments[-1].size_bytes == 0:
        # A segment whose header never reached the disk: the write that created
        # it was never acknowledged. Only the very first segment may be alone
        # in that state; a later one alone means its predecessors were deleted
        # against its (now lost) header, so the log cannot be rebuilt.
        if len(segments) == 1 and segments[0].sequence != 1:
            raise WalCorruption(f"write-ahead log {segments[0].path.name} lost its header and "
                                "no earlier segment is left")
        segments.pop().path.unlink()
        removed = True
    if superseded:
        # An interrupted reset_base (perhaps while release deleted older files):
        # the reset segment supersedes everything before it.
        for _, path in superseded:
            path.unlink()
        removed = True
    if removed and fsync:
        fsync_directory(directory)
    return state, segments, cut_bytes


class WriteAheadLog:
    """The durable replication log of one node; see the module docstring for the format.

    ``append`` may be called many times before one ``sync``. All methods take an
    internal lock: the node appends and syncs on its event loop, while the
    shredder may ``release`` segments from a worker thread.
    """

    def __init__(self, directory: Path, max_segment_bytes: int, fsync: bool, lock_descriptor: int,
                 segments: list[_SegmentInfo], tail: _Tail, hard_state: HardState | None) -> None:
        self._directory = directory
        self._max_segment_bytes = max_segment_bytes
        self._fsync = fsync
        self._lock_descriptor = lock_descriptor
        self._segments = segments
        self._tail = tail
        self._hard_state = hard_state
        self._durable_hard_state = hard_state
        self._durable_last = (tail.last_index, tail.last_view)
        self._pending: list[bytes] = []
        self._pending_high_water_index = 0
        self._pending_lowest_truncate_from: int | None = None
        self._failed = False
        self._closed = False
        self._lock = threading.Lock()
        # Held by release from choosing its segments until their files are deleted and the
        # directory synced, so that two releases (compaction's, the shredder's) always delete
        # an oldest-first run of files; appends and syncs never take it.
        self._deletion_lock = threading.Lock()
        self._active_descriptor = os.open(segments[-1].path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    # ------------------------------------------------------------ opening
    @classmethod
    def open(cls, directory: Path, *, max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES,
             fsync: bool = True) -> tuple["WriteAheadLog", RecoveredLog]:
        """Recover the log in ``directory`` (created if missing) and open it for appending.

        Raises WalCorruption when the log is damaged anywhere but its tail, and
        WalFatal when the directory cannot be used.
        """
        if type(max_segment_bytes) is not int or max_segment_bytes < 1:
            raise ValueError("max_segment_bytes must be a positive integer")
        directory = Path(directory)
        try:
            created = not directory.exists()
            directory.mkdir(parents=True, exist_ok=True)
            if created and fsync:
                fsync_directory(directory.parent)
            lock_descriptor = _lock_directory(directory)
        except OSError as error:
            raise WalFatal(f"cannot open write-ahead log directory {directory}: {error.strerror}") from None
        try:
            return cls._open_locked(directory, max_segment_bytes, fsync, lock_descriptor)
        except BaseException:
            os.close(lock_descriptor)
            raise

    @classmethod
    def _open_locked(cls, directory: Path, max_segment_bytes: int, fsync: bool,
                     lock_descriptor: int) -> tuple["WriteAheadLog", RecoveredLog]:
        try:
            state, segments, cut_bytes = _recover(directory, fsync)
            if not segments:
                segments = [_create_first_segment(directory, fsync)]
            tail = _Tail(state.base_index, state.base_view, state.entries)
            wal = cls(directory, max_segment_bytes, fsync, lock_descriptor, segments, tail, state.hard_state)
        except OSError as error:
            raise WalFatal(f"cannot recover write-ahead log in {directory}: {error.strerror}") from None
        recovered = RecoveredLog(hard_state=state.hard_state, base_index=state.base_index,
                                 base_view=state.base_view, entries=tuple(state.entries),
                                 truncated_tail_bytes=cut_bytes, records_replayed=state.records_replayed)
        return wal, recovered

    # ------------------------------------------------------------ writing
    def append(self, *, truncate_from: int | None, entries: Sequence[Entry], hard_state: HardState | None) -> None:
        """Buffer records: the truncation first, then the entries, then the hard state.

        Nothing is written until ``sync``. Entries must continue the log (after
        the truncation) with non-decreasing views; a violation is a caller bug
        and raises ValueError without buffering anything.
        """
        with self._lock:
            self._check_usable()
            records = self._encode_batch(truncate_from, entries, hard_state)
            tail = self._tail
            if truncate_from is not None:
                tail.truncate(truncate_from)
                lowest = self._pending_lowest_truncate_from
                self._pending_lowest_truncate_from = truncate_from if lowest is None else min(lowest, truncate_from)
            for entry in entries:
                tail.append(entry.index, entry.view)
            if entries:
                self._pending_high_water_index = max(self._pending_high_water_index, entries[-1].index)
            if hard_state is not None:
                self._hard_state = hard_state
            self._pending.extend(records)

    def _encode_batch(self, truncate_from: int | None, entries: Sequence[Entry],
                      hard_state: HardState | None) -> list[bytes]:
        tail = self._tail
        records: list[bytes] = []
        previous_view = tail.last_view
        next_index = tail.last_index + 1
        if truncate_from is not None:
            if type(truncate_from) is not int or not tail.base_index < truncate_from <= tail.last_index + 1:
                raise ValueError("truncate_from is outside the log")
            records.append(encode_record(RecordType.TRUNCATE, msgpack.packb((truncate_from,))))
            previous_view = tail.view_at(truncate_from - 1)
            next_index = truncate_from
        header_pack, length_type_pack, crc32, packb = _HEADER.pack, _LENGTH_AND_TYPE.pack, zlib.crc32, msgpack.packb
        for entry in entries:
            if entry.index != next_index or entry.view < previous_view or type(entry.payload) is not bytes:
                raise ValueError("entries must continue the log with non-decreasing views and bytes payloads")
            payload = packb((entry.index, entry.view, int(EntryKind(entry.kind)), entry.payload))
            length = len(payload)
            if length > MAX_RECORD_PAYLOAD_BYTES:
                raise ValueError("entry payload is too large for the write-ahead log")
            # Header and payload stay separate buffers: the join in sync copies them once.
            records.append(header_pack(length, crc32(payload, crc32(length_type_pack(length, 1))), 1))
            records.append(payload)
            previous_view, next_index = entry.view, next_index + 1
        if hard_state is not None:
            if not (_valid_integer(hard_state.view) and _valid_integer(hard_state.commit_index)
                    and (hard_state.voted_for is None or (type(hard_state.voted_for) is str
                                                          and 0 < len(hard_state.voted_for) <= MAX_VOTED_FOR_CHARS))):
                raise ValueError("hard state fields are out of range")
            records.append(_hard_state_record(hard_state))
        return records

    def sync(self) -> None:
        """Write every buffered record with one write and make it durable with one fdatasync.

        fdatasync is enough: it flushes the data and the file size, which is all
        recovery reads; skipping the timestamps saves a journal commit per batch.
        """
        with self._lock:
            self._check_usable()
            self._sync_locked()

    def _sync_locked(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        active = self._segments[-1]
        try:
            created = False
            if (active.size_bytes + len(data) > self._max_segment_bytes
                    and active.size_bytes > active.header_bytes):
                header = self._start_segment(*self._durable_last, reset=False)
                data = header + data
                active, created = self._segments[-1], True
            write_whole(self._active_descriptor, data)
            if self._fsync:
                os.fdatasync(self._active_descriptor)
                if created:
                    fsync_directory(self._directory)
        except OSError as error:
            self._failed = True
            raise WalFatal(f"write-ahead log write or fsync failed: {error.strerror}") from None
        active.size_bytes += len(data)
        active.high_water_index = max(active.high_water_index, self._pending_high_water_index)
        if self._pending_lowest_truncate_from is not None:
            lowest = active.lowest_truncate_from
            from_index = self._pending_lowest_truncate_from
            active.lowest_truncate_from = from_index if lowest is None else min(lowest, from_index)
        self._durable_last = (self._tail.last_index, self._tail.last_view)
        self._durable_hard_state = self._hard_state
        self._pending = []
        self._pending_high_water_index = 0
        self._pending_lowest_truncate_from = None

    def _start_segment(self, base_index: int, base_view: int, reset: bool) -> bytes:
        """Create the next segment file and make it active; returns its header, not yet written."""
        sequence = self._segments[-1].sequence + 1
        path = self._directory / segment_name(sequence)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.close(self._active_descriptor)
        self._active_descriptor = descriptor
        header = _base_record(base_index, base_view, reset, self._durable_hard_state)
        self._segments.append(_SegmentInfo(sequence, path, 0, len(header), base_index, base_view,
                                           base_index, None))
        return header

    def reset_base(self, index: int, view: int) -> None:
        """After a snapshot install: the log now starts after (index, view) and holds no entries.

        Durable when it returns: a new segment starting with a reset BASE record
        is written and synced, then every older segment is deleted. Call it only
        after the store durably holds the snapshot.
        """
        if not (_valid_integer(index) and _valid_integer(view)):
            raise ValueError("index and view must be non-negative integers")
        with self._lock:
            self._check_usable()
            self._sync_locked()
            try:
                header = self._start_segment(index, view, reset=True)
                write_whole(self._active_descriptor, header)
                if self._fsync:
                    os.fdatasync(self._active_descriptor)
                    fsync_directory(self._directory)
                self._segments[-1].size_bytes = len(header)
                self._delete_segments(len(self._segments) - 1)
            except OSError as error:
                self._failed = True
                raise WalFatal(f"write-ahead log reset failed: {error.strerror}") from None
            self._tail = _Tail(index, view, ())
            self._durable_last = (index, view)

    def release(self, upto_index: int) -> None:
        """Delete the oldest segments whose entries are all <= ``upto_index`` (durable in the store).

        The active segment is never deleted. A segment is also kept while a
        later truncation reaches below the start of the segment after it,
        because replaying that truncation needs the entries it removes.

        The segments leave the log under its lock; their files are deleted
        after it is let go, so an append or a sync on another thread never
        waits for them (deleting a 64 MiB segment takes about 17 ms on ext4).
        Call it off the event loop. A crash between the two leaves files that
        recovery reads again, as if nothing had been released.

        Two releases on different threads (the node's compaction, the
        shredder) take turns under a deletion lock, held from choosing the
        segments until their files are deleted and the directory synced: the
        later one cannot delete newer files while the earlier one still
        deletes older ones, so a crash always leaves the files from some
        segment on, never a gap. (reset_base may delete newer files meanwhile;
        it does so only once its reset segment, which recovery starts from, is
        durable.)
        """
        with self._deletion_lock:
            with self._lock:
                self._check_usable()
                segments = self._segments
                count = 0
                while count < len(segments) - 1 and segments[count].high_water_index <= upto_index:
                    count += 1
                while count > 0 and not self._can_start_log(count):
                    count -= 1
                if count == 0:
                    return
                released = segments[:count]
                del segments[:count]
                first = segments[0]
                self._tail.rebase(first.start_index, first.start_view)
            try:
                for segment in released:
                    segment.path.unlink()
                if self._fsync:
                    fsync_directory(self._directory)
            except OSError as error:
                with self._lock:
                    self._failed = True
                raise WalFatal(f"write-ahead log segment deletion failed: {error.strerror}") from None

    def roll(self, through_index: int) -> bool:
        """Start a new segment if the active one may hold an entry at or below ``through_index``, so
        that ``release`` can delete every segment that does (tokenvault/core/shred.py). Durable when
        it returns; True when a segment was started."""
        with self._lock:
            self._check_usable()
            self._sync_locked()
            active = self._segments[-1]
            if active.start_index >= through_index or active.size_bytes <= active.header_bytes:
                return False
            try:
                header = self._start_segment(*self._durable_last, reset=False)
                write_whole(self._active_descriptor, header)
                if self._fsync:
                    os.fdatasync(self._active_descriptor)
                    fsync_directory(self._directory)
            except OSError as error:
                self._failed = True
                raise WalFatal(f"write-ahead log segment roll failed: {error.strerror}") from None
            self._segments[-1].size_bytes = len(header)
            return True

    @property
    def first_held_index(self) -> int:
        """The lowest index any segment file may still hold an entry of."""
        with self._lock:
            return self._segments[0].start_index + 1

    def _can_start_log(self, position: int) -> bool:
        start_index = self._segments[position].start_index
        truncations = [segment.lowest_truncate_from for segment in self._segments[position:]]
        truncations.append(self._pending_lowest_truncate_from)
        return all(from_index is None or from_index > start_index for from_index in truncations)

    def _delete_segments(self, count: int) -> None:
        for segment in self._segments[:count]:
            segment.path.unlink()
        del self._segments[:count]
        if self._fsync:
            fsync_directory(self._directory)

    # ------------------------------------------------------------ lifecycle
    def _check_usable(self) -> None:
        if self._failed:
            raise WalFatal("write-ahead log failed earlier; the node must restart")
        if self._closed:
            raise RuntimeError("write-ahead log is closed")

    @property
    def last_index(self) -> int:
        """Index of the last appended entry (synced or not), or the base index."""
        return self._tail.last_index

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def segment_bytes(self) -> int:
        """The bytes of every segment file, as far as this log has written them (buffered records aside).
        Read without the lock, for a gauge: an fsync or a release on another thread is not waited for."""
        return sum(segment.size_bytes for segment in list(self._segments))

    def close(self) -> None:
        """Sync anything still buffered, then release the files and the directory lock."""
        with self._lock:
            if self._closed:
                return
            try:
                if not self._failed:
                    self._sync_locked()
            finally:
                self._closed = True
                os.close(self._active_descriptor)
                os.close(self._lock_descriptor)


def _create_first_segment(directory: Path, fsync: bool) -> _SegmentInfo:
    path = directory / segment_name(1)
    header = _base_record(0, 0, False, None)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write_whole(descriptor, header)
        if fsync:
            os.fdatasync(descriptor)
    finally:
        os.close(descriptor)
    if fsync:
        fsync_directory(directory)
    return _SegmentInfo(1, path, len(header), len(header), 0, 0, 0, None)
