"""Log events docs/failure-modes.md promises for replication and membership, read from the node log.

The nodes of a test run in this one process and write one log, so each node's own tasks are started with
its id bound as a context variable: their lines carry it in the ``node`` field, as each node's log file
would. Waiting is polling against deadlines (node_support.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from node_support import Cluster, free_ports, make_configs, start_node, wait_until
from tokenvault.logs import configure_logging, reset_logging

TEST_CONTEXT = "test"  # the ``node`` of lines logged by the test's own calls


@pytest.fixture
def node_log(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "logs" / "node.log"
    configure_logging(TEST_CONTEXT, path, "debug")
    try:
        yield path
    finally:
        reset_logging()


def log_lines(path: Path, event: str) -> list[dict[str, Any]]:
    return [line for line in map(json.loads, path.read_text().splitlines()) if line["event"] == event]


async def start_cluster_logging_node_ids(root: Path, node_count: int) -> Cluster:
    """node_support.start_cluster, each node started (its driver, ticker and peer links made) with its id in
    the logging context, so that what its tasks log names it."""
    cluster = Cluster(make_configs(root, node_count))
    try:
        for config in cluster.configs:
            with structlog.contextvars.bound_contextvars(node=config.node_id):
                cluster.nodes.append(await start_node(config))
    except BaseException:
        await cluster.close()
        raise
    return cluster


async def test_when_the_primary_stops_the_new_one_logs_primary_elected_and_the_backup_primary_changed(
        tmp_path: Path, node_log: Path) -> None:
    """docs/failure-modes.md, "Primary killed": `primary.elected` on the new primary, `primary.changed`
    naming it on the backup, both in the new view."""
    cluster = await start_cluster_logging_node_ids(tmp_path / "cluster", 3)
    try:
        old = await cluster.wait_for_stable_primary()
        await old.close()
        new = await cluster.wait_for_stable_primary(timeout_seconds=10)
        (backup,) = cluster.backups()
        view = new.node.replica.view
        # Read before the others stop: the backup would go on to elections of its own.
        elected = [(line["node"], line["primary"]) for line in log_lines(node_log, "primary.elected")
                   if line["view"] == view]
        changed = [(line["level"], line["primary"], line["view"]) for line in log_lines(node_log, "primary.changed")
                   if line["node"] == backup.node_id]
    finally:
        await cluster.close()
    assert elected == [(new.node_id, new.node_id)]
    assert any(primary == old.node_id for _, primary, _ in changed), "the backup named the first primary"
    assert changed[-1] == ("info", new.node_id, view), "the backup's last primary.changed names the new primary"


async def test_a_membership_change_is_logged_proposed_changed_committed_and_its_peer_added_then_removed(
        tmp_path: Path, node_log: Path) -> None:
    """docs/failure-modes.md, replacing a node: `membership.proposed` on the primary, `membership.changed`
    (voters, learners) and `membership.committed` on every member, `peer.added` / `peer.removed` for the
    member added (as a learner) then removed, on every member."""
    cluster = await start_cluster_logging_node_ids(tmp_path / "cluster", 3)
    learner_address = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens: a learner need not be up to be added
    try:
        primary = await cluster.wait_for_stable_primary()
        indexes = []
        for action, address in (("add", learner_address), ("remove", None)):
            outcome = await primary.service.change_member(action, "n4", address)
            index = json.loads(outcome.body)["configuration_index"]
            indexes.append(index)
            await wait_until(lambda index=index: all(running.node.store.applied_index >= index
                                                     for running in cluster.running()),
                             5, f"every member to apply the {action}")
    finally:
        await cluster.close()
    added, removed = indexes
    members = sorted(running.node_id for running in cluster.nodes)
    assert [(line["node"], line["index"]) for line in log_lines(node_log, "membership.proposed")] == [
        (primary.node_id, added), (primary.node_id, removed)]
    changed = [(line["node"], line["index"], sorted(line["voters"]), sorted(line["learners"]))
               for line in log_lines(node_log, "membership.changed") if line["index"] in indexes]
    assert sorted(changed) == sorted([(node, added, members, ["n4"]) for node in members]
                                     + [(node, removed, members, []) for node in members])
    committed = [(line["node"], line["index"]) for line in log_lines(node_log, "membership.committed")
                 if line["index"] in indexes]
    assert sorted(committed) == sorted((node, index) for node in members for index in indexes)
    peers_added = [(line["node"], line["remote"]) for line in log_lines(node_log, "peer.added") if line["peer"] == "n4"]
    assert sorted(peers_added) == [(node, learner_address) for node in members]
    peers_removed = [line["node"] for line in log_lines(node_log, "peer.removed") if line["peer"] == "n4"]
    assert sorted(peers_removed) == members
