"""The replicated key table and audit trail in tokenvault.core.store: apply, limits, restarts, snapshots,
and one chain on every node whatever its batch boundaries."""

from __future__ import annotations

import msgpack
import pytest

from protocol import Entry, EntryKind
from tokenvault import auth
from tokenvault.core import store as store_module
from tokenvault.audit_chain import ChainBreak, ChainVerifier
from tokenvault.core.commands import (Actor, AuditCommand, AuditRecord, AuditTrimCommand, CommandError,
                                      CreateApiKeyCommand, RevokeApiKeyCommand, RotateEpochCommand, decode_command,
                                      encode_command)
from tokenvault.core.store import VaultStore
from tokenvault.core.store_layout import Outcome

ACTOR = Actor(name="admin", key_id=None, node="n1", request_id="req-1")


def entries(payloads: list[bytes], first_index: int = 1) -> list[Entry]:
    return [Entry(first_index + offset, 1, EntryKind.COMMAND, payload) for offset, payload in enumerate(payloads)]


def create(key_id: str | None = None, scopes=("tokenize",), at_ms: int = 2_000):
    new_id, key, salt, digest = auth.new_runtime_key()
    command = CreateApiKeyCommand(key_id or new_id, "ci", tuple(scopes), salt, digest, at_ms, ACTOR)
    return command, key


def detokenize_audit(count: int, node: str = "n2") -> bytes:
    records = tuple(AuditRecord(3_000 + number, node, "reader", None, "detokenize", 5, number % 6, f"r{number}", None)
                    for number in range(count))
    return encode_command(AuditCommand(records))


def history() -> tuple[list[bytes], str, str]:
    command, key = create()
    payloads = [encode_command(RotateEpochCommand(1, b"w" * 60, 1_000, None, None, None,
                                                  Actor(node="n1", request_id="bootstrap"))),
                encode_command(command), detokenize_audit(3), detokenize_audit(2, "n3"),
                encode_command(RevokeApiKeyCommand(command.key_id, 4_000, ACTOR)),
                encode_command(RotateEpochCommand(2, b"w" * 60, 5_000, "admin", None, None))]
    return payloads, command.key_id, key


@pytest.fixture
def vault(tmp_path):
    opened = VaultStore.open(tmp_path / "store")
    yield opened
    opened.close()


def test_a_created_key_authenticates_with_its_scopes_and_a_revoked_one_does_not(vault):
    command, key = create(scopes=("detokenize", "tokenize"))
    (result,) = vault.apply_batch(entries([encode_command(command)]))
    assert result.outcome == Outcome.OK
    table = auth.ApiKeyTable([], vault.api_key)
    principal = table.authenticate(key)
    assert principal == auth.Principal("ci", frozenset({"detokenize", "tokenize"}), command.key_id)
    assert principal.identity == f"key-{command.key_id}"
    assert table.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    (revoked,) = vault.apply_batch(entries([encode_command(RevokeApiKeyCommand(command.key_id, 3, ACTOR))], 2))
    assert revoked.outcome == Outcome.OK
    assert table.authenticate(key) is None and vault.api_keys() == []
    (again,) = vault.apply_batch(entries([encode_command(RevokeApiKeyCommand(command.key_id, 4, ACTOR))], 3))
    assert again.outcome == Outcome.KEY_NOT_FOUND


def test_no_key_is_stored_only_its_salted_digest(vault):
    command, key = create()
    vault.apply_batch(entries([encode_command(command)]))
    everything = b"".join(name + value for name, value in vault._db.items())
    # The secret is everything after the id's underscore (base64url: it may hold underscores of its own).
    secret = key.split("_", 2)[2]
    assert len(secret) >= 40 and key.encode() not in everything and secret.encode() not in everything
    assert command.digest in everything and command.salt in everything


def test_the_key_table_is_bounded_and_an_existing_id_is_refused(vault, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_API_KEYS", 2)
    first, _ = create()
    results = vault.apply_batch(entries([encode_command(first), encode_command(create()[0]),
                                         encode_command(create()[0]), encode_command(create(first.key_id)[0])]))
    assert [result.outcome for result in results] == [Outcome.OK, Outcome.OK, Outcome.KEY_LIMIT, Outcome.KEY_EXISTS]
    assert len(vault.api_keys()) == 2


def test_keys_and_the_audit_trail_survive_a_restart_and_travel_in_a_snapshot(tmp_path):
    payloads, key_id, key = history()
    kept, _ = create()
    source = VaultStore.open(tmp_path / "source")
    source.apply_batch(entries(payloads + [encode_command(kept)]))
    pages = source.audit_page(0, 100)
    source.close()
    source = VaultStore.open(tmp_path / "source")
    assert source.audit_page(0, 100) == pages and [entry.key_id for entry in source.api_keys()] == [kept.key_id]
    index, view = source.create_checkpoint(tmp_path / "checkpoint")
    target = VaultStore.open(tmp_path / "target")
    target.commit_install(target.prepare_install(tmp_path / "checkpoint", index, view)).close()
    assert target.audit_page(0, 100) == pages and target.audit_seq == len(pages)
    assert target.api_key(kept.key_id) == source.api_key(kept.key_id)
    target.close()
    source.close()


def test_the_chain_is_the_same_whatever_the_batch_boundaries_and_verifies(tmp_path):
    payloads, _, _ = history()
    whole = VaultStore.open(tmp_path / "whole")
    whole.apply_batch(entries(payloads))
    one_by_one = VaultStore.open(tmp_path / "single")
    for index, payload in enumerate(payloads, start=1):
        one_by_one.apply_batch(entries([payload], index))
    records = whole.audit_page(0, 1000)
    assert records == one_by_one.audit_page(0, 1000)
    assert [record["action"] for record in records] == (
        ["epoch.rotate", "key.create"] + ["detokenize"] * 5 + ["key.revoke", "epoch.rotate"])
    # A rotation written before the audit trail carries no actor: its principal names the key.
    assert (records[-1]["node"], records[-1]["key_name"], records[-1]["subject"]) == ("-", "admin", "2")
    verifier = ChainVerifier()
    for record in records:
        verifier.check(record)
    assert verifier.count == len(records) == whole.audit_seq
    whole.close()
    one_by_one.close()


def test_pages_are_bounded_and_ordered(vault):
    vault.apply_batch(entries([detokenize_audit(25)]))
    assert [record["seq"] for record in vault.audit_page(10, 5)] == [11, 12, 13, 14, 15]
    assert vault.audit_page(25, 10) == []
    for after, limit in ((-1, 5), (0, 0), (0, store_module.MAX_AUDIT_PAGE + 1)):
        with pytest.raises(ValueError):
            vault.audit_page(after, limit)


@pytest.mark.parametrize("tamper", ["field", "hash", "garbage", "delete"])
def test_a_record_changed_on_disk_breaks_the_chain_at_that_record(vault, tamper):
    vault.apply_batch(entries([detokenize_audit(6)]))
    key = b"A" + (4).to_bytes(8, "big")
    record = msgpack.unpackb(vault._db[key], raw=False)
    if tamper == "field":
        record[6] += 1  # items
        vault._db[key] = msgpack.packb(record, use_bin_type=True)
    elif tamper == "hash":
        record[-1] = bytes(32)
        vault._db[key] = msgpack.packb(record, use_bin_type=True)
    elif tamper == "garbage":
        vault._db[key] = b"\xc1not msgpack"
    else:
        del vault._db[key]
    verifier = ChainVerifier()
    with pytest.raises(ChainBreak) as broken:
        for page_record in vault.audit_page(0, 100):
            verifier.check(page_record)
    assert broken.value.seq == 4 and verifier.count == 3


def trim(through: int, digest: bytes) -> bytes:
    return encode_command(AuditTrimCommand(through, digest, 9_000, ACTOR))


def verified_from_anchor(store: VaultStore) -> int:
    """Check the store's whole remaining chain from its anchor; the number of records checked."""
    verifier = ChainVerifier()
    verifier.start_at(*store.audit_anchor)
    for record in store.audit_page(0, 1000):
        verifier.check(record)
    assert verifier.last_seq == store.audit_seq
    return verifier.count


def test_a_trim_drops_the_records_through_the_exported_head_and_the_rest_verifies_from_the_anchor(tmp_path):
    payloads, _, _ = history()
    store = VaultStore.open(tmp_path / "store")
    store.apply_batch(entries(payloads))
    exported = store.audit_page(0, 1000)
    head = exported[5]  # an export that ended at record 6
    (result,) = store.apply_batch(entries([trim(head["seq"], bytes.fromhex(head["hash"]))], len(payloads) + 1))
    assert result.outcome == Outcome.OK
    assert result.response == (
        b'{"trimmed_through":6,"removed":6,"anchor_hash":"' + head["hash"].encode() + b'"}')
    assert store.audit_anchor == (6, bytes.fromhex(head["hash"]))
    remaining = store.audit_page(0, 1000)
    assert remaining[:-1] == exported[6:]  # untouched, and nothing of 1..6 is left in the store
    assert not any(key[:1] == b"A" and int.from_bytes(key[1:], "big") <= 6 for key in store._db.keys())
    trimmed = remaining[-1]
    assert (trimmed["action"], trimmed["items"], trimmed["subject"], trimmed["key_name"]) == (
        "audit.trim", 6, "6", "admin")
    assert verified_from_anchor(store) == len(exported) - 6 + 1
    # The anchor survives a restart and travels in a snapshot.
    store.close()
    store = VaultStore.open(tmp_path / "store")
    assert store.audit_anchor == (6, bytes.fromhex(head["hash"])) and store.audit_page(0, 1000) == remaining
    index, view = store.create_checkpoint(tmp_path / "checkpoint")
    target = VaultStore.open(tmp_path / "target")
    target.commit_install(target.prepare_install(tmp_path / "checkpoint", index, view)).close()
    assert target.audit_anchor == store.audit_anchor and target.audit_page(0, 1000) == remaining
    target.close()
    store.close()


def test_a_trim_is_refused_with_nothing_dropped_unless_the_record_exists_with_that_hash(vault):
    payloads, _, _ = history()
    vault.apply_batch(entries(payloads))
    records = vault.audit_page(0, 1000)
    index = len(payloads) + 1
    (wrong,) = vault.apply_batch(entries([trim(3, bytes(32))], index))
    (ahead,) = vault.apply_batch(entries([trim(len(records) + 1, bytes(32))], index + 1))
    assert (wrong.outcome, ahead.outcome) == (Outcome.AUDIT_HASH_MISMATCH, Outcome.AUDIT_RECORD_NOT_FOUND)
    assert vault.audit_page(0, 1000) == records and vault.audit_anchor == (0, bytes(32))
    (done,) = vault.apply_batch(entries([trim(4, bytes.fromhex(records[3]["hash"]))], index + 2))
    assert done.outcome == Outcome.OK
    after = vault.audit_page(0, 1000)
    # Again to the anchor with its hash: a retry, nothing more dropped or recorded. Behind it: refused.
    (again,) = vault.apply_batch(entries([trim(4, bytes.fromhex(records[3]["hash"]))], index + 3))
    (behind,) = vault.apply_batch(entries([trim(2, bytes.fromhex(records[1]["hash"]))], index + 4))
    assert again.outcome == Outcome.OK and b'"removed":0' in again.response
    assert behind.outcome == Outcome.AUDIT_TRIMMED_ALREADY
    assert vault.audit_page(0, 1000) == after


def test_a_trim_in_the_batch_that_wrote_its_record_keeps_every_record_after_the_anchor(tmp_path):
    """Records the batch wrote before the trim are in its overlay: the range delete comes after them in
    the write, and records written after the trim stay. The chain is the same applied one by one."""
    payloads, _, _ = history()
    reference = VaultStore.open(tmp_path / "reference")
    reference.apply_batch(entries(payloads))
    anchor = reference.audit_page(0, 1000)[-1]  # the newest record, written by the same batch below
    tail = [trim(anchor["seq"], bytes.fromhex(anchor["hash"])), detokenize_audit(2)]
    together = VaultStore.open(tmp_path / "together")
    together.apply_batch(entries(payloads + tail))
    for offset, payload in enumerate(tail, start=len(payloads) + 1):
        reference.apply_batch(entries([payload], offset))
    assert together.audit_page(0, 1000) == reference.audit_page(0, 1000)
    assert [record["action"] for record in together.audit_page(0, 1000)] == ["audit.trim", "detokenize", "detokenize"]
    assert verified_from_anchor(together) == 3
    together.close()
    reference.close()


def test_a_trim_command_round_trips_and_malformed_ones_are_refused():
    command = AuditTrimCommand(7, b"\x01" * 32, 9_000, ACTOR)
    assert decode_command(encode_command(command)) == command
    for bad in (lambda: AuditTrimCommand(0, b"\x01" * 32, 1, ACTOR), lambda: AuditTrimCommand(1, b"\x01" * 31, 1, ACTOR),
                lambda: AuditTrimCommand(1, "a" * 32, 1, ACTOR)):  # type: ignore[arg-type]
        with pytest.raises(CommandError):
            bad()
