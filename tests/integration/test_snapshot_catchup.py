"""A restarted backup that is behind the primary's compacted log catches up through a snapshot.

Real processes: compaction is set to run every few applied entries (the
`[wal] compact_every_entries` / `compact_keep_entries` knobs), so a short outage
leaves the backup behind the primary's log base and only a snapshot of the
store can bring it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable

import pytest

from harness import ClusterHarness, RecordingClient, fast_settings, memory_bytes, reset_peak_memory, wait_for
from history import History, Kind
from test_failover import assert_history_holds, highest_commit_index, value_pool
from tokenvault.config import WalConfig
from tokenvault.core.snapshot_transfer import INCOMING_DIRECTORY

pytestmark = pytest.mark.integration


async def _cluster_with_a_backup_down(make_cluster: Callable[..., ClusterHarness],
                                      **wal: int) -> tuple[ClusterHarness, str, str, list[str]]:
    """A cluster that compacts every 20 entries keeping 2, with one backup killed: (harness, primary, backup, live)."""
    settings = dataclasses.replace(fast_settings(), wal=WalConfig(fsync=True, compact_every_entries=20,
                                                                  compact_keep_entries=2, **wal))
    harness = make_cluster(settings=settings)
    primary = await asyncio.to_thread(harness.wait_for_primary)
    backup = next(node_id for node_id in harness.node_ids if node_id != primary)
    await asyncio.to_thread(harness.kill, backup)
    return harness, primary, backup, [node_id for node_id in harness.node_ids if node_id != backup]


async def test_backup_behind_the_compacted_log_installs_a_snapshot_and_serves(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    harness, primary, backup, live = await _cluster_with_a_backup_down(make_cluster)
    history = History()
    writer = RecordingClient(history, "missed", harness.client(live), "+".join(live))
    for batch in range(60):  # 60 entries: the primary compacts its log well past the backup's position
        assert await writer.tokenize(value_pool(f"snap-{batch}", 3)) is not None
    assert await writer.rotate() is not None
    assert await writer.tokenize(value_pool("snap-after-rotation", 3)) is not None
    await writer.close()
    commit_index = highest_commit_index(harness, live)

    backup_mark = harness.log_mark(backup)
    primary_mark = harness.log_mark(primary)
    await asyncio.to_thread(harness.restart, backup)
    harness.wait_for_event(primary, "snapshot.sent", since=primary_mark, peer=backup, outcome="installed")
    harness.wait_for_event(backup, "snapshot.installed", since=backup_mark)
    await asyncio.to_thread(harness.wait_for_applied, [backup], commit_index, 10.0)

    # Everything issued while it was down is now in the backup's own store, in both epochs.
    missed = {token: value for operation in history.acknowledged(Kind.TOKENIZE)
              for value, token in zip(operation.inputs, operation.outputs)}
    assert {token.split("_")[0] for token in missed} == {"tv1", "tv2"}
    async with harness.node_clients([backup]) as clients:
        answers = await clients[backup].detokenize(list(missed))
    assert list(answers) == list(missed.values())
    assert (harness.health(backup) or {}).get("active_epoch") == 2
    await assert_history_holds(harness, history, harness.node_ids)


async def test_a_store_of_over_100_chunks_streams_to_a_backup_while_writes_are_acknowledged_within_2_s(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    # 1 KiB chunks: the store of a few thousand tokens spans well over 100 of them.
    chunk_bytes = 1024
    harness, primary, backup, live = await _cluster_with_a_backup_down(make_cluster, snapshot_chunk_bytes=chunk_bytes)
    history = History()
    filler = RecordingClient(history, "filler", harness.client(live), "+".join(live))
    for batch in range(30):
        assert await filler.tokenize(value_pool(f"bulk-{batch}", 100)) is not None
    await filler.close()

    latencies: list[float] = []
    stop = asyncio.Event()

    async def steady_single_value_writes() -> None:
        writer = RecordingClient(history, "steady", harness.client(live), "+".join(live))
        try:
            number = 0
            while not stop.is_set():
                started = time.monotonic()
                assert await writer.tokenize([f"steady-{number}"]) is not None, "a write was refused"
                latencies.append(time.monotonic() - started)
                number += 1
        finally:
            await writer.close()

    writes = asyncio.get_running_loop().create_task(steady_single_value_writes())
    backup_mark = harness.log_mark(backup)
    primary_mark = harness.log_mark(primary)
    await asyncio.to_thread(harness.restart, backup)
    await asyncio.to_thread(harness.wait_for_event, backup, "snapshot.installed", backup_mark, 30.0)
    await asyncio.to_thread(harness.wait_for_event, primary, "snapshot.sent", primary_mark, 10.0, peer=backup,
                            outcome="installed")
    # The transfer that completed (it may have been offered while the backup was still down).
    sending = harness.find_events(primary, "snapshot.sending", peer=backup)[-1]
    stop.set()
    await writes
    assert sending["bytes"] > 100 * chunk_bytes, sending
    assert len(latencies) >= 5 and max(latencies) < 2.0, (len(latencies), max(latencies))
    await asyncio.to_thread(harness.wait_for_applied, [backup], highest_commit_index(harness, live), 10.0)
    # The backup answers every acknowledged token from its own store.
    issued = {token: value for operation in history.acknowledged(Kind.TOKENIZE)
              for value, token in zip(operation.inputs, operation.outputs)}
    async with harness.node_clients([backup]) as clients:
        answers = await clients[backup].detokenize(list(issued)[:1000])
    assert list(answers) == list(issued.values())[:1000]
    await assert_history_holds(harness, history, harness.node_ids)


@pytest.mark.parametrize("kill_at", ["snapshot.receiving", "snapshot.verified"])
async def test_a_backup_killed_inside_a_snapshot_install_starts_again_and_catches_up(
        make_cluster: Callable[..., ClusterHarness], kill_at: str) -> None:
    """docs/failure-modes.md, "Crash inside a snapshot install", on real processes: a backup killed while the
    stream is being staged (snapshot.receiving), or once it is verified and the install is under way
    (snapshot.verified: before or after the store's CURRENT moves), starts again from what its disk holds,
    clears the staging area, is brought up to date (by another stream where it still needs one) and
    answers every acknowledged token from its own store."""
    # Filled while every node is up, so that the snapshot the primary makes once the backup is down and
    # behind holds it all: a stream of over a thousand 1 KiB chunks (about half a second), so the kill lands
    # inside it.
    settings = dataclasses.replace(fast_settings(), wal=WalConfig(fsync=True, compact_every_entries=20,
                                                                  compact_keep_entries=2, snapshot_chunk_bytes=1024))
    harness = make_cluster(settings=settings)
    primary = await asyncio.to_thread(harness.wait_for_primary)
    backup = next(node_id for node_id in harness.node_ids if node_id != primary)
    live = [node_id for node_id in harness.node_ids if node_id != backup]
    history = History()
    filler = RecordingClient(history, "filler", harness.client(), "+".join(harness.node_ids))
    for batch in range(150):
        assert await filler.tokenize(value_pool(f"install-{batch}", 100)) is not None
    await filler.close()
    await asyncio.to_thread(harness.kill, backup)
    missed = RecordingClient(history, "missed", harness.client(live), "+".join(live))
    for batch in range(40):  # the primary compacts its log past the backup's position
        assert await missed.tokenize(value_pool(f"missed-{batch}", 3)) is not None
    await missed.close()

    backup_mark = harness.log_mark(backup)
    # Not waited for: the stream starts before the node's workers answer /health, and may be over by then.
    restarting = asyncio.get_running_loop().create_task(asyncio.to_thread(harness.restart, backup))
    try:
        await asyncio.to_thread(wait_for, lambda: harness.find_events(backup, kill_at, backup_mark), 30.0,
                                f"{kill_at} on {backup}", 0.005)
        await asyncio.to_thread(harness.kill, backup)
    finally:
        with contextlib.suppress(AssertionError):  # killed before it answered /health: restart says so
            await restarting
    if kill_at == "snapshot.receiving":
        # The kill landed inside the stream: nothing was verified, so the store still holds its old state.
        assert not harness.find_events(backup, "snapshot.verified", backup_mark), "the stream ended before the kill"
        assert (harness.node(backup).data_dir / INCOMING_DIRECTORY).is_dir()

    # More writes while it is down again, then it starts from what the kill left.
    writer = RecordingClient(history, "writer", harness.client(live), "+".join(live))
    for batch in range(5):
        assert await writer.tokenize(value_pool(f"after-kill-{batch}", 10)) is not None
    await writer.close()
    restart_mark = harness.log_mark(backup)
    await asyncio.to_thread(harness.restart, backup)
    await asyncio.to_thread(harness.wait_for_applied, [backup], highest_commit_index(harness, live), 30.0)
    assert not harness.find_events(backup, "node.fatal", restart_mark)
    if kill_at == "snapshot.receiving":
        harness.wait_for_event(backup, "snapshot.installed", since=restart_mark)
    incoming = harness.node(backup).data_dir / INCOMING_DIRECTORY
    assert not incoming.exists() or not any(incoming.iterdir()), "the staging area was not cleared"

    issued = {token: value for operation in history.acknowledged(Kind.TOKENIZE)
              for value, token in zip(operation.inputs, operation.outputs)}
    tokens = list(issued)
    async with harness.node_clients([backup]) as clients:
        for start in range(0, len(tokens), 1000):
            answers = await clients[backup].detokenize(tokens[start:start + 1000])
            assert list(answers) == [issued[token] for token in tokens[start:start + 1000]]
    await assert_history_holds(harness, history, harness.node_ids)


SNAPSHOT_STORE_VALUES = 24_000
SNAPSHOT_VALUE_BYTES = 1000  # random: RocksDB's compression keeps almost all of it, so the store is ~24 MB
SNAPSHOT_MEMORY_GROWTH_MAX = 8 * 1024 * 1024


async def test_neither_side_holds_a_24_mb_snapshot_in_memory(make_cluster: Callable[..., ClusterHarness]) -> None:
    """docs/failure-modes.md, a backup far behind: on real processes, with 1 MiB chunks, the primary's core
    and the backup's core each grow by less than 8 MiB at their peak while a 24 MB snapshot streams (measured:
    about 1-2 MiB each; a backup made to keep every chunk grew by 28 MiB and fails this)."""
    settings = dataclasses.replace(fast_settings(), wal=WalConfig(fsync=True, compact_every_entries=20,
                                                                  compact_keep_entries=2))
    harness = make_cluster(settings=settings)
    primary = await asyncio.to_thread(harness.wait_for_primary)
    backup = next(node_id for node_id in harness.node_ids if node_id != primary)
    live = [node_id for node_id in harness.node_ids if node_id != backup]
    issued: dict[str, str] = {}
    async with harness.client() as client:
        for _ in range(SNAPSHOT_STORE_VALUES // 100):
            values = [os.urandom(SNAPSHOT_VALUE_BYTES // 2).hex() for _ in range(100)]
            issued.update(zip((await client.tokenize(values)).tokens, values))
    await asyncio.to_thread(harness.kill, backup)
    async with harness.client(live) as client:
        for batch in range(40):  # the primary compacts its log past the backup's position
            values = value_pool(f"missed-{batch}", 3)
            issued.update(zip((await client.tokenize(values)).tokens, values))
    primary_pid = harness.pid(primary)
    assert primary_pid is not None
    reset_peak_memory(primary_pid)
    primary_before = memory_bytes(primary_pid, "VmRSS")

    backup_mark, primary_mark = harness.log_mark(backup), harness.log_mark(primary)
    restarting = asyncio.get_running_loop().create_task(asyncio.to_thread(harness.restart, backup))
    backup_pid = None
    try:
        def receiving() -> int | None:
            pid = harness.pid(backup)
            return pid if pid is not None and harness.find_events(backup, "snapshot.receiving", backup_mark) else None

        backup_pid = await asyncio.to_thread(wait_for, receiving, 30.0, f"{backup} to receive a snapshot", 0.005)
        reset_peak_memory(backup_pid)
        backup_before = memory_bytes(backup_pid, "VmRSS")
        installed = await asyncio.to_thread(harness.wait_for_event, backup, "snapshot.installed", backup_mark, 60.0)
        backup_peak = memory_bytes(backup_pid, "VmHWM")
    finally:
        await restarting
    sending = harness.wait_for_event(primary, "snapshot.sent", primary_mark, peer=backup, outcome="installed")
    primary_peak = memory_bytes(primary_pid, "VmHWM")
    assert sending["bytes"] >= 20 * 1024 * 1024, sending  # the stream this bound is about
    print(f"snapshot of {sending['bytes']} bytes ({installed['tokens']} tokens): primary core +"
          f"{(primary_peak - primary_before) / 2**20:.1f} MiB, backup core +{(backup_peak - backup_before) / 2**20:.1f} MiB")
    assert primary_peak - primary_before < SNAPSHOT_MEMORY_GROWTH_MAX, (primary_before, primary_peak)
    assert backup_peak - backup_before < SNAPSHOT_MEMORY_GROWTH_MAX, (backup_before, backup_peak)
    await asyncio.to_thread(harness.wait_for_applied, [backup], highest_commit_index(harness, live), 30.0)
    tokens = list(issued)
    async with harness.node_clients([backup]) as clients:
        for start in range(0, len(tokens), 1000):
            answers = await clients[backup].detokenize(tokens[start:start + 1000])
            assert list(answers) == [issued[token] for token in tokens[start:start + 1000]]
