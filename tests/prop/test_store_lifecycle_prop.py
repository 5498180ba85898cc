"""Property test for the store's version 2 rows: random tokenizes with and without TTL (one for the
entry, or one per item as a re-tokenize writes them) and metadata,
plain version 1 tokenizes, card tokens and purges, applied one entry at a time, in random batches
(with a reopen in between) and in one batch, end byte-identical and agree with a reference model of
the rules in docs/tokens.md ("Metadata and expiry"): a life is never shortened while it lasts, an
expired mapping starts over, a purge deletes the earliest expired mappings up to its limit."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import Entry, EntryKind
from tokenvault.core.commands import PurgeExpiredCommand, RotateEpochCommand, TokenizeCommand, encode_command
from tokenvault.core.store import VaultStore

NEVER = 2**62


def opaque_token(number: int) -> str:
    return f"tv1_{number:032d}"


def card_token(number: int) -> str:
    return f"{number:016d}"


operations = st.lists(st.one_of(
    # Few tokens, so that the same mapping is tokenized again often.
    st.tuples(st.just("tokenize"), st.booleans(), st.lists(st.integers(0, 2), min_size=1, max_size=3),
              st.sampled_from([None, 1, 3, 8]), st.sampled_from([None, b"m1", b"m2"]), st.integers(0, 2),
              st.one_of(st.none(), st.lists(st.sampled_from([None, 1, 3, 8]), min_size=3, max_size=3))),
    st.tuples(st.just("purge"), st.integers(0, 3), st.integers(1, 3)),
), min_size=1, max_size=25)


def build(ops: list) -> tuple[list[bytes], dict]:
    """The entries (time moves forward 1 s per operation) and the model's final state."""
    payloads = [encode_command(RotateEpochCommand(1, b"wrapped-1", 0, None, None, None))]
    model: dict[tuple[bool, int], tuple[int | None, bytes | None]] = {}
    now_s = 0
    for op in ops:
        now_s += 1
        now_ms = now_s * 1000
        if op[0] == "tokenize":
            _, card, numbers, ttl_s, metadata, plain_bit, item_ttls_s = op
            plain = plain_bit == 0 and not card and ttl_s is None and metadata is None and item_ttls_s is None
            expires = None if ttl_s is None else now_ms + ttl_s * 1000
            item_expires = None if item_ttls_s is None else tuple(
                None if ttl is None else now_ms + ttl * 1000 for ttl in item_ttls_s[:len(numbers)])
            items = tuple(((card_token if card else opaque_token)(number), b"ct%d" % number) for number in numbers)
            command = TokenizeCommand(1, items, None, None, None, now_ms) if plain else TokenizeCommand(
                1, items, None, None, None, now_ms, token_format="card" if card else "opaque",
                expires_at_ms=expires if item_expires is None else None,
                metadata=None if metadata is None else tuple(metadata for _ in items), item_expires_at_ms=item_expires)
            payloads.append(encode_command(command))
            for position, number in enumerate(numbers):  # each item in order, as an entry of its own
                if item_expires is not None:
                    expires = item_expires[position]
                key = (card, number)
                if key not in model or (model[key][0] is not None and model[key][0] <= now_ms):
                    model[key] = (expires, metadata)
                else:
                    old_expires, old_metadata = model[key]
                    new_expires = old_expires if old_expires is None or expires is None else max(old_expires, expires)
                    model[key] = (new_expires, metadata if metadata is not None else old_metadata)
        else:
            _, back_s, limit = op
            cutoff = max(0, now_ms - back_s * 1000)
            payloads.append(encode_command(PurgeExpiredCommand(cutoff, limit)))
            # Earliest expiry first, then by row key ("F" rows sort before "t" rows).
            expired = sorted((expires, b"F" if card else b"t", number) for (card, number), (expires, _) in model.items()
                             if expires is not None and expires <= cutoff)
            for _, prefix, number in expired[:limit]:
                del model[(prefix == b"F", number)]
    return payloads, model


def apply_all(path: Path, payloads: list[bytes], cuts: list[int]) -> list[tuple[bytes, bytes]]:
    entries = [Entry(index, 1, EntryKind.COMMAND, payload) for index, payload in enumerate(payloads, start=1)]
    store = VaultStore.open(path)
    start = 0
    for position, cut in enumerate(sorted(set(cuts)) + [len(entries)]):
        store.apply_batch(entries[start:cut])
        start = max(start, cut)
        if position == 1:  # one reopen halfway
            store.close()
            store = VaultStore.open(path)
    rows = list(store._db.items())  # noqa: SLF001 - the whole state, compared byte for byte
    state = {}
    for card in (False, True):
        for number in range(3):
            token = card_token(number) if card else opaque_token(number)
            found = store.lookup_format(1, [token], now_ms=0) if card else store.lookup([token], now_ms=0)
            if found:
                state[(card, number)] = store.life(token, 1 if card else None)
    store.close()
    return rows, state


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(operations, st.lists(st.integers(0, 26), max_size=4))
def test_lives_follow_the_model_whatever_the_batches(ops: list, cuts: list[int]) -> None:
    payloads, model = build(ops)
    directory = Path(tempfile.mkdtemp(prefix="tv-life-prop-"))
    try:
        one_by_one, state = apply_all(directory / "a", payloads, list(range(1, len(payloads))))
        batched, batched_state = apply_all(directory / "b", payloads, cuts)
        whole, _ = apply_all(directory / "c", payloads, [])
    finally:
        shutil.rmtree(directory)
    assert state == model
    assert batched_state == model
    assert one_by_one == whole
    assert batched == whole
