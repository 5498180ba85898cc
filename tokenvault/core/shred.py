"""Shredding: after a delete or an epoch destroy is applied, the bytes it removed leave the files too.

Applying a ``DeleteTokensCommand`` deletes token rows and a ``DestroyEpochCommand``
empties an epoch's wrapped secret, but older copies stay on disk: in RocksDB's
memtable, WAL and table files, and in the replication write-ahead log, whose
tokenize and rotate entries carried the ciphertexts and the wrapped secret.
The ``Shredder`` of a node removes them, in this order, in a worker thread:

1. ``VaultStore.prepare_shred``: flush the memtable (RocksDB deletes its WAL files
   up to there); then ``compact_for_shred`` of each key range that holds the
   affected keys down to the bottom level, which drops the old versions with
   their tombstones, resting between two ranges ([shred] max_busy_fraction).
   Past MAX_KEYS_PER_PASS keys waiting, or when the ranges would rewrite three
   quarters of the bottom-level files or more, a sweep instead: the whole key space a
   bottom-level file at a time, wrapping round, with a flush
   (``flush_for_shred``) before a range whenever entries came since the last,
   each entry done once the sweep has come round to where it was flushed;
2. ``VaultStore.checkpoint``, then ``WriteAheadLog.roll`` past the shredding
   entry and ``WriteAheadLog.release`` up to the checkpoint: every segment
   holding an entry at or below it is deleted. Entries after it may not be
   applied yet, so this repeats (polling) until the first segment starts after it.

Until step 1 is done for an entry, ``hold_index`` keeps the node's ordinary log
compaction below that entry: the entry in the log is what makes a node that
crashes meanwhile shred again when it restarts (``note_recovered``).

Not covered: copies outside the data directory (backups, and checkpoints being
streamed to a peer or a backup client until that stream ends, or until a node
killed mid-stream starts again), and the memory of the processes (Python cannot
wipe freed memory).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TypeVar

import msgpack

from protocol import Entry, EntryKind
from tokenvault.core import commands
from tokenvault.core.snapshots import MAX_SHRED_KEY_BYTES, MAX_SHRED_KEYS, PendingShred
from tokenvault.core.store import VaultStore
from tokenvault.core.store_files import replace_file
from tokenvault.core.store_layout import LIFE, delete_row_keys
from tokenvault.core.wal import WriteAheadLog
from tokenvault.logs import get_logger
from tokenvault.smallfiles import FileTooLarge, read_small_file

log = get_logger("shred")
_T = TypeVar("_T")

# Keys one shred pass compacts by their ranges at most (two a deleted token, about 80 bytes each in
# memory, measured); past it a pass compacts the whole key space and keeps no keys.
MAX_KEYS_PER_PASS = 100_000
# A pass by key ranges that would rewrite at least SWEEP_FRACTION of the bottom-level files (of a store
# that has at least SWEEP_MIN_FILES) costs about what a round of the sweep costs: the shredder sweeps
# instead. Entries waiting during a sweep join it from SWEEP_JOIN_KEYS_PER_RANGE keys a range of its lap:
# spread evenly (a token's rows are keyed by the token), k keys over f files hit 1 - e^(-k/f) of them,
# SWEEP_FRACTION of them at -ln(1 - SWEEP_FRACTION) keys a file (about 1.4).
SWEEP_MIN_FILES = 4
SWEEP_FRACTION = 0.75
SWEEP_JOIN_KEYS_PER_RANGE = -math.log(1.0 - SWEEP_FRACTION)
POLL_SECONDS = 0.05
PASS_LOG_SECONDS = 10.0  # shred.pass: one line at most this often
# In a data directory whose store came from a snapshot that may hold rows deleted and not yet shredded (an
# install, or a restore from a backup, whose manifest says shred_pending): the snapshot's index, written
# before the store switches to it, removed once a whole-key-space pass through that index is done, so that
# a restart meanwhile shreds the store too. When the manifest lists the keys of those rows (shred_keys),
# SHRED_KEYS_FILE instead holds the index and the keys (msgpack), removed once a pass through it is done.
SHRED_WHOLE_FILE = "SHRED-WHOLE"
SHRED_WHOLE_RECORD_MAX_BYTES = 32
SHRED_KEYS_FILE = "SHRED-KEYS"
SHRED_KEYS_RECORD_MAX_BYTES = 64 + MAX_SHRED_KEYS * (MAX_SHRED_KEY_BYTES + 3)


@dataclass(frozen=True, slots=True)
class ShredPass:
    """What one pass took and cost, given to ``on_pass`` once it rewrote the store's files."""

    through_index: int  # the highest entry the pass covered
    rows: int  # the keys its entries left (two a deleted token)
    whole_store: bool  # a round of the sweep of the whole key space erased its entries
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


def record_shred_keys(data_dir: Path, index: int, keys: tuple[bytes, ...]) -> None:
    """Durably record that a pass of ``keys`` through ``index`` is due (SHRED_KEYS_FILE)."""
    replace_file(data_dir / SHRED_KEYS_FILE, msgpack.packb([index, list(keys)]), data_dir / (SHRED_KEYS_FILE + ".tmp"))


def read_shred_keys(data_dir: Path) -> tuple[int, tuple[bytes, ...]] | None:
    """The index and keys recorded by ``record_shred_keys``, else None. Read as hostile: bounded and checked;
    a record that is not what it should be raises ValueError (the caller shreds the whole store instead)."""
    try:
        data = read_small_file(data_dir / SHRED_KEYS_FILE, SHRED_KEYS_RECORD_MAX_BYTES)
    except FileNotFoundError:
        return None
    except FileTooLarge:
        raise ValueError("the shred-keys record is too large") from None
    try:
        index, keys = msgpack.unpackb(data, raw=False, max_bin_len=MAX_SHRED_KEY_BYTES, max_array_len=MAX_SHRED_KEYS)
    except Exception:
        raise ValueError("the shred-keys record does not decode") from None
    if (type(index) is not int or not 0 <= index < 2**63 or not isinstance(keys, list)
            or any(type(key) is not bytes or not key for key in keys)):
        raise ValueError("the shred-keys record is malformed")
    return index, tuple(keys)


class ShredRecord:
    """A node's records of what the snapshot it installed (or the backup it was restored from) may hold
    deleted and not yet shredded, each kept on disk from before the store switches to it until a pass
    through its index is done: SHRED_WHOLE_FILE, a whole-key-space pass (``due``), and SHRED_KEYS_FILE, a
    pass of the keys its manifest listed (``keys_due``)."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self.due: int | None = None
        self.keys_due: tuple[int, tuple[bytes, ...]] | None = None

    def recover(self, applied_index: int) -> list[tuple[int, PendingShred]]:
        """At start-up: the passes still due, each with the index it is due through (for
        ``Shredder.note_pending``), in index order. An install that a stop interrupted before its switch
        left the store below a record's index: the pass is due through the store's. A damaged keys record
        counts as a whole-key-space pass due."""
        recorded = read_whole_shred(self._data_dir, applied_index)
        try:
            keyed = read_shred_keys(self._data_dir)
        except ValueError:  # the whole key space instead, recorded before the damaged record goes
            keyed = None
            recorded = applied_index if recorded is None else min(recorded, applied_index)
            record_whole_shred(self._data_dir, recorded)
            (self._data_dir / SHRED_KEYS_FILE).unlink()
        self.due = None if recorded is None else min(recorded, applied_index)
        self.keys_due = None if keyed is None else (min(keyed[0], applied_index), keyed[1])
        due = [] if self.due is None else [(self.due, PendingShred(None))]
        if self.keys_due is not None:
            due.append((self.keys_due[0], PendingShred(self.keys_due[1])))
        return sorted(due, key=lambda item: item[0])

    def record(self, index: int, pending: PendingShred) -> None:
        """Before the store switches to a snapshot at ``index`` that may hold ``pending``. Keys still due from
        an earlier install join the new record (a stop before this switch leaves the old store, which may
        still need them); more than MAX_SHRED_KEYS in all make it a whole-key-space pass."""
        keys = pending.keys
        if keys is not None and self.keys_due is not None:
            keys = tuple(sorted(set(keys).union(self.keys_due[1])))
        if keys is None or len(keys) > MAX_SHRED_KEYS:
            record_whole_shred(self._data_dir, index)
            self.due = index
        else:
            record_shred_keys(self._data_dir, index, keys)
            self.keys_due = (index, keys)

    def passed(self, done: ShredPass) -> None:
        """A pass ended: a whole-key-space one through the due index ends the whole record, any pass through
        the keys record's index ends that one (passes take every entry waiting, the keys' among them)."""
        if done.whole_store and self.due is not None and done.through_index >= self.due:
            (self._data_dir / SHRED_WHOLE_FILE).unlink(missing_ok=True)
            self.due = None
        if self.keys_due is not None and done.through_index >= self.keys_due[0]:
            (self._data_dir / SHRED_KEYS_FILE).unlink(missing_ok=True)
            self.keys_due = None


def shred_keys(command: commands.Command) -> list[bytes]:
    """The store keys whose older versions a shredding command leaves behind."""
    if type(command) is commands.DeleteTokensCommand:
        # Each mapping's row and its life row (expiry and metadata ciphertext).
        rows = delete_row_keys(command.tokens, command.epoch)
        return rows + [LIFE + key for key in rows]
    if type(command) is commands.DestroyEpochCommand:
        return [b"e" + command.epoch.to_bytes(8, "big")]
    return []


@dataclass(frozen=True, slots=True)
class ShredMark:
    """The shredder as a checkpoint is about to be taken (``Shredder.shred_mark``)."""

    passes: int  # passes and sweep marks done so far
    noted: int  # the highest entry noted so far
    keys: frozenset[bytes] | None  # the keys of every entry waiting or under a pass; None: not all known


@dataclass(slots=True)
class _SweepMark:
    """Entries a sweep erases: those noted before the flush at the sweep step where the mark was made. It
    is done once the sweep has compacted every key after that flush: from ``until`` (the key the step began
    at) to the end of the key space, then (``wraps``) from its start round to ``until`` again; for the
    entries left by a targeted pass that gave way to the sweep (``wraps`` false, ``until`` None), only to
    the end of the key space, since that pass compacted their keys below the sweep's start already."""

    low: int  # the lowest and highest entry it covers
    high: int
    rows: int  # the keys those entries left
    since: float | None  # when the oldest of them was noted (time.monotonic)
    until: bytes | None
    wraps: bool
    whole_store: bool  # false: a targeted pass's entries
    busy: float = 0.0  # the store's seconds, and the rests, while it was under way
    rested: float = 0.0
    done: bool = False

    def step_done(self, end: bytes | None, busy: float, rested: float) -> None:
        """The sweep compacted a range ending at ``end`` (None: the end of the key space)."""
        self.busy += busy
        self.rested += rested
        if self.wraps:
            self.wraps = end is not None
        elif end is None or (self.until is not None and end >= self.until):
            self.done = True


class Shredder:
    """One node's shredding task (see the module docstring); every method runs on the event loop.

    Up to MAX_KEYS_PER_PASS keys waiting, a pass takes every entry waiting, in log order, and compacts
    the ranges that hold their keys, so the entry the log must keep (``hold_index``) moves on with every
    pass. Past that it keeps no keys: the entries go to a sweep, which compacts the whole key space a
    bottom-level file at a time and wraps round while anything waits, flushing the memtable before a
    range whenever entries came since the last flush (a ``_SweepMark`` each). A pass whose ranges would
    rewrite three quarters of the bottom files or more is a sweep too, and entries that wait during a
    sweep join it once they have enough keys to hit as many (SWEEP_FRACTION, ``_join_sweep``). An entry is erased once
    the sweep has come round to where it stood when the entry was flushed: one rewrite of the store,
    however long the stream of deletes, where passes that each took the entries waiting at their start
    made an entry that came during a pass wait for the rest of it and all of the next. A targeted pass
    under way when the backlog goes past the bound stops after its current range and the sweep goes on
    from there. What the shredder holds stays bounded however fast deletes come: the keys of one pass,
    or a mark per range of the sweep (docs/performance.md, "A serving cluster under a stream of
    deletes")."""

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
        self._on_pass = on_pass  # after each pass, or sweep mark, is done
        # The entries waiting for a targeted pass, in log order, with their keys; or, past MAX_KEYS_PER_PASS
        # keys, only the first of them (``_whole_from``): they wait for the sweep's next mark.
        self._entries: deque[tuple[int, list[bytes]]] = deque()
        self._whole_from: int | None = None
        self._last_waiting = 0  # the highest entry waiting
        self._backlog_keys = 0
        self._running_low: int | None = None  # the lowest entry of the targeted pass under way
        self._running_keys: list[list[bytes]] = []  # and its entries' keys (for a snapshot's manifest)
        # The sweep's marks not yet done, in log order (and in the order they get done).
        self._marks: deque[_SweepMark] = deque()
        self._lap_ranges: int | None = None  # how many ranges the sweep's last lap had
        # When the oldest entry waiting, and the oldest of the pass under way, were noted (time.monotonic).
        self._waiting_since: float | None = None
        self._running_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shred")
        self.passes = 0  # times the log was dropped through every entry shredded, for tests and the log
        self._store_passes = 0  # passes and sweep marks done (for shred_mark / pending_through)
        self._pass_logged_at = float("-inf")
        self._unlogged_passes = self._unlogged_rows = 0  # passes behind a backlog since the last shred.pass

    def note(self, index: int, command: commands.Command) -> None:
        """A shredding command was applied (or was found applied at start-up) at ``index``."""
        keys = shred_keys(command)
        if keys:
            self.note_keys(index, keys)

    def note_pending(self, index: int, pending: PendingShred) -> None:
        """A snapshot whose manifest says ``pending`` was installed at ``index``, or its record was found at
        start-up: a pass of the keys it lists, or of the whole key space when it lists none."""
        if pending.keys is None:
            self.note_whole_store(index)
        else:
            self.note_keys(index, list(pending.keys))

    def note_keys(self, index: int, keys: list[bytes]) -> None:
        """Rows of ``keys`` may hold deleted bytes from ``index`` on: a shredding command applied there, or a
        snapshot installed there whose manifest listed them (or its record found at start-up)."""
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
        deletes, so the sweep compacts the whole key space from its next mark on. A pass or mark under way
        was planned on the store before and does not count."""
        self._last_waiting = max(self._last_waiting, index)
        if self._whole_from is None:
            self._go_whole(index)
        self._wake()

    def _go_whole(self, index: int) -> None:
        """The entries waiting go to the sweep: keep only the first of them (or ``index``)."""
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
        noted in log order (those found at start-up before the first applied), and the marks, the pass
        under way and the entries waiting hold them in that order, so the lowest is the first of them."""
        candidates = [self._whole_from] if self._whole_from is not None else []
        if self._entries:
            candidates.append(self._entries[0][0])
        if self._running_low is not None:
            candidates.append(self._running_low)
        if self._marks:
            candidates.append(self._marks[0].low)
        return min(candidates) if candidates else None

    def shred_mark(self) -> ShredMark:
        """Just before a checkpoint is taken; ``pending_through`` reads it after."""
        keys = self._held_keys(None)
        return ShredMark(self._store_passes, self._last_waiting, None if keys is None else frozenset(keys))

    def pending_through(self, mark: ShredMark, index: int) -> PendingShred | None:
        """After a checkpoint at ``index`` was taken, ``mark`` from ``shred_mark`` before it: None only if every
        delete and destroy at or below ``index`` had been shredded when it was taken; else the keys of the
        rows it may hold (those held at the mark, and those of entries at or below ``index`` held now), or,
        when some are not known, PendingShred(None): anywhere.

        Nothing held at the mark: one applied since at or below ``index`` either waits or is being shredded
        (the hold is at or below it) or went through a pass or mark that ended after the mark, perhaps after
        the checkpoint. Such a pass's keys are kept by no one once it ended, so when one ended and entries
        were noted since the mark, the rows may be anywhere. Apply and ``note`` run in one step on the loop,
        so by now every entry at or below ``index`` was noted."""
        hold = self.hold_index()
        if mark.keys == frozenset() and mark.passes == self._store_passes and (hold is None or hold > index):
            return None
        if mark.keys is None or (mark.passes != self._store_passes and self._last_waiting > mark.noted):
            return PendingShred(None)
        now = self._held_keys(index)
        keys = None if now is None else mark.keys.union(now)
        if not keys or len(keys) > MAX_SHRED_KEYS:
            return PendingShred(None)
        return PendingShred(tuple(sorted(keys)))

    def _held_keys(self, through: int | None) -> set[bytes] | None:
        """The keys of every entry waiting (at or below ``through``, when given) or under a targeted pass;
        None when the sweep holds entries (it keeps no keys) or they are more than MAX_SHRED_KEYS."""
        if self._sweeping():
            return None
        keys: set[bytes] = set()
        waiting = (entry_keys for index, entry_keys in self._entries if through is None or index <= through)
        for entry_keys in chain(self._running_keys, waiting):
            keys.update(entry_keys)
            if len(keys) > MAX_SHRED_KEYS:
                return None
        return keys

    @property
    def backlog_keys(self) -> int:
        """Keys noted and not yet taken by a pass or a sweep mark."""
        return self._backlog_keys

    def oldest_wait_seconds(self) -> float:
        """How long the oldest delete or destroy noted and not yet through a pass or sweep has waited: from
        its apply (at start-up, from the start) to now; 0 when none waits."""
        noted = [since for since in (self._waiting_since, self._running_since) if since is not None]
        noted.extend(mark.since for mark in self._marks if mark.since is not None)
        return time.monotonic() - min(noted) if noted else 0.0

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def _waiting(self) -> bool:
        return self._whole_from is not None or bool(self._entries) or bool(self._marks)

    def _sweeping(self) -> bool:
        return self._whole_from is not None or bool(self._marks)

    def _take_pass(self) -> tuple[Iterable[bytes], int, int, int]:
        """Every entry waiting: their keys (read in the shredder's thread, which sorts them), the lowest and
        highest entry, and how many keys they left."""
        self._running_keys = [entry_keys for _, entry_keys in self._entries]
        keys = chain.from_iterable(self._running_keys)
        taken = (keys, self._entries[0][0], self._last_waiting, self._backlog_keys)
        self._entries.clear()
        self._backlog_keys = 0
        self._running_since, self._waiting_since = self._waiting_since, None
        return taken

    def _take_mark(self, until: bytes | None) -> None:
        """Just before a sweep's flush: the entries waiting become a mark done one round after ``until``."""
        if self._whole_from is None:
            return
        self._marks.append(_SweepMark(self._whole_from, self._last_waiting, self._backlog_keys, self._waiting_since,
                                      until, wraps=until is not None, whole_store=True))
        self._whole_from = None
        self._backlog_keys = 0
        self._waiting_since = None

    async def _run(self) -> None:
        try:
            while self._waiting():
                sweep_from: bytes | None = None
                if not self._sweeping():
                    sweep_from = await self._targeted_pass()
                if self._sweeping():
                    await self._sweep(sweep_from)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a storage failure: the node stops, as for its other disk work
            self._on_fatal(error)

    async def _rest(self) -> float:
        """Wait until the next compaction may start ([shred] max_busy_fraction); the seconds waited."""
        rest = self._next_compaction_at - time.monotonic()
        if rest <= 0:
            return 0.0
        await asyncio.sleep(rest)
        return rest

    async def _compact(self, begin: bytes | None, end: bytes | None) -> float:
        began = time.monotonic()
        await self._in_thread(self._store().compact_for_shred, begin, end)
        compacted = time.monotonic() - began
        self._next_compaction_at = time.monotonic() + compacted * self._rest_factor
        return compacted

    async def _targeted_pass(self) -> bytes | None:
        """A pass over the ranges that hold the keys of every entry waiting: its flush, then its ranges one
        at a time with a rest before each. If the backlog goes past MAX_KEYS_PER_PASS meanwhile, it stops
        before its next range, whose first key it returns: its entries become a mark and the sweep goes
        on from that key. Else it returns None once done."""
        await self._rest()  # after the last pass's compaction (not one of this pass's rests)
        if self._sweeping():
            return None  # the backlog went past the bound during the rest: the sweep takes it
        keys, self._running_low, finished, rows = self._take_pass()
        rested = 0.0
        started = time.monotonic()
        plan = await self._in_thread(self._store().prepare_shred, keys)
        busy = time.monotonic() - started
        if plan.bottom_files >= SWEEP_MIN_FILES and plan.overlapped >= SWEEP_FRACTION * plan.bottom_files:
            # Its ranges would rewrite most of the store anyway: a sweep instead, from the start of the key
            # space (its entries are flushed), so that deletes that come meanwhile wait a round of it, not
            # the rest of this pass and all of the next.
            self._give_way(finished, rows, True, busy, rested)
            return None
        for number, (begin, end) in enumerate(plan.ranges):
            if number:
                rested += await self._rest()
                if self._whole_from is not None and begin is not None:
                    # Its keys below ``begin`` are compacted since its flush; the sweep takes the rest.
                    self._give_way(finished, rows, False, busy, rested)
                    return begin
            busy += await self._compact(begin, end)
        began = time.monotonic()
        await self._in_thread(self._store().finish_shred)
        busy += time.monotonic() - began
        self._running_low = self._running_since = None
        self._running_keys = []
        await self._passed(ShredPass(finished, rows, False, busy, rested))
        return None

    def _give_way(self, finished: int, rows: int, whole_store: bool, busy: float, rested: float) -> None:
        """The targeted pass under way stops: its entries become the sweep's first mark, done once the sweep
        (which starts at the pass's next range, or at the start of the key space) reaches the end of it."""
        assert self._running_low is not None
        self._marks.appendleft(_SweepMark(self._running_low, finished, rows, self._running_since, None,
                                          wraps=False, whole_store=whole_store, busy=busy, rested=rested))
        self._running_low = self._running_since = None
        self._running_keys = []

    async def _sweep(self, start: bytes | None) -> None:
        """Compact the whole key space a range at a time from ``start`` (None: its first key), wrapping
        round, until every mark is done and nothing waits for the sweep. A lap's ranges are read after
        the flush that starts it; every other range is flushed before only when entries came since."""
        while self._sweeping():
            rested = await self._rest()
            self._join_sweep()
            self._take_mark(start)
            began = time.monotonic()
            lap = (await self._in_thread(self._store().prepare_shred, None)).ranges
            busy = time.monotonic() - began
            self._lap_ranges = len(lap)
            for number, (begin, end) in enumerate(_ranges_from(lap, start)):
                if number:
                    if not self._sweeping():
                        return
                    rested = await self._rest()
                    self._join_sweep()
                    if self._whole_from is not None:
                        self._take_mark(begin)
                        began = time.monotonic()
                        await self._in_thread(self._store().flush_for_shred)
                        busy = time.monotonic() - began
                busy += await self._compact(begin, end)
                for mark in self._marks:
                    mark.step_done(end, busy, rested)
                busy = rested = 0.0
                await self._marks_done()
            start = None

    def _join_sweep(self) -> None:
        """Entries waiting for a pass by key ranges join the sweep once they have SWEEP_JOIN_KEYS_PER_RANGE
        keys a range of its lap: spread over the key space, their own pass would rewrite most of the store
        after the sweep, a second round for them. Fewer wait for the sweep to end, then take a pass of
        their own, which costs part of a rewrite."""
        if (self._whole_from is None and self._entries and self._lap_ranges is not None
                and self._backlog_keys >= SWEEP_JOIN_KEYS_PER_RANGE * self._lap_ranges):
            self._go_whole(self._entries[0][0])

    async def _marks_done(self) -> None:
        """The marks at the head that are done, each reported as a pass."""
        if not (self._marks and self._marks[0].done):
            return
        await self._in_thread(self._store().finish_shred)
        while self._marks and self._marks[0].done:
            mark = self._marks.popleft()
            await self._passed(ShredPass(mark.high, mark.rows, mark.whole_store, mark.busy, mark.rested))

    async def _passed(self, done: ShredPass) -> None:
        """A pass, or a sweep mark, erased its entries from the store's files: tell the node; once nothing
        waits, drop the log through them."""
        self._store_passes += 1
        if self._on_pass is not None:
            self._on_pass(done)
        if self._waiting():
            # Later entries wait: their pass drops the log through these too. Meanwhile the node's own
            # log compaction may drop these, no longer held.
            self._note_pass(done.rows, done.store_seconds)
            return
        if await self._drop_log_through(done.through_index):
            self.passes += 1
            self._unlogged_passes = self._unlogged_rows = 0
            # store_seconds: the flush and compactions; it grows with the store (docs/performance.md).
            log.info("shred.done", through_index=done.through_index, rows=done.rows, whole_store=done.whole_store,
                     store_seconds=round(done.store_seconds, 3), rested_seconds=round(done.rested_seconds, 3))

    async def _in_thread(self, function: Callable[..., _T], *arguments: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *arguments)

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


def _ranges_from(ranges: list[tuple[bytes | None, bytes | None]],
                 start: bytes | None) -> list[tuple[bytes | None, bytes | None]]:
    """The ranges of ``ranges`` (in key order, covering the key space) from ``start`` on, the first cut
    to begin there."""
    if start is None:
        return ranges
    kept = [(begin, end) for begin, end in ranges if end is None or end > start]
    return [(start, kept[0][1]), *kept[1:]] if kept else [(start, None)]
