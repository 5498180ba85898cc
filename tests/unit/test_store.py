"""Unit tests for tokenvault.core.store: apply semantics, idempotency, restarts, layout and checkpoints."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import msgpack
import pytest
from rocksdict import AccessType, Options, Rdict

from protocol import Entry, EntryKind
from tokenvault.core.commands import CommandError, RotateEpochCommand, TokenizeCommand, encode_command
from tokenvault.core.store import PURGE_LIMIT_PER_COMMAND, VaultStore
from tokenvault.core.store_files import read_current
from tokenvault.core.store_layout import (
    BLOCK_CACHE_BYTES,
    SCHEMA_VERSION,
    STORE_MARKER,
    InsertOnceViolation,
    Outcome,
    SnapshotRejected,
    StoreCorruption,
    StoreDamaged,
    StoreError,
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
    vault = VaultStore.open(tmp_path / "store")
    yield vault
    vault.close()


def started(store: VaultStore, log: Log) -> None:
    """Bring a store to epoch 1, as a new cluster's first primary does."""
    (result,) = store.apply_batch([log.noop(), log.command(rotate(1))])
    assert result.outcome == Outcome.OK


def dump(store: VaultStore) -> list[tuple[bytes, bytes]]:
    """Every key and value of the live database, meta included."""
    return list(store._db.items())


def listing(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


def raw_database(directory: Path, *, read_only: bool = False, create: bool = False) -> Rdict:
    options = Options(raw_mode=True)
    options.create_if_missing(create)
    if read_only:
        return Rdict(str(directory), options, access_type=AccessType.read_only(False))
    return Rdict(str(directory), options)


# ------------------------------------------------------------------ layout and open
def test_fresh_store_is_empty_and_is_a_current_pointer_and_one_generation(tmp_path):
    vault = VaultStore.open(tmp_path / "store")
    assert (vault.applied_index, vault.applied_view, vault.active_epoch(), vault.token_count()) == (0, 0, 0, 0)
    assert vault.epochs() == []
    vault.close()
    assert listing(tmp_path / "store") == ["CURRENT", "gen-000001"]
    assert (tmp_path / "store" / "CURRENT").read_text() == "gen-000001\n"
    assert listing(tmp_path) == ["store"]  # the building directory was renamed into place
    meta = msgpack.unpackb(raw_database(tmp_path / "store" / "gen-000001", read_only=True)[b"m"])
    assert meta == [STORE_MARKER, SCHEMA_VERSION, 0, 0, 0]


def test_an_existing_empty_directory_becomes_a_store(tmp_path):
    (tmp_path / "store").mkdir()
    VaultStore.open(tmp_path / "store").close()
    assert listing(tmp_path / "store") == ["CURRENT", "gen-000001"]


def test_an_interrupted_creation_is_removed_and_redone(tmp_path):
    building = tmp_path / "store.creating"
    (building / "gen-000001").mkdir(parents=True)
    (building / "gen-000001" / "000004.log").write_bytes(b"half")
    vault = VaultStore.open(tmp_path / "store")
    assert vault.applied_index == 0
    vault.close()
    assert listing(tmp_path) == ["store"]


def test_leftovers_of_an_interrupted_install_are_removed_on_open(tmp_path):
    path = tmp_path / "store"
    vault = VaultStore.open(path)
    started(vault, Log())
    vault.close()
    (path / "gen-000002").mkdir()
    (path / "gen-000002" / "000009.sst").write_bytes(b"partial")
    (path / "CURRENT.tmp").write_text("gen-000002\n")
    (path / "gen-000000").mkdir()
    reopened = VaultStore.open(path)
    assert reopened.applied_index == 2 and reopened.active_epoch() == 1
    reopened.close()
    assert listing(path) == ["CURRENT", "gen-000001"]


def test_a_directory_with_files_but_no_current_pointer_is_refused(tmp_path):
    path = tmp_path / "store"
    path.mkdir()
    (path / "something").write_bytes(b"data")
    with pytest.raises(StoreCorruption, match="no CURRENT"):
        VaultStore.open(path)
    assert listing(path) == ["something"]  # nothing was deleted


@pytest.mark.parametrize("current", [b"gen-000002\n", b"garbage", b"gen-000001", b"../x\n", b"\xff\xfe\n"])
def test_a_current_pointer_to_nothing_valid_is_refused(tmp_path, current):
    path = tmp_path / "store"
    VaultStore.open(path).close()
    (path / "CURRENT").write_bytes(current)
    with pytest.raises(StoreCorruption):
        VaultStore.open(path)
    assert (path / "gen-000001").is_dir()


def test_a_file_in_place_of_the_store_directory_is_refused(tmp_path):
    path = tmp_path / "vault.db"
    path.write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    with pytest.raises(StoreCorruption):
        VaultStore.open(path)
    assert path.read_bytes().startswith(b"SQLite format 3")


@pytest.mark.parametrize("damage", ["nested", "directory"])
def test_a_rocksdict_config_file_that_cannot_be_read_is_refused_at_open_naming_it(tmp_path, damage):
    """rocksdict-config.json is read by every open: a JSON document nested deeper than the parser goes
    (RecursionError, not a ValueError) or a directory in its place is a StoreCorruption naming the file
    (node.refused_to_start), never an exception that escapes the start."""
    path = tmp_path / "store"
    VaultStore.open(path).close()
    config = path / "gen-000001" / "rocksdict-config.json"
    config.unlink()
    if damage == "nested":
        config.write_bytes(b"[" * 4000)  # within the file's 4 KiB bound
        expected = f"{config} is not JSON, or too large to be the one the store wrote"
    else:
        config.mkdir()
        expected = f"{config} cannot be read (Is a directory)"
    with pytest.raises(StoreCorruption) as raised:
        VaultStore.open(path)
    assert str(raised.value) == expected
    assert listing(path) == ["CURRENT", "gen-000001"]  # nothing was deleted


def _replace_generation_with(path: Path, build) -> None:
    VaultStore.open(path).close()
    generation = path / "gen-000001"
    for entry in generation.iterdir():
        entry.unlink()
    generation.rmdir()
    build(generation)


def _foreign_raw_database(directory: Path) -> None:
    database = raw_database(directory, create=True)
    database[b"tokens"] = b"values"
    database.close()


def _foreign_rocksdict_database(directory: Path) -> None:
    database = Rdict(str(directory))  # rocksdict's default (pickled keys and values)
    database["tokens"] = ["values"]
    database.close()


def _garbage_files(directory: Path) -> None:
    directory.mkdir()
    for name in ("CURRENT", "MANIFEST-000001", "000004.log", "IDENTITY"):
        (directory / name).write_bytes(os.urandom(300))


@pytest.mark.parametrize("build", [_foreign_raw_database, _foreign_rocksdict_database, _garbage_files],
                         ids=["raw-rocksdb", "rocksdict-default", "garbage"])
def test_a_generation_that_is_not_a_tokenvault_store_is_refused(tmp_path, build):
    path = tmp_path / "store"
    _replace_generation_with(path, build)
    with pytest.raises(StoreCorruption):
        VaultStore.open(path)


@pytest.mark.parametrize("meta, message", [
    (["another-app", SCHEMA_VERSION, 0, 0, 0], "marker"),
    ([STORE_MARKER, SCHEMA_VERSION + 1, 0, 0, 0], "schema version"),
    ([STORE_MARKER, 1, 0, 0, 0], "schema version"),
    ([STORE_MARKER, SCHEMA_VERSION, -1, 0, 0], "malformed"),
    ([STORE_MARKER, SCHEMA_VERSION, 0, 0], "malformed"),
    ([STORE_MARKER, SCHEMA_VERSION, 0, 0, "0"], "malformed"),
    # Past what the replication log holds (2**63 - 1), up to what msgpack does: a restore failed on it in the log.
    ([STORE_MARKER, SCHEMA_VERSION, 2**63, 0, 0], "malformed: .* integer from 0 to 9223372036854775807"),
    ([STORE_MARKER, SCHEMA_VERSION, 0, 2**64 - 1, 0], "malformed: .* integer from 0 to 9223372036854775807"),
    ([STORE_MARKER, SCHEMA_VERSION, 0, 0, 2**63], "malformed: .* integer from 0 to 9223372036854775807"),
])
def test_the_marker_and_schema_version_are_checked_on_open(tmp_path, meta, message):
    path = tmp_path / "store"
    VaultStore.open(path).close()
    database = raw_database(path / "gen-000001")
    database[b"m"] = msgpack.packb(meta)
    database.close()
    with pytest.raises(StoreCorruption, match=message):
        VaultStore.open(path)


def test_an_extra_column_family_is_refused(tmp_path):
    path = tmp_path / "store"
    VaultStore.open(path).close()
    database = raw_database(path / "gen-000001")
    database.create_column_family("extra", Options(raw_mode=True))
    database.close()
    with pytest.raises(StoreCorruption, match="column families"):
        VaultStore.open(path)


def test_the_database_runs_with_the_chosen_tuning(tmp_path):
    VaultStore.open(tmp_path / "store").close()
    VaultStore.open(tmp_path / "store").close()  # the options of a reopen, not only of the creation
    newest = max((tmp_path / "store" / "gen-000001").glob("OPTIONS-*"), key=lambda path: int(path.name[8:]))
    settings = {line.strip() for line in newest.read_text().splitlines()}
    for expected in ("compression=kLZ4Compression", "bottommost_compression=kZSTD",
                     "write_buffer_size=67108864", "max_write_buffer_number=2",
                     "level_compaction_dynamic_level_bytes=true", "max_background_jobs=2",
                     "filter_policy=bloomfilter", "wal_recovery_mode=kPointInTimeRecovery", "no_block_cache=false",
                     # lookups of keys not in the memtable skip its skip list (bench/memtable_bloom.py)
                     "memtable_whole_key_filtering=true", "memtable_prefix_bloom_size_ratio=0.020000"):
        assert expected in settings
    vault = VaultStore.open(tmp_path / "store")
    assert vault._db.property_int_value("rocksdb.block-cache-capacity") == BLOCK_CACHE_BYTES
    vault.close()


# ------------------------------------------------------------------ apply
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
    store.apply_batch([log.command(tokenize(1, [3, 4]))])  # 3 exists in the database now
    assert store.token_count() == 4


def test_insert_once_violation_is_refused_and_the_batch_rolled_back(store):
    log = Log()
    started(store, log)
    store.apply_batch([log.command(tokenize(1, [1]))])
    before = dump(store)
    applied_before = store.applied_index
    batch = [log.command(tokenize(1, [2])), log.command(tokenize(1, [1], ciphertext_prefix=b"other-"))]
    with pytest.raises(InsertOnceViolation) as raised:
        store.apply_batch(batch)
    assert "ct-" not in str(raised.value) and token(1, 1) not in str(raised.value)
    assert store.lookup([token(1, 1), token(1, 2)]) == {token(1, 1): b"ct-1"}
    assert store.applied_index == applied_before
    assert dump(store) == before


def test_conflicting_pair_inside_one_command_is_refused(store):
    log = Log()
    started(store, log)
    items = ((token(1, 1), b"first"), (token(1, 1), b"second"))
    payload = encode_command(TokenizeCommand(1, items, "p", None, None, 1))
    applied_before, before = store.applied_index, dump(store)
    with pytest.raises(InsertOnceViolation):
        store.apply_batch([log.command(payload)])
    assert store.lookup([token(1, 1)]) == {}
    assert store.applied_index == applied_before and dump(store) == before


def test_the_same_token_in_another_epoch_prefix_is_a_conflict(store):
    # The stored value is (epoch, ciphertext): the same ciphertext under another epoch differs.
    log = Log()
    started(store, log)
    store.apply_batch([log.command(tokenize(1, [1]))])
    store.apply_batch([log.command(rotate(2))])
    items = ((token(1, 1), b"ct-1"),)
    with pytest.raises(InsertOnceViolation):
        store.apply_batch([log.command(encode_command(TokenizeCommand(2, items, "p", None, None, 1)))])


def test_a_batch_of_many_rows_and_repeats_is_stored_whole(store):
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


def test_a_failed_batch_leaves_memory_and_disk_as_if_it_never_came(tmp_path):
    """The refused batch purged and recorded idempotency records in its overlay: none of it may stay."""
    stores = [VaultStore.open(tmp_path / f"store-{n}", retention_ms=HOUR_MS) for n in range(2)]
    log = Log()
    prefix = [log.command(rotate(1))]
    prefix += [log.command(tokenize(1, [n], key=f"old-{n}", at_ms=1_000 + n)) for n in range(20)]
    for vault in stores:
        vault.apply_batch(prefix)
    failing_start = log.next_index
    failing = [log.command(tokenize(1, [100], key="new", at_ms=2 * HOUR_MS)),
               log.command(tokenize(1, [0], ciphertext_prefix=b"other-", at_ms=2 * HOUR_MS))]
    with pytest.raises(InsertOnceViolation):
        stores[0].apply_batch(failing)
    assert dump(stores[0]) == dump(stores[1])
    assert (stores[0].applied_index, stores[0].token_count()) == (stores[1].applied_index, stores[1].token_count())
    # The log then carries other entries at those indexes; both stores must end identical.
    log.next_index = failing_start
    rest = [log.command(tokenize(1, [200 + n], key=f"later-{n}", at_ms=2 * HOUR_MS + n)) for n in range(4)]
    assert stores[0].apply_batch(rest) == stores[1].apply_batch(rest)
    assert dump(stores[0]) == dump(stores[1])
    for vault in stores:
        vault.close()


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


def test_a_duplicate_within_the_same_batch_sees_the_first_command(store):
    log = Log()
    started(store, log)
    first, again = store.apply_batch([log.command(tokenize(1, [1], key="k")),
                                      log.command(tokenize(1, [2], key="k"))])
    assert (first.outcome, again.outcome) == (Outcome.OK, Outcome.DUPLICATE)
    assert again.response == first.response
    assert store.lookup([token(1, 2)]) == {}


def test_idempotency_keys_are_scoped_per_principal(store):
    log = Log()
    started(store, log)
    results = store.apply_batch([log.command(tokenize(1, [1], key="same", principal="a")),
                                 log.command(tokenize(1, [2], key="same", principal="b"))])
    assert [r.outcome for r in results] == [Outcome.OK, Outcome.OK]


def test_principal_and_key_never_run_together(store):
    # ("ab", "c") and ("a", "bc") must be two records, also with NUL characters in them.
    log = Log()
    started(store, log)
    pairs = [("ab", "c"), ("a", "bc"), ("a\x00", "b"), ("a", "\x00b")]
    results = store.apply_batch([log.command(tokenize(1, [n], key=key, principal=principal))
                                 for n, (principal, key) in enumerate(pairs)])
    assert [r.outcome for r in results] == [Outcome.OK] * 4
    for n, (principal, key) in enumerate(pairs):
        assert json.loads(store.idempotency_get(principal, key).response)["tokens"] == [token(1, n)]


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
    before = dump(store)
    assert store.apply_batch(entries + more) == []
    assert dump(store) == before
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
    assert store.epochs() == []


def test_a_malformed_committed_command_is_refused_and_nothing_applied(store):
    log = Log()
    with pytest.raises(CommandError):
        store.apply_batch([log.command(rotate(1)), log.command(b"\x93garbage")])
    assert store.applied_index == 0 and store.epochs() == []


def test_restart_keeps_the_state(tmp_path):
    path = tmp_path / "store"
    vault = VaultStore.open(path)
    log = Log(view=2)
    started(vault, log)
    vault.apply_batch([log.command(tokenize(1, [1, 2], key="k"))])
    before = dump(vault)
    vault.close()
    reopened = VaultStore.open(path)
    assert dump(reopened) == before
    assert (reopened.applied_index, reopened.applied_view) == (3, 2)
    assert reopened.active_epoch() == 1 and reopened.token_count() == 2
    assert reopened.lookup([token(1, 2)]) == {token(1, 2): b"ct-2"}
    assert reopened.idempotency_get("tokenizer", "k").status == 200
    reopened.close()


def test_checkpoint_returns_the_durable_applied_index(store):
    log = Log()
    started(store, log)
    assert store.checkpoint() == 2
    store.apply_batch([log.command(tokenize(1, [1])), log.noop()])
    assert store.checkpoint() == 4


def test_checkpoint_from_a_worker_thread_while_batches_are_applied(store):
    log = Log()
    started(store, log)
    returned: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def checkpoints() -> None:
        try:
            while not stop.is_set():
                returned.append(store.checkpoint())
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    worker = threading.Thread(target=checkpoints)
    worker.start()
    try:
        for number in range(300):
            store.apply_batch([log.command(tokenize(1, [number]))])
            assert not returned or returned[-1] <= store.applied_index
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not worker.is_alive() and errors == []
    assert returned == sorted(returned) and returned[-1] <= store.applied_index
    assert store.checkpoint() == store.applied_index == 302


# ------------------------------------------------------------------ idempotency expiry
def test_expired_idempotency_records_are_purged_deterministically_with_bounded_work(tmp_path):
    stores = [VaultStore.open(tmp_path / f"store-{n}", retention_ms=HOUR_MS) for n in range(2)]
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
    assert dump(stores[0]) == dump(stores[1])
    for vault in stores:
        vault.close()


def test_purge_order_is_created_at_then_principal_then_key(tmp_path):
    vault = VaultStore.open(tmp_path / "store", retention_ms=HOUR_MS, purge_limit_per_command=1)
    log = Log()
    started(vault, log)
    # Same timestamp; (principal, key) order is ("a","k10") < ("a","k2") < ("ab","a") < ("b","a").
    identities = [("b", "a"), ("ab", "a"), ("a", "k2"), ("a", "k10")]
    vault.apply_batch([log.command(tokenize(1, [n], key=key, principal=principal, at_ms=5_000))
                       for n, (principal, key) in enumerate(identities)])
    vault.apply_batch([log.command(tokenize(1, [9], key="young", principal="z", at_ms=4_000))])
    gone = []
    for step in range(5):
        vault.apply_batch([log.command(tokenize(1, [10 + step], at_ms=HOUR_MS + 5_001))])
        gone.append([identity for identity in identities + [("z", "young")]
                     if vault.idempotency_get(*identity) is None])
    assert gone == [[("z", "young")],
                    [("a", "k10"), ("z", "young")],
                    [("a", "k2"), ("a", "k10"), ("z", "young")],
                    [("ab", "a"), ("a", "k2"), ("a", "k10"), ("z", "young")],
                    [("b", "a"), ("ab", "a"), ("a", "k2"), ("a", "k10"), ("z", "young")]]
    vault.close()


def test_the_purge_runs_only_when_a_record_can_have_expired_and_resumes_after_a_reopen(tmp_path):
    path = tmp_path / "store"
    vault = VaultStore.open(path, retention_ms=HOUR_MS)
    log = Log()
    started(vault, log)
    purges: list[int] = []

    def watch(store: VaultStore) -> None:
        purge = store._purge

        def counted(expired_before_ms, batch):
            purges.append(expired_before_ms)
            return purge(expired_before_ms, batch)

        store._purge = counted

    watch(vault)
    vault.apply_batch([log.command(tokenize(1, [n], key=f"k{n}", at_ms=1_000 + n)) for n in range(6)])
    vault.apply_batch([log.command(tokenize(1, [10], at_ms=HOUR_MS + 1_000))])  # nothing has expired yet
    assert purges == []
    vault.close()
    # Reopened, the store knows the oldest record again, so the purge runs once
    # records expire (here the three oldest).
    vault = VaultStore.open(path, retention_ms=HOUR_MS)
    watch(vault)
    vault.apply_batch([log.command(tokenize(1, [11], at_ms=HOUR_MS + 1_003))])
    assert len(purges) == 1
    assert [vault.idempotency_get("tokenizer", f"k{n}") is None for n in range(6)] == [True] * 3 + [False] * 3
    vault.apply_batch([log.command(tokenize(1, [12], at_ms=3 * HOUR_MS))])
    assert all(vault.idempotency_get("tokenizer", f"k{n}") is None for n in range(6))
    purges.clear()
    vault.apply_batch([log.command(tokenize(1, [13], at_ms=3 * HOUR_MS + 1))])  # the index is empty now
    assert purges == []
    assert list(vault._db.keys(from_key=b"a")) == [key for key in vault._db.keys() if key >= b"a"]
    assert not [key for key in vault._db.keys() if key[:1] in (b"a", b"i")]
    vault.close()


def test_a_record_older_than_the_purge_position_is_still_purged_in_order(tmp_path):
    """A command stamped earlier than records already purged (a primary with a slower clock) adds a
    record below the purge's resume point; the next purge must still find it first."""
    stores = [VaultStore.open(tmp_path / f"store-{n}", retention_ms=HOUR_MS, purge_limit_per_command=1)
              for n in range(2)]
    log = Log()
    entries = [log.command(rotate(1))]
    entries += [log.command(tokenize(1, [n], key=f"k{n}", at_ms=10_000 + n)) for n in range(4)]
    entries += [log.command(tokenize(1, [10], at_ms=HOUR_MS + 10_002))]  # purges k0
    entries += [log.command(tokenize(1, [11], key="late", at_ms=5_000))]  # below the purged k0
    entries += [log.command(tokenize(1, [12 + n], at_ms=HOUR_MS + 10_002)) for n in range(2)]
    stores[0].apply_batch(entries)
    for entry in entries:
        stores[1].apply_batch([entry])
    for vault in stores:
        assert vault.idempotency_get("tokenizer", "late") is None
        assert [vault.idempotency_get("tokenizer", f"k{n}") is None for n in range(4)] == [True, True, False, False]
    assert dump(stores[0]) == dump(stores[1])
    for vault in stores:
        vault.close()


def test_an_expired_key_is_reusable_and_a_live_one_is_not(tmp_path):
    vault = VaultStore.open(tmp_path / "store", retention_ms=HOUR_MS)
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


def test_lookup_handles_many_tokens_and_repeats(store):
    log = Log()
    started(store, log)
    store.apply_batch([log.command(tokenize(1, range(1200)))])
    wanted = [token(1, n) for n in range(0, 1300)] + [token(1, 7)] * 3
    found = store.lookup(wanted)
    assert len(found) == 1200
    assert found[token(1, 1199)] == b"ct-1199" and token(1, 1250) not in found
    assert store.lookup([]) == {}


# ------------------------------------------------------------------ checkpoints and installs
def _source_with_state(path: Path, view: int = 3) -> tuple[VaultStore, Log]:
    source = VaultStore.open(path)
    log = Log(view=view)
    started(source, log)
    source.apply_batch([log.command(tokenize(1, [1, 2], key="k")), log.command(rotate(2))])
    return source, log


def test_checkpoint_install_round_trip_replaces_the_whole_state_and_survives_a_reopen(tmp_path):
    source, log = _source_with_state(tmp_path / "source")
    assert source.create_checkpoint(tmp_path / "checkpoint") == (4, 3)
    target = VaultStore.open(tmp_path / "target")
    other_log = Log()
    started(target, other_log)
    target.apply_batch([other_log.command(tokenize(1, [50]))])
    prepared = target.prepare_install(tmp_path / "checkpoint", 4, 3)
    assert not (tmp_path / "checkpoint").exists()
    assert prepared.directory == tmp_path / "target" / "gen-000002"
    assert target.applied_index == 3  # not live before the commit
    assert (tmp_path / "target" / "CURRENT").read_text() == "gen-000001\n"
    retired = target.commit_install(prepared)
    assert (tmp_path / "target" / "CURRENT").read_text() == "gen-000002\n"
    assert dump(target) == dump(source)
    assert (target.applied_index, target.applied_view, target.active_epoch(), target.token_count()) == (4, 3, 2, 2)
    assert target.checkpoint() == 4
    assert target.lookup([token(1, 50)]) == {}
    retired()  # the driver hands it to an executor as a plain callable
    retired.close()  # closing twice is harmless
    assert listing(tmp_path / "target") == ["CURRENT", "gen-000002"]
    (result,) = target.apply_batch([log.command(tokenize(2, [9]))])
    assert result.outcome == Outcome.OK
    target.close()
    reopened = VaultStore.open(tmp_path / "target")
    assert reopened.applied_index == 5 and reopened.lookup([token(2, 9)]) == {token(2, 9): b"ct-9"}
    assert reopened.idempotency_get("tokenizer", "k").status == 200
    reopened.close()
    source.close()


def test_a_second_install_goes_to_the_next_generation(tmp_path):
    source, log = _source_with_state(tmp_path / "source")
    target = VaultStore.open(tmp_path / "target")
    for round_number in range(2):
        index, view = source.create_checkpoint(tmp_path / f"checkpoint-{round_number}")
        target.commit_install(target.prepare_install(tmp_path / f"checkpoint-{round_number}", index, view)).close()
        assert listing(tmp_path / "target") == ["CURRENT", f"gen-00000{round_number + 2}"]
        source.apply_batch([log.command(tokenize(2, [round_number + 10]))])
    assert target.applied_index == source.applied_index - 1
    target.close()
    source.close()


def test_an_aborted_install_leaves_the_store_untouched(tmp_path):
    source, _ = _source_with_state(tmp_path / "source")
    source.create_checkpoint(tmp_path / "checkpoint")
    target = VaultStore.open(tmp_path / "target")
    started(target, Log())
    before = dump(target)
    prepared = target.prepare_install(tmp_path / "checkpoint", 4, 3)
    target.abort_install(prepared)
    assert listing(tmp_path / "target") == ["CURRENT", "gen-000001"]
    assert dump(target) == before and target.applied_index == 2
    with pytest.raises(StoreError):
        target.commit_install(prepared)
    target.close()
    source.close()


def test_only_one_install_is_prepared_at_a_time_and_close_drops_it(tmp_path):
    source, _ = _source_with_state(tmp_path / "source")
    source.create_checkpoint(tmp_path / "one")
    source.create_checkpoint(tmp_path / "two")
    target = VaultStore.open(tmp_path / "target")
    target.prepare_install(tmp_path / "one", 4, 3)
    with pytest.raises(SnapshotRejected, match="another install"):
        target.prepare_install(tmp_path / "two", 4, 3)
    assert (tmp_path / "two").is_dir()
    target.close()  # with the install still prepared
    reopened = VaultStore.open(tmp_path / "target")
    assert reopened.applied_index == 0
    assert listing(tmp_path / "target") == ["CURRENT", "gen-000001"]
    reopened.close()
    source.close()


def test_create_checkpoint_refuses_an_existing_directory_and_a_closed_store(tmp_path):
    vault = VaultStore.open(tmp_path / "store")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        vault.create_checkpoint(tmp_path / "exists")
    vault.close()
    with pytest.raises(StoreError):
        vault.create_checkpoint(tmp_path / "after-close")


def test_a_checkpoint_taken_while_another_thread_applies_is_consistent_with_its_index(tmp_path):
    """Production shape: the apply thread keeps writing while a worker thread takes checkpoints."""
    vault = VaultStore.open(tmp_path / "store")
    log = Log()
    started(vault, log)
    tokens_per_entry = 25
    taken: list[tuple[Path, int, int]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def checkpoints() -> None:
        try:
            for number in range(6):
                directory = tmp_path / f"checkpoint-{number}"
                index, view = vault.create_checkpoint(directory)
                taken.append((directory, index, view))
        except BaseException as error:  # reported by the main thread
            errors.append(error)
        finally:
            done.set()

    worker = threading.Thread(target=checkpoints)
    worker.start()
    batches = 0
    while not done.is_set() and batches < 20_000:
        first = log.next_index - 2
        vault.apply_batch([log.command(tokenize(1, range(first * tokens_per_entry, (first + 1) * tokens_per_entry)))])
        batches += 1
    worker.join(timeout=30)
    assert not worker.is_alive() and errors == []
    assert len(taken) == 6
    assert taken[-1][1] > taken[0][1] or batches < 2  # applies went on between checkpoints
    for directory, index, view in taken:
        VaultStore.verify_checkpoint(directory, index, view)
        copy = raw_database(directory, read_only=True)
        stored = sum(1 for key in copy.keys(from_key=b"t") if key[:1] == b"t")
        meta = msgpack.unpackb(copy[b"m"])
        expected = (index - 2) * tokens_per_entry
        assert (meta[2], meta[4], stored) == (index, expected, expected)
        copy.close()
    vault.close()


def _checkpoint_of(tmp_path: Path, name: str) -> tuple[Path, int, int]:
    source, _ = _source_with_state(tmp_path / f"source-{name}")
    directory = tmp_path / f"checkpoint-{name}"
    index, view = source.create_checkpoint(directory)
    source.close()
    return directory, index, view


def _rewrite_meta(directory: Path, change) -> None:
    database = raw_database(directory)
    meta = msgpack.unpackb(database[b"m"])
    database[b"m"] = msgpack.packb(change(meta))
    database.close()


def _put(directory: Path, key: bytes, value: bytes) -> None:
    database = raw_database(directory)
    database[key] = value
    database.close()


def _damage_table_files(directory: Path) -> None:
    for table in directory.glob("*.sst"):
        data = bytearray(table.read_bytes())
        for offset in range(10, min(len(data), 400), 7):
            data[offset] ^= 0x5A
        table.unlink()  # the checkpoint hard-links the source's files: never write through the link
        table.write_bytes(bytes(data))


def _truncate_table_files(directory: Path) -> None:
    for table in directory.glob("*.sst"):
        data = table.read_bytes()
        table.unlink()
        table.write_bytes(data[: len(data) // 2])


def _api_key_row(**fields) -> bytes:
    """A ``k`` row as api_key_value writes it, with ``fields`` changed."""
    row = {"name": "ops", "scopes": ["admin"], "salt": b"s" * 16, "digest": b"d" * 32, "created_at_ms": 1,
           "created_by": "bootstrap"}
    return msgpack.packb(list({**row, **fields}.values()), use_bin_type=True)


def _damaged_checkpoints(tmp_path: Path):
    """(name, directory, index, view) of checkpoints that must be refused."""

    def made(name, change=None, *, index_delta=0, view_delta=0):
        directory, index, view = _checkpoint_of(tmp_path, name)
        if change is not None:
            change(directory)
        return name, directory, index + index_delta, view + view_delta

    yield made("wrong-index", index_delta=1)
    yield made("wrong-view", view_delta=1)
    yield made("marker", lambda d: _rewrite_meta(d, lambda m: ["other", *m[1:]]))
    yield made("schema", lambda d: _rewrite_meta(d, lambda m: [m[0], SCHEMA_VERSION + 1, *m[2:]]))
    yield made("count-too-high", lambda d: _rewrite_meta(d, lambda m: [*m[:4], 10**9]))
    yield made("count-zero-with-tokens", lambda d: _rewrite_meta(d, lambda m: [*m[:4], 0]))
    yield made("two-active-epochs", lambda d: _put(d, b"e" + (1).to_bytes(8, "big"),
                                                   msgpack.packb([b"w", 1, "active"])))
    yield made("epoch-gap", lambda d: _put(d, b"e" + (7).to_bytes(8, "big"), msgpack.packb([b"w", 1, "retired"])))
    yield made("epoch-garbage", lambda d: _put(d, b"e" + (3).to_bytes(8, "big"), b"\xc1"))
    yield made("meta-garbage", lambda d: _put(d, b"m", b"\xc1\xc1"))
    # Meta and announcement agree on an index or view the replication log cannot hold (past 2**63 - 1).
    for field, past in (("index", 2**63), ("view", 2**64 - 1)):
        name, directory, index, view = made(f"{field}-past-the-log")
        _rewrite_meta(directory, lambda m: [*m[:2], past, *m[3:]] if field == "index" else [*m[:3], past, m[4]])
        yield name, directory, *((past, view) if field == "index" else (index, past))
    # Rows the install loads into memory (store_files.read_state): a checkpoint whose rows the store cannot
    # load is refused here, not after the store switched to it.
    yield made("api-key-garbage", lambda d: _put(d, b"k0123456789abcdef", b"\xc1"))
    yield made("api-key-field-types", lambda d: _put(d, b"k0123456789abcdef", _api_key_row(salt="not bytes")))
    yield made("api-key-id", lambda d: _put(d, b"kNOT-A-KEY-ID", _api_key_row()))
    yield made("audit-head-garbage", lambda d: _put(d, b"h", b"\xc1"))
    yield made("audit-anchor-short-hash", lambda d: _put(d, b"n", msgpack.packb([1, b"short"])))
    yield made("age-key-short", lambda d: _put(d, b"a", b""))
    yield made("config", lambda d: (d / "rocksdict-config.json").write_text('{"raw_mode": false}'))
    yield made("extra-family", lambda d: raw_database(d).create_column_family("x", Options(raw_mode=True)).close())
    yield made("damaged-tables", _damage_table_files)
    yield made("truncated-tables", _truncate_table_files)
    yield made("no-current", lambda d: (d / "CURRENT").unlink())
    foreign = tmp_path / "foreign-raw"
    _foreign_raw_database(foreign)
    yield "foreign-raw", foreign, 4, 3
    foreign_default = tmp_path / "foreign-default"
    _foreign_rocksdict_database(foreign_default)
    yield "foreign-rocksdict", foreign_default, 4, 3
    garbage = tmp_path / "garbage"
    _garbage_files(garbage)
    yield "garbage", garbage, 4, 3
    empty = tmp_path / "empty"
    empty.mkdir()
    yield "empty", empty, 4, 3
    yield "missing", tmp_path / "missing", 4, 3
    plain_file = tmp_path / "plain-file"
    plain_file.write_bytes(b"not a directory")
    yield "plain-file", plain_file, 4, 3


def test_verify_and_prepare_install_reject_damaged_and_foreign_checkpoints_and_change_nothing(tmp_path):
    store_path = tmp_path / "store"
    vault = VaultStore.open(store_path)
    log = Log()
    started(vault, log)
    vault.apply_batch([log.command(tokenize(1, [1]))])
    before = dump(vault)
    rejected = []
    for name, directory, index, view in _damaged_checkpoints(tmp_path):
        with pytest.raises(SnapshotRejected) as raised:
            VaultStore.verify_checkpoint(directory, index, view)
        assert "Traceback" not in str(raised.value) and "ct-1" not in str(raised.value)
        with pytest.raises(SnapshotRejected):
            vault.prepare_install(directory, index, view)
        assert dump(vault) == before, name
        assert listing(store_path) == ["CURRENT", "gen-000001"], name
        rejected.append(name)
    assert len(rejected) == 29
    assert vault.lookup([token(1, 1)]) == {token(1, 1): b"ct-1"}
    # The store still installs a good checkpoint afterwards.
    directory, index, view = _checkpoint_of(tmp_path, "good")
    vault.commit_install(vault.prepare_install(directory, index, view)).close()
    assert vault.applied_index == index
    vault.close()


def test_a_checkpoint_whose_rocksdb_wal_exceeds_the_store_s_memtables_is_refused_before_anything_opens_it(
        tmp_path, monkeypatch):
    """Opening a database, read-only too, replays every WAL file (`*.log`) into memtables, in memory: a
    hostile snapshot or backup holding a multi-GB one would run the verifier out of memory (docs/security.md).
    The store's own checkpoints are flushed first, so their WAL holds next to nothing; one whose WAL files
    add up to more than the store's memtables (write buffer times write buffers) is refused unopened."""
    from tokenvault.core import store_files
    from tokenvault.core.store_layout import MAX_WRITE_BUFFERS, WRITE_BUFFER_BYTES

    directory, index, view = _checkpoint_of(tmp_path, "wal")
    assert sum(path.stat().st_size for path in directory.glob("*.log")) < 1 << 20, "a real checkpoint's WAL"
    with open(directory / "999999.log", "wb") as handle:  # sparse: its size is what a replay would read
        handle.truncate(WRITE_BUFFER_BYTES * MAX_WRITE_BUFFERS + 1)
    opened = []
    monkeypatch.setattr(store_files, "open_database", lambda *arguments, **options: opened.append(arguments))
    vault = VaultStore.open(tmp_path / "store")
    before = dump(vault)
    with pytest.raises(SnapshotRejected, match=r"WAL files \(\*\.log\) hold \d+ bytes, more than the 134217728 bytes"):
        VaultStore.verify_checkpoint(directory, index, view)
    with pytest.raises(SnapshotRejected, match="WAL files"):
        vault.prepare_install(directory, index, view)
    assert opened == [] and dump(vault) == before
    assert listing(tmp_path / "store") == ["CURRENT", "gen-000001"]
    vault.close()


@pytest.mark.parametrize("name", ["CURRENT", "IDENTITY", "OPTIONS"])
def test_a_checkpoint_whose_files_an_open_reads_whole_are_too_large_is_refused_before_anything_opens_it(
        tmp_path, monkeypatch, name):
    """An open, read-only too, reads RocksDB's CURRENT, IDENTITY and OPTIONS files whole into memory: one of
    400 MB in a hostile snapshot or backup took the verifier from 36 MB to 550-590 MB (docs/security.md), and
    an IDENTITY file that large passed verification. On the code before, each was opened whatever its size."""
    from tokenvault.core import store_files

    directory, index, view = _checkpoint_of(tmp_path, name)
    target = directory / name if name != "OPTIONS" else next(directory.glob("OPTIONS-*"))
    assert not target.exists() or target.stat().st_size < 64 * 1024, "a real checkpoint's file"
    with open(target, "ab") as handle:  # sparse: its size is what an open would read
        handle.truncate((1 << 20) + 1)
    opened = []
    monkeypatch.setattr(store_files, "open_database", lambda *arguments, **options: opened.append(arguments))
    vault = VaultStore.open(tmp_path / "store")
    before = dump(vault)
    with pytest.raises(SnapshotRejected, match=r"CURRENT, IDENTITY and OPTIONS files hold \d+ bytes, more than the "
                                               r"1048576 bytes"):
        VaultStore.verify_checkpoint(directory, index, view)
    with pytest.raises(SnapshotRejected, match="OPTIONS files hold"):
        vault.prepare_install(directory, index, view)
    assert opened == [] and dump(vault) == before
    assert listing(tmp_path / "store") == ["CURRENT", "gen-000001"]
    vault.close()


# Rows verify_checkpoint refuses (above) that the install reads into memory; each is put into a checkpoint that
# escaped verification, as one verification missed would.
_MALFORMED_STATE_ROWS = {"api-key": (b"k0123456789abcdef", b"\xc1"), "audit-head": (b"h", b"\xc1")}


@pytest.mark.parametrize("row", sorted(_MALFORMED_STATE_ROWS))
def test_commit_install_reads_the_new_state_before_current_moves_and_a_failure_keeps_the_old_one(
        tmp_path, monkeypatch, row):
    """A generation the store cannot load is never made current: CURRENT would name it on every restart after,
    and the node could never start again."""
    directory, index, view = _checkpoint_of(tmp_path, row)
    _put(directory, *_MALFORMED_STATE_ROWS[row])
    with pytest.raises(SnapshotRejected, match="malformed"):
        VaultStore.verify_checkpoint(directory, index, view)
    target = VaultStore.open(tmp_path / "target")
    log = Log()
    started(target, log)
    target.apply_batch([log.command(tokenize(1, [7]))])
    before = dump(target)
    monkeypatch.setattr(VaultStore, "verify_checkpoint", staticmethod(lambda directory, index, view: None))
    prepared = target.prepare_install(directory, index, view)
    with pytest.raises(SnapshotRejected, match="malformed"):
        target.commit_install(prepared)
    assert (tmp_path / "target" / "CURRENT").read_text() == "gen-000001\n"
    assert dump(target) == before and (target.applied_index, target.active_epoch()) == (3, 1)
    assert target.lookup([token(1, 7)]) == {token(1, 7): b"ct-7"}
    (result,) = target.apply_batch([log.command(tokenize(1, [8]))])  # the store goes on with its old generation
    assert result.outcome == Outcome.OK
    target.abort_install(prepared)  # the install stayed prepared: the caller drops it
    assert listing(tmp_path / "target") == ["CURRENT", "gen-000001"]
    target.close()
    reopened = VaultStore.open(tmp_path / "target")  # and a restart opens the old generation
    assert reopened.applied_index == 4 and reopened.lookup([token(1, 8)]) == {token(1, 8): b"ct-8"}
    reopened.close()


def test_verify_rejects_index_and_view_that_are_not_integers(tmp_path):
    directory, index, view = _checkpoint_of(tmp_path, "typed")
    for bad_index, bad_view in [(str(index), view), (index, float(view)), (True, view), (-1, view)]:
        with pytest.raises(SnapshotRejected):
            VaultStore.verify_checkpoint(directory, bad_index, bad_view)
    VaultStore.verify_checkpoint(directory, index, view)


def test_the_applied_configuration_is_recorded_travels_in_checkpoints_and_survives_a_reopen(tmp_path):
    from protocol import Membership

    store = VaultStore.open(tmp_path / "store")
    log = Log()
    started(store, log)
    assert store.membership() is None, "no change applied yet: the static configuration holds"
    changed = Membership.of(("n1", "n2", "n3"), ("n4",), {"n4": "127.0.0.1:8204"})
    config_entry = Entry(log.next_index, log.view, EntryKind.CONFIG, changed.encode())
    log.next_index += 1
    assert store.apply_batch([config_entry]) == []
    assert store.membership() == changed and store.applied_index == config_entry.index
    assert store.create_checkpoint(tmp_path / "checkpoint") == (config_entry.index, log.view)
    store.close()
    reopened = VaultStore.open(tmp_path / "store")
    assert reopened.membership() == changed
    reopened.close()
    target = VaultStore.open(tmp_path / "target")
    target.commit_install(target.prepare_install(tmp_path / "checkpoint", config_entry.index, log.view))()
    assert target.membership() == changed
    target.close()


def test_a_configuration_entry_that_does_not_decode_changes_nothing(store):
    log = Log()
    started(store, log)
    before = store.applied_index
    with pytest.raises(ValueError):
        store.apply_batch([log.command(tokenize(1, [1])), Entry(log.next_index, 1, EntryKind.CONFIG, b"\xc1")])
    assert store.applied_index == before and store.membership() is None and store.lookup([token(1, 1)]) == {}


def test_a_checkpoint_with_a_malformed_configuration_is_refused(tmp_path):
    from tokenvault.core.store_layout import SnapshotRejected

    source = VaultStore.open(tmp_path / "source")
    log = Log()
    started(source, log)
    index, view = source.create_checkpoint(tmp_path / "checkpoint")
    source.close()
    database = Rdict(str(tmp_path / "checkpoint"), options=Options(raw_mode=True))
    database[b"c"] = b"\x92\x01\x90"  # a membership without members
    database.close()
    with pytest.raises(SnapshotRejected, match="membership"):
        VaultStore.verify_checkpoint(tmp_path / "checkpoint", index, view)


# VaultStore's public methods that do not meet a damaged table file on the node's serving path, and why.
# A new method is in neither this table nor decorated with _stops_when_damaged until its author decides.
_NOT_CHECKED_FOR_DAMAGE = {
    "open": "a store that cannot be opened is refused at start (node.refused_to_start)",
    "applied_index": "memory", "applied_view": "memory", "retention_ms": "memory", "path": "memory",
    "membership": "memory", "active_epoch": "memory", "token_count": "memory", "api_key": "memory",
    "api_keys": "memory", "audit_seq": "memory", "audit_anchor": "memory",
    "shred": "a compaction in the shredder's thread: any failure there stops the node already (node.fatal)",
    "prepare_shred": "a flush in the shredder's thread (node.fatal on failure)",
    "flush_for_shred": "a flush in the shredder's thread (node.fatal on failure)",
    "compact_for_shred": "a compaction in the shredder's thread (node.fatal on failure)",
    "finish_shred": "a WAL sync in the shredder's thread (node.fatal on failure)",
    "forget_membership": "a write of one key, no read",
    "flush_memtable": "writes a table file from memory",
    "table_bytes": "a RocksDB property, no block read",
    "checkpoint": "a WAL sync", "create_checkpoint": "hard links, no block read",
    "verify_checkpoint": "a received snapshot, not this store: damage there rejects the snapshot",
    "prepare_install": "a received snapshot", "commit_install": "a received snapshot",
    "abort_install": "a received snapshot", "close": "no read",
    "wrapped_secrets": "reads through epochs, which is checked",
}


def test_every_public_store_method_is_checked_for_damage_or_says_why_not() -> None:
    """A read added to VaultStore without _stops_when_damaged would answer 503 on every request that meets
    a damaged block instead of stopping the node (docs/failure-modes.md): each public method is either
    wrapped or named in _NOT_CHECKED_FOR_DAMAGE."""
    checked, unchecked = set(), set()
    for name, attribute in vars(VaultStore).items():
        if name.startswith("_"):
            continue
        function = attribute.fget if isinstance(attribute, property) else getattr(attribute, "__func__", attribute)
        if not callable(function):
            continue
        (checked if function.__code__.co_name == "checked" else unchecked).add(name)
    assert {"apply_batch", "lookup", "lookup_format", "idempotency_get", "audit_page"} <= checked
    assert unchecked == set(_NOT_CHECKED_FOR_DAMAGE), (unchecked ^ set(_NOT_CHECKED_FOR_DAMAGE))


def test_a_damaged_table_file_is_reported_naming_the_file_by_the_reads_and_the_apply_that_meet_it(tmp_path) -> None:
    """docs/failure-modes.md, "A damaged store file": RocksDB's block checksums catch bytes changed on
    disk. A read or an apply that meets the damaged block raises StoreCorruption naming the file and the
    offset (never a token or a value) and tells ``on_damage`` (the node then stops); reads that do not
    meet it still answer, and no answer is ever wrong."""
    path, log = tmp_path / "store", Log()
    vault = VaultStore.open(path)
    started(vault, log)
    vault.apply_batch([log.command(tokenize(1, range(start, start + 1000))) for start in range(0, 20_000, 1000)])
    vault._db.flush()
    vault.close()
    table = max((path / read_current(path)).glob("*.sst"), key=lambda file: file.stat().st_size)
    data = bytearray(table.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(byte ^ 0xFF for byte in data[middle:middle + 64])
    table.write_bytes(bytes(data))

    vault = VaultStore.open(path)
    heard: list[StoreCorruption] = []
    vault.on_damage = heard.append
    try:
        failures, damaged, answered = [], [], 0
        for start in range(0, 20_000, 500):
            numbers = range(start, start + 500)
            try:
                found = vault.lookup([token(1, number) for number in numbers])
            except StoreDamaged as error:
                failures.append(str(error))
                damaged = list(numbers)
                continue
            assert found == {token(1, number): b"ct-" + str(number).encode() for number in numbers}
            answered += 1
        assert failures and answered, (len(failures), answered)
        assert all(message.startswith("the store is damaged: Corruption") and table.name in message
                   and "offset" in message for message in failures)
        assert not any("tv1_" in message or "ct-" in message for message in failures)
        assert [str(error) for error in heard] == failures
        # The apply's insert-once check reads the same block: refused the same way, nothing written.
        applied = vault.applied_index
        with pytest.raises(StoreDamaged, match="the store is damaged"):
            vault.apply_batch([log.command(tokenize(1, damaged))])
        assert vault.applied_index == applied and len(heard) == len(failures) + 1
    finally:
        vault.close()


def test_a_rocksdb_status_quoted_in_an_error_names_files_and_offsets_and_never_a_key_in_hex() -> None:
    from tokenvault.core.store_layout import damage, reason

    key = ("t" + "tv1_" + "a" * 32).encode().hex().upper()
    quoted = damage(Exception(f"Corruption: corrupted internal key in DBIter: {key} in /var/lib/vault/n1/data/"
                              "store/gen-000003/000017.sst offset 998107 size 4065"))
    assert str(quoted) == ("the store is damaged: Corruption: corrupted internal key in DBIter: <hex> in 000017.sst"
                           " offset 998107 size 4065")
    assert key not in reason(Exception(f"Corruption: bad entry {key.lower()} in block"))
    assert reason(Exception("IO error: No space left on device: While appending to file: /d/000012.log")) == (
        "IO error: No space left on device: While appending to file: /d/000012.log")
    assert damage(Exception("IO error: No space left on device")) is None
    assert len(str(damage(Exception("Corruption: " + "x " * 500)))) <= len("the store is damaged: ") + 200


def test_a_checkpoint_that_cannot_be_read_back_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    """A checkpoint RocksDB wrote but that could not be opened again (EMFILE, ENOMEM) stayed on disk, hard
    links to every table file; once a failed snapshot is asked for again, one more a retry."""
    from tokenvault.core import store as store_module
    from tokenvault.core.store_layout import StoreError

    source = VaultStore.open(tmp_path / "store")
    real_open = store_module.open_database

    def failing_read_back(directory, options, error, read_only=False):
        if read_only:
            raise StoreError("Too many open files")
        return real_open(directory, options, error, read_only=read_only)

    monkeypatch.setattr(store_module, "open_database", failing_read_back)
    try:
        with pytest.raises(StoreError, match="open files"):
            source.create_checkpoint(tmp_path / "checkpoint")
        assert not (tmp_path / "checkpoint").exists()
        monkeypatch.undo()
        assert source.create_checkpoint(tmp_path / "checkpoint") == (0, 0)
    finally:
        source.close()
