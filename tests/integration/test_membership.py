"""Membership changes with real processes (issue 12, part 6): a dead node replaced by a fresh one.

A 3-node cluster loses a node for good; ``run_cluster.sh add-node`` (run as
the module the script execs) starts a node with an empty data directory,
which joins as a learner, catches up and is promoted; ``remove-node`` takes the
dead one out. Then another original node is killed: the new node must now count
in the majority, so writes acknowledged after that kill prove it does. That node
then restarts with its old static config and catches up. A client load runs
throughout and its whole history is checked on every node (every acknowledged
token detokenizes to its value, and the history is linearizable). Last,
``remove-node`` removes the primary itself, which steps down once that commits.

A node whose write-ahead log is damaged before its tail refuses to start; it is
replaced the same way (docs/failure-modes.md), never by starting it again on an
empty data directory under the same id: a voter that forgot what it acknowledged
and whom it voted for is outside the replication protocol's failure model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pytest

from harness import ClusterHarness, RecordingClient, background_load, wait_for, wait_for_acknowledged
from history import History, Kind, assert_no_violations, check_history_async
from tokenvault.core.wal import HEADER_BYTES
from tokenvault.devcluster import cluster

pytestmark = pytest.mark.integration

CHANGE_TIMEOUT_SECONDS = 60.0


def run_cluster(harness: ClusterHarness, *arguments: str) -> str:
    """``./run_cluster.sh ARGUMENTS`` on the harness's cluster (the script execs this module); asserts exit 0."""
    environment = {**os.environ, "TOKENVAULT_CLUSTER_DIR": str(harness.directory)}
    done = subprocess.run([sys.executable, "-m", "tokenvault.devcluster", *arguments, "--timeout-seconds",
                           str(CHANGE_TIMEOUT_SECONDS)], env=environment, capture_output=True, text=True,
                          timeout=CHANGE_TIMEOUT_SECONDS + 30)
    assert done.returncode == 0, f"run_cluster.sh {' '.join(arguments)}: exit {done.returncode}\n{done.stderr}"
    return done.stdout + done.stderr


def refresh(harness: ClusterHarness) -> None:
    """Follow cluster.json after add-node / remove-node (teardown then stops the new node too)."""
    harness.spec = cluster.load_cluster(harness.directory)
    # A removed node is stopped by remove-node and out of cluster.json: the harness forgets its pid.
    harness.known_pids = {pid: node_id for pid, node_id in harness.known_pids.items() if node_id in harness.node_ids}
    harness._remember_pids()


async def caught_up_and_holding_the_history(harness: ClusterHarness, node_id: str, history: History) -> None:
    """Once ``node_id`` has applied up to the primary's commit index, every member holds the history."""
    primary = await asyncio.to_thread(harness.wait_for_primary)
    commit_index = (await harness.health_async(primary))["commit_index"]
    await asyncio.to_thread(harness.wait_for_applied, [node_id], commit_index, 30.0)
    async with harness.node_clients(harness.node_ids, deadline_seconds=10.0) as clients:
        violations = await check_history_async(history, {node: client.detokenize for node, client in clients.items()})
    assert_no_violations(violations, history)


async def test_a_fresh_node_replaces_a_dead_one_and_nothing_acknowledged_is_lost(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    harness = make_cluster()
    history = History()
    values = [f"member-{uuid.uuid4().hex[:10]}-{index:03d}" for index in range(80)]
    async with background_load(harness, history, values, workers=4):
        await wait_for_acknowledged(history, 10)
        primary = await asyncio.to_thread(harness.wait_for_primary)
        lost = next(node_id for node_id in harness.node_ids if node_id != primary)
        await asyncio.to_thread(harness.kill, lost)  # lost for good: it never comes back

        before = set(harness.node_ids)
        change_started = time.monotonic()
        await asyncio.to_thread(run_cluster, harness, "add-node")
        await asyncio.to_thread(run_cluster, harness, "remove-node", lost)
        change_ended = time.monotonic()
        refresh(harness)
        (added_id,) = set(harness.node_ids) - before
        added = harness.node(added_id)
        assert lost not in harness.node_ids
        async with harness.client([added.node_id], key="admin") as admin:
            members = await admin.list_members()
        assert sorted(member["id"] for member in members["members"] if member["role"] == "voter") == sorted(
            harness.node_ids), members
        assert members["committed"], members

        # The new node counts now: with another original node down, it and the last one are the majority.
        victim = await asyncio.to_thread(harness.wait_for_primary)
        if victim == added.node_id:
            victim = next(node_id for node_id in harness.node_ids if node_id != added.node_id)
        killed_at = time.monotonic()
        await asyncio.to_thread(harness.kill, victim)
        await wait_for_acknowledged(history, 10, since_monotonic=killed_at, timeout_seconds=30.0)

    during_change = [operation for operation in history.acknowledged()
                     if change_started <= operation.start_monotonic <= change_ended]
    assert any(operation.kind is Kind.TOKENIZE for operation in during_change), (
        f"no write was acknowledged while the membership changed ({history.summary()})")
    survivors = [node_id for node_id in harness.node_ids if node_id != victim]
    assert added.node_id in survivors
    # The killed original node restarts: its static config still names the removed node and not the new
    # one, its log and store hold the current configuration; it catches up and serves everything.
    await asyncio.to_thread(harness.restart, victim)
    await caught_up_and_holding_the_history(harness, victim, history)
    print(f"replaced {lost} by {added.node_id} in {change_ended - change_started:.1f} s, then killed {victim}; "
          f"{len(during_change)} operations acknowledged during the change; {history.summary()}")

    # Last, the primary itself is removed: it steps down once that commits, saying why, and the two
    # voters left elect a successor that acknowledges writes.
    primary = await asyncio.to_thread(harness.wait_for_primary)
    mark = harness.log_mark(primary)
    await asyncio.to_thread(run_cluster, harness, "remove-node", primary)
    stepped_down = harness.find_events(primary, "primary.stepped_down", since=mark)
    assert stepped_down and "removed from the voters" in stepped_down[-1]["reason"], stepped_down
    refresh(harness)
    assert primary not in harness.node_ids and len(harness.node_ids) == 2
    async with harness.client(key="tokenizer", deadline_seconds=15.0) as tokenizer:
        assert (await tokenizer.tokenize(["after-the-primary-left"])).tokens


async def test_a_node_whose_wal_is_damaged_before_its_tail_refuses_to_start_and_is_replaced(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    """docs/failure-modes.md, "Corrupted WAL before the tail": the node refuses to start naming the segment
    and the offset, the others serve, and the documented repair (add a fresh node, remove the damaged
    one) leaves every acknowledged token readable on every member."""
    harness = make_cluster()
    history = History()
    writer = RecordingClient(history, "early", harness.client(), "all")
    for batch in range(3):
        assert await writer.tokenize([f"rot-{uuid.uuid4().hex[:10]}-{batch}-{index}" for index in range(20)])
    await writer.close()
    primary = await asyncio.to_thread(harness.wait_for_primary)
    damaged = next(node_id for node_id in harness.node_ids if node_id != primary)
    commit_index = (await harness.health_async(primary))["commit_index"]
    await asyncio.to_thread(harness.wait_for_applied, [damaged], commit_index, 10.0)
    await asyncio.to_thread(harness.kill, damaged)
    segment = harness.last_wal_segment(damaged)
    data = bytearray(segment.read_bytes())
    second = HEADER_BYTES + struct.unpack_from(">I", data, 0)[0]  # the record after the segment's BASE record
    length = struct.unpack_from(">I", data, second)[0]
    assert length > 2 and second + HEADER_BYTES + length < len(data), "records must follow the damaged one"
    data[second + HEADER_BYTES + 1] ^= 0x40  # one bit of its payload: bit rot, not a torn write
    segment.write_bytes(bytes(data))

    mark = harness.log_mark(damaged)
    with contextlib.suppress(AssertionError):  # raised when the node exits before it answers /health
        await asyncio.to_thread(harness.restart, damaged, 10.0)
    await asyncio.to_thread(wait_for, lambda: harness.pid(damaged) is None, 10.0, "the damaged node to stop")
    refused = harness.find_events(damaged, "node.refused_to_start", since=mark)
    assert refused and f"{segment.name} is corrupt at offset {second}: CRC mismatch" in refused[0]["reason"], refused
    live = [node_id for node_id in harness.node_ids if node_id != damaged]
    meanwhile = RecordingClient(history, "meanwhile", harness.client(live), "+".join(live))
    assert await meanwhile.tokenize([f"rot-meanwhile-{index}" for index in range(20)]) is not None
    await meanwhile.close()

    before = set(harness.node_ids)
    await asyncio.to_thread(run_cluster, harness, "add-node")
    await asyncio.to_thread(run_cluster, harness, "remove-node", damaged)
    refresh(harness)
    (added,) = set(harness.node_ids) - before
    assert damaged not in harness.node_ids
    await caught_up_and_holding_the_history(harness, added, history)


async def test_a_member_restarted_on_an_empty_data_directory_never_counts_and_is_replaced(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    """docs/failure-modes.md, "A member started on an empty data directory under its old id": the case where
    counting it would lose acknowledged writes. `lagging` is down while the primary commits a batch with
    `wiped` alone; `wiped` then loses its data directory, the primary is killed, and `wiped` (under its id)
    and `lagging` are started again. Were the empty `wiped` counted, it would vote `lagging` (which lacks
    the batch) primary and the batch would be gone (seen with the check taken out). `lagging` refuses it
    instead (peer.incarnation_changed): no primary is elected until the old one comes back, which serves
    everything; `wiped` is then replaced, and every acknowledged token is on every member."""
    harness = make_cluster()
    history = History()
    primary = await asyncio.to_thread(harness.wait_for_primary)
    wiped, lagging = (node_id for node_id in harness.node_ids if node_id != primary)
    writer = RecordingClient(history, "all-up", harness.client(), "all")
    assert await writer.tokenize([f"all-up-{index}" for index in range(20)]) is not None
    await writer.close()
    await asyncio.to_thread(harness.wait_for_applied, harness.node_ids,
                            (await harness.health_async(primary))["commit_index"], 10.0)

    await asyncio.to_thread(harness.kill, lagging)  # it misses the next batch, committed by the primary and `wiped`
    batch = RecordingClient(history, "without-lagging", harness.client([primary]), primary)
    assert await batch.tokenize([f"only-two-{uuid.uuid4().hex[:8]}-{index}" for index in range(20)]) is not None
    await batch.close()
    commit_index = (await harness.health_async(primary))["commit_index"]
    await asyncio.to_thread(harness.wait_for_applied, [wiped], commit_index, 10.0)
    await asyncio.to_thread(harness.kill, wiped)
    await asyncio.to_thread(harness.kill, primary)
    shutil.rmtree(harness.node(wiped).data_dir)  # its disk is lost; the operator starts it again anyway
    mark, wiped_mark = harness.log_mark(lagging), harness.log_mark(wiped)
    await asyncio.to_thread(harness.restart, wiped)
    await asyncio.to_thread(harness.restart, lagging)
    # `lagging` and the empty `wiped` are two of three: they must not make a majority.
    changed = await asyncio.to_thread(harness.wait_for_event, lagging, "peer.incarnation_changed", mark, 10.0,
                                      peer=wiped)
    assert "add-node" in changed["detail"]
    told = await asyncio.to_thread(harness.wait_for_event, wiped, "peer.refused_this_node", wiped_mark, 10.0,
                                   peer=lagging)  # the refused member's own log says why, and what to do
    assert "replace it with a new member" in told["reason"]
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        healths = harness.healths([wiped, lagging])
        assert all((health or {}).get("role") != "primary" for health in healths.values())
        assert "refused_by" not in (healths[lagging] or {})
        await asyncio.sleep(0.1)
    assert (harness.healths([wiped])[wiped] or {}).get("refused_by") == [lagging]  # its /health says so too

    await asyncio.to_thread(harness.restart, primary)
    await asyncio.to_thread(harness.wait_for_primary, [primary, lagging])
    deadline = time.monotonic() + 10.0
    while (harness.healths([wiped])[wiped] or {}).get("refused_by") != sorted([primary, lagging]):
        assert time.monotonic() < deadline, harness.healths([wiped])
        await asyncio.sleep(0.1)
    await asyncio.to_thread(run_cluster, harness, "add-node")
    await asyncio.to_thread(run_cluster, harness, "remove-node", wiped)
    refresh(harness)
    (added,) = set(harness.node_ids) - {primary, lagging}
    assert added != wiped
    await caught_up_and_holding_the_history(harness, added, history)
