"""Membership changes in the pure core: the configuration rules, learners, and what a change survives.

The rules are written up in docs/replication.md ("Membership"); the simulator
(tests/sim) mixes the same changes into its sweep.
"""

from __future__ import annotations

import random

import pytest

from protocol import (INITIAL_HARD_STATE, AppendEntries, BecamePrimary, Entry, EntryKind, HardState, Membership,
                      MembershipChanged, MembershipError, NotPrimary, PreVote, PreVoteReply, ProposalRejected, Replica,
                      ReplicaConfig, RequestVote, RestoredState, Role, SteppedDown, VoteReply)
from protocol.membership import ConfigurationLog, Member
from test_protocol_replica import EMPTY, Cluster, Node, drain


class GrowingCluster(Cluster):
    """The replica tests' synchronous cluster, plus nodes that join with an empty log."""

    def join(self, node_id: str, seed: int = 50) -> None:
        config = ReplicaConfig(node_id, self.voters(), learners=(node_id,), **self.overrides)
        self.nodes[node_id] = Node(Replica(config, EMPTY, random.Random(seed)))
        self.ids = self.ids + (node_id,)

    def voters(self) -> tuple[str, ...]:
        return tuple(node_id for node_id in self.ids
                     if self.nodes[node_id].replica.membership.is_voter(node_id))

    def change(self, membership: Membership) -> int:
        index, _ = self.primary().propose_membership(membership)
        self.settle()
        return index

    def write(self, payload: bytes) -> int:
        index, _ = self.primary().propose(payload)
        self.tick(times=self.heartbeat_ticks())  # a heartbeat carries the new commit point to the backups
        return index

    def heartbeat_ticks(self) -> int:
        return self.nodes["n1"].replica.config.heartbeat_interval_ticks


def started_cluster(size: int = 3) -> GrowingCluster:
    cluster = GrowingCluster(size)
    cluster.elect("n1")
    cluster.settle()
    return cluster


def applied_payloads(cluster: Cluster, node_id: str) -> list[bytes]:
    return [entry.payload for entry in cluster.nodes[node_id].applied if entry.kind is EntryKind.COMMAND]


# ---------------------------------------------------------------------------- the configuration record


def test_membership_round_trips_and_each_change_is_one_member() -> None:
    membership = Membership.of(("n1", "n2", "n3"), addresses={"n1": "127.0.0.1:8201"})
    assert Membership.decode(membership.encode()) == membership
    assert membership.quorum == 2 and membership.voters == ("n1", "n2", "n3") and membership.learners == ()
    added = membership.with_learner("n4", "127.0.0.1:8204")
    assert added.learners == ("n4",) and added.quorum == 2, "a learner never counts in the majority"
    promoted = added.promoted("n4")
    assert promoted.voters == ("n1", "n2", "n3", "n4") and promoted.quorum == 3
    assert promoted.without("n3").voters == ("n1", "n2", "n4")
    assert membership.differs_by_one_member(added) and added.differs_by_one_member(promoted)
    assert not membership.differs_by_one_member(promoted.without("n1")), "a swap is two changes"
    assert not membership.differs_by_one_member(membership)
    with pytest.raises(MembershipError):
        membership.with_learner("n1", "")
    with pytest.raises(MembershipError):
        membership.promoted("n1")
    with pytest.raises(MembershipError):
        Membership.of(("n1",)).without("n1")  # no voter left


def test_a_member_s_since_travels_in_the_payload_and_an_older_payload_reads_as_since_0() -> None:
    """Format 2 gives each member the index of the entry that added it (peer protocol version 7); a format 1
    payload, as logs and stores written before hold, reads with every ``since`` 0."""
    membership = Membership((Member("n1", "", True), Member("n4", "h:4", False, 17)))
    assert Membership.decode(membership.encode()) == membership and membership.since("n4") == 17
    assert membership.since("n9") is None
    older = b"\x92\x01\x92\x93\xa2n1\xa0\xc3\x93\xa2n4\xa3h:4\xc2"  # [1, [["n1", "", true], ["n4", "h:4", false]]]
    assert Membership.decode(older) == Membership((Member("n1", "", True), Member("n4", "h:4", False, 0)))
    assert membership.promoted("n4").since("n4") == 17, "a promotion keeps the member's since"
    stamped = Membership.of(("n1",)).with_learner("n4", "h:4").added_at(membership.without("n4"), 30)
    assert stamped.since("n4") == 30 and stamped.since("n1") == 0, "only the member added is stamped"
    assert membership.promoted("n4").added_at(membership, 40).since("n4") == 17, "a member kept keeps its since"


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x92\x01\x90", b"\x92\x02\x91\x93\xa2n1\xa0\xc3",
                                     b"\x92\x01\x91\x93\x01\xa0\xc3", b"\x92\x01\x91\x93\xa2n1\xa0\x01",
                                     b"\x92\x01\x92\x93\xa2n2\xa0\xc3\x93\xa2n1\xa0\xc3", b"\x00" * 5000,
                                     b"\x92\x01\x91\x93\xa2n1\xa0\xc2",
                                     b"\x92\x03\x91\x94\xa2n1\xa0\xc3\x00",  # an unknown format
                                     b"\x92\xc3\x91\x93\xa2n1\xa0\xc3",  # a format that is a boolean
                                     b"\x92\x02\x91\x94\xa2n1\xa0\xc3\xff",  # a negative since
                                     b"\x92\x02\x91\x94\xa2n1\xa0\xc3\xc3",  # a since that is a boolean
                                     b"\x92\x01\x91\x94\xa2n1\xa0\xc3\x00"])  # format 1 with a since
def test_a_payload_that_is_not_a_membership_is_refused(payload: bytes) -> None:
    with pytest.raises(MembershipError):
        Membership.decode(payload)


@pytest.mark.parametrize("address", ["h\ud800:1", "h" * 261, b"h:1"])
def test_a_member_address_that_is_not_a_short_utf8_string_is_a_membership_error(address: object) -> None:
    # A lone surrogate (as JSON may carry) has no UTF-8 form: refused as the other bad addresses are.
    with pytest.raises(MembershipError):
        Membership.of(("n1",)).with_learner("n4", address)  # type: ignore[arg-type]
    with pytest.raises(MembershipError):
        Membership((Member("n1", address, True),))  # type: ignore[arg-type]


def test_the_configuration_log_follows_truncation_compaction_and_snapshots() -> None:
    bootstrap = Membership.of(("n1", "n2", "n3"))
    with_learner = bootstrap.with_learner("n4", "h:4")
    promoted = with_learner.promoted("n4")
    configurations = ConfigurationLog(bootstrap, None)
    assert configurations.current == bootstrap and configurations.last_index is None
    configurations.note(5, with_learner.encode())
    configurations.note(9, promoted.encode())
    assert (configurations.current, configurations.previous, configurations.indexes) == (promoted, with_learner, (5, 9))
    assert not configurations.truncate_from(10), "nothing of a configuration was dropped"
    assert configurations.truncate_from(9) and configurations.current == with_learner
    configurations.compact_to(7)
    assert configurations.base == with_learner and configurations.last_index is None
    assert configurations.current == with_learner and configurations.previous == with_learner
    configurations.reset(None)
    assert configurations.current == bootstrap, "a snapshot without a recorded configuration: the bootstrap one"
    configurations.reset(promoted)
    assert configurations.current == promoted
    with pytest.raises(MembershipError):
        configurations.note(12, b"\x00")


# ---------------------------------------------------------------------------- learners


def test_a_learner_catches_up_but_never_campaigns_nor_counts() -> None:
    cluster = started_cluster()
    before = cluster.write(b"before")
    cluster.join("n4")
    cluster.change(cluster.primary().membership.with_learner("n4", ""))
    assert applied_payloads(cluster, "n4") == [b"before"], "the learner received the log"
    assert cluster.nodes["n4"].replica.membership.learners == ("n4",)
    assert before < cluster.nodes["n4"].replica.commit_index
    # Only n1 and the learner remain: one voter of three, so nothing commits.
    cluster.isolated = {"n2", "n3"}
    stuck, _ = cluster.primary().propose(b"needs a voter majority")
    cluster.settle()
    assert cluster.primary().commit_index < stuck
    # The learner, cut off from everyone, waits forever without raising its view.
    cluster.isolated = {"n1", "n2", "n3"}
    view = cluster.nodes["n4"].replica.view
    cluster.tick(("n4",), times=10 * cluster.nodes["n4"].replica.config.election_timeout_ticks)
    assert cluster.nodes["n4"].replica.role is Role.BACKUP and cluster.nodes["n4"].replica.view == view
    assert not any(isinstance(message, RequestVote) for _, _, message in cluster.queue)


def test_a_learner_is_promoted_only_once_caught_up() -> None:
    cluster = started_cluster()
    cluster.write(b"a")
    cluster.join("n4")
    cluster.isolated = {"n4"}  # n4 is added but cannot catch up yet
    cluster.change(cluster.primary().membership.with_learner("n4", ""))
    with pytest.raises(ProposalRejected, match="has not caught up"):
        cluster.primary().propose_membership(cluster.primary().membership.promoted("n4"))
    cluster.isolated = set()
    cluster.tick(times=3)
    cluster.change(cluster.primary().membership.promoted("n4"))
    for node_id in cluster.ids:
        assert cluster.nodes[node_id].replica.membership.voters == ("n1", "n2", "n3", "n4")
    # Four voters: a majority is three, so n1 with n4 alone commits nothing, n1 with n2 and n4 does.
    cluster.isolated = {"n2", "n3"}
    stuck, _ = cluster.primary().propose(b"two of four")
    cluster.settle()
    assert cluster.primary().commit_index < stuck
    cluster.isolated = {"n3"}
    cluster.tick(times=10)  # the stalled stream to n2 is restarted after two quiet heartbeats
    assert cluster.primary().commit_index >= stuck


# ---------------------------------------------------------------------------- the change rules


def test_one_uncommitted_change_at_a_time() -> None:
    cluster = started_cluster()
    cluster.join("n4")
    cluster.join("n5")
    cluster.isolated = {"n2", "n3"}
    cluster.change(cluster.primary().membership.with_learner("n4", ""))
    with pytest.raises(ProposalRejected, match="not committed yet"):
        cluster.primary().propose_membership(cluster.primary().membership.with_learner("n5", ""))
    cluster.isolated = set()
    cluster.tick(times=10)
    cluster.change(cluster.primary().membership.with_learner("n5", ""))
    assert cluster.primary().membership.learners == ("n4", "n5")


def test_a_change_touches_exactly_one_member_and_voters_join_as_learners() -> None:
    cluster = started_cluster()
    primary = cluster.primary()
    with pytest.raises(ProposalRejected, match="exactly one member"):
        primary.propose_membership(primary.membership.with_learner("n4", "").with_learner("n5", ""))
    with pytest.raises(ProposalRejected, match="joins as a learner first"):
        primary.propose_membership(Membership.of(("n1", "n2", "n3", "n4")))
    with pytest.raises(NotPrimary):
        cluster.nodes["n2"].replica.propose_membership(primary.membership.with_learner("n4", ""))


def test_a_new_primary_changes_nothing_before_it_commits_in_its_own_view() -> None:
    replica = Replica(ReplicaConfig("n1", ("n1", "n2", "n3")), EMPTY, random.Random(1))
    # Nobody else runs: the replies that make it primary are handed to it directly.
    while replica.role is not Role.PRIMARY:
        for _ in range(30):
            replica.tick()
            if replica.role is Role.CANDIDATE:
                break
        replica.step("n2", PreVoteReply(replica.view + 1, True, replica.last_index, 1))
        replica.advance(replica.ready())  # its own vote persisted: now it counts
        replica.step("n2", VoteReply(replica.view, True, replica.last_index))
    drain(replica)
    with pytest.raises(ProposalRejected, match="own view"):
        replica.propose_membership(replica.membership.with_learner("n4", ""))


# ---------------------------------------------------------------------------- removal


def test_the_removed_primary_steps_down_once_the_change_commits_and_never_campaigns() -> None:
    cluster = started_cluster()
    cluster.write(b"kept")
    index = cluster.change(cluster.primary().membership.without("n1"))
    old = cluster.nodes["n1"]
    assert old.replica.role is Role.BACKUP and old.replica.commit_index >= index
    assert any(isinstance(event, SteppedDown) and "removed from the voters" in event.reason for event in old.events)
    for _ in range(40):
        cluster.tick()
        if any(cluster.nodes[node_id].replica.role is Role.PRIMARY for node_id in ("n2", "n3")):
            break
    new_primary = cluster.primary()
    assert new_primary.node_id in ("n2", "n3") and new_primary.membership.voters == ("n2", "n3")
    cluster.write(b"after")
    assert applied_payloads(cluster, new_primary.node_id) == [b"kept", b"after"]
    cluster.tick(("n1",), times=60)
    assert old.replica.role is Role.BACKUP, "a removed member never campaigns"


def test_a_dead_member_is_removed_by_the_others() -> None:
    cluster = started_cluster()
    cluster.isolated = {"n3"}
    cluster.change(cluster.primary().membership.without("n3"))
    assert cluster.primary().membership.voters == ("n1", "n2")
    cluster.write(b"two voters")
    assert applied_payloads(cluster, "n2") == [b"two voters"]
    # n3 comes back unaware: its polls are dropped by members that no longer count it (its log, fed
    # nothing from its removal on, is never ahead of theirs), and the primary sends it nothing
    # (docs/failure-modes.md, "A removed node comes back").
    cluster.isolated = set()
    removed = cluster.nodes["n3"].replica
    primary, view = cluster.primary(), cluster.primary().view
    sent: list[tuple[str, str, object]] = []
    cluster.drop = lambda source, destination, message: bool(sent.append((source, destination, message)))
    cluster.tick(times=4 * removed.config.election_timeout_ticks)
    assert any(source == "n3" and isinstance(message, PreVote) for source, _, message in sent), "n3 polled"
    assert [(source, type(message).__name__) for source, destination, message in sent if destination == "n3"] == []
    assert cluster.primary() is primary and primary.view == view
    cluster.write(b"still two voters")
    assert applied_payloads(cluster, "n2") == [b"two voters", b"still two voters"]
    assert applied_payloads(cluster, "n3") == []
    for node_id in ("n1", "n2"):
        cluster.nodes[node_id].replica.step("n3", RequestVote(99, removed.last_index, removed.last_view))
        assert cluster.nodes[node_id].replica.view < 99


def test_a_member_added_is_stamped_with_its_entry_s_index_and_added_again_with_a_later_one() -> None:
    """The primary stamps the member a change adds with the index of the change's entry (Member.since), and
    every replica holds that stamp; removed and added again, the id is a later member."""
    cluster = started_cluster()
    cluster.join("n4")
    first = cluster.change(cluster.primary().membership.with_learner("n4", "h:4"))
    for node_id in ("n1", "n2", "n3", "n4"):
        assert cluster.nodes[node_id].replica.membership.since("n4") == first, node_id
    assert cluster.primary().membership.since("n1") == 0  # a bootstrap member
    promoted = cluster.change(cluster.primary().membership.promoted("n4"))
    assert promoted > first and cluster.primary().membership.since("n4") == first
    cluster.change(cluster.primary().membership.without("n4"))
    cluster.write(b"without n4")
    again = cluster.change(cluster.primary().membership.with_learner("n4", "h:4"))
    assert again > promoted
    assert [cluster.nodes[node_id].replica.membership.since("n4") for node_id in ("n1", "n2", "n3")] == [again] * 3


# ---------------------------------------------------------------------------- truncation, restart, snapshot


def test_a_truncated_configuration_entry_brings_the_previous_one_back() -> None:
    config = ReplicaConfig("n2", ("n1", "n2", "n3"))
    replica = Replica(config, EMPTY, random.Random(1))
    changed = Membership.of(("n1", "n2", "n3"), ("n4",))
    replica.step("n1", AppendEntries(1, 0, 0, 0, (Entry(1, 1, EntryKind.NOOP, b""),
                                                  Entry(2, 1, EntryKind.CONFIG, changed.encode()))))
    assert replica.membership == changed and replica.membership_index == 2
    events = [event for ready in drain(replica) for event in ready.events]
    assert MembershipChanged(2, changed) in events
    replica.step("n3", AppendEntries(2, 1, 1, 0, (Entry(2, 2, EntryKind.NOOP, b""),)))
    assert replica.membership == Membership.of(("n1", "n2", "n3")) and replica.membership_index == 0


def test_a_configuration_entry_that_does_not_decode_is_not_appended() -> None:
    replica = Replica(ReplicaConfig("n2", ("n1", "n2", "n3")), EMPTY, random.Random(1))
    replica.step("n1", AppendEntries(1, 0, 0, 0, (Entry(1, 1, EntryKind.CONFIG, b"\xc1"),)))
    assert replica.last_index == 0


def test_a_restart_knows_the_configuration_from_the_log_or_the_store() -> None:
    changed = Membership.of(("n1", "n2"), ("n4",), {"n4": "10.0.0.4:8204"})
    config = ReplicaConfig("n1", ("n1", "n2", "n3"))  # the static config was never updated
    entries = (Entry(1, 1, EntryKind.NOOP, b""), Entry(2, 1, EntryKind.CONFIG, changed.encode()))
    from_log = Replica(config, RestoredState(HardState(1, "n1", 2), 0, 0, entries), random.Random(1))
    assert from_log.membership == changed and from_log.membership_index == 2
    from_store = Replica(config, RestoredState(HardState(1, "n1", 2), 2, 1, (), changed), random.Random(1))
    assert from_store.membership == changed and from_store.membership_index == 2
    with pytest.raises(ValueError, match="configuration entry"):
        Replica(config, RestoredState(INITIAL_HARD_STATE, 0, 0, (Entry(1, 1, EntryKind.CONFIG, b"x"),)),
                random.Random(1))


def test_compaction_keeps_the_configuration_and_a_snapshot_brings_its_own() -> None:
    cluster = started_cluster()
    cluster.join("n4")
    cluster.change(cluster.primary().membership.with_learner("n4", "host:1"))
    primary = cluster.primary()
    primary.compact(primary.commit_index)
    assert primary.membership.learners == ("n4",) and primary.membership_index == primary.log_base_index
    joined = Replica(ReplicaConfig("n5", ("n1", "n2", "n3"), learners=("n5",)), EMPTY, random.Random(3))
    snapshot_membership = Membership(primary.membership.members + (Member("n5", "", False),))
    joined.snapshot_installed(7, 1, snapshot_membership)
    assert joined.membership == snapshot_membership and joined.membership_index == 7


def test_a_member_removed_by_an_uncommitted_change_is_still_heard_and_one_whose_removal_committed_is_not() -> None:
    """Found by a sweep of 12,000 seeds (seed 11245): n2 held an uncommitted removal of n1 and n1 an
    uncommitted removal of n3, each dropped the other's polls, and no one could ever be elected. While
    the change in effect is not committed, the members of the configuration before it are heard."""
    without_n1 = Membership.of(("n2", "n3"), (), {})
    entries = (Entry(1, 1, EntryKind.NOOP, b""), Entry(2, 1, EntryKind.CONFIG, without_n1.encode()))
    poll = PreVote(2, 2, 1, 1)  # n1's log as far as n2's: not ahead
    uncommitted = Replica(ReplicaConfig("n2", ("n1", "n2", "n3")), RestoredState(HardState(1, None, 1), 0, 0, entries),
                          random.Random(1))
    assert uncommitted.membership == without_n1
    uncommitted.step("n1", poll)
    assert uncommitted.ready().all_messages == (("n1", PreVoteReply(2, True, uncommitted.last_index, 1)),)
    committed = Replica(ReplicaConfig("n2", ("n1", "n2", "n3")), RestoredState(HardState(1, None, 2), 0, 0, entries),
                        random.Random(1))
    committed.step("n1", poll)
    assert committed.ready().all_messages == ()


def test_a_removed_primary_ahead_of_the_others_is_not_heard_once_they_know_its_removal_committed() -> None:
    """n1, the primary, committed its removal at index 2, appended an entry the others never got, and
    restarted with its commit index at 1 (it persists it lazily): its log holds the removal uncommitted,
    so it campaigns as a member of the configuration before, with a log ahead of n2's and n3's. They know
    the removal committed and n1 was added before it (its since, 0): they drop its polls, and one of
    them leads. On the code before, n1 won the election and led until its removal committed again."""
    without_n1 = Membership.of(("n2", "n3"), (), {})
    removal = (Entry(1, 1, EntryKind.NOOP, b""), Entry(2, 1, EntryKind.CONFIG, without_n1.encode()))
    cluster = GrowingCluster(3)
    restored = {"n1": RestoredState(HardState(1, "n1", 1), 0, 0, removal + (Entry(3, 1, EntryKind.COMMAND, b"x"),)),
                "n2": RestoredState(HardState(1, "n1", 2), 0, 0, removal),
                "n3": RestoredState(HardState(1, "n1", 2), 0, 0, removal)}
    for position, (node_id, state) in enumerate(restored.items()):
        cluster.nodes[node_id] = Node(Replica(ReplicaConfig(node_id, cluster.ids), state, random.Random(60 + position)),
                                      hard_state=state.hard_state, log=list(state.entries))
    removed = cluster.nodes["n1"].replica
    assert removed.may_campaign and removed.membership == without_n1
    cluster.tick(("n1",), times=4 * removed.config.election_timeout_ticks)  # n1 polls first, alone
    assert not any(isinstance(event, BecamePrimary) for event in cluster.nodes["n1"].events)
    assert removed.view == 1, "n1's polls are dropped"
    assert cluster.nodes["n2"].replica.view == cluster.nodes["n3"].replica.view == 1
    for _ in range(10 * removed.config.election_timeout_ticks):
        cluster.tick()
        if any(cluster.nodes[node_id].replica.role is Role.PRIMARY for node_id in ("n2", "n3")):
            break
    primary = cluster.primary()
    assert primary.node_id in ("n2", "n3") and primary.membership.voters == ("n2", "n3")
    assert removed.role is not Role.PRIMARY and removed.last_index == 3
    # An id removed and added again has a later since: a lagging voter hears it (as the test below).
    voter = Replica(ReplicaConfig("n2", cluster.ids), restored["n2"], random.Random(1))
    voter.step("n1", RequestVote(5, 3, 1, since=2))
    assert voter.view == 1, "added at or before the removal this node knows committed: dropped"
    voter.step("n1", RequestVote(5, 3, 1, since=3))
    assert voter.view == 5, "added after it: heard"
    # A since of 0 from outside the bootstrap configuration: a member added before peer protocol version 7.
    voter.step("n4", RequestVote(6, 3, 1, since=0))
    assert voter.view == 6, "its since tells nothing: heard, as before"


def test_a_new_voter_a_lagging_voter_never_heard_of_is_elected_with_a_majority_up() -> None:
    """n3 lags through n4's addition and promotion; n1, the primary, goes down after an entry only n4
    got. n2, n3 and n4 are 3 of the 4 voters, but n3 dropped n4's polls unread (n4 is no member in its
    configuration) and n4 refused n2's (an older log): nobody was ever elected (checked on the code
    before). A poll from outside whose log is ahead of the receiver's is heard."""
    cluster = started_cluster(3)
    cluster.isolated = {"n3"}
    cluster.join("n4")
    cluster.change(cluster.primary().membership.with_learner("n4", "h:4"))
    cluster.tick(times=4)
    cluster.change(cluster.primary().membership.promoted("n4"))
    cluster.tick(times=4)
    primary = cluster.primary()
    assert primary.node_id == "n1" and primary.membership.voters == ("n1", "n2", "n3", "n4")
    assert primary.membership_index <= primary.commit_index
    assert "n4" not in cluster.nodes["n3"].replica.membership.ids
    cluster.isolated = {"n3", "n2"}
    primary.propose(b"only n4 has it")
    cluster.settle()
    assert cluster.nodes["n4"].replica.last_index == primary.last_index > cluster.nodes["n2"].replica.last_index
    cluster.isolated = {"n1"}
    live = ("n2", "n3", "n4")
    for _ in range(30 * primary.config.election_timeout_ticks):
        cluster.tick(node_ids=live)
        if any(cluster.nodes[node_id].replica.role is Role.PRIMARY for node_id in live):
            break
    roles = {node_id: (cluster.nodes[node_id].replica.role.value, cluster.nodes[node_id].replica.view)
             for node_id in live}
    assert cluster.nodes["n4"].replica.role is Role.PRIMARY, roles  # the only log with every entry
