"""The shredder's passes over a backlog (tokenvault/core/shred.py), with a store and a log that record
what they are asked: passes take the oldest entries first, the entry the log must keep moves on with
each pass, and the keys waiting are counted for the primary's bound on deletes."""

from __future__ import annotations

import asyncio
import threading

from structlog.testing import capture_logs

from tokenvault.core import shred
from tokenvault.core.commands import Actor, DeleteTokensCommand
from tokenvault.core.shred import Shredder, shred_keys

ACTOR = Actor(name="ops", node="n1", request_id="r1")
DEADLINE_SECONDS = 10


class RecordingStore:
    """Each shred's keys and the log's hold at that moment; ``gate`` holds a shred until it is set."""

    def __init__(self) -> None:
        self.applied_index = 0
        self.shredder: Shredder | None = None
        self.passes: list[tuple[list[bytes], int | None]] = []
        self.gate = threading.Event()
        self.gate.set()

    def shred(self, keys: list[bytes]) -> None:
        assert self.shredder is not None
        self.passes.append((list(keys), self.shredder.hold_index()))
        assert self.gate.wait(DEADLINE_SECONDS)

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


def make_shredder(last_index: int) -> tuple[Shredder, RecordingStore, RecordingLog]:
    store, wal = RecordingStore(), RecordingLog(last_index)
    failures: list[BaseException] = []
    shredder = Shredder(lambda: store, wal, failures.append)  # type: ignore[arg-type]
    store.shredder = shredder
    store.applied_index = last_index
    return shredder, store, wal


async def until(condition, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE_SECONDS
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_backlog_is_shredded_oldest_entry_first_and_the_held_entry_moves_on_with_each_pass(
        monkeypatch) -> None:
    """Three deletes of two tokens each (four keys: each row and its life row), a pass of four keys: each
    pass is one entry's keys, in log order, and while it runs the log holds that entry and no earlier one.
    (Passes that took the lowest keys of the whole backlog held the first entry until all were done.)"""
    monkeypatch.setattr(shred, "MAX_KEYS_PER_PASS", 4)
    shredder, store, wal = make_shredder(last_index=12)
    commands = {10: delete("c", "d"), 11: delete("a", "b"), 12: delete("e", "f")}
    with capture_logs() as logged:
        for index, command in commands.items():
            shredder.note(index, command)
        assert shredder.backlog_keys == 12
        await until(lambda: shredder.passes == 1, "the log to be dropped through the last entry")
    # docs/logs.md: a pass with more waiting says so, at most once in 10 s (the second pass is summed into
    # the next line, which does not come); the last pass, which drops the log, says shred.done.
    assert [(line["event"], line.get("passes"), line["rows"], line.get("rows_waiting")) for line in logged
            if line["event"].startswith("shred.")] == [("shred.pass", 1, 4, 8), ("shred.done", None, 4, None)]
    assert store.passes == [(shred_keys(commands[10]), 10), (shred_keys(commands[11]), 11),
                            (shred_keys(commands[12]), 12)]
    assert shredder.backlog_keys == 0 and shredder.hold_index() is None
    assert wal.first_held_index > 12
    await shredder.close()


async def test_passes_behind_a_backlog_are_logged_summed_at_most_once_an_interval(monkeypatch) -> None:
    monkeypatch.setattr(shred, "MAX_KEYS_PER_PASS", 2)
    monkeypatch.setattr(shred, "PASS_LOG_SECONDS", 0.0)
    shredder, store, wal = make_shredder(last_index=42)
    with capture_logs() as logged:
        for index, name in zip(range(40, 43), "abc"):
            shredder.note(index, delete(name))
        await until(lambda: shredder.passes == 1, "the log to be dropped through the last entry")
    assert [(line["event"], line.get("passes"), line["rows"], line.get("rows_waiting")) for line in logged
            if line["event"].startswith("shred.")] == [("shred.pass", 1, 2, 4), ("shred.pass", 1, 2, 2),
                                                        ("shred.done", None, 2, None)]
    monkeypatch.setattr(shred, "PASS_LOG_SECONDS", 3600.0)
    with capture_logs() as logged:
        for index, name in zip(range(43, 47), "defg"):
            shredder.note(index, delete(name))
        wal.last_index = store.applied_index = 46
        await until(lambda: shredder.passes == 2, "the log to be dropped through the last entry")
    # The last line was logged less than an hour ago: these three passes are summed into a line not yet due.
    assert [line["event"] for line in logged if line["event"].startswith("shred.")] == ["shred.done"]
    await shredder.close()


async def test_an_entry_with_more_keys_than_a_pass_is_split_and_held_until_its_last_keys_pass(monkeypatch) -> None:
    monkeypatch.setattr(shred, "MAX_KEYS_PER_PASS", 4)
    shredder, store, wal = make_shredder(last_index=21)
    big, small = delete("a", "b", "c"), delete("d")  # six keys, then two
    shredder.note(20, big)
    shredder.note(21, small)
    await until(lambda: shredder.passes == 1, "the log to be dropped through the last entry")
    keys = shred_keys(big)
    # The first pass takes four of the big entry's six keys; the second its last two and the small
    # entry's two. The big entry is held until then.
    assert store.passes == [(keys[:4], 20), (keys[4:] + shred_keys(small), 20)]
    assert wal.first_held_index > 21
    await shredder.close()


async def test_keys_noted_while_a_pass_runs_wait_for_the_next_and_are_counted(monkeypatch) -> None:
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
