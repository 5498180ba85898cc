"""Online backup of a live cluster under load, and restore into a new cluster (real processes).

`tokenvault admin backup` downloads a backup while clients keep tokenizing;
`./run_cluster.sh restore` builds a new cluster from it (other directory, other
ports, same master key, new API keys) and starts it; every token acknowledged
before the backup started detokenizes to its value on every node there. A
truncated or altered backup is refused with a message and no traceback, and
leaves no cluster directory behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import (ELECTION_TIMEOUT_TICKS, HEARTBEAT_INTERVAL_TICKS, REQUEST_TIMEOUT_MS, TICK_MS, ClusterHarness,
                     background_load, free_base_port, wait_for_acknowledged)
from history import History, Kind
from test_failover import value_pool
from tokenvault.devcluster import cluster
from tokenvault.client.vault import AsyncClient, Unauthorized

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_SECONDS = 60.0


def run_command(arguments: list[str], environment: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(arguments, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS,
                          env={**os.environ, **(environment or {})}, cwd=REPOSITORY)


def restore_command(backup: Path, directory: Path, master_key_file: Path) -> list[str]:
    return [str(REPOSITORY / "run_cluster.sh"), "restore", str(backup), "--master-key-file", str(master_key_file)]


def source_key_file(source: ClusterHarness) -> Path:
    """The backed-up cluster's master key file: in its key directory, outside its cluster directory."""
    path = cluster.master_key_file_of(cluster.load_cluster(source.directory))
    assert path is not None and not path.is_relative_to(source.directory)
    return path


def restore_environment(directory: Path) -> dict[str, str]:
    """A new cluster directory on free ports, with the harness's fast timing knobs."""
    return {"TOKENVAULT_CLUSTER_DIR": str(directory),
            "TOKENVAULT_BASE_PORT": str(free_base_port(3, random.Random())),
            "TOKENVAULT_TICK_MS": str(TICK_MS), "TOKENVAULT_ELECTION_TIMEOUT_TICKS": str(ELECTION_TIMEOUT_TICKS),
            "TOKENVAULT_HEARTBEAT_INTERVAL_TICKS": str(HEARTBEAT_INTERVAL_TICKS),
            "TOKENVAULT_REQUEST_TIMEOUT_MS": str(REQUEST_TIMEOUT_MS)}


async def test_backup_under_load_restores_into_a_new_cluster(
        make_cluster: Callable[..., ClusterHarness], tmp_path: Path) -> None:
    source = make_cluster()
    history = History()
    await asyncio.to_thread(source.wait_for_primary)
    backup = tmp_path / "vault.backup"
    tokenvault_cli = str(Path(sys.executable).parent / "tokenvault")
    async with background_load(source, history, value_pool("backup", 400), workers=6, batch_items=20):
        await wait_for_acknowledged(history, 30)
        backup_started = time.monotonic()
        result = await asyncio.to_thread(run_command, [
            tokenvault_cli, "admin", "backup", "--url", ",".join(source.spec.http_urls),
            "--api-key", source.key("admin"), "--ca-file", str(source.ca_file), "--out", str(backup), "--json"])
        backup_ended = time.monotonic()
        # Writes go on after the backup too (the load stops only when this block ends).
        await wait_for_acknowledged(history, 10, since_monotonic=backup_ended)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["role"] == "primary" and summary["bytes"] == backup.stat().st_size
    assert source.key("admin") not in result.stdout + result.stderr

    # Writes kept being acknowledged while the backup was taken, and none failed then.
    during = [operation for operation in history.operations()
              if operation.kind == Kind.TOKENIZE and operation.start_monotonic >= backup_started
              and operation.end_monotonic is not None and operation.end_monotonic <= backup_ended]
    assert during and all(operation.acknowledged for operation in during), history.summary()

    before = {token: value for operation in history.acknowledged(Kind.TOKENIZE)
              if operation.end_monotonic is not None and operation.end_monotonic < backup_started
              for value, token in zip(operation.inputs, operation.outputs)}
    assert len(before) >= 30

    restored = make_cluster(start=False)
    outcome = await asyncio.to_thread(run_command, restore_command(backup, restored.directory,
                                                                   source_key_file(source)),
                                      restore_environment(restored.directory))
    if restored.directory.exists():
        restored.spec = cluster.load_cluster(restored.directory)
        restored._remember_pids()
    assert outcome.returncode == 0, outcome.stdout + outcome.stderr
    assert f"index {summary['index']}" in outcome.stdout
    assert {node.http_port for node in restored.nodes}.isdisjoint(node.http_port for node in source.nodes)
    await asyncio.to_thread(restored.wait_for_primary)

    tokens = list(before)
    async with restored.node_clients(deadline_seconds=10.0) as clients:
        for node_id, client in clients.items():
            values: list[str | None] = []
            for start in range(0, len(tokens), 1000):
                values += await client.detokenize(tokens[start:start + 1000])
            assert values == [before[token] for token in tokens], f"{node_id} lost tokens of the backup"
        # Same epoch secret: the same value gives the same token; and the new cluster takes writes.
        some_token, some_value = next(iter(before.items()))
        again = await clients[restored.node_ids[0]].tokenize([some_value, "written after the restore"])
        assert again.tokens[0] == some_token
    # New API keys: the old cluster's key opens nothing here.
    async with AsyncClient(restored.spec.http_urls, source.key("full"), ca_file=restored.ca_file) as client:
        with pytest.raises(Unauthorized):
            await client.detokenize(tokens[:1])


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
async def test_a_damaged_backup_is_refused_and_builds_no_cluster(
        make_cluster: Callable[..., ClusterHarness], tmp_path: Path, damage: str) -> None:
    source = make_cluster(nodes=1)
    async with source.client() as client:
        await client.tokenize(value_pool("damaged", 50))
    backup = tmp_path / "vault.backup"
    tokenvault_cli = str(Path(sys.executable).parent / "tokenvault")
    result = await asyncio.to_thread(run_command, [
        tokenvault_cli, "admin", "backup", "--url", source.url("n1"), "--api-key", source.key("admin"),
        "--ca-file", str(source.ca_file), "--out", str(backup)])
    assert result.returncode == 0, result.stderr
    data = bytearray(backup.read_bytes())
    if damage == "truncated":
        data = data[:len(data) * 2 // 3]
    else:
        data[len(data) // 2] ^= 0x40
    backup.write_bytes(bytes(data))

    target = tmp_path / "restored"
    outcome = await asyncio.to_thread(run_command, restore_command(backup, target, source_key_file(source)),
                                      restore_environment(target))
    assert outcome.returncode == 1
    assert "is refused" in outcome.stderr and "Traceback" not in outcome.stdout + outcome.stderr
    assert not target.exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []
