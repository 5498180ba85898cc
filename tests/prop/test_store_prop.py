"""Property tests for tokenvault.core.store: apply follows a reference model and is deterministic.

Random command sequences (tokenize and rotate with right and wrong epochs, the
same tokens again, idempotency keys reused across principals and retried,
timestamps that let records expire, no-ops) are applied to a store in random
batches with reopens and replays of already-applied entries in between, and to
a second store in one batch. Both must produce the model's results (outcomes,
lookups, token count, epochs, idempotency records including expiry and purge)
and end byte-identical. Checkpoints taken at any point and installed elsewhere
give the same state; a batch refused for an insert-once conflict changes nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocol import Entry, EntryKind
from tokenvault.core.commands import RotateEpochCommand, TokenizeCommand, encode_command
import pytest

from tokenvault.core.store import VaultStore
from tokenvault.core.store_layout import InsertOnceViolation, Outcome

RETENTION_MS = 2_000
# A small purge limit and a wide key space make the bounded, ordered purge matter.
PURGE_LIMIT = 1
KEYS = st.sampled_from([None, None, "k1", "k2", "k3", "k4", "k5", "k6"])
# Whole seconds, so that records often sit exactly on the expiry boundary.
TIMESTAMPS_MS = st.integers(0, 10).map(lambda seconds: seconds * 1000)


def token(epoch: int, number: int) -> str:
    return f"tv{epoch}_{number:032d}"


def ciphertext(token_text: str) -> bytes:
    # Deterministic per token, as AES-SIV with the token as associated data is.
    return b"ct:" + token_text.encode()


# Epochs are drawn relative to the active epoch when the command is proposed
# (mostly right, sometimes stale or ahead), as a primary racing a rotation would.
commands = st.one_of(
    st.builds(lambda delta, numbers, key, principal, at_ms: ("tokenize", delta, tuple(numbers), key, principal, at_ms),
              st.sampled_from([0, 0, 0, 0, -1, 1]), st.lists(st.integers(0, 15), min_size=1, max_size=5),
              KEYS, st.sampled_from(["p1", "p2"]), TIMESTAMPS_MS),
    st.builds(lambda delta, key, at_ms: ("rotate", delta, key, at_ms),
              st.sampled_from([1, 1, 0, 2]), st.sampled_from([None, "r1", "r2"]), TIMESTAMPS_MS),
    st.just(("noop",)),
)


def resolve_epoch(command: tuple, active_epoch: int) -> tuple:
    if command[0] == "noop":
        return command
    return (command[0], max(1, active_epoch + command[1]), *command[2:])


def to_entry(index: int, command: tuple) -> Entry:
    if command[0] == "noop":
        return Entry(index, 1, EntryKind.NOOP, b"")
    if command[0] == "tokenize":
        _, epoch, numbers, key, principal, at_ms = command
        items = tuple((token(epoch, n), ciphertext(token(epoch, n))) for n in numbers)
        payload = TokenizeCommand(epoch, items, principal, key, b"fp" if key else None, at_ms)
    else:
        _, epoch, key, at_ms = command
        payload = RotateEpochCommand(epoch, b"wrapped", at_ms, "admin" if key else None, key, b"fp" if key else None)
    return Entry(index, 1, EntryKind.COMMAND, encode_command(payload))


@dataclass
class Model:
    """A direct restatement of the apply rules in INTERFACES.md, with the purge order of the store."""

    active_epoch: int = 0
    tokens: dict = field(default_factory=dict)
    epochs: list = field(default_factory=list)  # [epoch, created_at_ms, state]
    idempotency: dict = field(default_factory=dict)  # (principal, key) -> (created_at_ms, status, response)

    def existing(self, principal, key, now_ms):
        cutoff = now_ms - RETENTION_MS
        expired = sorted((created, identity) for identity, (created, _, _) in self.idempotency.items()
                         if created < cutoff)
        for _, identity in expired[:PURGE_LIMIT]:
            del self.idempotency[identity]
        record = self.idempotency.get((principal, key)) if key is not None else None
        if record is not None and record[0] < cutoff:
            del self.idempotency[(principal, key)]
            return None
        return record

    def apply(self, command: tuple):
        if command[0] == "tokenize":
            _, epoch, numbers, key, principal, at_ms = command
            if epoch != self.active_epoch:
                return (Outcome.EPOCH_MISMATCH, None, None)
            record = self.existing(principal, key, at_ms)
            if record is not None:
                return (Outcome.DUPLICATE, record[1], record[2])
            for number in numbers:
                self.tokens[token(epoch, number)] = ciphertext(token(epoch, number))
            # The store builds (and keeps) a tokenize body only for a keyed, replayable request.
            body = json.dumps({"epoch": epoch, "tokens": [token(epoch, n) for n in numbers]},
                              separators=(",", ":")).encode() if key is not None else None
            status = 200
        else:
            _, epoch, key, at_ms = command
            principal = "admin"
            if epoch != self.active_epoch + 1:
                return (Outcome.STALE_EPOCH, None, None)
            record = self.existing(principal, key, at_ms)
            if record is not None:
                return (Outcome.DUPLICATE, record[1], record[2])
            if self.epochs:
                self.epochs[-1][2] = "retired"
            self.epochs.append([epoch, at_ms, "active"])
            self.active_epoch = epoch
            body, status = json.dumps({"epoch": epoch}, separators=(",", ":")).encode(), 201
        if key is not None:
            self.idempotency[(principal, key)] = (at_ms, status, body)
        return (Outcome.OK, status, body)


def dump(store: VaultStore) -> list:
    """Every key and value of the live database, meta included."""
    return list(store._db.items())


def idempotency_count(store: VaultStore) -> int:
    return sum(1 for key in store._db.keys(from_key=b"i") if key[:1] == b"i")


_EMPTY_STORE = tempfile.TemporaryDirectory(prefix="tokenvault-empty-store-")


def open_store(path: Path) -> VaultStore:
    """Open the store at ``path``; a new one starts as a copy of an empty store made once, which
    spares each example the fsyncs of a creation (tests/unit/test_store.py covers creating)."""
    if not path.exists():
        template = Path(_EMPTY_STORE.name) / "store"
        if not template.exists():
            VaultStore.open(template).close()
        shutil.copytree(template, path)
    return VaultStore.open(path, retention_ms=RETENTION_MS, purge_limit_per_command=PURGE_LIMIT)


def build(command_list: list) -> tuple[Model, list, list]:
    """The model after the commands, their entries, and the model's result of each command."""
    model = Model()
    entries, expected = [], []
    for index, drawn in enumerate(command_list, start=1):
        command = resolve_epoch(drawn, model.active_epoch)
        entries.append(to_entry(index, command))
        if command[0] != "noop":
            expected.append((index, *model.apply(command)))
    return model, entries, expected


def assert_matches(store: VaultStore, model: Model) -> None:
    assert store.active_epoch() == model.active_epoch
    assert store.lookup(list(model.tokens)) == model.tokens
    assert store.token_count() == len(model.tokens)
    assert [[e.epoch, e.created_at_ms, e.state] for e in store.epochs()] == model.epochs
    assert all(e.wrapped_secret == b"wrapped" for e in store.epochs())
    for (principal, key), (created_at_ms, status, body) in model.idempotency.items():
        record = store.idempotency_get(principal, key)
        assert record is not None
        assert (record.status, record.response, record.created_at_ms) == (status, body, created_at_ms)
    assert idempotency_count(store) == len(model.idempotency)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_list=st.lists(commands, min_size=5, max_size=40), data=st.data())
def test_apply_matches_the_model_whatever_the_batching_reopens_and_replays(command_list, data):
    model, entries, expected = build(command_list)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(entries)), max_size=6)))
    reopen_after = data.draw(st.sets(st.integers(0, len(cuts)), max_size=3))
    with tempfile.TemporaryDirectory() as temporary:
        path = Path(temporary) / "batched"
        batched = open_store(path)
        results = []
        start = 0
        for position, end in enumerate(cuts + [len(entries)]):
            # Each batch starts a little before the applied index, like a replay after a restart.
            replay_from = data.draw(st.integers(0, start))
            results += batched.apply_batch(entries[replay_from:end])
            start = max(start, end)
            if position in reopen_after:
                batched.close()
                batched = open_store(path)
        single = open_store(Path(temporary) / "single")
        single_results = single.apply_batch(entries)
        assert [(r.index, r.outcome, r.status, r.response) for r in results] == expected
        assert single_results == results
        assert dump(batched) == dump(single)
        assert batched.applied_index == len(entries)
        assert_matches(batched, model)
        batched.close()
        reopened = open_store(path)
        assert_matches(reopened, model)
        reopened.close()
        single.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_list=st.lists(commands, min_size=2, max_size=30), data=st.data())
def test_checkpoint_at_any_point_then_the_rest_of_the_log_gives_the_same_state(command_list, data):
    model, entries, _ = build(command_list)
    split = data.draw(st.integers(1, len(entries) - 1))
    target_prefix = data.draw(st.integers(0, len(entries)))
    with tempfile.TemporaryDirectory() as temporary:
        source = open_store(Path(temporary) / "source")
        source.apply_batch(entries[:split])
        index, view = source.create_checkpoint(Path(temporary) / "checkpoint")
        assert (index, view) == (split, 1)
        # The target has a state of its own (possibly ahead): the install replaces it whole.
        target = open_store(Path(temporary) / "target")
        target.apply_batch(entries[:target_prefix])
        target.commit_install(target.prepare_install(Path(temporary) / "checkpoint", index, view)).close()
        assert dump(target) == dump(source)
        assert target.apply_batch(entries) == source.apply_batch(entries)
        assert dump(target) == dump(source)
        assert_matches(target, model)
        source.close()
        target.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(command_list=st.lists(commands, min_size=2, max_size=30), data=st.data())
def test_a_batch_refused_for_an_insert_once_conflict_changes_nothing(command_list, data):
    model, entries, _ = build(command_list)
    assume(model.tokens)
    split = data.draw(st.integers(0, len(entries)))
    conflicting_token = data.draw(st.sampled_from(sorted(model.tokens)))
    epoch = model.active_epoch  # the epoch at the end of the log, so the command is applied, not a mismatch
    with tempfile.TemporaryDirectory() as temporary:
        store = open_store(Path(temporary) / "store")
        twin = open_store(Path(temporary) / "twin")
        for vault in (store, twin):
            vault.apply_batch(entries[:split])
        # The rest of the log, then a command that maps a stored token to another ciphertext.
        conflict = TokenizeCommand(epoch, ((conflicting_token, b"other"),), None, None, None, 0)
        refused = entries[split:] + [Entry(len(entries) + 1, 1, EntryKind.COMMAND, encode_command(conflict))]
        before = (store.applied_index, store.active_epoch(), store.token_count(), dump(store))
        with pytest.raises(InsertOnceViolation):
            store.apply_batch(refused)
        assert (store.applied_index, store.active_epoch(), store.token_count(), dump(store)) == before
        # Without the conflicting command both stores go on identically (memory included: purge state).
        assert store.apply_batch(entries) == twin.apply_batch(entries)
        assert dump(store) == dump(twin)
        assert_matches(store, model)
        store.close()
        twin.close()
