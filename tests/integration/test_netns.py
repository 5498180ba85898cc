"""Real network faults: three node processes, each in its own network namespace, cut and cut one way.

The test process is a client on the namespaces' bridge, so it can keep sending
to a node that its peers can no longer reach (an isolated primary must never
acknowledge a write). Needs root, iproute2 and iptables (.ci/run installs
iptables when it is missing); skipped with the reason otherwise. Delay and
jitter need the kernel's netem, which some machines lack: that test skips on
its own with that reason, and the asyncio fault proxy of test_failover.py
covers delays meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import wait_for
from netns import NetnsCluster, netem_available, unavailable_reason

REASON = unavailable_reason()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
# A new primary within this long of a cut (elections start after 0.5-1 s at the timing used here).
FAILOVER_SECONDS = 8.0
BATCH_ITEMS = 500


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NetnsCluster]:
    running = NetnsCluster(tmp_path / "netns").start()
    try:
        yield running
    finally:
        running.close()


def read_back_everywhere(cluster: NetnsCluster, tokens: list[str], values: list[str]) -> None:
    for node in cluster.nodes:
        for start in range(0, len(tokens), BATCH_ITEMS):  # a request holds at most 1000 items
            batch, expected = tokens[start:start + BATCH_ITEMS], values[start:start + BATCH_ITEMS]
            wait_for(lambda node=node, batch=batch, expected=expected: cluster.detokenize(node, batch) == expected,
                     10, f"{node.node_id} to detokenize every acknowledged token")


def test_a_primary_cut_off_from_its_peers_never_acknowledges_and_the_majority_carries_on(
        cluster: NetnsCluster) -> None:
    primary = cluster.wait_for_primary()
    before = cluster.tokenize(primary, ["before-the-cut"])
    assert before is not None
    cluster.drop(primary, incoming=True, outgoing=True)
    others = [node for node in cluster.nodes if node is not primary]
    new_primary = cluster.wait_for_primary(others, FAILOVER_SECONDS, other_than=primary)
    during = cluster.tokenize(new_primary, ["during-the-cut"])
    assert during is not None, "the majority side acknowledges writes"
    # The client still reaches the old primary: it must not acknowledge anything.
    for attempt in range(3):
        assert cluster.tokenize(primary, [f"to-the-isolated-primary-{attempt}"]) is None
    cluster.heal(primary)
    cluster.wait_for_primary(timeout_seconds=10, other_than=primary)  # the old primary follows too
    read_back_everywhere(cluster, before + during, ["before-the-cut", "during-the-cut"])


def test_a_primary_that_cannot_send_is_replaced_and_rejoins(cluster: NetnsCluster) -> None:
    """One way: the primary still hears its peers, but nothing it sends arrives."""
    primary = cluster.wait_for_primary()
    cluster.drop(primary, incoming=False, outgoing=True)
    others = [node for node in cluster.nodes if node is not primary]
    new_primary = cluster.wait_for_primary(others, FAILOVER_SECONDS, other_than=primary)
    tokens = cluster.tokenize(new_primary, ["one-way"])
    assert tokens is not None
    assert cluster.tokenize(primary, ["through-the-mute-node"]) is None
    cluster.heal(primary)
    read_back_everywhere(cluster, tokens, ["one-way"])


def test_a_backup_cut_from_the_primary_alone_keeps_the_cluster_serving(cluster: NetnsCluster) -> None:
    """A partial cut: one backup loses its link to the primary only; it must not disrupt the others."""
    primary = cluster.wait_for_primary()
    view = (cluster.health(primary) or {}).get("view")
    backup = next(node for node in cluster.nodes if node is not primary)
    cluster.drop(backup, incoming=True, outgoing=True, addresses=[primary.address])
    deadline = time.monotonic() + 3.0
    acknowledged: list[str] = []
    failed = 0
    while time.monotonic() < deadline:
        tokens = cluster.tokenize(primary, [f"partial-{len(acknowledged)}"])
        if tokens is None:
            failed += 1
        else:
            acknowledged.extend(tokens)
    # The cut backup's elections never get past the pre-vote (the other backup still hears the
    # primary): no write fails and the primary keeps its view.
    assert acknowledged and failed == 0, (len(acknowledged), failed)
    health = cluster.health(primary) or {}
    assert health.get("role") == "primary" and health.get("view") == view, health
    cluster.heal(backup)
    read_back_everywhere(cluster, acknowledged, [f"partial-{number}" for number in range(len(acknowledged))])


@pytest.mark.skipif(REASON is None and not netem_available(),
                    reason="the kernel has no netem queueing discipline (delay and jitter)")
def test_delayed_and_jittery_links_still_serve(cluster: NetnsCluster) -> None:
    for node in cluster.nodes:
        cluster.delay(node, delay_ms=60, jitter_ms=30)
    primary = cluster.wait_for_primary()
    tokens = cluster.tokenize(primary, ["slow-link"])
    assert tokens is not None
    read_back_everywhere(cluster, tokens, ["slow-link"])
