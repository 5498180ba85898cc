"""The store's version 2 rows: card and digits tokens keyed by epoch, expiry and metadata, the purge.

Everything is applied from commands only; every expected state follows from the
commands' own timestamps (the store reads no clock during apply)."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from tokenvault.core.commands import (CommandError, PurgeExpiredCommand, TokenizeCommand, decode_command,
                                      encode_command)
from tokenvault.core.store import VaultStore
from tokenvault.core.store_layout import InsertOnceViolation, Outcome

from test_store import Log, dump, rotate, started, token

HOUR_MS = 3600 * 1000


def tokenize_v2(epoch: int, items, *, at_ms: int = 1_000, token_format: str = "opaque",
                expires_at_ms: int | None = None, metadata: bytes | None = None,
                key: str | None = None) -> bytes:
    items = tuple(items)
    return encode_command(TokenizeCommand(
        epoch, items, "tokenizer" if key else None, key, b"fp" if key else None, at_ms, token_format=token_format,
        expires_at_ms=expires_at_ms, metadata=None if metadata is None else tuple(metadata for _ in items)))


def purge(now_ms: int, limit: int = 100) -> bytes:
    return encode_command(PurgeExpiredCommand(now_ms, limit))


@pytest.fixture
def store(tmp_path: Path):
    vault = VaultStore.open(tmp_path / "store")
    yield vault
    vault.close()


def apply(store: VaultStore, log: Log, *payloads: bytes):
    return store.apply_batch([log.command(payload) for payload in payloads])


def test_a_plain_tokenize_encodes_exactly_as_version_1() -> None:
    command = TokenizeCommand(1, ((token(1, 1), b"ct"),), None, None, None, 5)
    encoded = encode_command(command)
    assert len(msgpack.unpackb(encoded)) == 9
    assert decode_command(encoded) == command
    extended = TokenizeCommand(1, (("4111111111111111", b"ct"),), None, None, None, 5, token_format="card",
                               expires_at_ms=10, metadata=(b"m",))
    assert decode_command(encode_command(extended)) == extended


def test_commands_refuse_malformed_version_2_fields() -> None:
    for changes in ({"token_format": "cards"}, {"expires_at_ms": 5}, {"metadata": (b"m", b"n")},
                    {"metadata": (b"x" * 2000,)}):
        with pytest.raises(CommandError):
            TokenizeCommand(1, ((token(1, 1), b"ct"),), None, None, None, 5, **changes)
    with pytest.raises(CommandError):
        TokenizeCommand(1, (("tv1_abc", b"ct"),), None, None, None, 5, token_format="digits")
    with pytest.raises(CommandError):
        PurgeExpiredCommand(5, 0)


def test_an_expiry_per_item_is_a_13th_field_only_when_set_and_is_checked() -> None:
    items = ((token(1, 1), b"a"), (token(1, 2), b"b"), (token(1, 3), b"c"))
    command = TokenizeCommand(1, items, None, None, None, 5, item_expires_at_ms=(10, None, 7))
    encoded = encode_command(command)
    fields = msgpack.unpackb(encoded)
    assert len(fields) == 13 and fields[10] is None and fields[12] == [10, None, 7]
    assert decode_command(encoded) == command
    assert [command.expiry_of(position) for position in range(3)] == [10, None, 7]
    assert TokenizeCommand(1, items, None, None, None, 5, expires_at_ms=9).expiry_of(2) == 9
    for changes in ({"item_expires_at_ms": (10, None)},                        # not one per item
                    {"item_expires_at_ms": (10, None, 5)},                     # not after issued_at_ms
                    {"item_expires_at_ms": (10, None, True)},                  # not an integer
                    {"item_expires_at_ms": [10, None, 7]},                     # not a tuple
                    {"item_expires_at_ms": (10, None, 7), "expires_at_ms": 9}):  # both kinds of expiry
        with pytest.raises(CommandError):
            TokenizeCommand(1, items, None, None, None, 5, **changes)
    plain = msgpack.unpackb(encode_command(TokenizeCommand(1, items, None, None, None, 5, expires_at_ms=9)))
    for thirteenth in (None, 7, "x"):  # a 13th field must be the array
        with pytest.raises(CommandError):
            decode_command(msgpack.packb(plain + [thirteenth]))


def test_an_entry_that_carries_lives_is_a_14th_field_only_when_set_and_is_checked() -> None:
    items = ((token(1, 1), b"a"), (token(1, 2), b"b"))
    for expiries in (None, (10, None)):
        command = TokenizeCommand(1, items, None, None, None, 5, item_expires_at_ms=expiries, carries_lives=True)
        encoded = encode_command(command)
        fields = msgpack.unpackb(encoded)
        assert len(fields) == 14 and fields[12] == (None if expiries is None else list(expiries)) and fields[13] is True
        assert decode_command(encoded) == command and command.extended
    assert len(msgpack.unpackb(encode_command(TokenizeCommand(1, items, None, None, None, 5)))) == 9
    with pytest.raises(CommandError):
        TokenizeCommand(1, items, None, None, None, 5, carries_lives=1)  # type: ignore[arg-type]
    plain = msgpack.unpackb(encode_command(TokenizeCommand(1, items, None, None, None, 5, expires_at_ms=9)))
    for thirteenth, fourteenth in ((None, False), (None, 1), ([10, None], None), (7, True)):
        with pytest.raises(CommandError):
            decode_command(msgpack.packb(plain + [thirteenth, fourteenth]))


def test_an_item_without_an_expiry_makes_a_live_mapping_permanent_only_in_an_entry_that_carries_lives(
        store: VaultStore) -> None:
    """docs/tokens.md: a tokenize without a TTL leaves a live expiry as it is; a re-tokenize's entry carries
    a life that never ends over, so there it makes the mapping permanent. An expiry it carries lengthens
    a live one, never shortens it, and an expired mapping takes the carried life."""
    log = Log()
    started(store, log)
    live, expired = (token(1, 1), b"a"), (token(1, 2), b"b")
    apply(store, log, tokenize_v2(1, [live], at_ms=1_000, expires_at_ms=10_000),
          tokenize_v2(1, [expired], at_ms=1_000, expires_at_ms=2_000))
    apply(store, log, tokenize_v2(1, [live], at_ms=3_000))
    assert store.life(live[0], None)[0] == 10_000
    (result,) = apply(store, log, encode_command(TokenizeCommand(
        1, (live, expired), None, None, None, 4_000, item_expires_at_ms=(None, 9_000), carries_lives=True)))
    assert result.outcome == Outcome.OK
    assert store.life(live[0], None)[0] is None and store.life(expired[0], None)[0] == 9_000
    apply(store, log, encode_command(TokenizeCommand(1, (expired,), None, None, None, 5_000, expires_at_ms=6_000,
                                                     carries_lives=True)))
    assert store.life(expired[0], None)[0] == 9_000


def test_one_entry_gives_each_item_its_own_expiry_and_the_purge_takes_each_on_time(store: VaultStore) -> None:
    log = Log()
    started(store, log)
    items = [(token(1, number), b"v%d" % number) for number in range(3)]
    (result,) = apply(store, log, encode_command(TokenizeCommand(
        1, tuple(items), None, None, None, 1_000, item_expires_at_ms=(3_000, None, 2_000), metadata=(b"m",) * 3)))
    assert result.outcome == Outcome.OK
    assert [store.life(token(1, number), None)[0] for number in range(3)] == [3_000, None, 2_000]
    assert store.next_expiry_ms() == 2_000
    (first,) = apply(store, log, purge(2_000))
    assert first.items == 1 and set(store.lookup([t for t, _ in items], now_ms=0)) == {token(1, 0), token(1, 1)}
    (second,) = apply(store, log, purge(3_000))
    assert second.items == 1 and set(store.lookup([t for t, _ in items], now_ms=0)) == {token(1, 1)}
    assert store.next_expiry_ms() is None


def test_format_tokens_are_kept_per_epoch(store: VaultStore) -> None:
    log = Log()
    started(store, log)
    apply(store, log, tokenize_v2(1, [("4000001234560002", b"one")], token_format="card"))
    apply(store, log, rotate(2))
    # The same digits are a token of epoch 2 too, for another value: no collision across epochs.
    (result,) = apply(store, log, tokenize_v2(2, [("4000001234560002", b"two")], token_format="card"))
    assert result.outcome == Outcome.OK
    assert store.lookup_format(1, ["4000001234560002"]) == {"4000001234560002": b"one"}
    assert store.lookup_format(2, ["4000001234560002"]) == {"4000001234560002": b"two"}
    assert store.lookup_format(3, ["4000001234560002"]) == {}
    assert store.lookup(["4000001234560002"]) == {}
    assert store.token_count() == 0  # token_count counts opaque rows


def test_a_format_token_held_by_another_value_refuses_the_whole_command(store: VaultStore) -> None:
    log = Log()
    started(store, log)
    apply(store, log, tokenize_v2(1, [("1234567890123", b"card value")], token_format="card"))
    before = dump(store)
    (result,) = apply(store, log, tokenize_v2(1, [("555555", b"fresh"), ("1234567890123", b"digits value")],
                                              token_format="digits"))
    assert result.outcome == Outcome.TOKEN_COLLISION
    assert store.lookup_format(1, ["555555"]) == {}
    assert [row for row in dump(store) if row[0] != b"m"] == [row for row in before if row[0] != b"m"]


def test_one_token_with_two_values_in_one_command_is_refused(store: VaultStore) -> None:
    log = Log()
    started(store, log)
    before = dump(store)
    for token_format, token_text in (("card", "4000001234560002"), ("opaque", token(1, 1))):
        with pytest.raises(InsertOnceViolation):
            apply(store, log, tokenize_v2(1, [(token_text, b"one"), (token_text, b"two")], token_format=token_format,
                                          expires_at_ms=5_000))
        log.next_index -= 1  # the refused entry was not applied
    assert dump(store) == before


def test_expiry_is_judged_by_the_reader_clock_and_purged_by_command_time(store: VaultStore) -> None:
    log = Log()
    started(store, log)
    apply(store, log, tokenize_v2(1, [(token(1, 1), b"a")], at_ms=1_000, expires_at_ms=5_000),
          tokenize_v2(1, [(token(1, 2), b"b")], at_ms=1_000))
    assert set(store.lookup([token(1, 1), token(1, 2)], now_ms=4_999)) == {token(1, 1), token(1, 2)}
    assert set(store.lookup([token(1, 1), token(1, 2)], now_ms=5_000)) == {token(1, 2)}
    assert store.next_expiry_ms() == 5_000
    (early,) = apply(store, log, purge(4_999))
    assert early.items == 0
    (on_time,) = apply(store, log, purge(5_000))
    assert on_time.items == 1 and on_time.kind == "purge"
    assert store.next_expiry_ms() is None
    assert set(store.lookup([token(1, 1), token(1, 2)], now_ms=0)) == {token(1, 2)}
    assert store.token_count() == 1
    assert not any(key.startswith((b"L", b"X")) for key, _ in dump(store))


def test_tokenizing_again_never_shortens_a_life(store: VaultStore) -> None:
    log = Log()
    started(store, log)
    apply(store, log, tokenize_v2(1, [(token(1, 1), b"a")], at_ms=1_000, expires_at_ms=10_000, metadata=b"m1"))
    # A shorter TTL, then none at all, keep the longer expiry; new metadata replaces the old.
    apply(store, log, tokenize_v2(1, [(token(1, 1), b"a")], at_ms=2_000, expires_at_ms=3_000, metadata=b"m2"))
    assert store.life(token(1, 1)) == (10_000, b"m2")
    apply(store, log, tokenize_v2(1, [(token(1, 1), b"a")], at_ms=2_500))
    assert store.life(token(1, 1)) == (10_000, b"m2")
    # A longer TTL extends it, and the expiry index follows (one key per mapping).
    apply(store, log, tokenize_v2(1, [(token(1, 1), b"a")], at_ms=3_000, expires_at_ms=20_000))
    assert store.life(token(1, 1)) == (20_000, b"m2")
    assert sum(key.startswith(b"X") for key, _ in dump(store)) == 1
    assert store.next_expiry_ms() == 20_000


def test_a_permanent_mapping_stays_permanent(store: VaultStore) -> None:
    log = Log()
    started(store, log)
    apply(store, log, tokenize_v2(1, [(token(1, 1), b"a")], at_ms=1_000))
    apply(store, log, tokenize_v2(1, [(token(1, 1), b"a")], at_ms=2_000, expires_at_ms=3_000, metadata=b"m"))
    assert store.life(token(1, 1)) == (None, b"m")
    assert store.next_expiry_ms() is None
    assert store.metadata(None, [token(1, 1)]) == {token(1, 1): b"m"}


def test_tokenizing_after_expiry_starts_a_new_life(store: VaultStore) -> None:
    log = Log()
    started(store, log)
    apply(store, log, tokenize_v2(1, [(token(1, 1), b"a")], at_ms=1_000, expires_at_ms=2_000, metadata=b"m"))
    # Expired (2_000 <= 5_000) but not purged: the repeat without TTL or metadata makes it permanent, bare.
    apply(store, log, tokenize_v2(1, [(token(1, 1), b"a")], at_ms=5_000))
    assert store.life(token(1, 1)) == (None, None)
    assert store.lookup([token(1, 1)], now_ms=10**12) == {token(1, 1): b"a"}
    assert not any(key.startswith((b"L", b"X")) for key, _ in dump(store))


def test_a_plain_tokenize_takes_the_same_rules_once_lives_exist(store: VaultStore) -> None:
    """Once any mapping has a life row, plain (version 1) tokenize commands renew and revive alike."""
    log = Log()
    started(store, log)
    apply(store, log, tokenize_v2(1, [(token(1, 1), b"a")], at_ms=1_000, expires_at_ms=2_000))
    plain = encode_command(TokenizeCommand(1, ((token(1, 1), b"a"),), None, None, None, 1_500))
    apply(store, log, plain)
    assert store.life(token(1, 1)) == (2_000, None)  # live: unchanged
    revive = encode_command(TokenizeCommand(1, ((token(1, 1), b"a"),), None, None, None, 2_000))
    apply(store, log, revive)
    assert store.life(token(1, 1)) == (None, None)  # expired at 2_000: a new, permanent life
    assert store.next_expiry_ms() is None


def test_purge_in_the_same_batch_as_a_revival_keeps_the_revived_mapping(store: VaultStore) -> None:
    log = Log()
    started(store, log)
    apply(store, log, tokenize_v2(1, [(token(1, 1), b"a")], at_ms=1_000, expires_at_ms=2_000))
    apply(store, log, purge(3_000), tokenize_v2(1, [(token(1, 1), b"a")], at_ms=3_000))
    assert store.lookup([token(1, 1)], now_ms=10**12) == {token(1, 1): b"a"}
    assert store.token_count() == 1


def test_the_purge_is_bounded_and_ordered_and_equal_across_batchings(tmp_path: Path) -> None:
    payloads = [rotate(1)]
    for number in range(10):
        payloads.append(tokenize_v2(1, [(token(1, number), b"v%d" % number)], at_ms=1_000,
                                    expires_at_ms=2_000 + (number * 7) % 10))
    payloads += [purge(3_000, limit=4), purge(3_000, limit=4), tokenize_v2(1, [(token(1, 99), b"x")], at_ms=3_000,
                                                                            expires_at_ms=2_500_000)]
    payloads += [purge(3_000, limit=4)]
    dumps = []
    for batch_size in (1, 3, len(payloads)):
        store = VaultStore.open(tmp_path / f"store-{batch_size}")
        log = Log()
        entries = [log.command(payload) for payload in payloads]
        results = []
        for start in range(0, len(entries), batch_size):
            results += store.apply_batch(entries[start:start + batch_size])
        assert [result.items for result in results[-4:] if result.kind == "purge"] == [4, 4, 2]
        assert store.lookup([token(1, number) for number in range(10)], now_ms=0) == {}
        assert store.token_count() == 1
        dumps.append([row for row in dump(store)])
        store.close()
    assert dumps[0] == dumps[1] == dumps[2]


def test_life_rows_survive_a_reopen(tmp_path: Path) -> None:
    store = VaultStore.open(tmp_path / "store")
    log = Log()
    started(store, log)
    apply(store, log, tokenize_v2(1, [(token(1, 1), b"a")], at_ms=1_000, expires_at_ms=2_000))
    store.close()
    store = VaultStore.open(tmp_path / "store")
    try:
        assert store.lookup([token(1, 1)], now_ms=2_000) == {}
        assert store.next_expiry_ms() == 2_000
    finally:
        store.close()


def test_a_token_twice_in_one_entry_ends_as_two_entries_one_after_the_other_would_leave_it(store: VaultStore) -> None:
    """An entry that merges requests (tokenvault/api/coalesce.py) may hold one token twice, each with its
    own expiry: its items are applied in order, so the later expiry wins, no expiry beats any, and an
    item without a TTL leaves a live expiry as it is."""
    log = Log()
    started(store, log)
    cases = {1: (3_000, 9_000), 2: (None, 5_000), 3: (5_000, None), 4: (9_000, 3_000)}
    items, expiries = [], []
    for number, pair in cases.items():
        for expiry in pair:
            items.append((token(1, number), b"v%d" % number))
            expiries.append(expiry)
    (result,) = apply(store, log, encode_command(TokenizeCommand(
        1, tuple(items), None, None, None, 1_000, item_expires_at_ms=tuple(expiries))))
    assert result.outcome == Outcome.OK and store.token_count() == 4
    assert {number: store.life(token(1, number), None)[0] for number in cases} == {
        1: 9_000, 2: None, 3: 5_000, 4: 9_000}
