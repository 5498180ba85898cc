"""Focused tests of protocol.Replica through its public inputs and Ready outputs."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

import pytest

from protocol.progress import MAX_WINDOW, PeerProgress
from protocol.types import MAX_ENTRIES_PER_MESSAGE
from protocol import (INITIAL_HARD_STATE, AppendEntries, AppendReply, BackupLostEntries, BecamePrimary, Entry,
                      EntryKind, HardState, Member, Membership,
                      Heartbeat, HeartbeatReply, Hello, InstallSnapshot, NotPrimary, PreVote, PreVoteReply,
                      MemberBelowFloor, ProposalRejected, ReadIndex, ReadIndexReply, ReadResult, Ready,
                      ReplicaConfig, Replica, RequestVote, ElectionStarted, RestoredState, Role, SnapshotReply, SteppedDown, TransferEnd,
                      VoteReply)

EMPTY = RestoredState(INITIAL_HARD_STATE, 0, 0, ())


def make_replica(node_id: str = "n1", members: tuple[str, ...] = ("n1",), restored: RestoredState = EMPTY,
                 seed: int = 1, **overrides) -> Replica:
    return Replica(ReplicaConfig(node_id, members, **overrides), restored, random.Random(seed))


def drain(replica: Replica) -> list[Ready]:
    readies = []
    while replica.has_ready():
        ready = replica.ready()
        readies.append(ready)
        replica.advance(ready)
    return readies


def committed(readies: list[Ready]) -> list[Entry]:
    return [entry for ready in readies for entry in ready.committed]


@dataclass
class Node:
    replica: Replica
    hard_state: HardState = INITIAL_HARD_STATE
    base: tuple[int, int] = (0, 0)
    log: list[Entry] = field(default_factory=list)
    applied: list[Entry] = field(default_factory=list)
    sources: dict = field(default_factory=dict)  # primary: peer -> snapshot bytes offered
    staging: bytearray = field(default_factory=bytearray)  # backup: chunks staged so far
    events: list = field(default_factory=list)
    floors: tuple = ()  # Replica.floors as of the last Ready persisted (the node's member-floors file)


class Cluster:
    """A tiny synchronous harness: a perfect network that can cut nodes off, and a durable disk per node."""

    def __init__(self, size: int, seed: int = 7, **overrides) -> None:
        self.ids = tuple(f"n{number}" for number in range(1, size + 1))
        self.overrides = overrides
        self.nodes = {node_id: Node(self._new_replica(node_id, EMPTY, seed + position))
                      for position, node_id in enumerate(self.ids)}
        self.queue: list[tuple[str, str, object]] = []
        self.isolated: set[str] = set()
        self.snapshot_requests: list[tuple[str, str]] = []
        self.refuse_installs = 0  # how many completed stagings the "driver" refuses next
        self.chunks_staged: dict[str, int] = {}
        self.transfers_ended: list[tuple[str, str, TransferEnd]] = []  # (primary, backup, why)
        self.drop = lambda source, destination, message: False  # a message lost on the way

    def _new_replica(self, node_id: str, restored: RestoredState, seed: int) -> Replica:
        return Replica(ReplicaConfig(node_id, self.ids, **self.overrides), restored, random.Random(seed))

    def process(self, node_id: str) -> None:
        node = self.nodes[node_id]
        while node.replica.has_ready():
            floors = node.replica.floors  # taken with the Ready, kept once its hard state is durable
            ready = node.replica.ready()
            if ready.snapshot is not None:
                node.base, node.log = (ready.snapshot.index, ready.snapshot.view), []
            if ready.truncate_from is not None:
                node.log = [entry for entry in node.log if entry.index < ready.truncate_from]
            node.log.extend(ready.entries)
            if ready.hard_state is not None:
                node.hard_state = ready.hard_state
            node.floors = floors
            completed = self._stage(node, ready)
            self.chunks_staged[node_id] = self.chunks_staged.get(node_id, 0) + len(ready.snapshot_chunks)
            self.queue.extend((node_id, destination, message) for destination, message in ready.all_messages)
            for read in ready.snapshot_reads:
                data = node.sources[read.peer][read.offset:read.offset + read.length]
                self.queue.append((node_id, read.peer, InstallSnapshot(
                    read.view, read.index, read.snapshot_view, read.offset, read.total_bytes, data, zlib.crc32(data),
                    read.offer)))
            for peer, outcome in ready.snapshot_transfers_ended:
                del node.sources[peer]
                self.transfers_ended.append((node_id, peer, outcome))
            node.applied.extend(ready.committed)
            node.events.extend(ready.events)
            self.snapshot_requests.extend((node_id, peer) for peer in ready.snapshot_requests)
            node.replica.advance(ready)
            for chunk in completed:
                if self.refuse_installs:
                    self.refuse_installs -= 1
                    node.replica.snapshot_failed(chunk.index, chunk.view)
                    continue
                # The store swap: the state is the snapshot's, then the core hears of it.
                node.applied = [Entry(chunk.index, chunk.view, EntryKind.NOOP, bytes(node.staging))]
                node.replica.snapshot_installed(chunk.index, chunk.view)

    @staticmethod
    def _stage(node: Node, ready) -> list:
        completed = []
        for chunk in ready.snapshot_chunks:
            if chunk.offset == 0:
                node.staging = bytearray()
            assert chunk.offset == len(node.staging), "chunks are staged in order"
            node.staging += chunk.data
            if chunk.complete:
                completed.append(chunk)
        return completed

    def offer(self, node_id: str, peer: str, index: int, view: int, data: bytes) -> bool:
        node = self.nodes[node_id]
        started = node.replica.offer_snapshot(peer, index, view, len(data))
        if started:
            node.sources[peer] = data
        return started

    def settle(self, max_messages: int = 10_000) -> None:
        for node_id in self.ids:
            self.process(node_id)
        delivered = 0
        while self.queue and delivered < max_messages:
            source, destination, message = self.queue.pop(0)
            delivered += 1
            if source in self.isolated or destination in self.isolated or self.drop(source, destination, message):
                continue
            self.nodes[destination].replica.step(source, message)
            self.process(destination)
        assert delivered < max_messages, "the cluster did not quiesce"

    def tick(self, node_ids: tuple[str, ...] | None = None, times: int = 1) -> None:
        for _ in range(times):
            for node_id in node_ids or self.ids:
                self.nodes[node_id].replica.tick()
            self.settle()

    def elect(self, node_id: str) -> None:
        replica = self.nodes[node_id].replica
        for _ in range(4 * replica.config.election_timeout_ticks):
            replica.tick()
            self.settle()
            if replica.role is Role.PRIMARY:
                return
        raise AssertionError(f"{node_id} did not become primary")

    def restart(self, node_id: str, seed: int = 99) -> None:
        node = self.nodes[node_id]
        restored = RestoredState(node.hard_state, node.base[0], node.base[1], tuple(node.log), floors=node.floors)
        node.replica = self._new_replica(node_id, restored, seed)

    def primary(self) -> Replica:
        primaries = [node.replica for node in self.nodes.values() if node.replica.role is Role.PRIMARY]
        assert len(primaries) == 1
        return primaries[0]


# ---------------------------------------------------------------------------- single member


def test_single_member_leads_once_its_own_vote_is_durable_and_commits_noop_after_persisting() -> None:
    """A sole voter campaigns at its first tick, but its vote for itself counts only after the Ready
    holding it was persisted: it never leads a view its disk does not hold."""
    replica = make_replica()
    replica.tick()
    assert replica.role is Role.CANDIDATE and replica.view == 1
    vote = replica.ready()
    assert vote.hard_state == HardState(1, "n1", 0) and vote.must_sync and vote.entries == ()
    replica.tick()  # a tick while the vote is being persisted starts no second campaign
    assert replica.view == 1 and not replica.has_ready()
    replica.advance(vote)
    assert replica.role is Role.PRIMARY and replica.view == 1
    first = replica.ready()
    assert [entry.kind for entry in first.entries] == [EntryKind.NOOP]
    assert first.hard_state is None
    assert first.committed == () and replica.commit_index == 0
    replica.advance(first)
    second = replica.ready()
    assert [entry.index for entry in second.committed] == [1]
    assert second.hard_state == HardState(1, "n1", 1)


def test_a_sole_voter_that_crashes_before_its_vote_is_durable_never_led_that_view() -> None:
    """Restarted from a disk without the vote, it campaigns for the same view again; it must not have
    led it before (a learner would hold entries of two primaries of one view)."""
    members = Membership((Member("n1", "", True), Member("n2", "", False)))
    replica = Replica(ReplicaConfig("n1", ("n1",)), RestoredState(HardState(3, None, 0), 0, 0, (), members),
                      random.Random(1))
    replica.tick()
    ready = replica.ready()
    assert replica.view == 4 and replica.role is Role.CANDIDATE
    assert ready.must_sync and ready.messages == () and ready.messages_after_persist == ()


def test_single_member_commits_own_entry_only_after_advance() -> None:
    replica = make_replica()
    replica.tick()
    drain(replica)
    index, view = replica.propose(b"payload")
    assert (index, view) == (2, 1)
    ready = replica.ready()
    assert [entry.payload for entry in ready.entries] == [b"payload"]
    assert replica.commit_index == 1, "not durable yet, so not committed"
    replica.propose(b"second")  # arrives while the first batch is being persisted
    replica.advance(ready)
    assert replica.commit_index == 2
    later = drain(replica)
    assert [entry.payload for entry in committed(later)] == [b"payload", b"second"]


def test_single_member_restart_keeps_log_and_takes_a_new_view() -> None:
    entries = (Entry(1, 1, EntryKind.NOOP, b""), Entry(2, 1, EntryKind.COMMAND, b"a"))
    restored = RestoredState(HardState(1, "n1", 2), 0, 0, entries)
    replica = make_replica(restored=restored)
    replica.tick()
    vote = replica.ready()
    replica.advance(vote)  # its vote in view 2, persisted
    assert replica.role is Role.PRIMARY and replica.view == 2
    readies = [vote, *drain(replica)]
    assert [entry.index for entry in committed(readies)] == [1, 2, 3]


def test_restore_clamps_commit_to_held_entries() -> None:
    restored = RestoredState(HardState(1, "n1", 9), 0, 0, (Entry(1, 1, EntryKind.NOOP, b""),))
    assert make_replica(restored=restored).commit_index == 1


def test_restore_rejects_a_gap() -> None:
    restored = RestoredState(HardState(1, "n1", 0), 0, 0, (Entry(2, 1, EntryKind.NOOP, b""),))
    with pytest.raises(ValueError):
        make_replica(restored=restored)


def test_propose_on_backup_raises_not_primary_with_hint() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    with pytest.raises(NotPrimary) as raised:
        cluster.nodes["n2"].replica.propose(b"x")
    assert raised.value.primary_id == "n1"
    candidate = make_replica("n2", ("n1", "n2", "n3"))
    with pytest.raises(NotPrimary):
        candidate.request_read(1)  # no primary known: nobody to ask for a read index


def test_propose_limits() -> None:
    replica = make_replica(max_entry_bytes=8, max_uncommitted_entries=2)
    replica.tick()
    drain(replica)
    with pytest.raises(ProposalRejected):
        replica.propose(b"123456789")
    replica.propose(b"a")
    replica.propose(b"b")
    with pytest.raises(ProposalRejected) as raised:
        replica.propose(b"c")
    assert "uncommitted" in raised.value.reason and not isinstance(raised.value, NotPrimary)


def test_config_validation() -> None:
    # Any count of voters is a configuration (two or four exist halfway through a replacement); the
    # node's static config still asks for an odd count to start a cluster (tokenvault/config.py).
    ReplicaConfig("n1", ("n1", "n2"))
    with pytest.raises(ValueError):
        ReplicaConfig("n1", tuple(f"n{number}" for number in range(1, 11)))
    with pytest.raises(ValueError):
        ReplicaConfig("n1", ("n1", "n2"), learners=("n2",))
    with pytest.raises(ValueError):
        ReplicaConfig("n1", (), learners=("n1",))
    with pytest.raises(ValueError):
        ReplicaConfig("n9", ("n1", "n2", "n3"))
    with pytest.raises(ValueError):
        ReplicaConfig("n1", ("n1",), election_timeout_ticks=2, heartbeat_interval_ticks=2)
    with pytest.raises(ValueError):
        ReplicaConfig("n1", ("n1",), max_inflight_appends=0)
    # An AppendEntries of more entries than a peer decodes (protocol.codec) would be refused by every peer.
    ReplicaConfig("n1", ("n1",), max_entries_per_message=MAX_ENTRIES_PER_MESSAGE)
    with pytest.raises(ValueError, match="max_entries_per_message"):
        ReplicaConfig("n1", ("n1",), max_entries_per_message=MAX_ENTRIES_PER_MESSAGE + 1)


# ---------------------------------------------------------------------------- elections


def test_three_members_elect_and_commit() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    primary = cluster.primary()
    assert primary.node_id == "n1"
    primary.propose(b"hello")
    cluster.settle()
    cluster.tick(times=2)  # a heartbeat carries the commit index to the backups
    for node in cluster.nodes.values():
        assert [entry.payload for entry in node.applied] == [b"", b"hello"]


def test_vote_is_in_hard_state_of_the_same_ready_as_the_reply() -> None:
    voter = make_replica("n2", ("n1", "n2", "n3"))
    voter.step("n1", RequestVote(view=1, last_index=0, last_view=0))
    ready = voter.ready()
    assert ready.hard_state == HardState(1, "n1", 0)
    # The vote promises what is on disk: it waits for the fsync.
    assert ready.messages == ()
    assert ready.messages_after_persist == (("n1", VoteReply(1, True, 0)),)


def test_restarted_replica_never_votes_twice_in_one_view() -> None:
    voter = make_replica("n2", ("n1", "n2", "n3"))
    voter.step("n1", RequestVote(view=3, last_index=0, last_view=0))
    hard_state = voter.ready().hard_state
    restarted = make_replica("n2", ("n1", "n2", "n3"), RestoredState(hard_state, 0, 0, ()))
    restarted.step("n3", RequestVote(view=3, last_index=5, last_view=2))
    assert restarted.ready().all_messages == (("n3", VoteReply(3, False, 0)),)
    restarted.step("n1", RequestVote(view=3, last_index=0, last_view=0))
    assert restarted.ready().all_messages == (("n1", VoteReply(3, True, 0)),)


def test_vote_refused_to_a_candidate_with_an_older_log() -> None:
    entries = (Entry(1, 2, EntryKind.NOOP, b""), Entry(2, 2, EntryKind.COMMAND, b"x"))
    voter = make_replica("n2", ("n1", "n2", "n3"), RestoredState(HardState(2, None, 0), 0, 0, entries))
    voter.step("n1", RequestVote(view=3, last_index=5, last_view=1))  # longer, but older view
    assert voter.ready().all_messages == (("n1", VoteReply(3, False, 2)),)
    voter.step("n3", RequestVote(view=4, last_index=1, last_view=2))  # same view, shorter
    assert voter.ready().all_messages == (("n3", VoteReply(4, False, 2)),)
    voter.step("n3", RequestVote(view=5, last_index=2, last_view=2))
    assert voter.ready().all_messages == (("n3", VoteReply(5, True, 2)),)


def test_a_node_polling_in_a_pre_vote_still_grants_a_real_vote_in_its_view() -> None:
    """Polling changes no state, so it must not cost a candidate of the same view this node's vote."""
    voter = make_replica("n2", ("n1", "n2", "n3"), RestoredState(HardState(3, None, 0), 0, 0, ()))
    while voter.role is not Role.CANDIDATE:
        voter.tick()
    drain(voter)
    assert voter.view == 3, "still polling: no view was raised"
    voter.step("n3", RequestVote(view=3, last_index=0, last_view=0))
    ready = voter.ready()
    assert ready.messages_after_persist == (("n3", VoteReply(3, True, 0)),)
    assert ready.hard_state == HardState(3, "n3", 0)
    voter.advance(ready)
    voter.step("n1", RequestVote(view=3, last_index=0, last_view=0))
    assert voter.ready().messages_after_persist == (("n1", VoteReply(3, False, 0)),), "one vote per view"


def test_election_starts_with_a_pre_vote_that_changes_no_state() -> None:
    candidate = make_replica("n1", ("n1", "n2", "n3"))
    while candidate.role is not Role.CANDIDATE:
        candidate.tick()
    ready = candidate.ready()
    assert candidate.view == 0 and ready.hard_state is None, "polling raises no view and casts no vote"
    assert {message for _, message in ready.all_messages} == {PreVote(view=1, last_index=0, last_view=0, poll=1)}
    voter = make_replica("n2", ("n1", "n2", "n3"))
    voter.step("n1", PreVote(view=1, last_index=0, last_view=0, poll=1))
    voter_ready = voter.ready()
    assert voter_ready.all_messages == (("n1", PreVoteReply(1, True, 0, 1)),)
    assert voter.view == 0 and voter_ready.hard_state is None
    candidate.step("n2", PreVoteReply(1, True, 0, 1))
    ready = candidate.ready()
    assert candidate.view == 1 and ready.hard_state == HardState(1, "n1", 0)
    assert {message for _, message in ready.all_messages} == {RequestVote(view=1, last_index=0, last_view=0)}


def test_pre_vote_refused_while_a_primary_is_heard_from() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    backup = cluster.nodes["n2"].replica
    backup.step("n3", PreVote(view=backup.view + 1, last_index=backup.last_index, last_view=backup.last_view, poll=1))
    assert backup.ready().all_messages == (("n3", PreVoteReply(backup.view, False, backup.last_index, 1)),)
    primary = cluster.nodes["n1"].replica
    primary.step("n3", PreVote(view=primary.view + 1, last_index=primary.last_index, last_view=primary.last_view, poll=1))
    assert primary.ready().all_messages == (("n3", PreVoteReply(primary.view, False, primary.last_index, 1)),)


def test_a_cut_off_replica_does_not_raise_its_view_or_disturb_the_primary_on_return() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    cluster.isolated = {"n3"}
    cluster.tick(times=10 * cluster.nodes["n3"].replica.config.election_timeout_ticks)
    assert cluster.nodes["n3"].replica.view == 1, "failed polls never raise the view"
    cluster.isolated = set()
    cluster.tick(times=4)
    assert cluster.primary().node_id == "n1" and cluster.primary().view == 1
    assert cluster.nodes["n3"].replica.primary_id == "n1"


def test_stale_messages_are_answered_with_the_current_view() -> None:
    replica = make_replica("n2", ("n1", "n2", "n3"), RestoredState(HardState(4, None, 0), 0, 0, ()))
    replica.step("n1", AppendEntries(view=2, prev_index=0, prev_view=0, commit_index=0, entries=()))
    replica.step("n3", RequestVote(view=3, last_index=0, last_view=0))
    assert replica.ready().all_messages == (("n1", AppendReply(4, False, 0, 0, 0)), ("n3", VoteReply(4, False, 0)))


def test_foreign_and_non_core_messages_are_ignored() -> None:
    replica = make_replica("n2", ("n1", "n2", "n3"))
    replica.step("intruder", RequestVote(view=9, last_index=0, last_view=0))
    replica.step("n1", Hello(node_id="n1", nonce=b"x", incarnation=b"y"))
    assert replica.view == 0 and not replica.has_ready()


def test_primary_steps_down_when_it_hears_a_higher_view() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    primary = cluster.nodes["n1"].replica
    primary.step("n2", AppendReply(view=5, success=False, index=0, hint_index=0, hint_view=0))
    assert primary.role is Role.BACKUP and primary.view == 5
    assert SteppedDown(1, "heard view 5 from n2 (AppendReply)") in primary.ready().events


def test_check_quorum_steps_down_an_isolated_primary() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    cluster.isolated = {"n1"}
    primary = cluster.nodes["n1"].replica
    for _ in range(2 * primary.config.election_timeout_ticks + 1):
        primary.tick()
        cluster.settle()
    assert primary.role is Role.BACKUP and primary.primary_id is None
    (stepped_down,) = [event for event in cluster.nodes["n1"].events if isinstance(event, SteppedDown)]
    assert stepped_down.reason == (f"check-quorum: no majority heard from in {primary.config.election_timeout_ticks}"
                                   " ticks (silent: n2, n3)")


def test_an_election_says_what_the_candidate_had_not_heard() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    (started,) = [event for event in cluster.nodes["n1"].events if isinstance(event, ElectionStarted)]
    assert started.view == 1
    assert started.reason.startswith("a majority granted the pre-vote after no message from a primary (last: none) "
                                     "for ") and "ticks" in started.reason


def test_primary_without_quorum_cannot_commit() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    primary = cluster.primary()
    commit_before = primary.commit_index
    cluster.isolated = {"n2", "n3"}
    primary.propose(b"lonely")
    cluster.tick(("n1",), times=5)
    assert primary.commit_index == commit_before


def test_primary_counts_itself_only_after_advance() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    cluster.isolated = {"n3"}
    primary = cluster.nodes["n1"].replica
    index, _ = primary.propose(b"x")
    ready = primary.ready()  # not advanced: the primary's own copy is not durable yet
    for destination, message in ready.all_messages:
        if destination == "n2":
            cluster.nodes["n2"].replica.step("n1", message)
    backup_ready = cluster.nodes["n2"].replica.ready()
    for _, reply in backup_ready.all_messages:
        primary.step("n2", reply)
    assert primary.commit_index < index, "one durable copy of three is not a majority"
    primary.advance(ready)
    assert primary.commit_index == index


# ---------------------------------------------------------------------------- log repair


def test_conflicting_suffix_is_truncated_and_reported() -> None:
    old = (Entry(1, 1, EntryKind.NOOP, b""), Entry(2, 1, EntryKind.COMMAND, b"a"), Entry(3, 1, EntryKind.COMMAND, b"b"))
    backup = make_replica("n2", ("n1", "n2", "n3"), RestoredState(HardState(1, "n1", 1), 0, 0, old))
    new = (Entry(2, 2, EntryKind.NOOP, b""),)
    backup.step("n3", AppendEntries(view=2, prev_index=1, prev_view=1, commit_index=1, entries=new))
    ready = backup.ready()
    assert ready.truncate_from == 2 and ready.entries == new
    assert ready.messages == ()
    assert ready.messages_after_persist == (("n3", AppendReply(2, True, 2, 0, 0)),)
    assert backup.last_index == 2


def test_ready_states_what_may_go_before_the_fsync() -> None:
    """The primary's appends leave at once; entries an earlier Ready made durable are applied first."""
    cluster = Cluster(3)
    cluster.elect("n1")
    primary = cluster.nodes["n1"].replica
    primary.propose(b"first")
    ready = primary.ready()
    assert ready.entries and ready.messages and ready.messages_after_persist == ()
    assert all(isinstance(message, AppendEntries) for _, message in ready.messages)
    primary.advance(ready)
    backup = make_replica("n2", ("n1", "n2", "n3"), RestoredState(HardState(2, "n1", 0), 0, 0, (
        Entry(1, 1, EntryKind.NOOP, b""), Entry(2, 2, EntryKind.COMMAND, b"old"))))
    backup.step("n1", AppendEntries(view=2, prev_index=2, prev_view=2, commit_index=3,
                                    entries=(Entry(3, 2, EntryKind.COMMAND, b"new"),)))
    ready = backup.ready()
    assert [entry.index for entry in ready.committed] == [1, 2, 3]
    assert ready.committed_durable_count == 2
    assert [entry.index for entry in ready.committed_durable] == [1, 2]
    assert [entry.index for entry in ready.committed_after_persist] == [3]
    assert [type(message) for _, message in ready.messages_after_persist] == [AppendReply]


def test_ready_needs_an_fsync_for_entries_votes_and_views_but_not_for_the_commit_index_alone() -> None:
    """etcd's MustSync: a backup's new entries, a vote and a new view need the fsync before the replies;
    a heartbeat that only moves the commit index gives a hard state to write with the next fsync."""
    backup = make_replica("n2", ("n1", "n2", "n3"), RestoredState(HardState(2, "n1", 0), 0, 0, (
        Entry(1, 1, EntryKind.NOOP, b""), Entry(2, 2, EntryKind.COMMAND, b"old"))))
    backup.step("n1", AppendEntries(view=2, prev_index=2, prev_view=2, commit_index=1,
                                    entries=(Entry(3, 2, EntryKind.COMMAND, b"new"),)))
    ready = backup.ready()
    assert ready.entries and ready.must_sync
    backup.advance(ready)
    backup.step("n1", Heartbeat(2, 3, 0, ()))
    ready = backup.ready()
    assert ready.hard_state == HardState(2, "n1", 3) and not ready.entries and not ready.must_sync
    assert [entry.index for entry in ready.committed] == [2, 3]
    backup.advance(ready)
    backup.step("n3", RequestVote(view=3, last_index=3, last_view=2))
    ready = backup.ready()
    assert ready.hard_state == HardState(3, "n3", 3) and not ready.entries and ready.must_sync
    assert [type(message) for _, message in ready.messages_after_persist] == [VoteReply]
    backup.advance(ready)
    backup.step("n1", Heartbeat(4, 3, 0, ()))  # a newer view, no vote in it: the view alone must be durable
    ready = backup.ready()
    assert ready.hard_state == HardState(4, None, 3) and ready.must_sync


def test_the_primary_commits_only_once_its_own_copy_is_durable() -> None:
    """Both backups acknowledge before the primary's own fsync finished: no commit until advance()."""
    cluster = Cluster(3)
    cluster.elect("n1")
    primary = cluster.nodes["n1"].replica
    before = primary.commit_index
    primary.propose(b"entry")
    ready = primary.ready()
    index = ready.entries[-1].index
    for backup in ("n2", "n3"):
        primary.step(backup, AppendReply(primary.view, True, index, 0, 0))
    assert primary.commit_index == before
    primary.advance(ready)
    assert primary.commit_index == index


def test_advance_takes_only_the_last_ready_and_only_once() -> None:
    replica = make_replica("n2", ("n1", "n2", "n3"))
    replica.step("n1", RequestVote(view=1, last_index=0, last_view=0))
    first = replica.ready()
    replica.advance(first)
    with pytest.raises(AssertionError):
        replica.advance(first)


def test_refusal_carries_a_hint_that_skips_a_whole_view() -> None:
    old = tuple([Entry(1, 1, EntryKind.NOOP, b"")] + [Entry(i, 2, EntryKind.COMMAND, b"x") for i in range(2, 30)])
    backup = make_replica("n2", ("n1", "n2", "n3"), RestoredState(HardState(2, None, 1), 0, 0, old))
    backup.step("n3", AppendEntries(view=3, prev_index=40, prev_view=3, commit_index=1, entries=()))
    (_, reply), = backup.ready().all_messages
    assert reply == AppendReply(3, False, 40, 29, 2)
    backup.step("n3", AppendEntries(view=3, prev_index=29, prev_view=1, commit_index=1, entries=()))
    (_, reply), = backup.ready().all_messages
    assert (reply.success, reply.hint_index, reply.hint_view) == (False, 1, 1)


def test_lagging_backup_catches_up_in_few_round_trips() -> None:
    cluster = Cluster(3, max_entries_per_message=1000)
    cluster.elect("n1")
    cluster.isolated = {"n3"}
    primary = cluster.primary()
    for number in range(500):
        primary.propose(b"%d" % number)
    cluster.settle()
    cluster.isolated = set()
    appends_to_backup = 0
    original_step = cluster.nodes["n3"].replica.step

    def counting_step(sender, message):
        nonlocal appends_to_backup
        appends_to_backup += isinstance(message, AppendEntries)
        original_step(sender, message)

    cluster.nodes["n3"].replica.step = counting_step
    # The append carrying the 500 entries was lost; the stream restarts after two quiet heartbeats.
    cluster.tick(times=3 * primary.config.heartbeat_interval_ticks)
    assert cluster.nodes["n3"].replica.last_index == primary.last_index
    assert appends_to_backup <= 3


def three_with_entries(count: int, prefix: bytes) -> tuple[Cluster, Replica]:
    """Three replicas, n1 primary, ``count`` entries committed everywhere."""
    cluster = Cluster(3)
    cluster.elect("n1")
    primary = cluster.primary()
    for number in range(count):
        primary.propose(prefix + b"-%d" % number)
    cluster.settle()
    return cluster, primary


def loss_reports(cluster: Cluster) -> list[BackupLostEntries]:
    return [event for event in cluster.nodes["n1"].events if isinstance(event, BackupLostEntries)]


def test_a_backup_that_lost_entries_it_acknowledged_is_reported_once_and_never_probed_below_them() -> None:
    """docs/failure-modes.md, a member restored from an older copy: the primary sees the backup refuse a
    position at or below what it acknowledged, says so once (BackupLostEntries), and keeps probing it at
    heartbeat pace at that position; nothing else changes (the other backup still commits with it)."""
    cluster, primary = three_with_entries(5, b"early")
    old = cluster.nodes["n3"]
    copy = (old.hard_state, old.base, list(old.log))  # a copy of n3's disk, taken now
    for number in range(20):
        primary.propose(b"late-%d" % number)
    cluster.settle()
    acknowledged = primary.progress()["n3"][0]
    assert acknowledged == primary.last_index
    assert not loss_reports(cluster)
    old.hard_state, old.base, old.log = copy  # n3's data directory put back from the copy
    cluster.restart("n3")
    primary.propose(b"after-the-restore")
    cluster.tick(times=6 * primary.config.heartbeat_interval_ticks)
    assert loss_reports(cluster) == [BackupLostEntries("n3", acknowledged, acknowledged)]
    assert primary.progress()["n3"][0] == acknowledged  # never lowered: it counts for nothing new
    assert cluster.nodes["n3"].replica.last_index < acknowledged
    assert cluster.nodes["n2"].replica.commit_index == primary.last_index  # n2 and n1 commit on


def test_a_backup_that_lost_entries_is_reported_in_a_quiet_cluster_too() -> None:
    """Nothing is written after the restore, so no append is due: the backup's heartbeat replies carry its
    last index, below what it acknowledged, and the primary probes it (before peer protocol version 8 it
    was found only at the next write). A heartbeat reply that is merely stale (sent before an
    acknowledgement, delivered after it) costs one probe, which succeeds, and reports nothing."""
    cluster, primary = three_with_entries(5, b"early")
    old = cluster.nodes["n3"]
    copy = (old.hard_state, old.base, list(old.log))
    for number in range(20):
        primary.propose(b"late-%d" % number)
    cluster.settle()
    acknowledged = primary.progress()["n3"][0]
    primary.step("n2", HeartbeatReply(primary.view, 0, 3))  # stale: n2 holds every entry
    cluster.settle()
    assert primary.progress()["n2"][0] == primary.last_index and not loss_reports(cluster)
    old.hard_state, old.base, old.log = copy
    cluster.restart("n3")
    cluster.tick(times=4 * primary.config.heartbeat_interval_ticks)
    assert loss_reports(cluster) == [BackupLostEntries("n3", acknowledged, acknowledged)]
    assert primary.progress()["n3"][0] == acknowledged


def test_a_stale_refusal_delivered_after_the_acknowledgement_is_not_taken_for_lost_entries() -> None:
    """A refusal sent before the backup acknowledged a position, and delivered after it (a duplicated or
    reordered message, or one held back by a slow link, as the simulator's links do), answers an append
    sent before the acknowledgement reached the primary (the sequence it echoes): not a loss, however
    many arrive and however late. The next probe succeeds and nothing is reported (before peer protocol
    version 8, refusals in three distinct heartbeat intervals were reported as one)."""
    cluster = Cluster(3)
    sent_to_n3: list[int] = []
    cluster.drop = lambda source, destination, message: bool(
        destination == "n3" and isinstance(message, AppendEntries) and sent_to_n3.append(message.sequence))
    cluster.elect("n1")
    primary = cluster.primary()
    for number in range(5):
        primary.propose(b"entry-%d" % number)
    cluster.settle()
    acknowledged = primary.progress()["n3"][0]
    assert acknowledged == primary.last_index and sent_to_n3
    before = sent_to_n3[-1]  # an append n3 answered before its acknowledgement reached the primary
    cluster.isolated = {"n3"}
    primary.propose(b"one-more")
    cluster.settle()
    # A refusal of the newest append sends the primary to PROBE just past what n3 acknowledged ...
    primary.step("n3", AppendReply(primary.view, False, acknowledged + 1, acknowledged, primary.view,
                                   sent_to_n3[-1]))
    assert primary.progress()["n3"] == (acknowledged, acknowledged + 1)
    for _ in range(4):  # ... and stale refusals of that very position arrive, a heartbeat interval apart
        primary.step("n3", AppendReply(primary.view, False, acknowledged, acknowledged - 1, primary.view, before))
        cluster.tick(("n1",), times=primary.config.heartbeat_interval_ticks)
    assert not loss_reports(cluster)
    cluster.isolated = set()
    cluster.tick(times=6 * primary.config.heartbeat_interval_ticks)
    assert not loss_reports(cluster)
    assert primary.progress()["n3"][0] == primary.last_index == acknowledged + 1


def test_a_reply_echoing_a_sequence_the_primary_never_sent_is_dropped() -> None:
    """AppendReply.sequence echoes an append of this primary: its counter bounds it (a peer frame is
    hostile input). A refusal at what the backup acknowledged, echoing a sequence past every append
    sent, answers nothing this primary sent: dropped, not taken for lost entries (before, anything past
    the counter noted at the acknowledgement was taken for an answer to a later append)."""
    cluster, primary = three_with_entries(3, b"entry")
    acknowledged = primary.progress()["n3"][0]
    cluster.isolated = {"n3"}
    primary.propose(b"one-more")
    cluster.settle()
    primary.step("n3", AppendReply(primary.view, False, acknowledged + 1, acknowledged, primary.view, 0))
    assert primary.progress()["n3"] == (acknowledged, acknowledged + 1)  # probing just past it
    for sequence in (2**63 - 1, 10**6):
        primary.step("n3", AppendReply(primary.view, False, acknowledged, acknowledged - 1, primary.view, sequence))
        cluster.process("n1")
    assert not loss_reports(cluster)
    cluster.isolated = set()
    cluster.tick(times=4 * primary.config.heartbeat_interval_ticks)
    assert not loss_reports(cluster) and primary.progress()["n3"][0] == primary.last_index


def test_a_restarted_node_learns_how_far_the_cluster_committed_from_heartbeats_once_its_primary_committed() -> None:
    """Replica.first_known_commit_index (node.recovered waits for the store to reach it): a backup restarted in a
    quiet cluster, where no append is due, learns it from the next heartbeat; a new primary announces
    nothing until it has committed an entry of its view, since its commit index may be one it restored,
    older than what the cluster had committed (a backup would take itself for caught up too early)."""
    cluster, primary = three_with_entries(5, b"entry")
    interval = primary.config.heartbeat_interval_ticks
    cluster.tick(times=interval)
    cluster.restart("n3")
    assert cluster.nodes["n3"].replica.first_known_commit_index is None
    cluster.tick(times=interval)
    assert cluster.nodes["n3"].replica.first_known_commit_index == primary.commit_index == primary.last_index
    assert primary.first_known_commit_index == 1 < primary.commit_index  # its first commit in its view: its no-op
    # n2 leads a new view; the acknowledgements of its no-op are lost, so it has committed nothing in it.
    cluster.isolated = {"n1"}
    cluster.drop = lambda source, destination, message: isinstance(message, AppendReply)
    for _ in range(20 * primary.config.election_timeout_ticks):
        cluster.tick(("n2", "n3"))
        if any(cluster.nodes[node_id].replica.role is Role.PRIMARY for node_id in ("n2", "n3")):
            break
    (leader,) = [cluster.nodes[node_id].replica for node_id in ("n2", "n3")
                 if cluster.nodes[node_id].replica.role is Role.PRIMARY]
    other = "n3" if leader.node_id == "n2" else "n2"
    cluster.restart(other)
    cluster.tick(("n2", "n3"), times=2 * interval)
    assert leader.commit_index == primary.last_index < leader.last_index  # its no-op is not committed
    assert cluster.nodes[other].replica.first_known_commit_index is None
    cluster.drop = lambda source, destination, message: False
    cluster.tick(("n2", "n3"), times=2 * interval)
    assert cluster.nodes[other].replica.first_known_commit_index == leader.commit_index == leader.last_index


def test_a_backup_kept_behind_by_a_steady_write_load_reaches_the_commit_index_it_was_first_told_of() -> None:
    """node.recovered waits until the store has applied Replica.first_known_commit_index: what the cluster had
    committed when this node first heard of it after its start (docs/logs.md). A restarted backup that
    catches up at the pace of the writes stays the same distance behind the primary's commit index; it
    has applied everything it missed once it passes the first one announced. Before, the target was the
    highest commit index announced, which rose with every heartbeat: such a backup never reached it, and
    node.recovered never came while the writes went on."""
    entries = tuple(Entry(index, 1, EntryKind.NOOP if index == 1 else EntryKind.COMMAND, b"e%d" % index)
                    for index in range(1, 6))
    backup = make_replica("n3", ("n1", "n2", "n3"), RestoredState(HardState(1, "n1", 5), 0, 0, entries))
    drain(backup)
    applied = 5
    reached = []
    cluster_commit = 10  # the cluster went on while n3 was down
    for _ in range(6):
        last = backup.last_index
        backup.step("n1", Heartbeat(1, min(cluster_commit, last), 0, (), cluster_commit))
        applied = max([applied] + [entry.index for entry in committed(drain(backup))])
        new = tuple(Entry(index, 1, EntryKind.COMMAND, b"e%d" % index) for index in range(last + 1, last + 3))
        backup.step("n1", AppendEntries(1, last, 1, cluster_commit, new, 1))
        applied = max([applied] + [entry.index for entry in committed(drain(backup))])
        reached.append(applied >= (backup.first_known_commit_index or 0) > 0)
        cluster_commit += 2  # two more writes committed by n1 and n2 while n3 took in two
    assert reached == [False, False, True, True, True, True]
    assert backup.first_known_commit_index == 10, "the first commit index announced after the start"


def test_a_restarted_node_told_a_commit_index_by_a_deposed_primary_takes_the_next_views_once() -> None:
    """A restarted backup may first hear from a primary already deposed (its heartbeat crossed the election of
    its successor): that primary announces less than the new view has committed since, and node.recovered
    would come before the node held what it missed. The first word of a later view replaces the target
    once; within that view it stays put (a node keeping pace from behind still reaches it)."""
    entries = tuple(Entry(index, 1, EntryKind.NOOP if index == 1 else EntryKind.COMMAND, b"e%d" % index)
                    for index in range(1, 6))
    backup = make_replica("n3", ("n1", "n2", "n3"), RestoredState(HardState(1, "n1", 5), 0, 0, entries))
    drain(backup)
    backup.step("n1", Heartbeat(1, 5, 0, (), 5))  # the old primary, still in view 1
    drain(backup)
    assert backup.first_known_commit_index == 5
    backup.step("n2", Heartbeat(3, 5, 0, (), 12))  # the primary of view 3 has committed up to 12
    drain(backup)
    assert backup.first_known_commit_index == 12
    backup.step("n2", Heartbeat(3, 5, 0, (), 20))
    drain(backup)
    assert backup.first_known_commit_index == 12, "within a view the first announcement stands"


def test_heartbeats_carry_each_members_floor_to_every_node_and_a_restart_keeps_them() -> None:
    """A floor is the highest index a member acknowledged that is also committed (the primary's own: its
    commit index); the primary's heartbeats carry them, so every node holds them, and a node restarted
    from what it made durable holds them again."""
    cluster, primary = three_with_entries(5, b"entry")
    cluster.tick(times=primary.config.heartbeat_interval_ticks)
    expected = tuple((member, primary.commit_index) for member in ("n1", "n2", "n3"))
    assert primary.commit_index == primary.last_index > 5
    for node in cluster.nodes.values():
        assert node.replica.floors == expected
    cluster.restart("n2")
    assert cluster.nodes["n2"].replica.floors == expected
    # A floor of a member the configuration does not hold is not kept.
    stranger = make_replica("n2", ("n1", "n2", "n3"), RestoredState(INITIAL_HARD_STATE, 0, 0, (),
                                                                     floors=(("n1", 4), ("n9", 7))))
    assert stranger.floors == (("n1", 4),)


def test_a_floor_is_capped_by_the_commit_index_so_an_uncommitted_acknowledgement_raises_none() -> None:
    """n2 acknowledges an entry that never commits (n3 is cut off and n1's own write counts only with a
    majority): its floor stays at the commit index, since a later primary may cut that entry from its log."""
    cluster, primary = three_with_entries(2, b"entry")
    committed_index = primary.commit_index
    cluster.isolated = {"n3"}
    cluster.drop = lambda source, destination, message: source == "n2" and isinstance(message, AppendReply)
    primary.propose(b"never-committed")
    cluster.tick(times=primary.config.heartbeat_interval_ticks)
    assert primary.commit_index == committed_index < primary.last_index
    assert dict(primary.floors) == {"n1": committed_index, "n2": committed_index, "n3": committed_index}


def below_floor_reports(cluster: Cluster, node_id: str) -> list[MemberBelowFloor]:
    return [event for event in cluster.nodes[node_id].events if isinstance(event, MemberBelowFloor)]


def test_a_member_restored_from_an_older_copy_counts_in_no_election_after_the_primary_that_knew_dies() -> None:
    """docs/failure-modes.md, a member's data directory restored from an older copy, once another primary
    would lead: n1 commits entries with n2 while n3, reachable but lagging, holds none of them; n2's
    directory is then put back from a copy taken before them, and n1 dies. Counting n2 would elect n3 and
    lose every one of those entries. n3 knows n2's floor from n1's heartbeats: it does not count n2's
    vote, and says so; nobody leads until n1 is back, and then every entry is on every node."""
    cluster, primary = three_with_entries(3, b"early")
    cluster.tick(times=primary.config.heartbeat_interval_ticks)
    n2 = cluster.nodes["n2"]
    copy = (n2.hard_state, n2.base, list(n2.log), n2.floors)  # a copy of n2's data directory, taken now
    cluster.drop = lambda source, destination, message: destination == "n3" and isinstance(message, AppendEntries)
    for number in range(10):
        primary.propose(b"late-%d" % number)
    cluster.settle()
    cluster.tick(times=2 * primary.config.heartbeat_interval_ticks)  # heartbeats still reach n3
    floor = primary.commit_index
    lagging = cluster.nodes["n3"].replica
    assert floor == primary.last_index and dict(lagging.floors)["n2"] == floor and lagging.last_index < floor
    n2.hard_state, n2.base, n2.log, n2.floors = copy  # put back from the copy
    cluster.restart("n2")
    restored_last = cluster.nodes["n2"].replica.last_index
    assert restored_last < floor
    cluster.isolated = {"n1"}
    cluster.drop = lambda source, destination, message: False
    cluster.tick(("n2", "n3"), times=10 * primary.config.election_timeout_ticks)
    assert all(cluster.nodes[node_id].replica.role is not Role.PRIMARY for node_id in ("n2", "n3"))
    assert below_floor_reports(cluster, "n3") == [MemberBelowFloor("n2", floor, restored_last, "voter")]
    cluster.isolated = set()  # n1 is back
    cluster.tick(times=10 * primary.config.election_timeout_ticks)
    leader = cluster.primary()
    assert leader.node_id == "n1"
    # n3 catches up: every entry is on a majority again. (n2 stays below what it acknowledged to n1, which
    # never probes it below that: test_a_backup_that_lost_entries_it_acknowledged_is_reported_once...)
    n3 = cluster.nodes["n3"]
    assert n3.replica.last_index >= floor
    assert [entry.payload for entry in n3.applied if entry.payload.startswith(b"late-")] == [
        b"late-%d" % number for number in range(10)]


def test_a_vote_message_older_than_a_floor_is_refused_and_not_reported_a_fresh_one_is_reported() -> None:
    """A message a member sent before it acknowledged what raised its floor (delivered late) may show a log
    below the floor: it is refused, at no cost, but not reported. One sent in a view above the one that
    raised the floor, or answering a poll started after it, is fresh: reported, once."""
    floors = (("n2", 5),)
    voter = make_replica("n3", ("n1", "n2", "n3"), RestoredState(HardState(1, None, 0), 0, 0, (), floors=floors))
    voter.step("n2", PreVote(view=2, last_index=3, last_view=1, poll=1))  # sent from view 1: maybe stale
    ready = voter.ready()
    assert ready.all_messages == (("n2", PreVoteReply(1, False, 0, 1)),) and ready.events == ()
    voter.advance(ready)
    voter.step("n2", RequestVote(view=2, last_index=3, last_view=1))  # sent from view 2: after the floor
    ready = voter.ready()
    assert ready.messages_after_persist == (("n2", VoteReply(2, False, 0)),)
    assert ready.events == (MemberBelowFloor("n2", 5, 3, "candidate"),)
    voter.advance(ready)
    voter.step("n2", RequestVote(view=3, last_index=3, last_view=1))
    assert all(not isinstance(event, MemberBelowFloor) for event in drain_events(voter)), "said once"

    candidate = make_replica("n1", ("n1", "n2", "n3"), RestoredState(HardState(1, None, 0), 0, 0, (), floors=floors))
    while candidate.role is not Role.CANDIDATE:
        candidate.tick()
    drain(candidate)
    candidate.step("n2", PreVoteReply(2, True, 3, 0))  # the answer to a poll before this one
    assert drain_events(candidate) == []
    candidate.step("n2", PreVoteReply(2, True, 3, 1))  # the answer to this poll
    assert drain_events(candidate) == [MemberBelowFloor("n2", 5, 3, "voter")]
    assert candidate.view == 1, "neither vote counted: the poll goes on"
    candidate.step("n3", PreVoteReply(2, True, 5, 1))  # a member at its floor counts
    assert candidate.view == 2


def test_a_member_long_below_a_rising_floor_is_said_once_per_floor_and_remembered_once() -> None:
    """Reports are once per member and floor; the record of them holds one floor per member, however
    long the member stays below floors that keep rising (a restored member cut off from a primary that
    goes on committing), so it does not grow with the log."""
    voter = make_replica("n3", ("n1", "n2", "n3"), RestoredState(HardState(1, None, 0), 0, 0, ()))
    reports = []
    for round_number in range(1, 51):
        view = 2 * round_number
        voter.step("n1", Heartbeat(view=view, commit_index=0, read_round=0, floors=(("n2", 5 * round_number),)))
        drain(voter)
        for _ in range(40):  # past the primary's lease (elections time out in 10-19 ticks), so a vote is heard
            voter.tick()
        drain(voter)
        for _ in range(2):  # the same floor twice: said once
            voter.step("n2", RequestVote(view=view + 1, last_index=3, last_view=1))
            reports += [event for event in drain_events(voter) if isinstance(event, MemberBelowFloor)]
    assert reports == [MemberBelowFloor("n2", 5 * number, 3, "candidate") for number in range(1, 51)]
    assert voter._floors_reported == {"n2": 250}


def drain_events(replica: Replica) -> list:
    return [event for ready in drain(replica) for event in ready.events]


def test_appends_respect_entry_byte_and_inflight_bounds() -> None:
    cluster = Cluster(3, max_entries_per_message=3, max_bytes_per_message=200, max_inflight_appends=2)
    cluster.elect("n1")
    primary = cluster.primary()
    for _ in range(3):  # acknowledgements open the window past the configured limit
        primary.propose(b"w")
        cluster.settle()
    for _ in range(20):
        primary.propose(b"x" * 50)
    appends = [message for destination, message in primary.ready().all_messages
               if destination == "n2" and isinstance(message, AppendEntries)]
    assert len(appends) == 2, "at most max_inflight_appends in flight"
    for message in appends:
        assert 1 <= len(message.entries) <= 3
        assert sum(len(entry.payload) for entry in message.entries) <= 200
    cluster.queue.clear()


def test_single_oversized_entry_still_travels_alone() -> None:
    cluster = Cluster(3, max_bytes_per_message=100)
    cluster.elect("n1")
    primary = cluster.primary()
    primary.propose(b"y" * 500)
    cluster.settle()
    cluster.tick(times=2)
    assert all(node.applied[-1].payload == b"y" * 500 for node in cluster.nodes.values())


# ---------------------------------------------------------------------------- reads


def test_read_index_needs_a_quorum_round_and_batches_requests() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    primary = cluster.primary()
    primary.request_read(1)
    primary.request_read(2)
    ready = primary.ready()
    assert ready.read_results == ()
    heartbeats = [message for _, message in ready.all_messages if isinstance(message, Heartbeat)]
    assert len(heartbeats) == 2 and {message.read_round for message in heartbeats} == {1}
    primary.advance(ready)
    primary.step("n2", HeartbeatReply(primary.view, 1, primary.last_index))
    results = primary.ready().read_results
    assert [(result.request_id, result.ok) for result in results] == [(1, True), (2, True)]
    assert results[0].read_index == primary.commit_index


def test_read_waits_for_the_first_commit_of_the_view() -> None:
    primary = make_replica("n1", ("n1", "n2", "n3"))
    while primary.role is not Role.CANDIDATE:
        primary.tick()
    primary.step("n2", PreVoteReply(primary.view + 1, True, primary.last_index, 1))
    primary.advance(primary.ready())  # its own vote persisted; the vote requests leave
    primary.step("n2", VoteReply(primary.view, True, primary.last_index))
    assert primary.role is Role.PRIMARY
    primary.advance(primary.ready())  # the no-op is durable here, but not yet on a majority
    primary.request_read(5)
    assert not primary.has_ready(), "no confirmation round before the view's first commit"
    primary.step("n2", AppendReply(primary.view, True, 1, 0, 0))
    ready = primary.ready()
    assert primary.commit_index == 1 and ready.read_results == ()
    rounds = {message.read_round for _, message in ready.all_messages if isinstance(message, Heartbeat)}
    assert rounds == {1}
    primary.step("n3", HeartbeatReply(primary.view, 1, primary.last_index))
    assert primary.ready().read_results[0].request_id == 5


def test_pending_reads_fail_when_the_primary_steps_down() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    primary = cluster.primary()
    primary.request_read(9)
    primary.ready()
    primary.step("n2", VoteReply(view=7, granted=False, last_index=0))
    results = primary.ready().read_results
    assert [(result.request_id, result.ok) for result in results] == [(9, False)]


def test_read_queue_is_bounded() -> None:
    replica = make_replica(max_pending_reads=2)
    replica.tick()
    drain(replica)
    replica.request_read(1)
    replica.request_read(2)
    replica.request_read(3)
    results = {result.request_id: (result.ok, result.overloaded) for result in drain(replica)[0].read_results}
    assert results == {3: (False, True), 1: (True, False), 2: (True, False)}


def test_a_backup_read_the_primary_refuses_for_a_full_queue_reaches_the_backup_as_overload() -> None:
    """The primary's bound on pending reads refuses a backup's read as overload, not as a missing
    primary: the backup's service then answers 503 overloaded, not "no primary is known"."""
    cluster = Cluster(3, max_pending_reads=1)
    cluster.elect("n1")
    primary, backup = cluster.primary(), cluster.nodes["n2"].replica
    primary.request_read(1)  # fills the primary's queue until its next round
    primary.step("n2", ReadIndex(primary.view, 7))
    ready = primary.ready()
    assert ("n2", ReadIndexReply(primary.view, 7, 0, False, overloaded=True)) in ready.all_messages
    backup.request_read(7)
    backup.advance(backup.ready())
    backup.step("n1", ReadIndexReply(primary.view, 7, 0, False, overloaded=True))
    assert [result for ready in drain(backup) for result in ready.read_results] == [
        ReadResult(7, 0, False, overloaded=True)]
    backup.request_read(8)
    backup.advance(backup.ready())
    backup.step("n1", ReadIndexReply(primary.view, 8, 0, False))  # refused for another reason
    assert [result for ready in drain(backup) for result in ready.read_results] == [ReadResult(8, 0, False)]


def test_a_backup_gets_a_read_index_from_the_primary_after_its_quorum_round() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    primary, backup = cluster.primary(), cluster.nodes["n2"].replica
    primary.propose(b"written")
    cluster.settle()
    backup.request_read(7)
    ready = backup.ready()
    assert ready.messages == (("n1", ReadIndex(backup.view, 7)),) and ready.read_results == ()
    backup.advance(ready)
    primary.step("n2", ReadIndex(primary.view, 7))
    ready = primary.ready()
    assert not any(isinstance(message, ReadIndexReply) for _, message in ready.all_messages), "no answer before the round"
    read_round = {message.read_round for _, message in ready.all_messages if isinstance(message, Heartbeat)}
    primary.advance(ready)
    primary.step("n3", HeartbeatReply(primary.view, read_round.pop(), primary.last_index))
    ready = primary.ready()
    assert ready.messages == (("n2", ReadIndexReply(primary.view, 7, primary.commit_index, True)),)
    primary.advance(ready)
    backup.step("n1", ReadIndexReply(primary.view, 7, primary.commit_index, True))
    assert backup.ready().read_results == (ReadResult(7, primary.commit_index, True),)


def test_a_backup_read_fails_when_its_primary_changes_and_ignores_a_late_answer() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    backup = cluster.nodes["n2"].replica
    backup.request_read(3)
    backup.advance(backup.ready())
    backup.step("n3", RequestVote(view=backup.view + 1, last_index=backup.last_index, last_view=backup.view))
    results = backup.ready().read_results
    assert results == (ReadResult(3, 0, False),)
    backup.step("n1", ReadIndexReply(backup.view, 3, 99, True))  # too late, and from a former primary
    assert backup.ready().read_results == ()


def test_a_backup_read_whose_request_or_answer_was_lost_expires_after_the_longest_election_timeout() -> None:
    cluster = Cluster(3)
    cluster.elect("n1")
    backup = cluster.nodes["n2"].replica
    backup.request_read(5)
    backup.advance(backup.ready())  # the ReadIndex is lost: never delivered
    waited = []
    for _ in range(2 * backup.config.election_timeout_ticks):
        backup.step("n1", Heartbeat(backup.view, backup.commit_index, 0, ()))  # the primary is still heard
        backup.tick()
        waited.extend(result for ready in drain(backup) for result in ready.read_results)
    assert waited == [], "within the longest election timeout the read still waits"
    backup.tick()
    results = [result for ready in drain(backup) for result in ready.read_results]
    assert results == [ReadResult(5, 0, False)], "the read failed instead of waiting for good"
    backup.step("n1", ReadIndexReply(backup.view, 5, 99, True))  # a late answer changes nothing
    assert all(ready.read_results == () for ready in drain(backup))


def test_a_backup_read_refused_by_a_node_that_no_longer_leads() -> None:
    replica = make_replica("n2", ("n1", "n2", "n3"))
    replica.step("n3", ReadIndex(0, 4))
    assert replica.ready().all_messages == (("n3", ReadIndexReply(0, 4, 0, False)),)


# ---------------------------------------------------------------------------- snapshots


def _behind_by_a_snapshot(cluster: Cluster, proposals: int = 10) -> tuple[Replica, int]:
    """n1 primary; n3 cut off while n1 commits ``proposals`` entries and compacts past them, then back."""
    cluster.elect("n1")
    cluster.isolated = {"n3"}
    primary = cluster.primary()
    for number in range(proposals):
        primary.propose(b"p%d" % number)
    cluster.settle()
    cluster.tick(times=2)
    applied = cluster.nodes["n1"].applied[-1].index
    primary.compact(applied)
    assert primary.log_base_index == applied
    cluster.isolated = set()
    cluster.tick(times=6)  # the lost appends are given up on after two quiet heartbeats
    assert ("n1", "n3") in cluster.snapshot_requests
    return primary, applied


def test_backup_behind_the_compacted_log_catches_up_through_a_chunked_snapshot() -> None:
    cluster = Cluster(3, max_bytes_per_message=64, snapshot_chunk_bytes=64)
    primary, applied = _behind_by_a_snapshot(cluster, proposals=30)
    assert cluster.snapshot_requests == [("n1", "n3")]
    data = bytes(range(256)) * 2  # 512 bytes: eight chunks of 64
    chunks_before = len(cluster.queue)
    assert cluster.offer("n1", "n3", applied, cluster.nodes["n1"].applied[-1].view, data)
    cluster.process("n1")
    assert chunks_before == 0
    cluster.settle()
    cluster.tick(times=2)
    backup = cluster.nodes["n3"]
    assert backup.base == (applied, primary.view) and backup.applied[0].payload == data
    assert cluster.chunks_staged["n3"] == 8
    assert backup.replica.commit_index == primary.commit_index
    assert primary.progress()["n3"][0] == primary.last_index
    assert cluster.nodes["n1"].sources == {}, "the primary's driver is told to drop its copy"
    assert cluster.transfers_ended == [("n1", "n3", TransferEnd.INSTALLED)]


def test_a_refused_snapshot_is_dropped_and_a_fresh_one_is_streamed_and_installed() -> None:
    cluster = Cluster(3, snapshot_chunk_bytes=64)
    primary, applied = _behind_by_a_snapshot(cluster)
    cluster.refuse_installs = 1
    data = bytes(range(200))
    assert cluster.offer("n1", "n3", applied, primary.view, data)
    cluster.snapshot_requests.clear()
    cluster.settle()
    assert cluster.nodes["n3"].replica.commit_index < applied, "refused: nothing installed"
    assert cluster.nodes["n1"].sources == {}, "the refused copy is dropped, never streamed again"
    cluster.tick(times=2 * primary.config.election_timeout_ticks)
    assert ("n1", "n3") in cluster.snapshot_requests, "a fresh snapshot is asked for"
    assert cluster.offer("n1", "n3", applied, primary.view, data)
    cluster.settle()
    cluster.tick(times=2)
    backup = cluster.nodes["n3"]
    assert backup.base == (applied, primary.view) and backup.applied[0].payload == data
    assert primary.progress()["n3"][0] == primary.last_index
    assert cluster.transfers_ended == [("n1", "n3", TransferEnd.DROPPED), ("n1", "n3", TransferEnd.INSTALLED)]


def test_a_chunk_whose_checksum_does_not_match_is_not_staged() -> None:
    backup = make_replica("n2", ("n1", "n2", "n3"))
    backup.step("n1", InstallSnapshot(view=1, snapshot_index=5, snapshot_view=1, offset=0, total_bytes=4,
                                      data=b"abcd", checksum=zlib.crc32(b"abce"), offer=1))
    ready = backup.ready()
    assert ready.snapshot_chunks == () and ready.snapshot is None
    backup.step("n1", InstallSnapshot(view=1, snapshot_index=5, snapshot_view=1, offset=0, total_bytes=4,
                                      data=b"abcd", checksum=zlib.crc32(b"abcd"), offer=1))
    ready = backup.ready()
    assert [(chunk.offset, chunk.data, chunk.complete) for chunk in ready.snapshot_chunks] == [(0, b"abcd", True)]
    assert ready.snapshot is None, "the core waits for the driver's install"


def test_chunks_of_two_offers_of_one_position_are_never_spliced() -> None:
    """A late chunk of an earlier offer of the same position and size is not staged into the later one."""
    backup = make_replica("n2", ("n1", "n2", "n3"))

    def chunk(offset: int, data: bytes, offer: int) -> InstallSnapshot:
        return InstallSnapshot(view=1, snapshot_index=5, snapshot_view=1, offset=offset, total_bytes=8, data=data,
                               checksum=zlib.crc32(data), offer=offer)
    backup.step("n1", chunk(0, b"AAAA", 1))
    backup.ready()
    backup.step("n1", chunk(0, b"BBBB", 2))  # the primary made a fresh checkpoint and offers it
    ready = backup.ready()
    assert [(c.offset, c.data) for c in ready.snapshot_chunks] == [(0, b"BBBB")]
    backup.step("n1", chunk(4, b"AAAA", 1))  # delayed: the first offer's second half
    ready = backup.ready()
    assert ready.snapshot_chunks == ()
    assert [message for _, message in ready.all_messages] == [SnapshotReply(1, 5, 0, False, 1)]
    backup.step("n1", chunk(4, b"BBBB", 2))
    ready = backup.ready()
    assert [(c.offset, c.data, c.complete) for c in ready.snapshot_chunks] == [(4, b"BBBB", True)]


def test_a_reply_about_an_earlier_offer_does_not_move_the_current_transfer() -> None:
    cluster = Cluster(3)
    primary, applied = _behind_by_a_snapshot(cluster)
    assert primary.offer_snapshot("n3", applied, primary.view, 10)
    drain(primary)
    progress = primary._progress["n3"].snapshot
    primary.step("n3", SnapshotReply(primary.view, applied, 10, True, progress.offer - 1))
    assert primary._progress["n3"].snapshot is progress and progress.acknowledged_bytes == 0
    primary.step("n3", SnapshotReply(primary.view, applied, 10, True, progress.offer))
    assert primary._progress["n3"].snapshot is None and primary.progress()["n3"][0] == applied


def test_a_snapshot_of_any_size_passes_the_core_without_its_bytes() -> None:
    # The former 1 GiB cap is gone: the core counts offsets; the bytes go to the driver's staging.
    backup = make_replica("n2", ("n1", "n2", "n3"))
    total = 50 * 1024 ** 3
    backup.step("n1", InstallSnapshot(view=1, snapshot_index=5, snapshot_view=1, offset=0, total_bytes=total,
                                      data=b"x" * 10, checksum=zlib.crc32(b"x" * 10), offer=1))
    ready = backup.ready()
    assert [(chunk.offset, chunk.total_bytes, chunk.complete) for chunk in ready.snapshot_chunks] == [(0, total, False)]
    replies = [message for _, message in ready.all_messages if isinstance(message, SnapshotReply)]
    assert replies == [SnapshotReply(1, 5, 10, False, 1)]
    # Out of order: nothing staged, the reply says where to resume.
    backup.step("n1", InstallSnapshot(view=1, snapshot_index=5, snapshot_view=1, offset=20, total_bytes=total,
                                      data=b"y", checksum=zlib.crc32(b"y"), offer=1))
    ready = backup.ready()
    assert ready.snapshot_chunks == ()
    assert [message for _, message in ready.all_messages] == [SnapshotReply(1, 5, 10, False, 1)]


def test_offer_snapshot_refuses_a_position_that_is_not_committed_here() -> None:
    cluster = Cluster(3)
    primary, applied = _behind_by_a_snapshot(cluster)
    assert not primary.offer_snapshot("n3", primary.commit_index + 1, primary.view, 10)
    assert not primary.offer_snapshot("n3", applied, primary.view + 1, 10)
    assert not primary.offer_snapshot("n2", applied, primary.view, 10), "n2 needs no snapshot"
    assert cluster.offer("n1", "n3", applied, primary.view, b"z" * 10)


def test_compact_refuses_entries_not_yet_handed_out() -> None:
    replica = make_replica()
    replica.tick()
    drain(replica)
    replica.propose(b"x")
    with pytest.raises(ValueError):
        replica.compact(2)
    drain(replica)
    replica.compact(2)
    assert replica.log_base_index == 2


def test_became_primary_event_is_reported() -> None:
    replica = make_replica()
    replica.tick()
    replica.advance(replica.ready())
    assert BecamePrimary(1) in replica.ready().events


def test_no_snapshot_is_asked_for_a_silent_backup_and_a_silent_transfer_is_dropped() -> None:
    cluster = Cluster(3)
    primary, applied = _behind_by_a_snapshot(cluster)
    assert cluster.offer("n1", "n3", applied, primary.view, b"s" * 10)
    cluster.isolated = {"n3"}  # the backup dies mid-transfer
    cluster.snapshot_requests.clear()
    timeout = primary.config.election_timeout_ticks
    cluster.tick(("n1", "n2"), times=4 * timeout)
    assert cluster.nodes["n1"].sources == {}, "the silent transfer ended: the driver dropped its checkpoint"
    assert cluster.transfers_ended == [("n1", "n3", TransferEnd.DROPPED)]
    assert cluster.snapshot_requests == [], "no new checkpoint for a backup that does not answer"
    cluster.isolated = set()
    cluster.tick(times=3 * timeout)
    assert ("n1", "n3") in cluster.snapshot_requests, "asked for again once the backup answers"


def test_a_backup_catching_up_under_reordered_delivery_needs_a_bounded_number_of_appends() -> None:
    """Links reorder nothing (TCP), but a model that does (the simulation) once found a storm: each
    refusal of an append that overtook its predecessor sent the primary back to probing and a full
    window, about 18 appends per entry (seed 22144). After a probe the window opens at one append
    and doubles with each acknowledgement, so a reordering link costs a few appends per entry."""
    cluster = Cluster(3, max_entries_per_message=1, max_inflight_appends=8)
    cluster.elect("n1")
    primary = cluster.primary()
    cluster.isolated.add("n3")
    for number in range(200):
        primary.propose(f"entry-{number}".encode())
    cluster.settle()
    cluster.isolated.clear()
    appends_to_n3 = 0
    for _ in range(2000):
        for node_id in cluster.ids:
            cluster.nodes[node_id].replica.tick()
            cluster.process(node_id)
        # Deliver everything queued, last sent first: every window arrives reversed.
        while cluster.queue:
            batch, cluster.queue = cluster.queue[::-1], []
            for source, destination, message in batch:
                if destination == "n3" and isinstance(message, AppendEntries):
                    appends_to_n3 += 1
                cluster.nodes[destination].replica.step(source, message)
                cluster.process(destination)
        if cluster.nodes["n3"].replica.last_index == primary.last_index:
            break
    assert cluster.nodes["n3"].replica.last_index == primary.last_index
    assert appends_to_n3 <= 3 * 200, appends_to_n3  # 463 with the window, 981 without


def test_the_replicate_window_opens_at_one_and_doubles_with_each_acknowledgement() -> None:
    progress = PeerProgress(next_index=1)
    progress.become_replicate()
    assert progress.window == 1
    windows = []
    for index in range(1, 6):
        assert progress.acknowledge(index, 0)
        windows.append(progress.window)
    assert windows == [2, 4, 8, 16, 32]
    assert not progress.acknowledge(3, 0) and progress.window == 32  # a stale acknowledgement opens nothing
    progress.become_probe(progress.match_index + 1)
    progress.become_replicate()
    assert progress.window == 1
    for index in range(6, 60):
        progress.acknowledge(index, 0)
    assert progress.window == MAX_WINDOW



# ---------------------------------------------------------------------------- flow control: stalls, commit batches


def _primary_with_open_window(cluster: Cluster) -> tuple[Replica, int]:
    """n1 primary, n2 in REPLICATE with a window of several appends; ticked up to a heartbeat just sent."""
    cluster.elect("n1")
    primary = cluster.primary()
    for number in range(4):  # each acknowledgement doubles the window: 16 appends after these
        primary.propose(b"w%d" % number)
        cluster.settle()
    for _ in range(primary.config.heartbeat_interval_ticks):
        if any(isinstance(message, Heartbeat) for _, message in _tick_primary_only(cluster, primary)):
            return primary, primary.progress()["n2"][0]
    raise AssertionError("no heartbeat within one heartbeat interval")


def _tick_primary_only(cluster: Cluster, primary: Replica) -> list[tuple[str, object]]:
    """One tick of the primary; what it sends to n2 in that tick (before delivery), then everything settles."""
    primary.tick()
    cluster.process("n1")
    sent = [(source, message) for source, destination, message in cluster.queue if destination == "n2"]
    cluster.settle()
    return sent


def test_a_pipelined_stream_with_no_progress_for_two_heartbeat_intervals_falls_back_to_probe() -> None:
    """docs/replication.md, flow control: three pipelined appends to n2 are lost. The primary resends
    nothing at the first heartbeat after them, and at the second it probes: one append from n2's match
    index, although three entries wait and the window had let three go at once."""
    cluster = Cluster(3, max_entries_per_message=1)
    primary, match = _primary_with_open_window(cluster)
    interval = primary.config.heartbeat_interval_ticks
    backup = cluster.nodes["n2"].replica
    deliver, losing = backup.step, [True]

    def lossy_step(sender: str, message) -> None:
        if not (losing[0] and isinstance(message, AppendEntries)):
            deliver(sender, message)

    backup.step = lossy_step
    for payload in (b"a", b"b", b"c"):
        primary.propose(payload)
    cluster.process("n1")
    lost = [message for _, destination, message in cluster.queue
            if destination == "n2" and isinstance(message, AppendEntries)]
    assert [message.prev_index for message in lost] == [match, match + 1, match + 2], "pipelined: all in flight"
    cluster.settle()
    assert backup.last_index == match and primary.commit_index == match + 3, "n3 acknowledged them"
    losing[0] = False
    for tick in range(1, 2 * interval):
        appends = [message for _, message in _tick_primary_only(cluster, primary)
                   if isinstance(message, AppendEntries)]
        assert appends == [], f"resent after {tick} ticks, before two heartbeat intervals"
    primary.tick()  # the second heartbeat since the appends were lost
    cluster.process("n1")
    appends = [message for _, destination, message in cluster.queue
               if destination == "n2" and isinstance(message, AppendEntries)]
    assert len(appends) == 1, "PROBE: one append at a time"
    assert appends[0].prev_index == match and appends[0].entries[0].index == match + 1
    # A probe leaves next_index where it is until it is answered (a pipelined append would move it on).
    assert primary.progress()["n2"] == (match, match + 1)
    cluster.settle()
    assert backup.last_index == primary.last_index, "the probe succeeded and the stream resumed"


def test_a_stalled_stream_counts_only_consecutive_heartbeat_intervals_without_progress() -> None:
    """Appends to n2 are held, not lost: a quiet interval, then one acknowledgement, then a quiet interval
    is not two intervals without progress; the stream is restarted only after the next quiet one."""
    cluster = Cluster(3, max_entries_per_message=1)
    primary, match = _primary_with_open_window(cluster)
    interval = primary.config.heartbeat_interval_ticks
    backup = cluster.nodes["n2"].replica
    deliver, held = backup.step, []

    def holding_step(sender: str, message) -> None:
        if isinstance(message, AppendEntries):
            held.append((sender, message))
        else:
            deliver(sender, message)

    backup.step = holding_step
    for payload in (b"a", b"b", b"c"):
        primary.propose(payload)
    cluster.settle()
    assert len(held) == 3 and backup.last_index == match

    def heartbeat_interval() -> list[AppendEntries]:
        sent = []
        for _ in range(interval):
            sent += [message for _, message in _tick_primary_only(cluster, primary)
                     if isinstance(message, AppendEntries)]
        return sent

    assert heartbeat_interval() == []  # quiet
    deliver(*held.pop(0))  # one append arrives late: progress
    cluster.settle()
    assert primary.progress()["n2"][0] == match + 1
    assert heartbeat_interval() == []  # progress made in this interval
    assert heartbeat_interval() == [], "one quiet interval after progress is not a stall"
    resent = heartbeat_interval()  # the second quiet interval in a row
    assert [(message.prev_index, len(message.entries)) for message in resent] == [(match + 1, 1)]


def test_committed_entries_reach_the_driver_in_order_in_batches_of_at_most_the_configured_count() -> None:
    """docs/replication.md: Ready.committed hands committed entries over in order, at most
    max_committed_entries_per_ready per Ready, however far the commit index jumps at once."""
    backup = make_replica("n2", ("n1", "n2", "n3"), max_committed_entries_per_ready=3)
    entries = tuple([Entry(1, 1, EntryKind.NOOP, b"")] + [Entry(i, 1, EntryKind.COMMAND, b"c%d" % i)
                                                           for i in range(2, 11)])
    backup.step("n1", AppendEntries(view=1, prev_index=0, prev_view=0, commit_index=10, entries=entries))
    assert backup.commit_index == 10
    readies = drain(backup)
    assert [[entry.index for entry in ready.committed] for ready in readies if ready.committed] == [
        [1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]
    assert [entry.payload for entry in committed(readies)] == [entry.payload for entry in entries]


def test_committed_entries_reach_the_driver_in_batches_of_about_the_configured_bytes_and_at_least_one_entry() -> None:
    """docs/replication.md: a Ready's committed entries also stop at max_committed_bytes_per_ready (each
    apply batch holds the node's loop for a bounded time), but an entry larger than that still comes,
    alone."""
    backup = make_replica("n2", ("n1", "n2", "n3"), max_committed_bytes_per_ready=1000)
    sizes = [400, 400, 400, 2500, 100, 100]
    entries = tuple([Entry(1, 1, EntryKind.NOOP, b"")] + [Entry(i + 2, 1, EntryKind.COMMAND, b"x" * size)
                                                           for i, size in enumerate(sizes)])
    backup.step("n1", AppendEntries(view=1, prev_index=0, prev_view=0, commit_index=7, entries=entries))
    readies = drain(backup)
    batches = [[entry.index for entry in ready.committed] for ready in readies if ready.committed]
    assert batches == [[1, 2, 3], [4], [5], [6, 7]]
    assert [entry.payload for entry in committed(readies)] == [entry.payload for entry in entries]
