"""Property tests for tokenvault.store: apply follows a reference model and is deterministic.

Random command sequences (tokenize and rotate with right and wrong epochs,
idempotency keys reused across principals, timestamps that let records expire,
no-ops) are applied to a store in random batches with a restart and a replay of
already-applied entries in between, and to a second store in one batch. Both
must produce the model's results, and end with identical tables.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import Entry, EntryKind
from tokenvault.commands import RotateEpochCommand, TokenizeCommand, encode_command
from tokenvault.store import Outcome, VaultStore

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
            self.active_epoch = epoch
            body, status = json.dumps({"epoch": epoch}, separators=(",", ":")).encode(), 201
        if key is not None:
            self.idempotency[(principal, key)] = (at_ms, status, body)
        return (Outcome.OK, status, body)


def tables(store: VaultStore) -> dict:
    connection = store._connection
    return {table: connection.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("tokens", "epochs", "idempotency", "meta")}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_list=st.lists(commands, min_size=5, max_size=40), data=st.data())
def test_apply_matches_the_model_whatever_the_batching_restarts_and_replays(command_list, data):
    model = Model()
    entries, expected = [], []
    for index, drawn in enumerate(command_list, start=1):
        command = resolve_epoch(drawn, model.active_epoch)
        entries.append(to_entry(index, command))
        if command[0] != "noop":
            expected.append((index, *model.apply(command)))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(entries)), max_size=6)))
    restart_after = data.draw(st.integers(0, len(cuts)))
    with tempfile.TemporaryDirectory() as temporary:
        path = Path(temporary) / "batched.db"
        batched = VaultStore.open(path, retention_ms=RETENTION_MS, purge_limit_per_command=PURGE_LIMIT)
        results = []
        start = 0
        for position, end in enumerate(cuts + [len(entries)]):
            # Each batch starts a little before the applied index, like a replay after a restart.
            replay_from = data.draw(st.integers(0, start))
            results += batched.apply_batch(entries[replay_from:end])
            start = max(start, end)
            if position == restart_after:
                batched.close()
                batched = VaultStore.open(path, retention_ms=RETENTION_MS, purge_limit_per_command=PURGE_LIMIT)
        single = VaultStore.open(Path(temporary) / "single.db", retention_ms=RETENTION_MS, purge_limit_per_command=PURGE_LIMIT)
        single_results = single.apply_batch(entries)
        assert [(r.index, r.outcome, r.status, r.response) for r in results] == expected
        assert single_results == results
        assert tables(batched) == tables(single)
        assert batched.applied_index == len(entries)
        assert batched.active_epoch() == model.active_epoch
        assert batched.lookup(list(model.tokens)) == model.tokens
        assert batched.token_count() == len(model.tokens)
        for (principal, key), (_, status, body) in model.idempotency.items():
            record = batched.idempotency_get(principal, key)
            assert record is not None and (record.status, record.response) == (status, body)
        assert len(tables(batched)["idempotency"]) == len(model.idempotency)
        batched.close()
        single.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_list=st.lists(commands, min_size=2, max_size=30), data=st.data())
def test_snapshot_at_any_point_then_the_rest_of_the_log_gives_the_same_state(command_list, data):
    model = Model()
    entries = []
    for index, drawn in enumerate(command_list, start=1):
        command = resolve_epoch(drawn, model.active_epoch)
        entries.append(to_entry(index, command))
        if command[0] != "noop":
            model.apply(command)
    split = data.draw(st.integers(1, len(entries) - 1))
    with tempfile.TemporaryDirectory() as temporary:
        source = VaultStore.open(Path(temporary) / "source.db", retention_ms=RETENTION_MS, purge_limit_per_command=PURGE_LIMIT)
        source.apply_batch(entries[:split])
        index, view, image = source.snapshot_bytes()
        target = VaultStore.open(Path(temporary) / "target.db", retention_ms=RETENTION_MS, purge_limit_per_command=PURGE_LIMIT)
        target.install_snapshot(image, index, view)
        assert target.apply_batch(entries) == source.apply_batch(entries)
        assert tables(target) == tables(source)
        source.close()
        target.close()
