"""A worker's detokenize from its own view of the store, in one process: a RemoteService over a real
channel to the core's CoreCalls of an in-process node, with a StoreReader on that node's store.

The view catches up only when the core has removed something since (Node.removal_index); a deleted
token, a destroyed epoch and an expired mapping are never answered; every answer is audited once."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node_support import RunningNode, wait_until
from test_channel import pair
from tokenvault.api import remote as remote_module
from tokenvault.api.core_calls import CoreCalls
from tokenvault.api.remote import (CATCH_UP_TOPIC, EPOCH_TOPIC, KEYS_TOPIC, PROBE_AFTER_MISSES, PROBE_EVERY,
                                   RemoteService)
from tokenvault.config import ShredConfig
from tokenvault.core import commands
from tokenvault.core.backup import BackupBusy
from tokenvault.core.store_files import STORE_DIRECTORY
from tokenvault.core.store_reader import StoreReader
from tokenvault.crypto import formats
from tokenvault.errors import InvalidRequest, Overloaded, Unauthenticated
from tokenvault.metrics import Metrics


class Worker:
    def __init__(self, service: RemoteService, reader: StoreReader, metrics: Metrics) -> None:
        self.service, self.reader, self.metrics = service, reader, metrics

    def reads(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value("tokenvault_worker_store_reads_total", {"result": result})
        return value or 0.0


@pytest.fixture
async def worker(single: RunningNode, tmp_path: Path) -> AsyncIterator[Worker]:
    calls = CoreCalls(single.service, single.node.metrics, lambda: [], max_backup_streams=1)
    metrics = Metrics("worker")
    reader = StoreReader(Path(single.config.data_dir) / STORE_DIRECTORY, tmp_path / "view").open()
    service = RemoteService(single.node_id, reader=reader, metrics=metrics, timeout_seconds=2.0)
    core, channel = await pair(calls.handlers, on_push=service.on_push)
    service.channel = channel
    single.node.on_keyring_changed = lambda: core.push(EPOCH_TOPIC, calls.active_epoch_keys())
    single.node.on_store_files_replaced = lambda: core.push(CATCH_UP_TOPIC, None)
    core.push(EPOCH_TOPIC, calls.active_epoch_keys())
    await service.read_health()  # a round trip: the push has arrived
    yield Worker(service, reader, metrics)
    await core.close()
    await channel.close()
    reader.close()


async def tokenize(single: RunningNode, values: list[str]) -> list[str]:
    outcome = await single.service.tokenize("p", values, None)
    assert outcome.status == 200
    return list(json.loads(outcome.body)["tokens"])


async def test_tokens_in_the_view_are_answered_there_and_others_by_the_core(single: RunningNode,
                                                                           worker: Worker) -> None:
    tokens = await tokenize(single, ["a", "b"])
    # The view opened before these were written: the core answers, and the view is nudged to catch up.
    assert await worker.service.detokenize(tokens) == ["a", "b"]
    assert worker.reads("core") == 1 and worker.reads("view") == 0
    worker.reader.catch_up()
    catch_ups = worker.reader.catch_ups
    for _ in range(3):
        assert await worker.service.detokenize(tokens) == ["a", "b"]
    assert worker.reads("view") == 3
    # More tokens written meanwhile only add: the view answers what it holds without catching up.
    await tokenize(single, ["c"])
    assert await worker.service.detokenize(tokens[:1]) == ["a"]
    assert worker.reader.catch_ups == catch_ups and worker.reads("view") == 4
    # Every answer wrote one audit record, with the tokens asked and found.
    records = single.node.store.audit_page(0, 100)
    detokenizes = [record for record in records if record["action"] == "detokenize"]
    assert [(record["items"], record["found"]) for record in detokenizes] == [(2, 2)] * 4 + [(1, 1)]


async def test_a_delete_makes_the_view_catch_up_and_the_token_is_never_answered(single: RunningNode,
                                                                                worker: Worker) -> None:
    tokens = await tokenize(single, ["kept", "deleted"])
    worker.reader.catch_up()
    assert await worker.service.detokenize(tokens) == ["kept", "deleted"]
    outcome = await single.service.delete_tokens(tokens[1:], commands.NO_ACTOR)
    assert outcome.status == 200
    assert single.node.removal_index == single.node.store.applied_index
    assert worker.reader.applied_index < single.node.removal_index  # the view still holds the token
    catch_ups = worker.reader.catch_ups
    assert await worker.service.detokenize(tokens) == ["kept", None]
    assert worker.reader.catch_ups > catch_ups and worker.reads("view") == 2


async def test_a_destroyed_epoch_is_never_answered_from_the_view(single: RunningNode, worker: Worker) -> None:
    tokens = await tokenize(single, ["old"])
    worker.reader.catch_up()
    assert await worker.service.detokenize(tokens) == ["old"]
    await single.service.rotate_epoch("admin", None)
    assert (await single.service.destroy_epoch(1, commands.NO_ACTOR)).status == 200
    assert await worker.service.detokenize(tokens) == [None]


async def test_an_expired_mapping_is_never_answered_from_the_view(single: RunningNode, worker: Worker,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A mapping that expires between the view's first lookup and its look again after the core's read
    point is answered null by the view itself; one expired at the first lookup is left to the core. The
    worker's clock is moved to the expiry: no real wait, so a slow machine cannot blur which read
    answered."""
    outcome = await single.service.tokenize("p", ["short-lived"], None, ttl_seconds=60)
    tokens = json.loads(outcome.body)["tokens"]
    worker.reader.catch_up()
    assert worker.reader.has_life
    assert await worker.service.detokenize(tokens) == ["short-lived"]
    expires_at_ms = single.node.store.life(tokens[0])[0]
    assert expires_at_ms is not None
    real_now_ms = remote_module._now_ms
    calls = 0

    def expiring_after_the_first_lookup() -> int:
        nonlocal calls
        calls += 1
        return real_now_ms() if calls == 1 else expires_at_ms

    monkeypatch.setattr(remote_module, "_now_ms", expiring_after_the_first_lookup)
    views = worker.reads("view")
    assert await worker.service.detokenize(tokens) == [None]
    assert calls == 2 and worker.reads("view") == views + 1  # both lookups, and the view answered
    # Expired already at the first lookup: the view answers nothing, the core does (by its own clock,
    # which the mapping has not reached yet: so its value, from the core and not the view).
    monkeypatch.setattr(remote_module, "_now_ms", lambda: expires_at_ms)
    views, cores = worker.reads("view"), worker.reads("core")
    assert await worker.service.detokenize(tokens) == ["short-lived"]
    assert (worker.reads("view"), worker.reads("core")) == (views, cores + 1)


async def test_only_adding_commands_leave_the_removal_index_alone(single: RunningNode) -> None:
    node = single.node
    before = node.removal_index
    await tokenize(single, ["x"])
    await single.service.rotate_epoch("admin", None)
    assert node.removal_index == before
    tokens = await tokenize(single, ["y"])
    await single.service.delete_tokens(tokens, commands.NO_ACTOR)
    assert node.removal_index == node.store.applied_index > before


def answered_as_read(worker: Worker) -> float:
    return worker.metrics.registry.get_sample_value("tokenvault_tokenize_answered_as_read_total") or 0.0


async def test_a_repeat_tokenize_is_answered_from_the_view_with_no_entry(single: RunningNode, worker: Worker) -> None:
    first = await worker.service.tokenize("p", ["card-1", "card-2"], None)
    tokens = json.loads(first.body)["tokens"]
    assert answered_as_read(worker) == 0  # new values: the write path
    worker.reader.catch_up()
    applied = single.node.store.applied_index
    again = await worker.service.tokenize("p", ["card-2", "card-1"], None)
    assert again.status == 200 and json.loads(again.body) == {"epoch": 1, "tokens": tokens[::-1]}
    assert answered_as_read(worker) == 2
    assert single.node.store.applied_index == applied  # no log entry


async def test_a_repeat_tokenize_from_the_view_of_a_key_revoked_meanwhile_is_refused(single: RunningNode,
                                                                                     worker: Worker) -> None:
    """docs/security.md, "Revocation": the worker authenticated the key before the core's push of the
    revocation arrived; once the read point is answered (pushes come first), the key is gone from the
    worker's table and the tokens the view found are not answered. A key still held is answered."""
    admin = commands.Actor(name="admin", request_id="r")
    revoked = json.loads((await single.service.create_key("leaked", ["tokenize"], admin)).body)["id"]
    kept = json.loads((await single.service.create_key("kept", ["tokenize"], admin)).body)["id"]
    await worker.service.tokenize(f"key-{revoked}", ["seen-before"], None)
    worker.reader.catch_up()
    assert (await single.service.revoke_key(revoked, admin)).status == 200
    calls = CoreCalls(single.service, single.node.metrics, lambda: [], max_backup_streams=1)
    worker.service.on_push(KEYS_TOPIC, calls.api_key_rows())
    with pytest.raises(Unauthenticated):
        await worker.service.tokenize(f"key-{revoked}", ["seen-before"], None)
    assert answered_as_read(worker) == 1  # the view found it; the answer was refused
    again = await worker.service.tokenize(f"key-{kept}", ["seen-before"], None)
    assert again.status == 200 and answered_as_read(worker) == 2


async def test_a_repeat_tokenize_after_a_rotation_the_worker_missed_is_not_answered_in_the_old_epoch(
        single: RunningNode, worker: Worker) -> None:
    await worker.service.tokenize("p", ["v"], None)
    worker.reader.catch_up()
    single.node.on_keyring_changed = lambda: None  # the worker does not hear of the rotation
    await single.service.rotate_epoch("admin", None)
    again = await worker.service.tokenize("p", ["v"], None)
    assert json.loads(again.body)["epoch"] == 2  # the core refused epoch 1; the worker let the core seal
    assert answered_as_read(worker) == 0


async def test_a_repeat_tokenize_of_a_token_deleted_meanwhile_recreates_it(single: RunningNode,
                                                                         worker: Worker) -> None:
    first = await worker.service.tokenize("p", ["gone"], None)
    token = json.loads(first.body)["tokens"][0]
    worker.reader.catch_up()
    await single.service.delete_tokens([token], commands.NO_ACTOR)
    assert single.node.store.lookup([token]) == {}
    again = await worker.service.tokenize("p", ["gone"], None)
    assert json.loads(again.body)["tokens"] == [token]
    assert answered_as_read(worker) == 0
    assert token in single.node.store.lookup([token])  # written again, not answered from the stale view


def deleted_table_files(data_dir: Path) -> list[str]:
    """Table files of ``data_dir`` this process still holds open after they were deleted."""
    held = []
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:
            continue
        if target.startswith(str(data_dir)) and target.endswith(".sst (deleted)"):
            held.append(target)
    return held


async def test_after_a_shred_pass_the_view_lets_go_of_the_files_that_held_the_deleted_rows(
        single: RunningNode, worker: Worker) -> None:
    data_dir = Path(single.config.data_dir).resolve()
    tokens = await tokenize(single, [f"shred-{number}" for number in range(50)])
    single.node.store._db.flush()  # into a table file, which the view opens
    worker.reader.catch_up()
    assert await worker.service.detokenize(tokens[:1]) == ["shred-0"]
    passes = single.node.shredder.passes
    assert (await single.service.delete_tokens(tokens[:1], commands.NO_ACTOR)).status == 200
    await wait_until(lambda: single.node.shredder.passes > passes, 10, "a shred pass")
    # The pass rewrote the files; the core told the view, which caught up and closed the old ones.
    await wait_until(lambda: not deleted_table_files(data_dir), 5, "the view to close the deleted table files")


@pytest.mark.parametrize("single", [ShredConfig(max_busy_fraction=1.0)], indirect=True, ids=["passes-back-to-back"])
async def test_a_token_deleted_just_before_is_never_read_from_a_view_while_shreds_flush_the_store(
        single: RunningNode, worker: Worker) -> None:
    """Each delete starts a shred, which flushes the store to a new WAL file while the view may be in the
    middle of the old one. A secondary that caught up across that kept the old WAL's rows in its
    memtable, hiding the delete in the flushed table (found by CI: a deleted token answered, and
    here the view never reaching the index). The view now reopens on every WAL switch. (The node's
    shredder runs its passes back to back here, as many flushes as it can make: by default it rests
    between its compactions, [shred] max_busy_fraction.) The rounds go on until several passes have
    flushed the store under them: ``shredder.passes`` counts only passes that found nothing waiting
    after them, which, with a delete every round, a slow machine may not see before the end (CI saw 0
    after 150 rounds), so the count here is of every pass done (``shred_mark().passes``)."""
    shredder = single.node.shredder
    round_number = 0
    while round_number < 150 or shredder.shred_mark().passes < 5:
        assert round_number < 2000, f"only {shredder.shred_mark().passes} shred passes in 2,000 rounds"
        values = [f"flush-{round_number}-{number}" for number in range(3)]
        tokens = await tokenize(single, values)
        worker.reader.catch_up()
        assert await worker.service.detokenize(tokens) == values
        assert (await single.service.delete_tokens(tokens[:1], commands.NO_ACTOR)).status == 200
        assert await worker.service.detokenize(tokens) == [None, *values[1:]], round_number
        round_number += 1
    assert worker.reads("failed") == 0


CARD_NUMBER = "4111111111111111"


def detokenize_records(single: RunningNode) -> list[dict[str, object]]:
    return [record for record in single.node.store.audit_page(0, 1000) if record["action"] == "detokenize"]


async def test_card_tokens_metadata_and_masked_values_are_revealed_from_the_view_as_the_core_reveals_them(
        single: RunningNode, worker: Worker) -> None:
    card = await single.service.tokenize("p", [CARD_NUMBER], None, token_format=formats.CARD,
                                         metadata_json='{"customer":"c-1"}')
    opaque = await single.service.tokenize("p", ["with-metadata"], None, metadata_json='{"n":2}')
    plain = await tokenize(single, ["without"])
    tokens = json.loads(card.body)["tokens"] + json.loads(opaque.body)["tokens"] + plain
    worker.reader.catch_up()
    records = len(detokenize_records(single))
    revealed = await worker.service.reveal(tokens, include_metadata=True)
    assert revealed == {"values": [CARD_NUMBER, "with-metadata", "without"],
                        "metadata_json": ['{"customer":"c-1"}', '{"n":2}', None]}
    assert revealed == await single.service.reveal(tokens, include_metadata=True)  # the core's own answer
    masked = await worker.service.reveal(tokens, masked=True)
    assert masked == await single.service.reveal(tokens, masked=True)
    assert masked["values"][0] != CARD_NUMBER and masked["values"][0].endswith(CARD_NUMBER[-4:])
    assert worker.reads("view") == 2 and worker.reads("core") == 0
    # One audit record per answer, the masked one saying so, exactly as the core writes them.
    subjects = [record.get("subject") for record in detokenize_records(single)[records:]]
    assert subjects == [None, None, "masked", "masked"]


async def test_a_reveal_from_a_lagging_view_answers_the_metadata_a_tokenize_acknowledged_before_it_gave(
        single: RunningNode, worker: Worker) -> None:
    """A tokenize with metadata replaces the mapping's metadata. The view caught up only to the core's
    last removal, so a view that had not applied the replacement answered the old metadata (checked on
    the code before: {"v":1}); the read point of a reveal with metadata also covers the last entry that
    set metadata."""
    (token,) = json.loads((await single.service.tokenize("p", ["meta-value"], None,
                                                         metadata_json='{"v":1}')).body)["tokens"]
    worker.reader.catch_up()
    assert (await single.service.tokenize("p", ["meta-value"], None, metadata_json='{"v":2}')).status == 200
    assert worker.reader.applied_index < single.node.store.applied_index  # the view has not applied it
    assert await worker.service.reveal([token], include_metadata=True) == {
        "values": ["meta-value"], "metadata_json": ['{"v":2}']}
    assert worker.reads("view") == 1
    # Without metadata asked, the read point is the removal index alone: no catch-up for a replacement.
    assert single.node.metadata_index > single.node.removal_index


async def test_a_card_token_is_resolved_in_the_epoch_asked_and_never_answered_once_its_epoch_is_destroyed(
        single: RunningNode, worker: Worker) -> None:
    outcome = await single.service.tokenize("p", [CARD_NUMBER], None, token_format=formats.CARD)
    token = json.loads(outcome.body)["tokens"][0]
    await single.service.rotate_epoch("admin", None)
    worker.reader.catch_up()
    # Epoch 2 is active: without an epoch the card token is not found there (the view lacks it: the core
    # answers); in epoch 1 the view answers it.
    assert await worker.service.reveal([token]) == {"values": [None]}
    assert worker.reads("core") == 1
    assert await worker.service.reveal([token], epoch=1) == {"values": [CARD_NUMBER]}
    assert worker.reads("view") == 1
    assert (await single.service.destroy_epoch(1, commands.NO_ACTOR)).status == 200
    assert await worker.service.reveal([token], epoch=1) == {"values": [None]}


async def test_a_reveal_after_a_rotation_the_worker_missed_is_not_resolved_in_the_old_epoch(
        single: RunningNode, worker: Worker) -> None:
    outcome = await single.service.tokenize("p", [CARD_NUMBER], None, token_format=formats.CARD)
    token = json.loads(outcome.body)["tokens"][0]
    worker.reader.catch_up()
    assert await worker.service.reveal([token]) == {"values": [CARD_NUMBER]}
    single.node.on_keyring_changed = lambda: None  # the worker does not hear of the rotation
    await single.service.rotate_epoch("admin", None)
    worker.reader.catch_up()
    records = len(detokenize_records(single))
    # The card token is of epoch 1; the active epoch is 2, where it does not exist: the core refuses the
    # worker's epoch before writing anything, and answers the request itself.
    assert await worker.service.reveal([token]) == {"values": [None]}
    assert worker.reads("view") == 1 and worker.reads("core") == 1
    assert len(detokenize_records(single)) == records + 1


async def test_the_read_points_of_one_turn_are_one_call_and_each_keeps_its_answer_and_its_audit_record(
        single: RunningNode, worker: Worker) -> None:
    card = await single.service.tokenize("p", [CARD_NUMBER], None, token_format=formats.CARD)
    card_token = json.loads(card.body)["tokens"][0]
    tokens = await tokenize(single, [f"turn-{number}" for number in range(6)])
    worker.reader.catch_up()
    single.node.on_keyring_changed = lambda: None  # the worker does not hear of the rotation below
    await single.service.rotate_epoch("admin", None)
    worker.reader.catch_up()
    records, calls = len(detokenize_records(single)), worker.service.read_points.calls
    answers = await asyncio.gather(*(worker.service.detokenize([token]) for token in tokens),
                                   worker.service.reveal([card_token]))
    # One read_points call for the seven; six answered from the view, each with its own record; the
    # card token's point was refused for its stale epoch (nothing written) and the core answered it.
    assert worker.service.read_points.calls == calls + 1
    assert answers[:6] == [[f"turn-{number}"] for number in range(6)] and answers[6] == {"values": [None]}
    assert worker.reads("view") == 6 and worker.reads("core") == 1
    assert len(detokenize_records(single)) == records + 7


async def test_a_malformed_read_point_fails_the_call_before_any_point_runs(single: RunningNode) -> None:
    calls = CoreCalls(single.service, single.node.metrics, lambda: [], max_backup_streams=1)
    good = {"kind": "detokenize", "items": 1, "found": 1, "actor": commands.NO_ACTOR.fields(), "masked": False,
            "active_epoch": None, "metadata": False}
    records = len(detokenize_records(single))
    for bad in ({**good, "items": 0, "found": 0, "actor": None}, {"kind": "write"}, "not a map",
                {**good, "masked": "no"}, {**good, "metadata": 1}, {**good, "extra": 1}):
        with pytest.raises(InvalidRequest):
            await calls.handlers["read_points"]({"points": [good, bad]})
    with pytest.raises(InvalidRequest):
        await calls.handlers["read_points"]({"points": []})
    assert len(detokenize_records(single)) == records  # no point ran: no audit record
    assert await calls.handlers["read_points"]({"points": [good]}) == [[single.node.removal_index]]


async def test_under_new_values_only_one_tokenize_in_sixteen_tries_the_view_and_repeats_stay_reads(
        single: RunningNode, worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    tries: list[int] = []
    real_lookup = worker.reader.lookup

    def counted(tokens: list[str], now_ms: int) -> dict[str, bytes]:
        tries.append(len(tokens))
        return real_lookup(tokens, now_ms)

    monkeypatch.setattr(worker.reader, "lookup", counted)
    for number in range(PROBE_AFTER_MISSES + 2 * PROBE_EVERY):
        assert (await worker.service.tokenize("p", [f"new-{number}"], None)).status == 200
    assert len(tries) == PROBE_AFTER_MISSES + 2  # every one until 64 misses in a row, then one in 16
    worker.reader.catch_up()
    applied = single.node.store.applied_index
    for _ in range(PROBE_EVERY + 4):
        again = await worker.service.tokenize("p", ["new-0"], None)
        assert again.status == 200
    # Untried repeats were answered as reads by the core; the first tried one hit, so the view is
    # tried for every request again; and none of them wrote an entry.
    assert len(tries) >= PROBE_AFTER_MISSES + 2 + 4 and tries[-4:] == [1, 1, 1, 1]
    assert worker.service._view_misses == 0
    assert single.node.store.applied_index == applied


async def test_read_points_past_the_bound_in_flight_are_refused_as_an_overload(single: RunningNode) -> None:
    from tokenvault.api import core_calls

    calls = CoreCalls(single.service, single.node.metrics, lambda: [], max_backup_streams=1)
    point = {"kind": "tokenize", "epoch": 1, "items": 1}
    calls._read_points_in_flight = core_calls.MAX_READ_POINTS_IN_FLIGHT - 1  # as if other calls were running
    with pytest.raises(Overloaded):
        await calls.handlers["read_points"]({"points": [point, point]})
    assert await calls.handlers["read_points"]({"points": [point]}) == [[single.node.removal_index]]
    assert calls._read_points_in_flight == core_calls.MAX_READ_POINTS_IN_FLIGHT - 1  # every point returned


async def test_the_core_flushes_for_the_views_at_most_once_an_interval_and_only_a_wal_file_worth_it(
        single: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenvault.core import node as node_module
    from tokenvault.core.store_files import wal_file_names

    calls = CoreCalls(single.service, single.node.metrics, lambda: [], max_backup_streams=1)
    flush_store = calls.handlers["flush_store"]
    store = single.node.store
    directory = Path(single.config.data_dir) / STORE_DIRECTORY / store._generation
    await tokenize(single, ["a"])
    wals = wal_file_names(directory)

    def flushes() -> float:
        return single.node.metrics.registry.get_sample_value("tokenvault_store_view_flushes_total") or 0.0

    assert await flush_store({}) is False and wal_file_names(directory) == wals  # a few bytes: not worth it
    with pytest.raises(InvalidRequest):
        await flush_store({"now": True})
    monkeypatch.setattr(node_module, "VIEW_FLUSH_MIN_BYTES", 1)
    assert await flush_store({}) is True and flushes() == 1
    await wait_until(lambda: not set(wal_file_names(directory)) & set(wals), 10, "the flush to end")
    wals = wal_file_names(directory)
    await tokenize(single, ["b"])
    # Within the interval no other flush starts (the answer says whether the last one still runs).
    assert await flush_store({}) is False and wal_file_names(directory) == wals and flushes() == 1
    monkeypatch.setattr(node_module, "VIEW_FLUSH_INTERVAL_SECONDS", 0.0)
    assert await flush_store({}) is True and flushes() == 2
    await wait_until(lambda: not set(wal_file_names(directory)) & set(wals), 10, "the second flush to end")
    # Workers asking at once: the first claims the flush before it waits for the store, so only one may start.
    monkeypatch.setattr(node_module, "VIEW_FLUSH_INTERVAL_SECONDS", 10.0)
    single.node._views_flushed_at = -float("inf")
    minimums: list[int] = []
    real = store.flush_memtable
    monkeypatch.setattr(store, "flush_memtable", lambda min_bytes: minimums.append(min_bytes) or real(min_bytes))
    await tokenize(single, ["c"])
    await asyncio.gather(flush_store({}), flush_store({}), flush_store({}))
    assert minimums == [1, None, None] and flushes() == 3


async def test_a_worker_whose_view_fails_to_open_tries_again_and_reads_from_the_core_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from tokenvault.api import worker as worker_module
    from tokenvault.core.store_reader import StoreReadError

    opened = object()
    tries: list[int] = []

    async def open_view(store_path: Path, scratch: Path, ask_flush: object) -> object:
        tries.append(1)
        if len(tries) < 3:
            raise StoreReadError("rocksdict-config.json is unreadable")
        return opened

    attached: list[object] = []
    service = SimpleNamespace(ask_flush=None, attach_view=attached.append)
    config = SimpleNamespace(data_dir=str(tmp_path), http=SimpleNamespace(store_reads=True))
    monkeypatch.setattr(worker_module, "open_view", open_view)
    monkeypatch.setattr(worker_module, "VIEW_OPEN_RETRY_SECONDS", 0.0)
    await worker_module._open_store_view(config, 1, 2, service)  # type: ignore[arg-type]
    assert len(tries) == 3 and attached == [opened]
    tries.clear()

    async def never(store_path: Path, scratch: Path, ask_flush: object) -> object:
        tries.append(1)
        raise StoreReadError("gone")

    monkeypatch.setattr(worker_module, "open_view", never)
    await worker_module._open_store_view(config, 1, 2, service)  # type: ignore[arg-type]
    assert len(tries) == worker_module.VIEW_OPEN_ATTEMPTS and attached == [opened]  # gave up: no view


async def test_a_destroyed_epoch_leaves_the_workers_key_rings(single: RunningNode, worker: Worker) -> None:
    """docs/guarantees.md: a destroyed epoch is in no key ring, the HTTP workers' included: the core's
    push after the destroy takes its keys from every worker, which then answers its tokens null."""
    tokens = await tokenize(single, ["doomed"])
    await single.service.rotate_epoch("admin", None)
    await worker.service.read_health()  # a round trip: the rotation's push has arrived
    assert set(worker.service._readable) == {1, 2}
    await single.service.destroy_epoch(1, commands.Actor(name="admin", node="n1", request_id="r"))
    await worker.service.read_health()
    assert set(worker.service._readable) == {2}
    worker.reader.catch_up()
    assert await worker.service.detokenize(tokens) == [None]


async def test_a_second_backup_through_another_worker_is_backup_busy_with_retry_after_5(worker: Worker) -> None:
    """docs/api.md, GET /v1/admin/backup: one backup stream per node at a time; another is 503
    backup-busy with Retry-After 5. The node-wide bound is the core's (each worker allows one), so a
    second backup arriving through another worker is refused there, and comes back as the same error."""
    first = await worker.service.open_backup()
    try:
        with pytest.raises(BackupBusy) as busy:
            await worker.service.open_backup()
        assert busy.value.status == 503 and busy.value.problem == "backup-busy"
        assert busy.value.headers["Retry-After"] == "5"
    finally:
        await first.close()
    again = await worker.service.open_backup()  # the slot is free once the first is closed
    await again.close()
