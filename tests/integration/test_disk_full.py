"""A node whose disk fills up, and one whose disk cannot hold a snapshot: three real node processes, one of
them with its data directory on a small tmpfs of its own (docs/failure-modes.md, "A node's disk fills up"
and "Disk full while staging a snapshot").

The node stops with ``node.fatal`` naming the full device, the other two carry on acknowledging, nothing
acknowledged is lost; started again on the full disk it stops again and says why, and once its disk has
room the node restarts, catches up and serves everything. Mounting a tmpfs needs root (as the network-namespace tests do); skipped with the reason
otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import ClusterHarness, fast_settings, wait_for
from tokenvault.config import WalConfig
from tokenvault.devcluster import cluster
from tokenvault.client.vault import VaultError

# Small enough to fill in seconds on two cores, large enough for a node to start (RocksDB's files and the
# first WAL segment take well under 1 MiB).
FULL_DISK_MIB = 16
ROOMY_DISK_MIB = 512
WRITERS = 6
BATCH_ITEMS = 200
# The other two keep acknowledging: this many batches after the full node has stopped.
BATCHES_AFTER = 10
FILL_TIMEOUT_SECONDS = 180.0
CATCH_UP_TIMEOUT_SECONDS = 30.0
RESTART_ON_FULL_DISK_SECONDS = 20.0
READ_ITEMS = 1000  # a request holds at most 1000 items


def _mount_tmpfs(directory: Path, size_mib: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(directory)],
                          capture_output=True, text=True, timeout=10)


def _unmount(directory: Path) -> bool:
    return subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=10).returncode == 0


def _unavailable_reason() -> str | None:
    probe = Path(tempfile.mkdtemp(prefix="tokenvault-tmpfs-probe-"))
    try:
        try:
            mounted = _mount_tmpfs(probe, 1)
        except (OSError, subprocess.SubprocessError) as error:
            return f"cannot run mount: {error}"
        if mounted.returncode != 0:
            return f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()[:200]}"
        if not _unmount(probe):
            return f"a tmpfs mounted here cannot be unmounted again ({probe} is left mounted)"
        return None
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


REASON = _unavailable_reason()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@contextlib.contextmanager
def _n3_on_a_small_disk(directory: Path, size_mib: int,
                        settings: cluster.NodeSettings | None = None) -> Iterator[ClusterHarness]:
    """Three real nodes, n3's data directory on a tmpfs of its own of `size_mib`."""
    running = ClusterHarness(directory, settings=settings)
    running._create()
    data_dir = running.node("n3").data_dir
    mounted = _mount_tmpfs(data_dir, size_mib)
    assert mounted.returncode == 0, mounted.stderr
    try:
        running.start_all()
        yield running
    finally:
        running.stop()
        assert _unmount(data_dir), f"{data_dir} is left mounted"


def _grow(harness: ClusterHarness, node_id: str, size_mib: int) -> None:
    data_dir = harness.node(node_id).data_dir
    grown = subprocess.run(["mount", "-o", f"remount,size={size_mib}m", str(data_dir)],
                           capture_output=True, text=True, timeout=10)
    assert grown.returncode == 0, grown.stderr


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[ClusterHarness]:
    with _n3_on_a_small_disk(tmp_path / "cluster", FULL_DISK_MIB) as running:
        yield running


async def _fill_until_stopped(harness: ClusterHarness, acknowledged: dict[str, str]) -> int:
    """Tokenize new values from several writers through every node until n3 has stopped and the others
    have acknowledged BATCHES_AFTER more batches; the number of batches acknowledged after the stop."""
    after_stop = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FILL_TIMEOUT_SECONDS

    async def writer(number: int) -> None:
        nonlocal after_stop
        client = harness.client(timeout_seconds=3.0, deadline_seconds=10.0)
        try:
            batch = 0
            while after_stop < BATCHES_AFTER and loop.time() < deadline:
                values = [f"disk-full-{number}-{batch}-{item}" for item in range(BATCH_ITEMS)]
                batch += 1
                stopped_before = harness.pid("n3") is None
                try:
                    result = await client.tokenize(values)
                except VaultError:
                    continue  # not acknowledged: it may or may not be stored, and it is not checked
                acknowledged.update(zip(values, result.tokens))
                if stopped_before:
                    after_stop += 1
        finally:
            await client.close()

    await asyncio.gather(*(writer(number) for number in range(WRITERS)))
    return after_stop


async def _read_back(harness: ClusterHarness, node_ids: list[str], acknowledged: dict[str, str]) -> None:
    values = list(acknowledged)
    async with harness.node_clients(node_ids) as clients:
        for node_id, client in clients.items():
            for start in range(0, len(values), READ_ITEMS):
                chunk = values[start:start + READ_ITEMS]
                found = await client.detokenize([acknowledged[value] for value in chunk])
                assert list(found) == chunk, f"{node_id} lost or changed acknowledged tokens"


def _gauge(page: str, name: str) -> float:
    values = [float(line.split()[1]) for line in page.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} is not on the metrics page once"
    return values[0]


async def test_a_node_whose_disk_fills_stops_the_others_carry_on_and_it_recovers_once_given_room(
        harness: ClusterHarness) -> None:
    # What is coming shows in /metrics: the free bytes of n3's own (small) file system.
    free = _gauge(harness.metrics_text("n3"), "tokenvault_data_disk_free_bytes")
    assert 0 < free <= FULL_DISK_MIB * 1024 * 1024
    mark = harness.log_mark("n3")
    acknowledged: dict[str, str] = {}
    after_stop = await _fill_until_stopped(harness, acknowledged)
    assert harness.pid("n3") is None, "n3 never stopped: its disk did not fill"
    assert harness.exit_status("n3") == 2, f"n3 ended with status {harness.exit_status('n3')}, not 2 (fatal)"
    fatal = harness.find_events("n3", "node.fatal", since=mark)
    assert fatal and "No space left on device" in fatal[0]["error"], fatal
    assert after_stop >= BATCHES_AFTER, f"only {after_stop} batches were acknowledged after n3 stopped"
    await _read_back(harness, ["n1", "n2"], acknowledged)

    # Started again before its disk has room (a supervisor restarting it, say): it does not stay up, says
    # why, and damages nothing that the start after this one needs.
    mark = harness.log_mark("n3")
    with contextlib.suppress(AssertionError):  # raised when n3 exits before it answers /health
        await asyncio.to_thread(harness.restart, "n3", RESTART_ON_FULL_DISK_SECONDS)
    await asyncio.to_thread(wait_for, lambda: harness.pid("n3") is None, RESTART_ON_FULL_DISK_SECONDS,
                            "n3 to stop again on its full disk")
    stopped = (harness.find_events("n3", "node.refused_to_start", since=mark)
               + harness.find_events("n3", "node.fatal", since=mark))
    assert any("No space left on device" in event.get("reason", event.get("error", "")) for event in stopped), stopped
    # 3 when it refused to start, 2 when it stopped at its first write: never 0, which a supervisor would read
    # as a stop it was asked for.
    refused = bool(harness.find_events("n3", "node.refused_to_start", since=mark))
    assert harness.exit_status("n3") == (3 if refused else 2), (refused, harness.exit_status("n3"))

    _grow(harness, "n3", ROOMY_DISK_MIB)
    await asyncio.to_thread(harness.restart, "n3")
    primary = await asyncio.to_thread(harness.wait_for_primary)
    health = harness.health(primary)
    assert health is not None
    commit_index = health["commit_index"]

    def caught_up() -> bool:
        answer = harness.health("n3")
        return answer is not None and answer["applied_index"] >= commit_index

    await asyncio.to_thread(wait_for, caught_up, CATCH_UP_TIMEOUT_SECONDS, "n3 to apply what it missed")
    await _read_back(harness, ["n3"], acknowledged)


STAGING_DISK_MIB = 12
SNAPSHOT_VALUES = 24_000  # of 1000 random bytes each: a store, and a snapshot, of about 25 MB


async def test_a_snapshot_larger_than_the_free_disk_is_refused_the_node_serves_on_and_takes_it_once_given_room(
        tmp_path: Path) -> None:
    """docs/failure-modes.md, "Disk full while staging a snapshot", on real processes: n3, behind the primary's
    compacted log, is offered a 25 MB snapshot with 12 MiB of disk. Its stager refuses it before writing
    (snapshot.rejected at the staging stage, naming the shortfall), the node stays up and answers, and once
    its disk has room the snapshot is asked for again, installed, and every acknowledged token is read back
    from n3's own store."""
    settings = dataclasses.replace(fast_settings(), wal=WalConfig(fsync=True, compact_every_entries=20,
                                                                  compact_keep_entries=2))
    with _n3_on_a_small_disk(tmp_path / "cluster", STAGING_DISK_MIB, settings) as harness:
        primary = await asyncio.to_thread(harness.wait_for_primary)
        if primary == "n3":  # n3 must be the one that falls behind
            await asyncio.to_thread(harness.kill, "n3")
            await asyncio.to_thread(harness.restart, "n3")
            primary = await asyncio.to_thread(harness.wait_for_primary)
        assert primary != "n3"
        await asyncio.to_thread(harness.kill, "n3")
        acknowledged: dict[str, str] = {}
        async with harness.client(timeout_seconds=10.0) as client:
            for _ in range(SNAPSHOT_VALUES // 100):
                values = [os.urandom(500).hex() for _ in range(100)]
                acknowledged.update(zip(values, (await client.tokenize(values)).tokens))
        mark = harness.log_mark("n3")
        await asyncio.to_thread(harness.restart, "n3")
        rejected = await asyncio.to_thread(harness.wait_for_event, "n3", "snapshot.rejected", mark, 30.0)
        assert rejected["stage"] == "staging" and "not enough disk space" in rejected["reason"], rejected
        assert not harness.find_events("n3", "snapshot.installed", mark)
        # It stays up and answers while it cannot take the snapshot.
        health = harness.health("n3")
        assert health is not None and health["role"] == "backup", health
        assert harness.pid("n3") is not None and not harness.find_events("n3", "node.fatal", mark)

        _grow(harness, "n3", ROOMY_DISK_MIB)
        installed = await asyncio.to_thread(harness.wait_for_event, "n3", "snapshot.installed", mark, 60.0)
        assert installed["tokens"] >= SNAPSHOT_VALUES, installed
        commit_index = (harness.health(primary) or {})["commit_index"]
        await asyncio.to_thread(harness.wait_for_applied, ["n3"], commit_index, 30.0)
        await _read_back(harness, ["n3"], acknowledged)
