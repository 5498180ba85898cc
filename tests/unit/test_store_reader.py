"""Unit tests for tokenvault.core.store_reader: a worker's read-only view of the store (a secondary instance)."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_store import Log, started, token, tokenize
from tokenvault.core.commands import TokenizeCommand, encode_command
from tokenvault.core.store import VaultStore
from tokenvault.core.store_layout import Outcome
from tokenvault.core.store_reader import CatchUp, StoreReadError, StoreReader


@pytest.fixture
def store(tmp_path):
    vault = VaultStore.open(tmp_path / "store")
    yield vault
    vault.close()


@pytest.fixture
def reader(store, tmp_path):
    view = StoreReader(tmp_path / "store", tmp_path / "reader").open()
    yield view
    view.close()


def test_the_view_sees_applied_writes_only_after_it_catches_up(store, reader):
    log = Log()
    started(store, log)
    assert reader.lookup([token(1, 1)], 0) == {}
    (result,) = store.apply_batch([log.command(tokenize(1, [1, 2]))])
    assert result.outcome == Outcome.OK
    assert reader.lookup([token(1, 1)], 0) == {}  # not caught up yet: the view is an older batch end
    assert reader.catch_up() == store.applied_index == 3
    assert reader.lookup([token(1, 1), token(1, 2), token(1, 3)], 0) == {token(1, 1): b"ct-1", token(1, 2): b"ct-2"}
    assert reader.lookup([token(1, 1)], 0) == store.lookup([token(1, 1)], 0)


def test_an_expired_mapping_is_left_out_as_the_store_leaves_it_out(store, reader):
    log = Log()
    started(store, log)
    command = TokenizeCommand(1, ((token(1, 7), b"ct-7"),), "tokenizer", None, None, 1_000,
                              expires_at_ms=5_000)
    store.apply_batch([log.command(encode_command(command))])
    reader.catch_up()
    assert reader.lookup([token(1, 7)], 4_999) == {token(1, 7): b"ct-7"}
    assert reader.lookup([token(1, 7)], 5_000) == {} == store.lookup([token(1, 7)], 5_000)


def test_a_new_generation_is_noticed_on_catch_up_and_the_view_reopened(tmp_path, store, reader):
    source = VaultStore.open(tmp_path / "source")
    log = Log()
    started(source, log)
    source.apply_batch([log.command(tokenize(1, [40]))])
    index, view = source.create_checkpoint(tmp_path / "checkpoint")
    store.commit_install(store.prepare_install(tmp_path / "checkpoint", index, view)).close()
    assert (tmp_path / "store" / "gen-000001").exists() is False
    assert reader.catch_up() == index
    assert reader.lookup([token(1, 40)], 0) == {token(1, 40): b"ct-40"}
    # The view's own files of the old generation are gone with it.
    assert sorted(entry.name for entry in (tmp_path / "reader").iterdir()) == ["gen-000002"]
    source.close()


def test_a_store_that_is_not_there_is_a_read_error_not_a_crash(tmp_path):
    with pytest.raises(StoreReadError):
        StoreReader(tmp_path / "nowhere", tmp_path / "reader").open()


def test_one_catch_up_serves_every_request_waiting_when_it_began(store, reader):
    log = Log()
    started(store, log)
    store.apply_batch([log.command(tokenize(1, [1]))])

    async def scenario() -> int:
        catch_up = CatchUp(reader)
        before = reader.catch_ups
        await asyncio.gather(*(catch_up.wait_applied(store.applied_index, 1.0) for _ in range(50)))
        return reader.catch_ups - before

    assert asyncio.run(scenario()) == 1
    assert reader.applied_index == store.applied_index


def test_an_index_the_view_never_reaches_is_a_read_error_in_time(store, reader):
    log = Log()
    started(store, log)

    async def scenario() -> None:
        await CatchUp(reader).wait_applied(store.applied_index + 1, 0.05)

    with pytest.raises(StoreReadError):
        asyncio.run(scenario())


def test_a_waiter_already_there_does_not_catch_up(store, reader):
    async def scenario() -> None:
        await CatchUp(reader).wait_applied(0, 1.0)

    asyncio.run(scenario())
    assert reader.catch_ups == 0


def test_close_removes_the_scratch_directory(tmp_path, store):
    view = StoreReader(tmp_path / "store", tmp_path / "reader").open()
    assert (tmp_path / "reader").is_dir()
    view.close()
    assert not (tmp_path / "reader").exists()
    with pytest.raises(StoreReadError):
        view.lookup([token(1, 1)], 0)


def test_a_view_is_opened_again_when_the_wal_files_change_while_it_opens_or_catches_up(
        tmp_path, store, monkeypatch):
    """A flush adds a WAL file and later deletes the old one; a view that read the MANIFEST before the
    flush's table file and the WAL list after the old file went would miss the rows of both (seen as
    live tokens read back unknown). Any change of the WAL files while the view opens or catches up, a
    deletion included, opens it again."""
    from tokenvault.core import store_reader

    real = store_reader.followed_files
    snapshots: list[tuple[str, ...]] = []
    scripted = iter([("1.log", "2.log"), ("2.log",)])  # the first open straddles the old WAL's deletion

    def wal_files(directory):
        real_wals, manifests = real(directory)
        listed = next(scripted, None) or real_wals
        snapshots.append(listed)
        return listed, manifests

    monkeypatch.setattr(store_reader, "followed_files", wal_files)
    view = StoreReader(tmp_path / "store", tmp_path / "reader").open()
    # Opened twice: the sets before and after the first open differ, the second open's agree.
    assert snapshots[:2] == [("1.log", "2.log"), ("2.log",)] and len(snapshots) == 4
    assert snapshots[2] == snapshots[3]
    opened = len(snapshots)
    scripted = iter([(*real(tmp_path / "store" / view._generation)[0], "9.log")])  # a WAL file appears
    view.catch_up()
    assert len(snapshots) > opened + 1  # the catch-up saw the change and opened the view again
    view.close()


def test_a_view_is_opened_again_when_rocksdb_starts_a_new_manifest_never_caught_up_across_it(
        tmp_path, monkeypatch):
    """store_files.followed_files: RocksDB starts a new MANIFEST once one is past MAX_MANIFEST_BYTES, and
    a view that caught up across the switch was measured to lose rows it had (a five-node soak read
    four live tokens back null). A compaction alone (no flush: the WAL files stay) switches it here, with
    a bound of one byte; the view's next catch-up opens it anew, and it still finds every token."""
    from tokenvault.core import store_layout
    from tokenvault.core.store_files import followed_files, read_current

    monkeypatch.setattr(store_layout, "MAX_MANIFEST_BYTES", 1)
    log = Log()
    vault = VaultStore.open(tmp_path / "store")
    try:
        started(vault, log)
        vault.apply_batch([log.command(tokenize(1, range(20)))])
        vault._db.flush()
        vault.apply_batch([log.command(tokenize(1, range(20, 40)))])
        vault._db.flush()
        view = StoreReader(tmp_path / "store", tmp_path / "reader").open()
        generation = tmp_path / "store" / read_current(tmp_path / "store")
        (wals, manifests), opens = followed_files(generation), view.opens
        vault._db.compact_range(None, None)  # two table files into one: a MANIFEST edit, and a new MANIFEST
        assert followed_files(generation)[1] != manifests and followed_files(generation)[0] == wals
        view.catch_up()
        assert view.opens == opens + 1
        tokens = [token(1, number) for number in range(40)]
        assert len(view.lookup(tokens, 0)) == 40
        view.catch_up()  # nothing new since: caught up, not opened again
        assert view.opens == opens + 1
        view.close()
    finally:
        vault.close()


async def test_a_nudge_catches_up_at_most_once_per_interval_and_the_caller_may_lengthen_it(store, reader):
    async def settled(catch_up: CatchUp) -> None:
        if catch_up._task is not None:
            await catch_up._task  # the pump's pass has run

    catch_up = CatchUp(reader, nudge_interval_seconds=60)
    catch_up.nudge()
    catch_up.nudge()
    await settled(catch_up)
    assert reader.catch_ups == 1  # the second came within the interval
    catch_up = CatchUp(reader, nudge_interval_seconds=0)
    catch_up.nudge()
    await settled(catch_up)
    catch_up.nudge(interval_seconds=60)  # within a longer interval the caller asks for: nothing
    await settled(catch_up)
    assert reader.catch_ups == 2
    catch_up.nudge()  # the CatchUp's own interval (none) again: a catch-up
    await settled(catch_up)
    assert reader.catch_ups == 3


def test_the_table_properties_name_the_index_and_filter_bytes_or_nothing_is_assumed():
    from tokenvault.core.store_layout import parse_table_metadata_bytes

    text = ("# data blocks=178587; # entries=10000014; raw key size=450000358; data block size=569094775; "
            "index block size (user-key? 17, delta-value? 17)=3928243; filter block size=12501013; "
            "# entries for filter=10000014; filter policy name=N/A; ")
    assert parse_table_metadata_bytes(text) == 3928243 + 12501013
    assert parse_table_metadata_bytes(text.replace("filter block size=12501013", "")) is None
    assert parse_table_metadata_bytes(text.replace("=3928243", "=-1")) is None
    assert parse_table_metadata_bytes("") is None


def test_the_view_keeps_every_index_and_filter_block_in_a_cache_sized_for_them_and_reopens_after_a_flush(
        store, tmp_path):
    """A flush makes a view open again; its index and filter blocks are in its block cache, which
    outlives the open and is sized to hold them all besides the data blocks' share."""
    from tokenvault.core.store_layout import table_metadata_bytes

    log = Log()
    started(store, log)
    view = StoreReader(tmp_path / "store", tmp_path / "reader", cache_bytes=1 << 20).open()
    try:
        tiny = table_metadata_bytes(store._db) or 0  # the store's first entries, if any were flushed
        assert (view.opens, view.cache_bytes) == (1, (1 << 20) + tiny + tiny // 8) and tiny < 1_000
        numbers = range(1, 20_001)
        store.apply_batch([log.command(tokenize(1, numbers))])
        store._db.flush()
        view.catch_up()
        assert view.opens == 2  # the flush changed the WAL files: opened again
        metadata = table_metadata_bytes(store._db)
        assert metadata is not None and metadata > 20_000  # a bloom filter of 20,000 keys alone is 25 KB
        assert view.cache_bytes == (1 << 20) + metadata + metadata // 8
        assert view.lookup([token(1, 7), token(1, 20_000), token(1, 20_001)], 0) == {
            token(1, 7): b"ct-7", token(1, 20_000): b"ct-20000"}
        # The table file's index and filter blocks are in the cache (table readers of their own would
        # leave only the two data blocks read there).
        assert view._cache.get_usage() >= metadata
        # Opened again after the next flush, it reads what it read before from the same cache.
        store.apply_batch([log.command(tokenize(1, [30_000]))])
        store._db.flush()
        view.catch_up()
        assert view.opens == 3
        assert view.lookup([token(1, 7), token(1, 30_000)], 0) == {token(1, 7): b"ct-7", token(1, 30_000): b"ct-30000"}
        assert view.cache_bytes == (1 << 20) + (grown := table_metadata_bytes(store._db) or 0) + grown // 8
    finally:
        view.close()


def test_a_view_whose_table_sizes_rocksdb_does_not_say_keeps_its_cache_and_says_so_once(
        store, tmp_path, monkeypatch):
    from structlog.testing import capture_logs

    from tokenvault.core import store_reader

    monkeypatch.setattr(store_reader, "table_metadata_bytes", lambda database: None)
    log = Log()
    started(store, log)
    with capture_logs() as logs:
        view = StoreReader(tmp_path / "store", tmp_path / "reader", cache_bytes=1 << 20).open()
        try:
            store.apply_batch([log.command(tokenize(1, [1]))])
            for _ in range(3):
                view.catch_up()
            assert view.cache_bytes == 1 << 20
            assert view.lookup([token(1, 1)], 0) == {token(1, 1): b"ct-1"}  # reads go on
        finally:
            view.close()
    assert [entry["event"] for entry in logs].count("store_reader.cache_not_sized") == 1


async def test_while_the_core_flushes_a_nudge_leaves_the_view_as_it_is_and_a_waiter_or_the_core_opens_it_again(
        store, tmp_path, monkeypatch):
    """A new WAL file beside every one the view read is a flush under way. Opening then would replay the
    whole old file (seconds under a fill), so a nudge leaves the view at its older batch end; a request
    waiting for an index, or the core's catch_up after it rewrote files, opens it again all the same;
    once the old file is gone, any catch-up opens it again."""
    from tokenvault.core import store_reader

    real = store_reader.followed_files
    flushing: list[str] = []

    def with_flushing(directory):
        wals, manifests = real(directory)
        return tuple(sorted((*wals, *flushing))), manifests

    monkeypatch.setattr(store_reader, "followed_files", with_flushing)
    log = Log()
    started(store, log)
    view = StoreReader(tmp_path / "store", tmp_path / "reader").open()
    try:
        store.apply_batch([log.command(tokenize(1, [1]))])
        flushing.append("999999.log")  # a new WAL file; the old ones are all still there
        before = view.applied_index
        assert view.catch_up(wait_out_flush=True) == before and view.opens == 1
        assert view.lookup([token(1, 1)], 0) == {}  # the older batch end, unchanged
        catch_up = CatchUp(view)
        catch_up.nudge()
        await catch_up._task
        assert view.opens == 1 and view.applied_index == before and view.deferred == 2
        await catch_up.wait_applied(store.applied_index, 5.0)  # a waiter: opened again
        assert view.opens == 2 and view.lookup([token(1, 1)], 0) == {token(1, 1): b"ct-1"}
        store.apply_batch([log.command(tokenize(1, [2]))])
        flushing.append("9999999.log")
        catch_up.catch_up_soon()  # the core after a shred or an install: opened again
        await catch_up._task
        assert view.opens == 3 and view.lookup([token(1, 2)], 0) == {token(1, 2): b"ct-2"}
        store.apply_batch([log.command(tokenize(1, [3]))])
        flushing.remove("999999.log")  # a file the view read is gone: the flush is done
        catch_up.nudge(interval_seconds=0)
        await catch_up._task
        assert view.opens == 4 and view.lookup([token(1, 3)], 0) == {token(1, 3): b"ct-3"}
    finally:
        view.close()


def test_a_nudge_defers_a_long_replay_while_the_core_writes_fast_and_catches_up_once_it_writes_slowly(
        store, tmp_path, monkeypatch):
    """A catch-up replays, on the worker's loop, the WAL written since the view last moved. A nudge leaves
    the view as it is rather than replay more than its bound while the WAL grows by more than CALM_BYTES
    between nudges; once it grows slower, the view catches up however far it has to go."""
    from tokenvault.core import store_reader
    from tokenvault.core.store_reader import CALM_BYTES, MAX_NUDGE_REPLAY_BYTES

    real = store_reader.wal_file_bytes
    written = [0]  # bytes a fast writer added to the WAL, beyond what is really there
    monkeypatch.setattr(store_reader, "wal_file_bytes", lambda directory, names: real(directory, names) + written[0])
    log = Log()
    started(store, log)
    view = StoreReader(tmp_path / "store", tmp_path / "reader").open()
    try:
        store.apply_batch([log.command(tokenize(1, [1]))])
        before = view.applied_index
        written[0] = MAX_NUDGE_REPLAY_BYTES + 1
        assert view.catch_up(wait_out_flush=True, max_replay_bytes=MAX_NUDGE_REPLAY_BYTES) == before
        written[0] += CALM_BYTES + 1  # still written fast: the view stays
        assert view.catch_up(wait_out_flush=True, max_replay_bytes=MAX_NUDGE_REPLAY_BYTES) == before
        assert view.deferred == 2 and view.lookup([token(1, 1)], 0) == {}
        written[0] += CALM_BYTES  # slower now: the long replay is made, once
        assert view.catch_up(wait_out_flush=True, max_replay_bytes=MAX_NUDGE_REPLAY_BYTES) == store.applied_index
        assert view.lookup([token(1, 1)], 0) == {token(1, 1): b"ct-1"} and view.deferred == 2
        # A catch-up a request waits for is never deferred.
        store.apply_batch([log.command(tokenize(1, [2]))])
        written[0] += 10 * MAX_NUDGE_REPLAY_BYTES
        assert view.catch_up() == store.applied_index and view.deferred == 2
    finally:
        view.close()


def test_after_a_burst_a_calm_nudge_wants_a_flush_instead_of_the_long_replay(store, tmp_path, monkeypatch):
    """Once the writes calm down, a view further behind than its bound asks (through its caller) for the
    core to flush rather than replay the whole WAL on the worker's loop: it stays as it is while the
    flush begins, replays at once when the core says no flush is under way, and replays after all when
    none has begun FLUSH_WAIT_SECONDS after the core said one would."""
    from tokenvault.core import store_reader
    from tokenvault.core.store_reader import CALM_BYTES, MAX_NUDGE_REPLAY_BYTES

    real = store_reader.wal_file_bytes
    written = [0]
    monkeypatch.setattr(store_reader, "wal_file_bytes", lambda directory, names: real(directory, names) + written[0])
    log = Log()
    started(store, log)
    view = StoreReader(tmp_path / "store", tmp_path / "reader").open()

    def nudge() -> int:
        return view.catch_up(wait_out_flush=True, max_replay_bytes=MAX_NUDGE_REPLAY_BYTES, may_ask_flush=True)

    try:
        before = view.applied_index
        store.apply_batch([log.command(tokenize(1, [1]))])
        written[0] = MAX_NUDGE_REPLAY_BYTES + 1
        assert nudge() == before and not view.flush_wanted  # the burst: stays, asks nothing yet
        written[0] += CALM_BYTES  # calm: a flush is wanted, and the view still stays
        assert nudge() == before and view.flush_wanted
        view.flush_asked(False)  # the core had nothing to flush: the next nudge replays
        assert nudge() == store.applied_index and not view.flush_wanted
        assert view.lookup([token(1, 1)], 0) == {token(1, 1): b"ct-1"}

        store.apply_batch([log.command(tokenize(1, [2]))])
        written[0] += MAX_NUDGE_REPLAY_BYTES + 1
        assert nudge() < store.applied_index
        assert nudge() < store.applied_index and view.flush_wanted
        view.flush_asked(True)  # a flush is said to be under way: the view waits for it ...
        assert nudge() < store.applied_index and not view.flush_wanted
        monkeypatch.setattr(store_reader, "FLUSH_WAIT_SECONDS", 0.0)  # ... but not for ever
        assert nudge() == store.applied_index
        assert view.lookup([token(1, 2)], 0) == {token(1, 2): b"ct-2"}
        # Without a caller that can ask, a calm nudge replays as before.
        store.apply_batch([log.command(tokenize(1, [3]))])
        written[0] += MAX_NUDGE_REPLAY_BYTES + 1
        assert view.catch_up(wait_out_flush=True, max_replay_bytes=MAX_NUDGE_REPLAY_BYTES) < store.applied_index
        assert view.catch_up(wait_out_flush=True, max_replay_bytes=MAX_NUDGE_REPLAY_BYTES) == store.applied_index
        assert not view.flush_wanted
    finally:
        view.close()


async def test_a_view_behind_after_a_burst_opens_again_on_the_wal_file_the_flush_it_asked_for_starts(
        store, tmp_path, monkeypatch):
    """CatchUp asks for the flush the view wants; the view then waits the flush out and opens on the new
    WAL file, replaying only that, instead of the old one (which the fake bytes make long); a core that
    cannot be asked (or says no) has the view replay at once."""
    from tokenvault.core import store_reader
    from tokenvault.core.store_reader import CALM_BYTES, MAX_NUDGE_REPLAY_BYTES
    from tokenvault.errors import Unavailable

    log = Log()
    started(store, log)
    directory = tmp_path / "store" / store._generation
    old_wals = store_reader.wal_file_names(directory)
    real = store_reader.wal_file_bytes
    written = [0]  # fake bytes of the WAL files the view opened on, only while one of them is still there
    monkeypatch.setattr(store_reader, "wal_file_bytes", lambda directory, names: real(directory, names) + (
        written[0] if set(names) & set(old_wals) else 0))
    view = StoreReader(tmp_path / "store", tmp_path / "reader").open()
    asked: list[bool] = []

    async def ask_flush() -> bool:
        asked.append(True)
        return store.flush_memtable(0) is not None

    catch_up = CatchUp(view, nudge_interval_seconds=0, ask_flush=ask_flush)
    try:
        store.apply_batch([log.command(tokenize(1, [1]))])
        written[0] = MAX_NUDGE_REPLAY_BYTES + 1
        for _ in range(2):  # the burst, then calm: the second nudge asks for the flush
            catch_up.nudge()
            await catch_up._task
        assert asked == [True] and view.opens == 1 and view.lookup([token(1, 1)], 0) == {}
        written[0] += CALM_BYTES  # still calm, and longer: the view waits for the flush, never replays
        deadline = asyncio.get_running_loop().time() + 10
        while view.opens == 1:
            assert asyncio.get_running_loop().time() < deadline, "the view never opened on the new WAL file"
            catch_up.nudge()
            await catch_up._task
            assert view.opens > 1 or view.lookup([token(1, 1)], 0) == {}
            await asyncio.sleep(0.01)
        assert asked == [True] and view.opens == 2 and not set(view._wals) & set(old_wals)
        assert view.flushes_asked == 1 and view.deferred >= 2
        assert view.lookup([token(1, 1)], 0) == {token(1, 1): b"ct-1"}

        async def unreachable() -> bool:
            raise Unavailable("the core is restarting")

        catch_up = CatchUp(view, nudge_interval_seconds=0, ask_flush=unreachable)
        old_wals = view._wals
        store.apply_batch([log.command(tokenize(1, [2]))])
        written[0] = MAX_NUDGE_REPLAY_BYTES + 1
        for _ in range(2):
            catch_up.nudge()
            await catch_up._task
        assert view.applied_index == store.applied_index and view.opens == 2  # replayed after the failed ask
    finally:
        view.close()


async def test_a_worker_started_while_the_wal_is_long_opens_its_view_after_the_flush_it_asks_for(
        store, tmp_path, monkeypatch):
    """open_view: with a live WAL longer than a nudge may replay, the core is asked to flush first and the
    view opens once the old WAL files are gone (replaying only the new one); with a short WAL, or a core
    that says no, it opens at once."""
    from tokenvault.core import store_reader
    from tokenvault.core.store_reader import MAX_NUDGE_REPLAY_BYTES, open_view

    log = Log()
    started(store, log)
    store.apply_batch([log.command(tokenize(1, [1]))])
    directory = tmp_path / "store" / store._generation
    old_wals = store_reader.wal_file_names(directory)
    real = store_reader.wal_file_bytes
    long = [False]
    monkeypatch.setattr(store_reader, "wal_file_bytes", lambda directory, names: real(directory, names) + (
        MAX_NUDGE_REPLAY_BYTES + 1 if long[0] and set(names) & set(old_wals) else 0))
    asked: list[str] = []

    async def ask_flush() -> bool:
        asked.append("flush")
        return store.flush_memtable(0) is not None

    view = await open_view(tmp_path / "store", tmp_path / "short", ask_flush)
    assert asked == [] and view.lookup([token(1, 1)], 0) == {token(1, 1): b"ct-1"}
    view.close()

    async def refuse() -> bool:
        asked.append("refused")
        return False

    long[0] = True
    view = await open_view(tmp_path / "store", tmp_path / "refused", refuse, wait_seconds=30)
    assert asked == ["refused"] and view._wals == old_wals  # opened at once, on the long WAL
    view.close()
    view = await open_view(tmp_path / "store", tmp_path / "long", ask_flush, wait_seconds=30)
    assert asked == ["refused", "flush"] and not set(view._wals) & set(old_wals) and view.flushes_asked == 1
    assert view.lookup([token(1, 1)], 0) == {token(1, 1): b"ct-1"}
    view.close()


async def test_a_view_that_saw_its_flush_done_asks_again_after_the_next_burst(store, tmp_path, monkeypatch):
    """The flush a view asked for is done once a WAL file it read is gone; after a later burst the view
    asks for another rather than replay because its last ask is old."""
    from tokenvault.core import store_reader
    from tokenvault.core.store_reader import CALM_BYTES, MAX_NUDGE_REPLAY_BYTES

    real = store_reader.wal_file_bytes
    written = [0]
    monkeypatch.setattr(store_reader, "wal_file_bytes", lambda directory, names: real(directory, names) + written[0])
    monkeypatch.setattr(store_reader, "FLUSH_WAIT_SECONDS", 0.0)  # every ask is already old
    log = Log()
    started(store, log)
    view = StoreReader(tmp_path / "store", tmp_path / "reader").open()
    directory = tmp_path / "store" / store._generation

    def nudge() -> int:
        return view.catch_up(wait_out_flush=True, max_replay_bytes=MAX_NUDGE_REPLAY_BYTES, may_ask_flush=True)

    try:
        store.apply_batch([log.command(tokenize(1, [1]))])
        written[0] = MAX_NUDGE_REPLAY_BYTES + 1
        nudge()
        assert nudge() < store.applied_index and view.flush_wanted
        old = store_reader.wal_file_names(directory)
        assert store.flush_memtable(0) == "started"
        view.flush_asked(True)
        await wait_until_gone(directory, old)
        written[0] += 4 * CALM_BYTES  # the next burst, after the flush
        assert nudge() < store.applied_index and not view.flush_wanted
        assert nudge() < store.applied_index and view.flush_wanted  # calm again: asks, does not replay
    finally:
        view.close()


async def wait_until_gone(directory, names) -> None:
    from tokenvault.core.store_reader import wal_file_names

    deadline = asyncio.get_running_loop().time() + 10
    while set(wal_file_names(directory)) & set(names):
        assert asyncio.get_running_loop().time() < deadline, "the flush did not end"
        await asyncio.sleep(0.01)


def test_a_view_opens_while_another_open_is_rewriting_rocksdict_s_config_file(store, tmp_path):
    """Every open of the store, a secondary's included, rewrites rocksdict's config file in place, so two
    views opening together may find it empty. A view does not check it (the core checked it when it
    opened the generation), and what a view's open writes back is what the core's next open accepts."""
    from tokenvault.core.store_layout import ROCKSDICT_CONFIG_FILE

    config = tmp_path / "store" / store._generation / ROCKSDICT_CONFIG_FILE
    config.write_bytes(b"")  # caught in the middle of another open's rewrite
    view = StoreReader(tmp_path / "store", tmp_path / "reader").open()
    assert view.opens == 1
    view.close()
    store.close()
    VaultStore.open(tmp_path / "store").close()