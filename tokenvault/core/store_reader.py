"""A read-only view of a node's store for its HTTP worker processes: a RocksDB secondary instance.

The core process owns the store (tokenvault.core.store) and is its only
writer. An HTTP worker opens the same live generation as a RocksDB *secondary*
instance: it reads the table files and tails the store's own WAL, never
writes, and sees the core's writes only when it catches up
(``try_catch_up_with_primary``). What it sees is always the end of some applied
batch, because a batch is one WriteBatch with the meta record in it: the meta's
applied index says exactly how far this view is.

The view is never trusted to be recent. A caller that needs "everything
committed before the request started" asks the core, which applies that much
and answers the last index at which it removed or made unreadable any mapping
(Node.removal_index: later entries only add); the caller then calls
``CatchUp.wait_applied(index)``, and the reader catches up until its meta says
it is there (seldom needed: removals are rare). A generation switch (a
snapshot install renames CURRENT to a new generation and deletes the old one)
is noticed on catch-up and the view is reopened on the new generation. A view
holds the table files it opened until it catches up past them, so the core
tells its workers to catch up after a shred pass or an install (the rows a
shred erases are in the old files).

Costs, measured on the 2-vCPU development machine (docs/performance.md): a
catch-up is 0.5-1 ms when nothing was written, plus the replay of whatever
the core wrote since the view last moved into the view's own memtable (some
11 ms per MiB of WAL on an idle core, bench/view_open.py), and RocksDB keeps
the GIL while it runs, so ``CatchUp`` runs at most one at a time for all the
requests of a worker that wait; a multi-get of 100 keys is about 135 µs. Each worker replays every
byte the core writes, so a catch-up no request waits for waits out a flush
and a write burst (``catch_up``'s ``wait_out_flush`` and
``max_replay_bytes``): under a fill of 120,000 values/s on two workers that
took the workers' event-loop stalls over 100 ms from about 130 to none. When
the burst is over, a view still that far behind has the core flush its
memtable (``CatchUp``'s ``ask_flush``, Node.flush_store_for_views) and opens
again on the new WAL file, rather than replay the old one (up to the 64 MiB
write buffer) in one go; a worker that starts during a burst does the same
before it opens its view (``open_view``).

Opening again is what every memtable flush of the core costs each view, so the
view keeps each table file's index and filter blocks in its block cache
(``database_options(metadata_in_cache=True)``) rather than in the table
readers an open builds: the cache (a clock cache, see StoreReader) outlives
the open, a block's cache key is the same across opens of the same file, and
an open again only reads what the files that are new since need. The cache
is sized after every open and catch-up to hold all of those blocks (RocksDB's
aggregated table properties say how large they are) besides
``READER_CACHE_BYTES`` of data blocks, so its bound grows with the store
exactly as the table readers' memory did.

Every failure (a file the core's compaction deleted under a lagging view, a
generation gone, a malformed meta) raises StoreReadError; the caller then asks
the core instead, so a reader problem costs speed, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from rocksdict import AccessType, Cache, Rdict

from tokenvault.core.store_files import followed_files, read_current, wal_file_bytes, wal_file_names
from tokenvault.core.store_layout import (LIFE, LIFE_END, META_KEY, StoreError,
                                          database_options, decode_meta, first_key, lookup_format_tokens, lookup_opaque,
                                          metadata_rows, reason, table_metadata_bytes)
from tokenvault.errors import ServiceError
from tokenvault.logs import get_logger

log = get_logger("store_reader")

# Each worker's own block cache for data blocks: reads of recent tokens mostly hit the OS page cache the
# core shares. The cache is larger by the table files' index and filter blocks (StoreReader._size_cache).
READER_CACHE_BYTES = 32 * 1024 * 1024
# RocksDB sizes a clock cache's table by itself when told no typical entry size.
AUTO_ENTRY_CHARGE = 0
# A view asked for tokens it lacks catches up at most this often on its own account: a catch-up costs
# about a millisecond when little was written (at most MAX_NUDGE_REPLAY_BYTES of replay otherwise), so
# about 2 % of a worker's core, and a token is in the view 50 ms after it is (outside a write burst).
NUDGE_INTERVAL_SECONDS = 0.05


# Opening a view is retried this often when the core switches its WAL file meanwhile.
REOPEN_ATTEMPTS = 5
# A catch-up (or an open) replays the store's WAL written since the view last moved into the view's own
# memtable, on the worker's loop with the GIL held: about 11 ms per MiB on an idle core of the development
# machine, three to four times that while a fill shares its two cores.
# A nudge, which no request waits for, replays at most this much at once while the store is being
# written faster than CALM_BYTES per nudge; a view then stays where it is until the writes calm down
# (the requests it cannot answer go to the core).
MAX_NUDGE_REPLAY_BYTES = 2 * 1024 * 1024
CALM_BYTES = 256 * 1024
# Once the writes calm down, a view that fell further behind than that asks the core to flush its
# memtable (Node.flush_store_for_views) instead of replaying the WAL, and opens again on the new WAL
# file once the flush is done; if no flush has begun this long after the core said one would, it
# replays after all.
FLUSH_WAIT_SECONDS = 2.0
# A worker that starts while the live WAL is long waits this long at most for the flush it asked for
# (open_view), looking this often; it serves meanwhile, with every read through the core.
OPEN_FLUSH_WAIT_SECONDS = 10.0
FLUSH_POLL_SECONDS = 0.05


class StoreReadError(StoreError):
    """This view cannot answer right now; ask the core."""


class StoreReader:
    """One worker's secondary instance of the store at ``store_path``; ``scratch`` holds its own files
    (RocksDB's info log for the secondary), emptied on open and removed on close.

    Belongs to one thread (the worker's event loop)."""

    def __init__(self, store_path: Path, scratch: Path, *, cache_bytes: int = READER_CACHE_BYTES) -> None:
        self._store_path = Path(store_path)
        self._scratch = Path(scratch)
        self._data_cache_bytes = cache_bytes
        # Why a clock cache, not the default LRU one: an LRU cache of this size is split into 64 shards of
        # well under 2 MB, while a table file's filter block is one block of about 1.2 MB per million
        # tokens, so filter blocks pushed each other out and a 100-token lookup took 2-3 ms instead of
        # 0.3 (measured at 10 M tokens). This cache keeps fewer, larger shards.
        self._cache = Cache.new_hyper_clock_cache(cache_bytes, AUTO_ENTRY_CHARGE)
        self.cache_bytes = cache_bytes  # the cache's capacity now (data blocks, index and filter blocks)
        self._db: Rdict | None = None
        self._generation = ""
        self._wals: tuple[str, ...] = ()  # the WAL files when the view was opened (wal_file_names)
        self._manifests: tuple[str, ...] = ()  # the MANIFEST files then (store_files.followed_files)
        self._replayed_bytes = 0  # their bytes when the view last moved (it has replayed at least that)
        self._deferred_at_bytes: int | None = None  # the WAL's bytes when a nudge last found too much to replay
        # When this view last asked the core for a flush and was told one was under way (-inf: the core
        # said no, so replay; None: not asked since the view last moved). ``flush_wanted``: ask now.
        self._flush_asked_at: float | None = None
        self.flush_wanted = False
        self.deferred = 0  # nudges that left the view where it was (for the metrics and the tests)
        self.flushes_asked = 0  # likewise: flushes asked of the core for this view (flush_asked)
        self.applied_index = 0
        self._has_life = True
        self.catch_ups = 0  # for the metrics and the tests
        self.opens = 0  # likewise: the first open, and every open again (a flush, a generation switch)
        self._unsized_logged = False

    def open(self) -> "StoreReader":
        """Open the live generation; StoreReadError if it cannot be opened."""
        shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch.mkdir(parents=True, mode=0o700)
        self._reopen()
        return self

    def _reopen(self) -> None:
        self._close_database()
        try:
            generation = read_current(self._store_path)
        except StoreError as error:
            raise StoreReadError(str(error)) from None
        if self._generation and self._generation != generation:
            # The old generation's info log goes with it: a worker that lives through many snapshot
            # installs keeps one scratch directory, not one per install.
            shutil.rmtree(self._scratch / self._generation, ignore_errors=True)
        directory = self._store_path / generation
        # rocksdict's config file is not checked here: the core checked it when it opened this generation,
        # which it does before CURRENT names it (VaultStore.open, prepare_install), and every open of the
        # store, a secondary's included, rewrites that file in place, so another worker's view opening at
        # the same moment made it read empty now and then.
        options = database_options(self._cache, metadata_in_cache=True)
        # A secondary keeps every table file it opened open: the core's compactions may delete them.
        options.set_max_open_files(-1)
        for _ in range(REOPEN_ATTEMPTS):
            files = followed_files(directory)
            wal_bytes = wal_file_bytes(directory, files[0])
            try:
                self._db = Rdict(str(directory), options, column_families={"default": options},
                                 access_type=AccessType.secondary(str(self._scratch / generation)))
            except Exception as failure:
                raise StoreReadError(f"the store cannot be opened for reading: {reason(failure)}") from None
            if followed_files(directory) == files:
                break
            # The core flushed or started a new MANIFEST while this opened: open again on the new files.
            self._close_database()
        else:
            raise StoreReadError("the store kept changing its write-ahead log while the view opened")
        self._generation = generation
        self._wals, self._manifests = files
        self._replayed_bytes = wal_bytes
        self._deferred_at_bytes = self._flush_asked_at = None
        self.opens += 1
        self._read_meta()

    def _read_meta(self) -> None:
        database = self._database()
        try:
            self.applied_index = decode_meta(database.get(META_KEY), StoreReadError)[0]
            self._has_life = first_key(database, LIFE, LIFE_END) is not None
            self._size_cache(table_metadata_bytes(database))
        except StoreReadError:
            raise
        except Exception as failure:
            raise StoreReadError(f"reading the store failed: {reason(failure)}") from None

    def _size_cache(self, metadata_bytes: int | None) -> None:
        """Room for every index and filter block of the view's table files, an eighth more for the files a
        compaction is writing meanwhile, and the data blocks' own share. Were the cache smaller, lookups
        would evict and read again whole filter blocks (about 1.2 MB per million tokens) instead of data
        blocks of 4 KiB. Unknown (RocksDB did not say): the capacity stays as it was."""
        if metadata_bytes is None:
            if not self._unsized_logged:  # once: a catch-up may come every 50 ms
                log.warning("store_reader.cache_not_sized", capacity=self.cache_bytes)
                self._unsized_logged = True
            return
        self._unsized_logged = False
        capacity = self._data_cache_bytes + metadata_bytes + metadata_bytes // 8
        if capacity != self.cache_bytes:
            self._cache.set_capacity(capacity)
            self.cache_bytes = capacity

    @property
    def has_life(self) -> bool:
        """Whether any mapping in this view may have an expiry (then a lookup depends on the clock)."""
        return self._has_life

    def _database(self) -> Rdict:
        if self._db is None:
            raise StoreReadError("the store reader is closed")
        return self._db

    def catch_up(self, *, wait_out_flush: bool = False, max_replay_bytes: int | None = None,
                 may_ask_flush: bool = False) -> int:
        """Catch up with the core's writes (reopening on a new generation); the applied index now seen.

        ``wait_out_flush`` (a catch-up no request waits for): while the core flushes a memtable, the
        view stays as it is and opens again once the flush is done. RocksDB starts a new WAL file
        when a memtable fills and deletes the old one once its table file is written; opening in
        between replays the whole old file, up to a write buffer (64 MiB: 1-2 s of the worker's loop
        under a fill, measured), and catching up across the switch is what returns stale rows. Once
        the old file is gone an open replays only what the new one holds. A view that stays is an
        older batch end, which is all a view ever promises.

        ``max_replay_bytes`` (likewise): the view stays as it is rather than replay more than that
        much WAL at once while the core writes faster than CALM_BYTES between two such calls; once it
        writes slower, the view catches up however far it has to go, unless ``may_ask_flush``: then
        it first sets ``flush_wanted``, for its caller to ask the core for a flush (``flush_asked``),
        and stays where it is for up to FLUSH_WAIT_SECONDS while the flush begins; the open after the
        flush replays only the new WAL file."""
        self.catch_ups += 1
        self.flush_wanted = False
        try:
            generation = read_current(self._store_path)
        except StoreError:  # unreadable or damaged: the reopen below says why
            generation = ""
        if generation != self._generation:
            log.info("store_reader.new_generation", generation=generation[:32])
            self._reopen()
            return self.applied_index
        directory = self._store_path / self._generation
        wals, manifests = followed_files(directory)
        if manifests != self._manifests:
            # RocksDB started a new MANIFEST (store_files.followed_files): never caught up across, opened anew.
            self._reopen()
            return self.applied_index
        if wals != self._wals:
            if wait_out_flush and self._wals and set(self._wals) < set(wals):
                self.deferred += 1
                return self.applied_index  # a flush under way: every WAL file the view read is still there
            if not set(self._wals) <= set(wals):
                self._flush_asked_at = None  # a flush is done (one this view asked for, or another)
            live = wal_file_bytes(directory, wals)
            if self._defer(live, live, max_replay_bytes, may_ask_flush):  # an open replays every live WAL file
                return self.applied_index
            # The core flushed its memtable (a full write buffer, a shred): a new WAL file, or the old
            # one deleted. A secondary that catches up across that keeps what it had replayed of the
            # old WAL in its memtable, where it hides newer rows of the same keys in the flushed table
            # (a delete, the meta record): measured, a deleted token read back and the applied index
            # stuck. A view opened afresh on the live files holds no such memtable.
            self._reopen()
            return self.applied_index
        live = wal_file_bytes(directory, wals)
        if self._defer(live - self._replayed_bytes, live, max_replay_bytes, may_ask_flush):
            return self.applied_index
        try:
            self._database().try_catch_up_with_primary()
            self._read_meta()
            self._replayed_bytes = live
            self._deferred_at_bytes = self._flush_asked_at = None
        except Exception as failure:
            # A view that cannot follow (a table file it needed is gone, say) starts again from the live files.
            log.warning("store_reader.reopening", reason=reason(failure))
            self._reopen()
            return self.applied_index
        if followed_files(directory) != (self._wals, self._manifests):
            self._reopen()  # the switch came while this caught up: what it read may straddle it
        return self.applied_index

    def _defer(self, pending: int, live: int, max_replay_bytes: int | None, may_ask_flush: bool) -> bool:
        """Whether to leave the view as it is rather than replay ``pending`` WAL bytes (``live`` in all)."""
        if max_replay_bytes is None or pending <= max_replay_bytes:
            return False
        calm = self._deferred_at_bytes is not None and 0 <= live - self._deferred_at_bytes <= CALM_BYTES
        if calm:
            asked_at = self._flush_asked_at
            if not may_ask_flush or (asked_at is not None and time.monotonic() - asked_at >= FLUSH_WAIT_SECONDS):
                return False  # replay: no flush to wait for
            if asked_at is None:
                self.flush_wanted = True
            self.deferred += 1
            return True
        self._deferred_at_bytes = live
        self.deferred += 1
        return True

    def flush_asked(self, under_way: bool) -> None:
        """What the core answered when asked for a flush (``flush_wanted``): whether one is under way.
        If so, the view waits for it; if not, the next catch-up replays."""
        self._flush_asked_at = time.monotonic() if under_way else -math.inf
        self.flushes_asked += 1

    def lookup(self, tokens: Sequence[str], now_ms: int) -> dict[str, bytes]:
        """Ciphertexts of the live opaque tokens among ``tokens`` as of this view (VaultStore.lookup)."""
        return self._read(lambda database: lookup_opaque(database, tokens, now_ms, has_life=self._has_life))

    def lookup_format(self, epoch: int, tokens: Sequence[str], now_ms: int) -> dict[str, bytes]:
        """Ciphertexts of the live card and digits tokens of ``epoch`` among ``tokens`` as of this view
        (VaultStore.lookup_format)."""
        return self._read(lambda database: lookup_format_tokens(database, epoch, tokens, now_ms,
                                                                has_life=self._has_life))

    def metadata(self, epoch: int | None, tokens: Sequence[str]) -> dict[str, bytes]:
        """The metadata ciphertexts of the mappings among ``tokens`` as of this view (VaultStore.metadata:
        opaque tokens when ``epoch`` is None, else card and digits tokens of ``epoch``)."""
        return self._read(lambda database: metadata_rows(database, epoch, tokens, has_life=self._has_life))

    def _read(self, read: Callable[[Rdict], dict[str, bytes]]) -> dict[str, bytes]:
        """``read`` on this view's database; any failure of it is a StoreReadError (ask the core)."""
        try:
            return read(self._database())
        except StoreReadError:
            raise
        except Exception as failure:
            raise StoreReadError(f"reading the store failed: {reason(failure)}") from None

    def _close_database(self) -> None:
        database, self._db = self._db, None
        if database is not None:
            try:
                database.close()
            except Exception:
                pass  # a secondary holds nothing to flush

    def close(self) -> None:
        self._close_database()
        shutil.rmtree(self._scratch, ignore_errors=True)


async def open_view(store_path: Path, scratch: Path, ask_flush: Callable[[], Awaitable[bool]], *,
                    wait_seconds: float = OPEN_FLUSH_WAIT_SECONDS) -> StoreReader:
    """A worker's view, opened as StoreReader.open does; but when the store's live WAL holds more than
    MAX_NUDGE_REPLAY_BYTES (a worker started during a fill: up to a write buffer, a second or more of
    its loop), it first asks the core for a flush and waits, up to ``wait_seconds``, for the old WAL
    files to go, so that the open replays only the new one. StoreReadError as StoreReader.open."""
    try:
        directory = Path(store_path) / read_current(Path(store_path))
    except StoreError as error:
        raise StoreReadError(str(error)) from None
    names = wal_file_names(directory)
    live = wal_file_bytes(directory, names)
    if live <= MAX_NUDGE_REPLAY_BYTES:
        return StoreReader(store_path, scratch).open()
    try:
        under_way = await ask_flush()
    except ServiceError as error:
        log.info("store_reader.flush_not_asked", error=str(error)[:200])
        under_way = False
    started = time.monotonic()
    while under_way and set(wal_file_names(directory)) & set(names) and time.monotonic() - started < wait_seconds:
        await asyncio.sleep(FLUSH_POLL_SECONDS)
    log.info("store_reader.flush_before_open", wal_bytes=live,
             flushed=under_way and not set(wal_file_names(directory)) & set(names),
             waited_ms=round((time.monotonic() - started) * 1000))
    reader = StoreReader(store_path, scratch).open()
    reader.flushes_asked = 1
    return reader


class CatchUp:
    """Brings one StoreReader up to the indexes requests wait for, one catch-up at a time for all of them.

    ``wait_applied(index)`` returns once the view has applied ``index``; a catch-up
    started after the call is what answers it, so one pass serves every request that
    was waiting when it began. StoreReadError when the view fails or does not get
    there within ``timeout_seconds`` (the caller then asks the core). Every catch-up
    (a waiter's, a nudge's) runs in the one task at a time, on the worker's loop: RocksDB
    holds the GIL through it, so two at once would only queue."""

    def __init__(self, reader: StoreReader, *, retry_seconds: float = 0.001,
                 nudge_interval_seconds: float = NUDGE_INTERVAL_SECONDS,
                 ask_flush: Callable[[], Awaitable[bool]] | None = None) -> None:
        self._reader = reader
        # Asks the core to flush its memtable (Node.flush_store_for_views); whether a flush is under way.
        self._ask_flush = ask_flush
        self._retry_seconds = retry_seconds
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._nudge_interval_seconds = nudge_interval_seconds
        self._last_nudge = -math.inf
        self._wanted = False  # a nudge asked for one catch-up, waiter or not
        self._must = False  # the core asked for one (catch_up_soon): it may not wait out a flush

    def nudge(self, interval_seconds: float | None = None) -> None:
        """Catch up soon, for no waiter: a view asked for tokens it lacks may be behind. At most one
        nudge per interval (``interval_seconds``, else the one set for this CatchUp), so a stream of
        unknown tokens costs a bounded share of the worker's time."""
        now = time.monotonic()
        interval = self._nudge_interval_seconds if interval_seconds is None else interval_seconds
        if now - self._last_nudge >= interval:
            self._last_nudge = now
            self._want()

    def catch_up_soon(self) -> None:
        """Catch up once, now: the core rewrote or replaced the store's files (a shred, a snapshot), and
        this view holds the old ones open until it moves on (erased rows stay readable in them)."""
        self._must = True
        self._want()

    def _want(self) -> None:
        self._wanted = True
        self._start()

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._pump())

    async def wait_applied(self, index: int, timeout_seconds: float) -> None:
        if self._reader.applied_index >= index:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((index, future))
        self._start()
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_seconds)
        except asyncio.TimeoutError:
            raise StoreReadError(f"the store view did not reach index {index} in time") from None
        finally:
            if not future.done():
                future.cancel()

    async def _pump(self) -> None:
        while self._waiters or self._wanted:
            await asyncio.sleep(0)  # let the requests of this loop turn join the pass
            # Only a nudge waits out a flush or a write burst: a request waiting for an index, or the
            # core after it rewrote files, has the view move whatever that costs.
            nudged = not (self._waiters or self._must)
            self._wanted = self._must = False
            try:
                applied = self._reader.catch_up(wait_out_flush=nudged,
                                                max_replay_bytes=MAX_NUDGE_REPLAY_BYTES if nudged else None,
                                                may_ask_flush=self._ask_flush is not None)
            except StoreReadError as error:
                log.warning("worker.store_view_failed", error=str(error)[:200])
                waiters, self._waiters = self._waiters, []
                for _, future in waiters:
                    if not future.done():
                        future.set_exception(StoreReadError(str(error)))
                continue
            if self._reader.flush_wanted and self._ask_flush is not None:
                await self._flush_for_view()
            still: list[tuple[int, asyncio.Future[None]]] = []
            for index, future in self._waiters:
                if future.done():
                    continue
                if applied >= index:
                    future.set_result(None)
                else:
                    still.append((index, future))
            self._waiters = still
            if still:
                await asyncio.sleep(self._retry_seconds)

    async def _flush_for_view(self) -> None:
        """Ask the core for the flush the view wants; if none is under way, catch up again (a replay)."""
        assert self._ask_flush is not None
        try:
            under_way = await self._ask_flush()
        except ServiceError as error:  # the core is busy, restarting or gone: the view replays instead
            log.info("store_reader.flush_not_asked", error=str(error)[:200])
            under_way = False
        self._reader.flush_asked(under_way is True)
        if under_way is not True:
            self._wanted = True
