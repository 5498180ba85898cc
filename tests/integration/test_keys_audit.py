"""Runtime API keys and the audit trail on a real three-node cluster (issue 11, parts 5 and 6):
a revoked key gets 401 on every node within 1 s of the revocation's acknowledgement, every
detokenize, key change and epoch change leaves one hash-chained record that every node holds
identically, and a record rewritten on one stopped node's disk is found by `admin audit verify`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import aiohttp
import msgpack
import pytest
from click.testing import CliRunner

from harness import ClusterHarness, default_settings, wait_for
from tokenvault.cli.main import tokenvault
from tokenvault.client.vault import AsyncClient, client_ssl_context
from tokenvault.core.store import VaultStore

pytestmark = pytest.mark.integration

REVOKE_DEADLINE_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 0.5


# New connections per node after the revocation: with two HTTP workers, all of them reaching one worker
# has a chance of 2 in 2**16.
FRESH_CONNECTION_PROBES = 16


async def _status_with_key(session: aiohttp.ClientSession, url: str, key: str) -> int:
    """The status of one cheap authenticated call that never writes: a tokenize-only key gets 403 on
    the admin epoch list while it is valid, 401 once it is unknown."""
    async with session.get(f"{url}/v1/admin/epochs", headers={"Authorization": f"Bearer {key}"},
                           timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS)) as response:
        return response.status


async def _seconds_until_401(session: aiohttp.ClientSession, url: str, key: str, deadline: float) -> float | None:
    """Poll one node until it answers 401; the seconds since ``deadline - 1 s``, or None if never by then."""
    started = deadline - REVOKE_DEADLINE_SECONDS
    while True:
        try:
            if await _status_with_key(session, url, key) == 401:
                return time.monotonic() - started
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.01)


def test_a_revoked_key_gets_401_on_every_node_within_one_second_of_the_ack(make_cluster) -> None:
    harness: ClusterHarness = make_cluster(3, settings=default_settings())

    async def scenario() -> dict[str, float | None]:
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(harness.ca_file))
        async with harness.client() as admin, aiohttp.ClientSession(connector=connector) as session:
            created = await admin.create_key("probe", ["tokenize"])
            assert created.key is not None and created.key.startswith(f"tvk1_{created.id}_")
            # The key works everywhere once created (each node applied it): 403 here means authenticated.
            for node_id in harness.node_ids:
                url = harness.url(node_id)
                for _ in range(200):
                    if await _status_with_key(session, url, created.key) == 403:
                        break
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError(f"{node_id} never accepted the new key")
            async with AsyncClient(harness.url(harness.node_ids[0]), created.key, ca_file=harness.ca_file) as user:
                assert (await user.tokenize(["from-a-runtime-key"])).tokens
            assert [info.id for info in await admin.list_keys()] == [created.id]
            backup = next(node_id for node_id in harness.node_ids
                          if (harness.health(node_id) or {}).get("role") == "backup")
            async with harness.client(backup) as via_backup:
                await via_backup.revoke_key(created.id)  # forwarded to the primary
            deadline = time.monotonic() + REVOKE_DEADLINE_SECONDS
            answers = await asyncio.gather(*(_seconds_until_401(session, harness.url(node_id), created.key, deadline)
                                             for node_id in harness.node_ids))
            # The polls above ride one kept-alive connection per node, so one HTTP worker each: a new
            # connection per request reaches the node's other workers too (the kernel spreads them).
            fresh = aiohttp.TCPConnector(ssl=client_ssl_context(harness.ca_file), force_close=True)
            async with aiohttp.ClientSession(connector=fresh) as each_new:
                statuses = {node_id: {await _status_with_key(each_new, harness.url(node_id), created.key)
                                      for _ in range(FRESH_CONNECTION_PROBES)} for node_id in harness.node_ids}
            assert all(found == {401} for found in statuses.values()), statuses
            assert await admin.list_keys() == ()
            return dict(zip(harness.node_ids, answers))

    seconds_until_401 = asyncio.run(scenario())
    # A probe started just before the deadline may answer after it: its 401 counts only if it came in time.
    late = {node_id: seconds for node_id, seconds in seconds_until_401.items()
            if seconds is None or seconds > REVOKE_DEADLINE_SECONDS}
    assert not late, f"still accepted the revoked key 1 s after the ack: {seconds_until_401}"


def _verify(url: str, key: str, ca_file: Path | None) -> tuple[int, str, str]:
    return _audit_cli(url, key, ca_file, "verify", "--json")


def _audit_cli(url: str, key: str, ca_file: Path | None, *arguments: str) -> tuple[int, str, str]:
    connection = ["--url", url, "--api-key", key] + (["--ca-file", str(ca_file)] if ca_file else [])
    result = CliRunner().invoke(tokenvault, ["admin", *connection, "audit", *arguments],
                                env={"TOKENVAULT_URL": "", "TOKENVAULT_API_KEY": "", "TOKENVAULT_CA_FILE": ""})
    return result.exit_code, result.stdout, result.stderr


async def _all_records(client: AsyncClient) -> list[dict]:
    records, after = [], 0
    while True:
        page = await client.audit_page(after, 50)
        records.extend(page.records)
        if page.next_after is None:
            return records
        after = page.next_after


def _tamper_found_count(store_path, seq: int) -> None:
    """Rewrite one record on a stopped node's disk: its found count changes, its stored hash does not."""
    store = VaultStore.open(store_path)
    try:
        key = b"A" + seq.to_bytes(8, "big")
        record = msgpack.unpackb(store._db[key], raw=False)
        record[7] = record[7] + 1 if record[7] == 0 else record[7] - 1  # [seq, at, node, name, id, action, items, found, ...]
        store._db[key] = msgpack.packb(record, use_bin_type=True)
    finally:
        store.close()


def test_audit_trail_is_identical_everywhere_and_verify_finds_a_record_tampered_on_disk(make_cluster) -> None:
    harness: ClusterHarness = make_cluster(3)
    marker = uuid.uuid4().hex
    values = [f"audit-{marker}-{number}" for number in range(3)]

    async def produce() -> tuple[list[str], dict[str, list[dict]]]:
        async with harness.client() as full:
            tokens = list((await full.tokenize(values)).tokens)
            async with harness.node_clients(key="detokenizer") as readers:
                for node_id, reader in readers.items():
                    assert await reader.detokenize(tokens + ["tv1_" + "a" * 32]) == (*values, None)
            await full.rotate_epoch()
            created = await full.create_key("short-lived", ["detokenize"])
            await full.revoke_key(created.id)
        # The bootstrap epoch, three detokenizes, our rotation, the key's creation and revocation.
        head = 7
        chains: dict[str, list[dict]] = {}
        async with harness.node_clients() as clients:
            for node_id, client in clients.items():
                async def caught_up() -> list[dict] | None:
                    records = await _all_records(client)
                    return records if len(records) == head else None
                for _ in range(100):
                    records = await caught_up()
                    if records is not None:
                        chains[node_id] = records
                        break
                    await asyncio.sleep(0.05)
        return tokens, chains

    tokens, chains = asyncio.run(produce())
    assert set(chains) == set(harness.node_ids), "a node did not apply the whole audit trail"
    first = chains[harness.node_ids[0]]
    assert all(chain == first for chain in chains.values()), "the nodes hold different audit chains"
    detokenizes = [record for record in first if record["action"] == "detokenize"]
    assert [(record["node"], record["key_name"], record["items"], record["found"]) for record in detokenizes] == [
        (node_id, "detokenizer", 4, 3) for node_id in harness.node_ids]
    assert len({record["request_id"] for record in detokenizes}) == 3
    actions = [record["action"] for record in first]
    assert actions.count("epoch.rotate") == 2  # the bootstrap epoch and ours
    assert actions[-2:] == ["key.create", "key.revoke"]
    text = json.dumps(first)
    assert not any(value in text for value in values) and not any(token[4:] in text for token in tokens)

    victim = harness.node_ids[1]
    for node_id in harness.node_ids:
        assert _verify(harness.url(node_id), harness.key("admin"), harness.ca_file)[0] == 0
    tampered_seq = detokenizes[1]["seq"]
    harness.kill(victim)
    _tamper_found_count(harness.node(victim).data_dir / "store", tampered_seq)
    harness.restart(victim)
    wait_for(lambda: (harness.health(victim) or {}).get("applied_index", 0) > 0, 10, "the victim to serve")
    exit_code, stdout, stderr = _verify(harness.url(victim), harness.key("admin"), harness.ca_file)
    assert exit_code == 4, (stdout, stderr)
    report = json.loads(stdout)
    assert (report["ok"], report["broken_seq"], report["verified"]) == (False, tampered_seq, tampered_seq - 1)
    assert "does not match its hash" in report["reason"]
    untouched = next(node_id for node_id in harness.node_ids if node_id != victim)
    assert _verify(harness.url(untouched), harness.key("admin"), harness.ca_file)[0] == 0


def test_an_exported_trail_is_trimmed_on_every_node_and_verifies_from_its_anchor(make_cluster, tmp_path: Path) -> None:
    """Export, then trim through the export's head with its hash: every node drops the same records,
    keeps the same anchor (also across a restart), and `audit verify` checks the rest from it. A trim
    with another hash is refused with nothing dropped."""
    harness: ClusterHarness = make_cluster(3)
    admin, ca_file = harness.key("admin"), harness.ca_file

    async def detokenize_a_few() -> None:
        async with harness.client() as full:
            tokens = list((await full.tokenize(["trim-a", "trim-b"])).tokens)
            for _ in range(4):
                assert await full.detokenize(tokens) == ("trim-a", "trim-b")

    asyncio.run(detokenize_a_few())
    primary_url = harness.url(harness.node_ids[0])
    code, stdout, stderr = _audit_cli(primary_url, admin, ca_file, "export", "--out", str(tmp_path / "a.jsonl"),
                                      "--json")
    assert code == 0, stderr
    exported = json.loads(stdout)
    through, head_hash = exported["last_seq"], exported["head_hash"]
    assert through >= 5 and exported["verified"] == through
    wrong = "0" * 64
    code, _, stderr = _audit_cli(primary_url, admin, ca_file, "trim", "--through", str(through), "--hash", wrong,
                                 "--yes")
    assert code == 1 and "another hash" in stderr
    code, stdout, stderr = _audit_cli(primary_url, admin, ca_file, "trim", "--through", str(through), "--hash",
                                      head_hash, "--yes", "--json")
    assert code == 0, stderr
    assert json.loads(stdout) == {"trimmed_through": through, "removed": through, "anchor_hash": head_hash}

    async def chains() -> dict[str, tuple[list[dict], object]]:
        found: dict[str, tuple[list[dict], object]] = {}
        async with harness.node_clients() as clients:
            for node_id, client in clients.items():
                for _ in range(100):
                    page = await client.audit_page(0, 1000)
                    if page.anchor is not None and page.records and page.records[-1]["action"] == "audit.trim":
                        found[node_id] = (list(page.records), page.anchor)
                        break
                    await asyncio.sleep(0.05)
        return found

    def check_every_node() -> None:
        held = asyncio.run(chains())
        assert set(held) == set(harness.node_ids), "a node did not apply the trim"
        for records, anchor in held.values():
            assert anchor == (through, head_hash)
            assert [record["seq"] for record in records] == [through + 1]  # only the trim's own record
            assert (records[0]["items"], records[0]["subject"]) == (through, str(through))
        for node_id in harness.node_ids:
            code, stdout, stderr = _verify(harness.url(node_id), admin, ca_file)
            report = json.loads(stdout)
            assert code == 0 and (report["anchor_seq"], report["verified"]) == (through, 1), (stdout, stderr)

    check_every_node()
    restarted = harness.node_ids[2]
    harness.kill(restarted)
    harness.restart(restarted)
    wait_for(lambda: (harness.health(restarted) or {}).get("applied_index", 0) > 0, 10, "the node to serve again")
    check_every_node()
