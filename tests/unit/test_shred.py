"""The shredder's passes over a backlog (tokenvault/core/shred.py), with a store and a log that record
what they are asked: a pass takes every entry waiting, the entry the log must keep moves on with each
pass, and past MAX_KEYS_PER_PASS keys the shredder keeps none and sweeps the whole key space, wrapping
round, so that an entry is erased one round after it was flushed."""

from __future__ import annotations

import asyncio
import threading
import time

import msgpack
import pytest
from structlog.testing import capture_logs

from tokenvault.core import shred
from tokenvault.core.commands import Actor, DeleteTokensCommand
from tokenvault.core.shred import Shredder, ShredPass, shred_keys
from tokenvault.core.snapshots import PendingShred
from tokenvault.core.store import ShredPlan

ACTOR = Actor(name="ops", node="n1", request_id="r1")
DEADLINE_SECONDS = 10


class RecordingStore:
    """Each shred's keys and the log's hold at that moment; ``gate`` holds a shred until it is set."""

    def __init__(self) -> None:
        self.applied_index = 0
        self.shredder: Shredder | None = None
        self.passes: list[tuple[list[bytes] | None, int | None]] = []
        self.gate = threading.Event()
        self.gate.set()

    def prepare_shred(self, keys: list[bytes] | None) -> ShredPlan:
        assert self.shredder is not None
        self.passes.append((None if keys is None else list(keys), self.shredder.hold_index()))
        assert self.gate.wait(DEADLINE_SECONDS)
        return ShredPlan([(None, None)], 0, 0)  # a store in level 0 only: passes by key ranges

    def compact_for_shred(self, begin: bytes | None, end: bytes | None) -> None:
        pass

    def flush_for_shred(self) -> None:
        pass

    def finish_shred(self) -> None:
        pass

    def checkpoint(self) -> int:
        return self.applied_index


class RecordingLog:
    """The two things the shredder does to the write-ahead log: roll past an entry, release through one."""

    def __init__(self, last_index: int) -> None:
        self.first_held_index = 1
        self.last_index = last_index
        self.released: list[int] = []

    def roll(self, through_index: int) -> bool:
        return True

    def release(self, upto_index: int) -> None:
        self.released.append(upto_index)
        self.first_held_index = max(self.first_held_index, upto_index + 1)


def delete(*names: str) -> DeleteTokensCommand:
    return DeleteTokensCommand(tuple("tv1_" + name * 32 for name in names), 2_000, ACTOR)


def make_shredder(last_index: int, on_pass=None) -> tuple[Shredder, RecordingStore, RecordingLog]:
    store, wal = RecordingStore(), RecordingLog(last_index)
    failures: list[BaseException] = []
    shredder = Shredder(lambda: store, wal, failures.append, on_pass=on_pass)  # type: ignore[arg-type]
    store.shredder = shredder
    store.applied_index = last_index
    return shredder, store, wal


async def until(condition, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE_SECONDS
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_the_entries_waiting_go_in_one_pass_and_the_held_entry_moves_on_with_each_pass() -> None:
    """While a pass runs, deletes wait; the next pass takes them all, in log order, and while it runs
    the log holds its first entry and no earlier one."""
    shredder, store, wal = make_shredder(last_index=12)
    store.gate.clear()
    commands = {10: delete("c", "d"), 11: delete("a", "b"), 12: delete("e")}
    shredder.note(10, commands[10])
    await until(lambda: len(store.passes) == 1, "the first pass to start")
    shredder.note(11, commands[11])
    shredder.note(12, commands[12])
    assert shredder.backlog_keys == 6 and shredder.hold_index() == 10
    with capture_logs() as logged:
        store.gate.set()
        await until(lambda: shredder.passes == 1, "the log to be dropped through the last entry")
    assert store.passes == [(shred_keys(commands[10]), 10), (shred_keys(commands[11]) + shred_keys(commands[12]), 11)]
    assert shredder.backlog_keys == 0 and shredder.hold_index() is None
    assert wal.first_held_index > 12
    # docs/logs.md: a pass that left deletes waiting says so; the last, which drops the log, says shred.done.
    assert [(line["event"], line.get("passes"), line["rows"], line.get("rows_waiting"), line.get("whole_store"))
            for line in logged if line["event"].startswith("shred.")] == [
        ("shred.pass", 1, 4, 6, None), ("shred.done", None, 6, None, False)]
    await shredder.close()


async def test_past_max_keys_a_pass_keeps_no_keys_and_shreds_the_whole_key_space(monkeypatch) -> None:
    """What the shredder holds stays bounded however fast deletes come: past MAX_KEYS_PER_PASS keys
    waiting it keeps only the first entry waiting, and the next pass compacts every key (None)."""
    monkeypatch.setattr(shred, "MAX_KEYS_PER_PASS", 4)
    reports: list[ShredPass] = []
    shredder, store, wal = make_shredder(last_index=23, on_pass=reports.append)
    store.gate.clear()
    shredder.note(20, delete("a"))
    await until(lambda: len(store.passes) == 1, "the first pass to start")
    shredder.note(21, delete("b", "c"))  # four keys: still by their ranges
    assert shredder.hold_index() == 20
    shredder.note(22, delete("d"))  # six: the whole key space
    shredder.note(23, delete("e"))
    assert shredder.backlog_keys == 8 and shredder.hold_index() == 20
    with capture_logs() as logged:
        store.gate.set()
        await until(lambda: shredder.passes == 1, "the log to be dropped through the last entry")
    assert store.passes == [(shred_keys(delete("a")), 20), (None, 21)]
    assert [(line["through_index"], line["rows"], line["whole_store"]) for line in logged
            if line["event"] == "shred.done"] == [(23, 8, True)]
    # What each pass took, as the node (its workers' views) and bench/shred_stream.py are told of it.
    assert [(report.through_index, report.rows, report.whole_store) for report in reports] == [
        (20, 2, False), (23, 8, True)]
    assert all(report.store_seconds >= 0 for report in reports)
    assert wal.first_held_index > 23
    await shredder.close()


async def test_passes_behind_a_backlog_are_logged_summed_at_most_once_an_interval(monkeypatch) -> None:
    shredder, store, wal = make_shredder(last_index=50)
    monkeypatch.setattr(shred, "PASS_LOG_SECONDS", 3600.0)
    with capture_logs() as logged:
        for index in range(40, 51):
            store.gate.clear()
            shredder.note(index, delete("abcdefghijk"[index - 40]))
            await until(lambda: len(store.passes) == index - 39, "the pass to start")
            store.gate.set()
        await until(lambda: shredder.passes == 1, "the log to be dropped through the last entry")
    lines = [(line["event"], line.get("passes"), line["rows"]) for line in logged
             if line["event"].startswith("shred.")]
    # Ten passes left a delete waiting: the first says so at once, the nine after it are summed into a
    # line not due for an hour and dropped by shred.done, which says the backlog is gone.
    assert lines == [("shred.pass", 1, 2), ("shred.done", None, 2)]
    await shredder.close()


async def test_keys_noted_while_a_pass_runs_wait_for_the_next_and_are_counted() -> None:
    shredder, store, wal = make_shredder(last_index=31)
    store.gate.clear()
    shredder.note(30, delete("a"))
    await until(lambda: len(store.passes) == 1, "the first pass to start")
    assert shredder.backlog_keys == 0  # taken by the running pass
    shredder.note(31, delete("b", "c"))
    assert shredder.backlog_keys == 4
    assert shredder.hold_index() == 30  # the running pass's entry
    store.gate.set()
    await until(lambda: shredder.passes == 1, "both passes")
    assert [hold for _, hold in store.passes] == [30, 31]
    assert shredder.backlog_keys == 0
    await shredder.close()


class PermitStore(RecordingStore):
    """A store whose every shred waits for a permit of its own, so that one pass can end while the next waits."""

    def __init__(self) -> None:
        super().__init__()
        self.permits = threading.Semaphore(0)

    def prepare_shred(self, keys: list[bytes] | None) -> ShredPlan:
        assert self.shredder is not None
        self.passes.append((None if keys is None else list(keys), self.shredder.hold_index()))
        assert self.permits.acquire(timeout=DEADLINE_SECONDS)
        return ShredPlan([(None, None)], 0, 0)


async def test_the_oldest_wait_runs_from_the_first_delete_not_yet_shredded_and_is_zero_once_none_waits() -> None:
    """tokenvault_shred_oldest_wait_seconds: from the apply of the oldest delete no finished pass covers;
    it moves to the next delete waiting when a pass ends, and is 0 once nothing waits."""
    store, wal = PermitStore(), RecordingLog(last_index=61)
    shredder = Shredder(lambda: store, wal, lambda error: None)  # type: ignore[arg-type]
    store.shredder, store.applied_index = shredder, 61
    assert shredder.oldest_wait_seconds() == 0.0
    first_noted = time.monotonic()
    shredder.note(60, delete("a"))
    await until(lambda: len(store.passes) == 1, "the first pass to start")
    await asyncio.sleep(0.3)
    second_noted = time.monotonic()
    shredder.note(61, delete("b"))
    # The pass under way holds the oldest delete: its wait goes on while the second one waits behind it.
    assert 0.3 <= shredder.oldest_wait_seconds() <= time.monotonic() - first_noted
    store.permits.release()
    await until(lambda: len(store.passes) == 2, "the second pass to start")
    assert shredder.oldest_wait_seconds() <= time.monotonic() - second_noted
    store.permits.release()
    await until(lambda: shredder.passes == 1, "the log to be dropped through the last entry")
    assert shredder.oldest_wait_seconds() == 0.0
    await shredder.close()


class SlowStore(RecordingStore):
    """A store whose passes have ``ranges`` ranges, each compacted in ``seconds``; records when each
    compaction began and ended."""

    def __init__(self, seconds: float, ranges: int) -> None:
        super().__init__()
        self.seconds = seconds
        self.ranges = ranges
        self.spans: list[tuple[float, float]] = []

    def prepare_shred(self, keys: list[bytes] | None) -> ShredPlan:
        super().prepare_shred(keys)
        return ShredPlan([(bytes([number]), bytes([number + 1])) for number in range(self.ranges)], 0, 0)

    def compact_for_shred(self, begin: bytes | None, end: bytes | None) -> None:
        began = time.monotonic()
        time.sleep(self.seconds)
        self.spans.append((began, time.monotonic()))


@pytest.mark.parametrize("fraction", [0.5, 0.25])
async def test_the_shredder_rests_after_each_range_and_pass_so_that_it_compacts_at_most_its_busy_fraction(
        fraction: float) -> None:
    """[shred] max_busy_fraction: a pass compacts its ranges one at a time, and after a compaction of C
    seconds the next range, or the next pass, starts no sooner than C * (1 / fraction - 1) after it; the
    next pass takes every delete that arrived meanwhile."""
    store, wal = SlowStore(0.1, ranges=2), RecordingLog(last_index=72)
    reports: list[ShredPass] = []
    shredder = Shredder(lambda: store, wal, lambda error: None, on_pass=reports.append,  # type: ignore[arg-type]
                        max_busy_fraction=fraction)
    store.shredder, store.applied_index = shredder, 72
    shredder.note(70, delete("a"))
    await until(lambda: len(store.passes) == 1, "the first pass to start")
    shredder.note(71, delete("b"))
    shredder.note(72, delete("c"))
    await until(lambda: shredder.passes == 1, "both passes and the log dropped")
    assert [keys for keys, _ in store.passes] == [shred_keys(delete("a")),
                                                  shred_keys(delete("b")) + shred_keys(delete("c"))]
    assert len(store.spans) == 4  # two passes of two ranges
    for (began, ended), (next_began, _) in zip(store.spans, store.spans[1:]):
        assert next_began - ended >= (ended - began) * (1 / fraction - 1) * 0.99
    assert [report.rested_seconds >= 0.1 * (1 / fraction - 1) * 0.99 for report in reports] == [True, True]
    assert all(report.store_seconds >= 0.2 for report in reports)
    await shredder.close()


async def test_after_a_snapshot_install_the_next_pass_compacts_the_whole_key_space_through_its_index() -> None:
    """note_whole_store: a pass running at the install does not count (it was planned on the store
    before); the next compacts the whole key space and covers the snapshot's index."""
    reports: list[ShredPass] = []
    shredder, store, wal = make_shredder(last_index=90, on_pass=reports.append)
    store.gate.clear()
    shredder.note(80, delete("a"))
    await until(lambda: len(store.passes) == 1, "a pass to start")
    shredder.note_whole_store(90)  # installed while that pass runs
    assert shredder.hold_index() == 80 and shredder.oldest_wait_seconds() > 0
    store.gate.set()
    await until(lambda: shredder.passes == 1, "the log to be dropped through the snapshot's index")
    assert [keys for keys, _ in store.passes] == [shred_keys(delete("a")), None]
    assert [(report.through_index, report.whole_store) for report in reports] == [(80, False), (90, True)]
    assert shredder.oldest_wait_seconds() == 0.0 and shredder.hold_index() is None
    await shredder.close()


def keys_of(*names: str) -> PendingShred:
    return PendingShred(tuple(sorted(set(shred_keys(delete(*names))))))


async def test_a_checkpoint_is_clean_only_if_no_delete_at_or_below_its_index_waited_ran_or_ended_a_pass_since_the_mark(
        ) -> None:
    """shred_mark before a checkpoint, pending_through after it (a snapshot manifest's shred_pending and
    shred_keys): a delete applied meanwhile at or below the checkpoint's index makes it pending, with its
    keys, while it waits or runs; once its pass ended (perhaps after the checkpoint was taken) its keys are
    kept by no one, so rows may be anywhere; one above the index does not count."""
    shredder, store, wal = make_shredder(last_index=50)
    mark = shredder.shred_mark()
    assert shredder.pending_through(mark, 50) is None
    store.gate.clear()
    shredder.note(40, delete("a"))
    assert shredder.shred_mark().keys == frozenset(keys_of("a").keys or ())  # a checkpoint now may hold them
    assert shredder.pending_through(mark, 50) == keys_of("a") and shredder.pending_through(mark, 39) is None
    await until(lambda: len(store.passes) == 1, "its pass to start")
    running = shredder.shred_mark()
    assert shredder.pending_through(mark, 40) == keys_of("a") and shredder.pending_through(mark, 39) is None
    store.gate.set()
    await until(lambda: shredder.passes == 1, "its pass to end")
    assert shredder.pending_through(mark, 50) == PendingShred(None)  # ended since the mark: keys unknown
    assert shredder.pending_through(mark, 39) == PendingShred(None)
    assert shredder.pending_through(running, 50) == keys_of("a")  # the mark kept them: those rows at most
    after = shredder.shred_mark()
    assert shredder.pending_through(after, 50) is None
    await shredder.close()


async def test_a_checkpoint_lists_the_keys_of_entries_waiting_and_running_up_to_the_bound_and_none_under_a_sweep(
        monkeypatch) -> None:
    """The keys of the pass under way and of the entries waiting at or below the checkpoint's index; more
    than MAX_SHRED_KEYS, or entries the sweep holds (it keeps no keys), and rows may be anywhere."""
    shredder, store, wal = make_shredder(last_index=60)
    store.gate.clear()
    shredder.note(40, delete("a"))
    await until(lambda: len(store.passes) == 1, "a pass to start")
    shredder.note(45, delete("b"))
    shredder.note(55, delete("c"))
    mark = shredder.shred_mark()
    assert shredder.pending_through(mark, 50) == keys_of("a", "b", "c")  # the mark's, then those at or below
    assert shredder._held_keys(50) == set(keys_of("a", "b").keys or ())
    monkeypatch.setattr(shred, "MAX_SHRED_KEYS", 5)  # six keys held
    assert shredder.shred_mark().keys is None and shredder.pending_through(mark, 50) == PendingShred(None)
    monkeypatch.undo()
    shredder.note_whole_store(60)
    assert shredder.shred_mark().keys is None and shredder.pending_through(mark, 50) == PendingShred(None)
    store.gate.set()
    await shredder.close()


async def test_keys_an_installed_snapshot_listed_wait_for_a_pass_by_their_ranges_through_its_index() -> None:
    """note_keys: an install whose manifest listed its pending rows' keys gets a pass of those keys (not of
    the whole key space), which covers the snapshot's index."""
    reports: list[ShredPass] = []
    shredder, store, wal = make_shredder(last_index=90, on_pass=reports.append)
    shredder.note_keys(90, [b"Ttv1_x", b"LTtv1_x"])
    await until(lambda: shredder.passes == 1, "the pass of the listed keys")
    assert [sorted(keys or []) for keys, _ in store.passes] == [[b"LTtv1_x", b"Ttv1_x"]]
    assert [(report.through_index, report.whole_store) for report in reports] == [(90, False)]
    await shredder.close()


def test_the_whole_store_record_lasts_from_before_the_switch_until_a_whole_pass_through_its_index(tmp_path) -> None:
    record = shred.ShredRecord(tmp_path)
    assert record.recover(applied_index=10) == []
    record.record(40, PendingShred(None))
    assert (tmp_path / shred.SHRED_WHOLE_FILE).read_text() == "40\n"
    # A pass through a lower index, or one that was not of the whole store, does not end it.
    record.passed(ShredPass(through_index=39, rows=0, whole_store=True, store_seconds=0.0, rested_seconds=0.0))
    record.passed(ShredPass(through_index=45, rows=2, whole_store=False, store_seconds=0.0, rested_seconds=0.0))
    assert record.due == 40 and (tmp_path / shred.SHRED_WHOLE_FILE).exists()
    # A restart finds it; a store left below it (the switch never happened) is shredded through its own index.
    assert shred.ShredRecord(tmp_path).recover(applied_index=55) == [(40, PendingShred(None))]
    assert shred.ShredRecord(tmp_path).recover(applied_index=30) == [(30, PendingShred(None))]
    record.passed(ShredPass(through_index=40, rows=0, whole_store=True, store_seconds=0.0, rested_seconds=0.0))
    assert record.due is None and not (tmp_path / shred.SHRED_WHOLE_FILE).exists()
    assert shred.ShredRecord(tmp_path).recover(applied_index=55) == []


def test_the_keys_record_lasts_until_a_pass_through_its_index_and_gathers_the_keys_still_due(
        tmp_path, monkeypatch) -> None:
    """SHRED-KEYS: written before the switch, found by a restart, ended by any pass through its index. A
    second install before that pass keeps the first one's keys (a stop before its switch leaves the store
    that needs them); past MAX_SHRED_KEYS in all, a whole-key-space pass is recorded instead."""
    record = shred.ShredRecord(tmp_path)
    record.record(40, PendingShred((b"Ta", b"Tb")))
    assert not (tmp_path / shred.SHRED_WHOLE_FILE).exists()
    assert shred.ShredRecord(tmp_path).recover(applied_index=55) == [(40, PendingShred((b"Ta", b"Tb")))]
    assert shred.ShredRecord(tmp_path).recover(applied_index=30) == [(30, PendingShred((b"Ta", b"Tb")))]
    record.passed(ShredPass(through_index=39, rows=2, whole_store=False, store_seconds=0.0, rested_seconds=0.0))
    record.record(50, PendingShred((b"Tc", b"Ta")))
    assert shred.ShredRecord(tmp_path).recover(applied_index=55) == [(50, PendingShred((b"Ta", b"Tb", b"Tc")))]
    record.passed(ShredPass(through_index=49, rows=2, whole_store=True, store_seconds=0.0, rested_seconds=0.0))
    assert (tmp_path / shred.SHRED_KEYS_FILE).exists()
    record.passed(ShredPass(through_index=50, rows=2, whole_store=False, store_seconds=0.0, rested_seconds=0.0))
    assert record.keys_due is None and not (tmp_path / shred.SHRED_KEYS_FILE).exists()
    monkeypatch.setattr(shred, "MAX_SHRED_KEYS", 3)
    record.record(60, PendingShred((b"Ta", b"Tb")))
    record.record(70, PendingShred((b"Tc", b"Td")))
    assert shred.ShredRecord(tmp_path).recover(applied_index=75) == [(60, PendingShred((b"Ta", b"Tb"))), (70, PendingShred(None))]


@pytest.mark.parametrize("content", [b"not an index\n", b"-4\n", b"9" * 40])
def test_a_damaged_whole_store_record_is_due_through_the_applied_index(tmp_path, content: bytes) -> None:
    (tmp_path / shred.SHRED_WHOLE_FILE).write_bytes(content)
    assert shred.ShredRecord(tmp_path).recover(applied_index=77) == [(77, PendingShred(None))]


@pytest.mark.parametrize("content", [b"\xc1", msgpack.packb([-1, [b"Ta"]]), msgpack.packb([4, [b"Ta", "Tb"]]),
                                     msgpack.packb([4, [b""]]), msgpack.packb({"index": 4}),
                                     b"\x00" * (shred.SHRED_KEYS_RECORD_MAX_BYTES + 1)])
def test_a_damaged_keys_record_makes_a_whole_store_pass_due_through_the_applied_index(tmp_path, content) -> None:
    (tmp_path / shred.SHRED_KEYS_FILE).write_bytes(content)
    assert shred.ShredRecord(tmp_path).recover(applied_index=77) == [(77, PendingShred(None))]
    # Recorded as a whole-key-space pass, so that the damaged record is not read again.
    assert not (tmp_path / shred.SHRED_KEYS_FILE).exists()
    assert shred.ShredRecord(tmp_path).recover(applied_index=80) == [(77, PendingShred(None))]


# The whole key space of SweepStore, in three ranges (token rows start with "t", life rows with "Lt").
WHOLE = [(None, b"M"), (b"M", b"p"), (b"p", None)]


class SweepStore(RecordingStore):
    """Records every flush and compaction in order; each compaction waits for a permit of its own, so that
    a test can note entries between two ranges."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple] = []
        self.permits = threading.Semaphore(0)
        self.started = 0  # compactions begun (the last may be waiting for its permit)
        self.files = 0  # bottom files: each range of a pass by keys overlaps one of its own

    def prepare_shred(self, keys: list[bytes] | None) -> ShredPlan:
        assert self.shredder is not None
        keys = None if keys is None else sorted(set(keys))
        self.steps.append(("prepare", "whole" if keys is None else "keys", self.shredder.hold_index()))
        if keys is None:
            return ShredPlan(list(WHOLE), self.files, self.files)
        return ShredPlan([(key, key + b"\x00") for key in keys], min(len(keys), self.files), self.files)

    def flush_for_shred(self) -> None:
        self.steps.append(("flush",))


    def compact_for_shred(self, begin: bytes | None, end: bytes | None) -> None:
        self.started += 1
        assert self.permits.acquire(timeout=DEADLINE_SECONDS)
        self.steps.append(("compact", begin, end))

    def compactions(self) -> list[tuple]:
        return [step[1:] for step in self.steps if step[0] == "compact"]


def make_sweep(monkeypatch, last_index: int) -> tuple[Shredder, SweepStore, list[ShredPass]]:
    monkeypatch.setattr(shred, "MAX_KEYS_PER_PASS", 4)
    store, wal, reports = SweepStore(), RecordingLog(last_index), []
    shredder = Shredder(lambda: store, wal, lambda error: None, on_pass=reports.append)  # type: ignore[arg-type]
    store.shredder, store.applied_index = shredder, last_index
    return shredder, store, reports


async def step(store: SweepStore, compactions: int) -> None:
    """Let the sweep compact ranges until ``compactions`` were done in all."""
    while len(store.compactions()) < compactions:
        before = len(store.compactions())
        store.permits.release()
        await until(lambda: len(store.compactions()) > before, "the next compaction")


async def test_deletes_noted_during_a_sweep_are_erased_one_round_after_their_flush_not_after_another_whole_lap(
        monkeypatch) -> None:
    """Past MAX_KEYS_PER_PASS keys the shredder sweeps the whole key space a range at a time. Entries noted
    while it runs get a flush before its next range and are done once it comes back round to that range:
    here two ranges into the second lap, not after the whole of it. The log holds their entry until then."""
    shredder, store, reports = make_sweep(monkeypatch, last_index=11)
    shredder.note(10, delete("a", "b", "c"))  # six keys: the sweep
    await step(store, 1)  # the first lap compacted (None, M)
    await until(lambda: store.started == 2, "the compaction of (M, p) to begin")
    shredder.note(11, delete("d", "e", "f"))  # while it runs
    await step(store, 2)
    assert shredder.hold_index() == 10
    await step(store, 3)  # the first lap's last range, after a flush for entry 11
    await until(lambda: len(reports) == 1, "entry 10's report")
    assert (reports[0].through_index, reports[0].rows, reports[0].whole_store) == (10, 6, True)
    assert shredder.hold_index() == 11
    await step(store, 5)  # the second lap round to where entry 11 was flushed
    await until(lambda: shredder.passes == 1, "the log to be dropped through entry 11")
    assert [(report.through_index, report.rows, report.whole_store) for report in reports] == [
        (10, 6, True), (11, 6, True)]
    assert store.steps == [("prepare", "whole", 10), ("compact", None, b"M"), ("compact", b"M", b"p"),
                           ("flush",), ("compact", b"p", None),
                           ("prepare", "whole", 11), ("compact", None, b"M"), ("compact", b"M", b"p")]
    assert shredder.hold_index() is None and shredder.oldest_wait_seconds() == 0.0
    await shredder.close()


async def test_a_targeted_pass_gives_way_to_the_sweep_which_goes_on_from_where_the_pass_stopped(monkeypatch) -> None:
    """A pass by key ranges under way when the backlog goes past MAX_KEYS_PER_PASS stops before its next
    range; the sweep starts there. The pass's entry is done once the sweep reaches the end of the key space
    (the pass compacted its keys below that start), the backlog's once the sweep has come round to it."""
    shredder, store, reports = make_sweep(monkeypatch, last_index=22)
    low, high = sorted(shred_keys(delete("a")))  # "Lttv1_a...", "ttv1_a...": two ranges
    shredder.note(20, delete("a"))
    await until(lambda: len(store.steps) == 1, "the pass to start")
    shredder.note(21, delete("b", "c"))  # four keys: still by ranges
    shredder.note(22, delete("d"))  # six: the sweep
    await step(store, 2)  # the pass's first range, then the sweep's first, from the pass's second range on
    await until(lambda: len(reports) == 1, "entry 20's report")
    assert (reports[0].through_index, reports[0].rows, reports[0].whole_store) == (20, 2, False)
    await step(store, 5)  # round to the range that holds where the sweep began, the last
    await until(lambda: shredder.passes == 1, "the log to be dropped through entry 22")
    assert [(report.through_index, report.rows, report.whole_store) for report in reports] == [
        (20, 2, False), (22, 6, True)]
    assert store.steps == [("prepare", "keys", 20), ("compact", low, low + b"\x00"),
                           ("prepare", "whole", 20), ("compact", high, None),
                           ("prepare", "whole", 21), ("compact", None, b"M"), ("compact", b"M", b"p"),
                           ("compact", b"p", None)]
    await shredder.close()


def test_a_sweep_from_a_key_starts_with_the_range_that_holds_it_cut_there() -> None:
    assert shred._ranges_from(WHOLE, None) == WHOLE
    assert shred._ranges_from(WHOLE, b"N") == [(b"N", b"p"), (b"p", None)]
    assert shred._ranges_from(WHOLE, b"p") == [(b"p", None)]
    assert shred._ranges_from([(None, None)], b"x") == [(b"x", None)]


async def test_deletes_noted_during_a_sweep_join_it_once_they_have_enough_keys_to_hit_most_of_its_ranges(
        monkeypatch) -> None:
    """Spread over the key space, 1.4 keys a range of the lap would make a pass of their own rewrite most of
    the store after the sweep: they join it at its next range instead. Fewer wait for the sweep to end."""
    shredder, store, reports = make_sweep(monkeypatch, last_index=13)
    shredder.note(10, delete("a", "b", "c"))  # six keys: the sweep, three ranges a lap
    await until(lambda: store.started == 1, "the first compaction to begin")
    monkeypatch.setattr(shred, "MAX_KEYS_PER_PASS", 10)  # from here on below the bound
    shredder.note(11, delete("d"))  # two keys: they wait
    await step(store, 1)
    await until(lambda: store.started == 2, "the compaction of (M, p) to begin")
    assert shredder.backlog_keys == 2
    shredder.note(12, delete("e", "f"))  # six: past 1.4 a range of the lap's three, they join at the next
    await step(store, 5)
    await until(lambda: shredder.passes == 1, "the log to be dropped through entry 12")
    assert [(report.through_index, report.rows, report.whole_store) for report in reports] == [
        (10, 6, True), (12, 6, True)]
    assert store.steps == [("prepare", "whole", 10), ("compact", None, b"M"), ("compact", b"M", b"p"),
                           ("flush",), ("compact", b"p", None),
                           ("prepare", "whole", 11), ("compact", None, b"M"), ("compact", b"M", b"p")]
    await shredder.close()


async def test_a_pass_whose_ranges_would_rewrite_three_quarters_of_the_bottom_files_is_a_sweep_instead(
        monkeypatch) -> None:
    """Its entries are done after one lap either way; the sweep lets those that come meanwhile wait one
    round of it instead of the rest of the pass and all of the next."""
    shredder, store, reports = make_sweep(monkeypatch, last_index=31)
    store.files = 5
    store.permits.release(20)
    shredder.note(30, delete("a", "b"))  # four keys, four ranges: four of the five bottom files
    await until(lambda: shredder.passes == 1, "the log to be dropped through entry 30")
    assert store.steps == [("prepare", "keys", 30), ("prepare", "whole", 30), ("compact", None, b"M"),
                           ("compact", b"M", b"p"), ("compact", b"p", None)]
    assert [(report.through_index, report.rows, report.whole_store) for report in reports] == [(30, 4, True)]
    store.files = 6  # four of six is less than three quarters: a pass by key ranges
    shredder.note(31, delete("c", "d"))
    await until(lambda: shredder.passes == 2, "the log to be dropped through entry 31")
    assert store.steps[5:] == [("prepare", "keys", 31), *(("compact", key, key + b"\x00")
                                                         for key in sorted(shred_keys(delete("c", "d"))))]
    await shredder.close()
