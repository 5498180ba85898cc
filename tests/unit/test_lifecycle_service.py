"""tokenvault.api.lifecycle on real in-process nodes: delete, re-tokenize, epoch pages, destroy, shredding."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
from structlog.testing import capture_logs

from node_support import (Cluster, RunningNode, cluster_with_a_stopped_backup, files_holding, make_configs, save_backup,
                          start_node, wait_until)
from protocol import AppendEntries, ForwardRequest, ForwardResponse, Heartbeat, ProposalRejected
from tokenvault.config import AuditConfig
from tokenvault.core import commands
from test_ff1 import luhn_complete
from tokenvault.api import lifecycle as lifecycle_module
from tokenvault.api.service import NodeService
from tokenvault.futures import SLICE_ITEMS
from tokenvault.core import shred as shred_module
from tokenvault.crypto.formats import FormatKeys
from tokenvault.errors import EpochActive, EpochDestroyed, NotFound, Outcome, Unavailable

# No node named: a change forwarded by a backup is recorded in the backup's name (the primary fills it in).
ACTOR = commands.Actor(name="admin", request_id="r")


def body(outcome: Outcome) -> dict:
    return json.loads(outcome.body)


async def test_delete_answers_null_on_every_node_and_counts_only_existing_tokens(trio: Cluster) -> None:
    primary = await trio.wait_for_stable_primary()
    tokens = body(await primary.service.tokenize("p", ["keep", "gone-1", "gone-2"], None))["tokens"]
    backup = trio.backups()[0]
    # Deleted through a backup (forwarded), with a repeat and an unknown token.
    outcome = await backup.service.delete_tokens([tokens[1], tokens[2], tokens[1], "tv1_" + "a" * 32], ACTOR)
    assert (outcome.status, body(outcome)) == (200, {"deleted": 2})
    for running in trio.running():
        assert await running.service.detokenize(tokens) == ["keep", None, None]
    assert body(await primary.service.delete_tokens([tokens[1]], ACTOR)) == {"deleted": 0}
    actions = [record["action"] for record in primary.node.store.audit_page(0, 100)]
    assert actions.count("token.delete") == 2


async def test_a_backlog_past_one_pass_is_shredded_whole_from_the_files_and_the_log(
        single: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/api.md, delete: past MAX_KEYS_PER_PASS rows waiting, the shredder keeps no keys and sweeps
    the whole key space; the ciphertexts leave every file and the log. (Here a pass of 4 rows: two
    tokens; the first pass is held on a gate while three more deletes arrive.)"""
    monkeypatch.setattr(shred_module, "MAX_KEYS_PER_PASS", 4)
    service, node = single.service, single.node
    tokens = body(await service.tokenize("p", ["a", "b", "c", "d"], None))["tokens"]
    ciphertexts = node.store.lookup(tokens)
    gate = threading.Event()
    prepare = node.store.prepare_shred
    asked: list[list[bytes] | None] = []

    def held_shred(keys):
        asked.append(keys)
        assert gate.wait(30), "the test never released the shredder"
        return prepare(keys)

    monkeypatch.setattr(node.store, "prepare_shred", held_shred)
    assert [node.metrics.registry.get_sample_value("tokenvault_shred_pass_seconds_count", {"scope": scope})
            for scope in ("keys", "whole")] == [0, 0]
    try:
        first_applied = time.monotonic()
        await service.delete_tokens([tokens[0]], ACTOR)
        await wait_until(lambda: asked and node.shredder.backlog_keys == 0, 10, "the first pass to take its rows")
        for token in tokens[1:]:
            await service.delete_tokens([token], ACTOR)  # a row and a life row each: six rows, past four
        assert node.shredder.backlog_keys == 6
        assert node.metrics.registry.get_sample_value("tokenvault_shred_backlog_rows") == 6
        # The first delete, held in its pass, is the oldest waiting (docs/api.md, metrics).
        await asyncio.sleep(0.2)
        waited = node.metrics.registry.get_sample_value("tokenvault_shred_oldest_wait_seconds")
        assert 0.2 <= waited <= time.monotonic() - first_applied
    finally:
        gate.set()
    await wait_until(lambda: not any(files_holding(single.config.data_dir, ciphertext)
                                     for ciphertext in ciphertexts.values()), 30, "every ciphertext shredded")
    # The pass by key ranges stopped after its first range (the backlog went past the bound); the sweep of
    # the whole key space went on from its second key to the end, then round to that key: two laps.
    assert len(asked) == 3 and asked[0] is not None and asked[1] is None and asked[2] is None
    await wait_until(lambda: node.wal.first_held_index > node.store.applied_index - 1, 10, "the log dropped")
    assert await service.detokenize(tokens) == [None] * 4
    assert node.metrics.registry.get_sample_value("tokenvault_shred_oldest_wait_seconds") == 0
    # tokenvault_shred_pass_seconds: one pass by key ranges, then one of the whole key space.
    assert [node.metrics.registry.get_sample_value("tokenvault_shred_pass_seconds_count", {"scope": scope})
            for scope in ("keys", "whole")] == [1, 1]


def in_a_table_file(running: RunningNode, needle: bytes) -> bool:
    """Whether ``needle`` is in one of the node's table files; asks for a flush each time it is not. A
    flush asked for while another is under way starts none ("running"), and rows applied after that
    one began wait in the memtable for the next: a single ask could leave them there for good."""
    if any(path.suffix == ".sst" for path in files_holding(running.config.data_dir, needle)):
        return True
    running.node.store.flush_memtable(0)
    return False


async def restart_behind_the_log(cluster: Cluster, primary: RunningNode, stopped: RunningNode,
                                 logged: list[dict]) -> RunningNode:
    """Enough further entries for the primary to compact its log past ``stopped``, which is then restarted
    and catches up by a snapshot, awaited in ``logged`` (snapshot.installed)."""
    for number in range(12):
        await primary.service.tokenize("p", [f"filler-{number}"], None)
    # The compaction runs in the background: on a slow disk it may not have passed ``stopped`` yet.
    await wait_until(lambda: primary.node.replica.log_base_index > stopped.node.store.applied_index, 20,
                     "the primary to compact its log past the stopped backup")
    restarted = await cluster.restart(stopped)
    await wait_until(lambda: any(line["event"] == "snapshot.installed" for line in logged), 20,
                     "the lagging backup to install a snapshot")
    return restarted


@pytest.mark.parametrize("listed", [True, False], ids=["keys-listed", "keys-past-the-bound"])
async def test_a_backup_that_installs_a_snapshot_holding_a_delete_not_yet_shredded_shreds_those_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listed: bool) -> None:
    """docs/guarantees.md, delete: a primary's checkpoint is taken whatever its shredder still has to do, so a
    snapshot can hold the old bytes of a row deleted below its index, a delete the installing node never
    applies. The manifest lists the keys of such rows (its pass's two here), and the installing node
    compacts their ranges after the install (SHRED-KEYS records it until done); past MAX_SHRED_KEYS it lists
    none, and that node compacts its whole key space (SHRED-WHOLE)."""
    if not listed:
        monkeypatch.setattr(shred_module, "MAX_SHRED_KEYS", 1)
    record = "SHRED-KEYS" if listed else "SHRED-WHOLE"
    cluster, primary, lagging = await cluster_with_a_stopped_backup(tmp_path)
    gate = threading.Event()
    try:
        token = body(await primary.service.tokenize("p", ["snapshot-shred-" + "v" * 64], None))["tokens"][0]
        ciphertext = primary.node.store.lookup([token])[token]
        await wait_until(lambda: in_a_table_file(primary, ciphertext), 10, "the row in a table file")
        prepare = primary.node.store.prepare_shred

        def held_shred(keys):  # the primary's pass waits, so its checkpoints hold the deleted row's bytes
            assert gate.wait(60), "the test never released the shredder"
            return prepare(keys)

        monkeypatch.setattr(primary.node.store, "prepare_shred", held_shred)
        assert body(await primary.service.delete_tokens([token], ACTOR)) == {"deleted": 1}
        with capture_logs() as logged:
            lagging = await restart_behind_the_log(cluster, primary, lagging, logged)
            await wait_until(lambda: not files_holding(lagging.config.data_dir, ciphertext), 30,
                             "the installed store shredded")
            installed = next(line for line in logged if line["event"] == "snapshot.installed")
            # (The other backup's own pass of the delete logs shred.done too, by its key ranges, below the
            # snapshot's index.)
            passes = await wait_until(lambda: [line["whole_store"] for line in logged if line["event"] == "shred.done"
                                               and line["through_index"] == installed["index"]], 10,
                                      "the installed snapshot's pass to be logged")
        assert installed["shred_pending"] is True  # the primary's checkpoint was taken with its pass held
        assert installed["shred_keys"] == (2 if listed else None)  # the token's row and its life row
        assert passes == [not listed]
        assert not (lagging.config.data_dir / ("SHRED-WHOLE" if listed else "SHRED-KEYS")).exists()
        await wait_until(lambda: not (lagging.config.data_dir / record).exists(), 10, "the record removed")
        assert files_holding(primary.config.data_dir, ciphertext), "the primary's own pass was to be still held"
        assert await lagging.service.detokenize([token]) == [None]
    finally:
        gate.set()
        await cluster.close()


async def test_a_backup_that_installs_a_snapshot_whose_source_had_shredded_every_delete_keeps_its_store(
        tmp_path: Path) -> None:
    """The other side of the test above: the primary's deletes were all shredded when it took the checkpoint,
    its manifest says so (shred_pending false), and the installing backup plans no whole-key-space pass; the
    deleted row's bytes are in none of its files all the same."""
    cluster, primary, lagging = await cluster_with_a_stopped_backup(tmp_path)
    try:
        token = body(await primary.service.tokenize("p", ["snapshot-clean-" + "v" * 64], None))["tokens"][0]
        ciphertext = primary.node.store.lookup([token])[token]
        await wait_until(lambda: in_a_table_file(primary, ciphertext), 10, "the row in a table file")
        assert body(await primary.service.delete_tokens([token], ACTOR)) == {"deleted": 1}
        await wait_until(lambda: primary.node.shredder.hold_index() is None
                         and not files_holding(primary.config.data_dir, ciphertext), 30, "the primary's pass")
        with capture_logs() as logged:
            lagging = await restart_behind_the_log(cluster, primary, lagging, logged)
        installed = next(line for line in logged if line["event"] == "snapshot.installed")
        assert installed["shred_pending"] is False
        assert lagging.node.shredder.hold_index() is None and not lagging.node.shredder.busy
        assert not (lagging.config.data_dir / "SHRED-WHOLE").exists()
        assert not (lagging.config.data_dir / "SHRED-KEYS").exists() and installed["shred_keys"] is None
        assert not files_holding(lagging.config.data_dir, ciphertext)
        assert await lagging.service.detokenize([token]) == [None]
    finally:
        await cluster.close()


@pytest.mark.parametrize("held", [True, False], ids=["pass-held", "pass-done"])
async def test_a_node_restored_from_a_backup_taken_before_a_delete_was_shredded_shreds_those_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: bool) -> None:
    """docs/architecture.md, backup and restore: a backup taken while a delete waited for its shred pass holds
    the deleted row's bytes and says so (shred_pending), with the keys of the pass held (shred_keys); the
    node restored from it never applies that delete, so the restore records a pass of those keys
    (SHRED-KEYS) that the node does at its start.
    A backup taken after the pass holds no such bytes, says so, and records nothing."""
    from tokenvault.core.backup import restore_data_dir

    config = make_configs(tmp_path / "source", 1)[0]
    running = await start_node(config)
    gate = threading.Event()
    try:
        await wait_until(lambda: running.node.store.active_epoch() >= 1, 10, "epoch 1")
        token = body(await running.service.tokenize("p", ["restore-shred-" + "v" * 64], None))["tokens"][0]
        ciphertext = running.node.store.lookup([token])[token]
        await wait_until(lambda: in_a_table_file(running, ciphertext), 10, "the row in a table file")
        if held:
            prepare = running.node.store.prepare_shred

            def held_shred(keys):
                assert gate.wait(60), "the test never released the shredder"
                return prepare(keys)

            monkeypatch.setattr(running.node.store, "prepare_shred", held_shred)
        assert body(await running.service.delete_tokens([token], ACTOR)) == {"deleted": 1}
        if not held:
            await wait_until(lambda: running.node.shredder.hold_index() is None, 30, "the pass")
        path = tmp_path / "taken.backup"
        await save_backup(running, path)
    finally:
        gate.set()
        await running.close()

    target = dataclasses.replace(config, data_dir=tmp_path / "target" / "data")
    restored = restore_data_dir(path, target)
    assert (restored.pending_shred is not None) is held
    # The held pass's keys: the token's two rows.
    assert (restored.pending_shred and restored.pending_shred.key_count) == (2 if held else None)
    assert (target.data_dir / "SHRED-KEYS").exists() is held and not (target.data_dir / "SHRED-WHOLE").exists()
    if not held:  # what the flag claims is true: the backup holds none of the deleted row's bytes
        assert ciphertext not in path.read_bytes() and not files_holding(target.data_dir, ciphertext)
    with capture_logs() as logged:
        running = await start_node(target)
        try:
            await wait_until(lambda: not files_holding(target.data_dir, ciphertext)
                             and not (target.data_dir / "SHRED-KEYS").exists(), 30, "the restored store shredded")
            await wait_until(running.is_primary, 10, "the restored node to lead")
            assert await running.service.detokenize([token]) == [None]
        finally:
            await running.close()
    assert [line["whole_store"] for line in logged if line["event"] == "shred.done"] == ([False] if held else [])


@pytest.mark.parametrize(("name", "record", "whole"), [
    ("SHRED-WHOLE", b"7\n", True),
    ("SHRED-WHOLE", b"not an index" * 100, True),
    ("SHRED-KEYS", msgpack.packb([7, [b"Ttv1_x", b"LTtv1_x"]]), False),
    ("SHRED-KEYS", b"\xc1 not msgpack", True),
], ids=["whole", "whole-damaged", "keys", "keys-damaged"])
async def test_a_pass_recorded_before_a_restart_is_done_after_it(tmp_path: Path, name: str, record: bytes,
                                                                  whole: bool) -> None:
    """SHRED-WHOLE or SHRED-KEYS left by an install whose pass a crash interrupted: the node's first pass after
    its start compacts the whole key space, or the ranges of the recorded keys, and removes the record. Each
    file is read bounded, as hostile: a SHRED-WHOLE that is not an index counts as one at the store's applied
    index, and a SHRED-KEYS that does not decode makes that pass one of the whole key space."""
    config = make_configs(tmp_path, 1)[0]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    (config.data_dir / name).write_bytes(record)
    with capture_logs() as logged:
        running = await start_node(config)
        try:
            records = [config.data_dir / "SHRED-WHOLE", config.data_dir / "SHRED-KEYS"]
            await wait_until(lambda: not any(path.exists() for path in records)
                             and running.node.shredder.hold_index() is None, 10, "the record removed")
        finally:
            await running.close()
    assert [line["whole_store"] for line in logged if line["event"] == "shred.done"] == [whole]


async def test_card_and_digits_tokens_are_deleted_in_their_epoch_on_every_node_and_shredded(trio: Cluster) -> None:
    """docs/api.md, delete: card and digits tokens are deleted in the epoch named (default: the active one);
    once answered every node reads null, and each node's shred pass removes the ciphertext and the metadata
    from its files."""
    primary = await trio.wait_for_stable_primary()
    card = body(await primary.service.tokenize("p", ["4111 1111 1111 1111"], None, token_format="card",
                                               metadata_json='{"k":"card-metadata"}'))["tokens"]
    digits = body(await primary.service.tokenize("p", ["123456789"], None, token_format="digits"))["tokens"]
    ciphertext = primary.node.store.lookup_format(1, card)[card[0]]
    metadata = primary.node.store.life(card[0], 1)[1]
    assert metadata is not None
    for running in trio.running():  # in table files, not only in RocksDB's WAL, which any flush deletes
        await wait_until(lambda r=running: r.node.store.applied_index >= primary.node.store.applied_index, 10,
                         "every node to apply them")
        for needle in (ciphertext, metadata):
            await wait_until(lambda r=running, n=needle: in_a_table_file(r, n), 10, "the rows in a table file")
    assert body(await primary.service.rotate_epoch("admin", None)) == {"epoch": 2}
    backup = trio.backups()[0]
    # Without an epoch: the active one (2), which holds neither.
    assert body(await backup.service.delete_tokens(card + digits, ACTOR)) == {"deleted": 0}
    assert body(await backup.service.delete_tokens(card + digits + card, ACTOR, 1)) == {"deleted": 2}
    for running in trio.running():
        assert (await running.service.reveal(card + digits, ACTOR, 1))["values"] == [None, None]
    for running in trio.running():
        for needle in (ciphertext, metadata):
            await wait_until(lambda r=running, n=needle: not files_holding(r.config.data_dir, n), 15,
                             f"{running.node_id} to shred the card token's rows")


@pytest.mark.parametrize("removal", ["delete", "destroy"])
@pytest.mark.parametrize("audit", [True, False], ids=["audit-entry", "read-barrier"])
async def test_a_backup_that_has_not_applied_a_delete_never_answers_the_deleted_value(
        tmp_path: Path, audit: bool, removal: str) -> None:
    """docs/guarantees.md: after a delete's (or an epoch destroy's) acknowledgement the value is null on
    every node, a backup that has not applied it yet included: its answer (a detokenize's, a reveal's)
    waits for what was committed before the request."""
    configs = [dataclasses.replace(config, audit=AuditConfig(enabled=audit)) for config in make_configs(tmp_path, 3)]
    trio = Cluster(configs)
    try:
        for config in configs:
            trio.nodes.append(await start_node(config))
        await _backup_never_answers_a_deleted_value(trio, audit, removal)
    finally:
        await trio.close()


@contextlib.contextmanager
def appends_withheld(lagging: RunningNode) -> Iterator[None]:
    """Inside, ``lagging`` hears no appends or heartbeats: it still forwards and hears answers (and a read
    index), so what it applies stays behind what the primary commits."""
    transport = lagging.node.transport
    assert transport is not None
    deliver = transport._on_message

    def without_appends(sender: str, message: object) -> None:
        if not isinstance(message, (AppendEntries, Heartbeat)):
            deliver(sender, message)

    transport._on_message = without_appends  # type: ignore[method-assign]
    try:
        yield
    finally:
        transport._on_message = deliver  # type: ignore[method-assign]


async def test_a_lagging_backup_answers_the_metadata_a_tokenize_acknowledged_before_the_request_gave(
        trio: Cluster) -> None:
    """docs/tokens.md: a tokenize with metadata replaces the mapping's metadata. A backup that had not
    applied that replacement when a reveal came in answered the old metadata once it caught up (it
    checked only that the mapping was still live; checked on the code before: {"v":1})."""
    primary = await trio.wait_for_stable_primary()
    (token,) = body(await primary.service.tokenize("p", ["meta-value"], None, metadata_json='{"v":1}'))["tokens"]
    lagging = trio.backups()[0]
    await wait_until(lambda: lagging.node.store.lookup([token]), 5, "the backup to apply the token")
    with appends_withheld(lagging):
        again = await primary.service.tokenize("p", ["meta-value"], None, metadata_json='{"v":2}')
        assert body(again)["tokens"] == [token]
        revealed = asyncio.create_task(lagging.service.reveal([token], ACTOR, include_metadata=True))
        await asyncio.sleep(0.3)
        assert not revealed.done(), "answered before its audit entry was applied here"
    assert await revealed == {"values": ["meta-value"], "metadata_json": ['{"v":2}']}


async def _backup_never_answers_a_deleted_value(trio: Cluster, audit: bool, removal: str = "delete") -> None:
    primary = await trio.wait_for_stable_primary()
    (token,) = body(await primary.service.tokenize("p", ["stale-read"], None))["tokens"]
    lagging = trio.backups()[0]
    await wait_until(lambda: lagging.node.store.lookup([token]), 5, "the backup to apply the token")
    if removal == "destroy":
        await primary.service.rotate_epoch("admin", None)  # the active epoch cannot be destroyed
        await wait_until(lambda: lagging.node.store.active_epoch() == 2, 5, "the backup to apply the rotation")
    with appends_withheld(lagging):
        if removal == "delete":
            await primary.service.delete_tokens([token], ACTOR)
        else:
            await primary.service.destroy_epoch(1, ACTOR)
            assert 1 in lagging.node.keyring, "the backup has not applied the destroy"
        assert lagging.node.store.lookup([token]), "the backup has not applied the removal"
        asked = asyncio.create_task(lagging.service.detokenize([token]))
        revealed = asyncio.create_task(lagging.service.reveal([token], ACTOR))  # the same rule, its own path

        def audited() -> bool:
            return any(record.get("action") == "detokenize" and record.get("node") == lagging.node_id
                       for record in primary.node.store.audit_page(0, 1000))

        def waiting() -> bool:  # the audit entry committed on the primary, or the read index answered
            return audited() if audit else bool(lagging.node._reads_waiting_apply)

        await wait_until(waiting, 5, "the backup to learn the index it must apply first")
        assert not asked.done(), "answered before applying what was committed before the request"
        assert not revealed.done(), "revealed before applying what was committed before the request"
    assert await asked == [None]
    assert await revealed == {"values": [None]}


async def test_a_detokenize_answered_null_by_a_backup_that_applied_the_delete_late_is_audited_as_found(
        trio: Cluster) -> None:
    """docs/security.md, "Audit trail": a detokenize's (or reveal's) ``found`` counts the tokens that had a
    value when first looked up. A backup that had not applied an acknowledged delete looks the token up,
    commits the record (found 1), applies the delete while catching up to the record's entry and answers
    null: the record keeps found 1 (counting the final answer would take a read barrier before every
    record, a round trip per detokenize)."""
    primary = await trio.wait_for_stable_primary()
    (token,) = body(await primary.service.tokenize("p", ["counted"], None))["tokens"]
    lagging = trio.backups()[0]
    await wait_until(lambda: lagging.node.store.lookup([token]), 5, "the backup to apply the token")
    def records() -> dict[str, dict]:
        return {record["request_id"]: record for record in primary.node.store.audit_page(0, 1000)
                if record["action"] == "detokenize" and record["node"] == lagging.node_id}

    with appends_withheld(lagging):
        await primary.service.delete_tokens([token], ACTOR)
        assert lagging.node.store.lookup([token]), "the backup has not applied the delete"
        asked = asyncio.create_task(lagging.service.detokenize([token], commands.Actor(name="r", request_id="d")))
        revealed = asyncio.create_task(lagging.service.reveal([token], commands.Actor(name="r", request_id="v")))
        await wait_until(lambda: {"d", "v"} <= set(records()), 5, "the backup's audit records to commit")
        assert not asked.done() and not revealed.done()
    assert await asked == [None]
    assert await revealed == {"values": [None]}
    assert [(records()[request]["items"], records()[request]["found"]) for request in "dv"] == [(1, 1), (1, 1)]


async def test_a_deleted_value_tokenized_again_gets_the_same_token_and_a_replay_resurrects_nothing(
        single: RunningNode) -> None:
    service = single.service
    first = await service.tokenize("p", ["replayed"], "idem")
    token = body(first)["tokens"][0]
    await service.delete_tokens([token], ACTOR)
    replay = await service.tokenize("p", ["replayed"], "idem")
    assert replay.replayed and replay.body == first.body
    assert await service.detokenize([token]) == [None]
    again = body(await service.tokenize("p", ["replayed"], None))["tokens"][0]
    assert again == token and await service.detokenize([token]) == ["replayed"]


async def test_retokenize_reissues_in_the_active_epoch_without_the_value_leaving(trio: Cluster) -> None:
    primary = await trio.wait_for_stable_primary()
    old = body(await primary.service.tokenize("p", ["alpha", "beta"], None))["tokens"]
    await primary.service.delete_tokens([old[1]], ACTOR)
    assert body(await primary.service.rotate_epoch("admin", None)) == {"epoch": 2}
    backup = trio.backups()[0]
    unknown = "tv1_" + "b" * 32
    document = await backup.service.retokenize([old[0], old[1], unknown, old[0]], ACTOR)
    assert document["epoch"] == 2
    new = document["tokens"]
    assert new[1] is None and new[2] is None and new[0] == new[3] and new[0].startswith("tv2_")
    # Exactly the token a tokenize of the value gives in epoch 2.
    assert body(await primary.service.tokenize("p", ["alpha"], None))["tokens"] == [new[0]]
    assert await backup.service.detokenize([new[0], old[0]]) == ["alpha", "alpha"]
    assert "token.retokenize" in [record["action"] for record in primary.node.store.audit_page(0, 100)]


async def test_tokens_re_tokenized_into_an_epoch_destroyed_since_are_re_tokenized_again_from_their_old_ones(
        single: RunningNode) -> None:
    """What `tokenvault admin epoch destroy 2` tells of a migration out of epoch 1 that put tokens into
    epoch 2 (tests/unit/test_cli_lifecycle.py): their new tokens go with epoch 2, their old ones keep their
    values, and re-tokenizing those (`epoch migrate 1 --restart`) puts them into the active epoch."""
    service = single.service
    old = body(await service.tokenize("p", ["alpha", "beta"], None))["tokens"]
    await service.rotate_epoch("admin", None)
    into_two = (await service.retokenize(old, ACTOR))["tokens"]
    assert [token[:4] for token in into_two] == ["tv2_", "tv2_"]
    await service.rotate_epoch("admin", None)
    await service.destroy_epoch(2, ACTOR)
    assert await service.detokenize(into_two) == [None, None]
    again = await service.retokenize(old, ACTOR)
    assert again["epoch"] == 3 and await service.detokenize(again["tokens"]) == ["alpha", "beta"]
    assert await service.detokenize(old) == ["alpha", "beta"]


async def epoch_pages(service: NodeService, epoch: int, limit: int) -> list[list[str]]:
    """The pages of ``epoch``'s tokens, walked by next_after until it is null."""
    pages, after = [], None
    while True:
        page = await service.epoch_tokens(epoch, after, limit)
        pages.append(page["tokens"])
        if page["next_after"] is None:
            return pages
        after = page["next_after"]


async def test_epoch_pages_list_every_token_of_the_epoch_once(single: RunningNode) -> None:
    service = single.service
    tokens = body(await service.tokenize("p", [f"v{n}" for n in range(23)], None))["tokens"]
    await service.rotate_epoch("admin", None)
    body(await service.tokenize("p", ["in-epoch-2"], None))
    pages = await epoch_pages(service, 1, 10)
    assert [len(page) for page in pages] == [10, 10, 3]
    assert sorted(sum(pages, [])) == sorted(tokens)
    # docs/api.md: next_after is null on the last page, a full one too (no empty page after it).
    assert [len(page) for page in await epoch_pages(service, 1, 23)] == [23]
    with pytest.raises(NotFound):
        await service.epoch_tokens(9, None, 10)


async def test_card_and_digits_tokens_are_paged_and_retokenized_in_their_format_with_their_life(
        trio: Cluster) -> None:
    """docs/api.md, re-tokenize and epoch pages: an epoch's pages list its card and digits tokens after its
    opaque ones; re-tokenizing them (looked up in the epoch named) issues each value in its own format in the
    active epoch (a Luhn-valid number tokenized as digits stays digits), with its expiry and metadata; this
    runs on a backup, which routes it to the primary."""
    primary = await trio.wait_for_stable_primary()
    service = primary.service
    opaque = body(await service.tokenize("p", ["plain-1", "plain-2"], None, metadata_json='{"k":"o"}',
                                         ttl_seconds=3600))["tokens"]
    card = body(await service.tokenize("p", ["4111 1111 1111 1111"], None, token_format="card",
                                       metadata_json='{"k":"c"}'))["tokens"]
    digits = body(await service.tokenize("p", ["4111111111111111", "000123456"], None, token_format="digits",
                                         ttl_seconds=7200))["tokens"]
    issued = {token: primary.node.store.life(token, None if token.startswith("tv") else 1)[0]
              for token in opaque + card + digits}
    assert body(await service.rotate_epoch("admin", None)) == {"epoch": 2}
    pages = await epoch_pages(service, 1, 2)  # pages of two: the cursor crosses from opaque to format tokens
    assert [len(page) for page in pages] == [2, 2, 1]
    seen = sum(pages, [])
    assert seen[:2] == sorted(opaque) and sorted(seen[2:]) == sorted(card + digits) and len(seen) == 5

    backup = trio.backups()[0]
    document = await backup.service.retokenize(opaque + card + digits + ["4111111111111111"], ACTOR, epoch=1)
    assert document["epoch"] == 2
    new = dict(zip(opaque + card + digits + ["unknown"], document["tokens"]))
    assert new["unknown"] is None  # a digit string that is no token of epoch 1
    # Each is the token a tokenize of the value in its format gives in epoch 2.
    assert body(await service.tokenize("p", ["plain-1", "plain-2"], None))["tokens"] == [new[t] for t in opaque]
    assert body(await service.tokenize("p", ["4111111111111111"], None, token_format="card"))["tokens"] == \
        [new[card[0]]]
    assert body(await service.tokenize("p", ["4111111111111111", "000123456"], None, token_format="digits")
                )["tokens"] == [new[t] for t in digits]
    for old_token, expires_at_ms in issued.items():  # the same expiry, to the millisecond
        format_epoch = None if old_token.startswith("tv") else 2
        assert primary.node.store.life(new[old_token], format_epoch)[0] == expires_at_ms, old_token
    found = await service.reveal([new[opaque[0]], new[card[0]], new[digits[1]]], ACTOR, 2, include_metadata=True)
    assert found["values"] == ["plain-1", "4111111111111111", "000123456"]
    assert found["metadata_json"] == ['{"k":"o"}', '{"k":"c"}', None]
    # A format token is looked up in the active epoch when none is named: not there.
    assert (await service.retokenize(card, ACTOR))["tokens"] == [None]


async def test_destroy_shreds_the_epoch_secret_from_every_file_of_every_node(trio: Cluster) -> None:
    primary = await trio.wait_for_stable_primary()
    token = body(await primary.service.tokenize("p", ["doomed"], None))["tokens"][0]
    wrapped = primary.node.store.epochs()[0].wrapped_secret
    assert len(wrapped) >= 32
    for running in trio.running():
        assert files_holding(running.config.data_dir, wrapped), "the scan must see the secret before"
    forgotten: list[tuple[str, int]] = []
    for running in trio.running():  # as the service registers its sealer's forget
        running.node.epoch_destroyed_handlers.append(
            lambda epoch, node_id=running.node_id: forgotten.append((node_id, epoch)))
    with pytest.raises(EpochActive):
        await primary.service.destroy_epoch(1, ACTOR)
    await primary.service.rotate_epoch("admin", None)
    with pytest.raises(NotFound):
        await trio.backups()[0].service.destroy_epoch(7, ACTOR)
    outcome = await trio.backups()[0].service.destroy_epoch(1, ACTOR)
    assert (outcome.status, body(outcome)) == (200, {"epoch": 1, "state": "destroyed"})
    assert (await primary.service.destroy_epoch(1, ACTOR)).status == 200  # idempotent
    for running in trio.running():
        try:
            await wait_until(lambda: not files_holding(running.config.data_dir, wrapped), 10,
                             f"{running.node_id} to shred epoch 1's wrapped secret")
        except AssertionError:
            raise AssertionError(f"still holding it: {files_holding(running.config.data_dir, wrapped)}") from None
        assert 1 not in running.node.keyring
        assert await running.service.detokenize([token]) == [None]
        assert (await running.service.list_epochs())["epochs"][0]["state"] == "destroyed"
    with pytest.raises(EpochDestroyed):
        await primary.service.retokenize([token], ACTOR)
    assert sorted(set(forgotten)) == [(running.node_id, 1) for running in sorted(trio.running(),
                                                                                   key=lambda r: r.node_id)]


async def test_delete_shreds_the_ciphertext_from_the_store_and_the_log(single: RunningNode) -> None:
    service, node = single.service, single.node
    token = body(await service.tokenize("p", ["secret-value"], None))["tokens"][0]
    ciphertext = node.store.lookup([token])[token]
    assert files_holding(single.config.data_dir, ciphertext)
    await service.delete_tokens([token], ACTOR)
    await wait_until(lambda: not files_holding(single.config.data_dir, ciphertext), 10, "the ciphertext shredded")
    assert node.wal.first_held_index > node.store.applied_index - 1


async def test_a_restarted_node_detokenizes_null_for_a_destroyed_epoch(trio: Cluster) -> None:
    primary = await trio.wait_for_stable_primary()
    token = body(await primary.service.tokenize("p", ["v"], None))["tokens"][0]
    await primary.service.rotate_epoch("admin", None)
    await primary.service.destroy_epoch(1, ACTOR)
    backup = trio.backups()[0]
    await wait_until(lambda: backup.node.store.epochs()[0].state == "destroyed", 5, "the destroy applied")
    restarted = await trio.restart(backup)
    assert 1 not in restarted.node.keyring
    assert 2 in restarted.node.keyring
    await trio.wait_for_stable_primary()  # its detokenize is audited through the primary
    assert await restarted.service.detokenize([token]) == [None]


def forward_answers_of(primary: RunningNode) -> list[ForwardResponse]:
    """The forward answers ``primary`` sends from now on, kept here instead of sent (heartbeats and appends
    still flow)."""
    sent: list[ForwardResponse] = []
    send = primary.node.send_to_peer

    def recording_send(peer: str, message: object) -> bool:
        if isinstance(message, ForwardResponse):
            sent.append(message)
            return True
        return send(peer, message)

    primary.node.send_to_peer = recording_send  # type: ignore[method-assign]
    return sent


async def test_forwarded_lifecycle_requests_are_validated_like_the_http_layer(trio: Cluster) -> None:
    primary = await trio.wait_for_stable_primary()
    backup_id = trio.backups()[0].node_id
    sent = forward_answers_of(primary)
    for kind, arguments in (("token.delete", {"tokens": ["not a token"], "actor": None}),
                            ("epoch.destroy", {"epoch": "1", "actor": None}),
                            ("epoch.tokens", {"epoch": 1, "after": "nope", "limit": 5}),
                            ("epoch.tokens", {"epoch": 1, "after": None, "limit": 5000})):
        await primary.service._serve_forward(backup_id, ForwardRequest(
            request_id=1, kind=kind, body=msgpack.packb(arguments)))
        assert sent[-1].status == 400, kind


async def test_a_forwarded_change_writes_its_audit_record_in_the_forwarding_peer_s_name_only(trio: Cluster) -> None:
    """docs/security.md: a peer may write audit records only in its own node's name. That held for
    forwarded audit batches only; a forwarded delete (and rotate, key change, destroy, trim) was
    recorded under whatever node its actor named (checked on the code before: 200, node n3 from n2)."""
    primary = await trio.wait_for_stable_primary()
    (token,) = body(await primary.service.tokenize("p", ["forged"], None))["tokens"]
    sender, other = [backup.node_id for backup in trio.backups()]
    sent = forward_answers_of(primary)

    def delete_as(node: str | None) -> ForwardRequest:
        actor = commands.Actor(name="admin", node=node, request_id="r").fields()
        return ForwardRequest(request_id=1, kind="token.delete",
                              body=msgpack.packb({"tokens": [token], "actor": actor, "epoch": None}))

    await primary.service._serve_forward(sender, delete_as(other))
    assert sent[-1].status == 400
    assert [record for record in primary.node.store.audit_page(0, 100) if record["action"] == "token.delete"] == []
    await primary.service._serve_forward(sender, delete_as(None))  # none named: the sender took it
    assert sent[-1].status == 200
    (record,) = [record for record in primary.node.store.audit_page(0, 100) if record["action"] == "token.delete"]
    assert record["node"] == sender


@pytest.mark.parametrize("removal", ["delete", "destroy"])
async def test_a_node_that_stopped_before_shredding_shreds_when_it_restarts(tmp_path: Path, removal: str) -> None:
    """docs/failure-modes.md: a node down between applying a delete (or an epoch destroy) and shredding
    it shreds when it starts again: the deleted ciphertext (the destroyed epoch's wrapped secret)
    leaves every file of its data directory."""
    configs = make_configs(tmp_path, 1)
    cluster = Cluster(configs)
    try:
        cluster.nodes.append(await start_node(configs[0]))
        running = await cluster.wait_for_stable_primary()
        token = body(await running.service.tokenize("p", ["crash-window"], None))["tokens"][0]
        if removal == "delete":
            secret = running.node.store.lookup([token])[token]
        else:
            secret = running.node.store.epochs()[0].wrapped_secret
            await running.service.rotate_epoch("admin", None)
        running.node.shredder.note = lambda index, command: None  # type: ignore[method-assign]  # "crashes" first
        if removal == "delete":
            await running.service.delete_tokens([token], ACTOR)
        else:
            await running.service.destroy_epoch(1, ACTOR)
        assert files_holding(running.config.data_dir, secret), "not shredded before the restart"
        restarted = await cluster.restart(running)
        await wait_until(lambda: not files_holding(restarted.config.data_dir, secret), 10,
                         f"the restarted node to shred the {removal} it found in its log")
        await cluster.wait_for_stable_primary()
        assert await restarted.service.detokenize([token]) == [None]
    finally:
        await cluster.close()


async def test_ff1_work_leaves_the_event_loop_at_least_every_slice_in_tokenize_and_retokenize(
        single: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """tokenvault/api/lifecycle.py and tokenvault.futures.computed_in_slices: FF1 (about 15 µs a token) is computed at most SLICE_ITEMS tokens
    between two turns of the event loop, in a card tokenize and in a re-tokenize (which classifies each
    token, then seals its value in the new epoch), so a batch never holds the loop for all its tokens.
    A ticker task counts the loop's turns; every FF1 token computed is stamped with the count."""
    service = single.service
    count = 3 * SLICE_ITEMS + 5
    cards = [luhn_complete(f"4{index:014d}") for index in range(count)]
    stamps: list[int] = []
    turns = 0
    card_token = FormatKeys.card_token

    def stamped(self: FormatKeys, digits: str) -> str:
        stamps.append(turns)
        return card_token(self, digits)

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    monkeypatch.setattr(FormatKeys, "card_token", stamped)
    ticking = asyncio.ensure_future(ticker())
    try:
        tokens = body(await service.tokenize("p", cards, None, token_format="card"))["tokens"]
        assert len(stamps) == count
        assert max(collections.Counter(stamps).values()) <= SLICE_ITEMS
        assert body(await service.rotate_epoch("admin", None)) == {"epoch": 2}
        stamps.clear()
        document = await service.retokenize(tokens, ACTOR, epoch=1)
        assert len(stamps) == 2 * count  # each classified (a card: one FF1), then sealed in epoch 2
        assert max(collections.Counter(stamps).values()) <= SLICE_ITEMS
    finally:
        ticking.cancel()
    monkeypatch.undo()
    assert document["tokens"] == body(await service.tokenize("p", cards, None, token_format="card"))["tokens"]


async def test_a_mapping_that_expires_while_it_is_retokenized_answers_null_and_the_others_are_reissued(
        single: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mapping read live whose expiry passes before the new entry is issued: re-tokenize answers null
    for it, as for any expired token, and re-issues the rest (an entry cannot be issued with an expiry
    already past). The clock the re-tokenize reads is moved past the expiry once the mappings are read."""
    service = single.service
    short = body(await service.tokenize("p", ["short-lived"], None, ttl_seconds=60))["tokens"][0]
    longer = body(await service.tokenize("p", ["long-lived"], None, ttl_seconds=3600))["tokens"][0]
    plain = body(await service.tokenize("p", ["no-expiry"], None))["tokens"][0]
    card = body(await service.tokenize("p", ["4111111111111111"], None, token_format="card",
                                       ttl_seconds=60))["tokens"][0]
    expiry = max(single.node.store.life(short, None)[0], single.node.store.life(card, 1)[0])
    assert single.node.store.life(longer, None)[0] > expiry + 5
    assert body(await service.rotate_epoch("admin", None)) == {"epoch": 2}
    real_time = lifecycle_module.time.time
    calls = 0

    def later_after_the_read() -> float:
        nonlocal calls
        calls += 1
        return real_time() if calls == 1 else (expiry + 5) / 1000  # the first call dates the read

    monkeypatch.setattr(lifecycle_module, "time", SimpleNamespace(time=later_after_the_read))
    document = await service.retokenize([short, longer, plain, card], ACTOR, epoch=1)
    monkeypatch.undo()
    assert document["epoch"] == 2
    new_short, new_longer, new_plain, new_card = document["tokens"]
    assert new_short is None and new_card is None
    assert new_longer is not None and new_plain is not None
    assert (await service.reveal([new_longer, new_plain], ACTOR, 2))["values"] == ["long-lived", "no-expiry"]


async def test_a_retokenize_of_many_expiries_is_one_entry_with_an_expiry_per_item(
        single: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each mapping keeps its expiry to the millisecond, and mappings with as many expiries as items
    still make one tokenize entry (an expiry per item), not one per expiry. A value two re-tokenized
    tokens share (tokenized in two epochs) is issued once with the later expiry, or none if one has none."""
    service = single.service
    timed = [body(await service.tokenize("p", [f"timed-{number}"], None, ttl_seconds=100 + number))["tokens"][0]
             for number in range(10)]
    forever = body(await service.tokenize("p", ["forever-1", "forever-2"], None))["tokens"]
    shared_early = body(await service.tokenize("p", ["shared"], None, ttl_seconds=100))["tokens"][0]
    kept = body(await service.tokenize("p", ["kept"], None))["tokens"][0]
    assert body(await service.rotate_epoch("admin", None)) == {"epoch": 2}
    shared_late = body(await service.tokenize("p", ["shared"], None, ttl_seconds=900))["tokens"][0]
    kept_timed = body(await service.tokenize("p", ["kept"], None, ttl_seconds=100))["tokens"][0]
    assert body(await service.rotate_epoch("admin", None)) == {"epoch": 3}
    old = timed + forever + [shared_early, shared_late, kept, kept_timed]
    expiries = {token: single.node.store.life(token, None)[0] for token in old}
    assert len({expiries[token] for token in timed}) == 10
    proposed: list[commands.TokenizeCommand] = []
    propose = service._propose

    async def recording(payload: bytes):
        command = commands.decode_command(payload)
        if isinstance(command, commands.TokenizeCommand):
            proposed.append(command)
        return await propose(payload)

    monkeypatch.setattr(service, "_propose", recording)
    document = await service.retokenize(old, ACTOR)
    new = dict(zip(old, document["tokens"]))
    assert document["epoch"] == 3 and len(proposed) == 1
    assert proposed[0].expires_at_ms is None and len(proposed[0].item_expires_at_ms) == len(proposed[0].items) == 14
    for token in timed + forever:
        assert single.node.store.life(new[token], None)[0] == expiries[token], token
    assert new[shared_early] == new[shared_late] and new[kept] == new[kept_timed]
    assert single.node.store.life(new[shared_late], None)[0] == expiries[shared_late]
    assert single.node.store.life(new[kept], None)[0] is None


async def test_a_mapping_that_never_expires_stays_so_when_the_active_epoch_holds_its_value_with_a_ttl(
        single: RunningNode) -> None:
    """docs/api.md, re-tokenize: the new mapping keeps the old one's expiry. A mapping that never expires,
    re-tokenized into an epoch where another client tokenized the same value with a TTL, never expires
    either: the migration that destroys its old epoch must not leave its value with only that TTL (a
    tokenize without a TTL leaves a live expiry as it is, docs/tokens.md, but a re-tokenize carries a
    life over). A mapping with the later expiry keeps it; one with the earlier gets the later."""
    service = single.service
    forever = body(await service.tokenize("p", ["kept-forever"], None))["tokens"][0]
    card = body(await service.tokenize("p", ["4111111111111111"], None, token_format="card"))["tokens"][0]
    early = body(await service.tokenize("p", ["early"], None, ttl_seconds=100))["tokens"][0]
    assert body(await service.rotate_epoch("admin", None)) == {"epoch": 2}
    timed = body(await service.tokenize("p", ["kept-forever"], None, ttl_seconds=100))["tokens"][0]
    timed_card = body(await service.tokenize("p", ["4111111111111111"], None, token_format="card",
                                             ttl_seconds=100))["tokens"][0]
    late = body(await service.tokenize("p", ["early"], None, ttl_seconds=900))["tokens"][0]
    assert single.node.store.life(timed, None)[0] is not None and single.node.store.life(timed_card, 2)[0] is not None
    late_expiry = single.node.store.life(late, None)[0]
    document = await service.retokenize([forever, early], ACTOR)
    assert document == {"epoch": 2, "tokens": [timed, late]}
    assert (await service.retokenize([card], ACTOR, epoch=1))["tokens"] == [timed_card]
    assert single.node.store.life(timed, None)[0] is None
    assert single.node.store.life(timed_card, 2)[0] is None
    assert single.node.store.life(late, None)[0] == late_expiry
    # A plain tokenize without a TTL still leaves a live expiry as it is (docs/tokens.md's table).
    again = body(await service.tokenize("p", ["other"], None, ttl_seconds=100))["tokens"][0]
    assert body(await service.tokenize("p", ["other"], None))["tokens"] == [again]
    assert single.node.store.life(again, None)[0] is not None


async def test_a_restarted_node_logs_shred_done_once_the_delete_it_found_in_its_log_is_shredded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/failure-modes.md: a node that stopped between applying a delete and shredding it shreds when it
    starts again, and says `shred.done` once finished: through the delete's entry, its two rows (the
    mapping's and its life row), and when it says so the ciphertext is in none of its files. Before it
    shredded, nothing was said."""
    configs = make_configs(tmp_path, 1)
    cluster = Cluster(configs)
    still_on_disk_when_said: list[bool] = []
    ciphertext = b""

    class WatchedLog:
        """The shredder's logger, looking at the node's files at the moment shred.done is said."""

        def __init__(self, logger: object) -> None:
            self._logger = logger

        def info(self, event: str, **fields: object) -> None:
            if event == "shred.done":
                still_on_disk_when_said.append(bool(files_holding(configs[0].data_dir, ciphertext)))
            self._logger.info(event, **fields)  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> object:
            return getattr(self._logger, name)

    monkeypatch.setattr(shred_module, "log", WatchedLog(shred_module.log))
    with capture_logs() as logs:
        try:
            cluster.nodes.append(await start_node(configs[0]))
            running = await cluster.wait_for_stable_primary()
            token = body(await running.service.tokenize("p", ["shred-me"], None))["tokens"][0]
            ciphertext = running.node.store.lookup([token])[token]
            noted: list[int] = []
            # The node "crashes" after applying the delete and before shredding it.
            running.node.shredder.note = lambda index, command: noted.append(index)  # type: ignore[method-assign]
            await running.service.delete_tokens([token], ACTOR)
            assert len(noted) == 1, "the delete's entry"
            assert files_holding(running.config.data_dir, ciphertext), "not shredded before the restart"
            assert [entry for entry in logs if entry["event"] == "shred.done"] == []
            await cluster.restart(running)
            done = await wait_until(lambda: [entry for entry in logs if entry["event"] == "shred.done"], 10,
                                    "the restarted node to log shred.done")
        finally:
            await cluster.close()
    assert [(entry["log_level"], entry["through_index"], entry["rows"]) for entry in done] == [("info", noted[0], 2)]
    assert type(done[0]["store_seconds"]) is float and 0 <= done[0]["store_seconds"] < 10
    assert still_on_disk_when_said == [False], "shred.done was said while a file still held the ciphertext"


async def test_a_retokenize_one_of_whose_entries_is_refused_after_another_was_proposed_may_have_taken_effect(
        single: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-tokenize of mappings with and without metadata proposes two entries together: when the primary
    refuses the second (its queue of uncommitted entries full) after the first was proposed, the first's
    tokens are issued, so the answer is a 503 whose effect is unknown. It was the refusal's own 503
    overloaded, "effect": "none", while the first entry committed (checked on the code before)."""
    service = single.service
    plain = body(await service.tokenize("p", ["plain-1"], None))["tokens"]
    described = body(await service.tokenize("p", ["plain-2"], None, metadata_json='{"k":"o"}'))["tokens"]
    assert body(await service.rotate_epoch("admin", None)) == {"epoch": 2}
    propose, payloads = single.node.propose, []

    async def second_refused(payload: bytes, timeout_seconds: float):
        payloads.append(payload)
        if len(payloads) == 2:
            raise ProposalRejected("too many uncommitted entries")
        return await propose(payload, timeout_seconds)
    monkeypatch.setattr(single.node, "propose", second_refused)
    with pytest.raises(Unavailable) as raised:
        await service.retokenize(plain + described, ACTOR)
    assert len(payloads) == 2 and not raised.value.no_effect
    issued = commands.decode_command(payloads[0]).items[0][0]
    assert single.node.store.lookup([issued], int(time.time() * 1000)), "the first entry was written"
