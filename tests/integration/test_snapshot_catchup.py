"""A restarted backup that is behind the primary's compacted log catches up through a snapshot.

Real processes: compaction is set to run every few applied entries (the
`[wal] compact_every_entries` / `compact_keep_entries` knobs), so a short outage
leaves the backup behind the primary's log base and only a snapshot of the
store can bring it back.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest

from harness import ClusterHarness, RecordingClient, fast_settings
from history import History, Kind
from test_failover import assert_history_holds, highest_commit_index, value_pool
from tokenvault.config import WalConfig

pytestmark = pytest.mark.integration


async def test_backup_behind_the_compacted_log_installs_a_snapshot_and_serves(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    settings = dataclasses.replace(fast_settings(), wal=WalConfig(fsync=True, compact_every_entries=20,
                                                                  compact_keep_entries=2))
    harness = make_cluster(settings=settings)
    history = History()
    primary = await asyncio.to_thread(harness.wait_for_primary)
    backup = next(node_id for node_id in harness.node_ids if node_id != primary)
    await asyncio.to_thread(harness.kill, backup)

    live = [node_id for node_id in harness.node_ids if node_id != backup]
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
    harness.wait_for_event(primary, "snapshot.sent", since=primary_mark, peer=backup)
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
