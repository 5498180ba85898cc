"""tokenvault.api.coalesce: concurrent sealed tokenizes become one log entry, within bounds."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgpack
import pytest

from tokenvault.api import coalesce
from tokenvault.api.coalesce import TokenizeCoalescer
from tokenvault.core import commands
from tokenvault.errors import Unavailable


class Proposals:
    """A stand-in for NodeService._propose that records the commands it was given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.commands: list[commands.TokenizeCommand] = []
        self.error = error
        self.timeouts: list[float] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, payload: bytes, timeout_seconds: float) -> Any:
        command = commands.decode_command(payload)
        assert isinstance(command, commands.TokenizeCommand)
        self.commands.append(command)
        self.timeouts.append(timeout_seconds)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return ("applied", len(self.commands))


TIMEOUT_SECONDS = 5.0


def items(prefix: str, count: int) -> list[tuple[str, bytes]]:
    return [(f"tv1_{prefix}{index:030d}"[:36], b"c" * 40) for index in range(count)]


async def test_requests_of_one_turn_become_one_entry_and_each_gets_its_result() -> None:
    proposals = Proposals()
    coalescer = TokenizeCoalescer(proposals, timeout_seconds=TIMEOUT_SECONDS)
    results = await asyncio.gather(*(coalescer.submit(1, items(f"r{n}", 2)) for n in range(10)))
    assert results == [("applied", 1)] * 10
    assert len(proposals.commands) == 1
    entry = proposals.commands[0]
    assert entry.epoch == 1 and len(entry.items) == 20 and entry.idempotency_key is None
    assert (coalescer.entries_proposed, coalescer.requests_merged) == (1, 10)


async def test_a_full_batch_is_proposed_at_once_and_the_rest_goes_to_the_next_entry() -> None:
    proposals = Proposals()
    coalescer = TokenizeCoalescer(proposals, timeout_seconds=TIMEOUT_SECONDS, max_items=5)
    await asyncio.gather(*(coalescer.submit(1, items(f"r{n}", 2)) for n in range(4)))
    assert [len(command.items) for command in proposals.commands] == [4, 4]
    assert all(len(command.items) <= 5 for command in proposals.commands)


async def test_the_byte_bound_splits_entries_too() -> None:
    proposals = Proposals()
    # each item is 76 bytes
    coalescer = TokenizeCoalescer(proposals, timeout_seconds=TIMEOUT_SECONDS, max_bytes=200)
    await asyncio.gather(*(coalescer.submit(1, items(f"r{n}", 1)) for n in range(5)))
    assert [len(command.items) for command in proposals.commands] == [2, 2, 1]


async def test_requests_of_two_epochs_never_share_an_entry() -> None:
    proposals = Proposals()
    coalescer = TokenizeCoalescer(proposals, timeout_seconds=TIMEOUT_SECONDS)
    await asyncio.gather(coalescer.submit(1, items("a", 1)), coalescer.submit(2, items("b", 1)),
                         coalescer.submit(2, items("c", 1)))
    assert sorted((command.epoch, len(command.items)) for command in proposals.commands) == [(1, 1), (2, 2)]


async def test_a_failed_proposal_fails_every_request_of_the_entry() -> None:
    coalescer = TokenizeCoalescer(Proposals(error=Unavailable("no quorum")), timeout_seconds=TIMEOUT_SECONDS)
    results = await asyncio.gather(*(coalescer.submit(1, items(f"r{n}", 1)) for n in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(result, Unavailable) for result in results)


async def test_a_cancelled_request_does_not_cancel_the_entry_the_others_wait_for() -> None:
    proposals = Proposals()
    proposals.gate = asyncio.Event()
    coalescer = TokenizeCoalescer(proposals, timeout_seconds=TIMEOUT_SECONDS)
    leaving = asyncio.create_task(coalescer.submit(1, items("a", 1)))
    staying = asyncio.create_task(coalescer.submit(1, items("b", 1)))
    await asyncio.sleep(0.01)
    leaving.cancel()
    proposals.gate.set()
    assert await staying == ("applied", 1)
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert len(proposals.commands[0].items) == 2


# --------------------------------------------------------------------------- entries in flight

class GatedProposals(Proposals):
    """Each proposal waits for its own release, so a test decides when each entry is answered."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__(error)
        self.releases: list[asyncio.Event] = []

    async def __call__(self, payload: bytes, timeout_seconds: float) -> Any:
        command = commands.decode_command(payload)
        assert isinstance(command, commands.TokenizeCommand)
        self.commands.append(command)
        self.timeouts.append(timeout_seconds)
        release = asyncio.Event()
        self.releases.append(release)
        await release.wait()
        if self.error is not None:
            raise self.error
        return ("applied", len(self.commands))


async def until(condition: Any, what: str) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def test_while_an_entry_is_in_flight_the_next_turns_join_one_held_batch() -> None:
    proposals = GatedProposals()
    coalescer = TokenizeCoalescer(proposals, timeout_seconds=TIMEOUT_SECONDS)  # one entry in flight by default
    first = asyncio.create_task(coalescer.submit(1, items("a", 1)))
    await until(lambda: len(proposals.commands) == 1, "the first entry proposed")
    # Three later turns: none of them is proposed while the first entry is unanswered.
    later = []
    for turn in range(3):
        later.append(asyncio.create_task(coalescer.submit(1, items(f"t{turn}", 2))))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert len(proposals.commands) == 1
    assert coalescer.entries_held == 1
    proposals.releases[0].set()
    assert await first == ("applied", 1)
    await until(lambda: len(proposals.commands) == 2, "the held batch proposed")
    assert len(proposals.commands[1].items) == 6  # the three turns, as one entry
    proposals.releases[1].set()
    assert await asyncio.gather(*later) == [("applied", 2)] * 3
    assert (coalescer.entries_proposed, coalescer.requests_merged) == (2, 4)


async def test_more_entries_in_flight_when_allowed() -> None:
    proposals = GatedProposals()
    coalescer = TokenizeCoalescer(proposals, timeout_seconds=TIMEOUT_SECONDS, max_in_flight=2)
    tasks = [asyncio.create_task(coalescer.submit(1, items("a", 1)))]
    await until(lambda: len(proposals.commands) == 1, "the first entry")
    tasks.append(asyncio.create_task(coalescer.submit(1, items("b", 1))))
    await until(lambda: len(proposals.commands) == 2, "the second entry, beside the first")
    tasks.append(asyncio.create_task(coalescer.submit(1, items("c", 1))))
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(proposals.commands) == 2  # the third waits
    proposals.releases[1].set()
    await until(lambda: len(proposals.commands) == 3, "the third once one was answered")
    for release in proposals.releases:
        release.set()
    await asyncio.gather(*tasks)


async def test_a_full_batch_is_proposed_even_while_an_entry_is_in_flight() -> None:
    proposals = GatedProposals()
    coalescer = TokenizeCoalescer(proposals, timeout_seconds=TIMEOUT_SECONDS, max_items=4)
    first = asyncio.create_task(coalescer.submit(1, items("a", 1)))
    await until(lambda: len(proposals.commands) == 1, "the first entry")
    full = asyncio.create_task(coalescer.submit(1, items("b", 4)))
    await until(lambda: len(proposals.commands) == 2, "the full batch, at once")
    assert len(proposals.commands[1].items) == 4
    for release in proposals.releases:
        release.set()
    await asyncio.gather(first, full)


async def one_in_flight_and_one_held(proposals: GatedProposals) -> tuple[TokenizeCoalescer, Any, Any]:
    """A coalescer with one entry proposed and unanswered (``first``) and a request held behind it."""
    coalescer = TokenizeCoalescer(proposals, timeout_seconds=TIMEOUT_SECONDS)
    first = asyncio.create_task(coalescer.submit(1, items("a", 1)))
    await until(lambda: len(proposals.commands) == 1, "the first entry")
    held = asyncio.create_task(coalescer.submit(1, items("b", 1)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return coalescer, first, held


async def test_held_batches_of_two_epochs_stay_apart_and_are_proposed_in_order() -> None:
    proposals = GatedProposals()
    coalescer, first, old = await one_in_flight_and_one_held(proposals)
    new = asyncio.create_task(coalescer.submit(2, items("c", 1)))
    await asyncio.sleep(0)
    late_old = asyncio.create_task(coalescer.submit(1, items("d", 1)))  # the epoch-1 batch was closed
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(proposals.commands) == 1
    for expected in range(2, 5):
        proposals.releases[expected - 2].set()
        await until(lambda: len(proposals.commands) == expected, f"entry {expected}")
    proposals.releases[-1].set()
    await asyncio.gather(first, old, new, late_old)
    assert [(command.epoch, len(command.items)) for command in proposals.commands] == [(1, 1), (1, 1), (2, 1), (1, 1)]


async def test_a_failed_entry_in_flight_releases_the_held_batch() -> None:
    proposals = GatedProposals(error=Unavailable("no quorum"))
    _, first, held = await one_in_flight_and_one_held(proposals)
    proposals.releases[0].set()
    with pytest.raises(Unavailable):
        await first
    await until(lambda: len(proposals.commands) == 2, "the held batch proposed after the failure")
    proposals.releases[1].set()
    with pytest.raises(Unavailable):
        await held


async def test_close_fails_the_requests_of_held_batches() -> None:
    proposals = GatedProposals()
    coalescer, first, held = await one_in_flight_and_one_held(proposals)
    await coalescer.close()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(held, 2)
    assert len(proposals.commands) == 1  # the held batch was never proposed
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


class StoppedClock:
    """The coalescer's monotonic clock, moved by the test alone: what a batch is left of its timeout
    does not depend on how busy the machine running the test is."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    @staticmethod
    def time() -> float:
        return time.time()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> StoppedClock:
    stopped = StoppedClock()
    monkeypatch.setattr(coalesce, "time", stopped)
    return stopped


async def held_behind_a_slow_entry(clock: StoppedClock, timeout_seconds: float, slow_for: float
                                   ) -> tuple[GatedProposals, TokenizeCoalescer, Any]:
    """A request held behind an entry that takes ``slow_for`` seconds (of ``clock``) to be answered."""
    proposals = GatedProposals()
    coalescer = TokenizeCoalescer(proposals, timeout_seconds=timeout_seconds)
    first = asyncio.create_task(coalescer.submit(1, items("a", 1)))
    await until(lambda: len(proposals.commands) == 1, "the first entry")
    held = asyncio.create_task(coalescer.submit(1, items("b", 1)))
    await asyncio.sleep(0)
    clock.now += slow_for
    proposals.releases[0].set()
    await first
    return proposals, coalescer, held


async def test_a_held_batch_gets_only_what_is_left_of_the_request_timeout(clock: StoppedClock) -> None:
    proposals, _, held = await held_behind_a_slow_entry(clock, 0.5, slow_for=0.2)
    await until(lambda: len(proposals.commands) == 2, "the held batch proposed")
    assert proposals.timeouts == [pytest.approx(0.5), pytest.approx(0.3)]  # held 0.2 s of its 0.5
    proposals.releases[1].set()
    await held


async def test_a_batch_held_past_the_request_timeout_fails_without_being_proposed(clock: StoppedClock) -> None:
    proposals, coalescer, held = await held_behind_a_slow_entry(clock, 0.1, slow_for=0.15)
    with pytest.raises(Unavailable, match="not proposed"):
        await asyncio.wait_for(held, 2)
    assert len(proposals.commands) == 1 and coalescer.entries_timed_out == 1
    # The next request is proposed as usual.
    later = asyncio.create_task(coalescer.submit(1, items("c", 1)))
    await until(lambda: len(proposals.commands) == 2, "a later request proposed")
    proposals.releases[1].set()
    await later


def test_max_in_flight_and_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenizeCoalescer(Proposals(), timeout_seconds=TIMEOUT_SECONDS, max_in_flight=0)
    with pytest.raises(ValueError):
        TokenizeCoalescer(Proposals(), timeout_seconds=0)


async def test_requests_with_ttls_join_the_entry_each_item_with_its_own_expiry_from_the_proposal_s_clock() -> None:
    """Opaque requests with a TTL (and no metadata) merge with the others: one entry, each item with the
    expiry its request asked for, counted from the entry's issued_at_ms; one expiry for the entry when
    every item has the same, and a batch without TTLs encodes exactly as before."""
    proposals = Proposals()
    coalescer = TokenizeCoalescer(proposals, timeout_seconds=TIMEOUT_SECONDS)
    await asyncio.gather(coalescer.submit(1, items("plain", 2)), coalescer.submit(1, items("sixty", 3), 60),
                         coalescer.submit(1, items("thirty", 1), 30))
    (entry,) = proposals.commands
    issued = entry.issued_at_ms
    assert entry.expires_at_ms is None and entry.metadata is None
    assert entry.item_expires_at_ms == (None, None) + (issued + 60_000,) * 3 + (issued + 30_000,)
    await asyncio.gather(*(coalescer.submit(1, items(f"same{n}", 2), 45) for n in range(3)))
    same = proposals.commands[1]
    assert same.item_expires_at_ms is None and same.expires_at_ms == same.issued_at_ms + 45_000
    await asyncio.gather(*(coalescer.submit(1, items(f"none{n}", 2)) for n in range(3)))
    plain = proposals.commands[2]
    assert not plain.extended and len(msgpack.unpackb(commands.encode_command(plain))) == 9
