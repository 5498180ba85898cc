"""Named membership scenarios, driven step by step; the sweep's invariants (membership-aware) run throughout.

The sweep (test_sim_sweep.py) mixes the same changes into random runs; these
pin the cases the rules are there for: a dead member replaced, a change cut off
by a leader change, and a removed primary that lost its leadership before its
removal committed.
"""

from __future__ import annotations

from protocol import Membership, ProposalRejected, Role
from scenario_cluster import ScenarioCluster

ELECTION_TIMEOUT_TICKS = 10


def propose_change(cluster: ScenarioCluster, node_id: str, membership: Membership) -> int:
    index, _ = cluster.replica(node_id).propose_membership(membership)
    cluster.drive(cluster.node(node_id))
    return index


def test_a_dead_member_is_replaced_and_the_new_one_then_carries_the_majority() -> None:
    cluster = ScenarioCluster(3)
    cluster.elect("n1")
    for number in range(5):
        cluster.propose_at("n1", b"before-%d" % number)
    cluster.run_ticks(2)
    cluster.crash(cluster.node("n3"))  # lost for good
    cluster.retiring.add("n3")
    cluster.retire_pending()
    joining = cluster.join_node(cluster.replica("n1").membership)
    propose_change(cluster, "n1", cluster.replica("n1").membership.with_learner(joining, "sim:n4"))
    cluster.run_until(lambda: cluster.replica(joining).commit_index >= cluster.replica("n1").commit_index
                      and cluster.replica("n1").membership_index <= cluster.replica("n1").commit_index,
                      max_ticks=4 * ELECTION_TIMEOUT_TICKS, what="the learner caught up")
    assert cluster.replica(joining).role is Role.BACKUP and not cluster.replica(joining).may_campaign
    propose_change(cluster, "n1", cluster.replica("n1").membership.promoted(joining))
    cluster.run_ticks(2)
    propose_change(cluster, "n1", cluster.replica("n1").membership.without("n3"))
    cluster.run_ticks(2)
    assert cluster.replica("n1").membership.voters == ("n1", "n2", joining)
    # Another original member goes: the fresh node is half of the remaining majority.
    cluster.crash(cluster.node("n1"))
    cluster.run_until(lambda: cluster.the_primary() in ("n2", joining), max_ticks=6 * ELECTION_TIMEOUT_TICKS,
                      what="a primary among n2 and the new node")
    primary = cluster.the_primary()
    assert primary is not None
    index, _ = cluster.propose_at(primary, b"after")
    cluster.run_ticks(2)
    assert {b"before-%d" % number for number in range(5)} | {b"after"} <= cluster.applied_payloads(joining)
    assert index <= cluster.node(joining).disk.applied_index


def test_a_change_cut_off_by_a_leader_change_is_truncated_and_the_old_configuration_returns() -> None:
    cluster = ScenarioCluster(3)
    cluster.elect("n1")
    cluster.propose_at("n1", b"settled")
    cluster.run_ticks(2)
    joining = cluster.join_node(cluster.replica("n1").membership)
    cluster.isolate(("n1",), ("n2", "n3", joining))
    index = propose_change(cluster, "n1", cluster.replica("n1").membership.with_learner(joining, "sim:n4"))
    assert cluster.replica("n1").membership.learners == (joining,), "in effect on n1 as soon as appended"
    with_learner = cluster.replica("n1").membership
    try:
        cluster.replica("n1").propose_membership(with_learner.without("n3"))
        raise AssertionError("a second change was accepted while the first is not committed")
    except ProposalRejected as refused:
        assert "not committed" in refused.reason
    cluster.run_until(lambda: cluster.the_primary() in ("n2", "n3"), max_ticks=8 * ELECTION_TIMEOUT_TICKS,
                      what="the majority side elects a primary")
    new_primary = cluster.the_primary()
    assert new_primary is not None
    cluster.propose_at(new_primary, b"overwrites")
    cluster.run_ticks(2)
    cluster.isolate(("n1", "n2", "n3", joining))
    cluster.run_until(lambda: cluster.replica("n1").membership_index < index
                      and cluster.replica("n1").primary_id == new_primary,
                      max_ticks=6 * ELECTION_TIMEOUT_TICKS, what="n1 follows and drops its uncommitted change")
    assert cluster.replica("n1").membership.voters == ("n1", "n2", "n3")
    assert cluster.replica("n1").membership.learners == ()
    cluster.check_liveness()


def test_a_removed_primary_that_lost_its_leadership_still_commits_its_removal() -> None:
    """The sweep found this: the removal of the primary reached no one else, the primary lost its
    leadership, and the only voter left in the new configuration could not win without the old
    primary, whose log is longer. The old primary may still campaign (it is not counted), wins with
    the remaining voter, commits its removal, and steps down (docs/replication.md, "Membership")."""
    cluster = ScenarioCluster(3)
    cluster.elect("n1")
    propose_change(cluster, "n1", cluster.replica("n1").membership.without("n2"))
    cluster.run_ticks(2)
    cluster.crash(cluster.node("n2"))
    cluster.retiring.add("n2")
    cluster.retire_pending()
    assert cluster.replica("n1").membership.voters == ("n1", "n3")
    cluster.isolate(("n1",), ("n3",))
    propose_change(cluster, "n1", cluster.replica("n1").membership.without("n1"))
    assert not cluster.replica("n1").membership.is_voter("n1") and cluster.replica("n1").may_campaign
    cluster.run_ticks(3 * ELECTION_TIMEOUT_TICKS)  # n1 steps down (check-quorum); n3 cannot win alone
    assert cluster.the_primary() is None
    cluster.isolate(("n1", "n3"))
    cluster.run_until(lambda: cluster.the_primary() == "n3" and cluster.replica("n3").membership.voters == ("n3",),
                      max_ticks=10 * ELECTION_TIMEOUT_TICKS, what="n3 leads alone after n1 committed its removal")
    assert not cluster.replica("n1").may_campaign, "its removal is committed: it never campaigns again"
    cluster.propose_at("n3", b"alone")
    cluster.run_ticks(2)
    assert b"alone" in cluster.applied_payloads("n3")
