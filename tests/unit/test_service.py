"""tokenvault.api.service: tokenize, detokenize, epochs and idempotency on real nodes.

A single node and three-node clusters run in-process (node_support.py). Where a
request must be caught in flight, the test wraps ``node.propose`` with a gate
instead of sleeping.
"""

from __future__ import annotations

import dataclasses
import asyncio
import contextlib
import json
import re
import socket
import time
from types import SimpleNamespace
from typing import Any
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from node_support import Cluster, ProposalGate, RunningNode, Timing, retry_until_ok, start_cluster, wait_until
import msgpack

from protocol import AppendEntries, AppendReply, ForwardRequest, ForwardResponse, FrameDecoder, ProposalRejected
from tokenvault.core import commands
from tokenvault.api.lifecycle import RETOKENIZE
from tokenvault.core.node import ProposalLost
from tokenvault.crypto.keys import EpochKeys, new_epoch_secret
from tokenvault.errors import (EpochChanged, IdempotencyInFlight, IdempotencyMismatch, InvalidRequest,
                               MembershipChangeRefused, Outcome, Overloaded, ServiceError,
                               TokenCollision, Unavailable, UnprocessableValue, problem_body_of,
                               problem_type)
from tokenvault.api.channel import Channel
from tokenvault.api.core_calls import CoreCalls
from tokenvault.api.remote import EPOCH_TOPIC, RemoteService
from tokenvault.api import service as service_module
from tokenvault.api.service import MAX_EPOCH_RETRIES
from tokenvault.api.validation import TokenizeOptions
from tokenvault.crypto import formats
from tokenvault.crypto.ff1 import digits_to_numerals, numerals_to_digits
from tokenvault.core.store_layout import Outcome as ApplyOutcome

TOKEN_PATTERN = re.compile(r"tv(\d+)_[a-z2-7]{32}\Z")
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z\Z")


def body(outcome: Outcome) -> dict:
    return json.loads(outcome.body)


def is_tokenize(principal: str, key: str):
    return lambda command: (isinstance(command, commands.TokenizeCommand)
                            and command.principal == principal and command.idempotency_key == key)


# --------------------------------------------------------------------------- tokenize and detokenize

async def test_tokenize_is_deterministic_one_token_per_value_in_order(single: RunningNode) -> None:
    service = single.service
    first = await service.tokenize("p", ["alpha", "beta", "alpha"], None)
    assert first.status == 200 and not first.replayed
    document = body(first)
    assert set(document) == {"epoch", "tokens"} and document["epoch"] == 1
    tokens = document["tokens"]
    assert len(tokens) == 3 and tokens[0] == tokens[2] != tokens[1]
    assert all(TOKEN_PATTERN.match(token).group(1) == "1" for token in tokens)
    assert not any("alpha" in token or "beta" in token for token in tokens)
    second = body(await service.tokenize("q", ["beta", "gamma", "alpha"], None))
    assert second["tokens"][0] == tokens[1] and second["tokens"][2] == tokens[0]
    assert single.node.store.token_count() == 3
    assert await service.detokenize([tokens[1], second["tokens"][1], tokens[0], tokens[0]]) == [
        "beta", "gamma", "alpha", "alpha"]


async def test_unknown_tokens_detokenize_to_none(single: RunningNode) -> None:
    known = body(await single.service.tokenize("p", ["known"], None))["tokens"][0]
    never_issued = "tv1_" + "a" * 32
    unknown_epoch = "tv77_" + "b" * 32
    assert await single.service.detokenize([never_issued, known, unknown_epoch]) == [None, "known", None]


async def test_unicode_values_round_trip(single: RunningNode) -> None:
    values = ["żółć", "日本語", "emoji 🙂", "x" * 4096]
    tokens = body(await single.service.tokenize("p", values, None))["tokens"]
    assert len(set(tokens)) == 4
    assert await single.service.detokenize(tokens) == values


# --------------------------------------------------------------------------- idempotency

async def test_idempotent_replay_returns_the_first_body_even_after_a_rotation(single: RunningNode) -> None:
    service = single.service
    first = await service.tokenize("p", ["idem-a", "idem-b"], "key-1")
    assert first.status == 200 and not first.replayed
    count = single.node.store.token_count()
    rotated = await service.rotate_epoch("p", "rotate-key")
    assert rotated.status == 201 and body(rotated) == {"epoch": 2} and not rotated.replayed
    again = await service.tokenize("p", ["idem-a", "idem-b"], "key-1")
    assert again.status == 200 and again.replayed and again.body == first.body
    assert body(again)["epoch"] == 1
    assert single.node.store.token_count() == count
    # The rotation's own key replays too, without creating a third epoch.
    rotated_again = await service.rotate_epoch("p", "rotate-key")
    assert rotated_again.replayed and rotated_again.status == 201 and rotated_again.body == rotated.body
    assert single.node.store.active_epoch() == 2
    # Without a key, the same values are simply issued in the new epoch.
    assert body(await service.tokenize("p", ["idem-a", "idem-b"], None))["epoch"] == 2


async def test_same_key_with_a_different_body_is_422(single: RunningNode) -> None:
    service = single.service
    await service.tokenize("p", ["one"], "key-1")
    with pytest.raises(IdempotencyMismatch) as raised:
        await service.tokenize("p", ["two"], "key-1")
    assert raised.value.status == 422
    with pytest.raises(IdempotencyMismatch):
        await service.tokenize("p", ["one", "one"], "key-1")
    # A tokenize key reused for a rotation is a different request too.
    with pytest.raises(IdempotencyMismatch):
        await service.rotate_epoch("p", "key-1")
    assert single.node.store.active_epoch() == 1
    assert single.node.store.token_count() == 1


async def test_same_key_while_the_first_is_in_flight_is_409(single: RunningNode) -> None:
    service = single.service
    gate = ProposalGate(single.node, is_tokenize("p", "slow"))
    first = asyncio.create_task(service.tokenize("p", ["slow-value"], "slow"))
    await asyncio.wait_for(gate.waiting.wait(), 5)
    with pytest.raises(IdempotencyInFlight) as raised:
        await service.tokenize("p", ["slow-value"], "slow")
    assert raised.value.status == 409
    with pytest.raises(IdempotencyInFlight):
        await service.tokenize("p", ["another-value"], "slow")
    # Other keys and other principals are not blocked by it.
    other = await service.tokenize("p", ["unrelated"], "fast")
    assert other.status == 200
    elsewhere = await service.tokenize("someone-else", ["slow-value"], "slow")
    assert elsewhere.status == 200 and not elsewhere.replayed
    gate.open()
    outcome = await asyncio.wait_for(first, 5)
    assert outcome.status == 200 and not outcome.replayed
    replay = await service.tokenize("p", ["slow-value"], "slow")
    assert replay.replayed and replay.body == outcome.body
    tokenize_proposals = [command for command in gate.proposed if isinstance(command, commands.TokenizeCommand)]
    assert len(tokenize_proposals) == 3  # the first, "fast" and the other principal's: the 409s proposed nothing


async def test_a_first_request_that_timed_out_frees_its_key(single: RunningNode) -> None:
    node = single.node
    original = node.propose

    async def no_quorum(payload: bytes, timeout_seconds: float):
        raise asyncio.TimeoutError()  # as if no majority confirmed the entry in time
    node.propose = no_quorum
    with pytest.raises(Unavailable) as raised:
        await single.service.tokenize("p", ["v"], "retry-me")
    assert raised.value.headers.get("Retry-After")
    node.propose = original
    outcome = await single.service.tokenize("p", ["v"], "retry-me")
    assert outcome.status == 200 and not outcome.replayed


async def test_an_overloaded_primary_answers_overloaded_not_no_primary(single: RunningNode,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A full driver inbox or a proposal the core refuses is overload: its own problem type, still 503."""
    monkeypatch.setattr("tokenvault.core.node.INBOX_MAX_ITEMS", 0)
    for attempt in (single.service.tokenize("p", ["v"], None), single.service.detokenize(["tv1_" + "a" * 32])):
        with pytest.raises(Overloaded) as raised:
            await attempt
        assert raised.value.status == 503 and raised.value.problem == "overloaded"
        assert raised.value.headers.get("Retry-After")
        assert "no primary" not in raised.value.detail
    monkeypatch.undo()

    def refuse(payload: bytes):
        raise ProposalRejected("too many uncommitted entries")
    monkeypatch.setattr(single.node.replica, "propose", refuse)
    with pytest.raises(Overloaded) as raised:
        await single.service.tokenize("p", ["w"], None)
    assert "uncommitted" in raised.value.detail
    monkeypatch.undo()
    assert (await single.service.tokenize("p", ["w"], None)).status == 200


async def test_an_overloaded_primary_is_overloaded_through_a_backup_too(trio: Cluster,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    primary, backup = trio.primaries()[0], trio.backups()[0]

    def refuse(payload: bytes):
        raise ProposalRejected("too many uncommitted entries")
    monkeypatch.setattr(primary.node.replica, "propose", refuse)
    with pytest.raises(Overloaded) as raised:
        await backup.service.tokenize("p", ["forwarded-while-overloaded"], None)
    assert raised.value.problem == "overloaded" and raised.value.headers.get("Retry-After")


async def test_a_503_says_whether_the_write_had_no_effect_and_a_backup_passes_that_on(
        trio: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/api.md, Errors: a 503's body says "effect": "none" when the request certainly had no effect
    (another entry took its place: a client may send it again, anywhere), "unknown" when it may still
    take effect once (not confirmed in time). A backup that forwarded it answers what the primary said."""
    primary, backup = trio.primaries()[0], trio.backups()[0]
    for failure, effect in ((ProposalLost(), "none"), (asyncio.TimeoutError(), "unknown")):
        async def fail(payload: bytes, timeout_seconds: float, failure: Exception = failure) -> None:
            raise failure
        monkeypatch.setattr(primary.node, "propose", fail)
        for node in (primary, backup):
            with pytest.raises(Unavailable) as raised:
                await node.service.tokenize("p", [f"effect-{effect}"], None)
            assert raised.value.status == 503 and raised.value.problem == "unavailable"
            assert json.loads(problem_body_of(raised.value))["effect"] == effect, (node.config.node_id, effect)


async def test_a_read_the_primary_refuses_for_a_full_read_queue_is_overloaded_through_a_backup_too(
        trio: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup's read index asked of a primary whose pending reads are at their bound: 503 overloaded
    on the backup, not "no primary is known" (it was, before ReadIndexReply said why)."""
    primary, backup = trio.primaries()[0], trio.backups()[0]
    full = dataclasses.replace(primary.node.replica.config)
    object.__setattr__(full, "max_pending_reads", 0)  # every read finds the queue full (no config may say so)
    monkeypatch.setattr(primary.node.replica, "_config", full)
    epoch = backup.node.store.active_epoch()
    # The read point a worker asks for a tokenize whose tokens all exist (a read on this backup).
    with pytest.raises(Overloaded) as raised:
        await backup.service.tokenize_read_point(epoch)
    assert raised.value.problem == "overloaded" and raised.value.headers.get("Retry-After")
    assert "no primary" not in raised.value.detail
    monkeypatch.undo()
    assert await backup.service.tokenize_read_point(epoch) == backup.node.removal_index  # once it has room


async def test_idempotency_keys_are_scoped_per_principal(single: RunningNode) -> None:
    service = single.service
    alice = await service.tokenize("alice", ["alice-value"], "shared-key")
    bob = await service.tokenize("bob", ["bob-value"], "shared-key")
    assert not alice.replayed and not bob.replayed and alice.body != bob.body
    again_alice = await service.tokenize("alice", ["alice-value"], "shared-key")
    again_bob = await service.tokenize("bob", ["bob-value"], "shared-key")
    assert again_alice.replayed and again_alice.body == alice.body
    assert again_bob.replayed and again_bob.body == bob.body
    with pytest.raises(IdempotencyMismatch):
        await service.tokenize("bob", ["alice-value"], "shared-key")


async def test_a_key_past_its_retention_is_a_new_request_before_the_purge_reaches_it(
        single: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/guarantees.md, "Idempotency": a record is kept for the retention, then the key may be used
    again. A record past it that no purge has reached yet (nothing was applied since it expired) must
    not answer: the apply takes the new request in its place, so the service must not 422 or replay it."""
    service = single.service
    retention_seconds = single.node.store.retention_ms / 1000
    long_ago = time.time() - retention_seconds - 60
    monkeypatch.setattr(service_module, "time", SimpleNamespace(
        time=lambda: long_ago, strftime=time.strftime, gmtime=time.gmtime))
    first = await service.tokenize("p", ["written-long-ago"], "reused-key")
    assert first.status == 200 and not first.replayed
    monkeypatch.undo()
    record = single.node.store.idempotency_get("p", "reused-key")
    assert record is not None and record.created_at_ms < (time.time() - retention_seconds) * 1000
    again = await service.tokenize("p", ["written-now"], "reused-key")
    assert again.status == 200 and not again.replayed
    assert body(again)["tokens"] != body(first)["tokens"]
    replay = await service.tokenize("p", ["written-now"], "reused-key")
    assert replay.replayed and replay.body == again.body


# --------------------------------------------------------------------------- repeat tokenize is a read

def tokenize_reads(running: RunningNode) -> float:
    return running.node.metrics.tokenize_answered_as_read._value.get()


async def test_a_repeat_tokenize_is_answered_without_a_log_entry(single: RunningNode) -> None:
    service, replica = single.service, single.node.replica
    first = body(await service.tokenize("p", ["card-a", "card-b"], None))
    last_index, reads = replica.last_index, tokenize_reads(single)
    again = body(await service.tokenize("q", ["card-b", "card-a"], None))
    assert again == {"epoch": first["epoch"], "tokens": first["tokens"][::-1]}
    assert replica.last_index == last_index and tokenize_reads(single) == reads + 2
    # One new value among known ones is a write; so is any request with an Idempotency-Key.
    mixed = body(await service.tokenize("p", ["card-a", "card-c"], None))
    assert mixed["tokens"][0] == first["tokens"][0] and replica.last_index == last_index + 1
    keyed = await service.tokenize("p", ["card-a"], "record-me")
    assert keyed.status == 200 and replica.last_index == last_index + 2
    assert (await service.tokenize("p", ["card-a"], "record-me")).replayed


async def test_a_repeat_tokenize_waits_for_the_read_barrier(single: RunningNode) -> None:
    service, node = single.service, single.node
    await service.tokenize("p", ["known"], None)
    original = node.read_barrier

    async def no_majority(timeout_seconds: float) -> None:
        raise asyncio.TimeoutError()  # as if leadership could not be confirmed
    node.read_barrier = no_majority
    with pytest.raises(Unavailable):
        await service.tokenize("p", ["known"], None)
    node.read_barrier = original
    assert (await service.tokenize("p", ["known"], None)).status == 200


async def test_a_backup_answers_a_repeat_tokenize_itself_after_a_read_index(trio: Cluster) -> None:
    primary = trio.primaries()[0]
    backup = trio.backups()[0]
    first = body(await primary.service.tokenize("p", ["seen-before"], None))
    last_index, reads = primary.node.replica.last_index, tokenize_reads(backup)
    # A backup that has not applied the token yet forwards the request (the primary answers it as a read).
    await wait_until(lambda: backup.node.store.applied_index >= primary.node.store.applied_index, 5,
                     "the backup to apply the first tokenize")

    async def no_forwarding(*arguments):
        raise AssertionError("a repeat must not be forwarded")
    backup.service._forward = no_forwarding
    assert body(await backup.service.tokenize("q", ["seen-before"], None)) == first
    assert tokenize_reads(backup) == reads + 1 and primary.node.replica.last_index == last_index
    with pytest.raises(AssertionError, match="forwarded"):
        await backup.service.tokenize("q", ["never-seen"], None)  # a new value is a write: forwarded


async def test_a_repeat_tokenize_after_a_rotation_is_issued_in_the_new_epoch(trio: Cluster) -> None:
    """Epoch authority holds on the read path: the rotation was acknowledged before the repeat started."""
    primary = trio.primaries()[0]
    backups = trio.backups()
    old = body(await backups[0].service.tokenize("p", ["repeat-me"], None))
    assert body(await backups[1].service.tokenize("p", ["repeat-me"], None)) == old
    rotated = await backups[0].service.rotate_epoch("p", None)
    last_index = primary.node.replica.last_index
    new = body(await backups[1].service.tokenize("p", ["repeat-me"], None))
    assert new["epoch"] == body(rotated)["epoch"] == old["epoch"] + 1 and new["tokens"] != old["tokens"]
    assert primary.node.replica.last_index == last_index + 1
    assert body(await backups[0].service.tokenize("p", ["repeat-me"], None)) == new
    assert primary.node.replica.last_index == last_index + 1


# --------------------------------------------------------------------------- epochs

async def test_rotation_issues_new_tokens_and_old_ones_still_detokenize(single: RunningNode) -> None:
    service = single.service
    old = body(await service.tokenize("p", ["rotating"], None))["tokens"][0]
    rotated = await service.rotate_epoch("p", None)
    assert rotated.status == 201 and body(rotated) == {"epoch": 2}
    new_document = body(await service.tokenize("p", ["rotating"], None))
    new = new_document["tokens"][0]
    assert new_document["epoch"] == 2 and TOKEN_PATTERN.match(new).group(1) == "2" and new != old
    assert await service.detokenize([old, new]) == ["rotating", "rotating"]
    listing = await service.list_epochs()
    assert listing["active_epoch"] == 2
    assert [(item["epoch"], item["state"]) for item in listing["epochs"]] == [(1, "retired"), (2, "active")]
    assert all(RFC3339_UTC.match(item["created_at"]) for item in listing["epochs"])
    assert set(listing["epochs"][0]) == {"epoch", "created_at", "state"}


async def test_tokenize_racing_a_rotation_is_retried_in_the_new_epoch(single: RunningNode) -> None:
    """The tokenize computed its tokens in epoch 1; a rotation applies first; apply says EPOCH_MISMATCH."""
    service = single.service
    gate = ProposalGate(single.node, lambda command: isinstance(command, commands.TokenizeCommand)
                        and command.epoch == 1)
    racing = asyncio.create_task(service.tokenize("p", ["raced-1", "raced-2"], "raced"))
    await asyncio.wait_for(gate.waiting.wait(), 5)
    rotated = await service.rotate_epoch("p", None)
    assert body(rotated) == {"epoch": 2}
    gate.open()
    outcome = await asyncio.wait_for(racing, 5)
    document = body(outcome)
    assert outcome.status == 200 and document["epoch"] == 2
    assert all(TOKEN_PATTERN.match(token).group(1) == "2" for token in document["tokens"])
    proposed_epochs = [command.epoch for command in gate.proposed if isinstance(command, commands.TokenizeCommand)]
    assert proposed_epochs == [1, 2]
    # The stale entry wrote nothing: the epoch-1 tokens of these values do not exist.
    stale_tokens = [single.node.keyring.get(1).token_for(value) for value in ("raced-1", "raced-2")]
    assert single.node.store.lookup(stale_tokens) == {}
    assert await service.detokenize(document["tokens"]) == ["raced-1", "raced-2"]
    replay = await service.tokenize("p", ["raced-1", "raced-2"], "raced")
    assert replay.replayed and replay.body == outcome.body


async def test_tokenize_gives_up_with_503_when_the_epoch_keeps_changing(single: RunningNode) -> None:
    node = single.node
    original = node.propose
    attempts: list[int] = []

    async def rotate_first(payload: bytes, timeout_seconds: float):
        command = commands.decode_command(payload)
        if isinstance(command, commands.TokenizeCommand):
            attempts.append(command.epoch)
            epoch = node.store.active_epoch() + 1
            rotation = commands.RotateEpochCommand(
                epoch=epoch, wrapped_secret=node.master_key.wrap_epoch_secret(epoch, new_epoch_secret()),
                created_at_ms=int(time.time() * 1000), principal=None, idempotency_key=None, fingerprint=None)
            result = await original(commands.encode_command(rotation), timeout_seconds)
            assert result.outcome == ApplyOutcome.OK
        return await original(payload, timeout_seconds)
    node.propose = rotate_first
    count = node.store.token_count()
    with pytest.raises(Unavailable):
        await single.service.tokenize("p", ["never-settles"], None)
    assert attempts == list(range(1, MAX_EPOCH_RETRIES + 1))
    assert node.store.token_count() == count


async def test_concurrent_tokenizes_agree_on_every_token(single: RunningNode) -> None:
    service = single.service
    batches = [[f"shared-{number % 7}", f"own-{number}"] for number in range(40)]
    outcomes = await asyncio.wait_for(asyncio.gather(*(service.tokenize("p", batch, None) for batch in batches)), 20)
    token_of: dict[str, str] = {}
    for batch, outcome in zip(batches, outcomes):
        document = body(outcome)
        assert outcome.status == 200 and document["epoch"] == 1
        for value, token in zip(batch, document["tokens"]):
            assert token_of.setdefault(value, token) == token
    assert len(set(token_of.values())) == len(token_of) == 47
    assert single.node.store.token_count() == 47
    values = list(token_of)
    assert await service.detokenize([token_of[value] for value in values]) == values


async def test_concurrent_rotations_each_get_their_own_epoch(single: RunningNode) -> None:
    service = single.service
    outcomes = await asyncio.wait_for(asyncio.gather(*(service.rotate_epoch("admin", None) for _ in range(3))), 20)
    assert sorted(body(outcome)["epoch"] for outcome in outcomes) == [2, 3, 4]
    assert all(outcome.status == 201 for outcome in outcomes)
    listing = await service.list_epochs()
    assert listing["active_epoch"] == 4
    assert [item["state"] for item in listing["epochs"]] == ["retired", "retired", "retired", "active"]


# --------------------------------------------------------------------------- three nodes: forwarding

async def test_tokenize_through_a_backup_is_forwarded(trio: Cluster) -> None:
    primary = trio.primaries()[0]
    backup = trio.backups()[0]
    outcome = await backup.service.tokenize("p", ["via-backup-1", "via-backup-2"], None)
    assert outcome.status == 200 and not outcome.replayed
    tokens = body(outcome)["tokens"]
    assert primary.node.store.lookup(tokens).keys() == set(tokens)
    assert await primary.service.detokenize(tokens) == ["via-backup-1", "via-backup-2"]
    direct = body(await primary.service.tokenize("p", ["via-backup-1"], None))
    assert direct["tokens"] == tokens[:1]


async def test_detokenize_right_after_the_acknowledgement_finds_it_on_every_node(trio: Cluster) -> None:
    """Guarantee 2, with no retries: a detokenize that starts after the 200 finds the tokens anywhere."""
    primary = trio.primaries()[0]
    for round_number in range(5):
        entry_node = trio.running()[round_number % 3]
        values = [f"fresh-{round_number}-{item}" for item in range(3)]
        tokens = body(await entry_node.service.tokenize("p", values, None))["tokens"]
        for running in [*trio.backups(), primary]:
            assert await running.service.detokenize(tokens) == values, running.node_id


async def test_detokenize_on_a_backup_that_has_not_applied_the_token_is_forwarded(trio: Cluster) -> None:
    primary = trio.primaries()[0]
    lagging = trio.backups()[0]
    transport = lagging.node.transport
    deliver = transport._on_message  # replication to this backup is held back by dropping its appends
    transport._on_message = lambda sender, message: (None if isinstance(message, AppendEntries)
                                                     else deliver(sender, message))
    try:
        values = ["not-yet-here-1", "not-yet-here-2"]
        tokens = body(await primary.service.tokenize("p", values, None))["tokens"]
        assert lagging.node.store.lookup(tokens) == {}
        assert await lagging.service.detokenize(tokens + ["tv1_" + "c" * 32]) == [*values, None]
        assert lagging.node.store.lookup(tokens) == {}  # the answer came from the primary
    finally:
        transport._on_message = deliver
    await wait_until(lambda: lagging.node.store.lookup(tokens).keys() == set(tokens), 5,
                     "the lagging backup to catch up")


async def test_rotate_and_list_epochs_through_a_backup(trio: Cluster) -> None:
    first, second = trio.backups()
    rotated = await first.service.rotate_epoch("admin", None)
    assert rotated.status == 201 and body(rotated) == {"epoch": 2} and not rotated.replayed
    listing = await second.service.list_epochs()
    assert listing["active_epoch"] == 2
    assert [(item["epoch"], item["state"]) for item in listing["epochs"]] == [(1, "retired"), (2, "active")]
    # Epoch authority: a tokenize that starts after the answer is issued in epoch 2, on any node.
    for running in trio.running():
        assert body(await running.service.tokenize("p", ["after-rotation"], None))["epoch"] == 2
    await wait_until(lambda: all(running.service.health()["active_epoch"] == 2 for running in trio.running()),
                     5, "every node's health to show epoch 2")


async def test_idempotency_holds_across_nodes(trio: Cluster) -> None:
    primary = trio.primaries()[0]
    first, second = trio.backups()
    outcome = await first.service.tokenize("p", ["cross-node"], "cross-key")
    assert not outcome.replayed
    for running in (second, primary, first):
        replay = await running.service.tokenize("p", ["cross-node"], "cross-key")
        assert replay.status == 200 and replay.replayed and replay.body == outcome.body
    with pytest.raises(IdempotencyMismatch) as raised:  # the primary's error class, through the backup
        await second.service.tokenize("p", ["something-else"], "cross-key")
    assert raised.value.status == 422 and raised.value.problem == "idempotency-mismatch"
    rotated = await second.service.rotate_epoch("admin", "rotation-key")
    replay = await first.service.rotate_epoch("admin", "rotation-key")
    assert replay.replayed and replay.status == 201 and replay.body == rotated.body
    assert primary.node.store.active_epoch() == 2


async def test_in_flight_key_through_backups_is_409(trio: Cluster) -> None:
    primary = trio.primaries()[0]
    first, second = trio.backups()
    gate = ProposalGate(primary.node, is_tokenize("p", "held"))
    try:
        held = asyncio.create_task(first.service.tokenize("p", ["held-value"], "held"))
        await asyncio.wait_for(gate.waiting.wait(), 5)
        with pytest.raises(ServiceError) as raised:
            await second.service.tokenize("p", ["held-value"], "held")
        assert raised.value.status == 409
        gate.open()
        outcome = await asyncio.wait_for(held, 5)
        assert outcome.status == 200 and not outcome.replayed
    finally:
        gate.remove()
    replay = await second.service.tokenize("p", ["held-value"], "held")
    assert replay.replayed and replay.body == outcome.body


async def test_idempotent_replay_survives_a_change_of_primary(trio: Cluster) -> None:
    old = trio.primaries()[0]
    first = await trio.backups()[0].service.tokenize("p", ["before-change"], "change-key")
    await old.close()
    new = await trio.wait_for_stable_primary()
    assert new.node_id != old.node_id
    for running in trio.running():
        replay = await retry_until_ok(lambda: running.service.tokenize("p", ["before-change"], "change-key"), 5,
                                      "a replay once the new primary serves", (Unavailable,))
        assert replay.status == 200 and replay.replayed and replay.body == first.body
    with pytest.raises(ServiceError) as raised:
        await new.service.tokenize("p", ["changed"], "change-key")
    assert raised.value.status == 422


async def test_a_rotation_acknowledged_before_a_failover_holds_on_the_new_primary(trio: Cluster) -> None:
    """Epoch authority: tokenizes that start after the 201 are in the new epoch, even on the next primary."""
    old = trio.primaries()[0]
    rotated = await old.service.rotate_epoch("admin", None)
    assert body(rotated) == {"epoch": 2}
    await old.close()
    for running in trio.running():
        outcome = await retry_until_ok(lambda: running.service.tokenize("p", [f"after-{running.node_id}"], None),
                                       5, "a tokenize once a new primary serves", (Unavailable,))
        document = body(outcome)
        assert document["epoch"] == 2
        assert all(TOKEN_PATTERN.match(token).group(1) == "2" for token in document["tokens"])


async def test_a_forward_in_flight_fails_fast_when_the_link_to_the_primary_drops(tmp_path: Path) -> None:
    cluster = await start_cluster(tmp_path, 3, Timing(request_timeout_ms=4000))
    try:
        primary = await cluster.wait_for_stable_primary()
        backup = cluster.backups()[0]
        gate = ProposalGate(primary.node, is_tokenize("p", "caught"))
        caught = asyncio.create_task(backup.service.tokenize("p", ["caught-by-failure"], "caught"))
        await asyncio.wait_for(gate.waiting.wait(), 5)
        await primary.close()  # the forwarded request dies with the primary: no answer will ever come
        await wait_until(lambda: not backup.node.transport.is_connected(primary.node_id), 2,
                         "the backup to see the link drop")
        dropped_at = time.monotonic()
        with pytest.raises(ServiceError) as raised:
            await asyncio.wait_for(caught, 10)
        assert raised.value.status == 503
        assert time.monotonic() - dropped_at < 1.5, "the 503 waited for the forward timeout"
    finally:
        await cluster.close()


async def test_a_forward_the_full_link_to_the_primary_refuses_is_overloaded_and_counted(
        trio: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup whose link to the primary is full (the primary reads nothing: the link's queue is at its
    bound, tests/unit/test_transport.py) answers 503 overloaded with Retry-After at once, rather than
    "not reachable" for a primary it is linked to, and counts the dropped message by peer."""
    primary, backup = trio.primaries()[0], trio.backups()[0]
    connection = backup.node.transport._connections[primary.node_id]
    refused: list[bytes] = []

    def full(frame: bytes) -> str:
        refused.append(frame)
        return "bytes"
    monkeypatch.setattr(connection, "enqueue", full)
    with pytest.raises(Overloaded) as raised:
        await backup.service.tokenize("p", ["refused-by-a-full-link"], None)
    assert raised.value.status == 503 and raised.value.problem == "overloaded"
    assert "Retry-After" in raised.value.headers and "link to the primary is full" in str(raised.value.detail)
    # Its replication replies were refused too while the stub held (the core takes such losses).
    assert ForwardRequest in {type(message) for message in FrameDecoder().feed(b"".join(refused))}
    metrics = backup.node.metrics.registry
    assert metrics.get_sample_value("tokenvault_peer_messages_dropped_total",
                                    {"peer": primary.node_id}) == len(refused)
    monkeypatch.undo()  # the link takes frames again: the same request goes through
    outcome = await backup.service.tokenize("p", ["refused-by-a-full-link"], None)
    assert outcome.status == 200 and not outcome.replayed


HOSTILE_FORWARDS = {
    "not-msgpack": ("tokenize", b"\xc1\xc1"),
    "not-a-map": ("tokenize", msgpack.packb(["values"])),
    "missing-fields": ("tokenize", msgpack.packb({"values": ["x"]})),
    "values-not-strings": ("tokenize", msgpack.packb({"principal": "p", "values": [1, b"x"], "idempotency_key": None})),
    "no-values": ("tokenize", msgpack.packb({"principal": "p", "values": [], "idempotency_key": None})),
    "key-not-a-string": ("tokenize", msgpack.packb({"principal": "p", "values": ["x"], "idempotency_key": 5})),
    "invalid-utf8": ("tokenize", b"\x81\xa6values\x91\xa2\xff\xfe"),
    "bad-token": ("detokenize", msgpack.packb({"tokens": ["not-a-token"]})),
    "unknown-kind": ("drop-tables", msgpack.packb({})),
    # Audit records only in the sending peer's own name (serve_forward sends as "n9"), and well-formed.
    "audit-in-another-nodes-name": ("audit", msgpack.packb(
        {"records": [[1, "n1", "reader", None, "detokenize", 1, 1, "r", None]]})),
    "audit-found-above-items": ("audit", msgpack.packb(
        {"records": [[1, "n9", "reader", None, "detokenize", 1, 2, "r", None]]})),
    "audit-short-record": ("audit", msgpack.packb({"records": [[1, "n9", "reader"]]})),
    "audit-not-a-list": ("audit", msgpack.packb({"records": "all of them"})),
    "key-unknown-scope": ("key.create", msgpack.packb(
        {"name": "ci", "scopes": ["root"], "actor": ["admin", None, "n9", "r"]})),
    "key-bad-name": ("key.create", msgpack.packb(
        {"name": "a b", "scopes": ["tokenize"], "actor": ["admin", None, "n9", "r"]})),
    "key-bad-actor": ("key.create", msgpack.packb({"name": "ci", "scopes": ["tokenize"], "actor": "admin"})),
    "revoke-bad-id": ("key.revoke", msgpack.packb({"key_id": "../../x", "actor": ["admin", None, "n9", "r"]})),
}


async def serve_forward(running: RunningNode, request: ForwardRequest) -> ForwardResponse:
    """Hand a forwarded request to the node as the transport would, and catch the answer it sends."""
    answers: list[tuple[str, object]] = []
    original = running.node.send_to_peer

    def capture(peer_id: str, message: object) -> bool:
        if isinstance(message, ForwardResponse):
            answers.append((peer_id, message))
            return True
        return original(peer_id, message)  # replication traffic goes on as usual
    running.node.send_to_peer = capture
    try:
        running.node.forward_handler("n9", request)
        await wait_until(lambda: answers, 5, "the forwarded request's answer")
    finally:
        running.node.send_to_peer = original
    ((peer_id, response),) = answers
    assert peer_id == "n9" and isinstance(response, ForwardResponse) and response.request_id == request.request_id
    return response


@pytest.mark.parametrize("bound", ["requests", "bytes"])
async def test_the_primary_serves_forwarded_requests_within_a_count_and_a_byte_bound(
        trio: Cluster, monkeypatch: pytest.MonkeyPatch, bound: str) -> None:
    """docs/security.md, forwarded requests: past MAX_FORWARDS_SERVED requests, or past the bytes of
    max_inflight_requests bodies of max_body_bytes, a forwarded request is answered 503 overloaded at
    once with no effect; once those served are done, the same request is served."""
    primary = trio.primaries()[0]
    answers: dict[int, ForwardResponse] = {}
    original = primary.node.send_to_peer

    def capture(peer_id: str, message: object) -> bool:
        if isinstance(message, ForwardResponse):
            answers[message.request_id] = message
            return True
        return original(peer_id, message)
    monkeypatch.setattr(primary.node, "send_to_peer", capture)
    gate = ProposalGate(primary.node, lambda command: isinstance(command, commands.TokenizeCommand)
                        and (command.idempotency_key or "").startswith("held"))

    def request(request_id: int, key: str) -> ForwardRequest:
        arguments = msgpack.packb({"principal": "p", "values": [f"bounded-{key}"], "idempotency_key": key})
        return ForwardRequest(request_id=request_id, kind="tokenize", body=arguments)
    first, second, third = request(1, "held-1"), request(2, "held-2"), request(3, "late-3")
    if bound == "requests":
        monkeypatch.setattr(service_module, "MAX_FORWARDS_SERVED", 2)
    else:  # room for the first two bodies and not one byte more
        monkeypatch.setattr(primary.service, "_max_forward_bytes_served", len(first.body) + len(second.body))
    try:
        primary.node.forward_handler("n2", first)
        primary.node.forward_handler("n2", second)
        await wait_until(lambda: len(gate.proposed) >= 2, 5, "both held requests to reach the proposal")
        applied = primary.node.store.applied_index
        primary.node.forward_handler("n2", third)
        await wait_until(lambda: 3 in answers, 5, "the refused request's answer")
        refused = answers.pop(3)
        assert refused.status == 503 and json.loads(refused.body)["type"] == problem_type(Overloaded.problem)
        assert dict(refused.headers).get("Retry-After")
        assert primary.node.store.applied_index == applied and 1 not in answers and 2 not in answers
    finally:
        gate.remove()
    # Why the served set too: an answer is sent before its task ends, and the task leaves the count in a
    # done callback of the loop's next turn; asked in between, the node was still serving two (a 503 once,
    # on a loaded machine).
    await wait_until(lambda: {1, 2} <= set(answers) and not primary.service._forward_tasks, 10,
                     "the held requests' answers, and their tasks to end")
    assert answers[1].status == answers[2].status == 200
    primary.node.forward_handler("n2", third)  # nothing is being served now: the same request goes through
    await wait_until(lambda: 3 in answers, 10, "the late request's answer")
    assert answers[3].status == 200 and primary.service._forward_bytes_served == 0


async def test_a_malformed_forwarded_request_is_answered_400_and_changes_nothing(trio: Cluster) -> None:
    # One cluster for every case: each case is independent and a cluster start costs more than all of them.
    primary = trio.primaries()[0]
    for request_id, (name, (kind, payload)) in enumerate(HOSTILE_FORWARDS.items()):
        applied, tokens = primary.node.store.applied_index, primary.node.store.token_count()
        response = await serve_forward(primary, ForwardRequest(request_id=request_id, kind=kind, body=payload))
        assert response.status == 400, name
        problem = json.loads(response.body)
        assert problem["status"] == 400 and set(problem) == {"type", "title", "status", "detail"}, name
        # The same problem as a client's invalid request over HTTP, however the body failed.
        assert (problem["type"], problem["title"]) == (problem_type(InvalidRequest.problem), InvalidRequest.title), name
        assert primary.node.store.token_count() == tokens and primary.node.store.applied_index == applied, name
    # The node goes on serving.
    assert body(await primary.service.tokenize("p", ["after-garbage"], None))["epoch"] == 1


async def test_forwarded_requests_answered_by_the_primary_and_refused_by_a_backup(trio: Cluster) -> None:
    primary = trio.primaries()[0]
    arguments = msgpack.packb({"principal": "p", "values": ["forwarded"], "idempotency_key": None})
    response = await serve_forward(primary, ForwardRequest(request_id=1, kind="tokenize", body=arguments))
    assert response.status == 200 and json.loads(response.body)["epoch"] == 1
    token = json.loads(response.body)["tokens"][0]
    lookup = msgpack.packb({"tokens": [token]})
    response = await serve_forward(primary, ForwardRequest(request_id=2, kind="detokenize", body=lookup))
    assert response.status == 200 and msgpack.unpackb(response.body) == {token: "forwarded"}
    # A backup never forwards a forwarded request again (no loops): it answers 503.
    backup = trio.backups()[0]
    response = await serve_forward(backup, ForwardRequest(request_id=3, kind="tokenize", body=arguments))
    assert response.status == 503 and dict(response.headers).get("Retry-After")


@pytest.mark.parametrize(("kind", "answer"), [
    ("detokenize", msgpack.packb([[]] * 60_000)),  # nested empty lists: ~64 bytes of memory a byte, unbounded
    ("detokenize", msgpack.packb({"tv1_a": 7})),
    ("detokenize", msgpack.packb(["tv1_a", "value"])),
    ("detokenize", b"\xc1"),
    ("reveal", msgpack.packb({"tv1_a": ["value"]})),
    ("reveal", msgpack.packb({"tv1_a": "value"})),
    ("epochs", b"{not json"),
    ("epochs", b"[" * 100_000),  # json raises RecursionError, not ValueError, for this
])
def test_a_forwarded_answer_that_does_not_decode_to_its_shape_is_a_503_with_no_effect(kind: str, answer: bytes) -> None:
    """The primary's answer to a forwarded read is decoded with bounds and checked in shape: anything else is
    a 503 whose request had no effect (a read), never a 500 from deep in the caller."""
    with pytest.raises(Unavailable, match="could not be read") as raised:
        service_module._decode_forward_response(kind, ForwardResponse(request_id=1, status=200, body=answer,
                                                                      headers=()))
    assert raised.value.no_effect


@pytest.mark.parametrize("status", [0, 99, 101, 199, 204, 304, 600, 2**40, 2**63 - 1])
def test_a_forwarded_answer_of_a_status_out_of_range_is_a_503_whose_outcome_is_unknown(status: int) -> None:
    """A ForwardResponse's status is any integer the codec decodes: one no HTTP answer of a body has was
    passed on as the request's answer (or into the error classes), a status line no client reads. Only a
    broken primary sends one, and what it did is unknown: a 503 that does not say the request had no effect."""
    for kind in ("tokenize", "detokenize", "epochs"):
        with pytest.raises(Unavailable, match="no answer of this request has") as raised:
            service_module._decode_forward_response(kind, ForwardResponse(request_id=1, status=status,
                                                                          body=b"{}", headers=()))
        assert not raised.value.no_effect


def test_a_forwarded_retokenize_whose_answer_does_not_decode_is_a_503_whose_effect_is_unknown() -> None:
    """A re-tokenize is a write the primary ran before it answered: an answer the backup cannot read says
    nothing of whether its tokens were issued, so it is not "no effect" as an unreadable read's answer is
    (it was, checked on the code before)."""
    with pytest.raises(Unavailable, match="could not be read") as raised:
        service_module._decode_forward_response(RETOKENIZE, ForwardResponse(request_id=1, status=200,
                                                                             body=b"{not json", headers=()))
    assert not raised.value.no_effect
    assert json.loads(problem_body_of(raised.value))["effect"] == "unknown"


def test_the_largest_forwarded_lookup_answers_decode() -> None:
    tokens = [f"tv1_{number:032d}" for number in range(service_module.commands.MAX_ITEMS)]
    detokenized = {token: "v" * 8 for token in tokens} | {tokens[0]: None}
    revealed = {token: ["v" * 8, '{"a":1}'] for token in tokens} | {tokens[0]: None, tokens[1]: ["v", None]}
    for kind, document in (("detokenize", detokenized), ("reveal", revealed)):
        answer = ForwardResponse(request_id=1, status=200, body=msgpack.packb(document), headers=())
        assert service_module._decode_forward_response(kind, answer) == document


async def test_a_forward_takes_its_answer_only_from_the_primary_it_asked(trio: Cluster) -> None:
    primary = trio.primaries()[0]
    asking, other = trio.backups()
    gate = ProposalGate(primary.node, is_tokenize("p", "asked"))
    try:
        waiting = asyncio.create_task(asking.service.tokenize("p", ["asked-value"], "asked"))
        await asyncio.wait_for(gate.waiting.wait(), 5)
        forged = json.dumps({"epoch": 1, "tokens": ["tv1_" + "e" * 32]}).encode()
        for request_id in range(1, 50):  # whatever id the forward carries, a reply from another peer is ignored
            asking.node.forward_response_handler(
                other.node_id, ForwardResponse(request_id=request_id, status=200, body=forged, headers=()))
        asking.node.peer_down_handler(other.node_id)  # a link to a peer that was not asked
        await asyncio.sleep(0)
        assert not waiting.done()
        gate.open()
        outcome = await asyncio.wait_for(waiting, 5)
    finally:
        gate.remove()
    assert outcome.status == 200 and outcome.body != forged
    assert await primary.service.detokenize(body(outcome)["tokens"]) == ["asked-value"]


async def test_the_largest_allowed_request_is_forwarded_replicated_and_read_back(trio: Cluster) -> None:
    """1000 values of 4096 bytes (the default limits) cross the peer link, one log entry and every store."""
    values = [f"{position:04d}" + "v" * 4092 for position in range(1000)]
    entry, reader = trio.backups()[0], trio.backups()[1]
    outcome = await entry.service.tokenize("p", values, "largest")
    tokens = body(outcome)["tokens"]
    assert outcome.status == 200 and len(tokens) == 1000 and len(set(tokens)) == 1000
    assert await reader.service.detokenize(tokens) == values
    replay = await reader.service.tokenize("p", values, "largest")
    assert replay.replayed and replay.body == outcome.body


async def test_a_write_in_the_log_when_the_node_stops_is_answered_outcome_unknown(single: RunningNode) -> None:
    """Stopping answers 503 "may still take effect" for a proposed write: it must not be retried elsewhere."""
    release = asyncio.Event()
    real_handle_ready = single.node._handle_ready

    async def held_handle_ready(ready) -> None:  # the entry is in the log, but not yet written and synced
        await release.wait()
        await real_handle_ready(ready)

    single.node._handle_ready = held_handle_ready  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(single.service.tokenize("p", ["stopping-value"], None))
        await wait_until(lambda: bool(single.node._pending_proposals), 5, "the write to be proposed")
        single.node.abort_requests()
        with pytest.raises(Unavailable) as raised:
            await asyncio.wait_for(task, 5)
        assert "may still take effect" in raised.value.detail
    finally:
        release.set()
        single.node._handle_ready = real_handle_ready  # type: ignore[method-assign]


def _forward_cases(limits) -> dict[str, tuple[str, bytes, int]]:
    """Requests a backup could forward that the HTTP layer would refuse, with the status HTTP gives them."""
    def packed(document: object) -> bytes:
        return msgpack.packb(document, use_bin_type=True)

    def tokenize(**changes: object) -> bytes:
        return packed({"principal": "p", "values": ["x"], "idempotency_key": None, **changes})

    token = "tv1_" + "a" * 32
    return {
        "too-many-values": ("tokenize", tokenize(values=["v"] * (limits.max_items + 1)), 413),
        "value-too-long": ("tokenize", tokenize(values=["x" * (limits.max_value_bytes + 1)]), 400),
        "empty-value": ("tokenize", tokenize(values=["ok", ""]), 400),
        "principal-not-a-name": ("tokenize", tokenize(principal="not a name\n"), 400),
        "idempotency-key-not-printable": ("tokenize", tokenize(idempotency_key="\x00bad"), 400),
        "idempotency-key-too-long": ("tokenize", tokenize(idempotency_key="k" * 256), 400),
        "extra-member": ("tokenize", packed({"principal": "p", "values": ["x"], "idempotency_key": None,
                                             "epoch": 9}), 400),
        "rotate-principal-not-a-string": ("rotate", packed({"principal": 7, "idempotency_key": None}), 400),
        "too-many-tokens": ("detokenize", packed({"tokens": [token] * (limits.max_items + 1)}), 413),
        "no-tokens": ("detokenize", packed({"tokens": []}), 400),
        "body-larger-than-any-allowed-request": (
            "tokenize", tokenize(values=["v" * 1000] * (limits.max_items * (limits.max_value_bytes + 8) // 1000 + 8)),
            413),
    }


async def test_forwarded_requests_are_held_to_the_http_limits_by_the_primary(trio: Cluster) -> None:
    """A backup's forwarded request gets the same item, size and value checks as an HTTP request."""
    primary = trio.primaries()[0]
    cases = _forward_cases(primary.node.config.limits)
    for request_id, (name, (kind, payload, status)) in enumerate(cases.items(), start=100):
        applied, tokens = primary.node.store.applied_index, primary.node.store.token_count()
        response = await serve_forward(primary, ForwardRequest(request_id=request_id, kind=kind, body=payload))
        assert response.status == status, (name, response.status, response.body[:200])
        problem = json.loads(response.body)
        assert problem["status"] == status and set(problem) == {"type", "title", "status", "detail"}, name
        assert primary.node.store.token_count() == tokens and primary.node.store.applied_index == applied, name
    # At the limits exactly, the same request is accepted.
    limits = primary.node.config.limits
    largest = msgpack.packb({"principal": "p", "values": ["w" * limits.max_value_bytes] * 2,
                             "idempotency_key": "k" * 255}, use_bin_type=True)
    response = await serve_forward(primary, ForwardRequest(request_id=1, kind="tokenize", body=largest))
    assert response.status == 200, response.body[:200]


# --------------------------------------------------------------------------- sealed by an HTTP worker

def worker_seal(running: RunningNode, values: list[str], epoch: int | None = None) -> tuple[int, list]:
    """What an HTTP worker sends: the values sealed with the epoch keys the core pushed it."""
    epoch = epoch or running.node.store.active_epoch()
    keys = running.node.keyring.get(epoch)
    return epoch, [tuple(pair) for pair in keys.seal_many(values)]


async def test_a_worker_sealed_tokenize_is_the_same_tokenize_and_its_repeat_is_a_read(single: RunningNode) -> None:
    service = single.service
    epoch, items = worker_seal(single, ["w-one", "w-two"])
    first = body(await service.tokenize_sealed("p", epoch, ["w-one", "w-two"], items))
    assert first == {"epoch": epoch, "tokens": [token for token, _ in items]}
    assert body(await service.tokenize("p", ["w-one", "w-two"], None)) == first
    last_index = single.node.replica.last_index
    assert body(await service.tokenize_sealed("p", epoch, ["w-one", "w-two"], items)) == first
    assert single.node.replica.last_index == last_index  # answered as a read: no entry
    assert await service.detokenize(first["tokens"]) == ["w-one", "w-two"]


async def test_a_worker_sealed_tokenize_in_an_old_epoch_is_refused_with_epoch_changed(single: RunningNode) -> None:
    service = single.service
    epoch, items = worker_seal(single, ["stale"])
    await service.rotate_epoch("p", None)
    last_index = single.node.replica.last_index
    with pytest.raises(EpochChanged):
        await service.tokenize_sealed("p", epoch, ["stale"], items)
    assert single.node.replica.last_index == last_index


async def test_a_worker_sealed_tokenize_whose_first_value_does_not_match_is_refused(single: RunningNode) -> None:
    service = single.service
    epoch, items = worker_seal(single, ["real", "other"])
    forged = [items[1], items[1]]  # the first pair is not the first value's
    last_index = single.node.replica.last_index
    with pytest.raises(Unavailable):
        await service.tokenize_sealed("p", epoch, ["real", "other"], forged)
    assert single.node.replica.last_index == last_index
    assert single.node.store.lookup([items[0][0]]) == {}


async def test_a_worker_sealed_tokenize_on_a_backup_answers_repeats_and_forwards_new_values(trio: Cluster) -> None:
    backup = trio.backups()[0]
    primary = trio.primaries()[0]
    epoch, items = worker_seal(backup, ["fresh-on-backup", "second"])
    sealed_before = (sealed_count(primary, "node"), sealed_count(primary, "helper"), sealed_count(primary, "worker"))
    first = body(await backup.service.tokenize_sealed("p", epoch, ["fresh-on-backup", "second"], items))
    assert first["tokens"] == [items[0][0], items[1][0]]
    # Forwarded with its pairs: the primary checked the first value and took the worker's pairs,
    # sealing none of the values itself.
    assert (sealed_count(primary, "node"), sealed_count(primary, "helper"), sealed_count(primary, "worker")) == \
        (sealed_before[0], sealed_before[1], sealed_before[2] + 2)
    # A forwarded pair that does not match its value is refused by the primary too, and nothing is stored.
    _, other = worker_seal(backup, ["third"])
    forged = msgpack.packb({"principal": "p", "epoch": epoch, "values": ["not-third"], "items": [list(other[0])]})
    answer = await serve_forward(primary, ForwardRequest(request_id=77, kind="tokenize.sealed", body=forged))
    assert answer.status == 503
    assert primary.node.store.lookup([other[0][0]]) == {}
    malformed = msgpack.packb({"principal": "p", "epoch": epoch, "values": ["third"], "items": [[other[0][0]]]})
    assert (await serve_forward(primary, ForwardRequest(request_id=78, kind="tokenize.sealed", body=malformed))).status == 400
    items = items[:1]
    last_index = primary.node.replica.last_index
    await wait_until(lambda: backup.node.store.lookup([items[0][0]]) != {}, 5, "the backup to apply the token")
    assert body(await backup.service.tokenize_sealed("p", epoch, ["fresh-on-backup"], items))["tokens"] == \
        first["tokens"][:1]
    assert primary.node.replica.last_index == last_index


# --------------------------------------------------------------------------- sealed by a worker: formats and options

CARDS = ["4111 1111 1111 1111", "5500-0000-0000-0004"]


def sealed_count(running: RunningNode, where: str) -> float:
    return running.node.metrics.registry.get_sample_value("tokenvault_sealed_values_total", {"where": where}) or 0


async def worker_of(running: RunningNode) -> tuple[RemoteService, CoreCalls, list[Channel]]:
    """A RemoteService connected to this node's CoreCalls over a real channel, holding the active
    epoch's keys as the core pushes them (what a worker process has; no later push reaches it)."""
    calls = CoreCalls(running.service, running.node.metrics, lambda: [], max_backup_streams=1)
    remote = RemoteService(running.node.node_id)
    core_socket, worker_socket = socket.socketpair()
    core_reader, core_writer = await asyncio.open_unix_connection(sock=core_socket)
    worker_reader, worker_writer = await asyncio.open_unix_connection(sock=worker_socket)
    core = Channel(core_reader, core_writer, handlers=calls.handlers, max_frame_bytes=1 << 22, name="core").start()
    worker = Channel(worker_reader, worker_writer, handlers={}, on_push=remote.on_push,
                     max_frame_bytes=1 << 22, name="worker").start()
    remote.channel = worker
    core.push(EPOCH_TOPIC, calls.active_epoch_keys())
    await wait_until(lambda: remote._epoch_keys is not None, 5, "the epoch keys to reach the worker")
    return remote, calls, [core, worker]


def format_seal(running: RunningNode, token_format: str, values: list[str], metadata_json: str | None = None,
                epoch: int | None = None) -> tuple[int, list, list | None]:
    """What a worker sends for a card or digits request: normalized values sealed in the format."""
    epoch = epoch or running.node.store.active_epoch()
    keys = running.node.keyring.get(epoch)
    items = [keys.seal_format(token_format, formats.normalize(token_format, value)) for value in values]
    metadata = None
    if metadata_json is not None:
        metadata = [keys.encrypt_metadata(token, metadata_json.encode()) for token, _ in items]
    return epoch, items, metadata


async def test_a_worker_sealed_card_tokenize_is_the_core_sealed_tokenize_and_its_repeat_is_a_read(
        single: RunningNode) -> None:
    service, replica = single.service, single.node.replica
    remote, _, channels = await worker_of(single)
    entries, node_sealed = service._coalescer.entries_proposed, sealed_count(single, "node")
    first = body(await remote.tokenize("p", CARDS, None, "card"))
    digits = body(await remote.tokenize("p", ["0012345678"], None, "digits"))
    assert sealed_count(single, "worker") == 3 and sealed_count(single, "node") == node_sealed
    # Its own entry, not merged with opaque requests.
    assert service._coalescer.entries_proposed == entries
    last_index, reads = replica.last_index, tokenize_reads(single)
    # The core computes the same tokens itself (and answers them as a read: nothing new).
    assert body(await service.tokenize("p", CARDS, None, "card")) == first
    assert body(await service.tokenize("p", ["0012345678"], None, "digits")) == digits
    assert all(len(token) == 16 and token.isdigit() for token in first["tokens"])
    # The worker's repeat is a read too: no entry, nothing sealed by the core.
    assert body(await remote.tokenize("q", CARDS[::-1], None, "card")) == {
        "epoch": first["epoch"], "tokens": first["tokens"][::-1]}
    assert replica.last_index == last_index and tokenize_reads(single) == reads + 5
    assert sealed_count(single, "node") == node_sealed
    assert (await service.reveal(first["tokens"], None, first["epoch"]))["values"] == [
        "4111111111111111", "5500000000000004"]
    # A value that does not fit the format is the core's own 422, naming its position.
    with pytest.raises(UnprocessableValue, match=r"values\[1\]"):
        await remote.tokenize("p", ["4111111111111111", "4111111111111112"], None, "card")
    for channel in channels:
        await channel.close()


async def test_a_worker_sealed_tokenize_with_ttl_and_metadata_takes_its_expiry_from_the_core(
        single: RunningNode) -> None:
    service = single.service
    remote, _, channels = await worker_of(single)
    proposed: list[commands.Command] = []
    original = single.node.propose

    async def recording(payload: bytes, timeout_seconds: float):  # what the service and its group commit propose
        proposed.append(commands.decode_command(payload))
        return await original(payload, timeout_seconds)
    single.node.propose = recording
    before_ms = int(time.time() * 1000)
    card = body(await remote.tokenize("p", ["4111111111111111"], None, "card", '{"k":"v"}', 60))
    opaque = body(await remote.tokenize("p", ["ttl-opaque"], None, "opaque", None, 30))
    after_ms = int(time.time() * 1000)
    assert sealed_count(single, "worker") == 2 and sealed_count(single, "node") == 0
    first, second = proposed
    assert first.token_format == "card" and first.items[0][0] == card["tokens"][0]
    assert before_ms + 60_000 <= first.expires_at_ms == first.issued_at_ms + 60_000 <= after_ms + 60_000
    assert second.token_format == "opaque" and second.expires_at_ms == second.issued_at_ms + 30_000
    assert second.metadata is None
    answer = await service.reveal(card["tokens"], None, card["epoch"], True, False)
    assert answer == {"values": ["4111111111111111"], "metadata_json": ['{"k":"v"}']}
    assert await service.detokenize(opaque["tokens"]) == ["ttl-opaque"]
    # A request with a TTL or metadata is never answered as a read: it renews the mapping.
    proposed.clear()
    assert body(await remote.tokenize("p", ["4111111111111111"], None, "card", None, 120)) == card
    assert len(proposed) == 1 and proposed[0].expires_at_ms == proposed[0].issued_at_ms + 120_000
    for channel in channels:
        await channel.close()


async def test_a_worker_that_sealed_a_card_in_an_old_epoch_falls_back_to_the_core(single: RunningNode) -> None:
    service = single.service
    remote, _, channels = await worker_of(single)
    old_epoch = single.node.store.active_epoch()
    await service.rotate_epoch("p", None)  # the worker is not told: its keys are the old epoch's
    last_index = single.node.replica.last_index
    epoch, items, _ = format_seal(single, "card", CARDS, epoch=old_epoch)
    with pytest.raises(EpochChanged):
        await service.tokenize_sealed("p", epoch, CARDS, items, TokenizeOptions("card"))
    assert single.node.replica.last_index == last_index
    answer = body(await remote.tokenize("p", CARDS, None, "card"))
    assert answer["epoch"] == old_epoch + 1 and sealed_count(single, "worker") == 0
    assert body(await service.tokenize("p", CARDS, None, "card")) == answer
    for channel in channels:
        await channel.close()


async def test_a_tampered_worker_sealed_card_or_metadata_is_refused_and_nothing_is_stored(
        single: RunningNode) -> None:
    service = single.service
    epoch, items, metadata = format_seal(single, "card", CARDS, '{"k":"v"}')
    options = TokenizeOptions("card", '{"k":"v"}')
    other_epoch, other_items, other_metadata = format_seal(single, "card", CARDS, '{"k":"w"}')
    last_index = single.node.replica.last_index
    forged_token = [(items[1][0], items[0][1]), items[1]]
    digits_sealed = format_seal(single, "digits", ["4111111111111111", "5500000000000004"])[1]
    for forged_items, forged_metadata in ((forged_token, metadata), (other_items[::-1], metadata),
                                          (items, other_metadata), (items, None), (digits_sealed, metadata)):
        with pytest.raises(Unavailable, match="sealed inconsistently"):
            await service.tokenize_sealed("p", epoch, CARDS, forged_items, options, forged_metadata)
    with pytest.raises(Unavailable, match="sealed inconsistently"):  # card pairs sent as digits
        await service.tokenize_sealed("p", epoch, ["4111111111111111", "5500000000000004"], items,
                                      TokenizeOptions("digits"))
    assert single.node.replica.last_index == last_index
    assert single.node.store.lookup_format(epoch, [token for token, _ in items + digits_sealed]) == {}


async def test_a_worker_sealed_card_whose_token_another_format_holds_answers_as_the_core_does(
        single: RunningNode) -> None:
    service = single.service
    epoch = single.node.store.active_epoch()
    keys = single.node.keyring.get(epoch)
    (card_token,) = body(await service.tokenize("p", ["4111111111111111"], None, "card"))["tokens"]
    # The digits value whose digits token is that card token (FF1 is a permutation).
    value = numerals_to_digits(keys.formats._ff1.decrypt(digits_to_numerals(card_token), b"digits"))
    assert keys.formats.digits_token(value) == card_token
    last_index = single.node.replica.last_index
    with pytest.raises(TokenCollision) as core_sealed:
        await service.tokenize("p", ["000000", value], None, "digits")
    _, items, _ = format_seal(single, "digits", ["000000", value])
    with pytest.raises(TokenCollision) as worker_sealed:
        await service.tokenize_sealed("p", epoch, ["000000", value], items, TokenizeOptions("digits"))
    assert worker_sealed.value.detail == core_sealed.value.detail
    assert single.node.replica.last_index == last_index + 2  # both entries refused whole at apply
    assert single.node.store.lookup_format(epoch, [items[0][0]]) == {}
    assert (await service.reveal([card_token], None, epoch))["values"] == ["4111111111111111"]


async def test_a_worker_sealed_card_on_a_backup_answers_repeats_and_forwards_new_values(trio: Cluster) -> None:
    backup, primary = trio.backups()[0], trio.primaries()[0]
    epoch, items, _ = format_seal(backup, "card", CARDS)
    first = body(await backup.service.tokenize_sealed("p", epoch, CARDS, items, TokenizeOptions("card")))
    assert first == {"epoch": epoch, "tokens": [token for token, _ in items]}
    await wait_until(lambda: len(backup.node.store.lookup_format(epoch, first["tokens"])) == 2, 5,
                     "the backup to apply the tokens")
    last_index = primary.node.replica.last_index
    assert body(await backup.service.tokenize_sealed("p", epoch, CARDS, items, TokenizeOptions("card"))) == first
    assert primary.node.replica.last_index == last_index


def bad_sealed_tokenizes(good: dict) -> list[dict]:
    """A good sealed card tokenize with metadata (``good``), each member made wrong in turn."""
    metadata, items = good["metadata"], good["items"]
    return [
        {key: value for key, value in good.items() if key != "metadata"},
        {**good, "extra": 1},
        {**good, "token_format": "cards"},
        {**good, "ttl_seconds": "5"},
        {**good, "metadata_json": '{"b":1, "a":2}'},
        {**good, "metadata": None},
        {**good, "metadata": [metadata[0], metadata[0]]},
        {**good, "metadata": ["text"]},
        {**good, "metadata_json": None},
        {**good, "items": [["tv1_notdigits", items[0][1]]]},
        {**good, "items": [[items[0][0], "not bytes"]]},
        {**good, "epoch": 0},
    ]


async def test_a_backup_forwards_a_worker_sealed_card_ttl_and_metadata_tokenize_with_its_pairs(
        trio: Cluster) -> None:
    """A tokenize with a format, a TTL or metadata that a backup's worker sealed goes to the primary with
    its pairs and metadata ciphertexts (``tokenize.sealed.v2``): the primary checks the first value as a
    worker's and seals none itself; the mapping has the request's metadata and expiry. A forged or
    malformed forward is refused (503 / 400 or 422) and stores nothing."""
    backup, primary = trio.backups()[0], trio.primaries()[0]
    epoch, items, metadata = format_seal(backup, "card", CARDS, '{"k":"v"}')
    sealed_before = (sealed_count(primary, "node"), sealed_count(primary, "worker"))
    before_ms = int(time.time() * 1000)
    options = TokenizeOptions("card", '{"k":"v"}', 60)
    first = body(await backup.service.tokenize_sealed("p", epoch, CARDS, items, options, metadata))
    assert first == {"epoch": epoch, "tokens": [token for token, _ in items]}
    assert (sealed_count(primary, "node"), sealed_count(primary, "worker")) == (sealed_before[0], sealed_before[1] + 2)
    revealed = await primary.service.reveal(first["tokens"], None, epoch, True, False)
    assert revealed == {"values": ["4111111111111111", "5500000000000004"], "metadata_json": ['{"k":"v"}'] * 2}
    (expires_at_ms,) = {expiry for expiry, _ in primary.node.store.lives(epoch, first["tokens"]).values()}
    assert before_ms + 60_000 <= expires_at_ms <= int(time.time() * 1000) + 60_000
    # An opaque TTL request likewise (it joins the primary's group commit).
    opaque_items = worker_seal(backup, ["ttl-on-backup"])[1]
    worker_before = sealed_count(primary, "worker")
    answer = await backup.service.tokenize_sealed("p", epoch, ["ttl-on-backup"], opaque_items,
                                                  TokenizeOptions("opaque", None, 30))
    assert body(answer)["tokens"] == [opaque_items[0][0]]
    assert sealed_count(primary, "worker") == worker_before + 1
    # Forged (the first pair is not its value's) or malformed: refused by the primary, nothing stored.
    _, other, other_metadata = format_seal(backup, "card", ["4000000000000002"], '{"k":"v"}')
    good = {"principal": "p", "epoch": epoch, "values": ["4000000000000002"], "items": [list(other[0])],
            "token_format": "card", "metadata_json": '{"k":"v"}', "ttl_seconds": None, "metadata": other_metadata}
    forged = msgpack.packb({**good, "values": ["4000000000000010"]}, use_bin_type=True)
    answer = await serve_forward(primary, ForwardRequest(request_id=79, kind="tokenize.sealed.v2", body=forged))
    assert answer.status == 503
    assert primary.node.store.lookup_format(epoch, [other[0][0]]) == {}
    for number, arguments in enumerate(bad_sealed_tokenizes(good)):
        request = ForwardRequest(request_id=80 + number, kind="tokenize.sealed.v2",
                                 body=msgpack.packb(arguments, use_bin_type=True))
        assert (await serve_forward(primary, request)).status in (400, 422), arguments
    assert primary.node.store.lookup_format(epoch, [other[0][0]]) == {}


async def test_core_calls_check_every_argument_of_a_sealed_tokenize(single: RunningNode) -> None:
    calls = CoreCalls(single.service, single.node.metrics, lambda: [], max_backup_streams=1)
    epoch, items, metadata = format_seal(single, "card", ["4111111111111111"], '{"k":"v"}')
    good = {"principal": "p", "epoch": epoch, "values": ["4111111111111111"], "items": [list(items[0])],
            "token_format": "card", "metadata_json": '{"k":"v"}', "ttl_seconds": None, "metadata": metadata}
    last_index = single.node.replica.last_index
    bad = bad_sealed_tokenizes(good)
    for arguments in bad:
        with pytest.raises((InvalidRequest, UnprocessableValue)):
            await calls.handlers["tokenize_sealed"](arguments)
    assert single.node.replica.last_index == last_index
    assert body(await calls.handlers["tokenize_sealed"](good))["tokens"] == [items[0][0]]


# ------------------------------------------------------------------ membership


async def test_a_member_removed_through_a_backup_is_gone_everywhere_and_the_rest_still_commit(trio: Cluster) -> None:
    """The change is forwarded to the primary, answered once committed, and the two voters left
    make the majority; a second removal of the same node is refused with 409 and no Retry-After."""
    primary, backup = trio.primaries()[0], trio.backups()[0]
    removed = next(running for running in trio.backups() if running is not backup)
    outcome = await backup.service.change_member("remove", removed.node.node_id, None)
    assert outcome.status == 200
    assert body(outcome)["voters"] == sorted([primary.node.node_id, backup.node.node_id])
    listed = await backup.service.list_members()
    assert listed["committed"] and removed.node.node_id not in [member["id"] for member in listed["members"]]
    await removed.node.close()
    tokens = body(await backup.service.tokenize("p", ["after-the-removal"], None))["tokens"]
    assert await primary.service.detokenize(tokens) == ["after-the-removal"]
    with pytest.raises(MembershipChangeRefused) as refused:
        await primary.service.change_member("remove", removed.node.node_id, None)
    assert "Retry-After" not in refused.value.headers


async def test_the_member_list_says_at_which_entry_each_member_was_added(trio: Cluster) -> None:
    """docs/api.md, GET /v1/admin/members: ``added_at_index``, the log index of the configuration entry that
    added the member (0 for the bootstrap members); an id removed and added again has a later one."""
    primary, backup = trio.primaries()[0], trio.backups()[0]

    def added_at(listed: dict[str, Any]) -> dict[str, int]:
        return {member["id"]: member["added_at_index"] for member in listed["members"]}

    first = body(await primary.service.change_member("add", "n9", "127.0.0.1:9"))["configuration_index"]
    assert added_at(await backup.service.list_members()) == {"n1": 0, "n2": 0, "n3": 0, "n9": first}
    await primary.service.change_member("remove", "n9", None)
    again = body(await primary.service.change_member("add", "n9", "127.0.0.1:9"))["configuration_index"]
    assert again > first and added_at(await backup.service.list_members())["n9"] == again


async def test_promoting_a_learner_that_is_not_running_is_refused_with_retry_after(trio: Cluster) -> None:
    primary = trio.primaries()[0]
    added = await primary.service.change_member("add", "n9", "127.0.0.1:9")
    assert added.status == 201 and body(added)["learners"] == ["n9"]
    with pytest.raises(MembershipChangeRefused) as refused:
        await primary.service.change_member("promote", "n9", None)
    assert "has not caught up" in refused.value.detail and refused.value.headers["Retry-After"] == "1"
    tokens = body(await primary.service.tokenize("p", ["a-learner-never-counts"], None))["tokens"]
    assert tokens  # two voters of three acknowledge; the dead learner is not waited for


async def test_a_cluster_of_one_refuses_to_add_a_member(single: RunningNode) -> None:
    with pytest.raises(MembershipChangeRefused, match="without peer links"):
        await single.service.change_member("add", "n2", "127.0.0.1:9")
    with pytest.raises(InvalidRequest):
        await single.service.change_member("rename", "n2", None)


@pytest.mark.parametrize("value_bytes", [1, 100, 4096])
def test_a_sealed_forward_a_backup_sends_is_never_over_the_primarys_bound(value_bytes: int) -> None:
    """The backup's choice (pairs or values) and the primary's bound come from one rule: the largest
    allowed request, forwarded with its pairs, is taken; whatever the backup sends sealed fits."""
    from tokenvault.api.service import TOKENIZE_SEALED, _max_forwarded_sealed_bytes, _sealed_forward_bytes
    from tokenvault.api.validation import MAX_METADATA_BYTES
    from tokenvault.config import LimitsConfig

    limits = LimitsConfig()
    values = [f"{number:06d}" + "v" * (value_bytes - 6) if value_bytes > 6 else str(number)
              for number in range(limits.max_items)]
    items = EpochKeys(1, bytes(range(32))).seal_many(values)
    body = msgpack.packb({"principal": "p", "epoch": 1, "values": values,
                          "items": [[token, ciphertext] for token, ciphertext in items]}, use_bin_type=True)
    bound = _max_forwarded_sealed_bytes(limits)
    assert _sealed_forward_bytes(values, items) >= len(body)
    assert _sealed_forward_bytes(values, items) <= bound  # the largest allowed request goes with its pairs
    assert len(body) <= bound and TOKENIZE_SEALED == "tokenize.sealed"
    # With metadata at its largest (a ciphertext per value, the document once): tokenize.sealed.v2.
    keys = EpochKeys(1, bytes(range(32)))
    document = '{"m":"' + "x" * (MAX_METADATA_BYTES - 8) + '"}'
    assert len(document) == MAX_METADATA_BYTES
    metadata = [keys.encrypt_metadata(token, document.encode()) for token, _ in items]
    extended = msgpack.packb({"principal": "p", "epoch": 1, "values": values,
                              "items": [[token, ciphertext] for token, ciphertext in items],
                              "token_format": "opaque", "metadata_json": document, "ttl_seconds": 2**31,
                              "metadata": metadata}, use_bin_type=True)
    bound = _max_forwarded_sealed_bytes(limits, with_metadata=True)
    assert len(extended) <= _sealed_forward_bytes(values, items, document, metadata)
    if value_bytes <= 100:  # the largest such request goes with its pairs, and the primary takes it
        assert _sealed_forward_bytes(values, items, document, metadata) <= bound and len(extended) <= bound
    else:  # over the bound: the backup forwards the values instead
        assert _sealed_forward_bytes(values, items, document, metadata) > bound


async def test_a_retry_after_a_failover_while_the_first_attempt_was_uncommitted_answers_the_first_once(
        trio: Cluster) -> None:
    """docs/guarantees.md, "Idempotency": the first attempt's entry reached one backup but was not
    committed when its primary died; the retry reaches the new primary, which commits that entry: the
    key is applied once (the retry's own entry, if any, writes nothing) and both answers are the first."""
    old = trio.primaries()[0]
    holder, other = trio.backups()
    # The old primary never hears that `holder` has the entry (so never commits it); `other` never gets it.
    old_receive, other_receive = old.node.transport._on_message, other.node.transport._on_message

    def old_deaf_to_holder(sender: str, message: object) -> None:
        if not (sender == holder.node_id and isinstance(message, AppendReply)):
            old_receive(sender, message)

    def other_without_appends(sender: str, message: object) -> None:
        if not (sender == old.node_id and isinstance(message, AppendEntries)):
            other_receive(sender, message)

    old.node.transport._on_message = old_deaf_to_holder
    other.node.transport._on_message = other_without_appends
    commit_before = old.node.replica.commit_index
    first = asyncio.create_task(holder.service.tokenize("p", ["uncommitted-first"], "failover-key"))
    await wait_until(lambda: holder.node.replica.last_index > commit_before
                     and holder.node.replica.last_index == old.node.replica.last_index, 5,
                     "the first attempt's entry on the old primary and on one backup only")
    assert old.node.replica.commit_index == commit_before
    await old.close()
    other.node.transport._on_message = other_receive
    with contextlib.suppress(ServiceError):
        await asyncio.wait_for(first, 10)  # its answer is lost with the primary, or comes from the new one
    new = await trio.wait_for_stable_primary()
    assert new.node_id == holder.node_id  # the only node whose log holds the entry can win
    retried = await retry_until_ok(lambda: other.service.tokenize("p", ["uncommitted-first"], "failover-key"), 5,
                                   "the retry once the new primary serves", (Unavailable,))
    # The new primary committed the first attempt's entry before it served: the retry is its replay.
    assert retried.status == 200 and retried.replayed, retried
    again = await other.service.tokenize("p", ["uncommitted-first"], "failover-key")
    assert again.replayed and again.body == retried.body
    record = new.node.store.idempotency_get("p", "failover-key")
    assert record is not None and record.response == retried.body
    (token,) = body(retried)["tokens"]
    assert await new.service.detokenize([token]) == ["uncommitted-first"]


async def test_a_worker_sealed_tokenize_that_does_not_match_is_logged_as_worker_sealing_mismatch(
        single: RunningNode) -> None:
    """docs/architecture.md: the core re-seals the first value of a worker-sealed tokenize; a difference is
    refused and logged as `worker.sealing_mismatch` (the epoch and the item count, never a value or a
    token), for a plain request and for a card one. A request sealed right logs nothing."""
    service = single.service
    epoch, items = worker_seal(single, ["sealed-right-1", "sealed-right-2"])
    _, forged = worker_seal(single, ["forged-1", "forged-2"])
    _, card_items, _ = format_seal(single, "card", CARDS)
    forged_cards = [(card_items[1][0], card_items[0][1]), card_items[1]]  # the first token is not the first card's
    with capture_logs() as logs:
        await service.tokenize_sealed("p", epoch, ["sealed-right-1", "sealed-right-2"], items)
        await service.tokenize_sealed("p", epoch, CARDS, card_items, TokenizeOptions("card"))
        assert [entry for entry in logs if entry["event"] == "worker.sealing_mismatch"] == []
        with pytest.raises(Unavailable, match="sealed inconsistently"):
            await service.tokenize_sealed("p", epoch, ["forged-1", "forged-2"], [forged[1], forged[1]])
        with pytest.raises(Unavailable, match="sealed inconsistently"):
            await service.tokenize_sealed("p", epoch, CARDS, forged_cards, TokenizeOptions("card"))
    mismatches = [entry for entry in logs if entry["event"] == "worker.sealing_mismatch"]
    assert [(entry["log_level"], entry["epoch"], entry["items"]) for entry in mismatches] == [("error", epoch, 2)] * 2
    said = repr(mismatches)
    assert not any(secret in said for secret in ["forged-", *CARDS, *(formats.normalize("card", card) for card in CARDS),
                                         *(token for token, _ in forged + card_items)])


async def test_ciphertexts_that_do_not_decrypt_read_as_unknown_and_are_logged_summed_per_epoch(
        single: RunningNode) -> None:
    """docs/logs.md, store.ciphertext_corrupt: damaged stored bytes read as unknown (null) and are said at
    error level, summed (a line a second per epoch with its count), never one line per token; no token
    or byte of the row is logged."""
    service = single.service
    keys = single.node.keyring.get(1)
    tokens = [keys.token_for(f"damaged-{number}") for number in range(40)]
    damaged = commands.TokenizeCommand(1, tuple((token, b"\x00" * 48) for token in tokens), None, None, None,
                                       int(time.time() * 1000))
    assert (await service._propose(commands.encode_command(damaged))).outcome == ApplyOutcome.OK
    with capture_logs() as logs:
        for _ in range(3):  # asked again and again: still summed
            assert await service.detokenize(tokens) == [None] * len(tokens)
        service_module.CIPHERTEXT_CORRUPT.flush()
    lines = [entry for entry in logs if entry["event"] == "store.ciphertext_corrupt"]
    # Every failed decryption counted, in at most two lines: the first at once, the rest summed.
    assert sum(line["count"] for line in lines) == 3 * len(tokens) and len(lines) <= 2
    assert all(line["log_level"] == "error" and line["epoch"] == 1 for line in lines)
    assert not any(token in json.dumps(entry, default=str) for entry in logs for token in tokens)


def recording_proposals(running: RunningNode) -> list[commands.Command]:
    """Every command this node proposes from now on (its service's and its group commit's), decoded."""
    proposed: list[commands.Command] = []
    original = running.node.propose

    async def recording(payload: bytes, timeout_seconds: float):
        proposed.append(commands.decode_command(payload))
        return await original(payload, timeout_seconds)
    running.node.propose = recording
    return proposed


async def test_concurrent_ttl_tokenizes_share_entries_and_each_value_keeps_its_own_expiry(trio: Cluster) -> None:
    """tokenvault/api/coalesce.py: opaque requests with a TTL join the group commit, sealed by a worker on
    the primary or forwarded by a backup (the primary's core seals them): fewer entries than requests, and
    each mapping lives exactly as long as its own request asked, from its entry's clock."""
    primary = await trio.wait_for_stable_primary()
    backup = trio.backups()[0]
    remote, _, channels = await worker_of(primary)
    proposed = recording_proposals(primary)
    asked = {f"ttl-{number}": 30 + number for number in range(8)} | {"no-ttl-1": None, "no-ttl-2": None}
    try:
        outcomes = await asyncio.gather(*(
            (remote if number % 2 else backup.service).tokenize("p", [value], None, "opaque", None, ttl)
            for number, (value, ttl) in enumerate(asked.items())))
    finally:
        for channel in channels:
            await channel.close()
    tokens = {value: body(outcome)["tokens"][0] for value, outcome in zip(asked, outcomes)}
    entries = [command for command in proposed if isinstance(command, commands.TokenizeCommand)]
    assert 1 <= len(entries) < len(asked), [len(entry.items) for entry in entries]
    entry_of = {token: entry for entry in entries for token, _ in entry.items}
    for value, ttl in asked.items():
        entry = entry_of[tokens[value]]
        expected = None if ttl is None else entry.issued_at_ms + ttl * 1000
        assert primary.node.store.life(tokens[value], None)[0] == expected, value
    assert await primary.service.detokenize(list(tokens.values())) == list(asked)


async def test_with_the_audit_trail_on_a_detokenize_or_reveal_served_here_decrypts_each_token_once(
        single: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """A detokenize or reveal that the node serves itself with the audit trail on looks its tokens up again
    once the audit entry is applied (a delete acknowledged before the request must read null): that second
    look asks the store whether each mapping is still there and its epoch's keys still held, and decrypts
    nothing again (a reveal used to decrypt every value twice)."""
    service = single.service
    assert service._audit is not None
    opaque = body(await service.tokenize("p", ["once-1", "once-2", "once-3"], None))
    card = body(await service.tokenize("p", ["4111111111111111"], None, "card", '{"k":"v"}'))
    decrypted: list[str] = []
    original = EpochKeys.decrypt

    def counting(self: EpochKeys, token: str, ciphertext: bytes) -> str:
        decrypted.append(token)
        return original(self, token, ciphertext)

    monkeypatch.setattr(EpochKeys, "decrypt", counting)
    tokens = opaque["tokens"] + card["tokens"]
    answer = await service.reveal(tokens, None, card["epoch"], True, False)
    assert answer["values"] == ["once-1", "once-2", "once-3", "4111111111111111"]
    assert sorted(decrypted) == sorted(tokens)
    decrypted.clear()
    assert await service.detokenize(opaque["tokens"]) == ["once-1", "once-2", "once-3"]
    assert sorted(decrypted) == sorted(opaque["tokens"])


# --------------------------------------------------------------------------- msgpack bounds of a forwarded body

def _packed_map_around(member: str, filler: bytes, others: dict[str, object]) -> bytes:
    """A map of ``others`` and ``member`` whose value is the raw msgpack ``filler``."""
    head = bytes([0x80 | (len(others) + 1)]) + b"".join(msgpack.packb(key) + msgpack.packb(value)
                                                         for key, value in others.items())
    return head + msgpack.packb(member) + filler


def _nested_empty_containers(size: int, empty: bytes) -> bytes:
    """Arrays of 1,024 arrays of 1,024 empty containers (each under every per-container bound), ``size`` bytes."""
    def header(length: int) -> bytes:
        return b"\xdd" + length.to_bytes(4, "big")
    inner = header(1024) + empty * 1024
    middle = header(1024) + inner * 1024
    count = (size - 5) // len(middle)
    rest = size - 5 - count * len(middle) - 5
    return header(count + 1) + middle * count + header(rest) + empty * rest


@pytest.mark.parametrize("sealed", [False, True], ids=["tokenize", "tokenize.sealed.v2"])
@pytest.mark.parametrize("empty", [b"\x90", b"\x80"], ids=["arrays", "maps"])
def test_a_forwarded_body_of_nested_empty_containers_is_refused_with_bounded_memory(sealed: bool,
                                                                                    empty: bytes) -> None:
    """A body of the largest allowed size whose values are nested empty containers: each under msgpack's
    per-container bounds, about 64 bytes of memory a byte together without a bound on the whole."""
    import tracemalloc
    from tokenvault.api.service import (TOKENIZE, TOKENIZE_SEALED_EXTENDED, FORWARDED_MEMBERS, _forwarded_arguments,
                                        _max_forwarded_bytes, _max_forwarded_sealed_bytes)
    from tokenvault.config import LimitsConfig

    limits = LimitsConfig()
    kind = TOKENIZE_SEALED_EXTENDED if sealed else TOKENIZE
    max_bytes = _max_forwarded_sealed_bytes(limits, with_metadata=True) if sealed else _max_forwarded_bytes(limits)
    others = {member: None for member in FORWARDED_MEMBERS[kind] if member != "values"}
    head = _packed_map_around("values", b"", others)
    payload = _packed_map_around("values", _nested_empty_containers(max_bytes - len(head), empty), others)
    assert len(payload) == max_bytes
    request = ForwardRequest(request_id=1, kind=kind, body=payload)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest):
            _forwarded_arguments(request, FORWARDED_MEMBERS[kind], max_bytes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * max_bytes, f"{peak / 2**20:.1f} MiB allocated for a {max_bytes / 2**20:.1f} MiB body"


def test_the_largest_allowed_forwarded_bodies_decode_and_a_list_past_the_bound_is_refused() -> None:
    from tokenvault.api.service import (AUDIT, TOKENIZE, TOKENIZE_SEALED_EXTENDED, FORWARDED_MEMBERS,
                                        _forwarded_arguments, _max_forwarded_bytes, _max_forwarded_sealed_bytes)
    from tokenvault.config import LimitsConfig

    limits = LimitsConfig(max_items=commands.MAX_ITEMS)  # the ceiling of max_items
    items = commands.MAX_ITEMS
    sealed = {"principal": "p" * 255, "epoch": 2**63 - 1, "values": ["v"] * items,
              "items": [["tv1_" + "t" * 32, b"c" * 17]] * items, "token_format": "opaque", "metadata_json": None,
              "ttl_seconds": None, "metadata": [b"m" * 17] * items}
    record = [2**40, "n1", "k", None, "detokenize", 1, 1, "r", None]
    cases = [(TOKENIZE_SEALED_EXTENDED, sealed, _max_forwarded_sealed_bytes(limits, with_metadata=True)),
             (TOKENIZE, {"principal": "p", "values": ["v"] * items, "idempotency_key": "k" * 255},
              _max_forwarded_bytes(limits)),
             (AUDIT, {"records": [record] * 4096}, _max_forwarded_bytes(limits))]
    for kind, document, max_bytes in cases:
        payload = msgpack.packb(document, use_bin_type=True)
        assert len(payload) <= max_bytes, kind
        request = ForwardRequest(request_id=1, kind=kind, body=payload)
        assert _forwarded_arguments(request, FORWARDED_MEMBERS[kind], max_bytes) == document, kind
    past = msgpack.packb({"principal": "p", "values": ["v"] * (items + 1), "idempotency_key": None})
    with pytest.raises(InvalidRequest):
        _forwarded_arguments(ForwardRequest(request_id=1, kind=TOKENIZE, body=past), FORWARDED_MEMBERS[TOKENIZE],
                             _max_forwarded_bytes(limits))


async def test_a_tokenize_whose_entry_no_log_entry_can_hold_is_413_not_retry_later(tmp_path: Path) -> None:
    """[limits] may allow a request (here 12,000 values with 1 KiB of metadata each) whose log entry is over
    the log's entry bound. That was answered 503 overloaded, "retry later", which no retry could ever get
    past (checked on the code before); it is 413, nothing stored, and a smaller request still passes."""
    import dataclasses

    from node_support import make_configs, start_node
    from tokenvault.config import LimitsConfig
    from tokenvault.errors import PayloadTooLarge

    config = make_configs(tmp_path, 1)[0]
    running = await start_node(dataclasses.replace(config, limits=LimitsConfig(max_items=20_000)))
    try:
        await wait_until(lambda: running.node.store.active_epoch() >= 1, 10, "epoch 1")
        metadata = json.dumps({"note": "m" * 990}, separators=(",", ":"))
        values = [f"value-{number}" for number in range(12_000)]
        with pytest.raises(PayloadTooLarge) as raised:
            await running.service.tokenize("p", values, None, metadata_json=metadata)
        assert raised.value.status == 413 and "log entry" in raised.value.detail
        assert running.node.store.token_count() == 0
        assert (await running.service.tokenize("p", values[:1000], None, metadata_json=metadata)).status == 200
    finally:
        await running.close()


async def test_a_request_or_answer_too_large_for_the_peer_link_is_413_and_the_link_stays_up(
        trio: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """With [limits] above the defaults a forwarded body could pass the peer links' frame bound: the
    primary refused the frame as garbage and closed the link, replication with it. The backup now answers
    413 before sending; an answer too large comes back as 413; the transport never sends such a frame."""
    from tokenvault.api import service as service_module
    from tokenvault.errors import PayloadTooLarge

    primary, backup = trio.primaries()[0], trio.backups()[0]
    monkeypatch.setattr(service_module, "MAX_FORWARDED_FRAME_BODY_BYTES", 4096)
    links_before = backup.node.transport.is_connected(primary.node_id)
    with pytest.raises(PayloadTooLarge, match="too large to forward"):
        await backup.service.tokenize("p", [f"value-{number:04d}-" + "x" * 60 for number in range(100)], None)
    assert links_before and backup.node.transport.is_connected(primary.node_id)
    tokens = json.loads((await primary.service.tokenize("p", [f"big-{number}-" + "y" * 400 for number in range(20)],
                                                        None)).body)["tokens"]
    with pytest.raises(PayloadTooLarge, match="answer"):  # the backup lacks them: asked of the primary
        await backup.service._forward(primary.node_id, "reveal", {"tokens": tokens, "epoch": None,
                                                                  "include_metadata": False})
    assert (await backup.service.tokenize("p", ["small"], None)).status == 200  # the link still carries


async def test_the_transport_never_sends_a_frame_its_peer_would_refuse() -> None:
    """The last guard: a frame over the bound is refused by send (False), reported, never queued."""
    from protocol import ForwardRequest
    from tokenvault.core.transport import PeerTransport

    dropped: list[str] = []
    transport = PeerTransport("n1", "127.0.0.1", 1, [], b"s" * 32, lambda *_: None, 1024, on_dropped=dropped.append)
    queued: list[bytes] = []
    transport._connections["n2"] = SimpleNamespace(enqueue=lambda frame: queued.append(frame))  # type: ignore[assignment]
    assert transport.send("n2", ForwardRequest(request_id=1, kind="x", body=b"b" * 2048)) is False
    assert dropped == ["n2"] and queued == []
    assert transport.send("n2", ForwardRequest(request_id=2, kind="x", body=b"b" * 100)) is True
    assert len(queued) == 1
