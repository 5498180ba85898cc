"""tokenvault.api.audit: the group-commit buffer (batching, fail closed, bound) and runtime key parsing."""

from __future__ import annotations

import asyncio

import pytest

from tokenvault import auth
from tokenvault.api.audit import AuditBuffer, AuditUnavailable
from tokenvault.core.commands import AuditRecord


def record(number: int) -> AuditRecord:
    return AuditRecord(number, "n1", "reader", None, "detokenize", 1, 1, f"r{number}", None)


class Proposer:
    def __init__(self, fail: bool = False, gate: asyncio.Event | None = None) -> None:
        self.batches: list[tuple[AuditRecord, ...]] = []
        self.fail = fail
        self.gate = gate

    async def __call__(self, records: tuple[AuditRecord, ...]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.batches.append(records)
        if self.fail:
            raise RuntimeError("no quorum")


async def test_concurrent_records_share_few_log_entries_and_each_waits_for_its_own():
    proposer = Proposer()
    buffer = AuditBuffer(proposer, flush_ms=5, max_batch_records=64, max_pending_records=1000)
    await asyncio.gather(*(buffer.append(record(number)) for number in range(200)))
    assert sorted(item.at_ms for batch in proposer.batches for item in batch) == list(range(200))
    assert len(proposer.batches) <= 200 // 64 + 2 and max(map(len, proposer.batches)) <= 64
    assert buffer.pending_count == 0
    await buffer.close()


async def test_at_most_four_batches_are_being_committed_at_once():
    """docs/security.md, "Group commit and fail closed": at most 4 batches of a node are being committed at
    once; records arriving meanwhile wait for a slot and go in the next batches."""
    gate = asyncio.Event()
    in_flight, most = 0, 0

    async def propose(records: tuple[AuditRecord, ...]) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await gate.wait()
        in_flight -= 1

    buffer = AuditBuffer(propose, flush_ms=0, max_batch_records=1, max_pending_records=100)
    appended = [asyncio.create_task(buffer.append(record(number))) for number in range(10)]
    for _ in range(50):  # loop turns enough for every batch a free slot lets through to start
        await asyncio.sleep(0)
    assert in_flight == 4 and not any(task.done() for task in appended)
    gate.set()
    await asyncio.gather(*appended)
    assert most == 4
    await buffer.close()


async def test_a_record_that_cannot_be_written_fails_its_request_closed():
    buffer = AuditBuffer(Proposer(fail=True), flush_ms=0, max_batch_records=8, max_pending_records=8)
    with pytest.raises(AuditUnavailable):
        await buffer.append(record(1))
    await buffer.close()


async def test_the_buffer_is_bounded_and_refuses_at_once_past_the_bound():
    gate = asyncio.Event()
    buffer = AuditBuffer(Proposer(gate=gate), flush_ms=0, max_batch_records=2, max_pending_records=3)
    waiting = [asyncio.create_task(buffer.append(record(number))) for number in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(AuditUnavailable, match="too many"):
        await buffer.append(record(9))
    gate.set()
    await asyncio.gather(*waiting)
    await buffer.close()
    with pytest.raises(AuditUnavailable):
        await buffer.append(record(10))


def test_runtime_key_ids_are_found_only_in_the_runtime_format():
    key_id, key, salt, digest = auth.new_runtime_key()
    assert auth.runtime_key_id(key) == key_id and len(key) == len("tvk1_") + 16 + 1 + 43
    assert auth.runtime_key_digest(salt, key) == digest
    assert auth.runtime_key_digest(b"another salt 16b", key) != digest
    for presented in ("tvk_" + "a" * 43, "tvk1_0123", "tvk1_0123456789ABCDEF_x", "tvk1_0123456789abcdefx"):
        assert auth.runtime_key_id(presented) is None


def test_a_runtime_key_never_matches_without_a_lookup_or_with_another_salt():
    key_id, key, salt, digest = auth.new_runtime_key()
    assert auth.ApiKeyTable([]).authenticate(key) is None
    entry = auth.RuntimeKey(key_id, "ci", frozenset({"tokenize"}), b"x" * 16, digest, 0, "admin")
    assert auth.ApiKeyTable([], {key_id: entry}.get).authenticate(key) is None
    good = auth.RuntimeKey(key_id, "ci", frozenset({"tokenize"}), salt, digest, 0, "admin")
    assert auth.ApiKeyTable([], {key_id: good}.get).authenticate(key).key_id == key_id
