"""Unit tests for tokenvault.store: apply semantics, idempotency, restarts and snapshots."""

from __future__ import annotations

import json
import sqlite3

import pytest

from protocol import Entry, EntryKind
from tokenvault.commands import CommandError, RotateEpochCommand, TokenizeCommand, encode_command
from tokenvault.store import (
    PURGE_LIMIT_PER_COMMAND,
    InsertOnceViolation,
    Outcome,
    SnapshotRejected,
    StoreCorruption,
    VaultStore,
)

HOUR_MS = 3600 * 1000


def token(epoch: int, number: int) -> str:
    return f"tv{epoch}_{number:032d}"


def tokenize(epoch: int, numbers, *, key: str | None = None, principal: str = "tokenizer",
             at_ms: int = 1_000, ciphertext_prefix: bytes = b"ct-") -> bytes:
    items = tuple((token(epoch, number), ciphertext_prefix + str(number).encode()) for number in numbers)
    fingerprint = b"fp-" + (key or "").encode() if key is not None else None
    return encode_command(TokenizeCommand(epoch, items, principal, key, fingerprint, at_ms))


def rotate(epoch: int, *, key: str | None = None, at_ms: int = 500) -> bytes:
    fingerprint = b"rotate-fp" if key is not None else None
    principal = "admin" if key is not None else None
    return encode_command(RotateEpochCommand(epoch, f"wrapped-{epoch}".encode(), at_ms, principal, key, fingerprint))


class Log:
    """Hands out consecutive entries, like the replicated log would."""

    def __init__(self, view: int = 1) -> None:
        self.next_index = 1
        self.view = view

    def command(self, payload: bytes) -> Entry:
        entry = Entry(self.next_index, self.view, EntryKind.COMMAND, payload)
        self.next_index += 1
        return entry

    def noop(self) -> Entry:
        entry = Entry(self.next_index, self.view, EntryKind.NOOP, b"")
        self.next_index += 1
        return entry


@pytest.fixture
def store(tmp_path):
    vault = VaultStore.open(tmp_path / "vault.db")
    yield vault
    vault.close()


def started(store: VaultStore, log: Log) -> None:
    """Bring a store to epoch 1, as a new cluster's first primary does."""
    (result,) = store.apply_batch([log.noop(), log.command(rotate(1))])
    assert result.outcome == Outcome.OK


def table_dump(store: VaultStore) -> dict:
    connection = store._connection
    return {table: connection.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("tokens", "epochs", "idempotency", "meta")}


def test_fresh_store_is_empty_and_uses_wal_journal_mode(tmp_path):
    vault = VaultStore.open(tmp_path / "vault.db")
    assert (vault.applied_index, vault.applied_view, vault.active_epoch(), vault.token_count()) == (0, 0, 0, 0)
    assert vault.epochs() == []
    vault.close()
    connection = sqlite3.connect(tmp_path / "vault.db")
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()


def test_rotation_creates_active_epoch_and_retires_the_previous(store):
    log = Log()
    results = store.apply_batch([log.command(rotate(1)), log.command(rotate(2, at_ms=900))])
    assert [(r.outcome, r.status, r.response) for r in results] == [
        (Outcome.OK, 201, b'{"epoch":1}'), (Outcome.OK, 201, b'{"epoch":2}')]
    assert store.active_epoch() == 2
    assert [(e.epoch, e.state, e.wrapped_secret, e.created_at_ms) for e in store.epochs()] == [
        (1, "retired", b"wrapped-1", 500), (2, "active", b"wrapped-2", 900)]


@pytest.mark.parametrize("epoch", [1, 3])
def test_rotation_to_other_than_active_plus_one_is_stale_and_writes_nothing(store, epoch):
    log = Log()
    store.apply_batch([log.command(rotate(1))])
    (result,) = store.apply_batch([log.command(rotate(epoch, key="r"))])
    assert (result.outcome, result.status, result.response) == (Outcome.STALE_EPOCH, None, None)
    assert [e.epoch for e in store.epochs()] == [1]
    assert store.idempotency_get("admin", "r") is None
    assert store.applied_index == 2


def test_tokenize_inserts_and_answers_with_the_exact_body(store):
    log = Log()
    started(store, log)
    (result,) = store.apply_batch([log.command(tokenize(1, [5, 6, 7], key="exact"))])
    expected_body = json.dumps({"epoch": 1, "tokens": [token(1, 5), token(1, 6), token(1, 7)]},
                               separators=(",", ":")).encode()
    assert (result.outcome, result.status, result.response) == (Outcome.OK, 200, expected_body)
    assert (result.kind, result.epoch, result.items) == ("tokenize", 1, 3)
    assert store.idempotency_get("tokenizer", "exact").response == expected_body
    assert store.lookup([token(1, 6), token(1, 99)]) == {token(1, 6): b"ct-6"}
    assert store.token_count() == 3
    # Without an idempotency key nothing can be replayed, so no body is built or kept.
    (unkeyed,) = store.apply_batch([log.command(tokenize(1, [8]))])
    assert (unkeyed.outcome, unkeyed.status, unkeyed.response, unkeyed.items) == (Outcome.OK, 200, None, 1)


def test_tokenize_in_another_epoch_is_a_mismatch_and_writes_nothing(store):
    log = Log()
    started(store, log)
    (result,) = store.apply_batch([log.command(tokenize(2, [1], key="k"))])
    assert (result.outcome, result.status, result.response) == (Outcome.EPOCH_MISMATCH, None, None)
    assert store.lookup([token(2, 1)]) == {}
    assert store.idempotency_get("tokenizer", "k") is None
    assert store.token_count() == 0
    assert store.applied_index == log.next_index - 1


def test_tokenize_before_any_epoch_is_a_mismatch(store):
    (result,) = store.apply_batch([Log().command(tokenize(1, [1]))])
    assert result.outcome == Outcome.EPOCH_MISMATCH


def test_existing_token_with_the_same_ciphertext_is_accepted(store):
    log = Log()
    started(store, log)
    results = store.apply_batch([log.command(tokenize(1, [1, 2])), log.command(tokenize(1, [2, 2, 3]))])
    assert [r.outcome for r in results] == [Outcome.OK, Outcome.OK]
    assert store.token_count() == 3


def test_insert_once_violation_is_refused_and_the_batch_rolled_back(store):
    log = Log()
    started(store, log)
    store.apply_batch([log.command(tokenize(1, [1]))])
    before = table_dump(store)
    applied_before = store.applied_index
    batch = [log.command(tokenize(1, [2])), log.command(tokenize(1, [1], ciphertext_prefix=b"other-"))]
    with pytest.raises(InsertOnceViolation) as raised:
        store.apply_batch(batch)
    assert "ct-" not in str(raised.value) and token(1, 1) not in str(raised.value)
    assert store.lookup([token(1, 1), token(1, 2)]) == {token(1, 1): b"ct-1"}
    assert store.applied_index == applied_before
    assert table_dump(store) == before


def test_conflicting_pair_inside_one_command_is_refused(store):
    log = Log()
    started(store, log)
    items = ((token(1, 1), b"first"), (token(1, 1), b"second"))
    payload = encode_command(TokenizeCommand(1, items, "p", None, None, 1))
    with pytest.raises(InsertOnceViolation):
        store.apply_batch([log.command(payload)])
    assert store.lookup([token(1, 1)]) == {}


def test_a_batch_of_many_rows_is_stored_whole_across_every_insert_chunk_size(store):
    # 257 + 130 + 3 rows in one batch go in as chunks of every size from 256 down to 1.
    log = Log()
    started(store, log)
    commands = [range(1, 258), range(258, 388), [388, 389, 1]]
    results = store.apply_batch([log.command(tokenize(1, numbers)) for numbers in commands])
    assert [(r.outcome, r.items) for r in results] == [(Outcome.OK, 257), (Outcome.OK, 130), (Outcome.OK, 3)]
    assert store.token_count() == 389
    every = [token(1, number) for number in range(1, 390)]
    assert store.lookup(every) == {token(1, number): b"ct-" + str(number).encode() for number in range(1, 390)}
    assert store.lookup([token(1, 390)]) == {}


def test_insert_once_violation_names_the_entry_that_conflicts(store):
    log = Log()
    started(store, log)
    fine = log.command(tokenize(1, [1, 2]))
    conflicting = log.command(tokenize(1, [3, 1], ciphertext_prefix=b"other-"))
    after = log.command(tokenize(1, [4]))
    with pytest.raises(InsertOnceViolation) as raised:
        store.apply_batch([fine, conflicting, after])
    assert f"entry {conflicting.index} " in str(raised.value)
    assert store.token_count() == 0
    assert store.lookup([token(1, number) for number in (1, 2, 3, 4)]) == {}


def test_duplicate_idempotency_key_returns_the_first_response_even_after_rotation(store):
    log = Log()
    started(store, log)
    (first,) = store.apply_batch([log.command(tokenize(1, [1, 2], key="k1"))])
    store.apply_batch([log.command(rotate(2))])
    (again,) = store.apply_batch([log.command(tokenize(2, [1, 2], key="k1"))])
    assert again.outcome == Outcome.DUPLICATE
    assert (again.status, again.response) == (200, first.response)
    assert store.lookup([token(2, 1)]) == {}  # the duplicate wrote nothing
    record = store.idempotency_get("tokenizer", "k1")
    assert (record.kind, record.fingerprint, record.status, record.response) == (
        "tokenize", b"fp-k1", 200, first.response)


def test_idempotency_keys_are_scoped_per_principal(store):
    log = Log()
    started(store, log)
    results = store.apply_batch([log.command(tokenize(1, [1], key="same", principal="a")),
                                 log.command(tokenize(1, [2], key="same", principal="b"))])
    assert [r.outcome for r in results] == [Outcome.OK, Outcome.OK]


def test_duplicate_rotation_returns_the_first_epoch(store):
    log = Log()
    started(store, log)
    (first,) = store.apply_batch([log.command(rotate(2, key="rot"))])
    (again,) = store.apply_batch([log.command(rotate(3, key="rot"))])
    assert (again.outcome, again.status, again.response) == (Outcome.DUPLICATE, 201, b'{"epoch":2}')
    assert first.response == b'{"epoch":2}'
    assert store.active_epoch() == 2


def test_already_applied_indexes_are_skipped(store):
    log = Log()
    entries = [log.command(rotate(1)), log.command(tokenize(1, [1])), log.noop()]
    assert len(store.apply_batch(entries)) == 2
    more = [log.command(tokenize(1, [2]))]
    results = store.apply_batch(entries + more)
    assert [r.index for r in results] == [4]
    assert store.apply_batch(entries + more) == []
    assert store.applied_index == 4 and store.token_count() == 2


def test_noop_moves_the_applied_position_only(store):
    results = store.apply_batch([Entry(1, 3, EntryKind.NOOP, b""), Entry(2, 4, EntryKind.NOOP, b"")])
    assert results == []
    assert (store.applied_index, store.applied_view) == (2, 4)


def test_a_gap_is_refused_and_nothing_applied(store):
    log = Log()
    first = log.command(rotate(1))
    log.next_index += 1
    with pytest.raises(ValueError):
        store.apply_batch([first, log.command(tokenize(1, [1]))])
    assert store.applied_index == 0 and store.active_epoch() == 0


def test_a_malformed_committed_command_is_refused_and_nothing_applied(store):
    log = Log()
    with pytest.raises(CommandError):
        store.apply_batch([log.command(rotate(1)), log.command(b"\x93garbage")])
    assert store.applied_index == 0 and store.epochs() == []


def test_restart_keeps_the_state(tmp_path):
    path = tmp_path / "vault.db"
    vault = VaultStore.open(path)
    log = Log(view=2)
    started(vault, log)
    vault.apply_batch([log.command(tokenize(1, [1, 2], key="k"))])
    before = table_dump(vault)
    vault.close()
    reopened = VaultStore.open(path)
    assert table_dump(reopened) == before
    assert (reopened.applied_index, reopened.applied_view) == (3, 2)
    assert reopened.active_epoch() == 1 and reopened.token_count() == 2
    assert reopened.lookup([token(1, 2)]) == {token(1, 2): b"ct-2"}
    assert reopened.idempotency_get("tokenizer", "k").status == 200
    reopened.close()


def test_checkpoint_returns_the_durable_applied_index(tmp_path):
    path = tmp_path / "vault.db"
    vault = VaultStore.open(path)
    log = Log()
    started(vault, log)
    assert vault.checkpoint() == 2
    # After a checkpoint the database file alone holds the state.
    assert not (tmp_path / "vault.db-wal").exists() or (tmp_path / "vault.db-wal").stat().st_size == 0
    vault.close()


def test_expired_idempotency_records_are_purged_deterministically_with_bounded_work(tmp_path):
    stores = [VaultStore.open(tmp_path / f"vault-{n}.db", retention_ms=HOUR_MS) for n in range(2)]
    log = Log()
    entries = [log.command(rotate(1))]
    entries += [log.command(tokenize(1, [n], key=f"old-{n}", at_ms=1_000 + n)) for n in range(20)]
    # Two hours later: each command may purge a bounded number of expired records.
    entries += [log.command(tokenize(1, [100 + n], key=f"new-{n}", at_ms=2 * HOUR_MS + n)) for n in range(2)]
    stores[0].apply_batch(entries)
    for entry in entries:  # same entries, different batch boundaries
        stores[1].apply_batch([entry])
    remaining = [n for n in range(20) if stores[0].idempotency_get("tokenizer", f"old-{n}") is not None]
    assert len(remaining) == 20 - 2 * PURGE_LIMIT_PER_COMMAND
    assert remaining == list(range(2 * PURGE_LIMIT_PER_COMMAND, 20))  # oldest first
    assert table_dump(stores[0]) == table_dump(stores[1])
    for vault in stores:
        vault.close()


def test_the_purge_runs_only_when_a_record_can_have_expired_and_resumes_after_a_reopen(tmp_path):
    path = tmp_path / "vault.db"
    vault = VaultStore.open(path, retention_ms=HOUR_MS)
    log = Log()
    started(vault, log)
    purges: list[str] = []

    def watch(connection):
        connection.set_trace_callback(lambda sql: purges.append(sql) if "DELETE FROM idempotency" in sql else None)

    watch(vault._connection)
    vault.apply_batch([log.command(tokenize(1, [n], key=f"k{n}", at_ms=1_000 + n)) for n in range(6)])
    vault.apply_batch([log.command(tokenize(1, [10], at_ms=HOUR_MS + 1_000))])  # nothing has expired yet
    assert purges == []
    vault.close()
    # Reopened, the store knows the oldest record again, so the purge runs once
    # records expire (here the three oldest).
    vault = VaultStore.open(path, retention_ms=HOUR_MS)
    watch(vault._connection)
    vault.apply_batch([log.command(tokenize(1, [11], at_ms=HOUR_MS + 1_003))])
    assert len(purges) == 1
    assert [vault.idempotency_get("tokenizer", f"k{n}") is None for n in range(6)] == [True] * 3 + [False] * 3
    vault.apply_batch([log.command(tokenize(1, [12], at_ms=3 * HOUR_MS))])
    assert all(vault.idempotency_get("tokenizer", f"k{n}") is None for n in range(6))
    purges.clear()
    vault.apply_batch([log.command(tokenize(1, [13], at_ms=3 * HOUR_MS + 1))])  # the table is empty now
    assert purges == []
    vault.close()


def test_an_expired_key_is_reusable_and_a_live_one_is_not(tmp_path):
    vault = VaultStore.open(tmp_path / "vault.db", retention_ms=HOUR_MS)
    log = Log()
    started(vault, log)
    vault.apply_batch([log.command(tokenize(1, [1], key="k", at_ms=1_000))])
    # Exactly the retention later the record still answers; one millisecond more and it has expired.
    (live,) = vault.apply_batch([log.command(tokenize(1, [2], key="k", at_ms=HOUR_MS + 1_000))])
    assert live.outcome == Outcome.DUPLICATE
    (expired,) = vault.apply_batch([log.command(tokenize(1, [3], key="k", at_ms=HOUR_MS + 1_001))])
    assert expired.outcome == Outcome.OK
    assert json.loads(vault.idempotency_get("tokenizer", "k").response)["tokens"] == [token(1, 3)]
    vault.close()


def test_lookup_handles_many_tokens_in_chunks_and_repeats(store):
    log = Log()
    started(store, log)
    store.apply_batch([log.command(tokenize(1, range(1200)))])
    wanted = [token(1, n) for n in range(0, 1300)] + [token(1, 7)] * 3
    found = store.lookup(wanted)
    assert len(found) == 1200
    assert found[token(1, 1199)] == b"ct-1199" and token(1, 1250) not in found


def test_snapshot_round_trip_replaces_the_whole_state(tmp_path):
    source = VaultStore.open(tmp_path / "source.db")
    log = Log(view=3)
    started(source, log)
    source.apply_batch([log.command(tokenize(1, [1, 2], key="k")), log.command(rotate(2))])
    index, view, image = source.snapshot_bytes()
    assert (index, view) == (4, 3)
    target = VaultStore.open(tmp_path / "target.db")
    other_log = Log()
    started(target, other_log)
    target.apply_batch([other_log.command(tokenize(1, [50]))])
    target.install_snapshot(image, index, view)
    assert table_dump(target) == table_dump(source)
    assert (target.applied_index, target.applied_view, target.active_epoch()) == (4, 3, 2)
    assert target.lookup([token(1, 50)]) == {}
    (result,) = target.apply_batch([log.command(tokenize(2, [9]))])
    assert result.outcome == Outcome.OK
    target.close()
    reopened = VaultStore.open(tmp_path / "target.db")
    assert reopened.applied_index == 5 and reopened.lookup([token(2, 9)]) == {token(2, 9): b"ct-9"}
    reopened.close()
    source.close()


def _foreign_database_image(tmp_path) -> bytes:
    path = tmp_path / "foreign.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE tokens (token TEXT, value TEXT)")
    connection.commit()
    connection.close()
    return path.read_bytes()


def _image_with_trigger(tmp_path, image: bytes) -> bytes:
    path = tmp_path / "with-trigger.db"
    path.write_bytes(image)
    connection = sqlite3.connect(path)
    connection.execute("CREATE TRIGGER t AFTER INSERT ON tokens BEGIN DELETE FROM epochs; END")
    connection.commit()
    connection.close()
    return path.read_bytes()


def test_garbage_and_foreign_snapshot_images_are_rejected_and_change_nothing(tmp_path, store):
    log = Log()
    started(store, log)
    store.apply_batch([log.command(tokenize(1, [1]))])
    before = table_dump(store)
    index, view, image = store.snapshot_bytes()
    half_image = image[: len(image) // 2]
    damaged = bytearray(image)
    page_bytes = int.from_bytes(image[16:18], "big")
    damaged[page_bytes:page_bytes + 12] = b"\xff" * 12  # the b-tree header of page 2
    candidates = [
        (b"", index, view),
        (b"garbage" * 1000, index, view),
        (half_image, index, view),
        (bytes(damaged), index, view),
        (_foreign_database_image(tmp_path), index, view),
        (_image_with_trigger(tmp_path, image), index, view),
        (image, index + 1, view),  # not at the announced position
        (image, index, view + 1),
    ]
    for data, at_index, at_view in candidates:
        with pytest.raises(SnapshotRejected):
            store.install_snapshot(data, at_index, at_view)
        assert table_dump(store) == before
    assert store.lookup([token(1, 1)]) == {token(1, 1): b"ct-1"}


def test_opening_a_foreign_database_is_refused(tmp_path):
    path = tmp_path / "foreign.db"
    path.write_bytes(_foreign_database_image(tmp_path))
    with pytest.raises(StoreCorruption):
        VaultStore.open(path)


def test_opening_a_garbage_file_is_refused(tmp_path):
    path = tmp_path / "garbage.db"
    path.write_bytes(b"not a database at all" * 200)
    with pytest.raises(StoreCorruption):
        VaultStore.open(path)


def test_a_leftover_of_an_interrupted_install_is_removed_on_open(tmp_path):
    VaultStore.open(tmp_path / "vault.db").close()
    leftover = tmp_path / "vault.db.install"
    leftover.write_bytes(b"partial image")
    VaultStore.open(tmp_path / "vault.db").close()
    assert not leftover.exists()


def test_uncommitted_batches_are_lost_in_a_crash_and_a_replay_restores_them(tmp_path):
    """Applied batches are committed together; a crash loses only the uncommitted tail, with its applied index."""
    path = tmp_path / "vault.db"
    vault = VaultStore.open(path)
    vault.commit_interval_seconds = 3600.0  # only an explicit flush commits in this test
    log = Log()
    started(vault, log)
    vault.flush()
    committed = table_dump(vault)
    later = [log.command(tokenize(1, [7, 8])), log.command(tokenize(1, [9], key="k"))]
    vault.apply_batch(later)
    # The same connection reads its own uncommitted rows.
    assert vault.lookup([token(1, 7), token(1, 9)]) == {token(1, 7): b"ct-7", token(1, 9): b"ct-9"}
    assert vault.idempotency_get("tokenizer", "k") is not None and vault.applied_index == 4
    # A second connection sees only what was committed: what a crash would leave on disk.
    on_disk = sqlite3.connect(path)
    assert on_disk.execute("SELECT applied_index FROM meta").fetchone()[0] == 2
    assert on_disk.execute("SELECT count(*) FROM tokens").fetchone()[0] == 0
    on_disk.close()
    vault._connection.close()  # crash: the open transaction is never committed
    reopened = VaultStore.open(path)
    assert table_dump(reopened) == committed and reopened.applied_index == 2
    reopened.apply_batch(later)  # the node replays the log above the applied index
    assert reopened.lookup([token(1, 8)]) == {token(1, 8): b"ct-8"} and reopened.applied_index == 4
    reopened.close()


def test_flush_commits_on_rows_and_on_time(tmp_path):
    vault = VaultStore.open(tmp_path / "vault.db")
    log = Log()
    started(vault, log)
    vault.commit_interval_seconds = 0.0
    vault.flush_if_due()
    assert not vault._connection.in_transaction
    vault.commit_interval_seconds = 3600.0
    vault.commit_rows = 3
    vault.apply_batch([log.command(tokenize(1, [1]))])
    assert vault._connection.in_transaction
    vault.flush_if_due()
    assert vault._connection.in_transaction  # not due yet
    vault.apply_batch([log.command(tokenize(1, [2, 3]))])
    assert not vault._connection.in_transaction  # enough rows: committed
    vault.close()
