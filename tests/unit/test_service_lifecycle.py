"""NodeService's version 2 paths on in-process nodes: format and option requests forwarded by a
backup (and held to the same checks by the primary), the bounded background purge, and
idempotency keys over the new options."""

from __future__ import annotations

import json
import time

import msgpack
import pytest

from node_support import Cluster, RunningNode, wait_until
from protocol import ForwardRequest
from tokenvault.core import commands
from tokenvault.errors import IdempotencyMismatch, UnprocessableValue
from test_service import body, serve_forward

CARD = "4111111111111111"


def packed(document: object) -> bytes:
    return msgpack.packb(document, use_bin_type=True)


def extended(**changes: object) -> bytes:
    return packed({"principal": "p", "values": [CARD], "idempotency_key": None, "token_format": "card",
                   "metadata_json": None, "ttl_seconds": None, **changes})


async def test_a_backup_forwards_format_tokenize_and_reveal(trio: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    backup = trio.backups()[0]
    outcome = await backup.service.tokenize("p", ["4111 1111 1111 1111"], None, "card", '{"k":"v"}', 3600)
    document = body(outcome)
    (token,) = document["tokens"]
    # Nothing applied here yet counts: the backup asks the primary (reveal) for what it cannot find.
    monkeypatch.setattr(backup.node.store, "lookup_format", lambda *arguments, **keywords: {})
    answer = await backup.service.reveal([token], None, document["epoch"], True, False)
    assert answer == {"values": [CARD], "metadata_json": ['{"k":"v"}']}
    masked = await backup.service.reveal([token], None, None, False, True)
    assert masked == {"values": ["************1111"]}
    # Audited like any detokenize (committed before the answer), and marked as masked.
    store = trio.primaries()[0].node.store
    subjects = [record.get("subject") for record in store.audit_page(0, 1000) if record.get("action") == "detokenize"]
    assert subjects == [None, "masked"]


async def test_forwarded_version_2_requests_get_the_http_checks(trio: Cluster) -> None:
    primary = trio.primaries()[0]
    cases = {
        "card-not-luhn": ("tokenize.v2", extended(values=["4111111111111112"]), 422),
        "digits-too-short": ("tokenize.v2", extended(token_format="digits", values=["12345"]), 422),
        "unknown-format": ("tokenize.v2", extended(token_format="cards"), 400),
        "ttl-zero": ("tokenize.v2", extended(ttl_seconds=0), 422),
        "ttl-not-an-integer": ("tokenize.v2", extended(ttl_seconds="5"), 400),
        "metadata-not-canonical": ("tokenize.v2", extended(metadata_json='{"b":1, "a":2}'), 400),
        "metadata-not-an-object": ("tokenize.v2", extended(metadata_json="[1]"), 400),
        "missing-member": ("tokenize.v2", packed({"principal": "p", "values": [CARD], "idempotency_key": None}), 400),
        "reveal-epoch-zero": ("reveal", packed({"tokens": [CARD], "epoch": 0, "include_metadata": False}), 400),
        "reveal-metadata-flag": ("reveal", packed({"tokens": [CARD], "epoch": 1, "include_metadata": 1}), 400),
        "reveal-not-a-token": ("reveal", packed({"tokens": ["12ab"], "epoch": 1, "include_metadata": False}), 400),
    }
    for request_id, (name, (kind, payload, status)) in enumerate(cases.items(), start=200):
        applied = primary.node.store.applied_index
        response = await serve_forward(primary, ForwardRequest(request_id=request_id, kind=kind, body=payload))
        assert response.status == status, (name, response.body[:200])
        assert b"4111111111111112" not in response.body, name
        assert primary.node.store.applied_index == applied, name
    response = await serve_forward(primary, ForwardRequest(request_id=1, kind="tokenize.v2", body=extended()))
    assert response.status == 200
    (token,) = json.loads(response.body)["tokens"]
    lookup = packed({"tokens": [token], "epoch": 1, "include_metadata": False})
    response = await serve_forward(primary, ForwardRequest(request_id=2, kind="reveal", body=lookup))
    assert response.status == 200 and msgpack.unpackb(response.body) == {token: [CARD, None]}


async def test_the_purge_deletes_expired_mappings_in_bounded_entries(single: RunningNode) -> None:
    node, service = single.node, single.service
    assert service._purge_task is not None
    service._purge_task.cancel()  # this test drives the purge itself
    now_ms = int(time.time() * 1000)
    keys = node.keyring.get(1)
    items = tuple(keys.seal(f"expired-{number}") for number in range(5))
    command = commands.TokenizeCommand(1, items, None, None, None, now_ms - 10_000, expires_at_ms=now_ms - 5_000)
    await node.propose(commands.encode_command(command), 5)
    tokens = [token for token, _ in items]
    assert node.store.lookup(tokens) == {}  # expired: never read, even before the purge
    assert len(node.store.lookup(tokens, now_ms=now_ms - 6_000)) == 5
    service.expiry_purge_limit = 2
    applied = node.store.applied_index
    assert [await service.purge_expired_once() for _ in range(4)] == [2, 2, 1, 0]
    assert node.store.applied_index == applied + 3  # three purge entries, none once nothing expired
    assert node.store.lookup(tokens, now_ms=0) == {}
    assert node.store.next_expiry_ms() is None


async def _second_with(service, key: str, first: tuple, second: tuple, values: list[str]) -> None:
    """Tokenize ``values`` under ``key`` with the options ``first``, then again with ``second``."""
    assert (await service.tokenize("p", values, key, *first)).status == 200
    await service.tokenize("p", values, key, *second)


async def test_idempotency_keys_cover_the_options(single: RunningNode) -> None:
    service = single.service
    first = await service.tokenize("p", ["v"], "key-1", "opaque", None, 60)
    replay = await service.tokenize("p", ["v"], "key-1", "opaque", None, 60)
    assert replay.replayed and replay.body == first.body
    with pytest.raises(IdempotencyMismatch):
        await service.tokenize("p", ["v"], "key-1", "opaque", None, 61)
    with pytest.raises(IdempotencyMismatch):
        await service.tokenize("p", ["v"], "key-1")
    # Another format, and other metadata, under the same key: each a mismatch, and nothing written.
    with pytest.raises(IdempotencyMismatch):
        await _second_with(service, "key-2", ("opaque", None, 60), ("digits", None, 60), ["123456"])
    with pytest.raises(IdempotencyMismatch):
        await _second_with(service, "key-3", ("opaque", '{"a":1}', None), ("opaque", '{"a":2}', None), ["v"])
    with pytest.raises(UnprocessableValue):
        await service.tokenize("p", ["123"], None, "digits")


async def test_the_purge_deletes_expired_mappings_on_every_node(trio: Cluster) -> None:
    """docs/guarantees.md, expiry: the purge is replicated entries, so the backups delete the expired
    rows too (a read answers null from the clock alone; the rows must go as well)."""
    primary = await trio.wait_for_stable_primary()
    for running in trio.running():
        if running.service._purge_task is not None:
            running.service._purge_task.cancel()  # this test drives the purge itself
    now_ms = int(time.time() * 1000)
    items = tuple(primary.node.keyring.get(1).seal(f"expired-everywhere-{number}") for number in range(3))
    command = commands.TokenizeCommand(1, items, None, None, None, now_ms - 10_000, expires_at_ms=now_ms - 5_000)
    await primary.node.propose(commands.encode_command(command), 5)
    tokens = [token for token, _ in items]
    for running in trio.running():
        await wait_until(lambda: len(running.node.store.lookup(tokens, now_ms=0)) == 3, 5, "the rows on every node")
    assert await primary.service.purge_expired_once() == 3
    for running in trio.running():
        await wait_until(lambda: running.node.store.lookup(tokens, now_ms=0) == {}, 5,
                         f"{running.node_id} to delete the expired rows")
        assert running.node.store.next_expiry_ms() is None
