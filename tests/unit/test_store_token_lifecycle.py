"""The token lifecycle in the store: delete, destroy, an epoch's token pages and shredding the files."""

from __future__ import annotations

import asyncio
import os
import threading

import msgpack
import pytest

from node_support import files_holding
from test_store import Log, store  # noqa: F401 (store is a fixture)
from tokenvault.core.commands import (Actor, CommandError, DeleteTokensCommand, DestroyEpochCommand,
                                      RotateEpochCommand, TokenizeCommand, decode_command, encode_command)
from tokenvault.core import shred as shred_module
from tokenvault.core.shred import Shredder, ShredPass, shred_keys
from tokenvault.core import store_layout
from tokenvault.core.store import VaultStore
from tokenvault.core.store_files import read_current
from tokenvault.core.store_layout import (DESTROYED, LIFE, MAX_TOKEN_PAGE, Outcome, bottom_files, files_overlapped,
                                          format_token_key,
                                          shred_ranges, token_key, whole_key_space_ranges)

ACTOR = Actor(name="full", node="n1", request_id="r1")


def token(epoch: int, number: int) -> str:
    return f"tv{epoch}_{number:032d}"


def tokenize(epoch: int, numbers, *, key: str | None = None, at_ms: int = 1_000) -> bytes:
    items = tuple((token(epoch, number), b"ciphertext-%d-%d" % (epoch, number)) for number in numbers)
    return encode_command(TokenizeCommand(epoch, items, "tokenizer" if key else None, key,
                                          b"fp" if key else None, at_ms))


def rotate(epoch: int, secret: bytes | None = None) -> bytes:
    return encode_command(RotateEpochCommand(epoch, secret or b"wrapped-%d" % epoch, 500, None, None, None))


def delete(*tokens: str) -> bytes:
    return encode_command(DeleteTokensCommand(tuple(tokens), 2_000, ACTOR))


def destroy(epoch: int) -> bytes:
    return encode_command(DestroyEpochCommand(epoch, 3_000, ACTOR))


def apply(store: VaultStore, log: Log, *payloads: bytes):
    return store.apply_batch([log.command(payload) for payload in payloads])


def test_delete_removes_existing_rows_counts_them_and_audits(store):
    log = Log()
    apply(store, log, rotate(1), tokenize(1, range(5)))
    (result,) = apply(store, log, delete(token(1, 0), token(1, 3), token(1, 3), token(1, 99)))
    assert result.outcome == Outcome.OK and result.response == b'{"deleted":2}'
    assert set(store.lookup([token(1, n) for n in range(5)])) == {token(1, 1), token(1, 2), token(1, 4)}
    assert store.token_count() == 3
    record = store.audit_page(0, 10)[-1]
    assert (record["action"], record["items"], record["found"]) == ("token.delete", 3, 2)
    (again,) = apply(store, log, delete(token(1, 0)))
    assert again.response == b'{"deleted":0}' and store.token_count() == 3


def test_a_delete_with_an_epoch_removes_card_and_digits_tokens_of_that_epoch_only(store):
    """Digit strings in a delete are card and digits tokens of the command's epoch; without one, they are
    left alone. The token count (of opaque mappings) is not touched by them."""
    log = Log()
    format_items = (("4111111111111111", b"card-ciphertext"), ("123456", b"digits-ciphertext"))
    apply(store, log, rotate(1), tokenize(1, range(2)),
          encode_command(TokenizeCommand(1, format_items, None, None, None, 1_000, token_format="card")),
          rotate(2))
    (none,) = apply(store, log, delete("4111111111111111", "123456"))  # no epoch: not looked for
    assert none.response == b'{"deleted":0}'
    (in_2,) = apply(store, log, encode_command(DeleteTokensCommand(("4111111111111111",), 2_000, ACTOR, epoch=2)))
    assert in_2.response == b'{"deleted":0}' and set(store.lookup_format(1, ["4111111111111111"])) == {"4111111111111111"}
    (in_1,) = apply(store, log, encode_command(DeleteTokensCommand(
        ("4111111111111111", "123456", token(1, 0), "123456"), 2_000, ACTOR, epoch=1)))
    assert in_1.response == b'{"deleted":3}'
    assert store.lookup_format(1, ["4111111111111111", "123456"]) == {}
    assert store.token_count() == 1 and set(store.lookup([token(1, 0), token(1, 1)])) == {token(1, 1)}


def test_digits_of_other_scripts_are_not_read_as_a_card_or_digits_token(store):
    """``str.isdigit`` takes "٤١١١" and "²³"; the store tells format tokens by ASCII digits, so such a
    string in a delete from the log, or as a page cursor, is an opaque key, not an apply that cannot encode
    its key (which would stop the node)."""
    log = Log()
    apply(store, log, rotate(1), tokenize(1, range(2)))
    (result,) = apply(store, log, encode_command(DeleteTokensCommand(("٤١١١١١", "²³⁴⁵⁶⁷"), 2_000, ACTOR, epoch=1)))
    assert result.outcome == Outcome.OK and result.response == b'{"deleted":0}'
    assert store.epoch_tokens(1, "٤١١١١١", 10) == []  # after it in key order: nothing of epoch 1


def test_a_delete_shreds_each_mapping_row_and_its_life_row() -> None:
    """tokenvault/core/shred.py: the keys a delete leaves older versions of are the rows it deleted, opaque
    or of the epoch's card and digits tokens, and their life rows (expiry and metadata ciphertext)."""
    command = DeleteTokensCommand(("tv1_" + "a" * 32, "4111111111111111"), 2_000, ACTOR, epoch=3)
    rows = [token_key("tv1_" + "a" * 32), format_token_key(3, "4111111111111111")]
    assert shred_keys(command) == rows + [LIFE + row for row in rows]
    assert shred_keys(DeleteTokensCommand(("4111111111111111",), 2_000, ACTOR)) == []


def test_a_delete_command_round_trips_and_encodes_as_before_without_an_epoch() -> None:
    plain = DeleteTokensCommand(("tv1_" + "a" * 32,), 2_000, ACTOR)
    assert len(msgpack.unpackb(encode_command(plain))) == 8  # what entries written before epochs hold
    for command in (plain, DeleteTokensCommand(("123456",), 2_000, ACTOR, epoch=7)):
        assert decode_command(encode_command(command)) == command
    with pytest.raises(CommandError):
        DeleteTokensCommand(("123456",), 2_000, ACTOR, epoch=2**32)


def test_a_token_added_and_deleted_in_one_batch_is_gone_and_a_later_tokenize_recreates_it(store):
    log = Log()
    apply(store, log, rotate(1))
    results = apply(store, log, tokenize(1, [7]), delete(token(1, 7)), tokenize(1, [8]))
    assert [result.outcome for result in results] == [Outcome.OK] * 3
    assert results[1].response == b'{"deleted":1}'
    assert set(store.lookup([token(1, 7), token(1, 8)])) == {token(1, 8)}
    assert store.token_count() == 1
    apply(store, log, tokenize(1, [7]))  # the same value again: the same token, the same ciphertext
    assert store.lookup([token(1, 7)]) == {token(1, 7): b"ciphertext-1-7"}
    assert store.token_count() == 2


def test_an_idempotent_replay_after_a_delete_answers_the_first_body_and_resurrects_nothing(store):
    log = Log()
    apply(store, log, rotate(1))
    (first,) = apply(store, log, tokenize(1, [1], key="k"))
    apply(store, log, delete(token(1, 1)))
    (replay,) = apply(store, log, tokenize(1, [1], key="k"))
    assert replay.outcome == Outcome.DUPLICATE and replay.response == first.response
    assert store.lookup([token(1, 1)]) == {}


def test_destroy_erases_the_wrapped_secret_refuses_the_active_epoch_and_is_idempotent(store):
    log = Log()
    apply(store, log, rotate(1), rotate(2))
    (active,) = apply(store, log, destroy(2))
    assert active.outcome == Outcome.EPOCH_ACTIVE
    (unknown,) = apply(store, log, destroy(9))
    assert unknown.outcome == Outcome.EPOCH_NOT_FOUND
    (done,) = apply(store, log, destroy(1))
    assert done.outcome == Outcome.OK and done.response == b'{"epoch":1,"state":"destroyed"}'
    first = store.epochs()[0]
    assert (first.state, first.wrapped_secret) == (DESTROYED, b"")
    (again,) = apply(store, log, destroy(1))
    assert again.outcome == Outcome.OK
    assert [record["action"] for record in store.audit_page(0, 10)][-2:] == ["epoch.destroy", "epoch.destroy"]
    assert store.active_epoch() == 2


def test_a_destroyed_epoch_survives_a_reopen(tmp_path):
    log = Log()
    vault = VaultStore.open(tmp_path / "store")
    apply(vault, log, rotate(1), rotate(2), destroy(1))
    vault.close()
    vault = VaultStore.open(tmp_path / "store")
    try:
        assert [record.state for record in vault.epochs()] == [DESTROYED, "active"]
    finally:
        vault.close()


def test_epoch_tokens_pages_through_one_epoch_in_key_order(store):
    log = Log()
    apply(store, log, rotate(1), tokenize(1, range(25)), rotate(2), tokenize(2, range(3)))
    # Epoch 10's prefix must not leak into epoch 1's pages.
    pages, after = [], None
    while True:
        page = store.epoch_tokens(1, after, 10)
        if not page:
            break
        pages.append(page)
        after = page[-1]
    assert [len(page) for page in pages] == [10, 10, 5]
    assert sum(pages, []) == sorted(token(1, n) for n in range(25))
    assert store.epoch_tokens(2, None, MAX_TOKEN_PAGE + 1) == [token(2, n) for n in range(3)]
    assert store.epoch_tokens(3, None, 5) == []
    for limit in (0, MAX_TOKEN_PAGE + 2):  # a page, and one token more to tell whether it is the last
        with pytest.raises(ValueError):
            store.epoch_tokens(1, None, limit)


def random_tokenize(epoch: int, count: int) -> tuple[dict[str, bytes], bytes]:
    """``count`` tokens of ``epoch`` with random 512-byte ciphertexts (token -> ciphertext), and the
    command. Random, as real ciphertexts are, and long beside the numbered (so compressible) tokens:
    RocksDB then stores their blocks as they are, where a compressed block would hide them from a
    scan of the files."""
    ciphertexts = {token(epoch, number): os.urandom(512) for number in range(count)}
    return ciphertexts, encode_command(TokenizeCommand(epoch, tuple(ciphertexts.items()), None, None, None, 1_000))


@pytest.mark.parametrize("whole", [False, True], ids=["the-keys", "the-whole-key-space"])
def test_shred_removes_the_old_bytes_from_every_file_of_the_store(tmp_path, whole):
    """Shredding the keys, or (``None``: what a pass behind a backlog of more than MAX_KEYS_PER_PASS does)
    the whole key space."""
    secret = os.urandom(48)
    ciphertexts, command = random_tokenize(2, 10)
    log = Log()
    vault = VaultStore.open(tmp_path / "store")
    try:
        apply(vault, log, rotate(1, secret), rotate(2), command)
        vault.checkpoint()
        vault._db.flush()  # the old versions sit in a table file as well as in RocksDB's WAL
        assert files_holding(tmp_path / "store", secret)
        assert all(files_holding(tmp_path / "store", ciphertext) for ciphertext in ciphertexts.values())
        apply(vault, log, destroy(1), delete(token(2, 5)))
        vault.shred(None if whole else [b"e" + (1).to_bytes(8, "big"), b"t" + token(2, 5).encode()])
        assert files_holding(tmp_path / "store", secret) == []
        assert files_holding(tmp_path / "store", ciphertexts[token(2, 5)]) == []
        assert all(files_holding(tmp_path / "store", ciphertext) for minted, ciphertext in ciphertexts.items()
                   if minted != token(2, 5))
        assert len(vault.lookup([token(2, n) for n in range(10)])) == 9
    finally:
        vault.close()


def test_many_shreds_leave_a_bounded_manifest(tmp_path, monkeypatch):
    """Each shred flushes and compacts, and each adds records to RocksDB's MANIFEST, which every open
    replays (a worker's view opens again after each flush): the store bounds it (MAX_MANIFEST_BYTES;
    unbounded, 10,000 shreds made it 1.4 MiB and a view open 2.9 s, bench/manifest_growth.py). Here with
    a bound of 4 KiB, so that a few hundred shreds cross it many times."""
    bound = 4 * 1024
    monkeypatch.setattr(store_layout, "MAX_MANIFEST_BYTES", bound)
    log = Log()
    vault = VaultStore.open(tmp_path / "store")
    generation = tmp_path / "store" / read_current(tmp_path / "store")

    def manifest_bytes() -> int:
        return sum(entry.stat().st_size for entry in os.scandir(generation) if entry.name.startswith("MANIFEST-"))

    try:
        apply(vault, log, rotate(1), tokenize(1, range(300)))
        largest = 0
        for number in range(300):
            vault.shred([b"t" + token(1, number).encode()])
            largest = max(largest, manifest_bytes())
        # RocksDB starts a new file once one is past the bound: at most the bound and one flush's records.
        assert largest <= 2 * bound, largest
    finally:
        vault.close()


def test_shred_ranges_are_one_a_key_up_to_the_bound_then_one_a_bottom_file_or_gap_that_holds_keys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def key(number: int) -> bytes:
        return token_key(token(1, number))

    keys = [key(number) for number in (5, 1, 12, 3, 40, 25, 27, 99, 12)]
    files = [(key(0), key(10)), (key(20), key(30)), (key(50), key(60))]
    assert shred_ranges(keys, files) == [(one, one + b"\x00") for one in sorted(set(keys))]
    monkeypatch.setattr(store_layout, "SHRED_POINT_RANGES", 2)  # past it from here on
    # No level below the first: one range, lowest to highest.
    assert shred_ranges(keys, []) == [(key(1), key(99) + b"\x00")]
    # Bottom files [0, 10], [20, 30] and [50, 60]: keys 1, 3, 5 in the first, 12 in the gap after it,
    # 25 and 27 in the second, 40 between the second and the third (which holds none), 99 after all.
    assert shred_ranges(keys, files) == [(key(1), key(5) + b"\x00"), (key(12), key(12) + b"\x00"),
                                         (key(25), key(27) + b"\x00"), (key(40), key(40) + b"\x00"),
                                         (key(99), key(99) + b"\x00")]
    # A file's first and last keys are in it; a key before every file is in the gap before the first.
    assert shred_ranges([key(0), key(10), key(20)], files[1:]) == [(key(0), key(10) + b"\x00"),
                                                                   (key(20), key(20) + b"\x00")]
    assert shred_ranges([], files) == []


def test_the_bottom_files_a_shred_rewrites_are_those_its_ranges_overlap() -> None:
    """files_overlapped: a range [begin, end) overlaps a file [first, last] when first < end and begin <= last;
    the shredder sweeps instead of a pass that would rewrite three quarters of them."""
    def key(number: int) -> bytes:
        return token_key(token(1, number))

    files = [(key(0), key(10)), (key(20), key(30)), (key(50), key(60))]
    cases = {((1, 2),): 1, ((12, 13),): 0, ((5, 25),): 2, ((0, 61),): 3, ((30, 31),): 1, ((10, 11),): 1,
             ((11, 20),): 0, ((60, 70),): 1, ((61, 70),): 0, ((1, 2), (3, 4), (55, 56)): 2}
    for ranges, expected in cases.items():
        assert files_overlapped([(key(begin), key(end)) for begin, end in ranges], files) == expected, ranges
    assert files_overlapped([(key(1), key(2))], []) == 0
    # None: before every key, after every key (the whole key space's first and last ranges).
    assert files_overlapped([(None, key(5))], files) == 1
    assert files_overlapped([(key(25), None)], files) == 2
    assert files_overlapped([(None, None)], files) == 3


def test_the_whole_key_space_is_cut_at_each_bottom_file_so_the_shredder_can_rest_between_ranges() -> None:
    """whole_key_space_ranges: a range a bottom-level file, cut at each file's first key but the first's,
    from before every key to after every key; one range when there is no level below the first."""
    def key(number: int) -> bytes:
        return token_key(token(1, number))

    files = [(key(0), key(10)), (key(20), key(30)), (key(50), key(60))]
    assert whole_key_space_ranges(files) == [(None, key(20)), (key(20), key(50)), (key(50), None)]
    assert whole_key_space_ranges(files[:1]) == [(None, None)]
    assert whole_key_space_ranges([]) == [(None, None)]


class RecordingDatabase:
    """A store's RocksDB handle that records the ranges it is asked to compact."""

    def __init__(self, database) -> None:
        self.database = database
        self.compacted: list[tuple[bytes, bytes]] = []

    def compact_range(self, begin, end, options=None):
        self.compacted.append((begin, end))
        return self.database.compact_range(begin, end, options)

    def __getattr__(self, name):
        return getattr(self.database, name)


def test_a_shred_compacts_each_bottom_file_that_holds_its_keys_once_and_no_other(tmp_path):
    """A forced compaction rewrites every bottom-level file its range overlaps: each range of a shred
    overlaps one bottom file at most. Here a store of 2,000 tokens in bottom files of about 64 KiB, and
    a delete of the first 20 tokens and the last 20 in key order (80 keys): one range from the lowest
    key to the highest, as before, overlapped every file."""
    ciphertexts, command = random_tokenize(1, 2000)
    log = Log()
    vault = VaultStore.open(tmp_path / "store")
    try:
        apply(vault, log, rotate(1), command)
        vault._db.set_options({"target_file_size_base": str(64 * 1024)})
        vault._db.flush()
        vault._db.compact_range(None, None)
        files = bottom_files(vault._db)
        assert len(files) >= 10
        deleted = tuple(token(1, number) for number in (*range(20), *range(1980, 2000)))
        removal = encode_command(DeleteTokensCommand(deleted, 2_000, ACTOR))
        apply(vault, log, removal)
        # What the shredder is told such a pass costs, before it: the files its ranges overlap, of all of them.
        told = vault.prepare_shred(shred_keys(decode_command(removal)))
        recording = vault._db = RecordingDatabase(vault._db)
        try:
            vault.shred(shred_keys(decode_command(removal)))
        finally:
            vault._db = recording.database
        assert recording.compacted
        for begin, end in recording.compacted:
            assert sum(first < end and begin <= last for first, last in files) <= 1, (begin, end)
        overlapped = sum(any(first < end and begin <= last for begin, end in recording.compacted)
                         for first, last in files)
        assert told.ranges == recording.compacted
        assert (told.overlapped, told.bottom_files) == (overlapped, len(files)) and 0 < overlapped < len(files)
        # Each deleted ciphertext left every file; each other one stays, in the files and readable.
        for minted, ciphertext in ciphertexts.items():
            assert (files_holding(tmp_path / "store", ciphertext) == []) == (minted in deleted), minted
        assert vault.lookup(list(ciphertexts)) == {minted: ciphertext for minted, ciphertext in ciphertexts.items()
                                                    if minted not in deleted}
    finally:
        vault.close()


async def test_a_sweep_erases_a_delete_applied_mid_lap_once_it_comes_round_and_stops_there(tmp_path, monkeypatch):
    """tokenvault/core/shred.py, the sweep, on a real store of 2,000 tokens in bottom files of about 64 KiB:
    a delete applied while the sweep is halfway through its first lap (flushed before the sweep's next
    range) has left every file once the sweep has come round to that range in its second lap, and the
    sweep stops there, short of a second whole lap."""
    from test_shred import RecordingLog, until

    monkeypatch.setattr(shred_module, "MAX_KEYS_PER_PASS", 0)  # every delete goes to the sweep
    ciphertexts, command = random_tokenize(1, 2000)
    log = Log()
    vault = VaultStore.open(tmp_path / "store")
    shredder: Shredder | None = None
    try:
        apply(vault, log, rotate(1), command)
        vault._db.set_options({"target_file_size_base": str(64 * 1024)})
        vault._db.flush()
        vault._db.compact_range(None, None)
        lap = whole_key_space_ranges(bottom_files(vault._db))
        assert len(lap) >= 10
        halfway = len(lap) // 2
        compacted: list[tuple[bytes | None, bytes | None]] = []
        reached, resume = threading.Event(), threading.Event()
        compact = vault.compact_for_shred

        def compact_and_pause_halfway(begin, end):
            compact(begin, end)
            compacted.append((begin, end))
            if len(compacted) == halfway:
                reached.set()
                assert resume.wait(30), "the test never resumed the sweep"

        monkeypatch.setattr(vault, "compact_for_shred", compact_and_pause_halfway)
        reports: list[ShredPass] = []
        shredder = Shredder(lambda: vault, RecordingLog(last_index=log.next_index + 1), lambda error: None,
                            on_pass=reports.append)  # type: ignore[arg-type]
        deletes = {}
        for numbers in ((0, 1999), (3, 1000, 1996)):  # the second: on both sides of where the sweep stands
            tokens = tuple(token(1, number) for number in numbers)
            apply(vault, log, delete(*tokens))
            deletes[log.next_index - 1] = tokens
            shredder.note(log.next_index - 1, DeleteTokensCommand(tokens, 2_000, ACTOR))
            if len(deletes) == 1:
                assert await asyncio.to_thread(reached.wait, 30)
        resume.set()
        await until(lambda: len(reports) == 2, "both deletes shredded")
        assert [(report.through_index, report.whole_store) for report in reports] == [
            (index, True) for index in deletes]
        gone = {minted for tokens in deletes.values() for minted in tokens}
        for minted, ciphertext in ciphertexts.items():
            assert (files_holding(tmp_path / "store", ciphertext) == []) == (minted in gone), minted
        # The first lap whole, then the second round to the range where the second delete was flushed.
        started_at = lap[halfway][0]
        assert compacted[:len(lap)] == lap
        assert len(lap) < len(compacted) < 2 * len(lap)
        assert compacted[-1][1] is None or compacted[-1][1] >= started_at
        assert all(end is not None and end < started_at for _, end in compacted[len(lap):-1])
    finally:
        if shredder is not None:
            await shredder.close()
        vault.close()
