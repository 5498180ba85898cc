"""Deliberately broken replicas: each breaks one safety rule, to prove the simulation notices.

They live here, in the simulation tests, and nowhere else: the node builds a
plain protocol.Replica from its configuration and cannot reach these.
"""

from __future__ import annotations

from protocol import Message, Replica, Role
from protocol.membership import Membership
from protocol.messages import AppendEntries, Heartbeat, PreVote, PreVoteReply, RequestVote, SnapshotReply
from protocol.progress import PeerProgress
from protocol.records import SnapshotToInstall
from protocol.replica import PRIMARY_SENT_TYPES


class AcknowledgesWithoutMajority(Replica):
    """Commits (and so lets the client be answered) once any single copy is durable."""

    def _commit_quorum_size(self) -> int:
        return 1


class VotesWithoutUpToDateCheck(Replica):
    """Grants votes to candidates whose log is behind its own (no election restriction)."""

    def _candidate_is_up_to_date(self, last_index: int, last_view: int) -> bool:
        return True


class CommitsEarlierViewByCounting(Replica):
    """Commits an entry of an earlier view as soon as a majority holds it (Raft figure 8)."""

    def _may_commit_entry_of_view(self, view: int | None) -> bool:
        return view is not None


BROKEN_VARIANTS = (AcknowledgesWithoutMajority, VotesWithoutUpToDateCheck, CommitsEarlierViewByCounting)


# ---------------------------------------------------------------- the planted bugs of issue 12
# Each overrides the smallest method that carries the rule it breaks (protocol/replica.py).

class ReadsWithoutQuorumRound(Replica):
    """Answers a read at once with its commit index: no heartbeat round proves it still leads."""

    def _confirm_reads(self) -> None:
        for origin, request_id, read_index, _round in self._pending_reads:
            self._answer_read(origin, request_id, read_index, True)
        self._pending_reads = []


class InstallsOlderSnapshot(Replica):
    """Resets its log to any snapshot it is handed, even one older than its commit point."""

    def snapshot_installed(self, index: int, view: int, membership: Membership | None = None) -> None:
        incoming = self._incoming_snapshot
        if incoming is not None and incoming.key[2:4] == (index, view):
            self._incoming_snapshot = None
            self._outbox.append((incoming.sender, SnapshotReply(self._view, index, incoming.total_bytes, True,
                                                                incoming.offer)))
        # The guard "index <= commit index, or (index, view) held: only move the commit point" is gone.
        self._log.reset(index, view)
        self._configurations.reset(membership)
        self._refresh_membership()
        self._commit_index = index
        self._applied_index = index
        self._persisted_index = min(self._persisted_index, index)
        self._unstable_from_index = index + 1
        self._pending_truncate_from = None
        self._pending_snapshot = SnapshotToInstall(index, view)


class AcceptsLowerViews(Replica):
    """Handles messages of an earlier view as if they were of its own."""

    def step(self, sender: str, message: Message) -> None:
        handler = self._handlers.get(type(message))
        if handler is None or sender not in self._peers:
            return
        if isinstance(message, (PreVote, PreVoteReply)):
            handler(sender, message)
            return
        view = message.view  # type: ignore[attr-defined]
        if view > self._view:
            self._become_backup(view, sender if isinstance(message, PRIMARY_SENT_TYPES) else None, "higher view")
        # The "view < own view: answer stale and drop" branch is gone.
        if self._role is Role.PRIMARY:
            self._progress[sender].recently_active = True
        handler(sender, message)


class UpToDateByIndexOnly(Replica):
    """The election restriction compares the last index only, not the last entry's view first."""

    def _candidate_is_up_to_date(self, last_index: int, last_view: int) -> bool:
        return last_index >= self._log.last_index


class ReadsBeforeFirstCommitOfView(Replica):
    """Serves reads before the new primary's no-op committed: its commit index may be behind."""

    def _committed_in_current_view(self) -> bool:
        return self._role is Role.PRIMARY


class HeartbeatCarriesRawCommit(Replica):
    """The heartbeat carries the primary's commit index, not min(commit, the backup's match index)."""

    def _send_heartbeat(self, peer: str, progress: PeerProgress) -> None:
        self._outbox.append((peer, Heartbeat(self._view, self._commit_index, self._read_round, self.floors)))


class VotesTwiceInAView(Replica):
    """Grants every up-to-date candidate, whoever it voted for earlier in the view."""

    def _on_request_vote(self, sender: str, message: RequestVote) -> None:
        voted_for, self._voted_for = self._voted_for, None
        super()._on_request_vote(sender, message)
        if self._voted_for is None:
            self._voted_for = voted_for


class AlwaysTruncatesAfterPrev(Replica):
    """Drops everything after an append's previous entry, even entries that match (a reordered,
    older append then erases entries it already acknowledged)."""

    def _on_append_entries(self, sender: str, message: AppendEntries) -> None:
        if (self._role is Role.BACKUP and self._primary_id == sender and message.prev_index >= self._commit_index
                and self._log.view_at(message.prev_index) == message.prev_view
                and self._log.last_index > message.prev_index):
            self._truncate_from(message.prev_index + 1)
        super()._on_append_entries(sender, message)


class CountsOwnVoteAtOnce(Replica):
    """Counts its vote for itself before the Ready holding it is persisted: a sole voter leads a view
    its disk does not hold, and after a crash votes in that view again (seed 2843)."""

    def _become_candidate(self, reason: str) -> None:
        super()._become_candidate(reason)
        self._votes[self.node_id] = True
        if self._granted_votes() >= self._membership.quorum:
            self._become_primary()


class DropsPollsOfUncommittedRemovals(Replica):
    """Drops the polls of a member that only an uncommitted change removed: two nodes holding
    different uncommitted changes then never elect anyone (seed 11245, a liveness failure)."""

    def _member_before_uncommitted_change(self, node_id: str) -> bool:
        return False


class FloorsAtTheMatchIndex(Replica):
    """Takes a member's floor at its match index, not capped by the commit index: an acknowledged entry
    that never committed, later cut from the member's log by another primary, makes a healthy member look
    as if it lost entries (a false report, and votes refused)."""

    def _raise_floors(self) -> None:
        for member in self._membership.ids:
            progress = self._progress.get(member)
            floor = self._commit_index if member == self.node_id else (0 if progress is None else progress.match_index)
            self._raise_floor(member, floor, self._view)


class ReportsEveryVoteBelowAFloor(Replica):
    """Reports a member below its floor from any vote message, however old: a message overtaken by the
    acknowledgement that raised the floor (a reordering link, a paused node) is taken for lost entries."""

    def _sent_after(self, floor, sent_in_view: int | None, answered_poll: int | None) -> bool:
        return True


# name -> (replica class, driver bugs planted in the simulated node); the mutant table and its CI test use it.
MUTANTS: dict[str, tuple[type[Replica], frozenset[str]]] = {
    "reads answered without the quorum round": (ReadsWithoutQuorumRound, frozenset()),
    "driver sends replies before the fsync": (Replica, frozenset({"replies_before_fsync"})),
    "node forgets its vote on restart": (Replica, frozenset({"forgets_vote_on_restart"})),
    "installs an older snapshot": (InstallsOlderSnapshot, frozenset()),
    "accepts messages from lower views": (AcceptsLowerViews, frozenset()),
    "up-to-date check compares index only": (UpToDateByIndexOnly, frozenset()),
    "reads before the view's first commit": (ReadsBeforeFirstCommitOfView, frozenset()),
    "heartbeat carries the raw commit index": (HeartbeatCarriesRawCommit, frozenset()),
    "votes twice in a view": (VotesTwiceInAView, frozenset()),
    "always truncates after prev": (AlwaysTruncatesAfterPrev, frozenset()),
    "acknowledges without a majority": (AcknowledgesWithoutMajority, frozenset()),
    "votes without the up-to-date check": (VotesWithoutUpToDateCheck, frozenset()),
    "commits an earlier view by counting": (CommitsEarlierViewByCounting, frozenset()),
    "counts its own vote before it is durable": (CountsOwnVoteAtOnce, frozenset()),
    "drops the polls of members an uncommitted change removed": (DropsPollsOfUncommittedRemovals, frozenset()),
    "floors at the match index": (FloorsAtTheMatchIndex, frozenset()),
    "reports every vote below a floor": (ReportsEveryVoteBelowAFloor, frozenset()),
}
