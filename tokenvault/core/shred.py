"""Shredding: after a delete or an epoch destroy is applied, the bytes it removed leave the files too.

Applying a ``DeleteTokensCommand`` deletes token rows and a ``DestroyEpochCommand``
empties an epoch's wrapped secret, but older copies stay on disk: in RocksDB's
memtable, WAL and table files, and in the replication write-ahead log, whose
tokenize and rotate entries carried the ciphertexts and the wrapped secret.
The ``Shredder`` of a node removes them, in this order, in a worker thread:

1. ``VaultStore.prepare_shred``: flush the memtable (RocksDB deletes its WAL files
   up to there); then ``compact_for_shred`` of each key range that holds the
   affected keys (past MAX_KEYS_PER_PASS, of the whole key space a bottom-level
   file at a time) down to the bottom level, which drops the old versions with
   their tombstones, resting between two ranges ([shred] max_busy_fraction);
2. ``VaultStore.checkpoint``, then ``WriteAheadLog.roll`` past the shredding
   entry and ``WriteAheadLog.release`` up to the checkpoint: every segment
   holding an entry at or below it is deleted. Entries after it may not be
   applied yet, so this repeats (polling) until the first segment starts after it.

Until step 1 is done for an entry, ``hold_index`` keeps the node's ordinary log
compaction below that entry: the entry in the log is what makes a node that
crashes meanwhile shred again when it restarts (``note_recovered``).

Not covered: copies outside the data directory (backups, and checkpoints being
streamed to a peer or a backup client until that stream ends), and the memory
of the processes (Python cannot wipe freed memory).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from protocol import Entry, EntryKind
from tokenvault.core import commands
from tokenvault.core.store import VaultStore
from tokenvault.core.store_files import replace_file
from tokenvault.core.store_layout import LIFE, delete_row_keys
from tokenvault.core.wal import WriteAheadLog
from tokenvault.logs import get_logger
from tokenvault.smallfiles import FileTooLarge, read_small_file

log = get_logger("shred")

# Keys one shred pass compacts by their ranges at most (two a deleted token, about 80 bytes each in
# memory, measured); past it a pass compacts the whole key space and keeps no keys.
MAX_KEYS_PER_PASS = 100_000
POLL_SECONDS = 0.05
PASS_LOG_SECONDS = 10.0  # shred.pass: one line at most this often
# In a data directory whose store came from a snapshot that may hold rows deleted and not yet shredded (an
# install, or a restore from a backup, whose manifest says shred_pending): the snapshot's index, written
# before the store switches to it, removed once a whole-key-space pass through that index is done, so that
# a restart meanwhile shreds the store too.
SHRED_WHOLE_FILE = "SHRED-WHOLE"
SHRED_WHOLE_RECORD_MAX_BYTES = 32


@dataclass(frozen=True, slots=True)
class ShredPass:
    """What one pass took and cost, given to ``on_pass`` once it rewrote the store's files."""

    through_index: int  # the highest entry the pass covered
    rows: int  # the keys its entries left (two a deleted token)
    whole_store: bool  # it compacted the whole key space (past MAX_KEYS_PER_PASS keys, or after an install)
    store_seconds: float  # the flush and compactions
    rested_seconds: float  # the rests between its ranges ([shred] max_busy_fraction)


def record_whole_shred(data_dir: Path, index: int) -> None:
    """Durably record that a whole-key-space pass through ``index`` is due (SHRED_WHOLE_FILE)."""
    replace_file(data_dir / SHRED_WHOLE_FILE, f"{index}\n".encode(), data_dir / (SHRED_WHOLE_FILE + ".tmp"))


def read_whole_shred(data_dir: Path, applied_index: int) -> int | None:
    """The index recorded by ``record_whole_shred`` and not yet done, else None. The file is read as hostile:
    bounded, and a record that is not an index counts as one at ``applied_index``."""
    try:
        text = read_small_file(data_dir / SHRED_WHOLE_FILE, SHRED_WHOLE_RECORD_MAX_BYTES).strip()
    except FileNotFoundError:
        return None
    except FileTooLarge:
        return applied_index
    return int(text) if text.isdigit() and len(text) <= 19 else applied_index


class WholeShredRecord:
    """A node's SHRED_WHOLE_FILE: the index through which a whole-key-space pass is due, kept on disk from
    before the store switches to such a snapshot until a whole pass through it is done."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self.due: int | None = None

    def recover(self, applied_index: int) -> int | None:
        """At start-up: the index a pass is still due through, else None. An install that a stop interrupted
        before its switch left the store below the record's index: the pass is due through the store's."""
        recorded = read_whole_shred(self._data_dir, applied_index)
        self.due = None if recorded is None else min(recorded, applied_index)
        return self.due

    def record(self, index: int) -> None:
        """Before the store switches to a snapshot at ``index`` that may hold rows not yet shredded."""
        record_whole_shred(self._data_dir, index)
        self.due = index

    def passed(self, done: ShredPass) -> None:
        """A pass ended: a whole-key-space one through the due index ends the record."""
        if done.whole_store and self.due is not None and done.through_index >= self.due:
            (self._data_dir / SHRED_WHOLE_FILE).unlink(missing_ok=True)
            self.due = None


def shred_keys(command: commands.Command) -> list[bytes]:
    """The store keys whose older versions a shredding command leaves behind."""
    if type(command) is commands.DeleteTokensCommand:
        # Each mapping's row and its life row (expiry and metadata ciphertext).
        rows = delete_row_keys(command.tokens, command.epoch)
        return rows + [LIFE + key for key in rows]
    if type(command) is commands.DestroyEpochCommand:
        return [b"e" + command.epoch.to_bytes(8, "big")]
    return []


class Shredder:
    """One node's shredding task (see the module docstring); every method runs on the event loop.

    A pass takes every entry waiting, in log order, so the entry the log must keep (``hold_index``)
    moves on with every pass. Up to MAX_KEYS_PER_PASS keys it compacts their ranges; past that it
    keeps no keys and compacts the whole key space instead, which costs what ranges spread over every
    bottom-level file cost (a rewrite of the store) and covers any number of deletes: what the
    shredder holds in memory stays bounded however fast deletes come, and a backlog drains in one
    pass (docs/performance.md, "What a shred pass costs as the store grows")."""

    def __init__(self, store: Callable[[], VaultStore], wal: WriteAheadLog,
                 on_fatal: Callable[[BaseException], None],
                 on_pass: Callable[[ShredPass], None] | None = None, max_busy_fraction: float = 1.0) -> None:
        self._store = store
        # A pass compacts its ranges one after another (about a bottom-level file each), and after one that
        # took C seconds the next range, or the next pass, starts no sooner than C * (1 / max_busy_fraction
        # - 1) after it ([shred] max_busy_fraction): the shredder's compactions take at most that fraction
        # of the time, spread over the pass instead of one burst as long as a rewrite of the store, and
        # each pass takes every delete that arrived meanwhile.
        self._rest_factor = 1.0 / max_busy_fraction - 1.0
        self._next_compaction_at = float("-inf")
        self._wal = wal
        self._on_fatal = on_fatal
        self._on_pass = on_pass  # after each pass rewrote the store's files
        # The entries waiting for a pass, in log order, with their keys; or, past MAX_KEYS_PER_PASS keys,
        # only the first of them (``_whole_from``): the next pass compacts the whole key space.
        self._entries: deque[tuple[int, list[bytes]]] = deque()
        self._whole_from: int | None = None
        self._last_waiting = 0  # the highest entry waiting
        self._backlog_keys = 0
        self._running_low: int | None = None  # the lowest entry of the pass in step 1
        # When the oldest entry waiting, and the oldest of the pass in step 1, were noted (time.monotonic).
        self._waiting_since: float | None = None
        self._running_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shred")
        self.passes = 0  # finished passes, for tests and the log
        self._store_passes = 0  # passes whose step 1 ended (for clean_mark / clean_through)
        self._pass_logged_at = float("-inf")
        self._unlogged_passes = self._unlogged_rows = 0  # passes behind a backlog since the last shred.pass

    def note(self, index: int, command: commands.Command) -> None:
        """A shredding command was applied (or was found applied at start-up) at ``index``."""
        keys = shred_keys(command)
        if not keys:
            return
        self._backlog_keys += len(keys)
        self._last_waiting = index
        if self._whole_from is None:
            if self._backlog_keys > MAX_KEYS_PER_PASS:
                self._go_whole(index)
            else:
                self._entries.append((index, keys))
        self._wake()

    def note_whole_store(self, index: int) -> None:
        """A snapshot whose manifest says shred_pending was installed at ``index``, or SHRED_WHOLE_FILE was
        found at start-up (such an install's pass not done yet, or a restore from such a backup): its files
        may hold rows its source had deleted and not yet shredded, and this node will never apply those
        deletes, so the next pass compacts the whole key space. A pass running now was planned on the store
        before and does not count."""
        self._last_waiting = max(self._last_waiting, index)
        if self._whole_from is None:
            self._go_whole(index)
        self._wake()

    def _go_whole(self, index: int) -> None:
        """The next pass compacts the whole key space: keep only the first entry waiting (or ``index``)."""
        self._whole_from = self._entries[0][0] if self._entries else index
        self._entries.clear()

    def _wake(self) -> None:
        """Something waits from now (if nothing did): its wait starts, and the task runs."""
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def note_recovered(self, entries: Iterable[Entry], applied_index: int) -> None:
        """At start-up: shredding entries the store applied before a restart may not have been shredded
        (the log still holds them, so they are shredded again; doing it twice is harmless)."""
        for entry in entries:
            if (entry.index <= applied_index and entry.kind == EntryKind.COMMAND
                    and commands.peek_tag(entry.payload) in commands.SHREDDING_TAGS):
                self.note(entry.index, commands.decode_command(entry.payload))

    def hold_index(self) -> int | None:
        """The log must keep this entry (and what follows) for now; None when nothing waits. Entries are
        noted in log order (those found at start-up before the first applied), so the first waiting is
        the lowest."""
        candidates = [self._whole_from] if self._whole_from is not None else []
        if self._entries:
            candidates.append(self._entries[0][0])
        if self._running_low is not None:
            candidates.append(self._running_low)
        return min(candidates) if candidates else None

    def clean_mark(self) -> int | None:
        """Before a checkpoint is taken: None when a delete or destroy waits or is being shredded (the
        checkpoint may hold its rows), else a mark for ``clean_through``."""
        return None if self.hold_index() is not None else self._store_passes

    def clean_through(self, mark: int | None, index: int) -> bool:
        """After a checkpoint at ``index`` was taken, ``mark`` from ``clean_mark`` before it: True only if every
        delete and destroy at or below ``index`` had been shredded when it was taken. Nothing waited at the
        mark; one applied since at or below ``index`` either waits or runs now (the hold is at or below it)
        or went through a pass that ended after the mark, perhaps after the checkpoint (counted as not
        clean). Apply and ``note`` run in one step on the loop, so by now every entry at or below ``index``
        was noted."""
        if mark is None or mark != self._store_passes:
            return False
        hold = self.hold_index()
        return hold is None or hold > index

    @property
    def backlog_keys(self) -> int:
        """Keys noted and not yet taken by a pass."""
        return self._backlog_keys

    def oldest_wait_seconds(self) -> float:
        """How long the oldest delete or destroy noted and not yet through a pass (step 1) has waited: from
        its apply (at start-up, from the start) to now; 0 when none waits."""
        noted = [since for since in (self._waiting_since, self._running_since) if since is not None]
        return time.monotonic() - min(noted) if noted else 0.0

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def _waiting(self) -> bool:
        return self._whole_from is not None or bool(self._entries)

    def _take_pass(self) -> tuple[Iterable[bytes] | None, int, int, int]:
        """Every entry waiting: their keys (None: the whole key space; else read in the shredder's thread,
        which sorts them), the lowest and highest entry, and how many keys they left."""
        if self._whole_from is not None:
            keys: Iterable[bytes] | None = None
            low = self._whole_from
        else:
            keys = chain.from_iterable([entry_keys for _, entry_keys in self._entries])
            low = self._entries[0][0]
        taken = (keys, low, self._last_waiting, self._backlog_keys)
        self._entries.clear()
        self._whole_from = None
        self._backlog_keys = 0
        self._running_since, self._waiting_since = self._waiting_since, None
        return taken

    async def _run(self) -> None:
        try:
            while self._waiting():
                if (rest := self._next_compaction_at - time.monotonic()) > 0:
                    await asyncio.sleep(rest)
                keys, self._running_low, finished, rows = self._take_pass()
                store_seconds, rested_seconds = await self._pass(keys)
                self._store_passes += 1
                if self._on_pass is not None:
                    self._on_pass(ShredPass(finished, rows, keys is None, store_seconds, rested_seconds))
                self._running_low = self._running_since = None
                if self._waiting():
                    # Later entries wait: their pass drops the log through these too. Meanwhile the
                    # node's own log compaction may drop these, no longer held.
                    self._note_pass(rows, store_seconds)
                    continue
                if await self._drop_log_through(finished):
                    self.passes += 1
                    self._unlogged_passes = self._unlogged_rows = 0
                    # store_seconds: the flush and compactions; it grows with the store (docs/performance.md).
                    log.info("shred.done", through_index=finished, rows=rows, whole_store=keys is None,
                             store_seconds=round(store_seconds, 3), rested_seconds=round(rested_seconds, 3))
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a storage failure: the node stops, as for its other disk work
            self._on_fatal(error)

    async def _pass(self, keys: Iterable[bytes] | None) -> tuple[float, float]:
        """One pass through the store: its flush, then its ranges one at a time with a rest after each
        (none after the last: the next pass waits for it instead). Returns the seconds the store worked
        and the seconds it rested between ranges."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        ranges = await loop.run_in_executor(self._executor, self._store().prepare_shred, keys)
        busy = time.monotonic() - started
        rested = 0.0
        for number, (begin, end) in enumerate(ranges):
            if number and (rest := self._next_compaction_at - time.monotonic()) > 0:
                await asyncio.sleep(rest)
                rested += rest
            began = time.monotonic()
            await loop.run_in_executor(self._executor, self._store().compact_for_shred, begin, end)
            compacted = time.monotonic() - began
            busy += compacted
            self._next_compaction_at = time.monotonic() + compacted * self._rest_factor
        began = time.monotonic()
        await loop.run_in_executor(self._executor, self._store().finish_shred)
        return busy + time.monotonic() - began, rested

    def _note_pass(self, rows: int, store_seconds: float) -> None:
        """A pass that left deletes waiting: a ``shred.pass`` line, at most one in PASS_LOG_SECONDS (passes
        of small stores take milliseconds), summing the passes since the last."""
        self._unlogged_passes += 1
        self._unlogged_rows += rows
        now = time.monotonic()
        if now - self._pass_logged_at >= PASS_LOG_SECONDS:
            log.info("shred.pass", passes=self._unlogged_passes, rows=self._unlogged_rows,
                     store_seconds=round(store_seconds, 3), rows_waiting=self._backlog_keys)
            self._pass_logged_at = now
            self._unlogged_passes = self._unlogged_rows = 0

    async def _drop_log_through(self, target: int) -> bool:
        """True once no segment holds an entry at or below ``target``; False when a later pass will."""
        loop = asyncio.get_running_loop()
        durable = -1
        while self._wal.first_held_index <= target:
            if self._waiting():
                return False  # a later entry waits for its own pass, which drops the log through this one too
            if self._store().applied_index != durable:  # checkpoint (an fsync) only when there is more
                durable = await loop.run_in_executor(self._executor, self._store().checkpoint)
            if durable >= target:
                # Past the target; once everything logged is applied, past the whole log, so that a
                # segment kept for a later truncation record goes too.
                through = durable + 1 if durable >= self._wal.last_index else target
                await loop.run_in_executor(self._executor, self._wal.roll, through)
                hold = self.hold_index()
                await loop.run_in_executor(self._executor, self._wal.release,
                                           durable if hold is None else min(durable, hold - 1))
            if self._wal.first_held_index <= target:
                await asyncio.sleep(POLL_SECONDS)  # later entries in the same segment are not applied yet
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=True)
