"""tokenvault.api.coalesce: concurrent sealed tokenizes become one log entry, within bounds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tokenvault.api.coalesce import TokenizeCoalescer
from tokenvault.core import commands
from tokenvault.errors import Unavailable


class Proposals:
    """A stand-in for NodeService._propose that records the commands it was given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.commands: list[commands.TokenizeCommand] = []
        self.error = error
        self.gate: asyncio.Event | None = None

    async def __call__(self, payload: bytes) -> Any:
        command = commands.decode_command(payload)
        assert isinstance(command, commands.TokenizeCommand)
        self.commands.append(command)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return ("applied", len(self.commands))


def items(prefix: str, count: int) -> list[tuple[str, bytes]]:
    return [(f"tv1_{prefix}{index:030d}"[:36], b"c" * 40) for index in range(count)]


async def test_requests_of_one_turn_become_one_entry_and_each_gets_its_result() -> None:
    proposals = Proposals()
    coalescer = TokenizeCoalescer(proposals)
    results = await asyncio.gather(*(coalescer.submit(1, items(f"r{n}", 2)) for n in range(10)))
    assert results == [("applied", 1)] * 10
    assert len(proposals.commands) == 1
    entry = proposals.commands[0]
    assert entry.epoch == 1 and len(entry.items) == 20 and entry.idempotency_key is None
    assert (coalescer.entries_proposed, coalescer.requests_merged) == (1, 10)


async def test_a_full_batch_is_proposed_at_once_and_the_rest_goes_to_the_next_entry() -> None:
    proposals = Proposals()
    coalescer = TokenizeCoalescer(proposals, max_items=5)
    await asyncio.gather(*(coalescer.submit(1, items(f"r{n}", 2)) for n in range(4)))
    assert [len(command.items) for command in proposals.commands] == [4, 4]
    assert all(len(command.items) <= 5 for command in proposals.commands)


async def test_the_byte_bound_splits_entries_too() -> None:
    proposals = Proposals()
    coalescer = TokenizeCoalescer(proposals, max_bytes=200)  # each item is 76 bytes
    await asyncio.gather(*(coalescer.submit(1, items(f"r{n}", 1)) for n in range(5)))
    assert [len(command.items) for command in proposals.commands] == [2, 2, 1]


async def test_requests_of_two_epochs_never_share_an_entry() -> None:
    proposals = Proposals()
    coalescer = TokenizeCoalescer(proposals)
    await asyncio.gather(coalescer.submit(1, items("a", 1)), coalescer.submit(2, items("b", 1)),
                         coalescer.submit(2, items("c", 1)))
    assert sorted((command.epoch, len(command.items)) for command in proposals.commands) == [(1, 1), (2, 2)]


async def test_a_failed_proposal_fails_every_request_of_the_entry() -> None:
    coalescer = TokenizeCoalescer(Proposals(error=Unavailable("no quorum")))
    results = await asyncio.gather(*(coalescer.submit(1, items(f"r{n}", 1)) for n in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(result, Unavailable) for result in results)


async def test_a_cancelled_request_does_not_cancel_the_entry_the_others_wait_for() -> None:
    proposals = Proposals()
    proposals.gate = asyncio.Event()
    coalescer = TokenizeCoalescer(proposals)
    leaving = asyncio.create_task(coalescer.submit(1, items("a", 1)))
    staying = asyncio.create_task(coalescer.submit(1, items("b", 1)))
    await asyncio.sleep(0.01)
    leaving.cancel()
    proposals.gate.set()
    assert await staying == ("applied", 1)
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert len(proposals.commands[0].items) == 2
