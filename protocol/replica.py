"""The replication core: a deterministic primary-backup state machine with view-numbered primaries.

The replica performs no I/O. The driver feeds it ticks, peer messages,
proposals and read requests, and carries out the ``Ready`` batches it returns
(persist, then send, then apply, then ``advance``). The rules it follows, and
why each is there, are written up in docs/replication.md.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from protocol.errors import EntryTooLarge, NotPrimary, ProposalRejected
from protocol.membership import ConfigurationLog, Membership, MembershipError
from protocol.messages import (AppendEntries, AppendReply, Heartbeat, HeartbeatReply, InstallSnapshot, Message,
                               PreVote, PreVoteReply, ReadIndex, ReadIndexReply, RequestVote, SnapshotReply,
                               VoteReply)
from protocol.progress import IncomingSnapshot, OutgoingSnapshot, PeerProgress, PeerState
from protocol.records import (BackupLostEntries, BecamePrimary, ElectionStarted, Event, MemberBelowFloor,
                              MembershipChanged, PrimaryChanged, ReadResult, Ready, ReplicaConfig, RestoredState, Role, SnapshotChunk,
                              SnapshotRead, SnapshotToInstall, SteppedDown, TransferEnd)
from protocol.replicated_log import ReplicatedLog, entries_follow
from protocol.types import Entry, EntryKind, HardState

# After this many heartbeat intervals without progress, a pipelined stream or a
# snapshot transfer is assumed to have lost a message and is restarted.
STALLED_HEARTBEATS_LIMIT = 2
# A snapshot transfer the backup has not answered for this many election
# timeouts is dropped (the driver frees its checkpoint and the log it holds);
# a new one is asked for once the backup answers again.
SNAPSHOT_SILENT_ELECTION_TIMEOUTS = 3
PRIMARY_SENT_TYPES = (AppendEntries, Heartbeat, InstallSnapshot)


class _Floor(NamedTuple):
    """A member's floor as this node holds it: its value (a log index), and when it was last raised (the view of the
    heartbeat, or of this primary, that raised it, and this node's poll number then)."""

    value: int
    view: int
    poll: int


class RandomSource(Protocol):
    def random(self) -> float: ...

    def randrange(self, start: int, stop: int) -> int: ...


class Replica:
    """One member of the replica group. See the module docstring and docs/replication.md."""

    def __init__(self, config: ReplicaConfig, restored: RestoredState, rng: RandomSource) -> None:
        self._config = config
        self._rng = rng
        if min(restored.snapshot_index, restored.snapshot_view, restored.hard_state.view) < 0:
            raise ValueError("restored positions must be non-negative")
        self._log = ReplicatedLog(restored.snapshot_index, restored.snapshot_view, restored.entries)
        # Membership (protocol/membership.py): the configuration at the log base, and every CONFIG
        # entry above it in index order; the last one is in effect, committed or not (Raft thesis 4.1).
        self._configurations = ConfigurationLog(Membership.of(config.members, config.learners), restored.membership)
        try:
            self._note_configs(restored.entries)
        except MembershipError as error:
            raise ValueError(f"a configuration entry in the restored log is not valid: {error}") from None
        self._membership = self._configurations.current
        self._peers = self._peers_of(self._membership)
        # Per member, the highest index it acknowledged that is also committed, as this node last heard
        # (the primary computes them, its heartbeats carry them): a member whose log ends below its floor
        # lost entries from its disk, and counts in no election (_below_floor; docs/failure-modes.md).
        # Restored floors were raised in views up to the restored one (the driver keeps floors it took
        # with a Ready once that Ready's hard state is durable), before any poll of this run.
        self._floors: dict[str, _Floor] = {member: _Floor(floor, restored.hard_state.view, restored.first_poll)
                                           for member, floor in restored.floors if member in self._membership.ids}
        self._floors_held: tuple[tuple[str, int], ...] | None = None  # ``floors``, until one changes
        self._polls = restored.first_poll  # numbers this node's pre-votes (PreVote.poll), from this start's base
        self._appends_sent = 0  # numbers this node's appends (AppendEntries.sequence)
        self._first_known_commit_index: int | None = None
        self._first_known_commit_view = 0  # the view whose primary said it (or in which this node committed it)
        self._floors_reported: dict[str, int] = {}  # per member, the floor it was last reported below
        hard_state = restored.hard_state
        # A crash between writing entries and writing the hard state of the same batch can
        # leave entries of a view the hard state never reached. No vote was sent from that
        # batch, so taking the entries' view with no vote in it is safe.
        self._view = max(hard_state.view, self._log.last_view)
        self._voted_for = hard_state.voted_for if self._view == hard_state.view else None
        # A torn WAL tail may have kept a hard state whose commit index outruns the entries.
        self._commit_index = max(restored.snapshot_index, min(hard_state.commit_index, self._log.last_index))
        self._role = Role.BACKUP
        self._primary_id: str | None = None
        self._election_elapsed_ticks = 0
        self._heartbeat_elapsed_ticks = 0
        self._randomized_election_timeout_ticks = 0
        self._randomize_election_timeout()
        self._votes: dict[str, bool] = {}
        # A CANDIDATE first polls with PreVote at view + 1 and only campaigns for real on a majority.
        self._pre_voting = False
        self._progress: dict[str, PeerProgress] = {}
        self._incoming_snapshot: IncomingSnapshot | None = None
        # Output bookkeeping: what has been handed to the driver and what it confirmed.
        self._handed_hard_state = hard_state
        self._unstable_from_index = self._log.last_index + 1
        self._pending_truncate_from: int | None = None
        self._persisted_index = self._log.last_index
        self._applied_index = restored.snapshot_index
        self._pending_snapshot: SnapshotToInstall | None = None
        self._outbox: list[tuple[str, Message]] = []
        self._last_ready: Ready | None = None
        self._poll_reason = ""  # why the running pre-vote started, for the ElectionStarted event
        self._snapshot_offers = 0  # numbers this primary's offers, so two offers' chunks never mix
        self._read_results: list[ReadResult] = []
        self._snapshot_requests: list[str] = []
        self._snapshot_reads: list[SnapshotRead] = []
        self._snapshot_chunks: list[SnapshotChunk] = []
        self._snapshot_transfers_ended: list[tuple[str, TransferEnd]] = []
        self._events: list[Event] = []
        # New entries wait for the next ready() so that proposals between two Readies share messages.
        self._appends_pending = False
        # Read-index state (primary only).
        self._read_round = 0
        # Primary: the commit index as of its last heartbeat; a learner holding it has caught up.
        self._catch_up_floor = 0
        # Reads of this node (origin None) and of backups (origin = their id) share the rounds.
        self._unsent_reads: list[tuple[str | None, int]] = []  # (origin, request_id)
        self._pending_reads: list[tuple[str | None, int, int, int]] = []  # (origin, request_id, read_index, round)
        # A backup's reads waiting for the primary's ReadIndexReply: request_id -> (the primary asked,
        # the tick it was asked at). A request or reply lost on the way expires after the longest election
        # timeout (twice the configured one).
        self._remote_reads: dict[int, tuple[str, int]] = {}
        self._ticks = 0
        self._handlers: dict[type[Message], Callable[[str, Any], None]] = {
            RequestVote: self._on_request_vote, VoteReply: self._on_vote_reply,
            AppendEntries: self._on_append_entries, AppendReply: self._on_append_reply,
            Heartbeat: self._on_heartbeat, HeartbeatReply: self._on_heartbeat_reply,
            InstallSnapshot: self._on_install_snapshot, SnapshotReply: self._on_snapshot_reply,
            PreVote: self._on_pre_vote, PreVoteReply: self._on_pre_vote_reply,
            ReadIndex: self._on_read_index, ReadIndexReply: self._on_read_index_reply,
        }

    # ------------------------------------------------------------------ introspection

    @property
    def node_id(self) -> str:
        return self._config.node_id

    @property
    def config(self) -> ReplicaConfig:
        return self._config

    @property
    def role(self) -> Role:
        return self._role

    @property
    def view(self) -> int:
        return self._view

    @property
    def primary_id(self) -> str | None:
        return self._primary_id

    @property
    def commit_index(self) -> int:
        return self._commit_index

    @property
    def last_index(self) -> int:
        return self._log.last_index

    @property
    def last_view(self) -> int:
        return self._log.last_view

    @property
    def log_base_index(self) -> int:
        return self._log.base_index

    def log_entry(self, index: int) -> Entry:
        """The held entry at index (for inspection by tests and tools)."""
        return self._log.entry(index)

    @property
    def membership(self) -> Membership:
        """The configuration in effect here: the last CONFIG entry in the log, else the one at its base."""
        return self._membership

    @property
    def membership_index(self) -> int:
        """Where the configuration in effect stands in the log (the log base when no entry above it has one)."""
        index = self._configurations.last_index
        return self._log.base_index if index is None else index

    @property
    def first_known_commit_index(self) -> int | None:
        """How far the cluster had committed when this node first learnt it after its start: the first
        commit index a primary announced to it in a heartbeat (Heartbeat.cluster_commit_index), or, as a
        primary, its own first commit in its view, whichever came first. None until then. Within a view it
        does not move after: the driver logs node.recovered once its store has applied it, and a target that
        rose with every heartbeat (or every commit) would never be reached by a node that keeps pace with the
        writes from behind, as a restarted backup catching up under a steady load does. The first word of a
        later view replaces it once: a primary deposed before this node heard of its successor may have
        announced less than the cluster had committed since (it moves at most once per view change)."""
        return self._first_known_commit_index

    @property
    def may_campaign(self) -> bool:
        """A voter of the configuration in effect; or a voter of the one before it while the change that
        removed it is not committed: it may still be needed to commit that change (a removed primary
        that lost its leadership may hold the only copy a majority of the new voters accepts; Raft
        thesis 4.2.2). Such a candidate does not count its own vote. Learners never campaign."""
        if self._membership.is_voter(self.node_id):
            return True
        index = self._configurations.last_index
        if index is None or index <= self._commit_index:
            return False
        return self._configurations.previous.is_voter(self.node_id)

    def _member_before_uncommitted_change(self, node_id: str) -> bool:
        index = self._configurations.last_index
        return (index is not None and index > self._commit_index
                and node_id in self._configurations.previous.ids)

    def _may_be_added_unseen(self, sender: str, message: PreVote | RequestVote) -> bool:
        """Whether the candidate of ``message``, no member here, may have been added by a configuration
        this node has not seen: its log is ahead of this one, and either the configuration in effect here
        is not committed, or the candidate was added after it (its ``since``). A member whose removal
        this node knows committed was added before that removal: a removed primary that appended after
        its removal entry and restarted with an older commit index (persisted lazily) is ahead, and
        would otherwise be heard, win an election and lead until its removal commits again in its view.
        An id added again after its removal has a later ``since``. A ``since`` of 0 from a node outside the
        bootstrap configuration tells nothing: a member added before peer protocol version 7 (configuration
        format 1) has 0 in every configuration since, so it is heard as before."""
        if (message.last_view, message.last_index) <= (self._log.last_view, self._log.last_index):
            return False
        index = self.membership_index
        if index > self._commit_index or message.since > index:
            return True
        return message.since == 0 and sender not in self._config.members and sender not in self._config.learners

    def _own_since(self) -> int:
        """This node's ``since`` in the configuration it campaigns under (may_campaign: the one in effect,
        else the one before an uncommitted change that removed it)."""
        since = self._membership.since(self.node_id)
        if since is None:
            since = self._configurations.previous.since(self.node_id)
        return since or 0

    @property
    def floors(self) -> tuple[tuple[str, int], ...]:
        """The members' floors this node holds, in id order (for the driver to keep across restarts; the
        same tuple until one changes, so the driver's look at every Ready costs nothing)."""
        if self._floors_held is None:
            self._floors_held = tuple(sorted((member, floor.value) for member, floor in self._floors.items()))
        return self._floors_held

    @property
    def configurations(self) -> ConfigurationLog:
        """The configurations the log holds (for inspection by tests and tools; the replica changes it)."""
        return self._configurations

    def progress(self) -> dict[str, tuple[int, int]]:
        """(match_index, next_index) of every backup; empty unless this replica is the primary."""
        return {peer: (state.match_index, state.next_index) for peer, state in self._progress.items()}

    # ------------------------------------------------------------------ inputs

    def tick(self) -> None:
        self._ticks += 1
        if self._remote_reads:
            self._expire_remote_reads()
        if self._role is Role.PRIMARY:
            self._tick_primary()
            return
        self._election_elapsed_ticks += 1
        if not self.may_campaign:
            return  # a learner, or a member whose removal from the voters is committed
        if self._membership.voters == (self.node_id,):
            # A cluster of one voter has nobody to wait for: it leads once its own vote is durable.
            if not self._own_vote_pending():
                self._become_candidate("single voter: nobody to wait for")
        elif self._election_elapsed_ticks >= self._randomized_election_timeout_ticks:
            self._poll_reason = (f"no message from a primary (last: {self._primary_id or 'none'}) for "
                                 f"{self._election_elapsed_ticks} ticks, the election timeout drawn this time")
            self._start_pre_vote()

    def step(self, sender: str, message: Message) -> None:
        """Handle one message from a peer; stale, foreign or malformed input is dropped."""
        handler = self._handlers.get(type(message))
        # A primary outside this node's configuration is heard (Raft thesis 4.1: its appends are how a
        # lagging backup learns the configuration that made it a member); so is a member of the
        # configuration before the one in effect while that change is not committed (as may_campaign:
        # it may still be needed, and two nodes holding different uncommitted changes would otherwise
        # each drop the other's polls for good); so is a poll or vote request from a sender that may
        # have been added by a configuration this node has not seen (_may_be_added_unseen), since a
        # voter that lags must still be able to vote for it, or a majority up could never elect anyone.
        # Anything else from outside is dropped (docs/replication.md, "Messages from outside").
        if handler is None or sender == self.node_id:
            return
        if (sender not in self._peers and not isinstance(message, PRIMARY_SENT_TYPES)
                and not self._member_before_uncommitted_change(sender)
                and not (isinstance(message, (PreVote, RequestVote)) and self._may_be_added_unseen(sender, message))):
            return
        if isinstance(message, (PreVote, PreVoteReply)):
            handler(sender, message)  # a poll changes no view: it bypasses the view rules below
            return
        view = message.view  # type: ignore[attr-defined]
        if view > self._view:
            self._become_backup(view, sender if isinstance(message, PRIMARY_SENT_TYPES) else None,
                                f"heard view {view} from {sender} ({type(message).__name__})")
        elif view < self._view:
            self._answer_stale(sender, message)
            return
        if self._role is Role.PRIMARY:
            progress = self._progress.get(sender)
            if progress is not None:
                progress.recently_active = True
        handler(sender, message)

    def propose(self, payload: bytes) -> tuple[int, int]:
        if self._role is not Role.PRIMARY:
            raise NotPrimary(self._primary_id)
        if len(payload) > self._config.max_entry_bytes:
            raise EntryTooLarge(len(payload), self._config.max_entry_bytes)
        if self._log.last_index - self._commit_index >= self._config.max_uncommitted_entries:
            raise ProposalRejected("too many uncommitted entries")
        entry = Entry(self._log.last_index + 1, self._view, EntryKind.COMMAND, payload)
        self._log.append([entry])
        self._appends_pending = True
        return entry.index, entry.view

    def propose_membership(self, membership: Membership) -> tuple[int, int]:
        """Append a configuration entry: the whole new membership, one member added, promoted or removed.

        It takes effect here at once and on each replica once in its log. Refused
        (ProposalRejected, naming the rule) while an earlier change is not
        committed, before this primary committed an entry of its own view (a
        change of an earlier view may still be uncommitted somewhere: Ongaro's
        fix to the single-server algorithm), when more than one member differs,
        and when a learner is promoted before it holds every committed entry.
        """
        if self._role is not Role.PRIMARY:
            raise NotPrimary(self._primary_id)
        current = self._membership
        if self.membership_index > self._commit_index:
            raise ProposalRejected(f"the configuration change at index {self.membership_index} is not committed yet")
        if not self._committed_in_current_view():
            raise ProposalRejected("this primary has not committed an entry of its own view yet")
        if not current.differs_by_one_member(membership):
            raise ProposalRejected("a configuration change adds, promotes or removes exactly one member")
        for node_id in membership.voters:
            if current.member(node_id) is None:
                raise ProposalRejected(f"{node_id} joins as a learner first, and is promoted once it caught up")
            if not current.is_voter(node_id):
                progress = self._progress.get(node_id)
                match_index = progress.match_index if progress is not None else 0
                # Caught up: it holds every entry committed by the last heartbeat (at most a heartbeat
                # interval ago), so under a steady write load it is never more than that behind.
                if progress is None or progress.state is not PeerState.REPLICATE or match_index < self._catch_up_floor:
                    raise ProposalRejected(f"learner {node_id} has not caught up (holds {match_index} "
                                           f"of {self._catch_up_floor} entries committed by the last heartbeat)")
        if self._log.last_index - self._commit_index >= self._config.max_uncommitted_entries:
            raise ProposalRejected("too many uncommitted entries")
        index = self._log.last_index + 1
        # A member this change adds is stamped with the entry's index (Member.since): an id removed and added
        # again is then a new member to everyone, on every path its configuration reaches them.
        entry = Entry(index, self._view, EntryKind.CONFIG, membership.added_at(current, index).encode())
        self._log.append([entry])
        self._note_configs((entry,))
        self._refresh_membership()
        self._appends_pending = True
        return entry.index, entry.view

    def request_read(self, request_id: int) -> None:
        """Ask for a read index: answered by a ``ReadResult`` once this node may serve the read.

        The primary confirms its leadership with a heartbeat round. A backup
        that follows a known primary asks it (``ReadIndex``) and gets the
        primary's commit index as of the request; the driver answers once its
        own store has applied that far. Without a known primary: NotPrimary.
        """
        if self._role is Role.PRIMARY:
            self._queue_read(None, request_id)
            return
        if self._role is not Role.BACKUP or self._primary_id is None:
            raise NotPrimary(self._primary_id)
        if len(self._remote_reads) >= self._config.max_pending_reads:
            self._read_results.append(ReadResult(request_id, 0, False, overloaded=True))
            return
        self._remote_reads[request_id] = (self._primary_id, self._ticks)
        self._outbox.append((self._primary_id, ReadIndex(self._view, request_id)))

    def _queue_read(self, origin: str | None, request_id: int) -> None:
        if len(self._unsent_reads) + len(self._pending_reads) >= self._config.max_pending_reads:
            self._answer_read(origin, request_id, 0, False, overloaded=True)
            return
        self._unsent_reads.append((origin, request_id))

    def _answer_read(self, origin: str | None, request_id: int, read_index: int, ok: bool,
                     overloaded: bool = False) -> None:
        if origin is None:
            self._read_results.append(ReadResult(request_id, read_index, ok, overloaded))
        else:
            self._outbox.append((origin, ReadIndexReply(self._view, request_id, read_index, ok, overloaded)))

    def _on_read_index(self, sender: str, message: ReadIndex) -> None:
        if self._role is not Role.PRIMARY:
            self._outbox.append((sender, ReadIndexReply(self._view, message.request_id, 0, False)))
            return
        self._queue_read(sender, message.request_id)

    def _on_read_index_reply(self, sender: str, message: ReadIndexReply) -> None:
        asked = self._remote_reads.get(message.request_id)
        if asked is None or asked[0] != sender:
            return  # not asked of this sender, or already failed (a change of primary, or expired)
        del self._remote_reads[message.request_id]
        self._read_results.append(ReadResult(message.request_id, message.read_index, message.ok,
                                                  overloaded=message.overloaded and not message.ok))

    def _expire_remote_reads(self) -> None:
        """Fail the reads whose answer has not come within the longest election timeout (a message was
        lost): by then a backup that heard nothing from its primary would have started an election."""
        oldest_allowed = self._ticks - 2 * self._config.election_timeout_ticks
        expired = [request_id for request_id, (_, asked_at) in self._remote_reads.items() if asked_at < oldest_allowed]
        for request_id in expired:
            del self._remote_reads[request_id]
            self._read_results.append(ReadResult(request_id, 0, False))

    def _fail_remote_reads(self) -> None:
        for request_id in self._remote_reads:
            self._read_results.append(ReadResult(request_id, 0, False))
        self._remote_reads.clear()

    def compact(self, index: int) -> None:
        """Drop entries at or below index: the driver's store durably holds their effects."""
        if index <= self._log.base_index:
            return
        if index > self._applied_index:
            raise ValueError(f"cannot compact to {index}: only {self._applied_index} was handed out to apply")
        self._log.compact_to(index)
        self._configurations.compact_to(index)

    def offer_snapshot(self, peer: str, index: int, view: int, total_bytes: int) -> bool:
        """The driver's answer to a snapshot request: it holds ``total_bytes`` of the store through (index, view).

        Returns whether the transfer starts. It does not when the need went
        away (a role change, a transfer already running) or when the position is
        not one this primary knows to be committed with that view; the driver
        then drops its copy and the core asks again later. The driver reads the
        bytes itself when the Ready names them (``snapshot_reads``).
        """
        progress = self._progress.get(peer) if self._role is Role.PRIMARY else None
        if progress is None or progress.state is not PeerState.SNAPSHOT or progress.snapshot is not None:
            return False
        if type(total_bytes) is not int or total_bytes < 1:
            raise ValueError("a snapshot has at least one byte")
        if not 0 < index <= self._commit_index:
            return False
        # Below the log base the view can no longer be checked here; the driver read it
        # from the store's own record of the entry, which is where the log's came from.
        if index >= self._log.base_index and self._log.view_at(index) != view:
            return False
        self._snapshot_offers += 1
        progress.snapshot = OutgoingSnapshot(index, view, total_bytes, self._snapshot_offers)
        self._send_snapshot_chunk(peer, progress.snapshot)
        return True

    def snapshot_installed(self, index: int, view: int, membership: Membership | None = None) -> None:
        """The driver's store now holds the snapshot at (index, view) it staged from ``snapshot_chunks``.

        The store was swapped before this call, so the core follows it whatever
        else happened meanwhile: a snapshot is committed state, so a log that
        holds (index, view) agrees with it and only moves its commit point;
        any other log is replaced by one that starts after the snapshot.
        ``membership`` is the configuration the snapshot's store records (None:
        it never applied one, so the bootstrap configuration holds).
        """
        incoming = self._incoming_snapshot
        if incoming is not None and incoming.key[2:4] == (index, view):
            self._incoming_snapshot = None
            self._outbox.append((incoming.sender, SnapshotReply(self._view, index, incoming.total_bytes, True,
                                                                incoming.offer)))
        if index <= self._commit_index or self._log.view_at(index) == view:
            # Committed here already, or held with that view: the entries through it are
            # committed; never move the log backwards to an older snapshot.
            self._commit_to(index)
            self._applied_index = max(self._applied_index, index)
            return
        self._log.reset(index, view)
        self._configurations.reset(membership)
        self._refresh_membership()
        assert index > self._commit_index, "commit index only grows"
        self._commit_index = index
        self._applied_index = index
        self._persisted_index = min(self._persisted_index, index)
        self._unstable_from_index = index + 1
        # The driver's base reset discards the whole persisted log, so no truncation is needed.
        self._pending_truncate_from = None
        self._pending_snapshot = SnapshotToInstall(index, view)

    def snapshot_failed(self, index: int, view: int) -> None:
        """The staged snapshot at (index, view) was refused or could not be staged.

        The reply says zero bytes received: a primary that had sent every byte
        drops that copy and asks its driver for a fresh one; one that had not
        restarts the stream from offset 0.
        """
        incoming = self._incoming_snapshot
        if incoming is None or incoming.key[2:4] != (index, view):
            return
        self._incoming_snapshot = None
        # Zero received bytes makes the primary restart the stream from offset 0.
        self._outbox.append((incoming.sender, SnapshotReply(self._view, index, 0, False, incoming.offer)))

    # ------------------------------------------------------------------ outputs

    def has_ready(self) -> bool:
        return bool(
            self._hard_state() != self._handed_hard_state
            or self._pending_truncate_from is not None
            or self._unstable_from_index <= self._log.last_index
            or self._pending_snapshot is not None
            or self._outbox or self._read_results or self._snapshot_requests or self._events
            or self._snapshot_reads or self._snapshot_chunks or self._snapshot_transfers_ended
            or self._appends_pending
            or self._commit_index > self._applied_index
            or (self._unsent_reads and self._committed_in_current_view()))

    def ready(self) -> Ready:
        """Everything to do now; state moves on as if it were done, confirmed by advance()."""
        self._flush_appends()
        self._flush_reads()
        hard_state = self._hard_state()
        handed = self._handed_hard_state
        hard_state_out = hard_state if hard_state != handed else None
        self._handed_hard_state = hard_state
        entries = tuple(self._log.entries_between(self._unstable_from_index, self._log.last_index))
        # The commit index alone needs no fsync (etcd's MustSync): a node that restarts with an
        # older one learns it again from the primary. A vote or a view must be durable before
        # any reply that depends on it, and entries before they count.
        new_view_or_vote = hard_state.view != handed.view or hard_state.voted_for != handed.voted_for
        must_sync = bool(entries or self._pending_truncate_from is not None or self._pending_snapshot is not None
                         or new_view_or_vote)
        self._unstable_from_index = self._log.last_index + 1
        committed: tuple[Entry, ...] = ()
        if self._commit_index > self._applied_index:
            # Bounded in entries and bytes, so one Ready's apply is a few ms of the driver's
            # time however far behind the store is (a backup catching up, a long fsync).
            committed = tuple(self._log.batch_from(
                self._applied_index + 1,
                min(self._commit_index - self._applied_index, self._config.max_committed_entries_per_ready),
                self._config.max_committed_bytes_per_ready))
            assert committed and committed[-1].index > self._applied_index, "applied index only grows"
            self._applied_index = committed[-1].index
        early: tuple[tuple[str, Message], ...]
        after_persist: tuple[tuple[str, Message], ...]
        if new_view_or_vote:
            # Nothing leaves before a new view (or vote) is durable: a sole voter elects itself in one
            # Ready, with no vote request that would have waited for it, and appends of a view its own
            # disk does not hold yet would let it forget that view in a crash and vote in it again
            # while a learner keeps its entries (two primaries of one view).
            early, after_persist = (), tuple(self._outbox)
        else:
            early, after_persist = _split_outbox(self._outbox)
        ready = Ready(
            hard_state=hard_state_out, truncate_from=self._pending_truncate_from, entries=entries,
            snapshot=self._pending_snapshot, messages=early, committed=committed,
            read_results=tuple(self._read_results), snapshot_requests=tuple(self._snapshot_requests),
            events=tuple(self._events), snapshot_reads=tuple(self._snapshot_reads),
            snapshot_chunks=tuple(self._snapshot_chunks),
            snapshot_transfers_ended=tuple(self._snapshot_transfers_ended),
            messages_after_persist=after_persist,
            committed_durable_count=_durable_prefix(committed, entries), must_sync=must_sync)
        self._last_ready = ready
        self._pending_truncate_from = None
        self._pending_snapshot = None
        self._outbox.clear()
        self._read_results.clear()
        self._snapshot_requests.clear()
        self._snapshot_reads.clear()
        self._snapshot_chunks.clear()
        self._snapshot_transfers_ended.clear()
        self._events.clear()
        return ready

    def advance(self, ready: Ready) -> None:
        """The driver persisted, sent and applied ``ready``: its entries now count as durable here."""
        assert ready is self._last_ready, "advance() takes the last Ready handed out, once"
        self._last_ready = None
        persisted = self._persisted_index
        if ready.snapshot is not None and self._log.base_index >= ready.snapshot.index:
            persisted = max(persisted, ready.snapshot.index)
        if ready.entries:
            last = ready.entries[-1]
            # A later conflict may have replaced these entries before advance(): check the view.
            if self._log.view_at(last.index) == last.view:
                persisted = max(persisted, last.index)
        if self._pending_truncate_from is not None:
            persisted = min(persisted, self._pending_truncate_from - 1)
        self._persisted_index = min(persisted, self._log.last_index)
        hard_state = ready.hard_state
        if (self._own_vote_pending() and hard_state is not None and hard_state.view == self._view
                and hard_state.voted_for == self.node_id):
            # The candidate's vote for itself is durable now, so it counts (etcd's self-vote after the append).
            self._votes[self.node_id] = True
            if self._granted_votes() >= self._membership.quorum:
                self._become_primary()
        if self._role is Role.PRIMARY:
            self._maybe_commit()

    def _own_vote_pending(self) -> bool:
        """A candidate (past its pre-vote) whose vote for itself is not durable yet."""
        return (self._role is Role.CANDIDATE and not self._pre_voting and self._voted_for == self.node_id
                and self.node_id not in self._votes)

    # ------------------------------------------------------------------ role changes

    def _become_backup(self, view: int, primary_id: str | None, reason: str = "a current-view message") -> None:
        assert view >= self._view, "views only grow"
        was_primary = self._role is Role.PRIMARY
        old_view = self._view
        if view > self._view:
            self._view = view
            self._voted_for = None
        self._role = Role.BACKUP
        self._pre_voting = False
        if was_primary:
            self._stop_leading(old_view, reason)
        self._set_primary(primary_id)
        self._votes.clear()
        self._election_elapsed_ticks = 0
        self._randomize_election_timeout()

    def _become_candidate(self, reason: str) -> None:
        assert self._role is not Role.PRIMARY, "a primary does not campaign"
        self._view += 1
        self._voted_for = self.node_id
        self._role = Role.CANDIDATE
        self._pre_voting = False
        self._set_primary(None)
        # Its own vote counts once the Ready that holds it is persisted (advance): a sole voter would
        # otherwise lead a view its disk does not hold, and after a crash vote in that view again.
        self._votes = {}
        self._election_elapsed_ticks = 0
        self._randomize_election_timeout()
        self._events.append(ElectionStarted(self._view, reason))
        request = RequestVote(self._view, self._log.last_index, self._log.last_view, self._own_since())
        self._outbox.extend((peer, request) for peer in self._voting_peers())

    def _become_primary(self) -> None:
        assert self._role is Role.CANDIDATE and not self._pre_voting, "only a candidate that won its election leads"
        self._role = Role.PRIMARY
        self._set_primary(self.node_id)
        self._events.append(BecamePrimary(self._view))
        # Learners are fed like voters; only the counting leaves them out.
        self._progress = {peer: PeerProgress(self._log.last_index + 1) for peer in self._peers}
        self._heartbeat_elapsed_ticks = 0
        self._election_elapsed_ticks = 0
        self._read_round = 0
        self._catch_up_floor = self._log.last_index + 1  # its no-op: a learner is caught up once it holds it
        # Entries of earlier views commit only underneath an entry of this view (figure 8 of
        # the Raft paper), so the new primary writes a no-op straight away.
        self._log.append([Entry(self._log.last_index + 1, self._view, EntryKind.NOOP, b"")])
        self._appends_pending = True

    def _stop_leading(self, view: int, reason: str) -> None:
        self._events.append(SteppedDown(view, reason))
        self._progress = {}
        self._appends_pending = False
        for origin, request_id in self._unsent_reads:
            self._answer_read(origin, request_id, 0, False)
        for origin, request_id, _read_index, _round in self._pending_reads:
            self._answer_read(origin, request_id, 0, False)
        self._unsent_reads.clear()
        self._pending_reads.clear()

    def _set_primary(self, primary_id: str | None) -> None:
        if primary_id != self._primary_id:
            self._fail_remote_reads()  # asked of the former primary: its answer no longer counts
            self._primary_id = primary_id
            self._events.append(PrimaryChanged(self._view, primary_id))

    def _randomize_election_timeout(self) -> None:
        timeout = self._config.election_timeout_ticks
        self._randomized_election_timeout_ticks = self._rng.randrange(timeout, 2 * timeout)

    # ------------------------------------------------------------------ elections

    def _on_request_vote(self, sender: str, message: RequestVote) -> None:
        # A node that is only polling (pre-vote) has changed no state in this view,
        # so it may still vote in it; refusing would cost a real candidate its vote.
        may_vote = self._role is Role.BACKUP or (self._role is Role.CANDIDATE and self._pre_voting)
        granted = (may_vote
                   and self._voted_for in (None, sender)
                   and self._candidate_is_up_to_date(message.last_index, message.last_view)
                   and not self._below_floor(sender, message.last_index, "candidate", sent_in_view=message.view))
        if granted:
            if self._role is Role.CANDIDATE:
                self._become_backup(self._view, None)  # stop polling: it would only disrupt the candidate
            self._voted_for = sender
            self._election_elapsed_ticks = 0
        # The reply leaves only after the Ready carrying the new vote was persisted.
        self._outbox.append((sender, VoteReply(self._view, granted, self._log.last_index)))

    def _on_vote_reply(self, sender: str, message: VoteReply) -> None:
        if self._role is not Role.CANDIDATE or self._pre_voting:
            return
        self._votes[sender] = message.granted and not self._below_floor(
            sender, message.last_index, "voter", sent_in_view=message.view)
        if self._granted_votes() >= self._membership.quorum:
            self._become_primary()

    def _start_pre_vote(self) -> None:
        assert self._role is not Role.PRIMARY, "a primary does not campaign"
        self._role = Role.CANDIDATE
        self._pre_voting = True
        self._set_primary(None)
        self._votes = {self.node_id: True}
        self._election_elapsed_ticks = 0
        self._randomize_election_timeout()
        self._polls += 1
        poll = PreVote(self._view + 1, self._log.last_index, self._log.last_view, self._polls, self._own_since())
        self._outbox.extend((peer, poll) for peer in self._voting_peers())

    def _on_pre_vote(self, sender: str, message: PreVote) -> None:
        # With check_quorum, a primary that is heard from (or that we are) holds a lease: refuse,
        # since the poller is the one cut off. Without check_quorum a deposed primary might not
        # notice it lost its majority, so no lease can be trusted.
        in_lease = self._config.check_quorum and (self._role is Role.PRIMARY or (
            self._primary_id is not None and self._election_elapsed_ticks < self._config.election_timeout_ticks))
        could_vote = message.view > self._view or (
            message.view == self._view and self._voted_for in (None, sender) and self._primary_id is None)
        granted = (could_vote and not in_lease
                   and self._candidate_is_up_to_date(message.last_index, message.last_view)
                   and not self._below_floor(sender, message.last_index, "candidate",
                                             sent_in_view=message.view - 1))  # a poll is sent from the view before
        self._outbox.append((sender, PreVoteReply(message.view if granted else self._view, granted,
                                                  self._log.last_index, message.poll)))

    def _on_pre_vote_reply(self, sender: str, message: PreVoteReply) -> None:
        if not message.granted:
            if message.view > self._view:
                self._become_backup(message.view, None)  # a later view exists: catch up with it
            return
        if self._role is not Role.CANDIDATE or not self._pre_voting or message.view != self._view + 1:
            return
        if self._below_floor(sender, message.last_index, "voter", answered_poll=message.poll):
            return
        self._votes[sender] = True
        if self._granted_votes() >= self._membership.quorum:
            self._become_candidate(f"a majority granted the pre-vote after {self._poll_reason}")

    def _below_floor(self, member: str, last_index: int, as_what: str, *, sent_in_view: int | None = None,
                     answered_poll: int | None = None) -> bool:
        """Whether ``member``'s log, ending at ``last_index``, lacks entries it acknowledged that were committed.

        Such a member forgot what it promised was on its disk (its data directory put back from an older
        copy): counting its vote, or electing it, could leave a committed entry on no majority. A healthy
        member never is, in a message it sent after the acknowledgement: a floor is at most what it
        acknowledged after its fsync, and committed entries are never truncated. An older message is
        refused too, at no cost (its sender has sent, or will send, a newer one). Said once per member
        and floor, for messages known to be newer only (``_sent_after``; MemberBelowFloor)."""
        floor = self._floors.get(member)
        if floor is None or last_index >= floor.value:
            return False
        if (self._sent_after(floor, sent_in_view, answered_poll)
                and self._floors_reported.get(member) != floor.value):
            self._floors_reported[member] = floor.value  # floors only rise: once per member and floor
            self._events.append(MemberBelowFloor(member, floor.value, last_index, as_what))
        return True

    def _sent_after(self, floor: _Floor, sent_in_view: int | None, answered_poll: int | None) -> bool:
        """Whether a vote message was sent after the acknowledgement that raised ``floor``: from a view above
        the one that raised it (the member acknowledged in that view or an earlier one, and a healthy
        member's view only grows), or in answer to this node's current poll, started after it was raised
        (an earlier poll of the same view may be answered late)."""
        if sent_in_view is not None:
            return sent_in_view > floor.view
        return answered_poll == self._polls > floor.poll

    def _granted_votes(self) -> int:
        """Granted votes of this configuration's voters: a learner's or a former member's do not count."""
        return sum(1 for voter, granted in self._votes.items() if granted and self._membership.is_voter(voter))

    def _voting_peers(self) -> tuple[str, ...]:
        return tuple(voter for voter in self._membership.voters if voter != self.node_id)

    # ------------------------------------------------------------------ membership

    def _peers_of(self, membership: Membership) -> tuple[str, ...]:
        return tuple(node_id for node_id in membership.ids if node_id != self.node_id)

    def _note_configs(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """Record the configuration entries among newly held entries (already validated)."""
        for entry in entries:
            if entry.kind is EntryKind.CONFIG:
                self._configurations.note(entry.index, entry.payload)

    def _refresh_membership(self) -> None:
        """Follow the configuration now in effect: peers, the primary's progress, and what a majority is."""
        membership = self._configurations.current
        if membership == self._membership:
            return
        self._membership = membership
        self._peers = self._peers_of(membership)
        self._events.append(MembershipChanged(self.membership_index, membership))
        # A former member's floor goes with it, so that its id can be used again by a new member.
        for member in [member for member in self._floors if member not in membership.ids]:
            del self._floors[member]
            self._floors_reported.pop(member, None)
            self._floors_held = None
        if self._role is Role.CANDIDATE and not self.may_campaign:
            self._become_backup(self._view, None, "no longer a voter")
        if self._role is not Role.PRIMARY:
            return
        for peer in list(self._progress):
            if peer not in self._peers:
                if self._progress.pop(peer).snapshot is not None:
                    self._snapshot_transfers_ended.append((peer, TransferEnd.PEER_REMOVED))
        for peer in self._peers:
            if peer not in self._progress:
                self._progress[peer] = PeerProgress(self._log.last_index + 1)
                self._appends_pending = True
        # A smaller majority may already hold more, and pending reads may already be confirmed.
        self._maybe_commit()
        self._confirm_reads()

    def _candidate_is_up_to_date(self, last_index: int, last_view: int) -> bool:
        """The election restriction: vote only for a log at least as recent as ours."""
        own_view = self._log.last_view
        return last_view > own_view or (last_view == own_view and last_index >= self._log.last_index)

    def _answer_stale(self, sender: str, message: Message) -> None:
        """Tell a sender still living in an older view about the current one."""
        if isinstance(message, PRIMARY_SENT_TYPES):
            self._outbox.append((sender, AppendReply(self._view, False, 0, 0, 0)))
        elif isinstance(message, RequestVote):
            self._outbox.append((sender, VoteReply(self._view, False, self._log.last_index)))

    # ------------------------------------------------------------------ backup side

    def _hear_from_primary(self, sender: str) -> bool:
        """Follow the primary that sent this current-view message; False if we lead this view."""
        if self._role is Role.PRIMARY:
            return False  # two primaries in one view cannot happen; ignore rather than obey
        if self._role is Role.CANDIDATE or self._primary_id != sender:
            self._become_backup(self._view, sender)
        self._election_elapsed_ticks = 0
        return True

    def _on_append_entries(self, sender: str, message: AppendEntries) -> None:
        if not self._hear_from_primary(sender) or not entries_follow(message.prev_index, message.prev_view, message.entries, message.view):
            return
        entries, prev_index, prev_view = message.entries, message.prev_index, message.prev_view
        if prev_index < self._commit_index:
            # Our committed prefix is settled and equal to the primary's: skip what it covers.
            skip = self._commit_index - prev_index
            if skip >= len(entries):
                self._reply_append(sender, True, self._commit_index, message.sequence)
                return
            if entries[skip - 1].view != self._log.view_at(self._commit_index):
                return  # contradicts our committed prefix: not from a correct primary
            entries, prev_index = entries[skip:], self._commit_index
            prev_view = self._log.view_at(prev_index)  # type: ignore[assignment]
        if self._log.view_at(prev_index) != prev_view:
            hint_index = self._log.find_conflict_by_view(min(prev_index, self._log.last_index), message.prev_view)
            hint_view = self._log.view_at(hint_index) or 0
            self._outbox.append((sender, AppendReply(self._view, False, message.prev_index, hint_index, hint_view,
                                                     message.sequence)))
            return
        for position, entry in enumerate(entries):
            held_view = self._log.view_at(entry.index)
            if held_view == entry.view:
                continue
            new_entries = entries[position:]
            if not _configs_valid(new_entries):
                return  # a configuration entry that does not decode: not from a correct primary
            if held_view is not None:
                self._truncate_from(entry.index)
            self._log.append(list(new_entries))
            self._note_configs(new_entries)
            self._refresh_membership()
            break
        last_new_index = prev_index + len(entries)
        self._commit_to(min(message.commit_index, last_new_index))
        self._reply_append(sender, True, last_new_index, message.sequence)

    def _reply_append(self, sender: str, success: bool, index: int, sequence: int) -> None:
        self._outbox.append((sender, AppendReply(self._view, success, index, 0, 0, sequence)))

    def _truncate_from(self, index: int) -> None:
        assert index > self._commit_index, "committed entries are never truncated"
        self._log.truncate_from(index)
        if self._configurations.truncate_from(index):
            # The previous configuration comes back with the log it belongs to (Raft thesis 4.1).
            self._refresh_membership()
        self._persisted_index = min(self._persisted_index, index - 1)
        if index < self._unstable_from_index:
            # Some of these entries were handed to the driver: its WAL must drop them too.
            if self._pending_truncate_from is None or index < self._pending_truncate_from:
                self._pending_truncate_from = index
            self._unstable_from_index = index

    def _on_heartbeat(self, sender: str, message: Heartbeat) -> None:
        if not self._hear_from_primary(sender):
            return
        # The primary sends min(commit, our match index), which our log is known to agree with.
        self._commit_to(min(message.commit_index, self._log.last_index))
        if message.cluster_commit_index:
            self._learn_first_known_commit(message.cluster_commit_index)
        members = self._membership.ids
        for member, floor in message.floors:
            if member in members:
                self._raise_floor(member, floor, message.view)
        self._outbox.append((sender, HeartbeatReply(self._view, message.read_round, self._log.last_index)))

    def _on_install_snapshot(self, sender: str, message: InstallSnapshot) -> None:
        if not self._hear_from_primary(sender):
            return
        incoming = self._incoming_snapshot
        if incoming is not None and incoming.installing:
            # The driver is verifying and installing a whole stream; it answers when done.
            if incoming.key[1:] == (sender, message.snapshot_index, message.snapshot_view, message.total_bytes,
                                    message.offer):
                self._reply_snapshot(sender, message, incoming.received_bytes, False)
            return
        if message.snapshot_index <= self._commit_index:
            self._reply_snapshot(sender, message, message.total_bytes, True)
            return
        if (message.total_bytes < 1 or message.offset + len(message.data) > message.total_bytes
                or zlib.crc32(message.data) != message.checksum):
            # Damaged or impossible: not staged; the primary resends after a stall.
            return
        key = (message.view, sender, message.snapshot_index, message.snapshot_view, message.total_bytes,
               message.offer)
        if incoming is None or incoming.key != key:
            if message.offset != 0:
                self._reply_snapshot(sender, message, 0, False)
                return
            incoming = self._incoming_snapshot = IncomingSnapshot(key)
        elif message.offset == 0 and incoming.received_bytes > 0:
            incoming.received_bytes = 0  # the primary restarted the stream: so does the staging
        if message.offset != incoming.received_bytes or not message.data:
            self._reply_snapshot(sender, message, incoming.received_bytes, False)
            return
        incoming.received_bytes += len(message.data)
        complete = incoming.received_bytes == message.total_bytes
        incoming.installing = complete
        self._snapshot_chunks.append(SnapshotChunk(sender, message.snapshot_index, message.snapshot_view,
                                                   message.offset, message.total_bytes, message.data, complete))
        self._reply_snapshot(sender, message, incoming.received_bytes, False)

    def _reply_snapshot(self, sender: str, message: InstallSnapshot, received_bytes: int, installed: bool) -> None:
        reply = SnapshotReply(self._view, message.snapshot_index, received_bytes, installed, message.offer)
        self._outbox.append((sender, reply))

    def _commit_to(self, index: int) -> None:
        if index > self._commit_index:
            self._commit_index = index

    # ------------------------------------------------------------------ primary side

    def _tick_primary(self) -> None:
        self._election_elapsed_ticks += 1
        self._heartbeat_elapsed_ticks += 1
        if self._election_elapsed_ticks >= self._config.election_timeout_ticks:
            self._election_elapsed_ticks = 0
            if self._config.check_quorum and not self._quorum_recently_active():
                # Cut off from a majority: a new primary may exist, so stop serving.
                silent = ", ".join(sorted(peer for peer, progress in self._progress.items()
                                          if not progress.recently_active))
                self._become_backup(self._view, None, f"check-quorum: no majority heard from in "
                                                      f"{self._config.election_timeout_ticks} ticks "
                                                      f"(silent: {silent})")
                return
            for progress in self._progress.values():
                progress.recently_active = False
        if self._heartbeat_elapsed_ticks >= self._config.heartbeat_interval_ticks:
            self._heartbeat_elapsed_ticks = 0
            self._catch_up_floor = self._commit_index
            self._raise_floors()
            for peer, progress in self._progress.items():
                self._send_heartbeat(peer, progress)
                self._retry_stalled(peer, progress)

    def _quorum_recently_active(self) -> bool:
        voters = self._membership.voters
        active = sum(1 for voter in voters if voter == self.node_id or (
            voter in self._progress and self._progress[voter].recently_active))
        return active >= self._membership.quorum

    def _raise_floors(self) -> None:
        """The primary's floors, before a round of heartbeats: each member's match index (its own: its
        commit index) capped by the commit index, never lowered. Capped because an acknowledged entry
        that never committed may be cut from a member's log by a later primary, which is no loss."""
        commit_index = self._commit_index
        for member in self._membership.ids:
            if member == self.node_id:
                floor = commit_index
            else:
                progress = self._progress.get(member)
                floor = 0 if progress is None else min(progress.match_index, commit_index)
            self._raise_floor(member, floor, self._view)

    def _raise_floor(self, member: str, floor: int, view: int) -> None:
        """``member``'s floor is ``floor`` if that is higher, raised in ``view`` (and this node's current poll)."""
        held = self._floors.get(member)
        if floor > (0 if held is None else held.value):
            self._floors[member] = _Floor(floor, view, self._polls)
            self._floors_held = None

    def _send_heartbeat(self, peer: str, progress: PeerProgress) -> None:
        commit_index = min(self._commit_index, progress.match_index)
        cluster_commit_index = self._commit_index if self._committed_in_current_view() else 0
        self._outbox.append((peer, Heartbeat(self._view, commit_index, self._read_round, self.floors,
                                             cluster_commit_index)))

    def _retry_stalled(self, peer: str, progress: PeerProgress) -> None:
        """Recover from lost messages: restart a stream that made no progress for a while."""
        if progress.state is PeerState.REPLICATE:
            if progress.inflight and progress.match_index == progress.match_at_last_heartbeat:
                progress.stalled_heartbeats += 1
                if progress.stalled_heartbeats >= STALLED_HEARTBEATS_LIMIT:
                    progress.become_probe(progress.match_index + 1)
                    self._send_appends(peer)
            else:
                progress.stalled_heartbeats = 0
            progress.match_at_last_heartbeat = progress.match_index
        elif progress.state is PeerState.SNAPSHOT:
            self._retry_snapshot(peer, progress)

    def _retry_snapshot(self, peer: str, progress: PeerProgress) -> None:
        transfer = progress.snapshot
        if transfer is None:
            progress.snapshot_wait_ticks += self._config.heartbeat_interval_ticks
            # Only for a backup that answers: a checkpoint for a dead one would be wasted work.
            if progress.snapshot_wait_ticks >= self._config.election_timeout_ticks and progress.recently_active:
                progress.snapshot_wait_ticks = 0
                self._request_snapshot(peer)
            return
        transfer.silent_ticks += self._config.heartbeat_interval_ticks
        if transfer.silent_ticks >= SNAPSHOT_SILENT_ELECTION_TIMEOUTS * self._config.election_timeout_ticks:
            self._drop_snapshot_transfer(peer, progress)
            return
        transfer.stalled_heartbeats += 1
        if transfer.stalled_heartbeats >= STALLED_HEARTBEATS_LIMIT:
            transfer.acknowledged_bytes = min(transfer.acknowledged_bytes, transfer.reported_bytes)
            self._send_snapshot_chunk(peer, transfer)

    def _drop_snapshot_transfer(self, peer: str, progress: PeerProgress) -> None:
        """End a transfer that will not complete; the peer stays in SNAPSHOT state and a new one is asked for."""
        progress.snapshot = None
        progress.snapshot_wait_ticks = 0
        self._snapshot_transfers_ended.append((peer, TransferEnd.DROPPED))

    def _request_snapshot(self, peer: str) -> None:
        if peer not in self._snapshot_requests:
            self._snapshot_requests.append(peer)

    def _flush_appends(self) -> None:
        if self._appends_pending and self._role is Role.PRIMARY:
            for peer in self._progress:
                self._send_appends(peer)
        self._appends_pending = False

    def _send_appends(self, peer: str) -> None:
        """Send what the flow control allows: one probe, or appends up to the in-flight limit."""
        progress = self._progress.get(peer)
        if progress is None:
            return  # this node stopped leading meanwhile (a commit that removed it), or the peer left
        while True:
            if progress.state is PeerState.SNAPSHOT:
                return
            if progress.state is PeerState.PROBE and progress.probe_sent:
                return
            replicating = progress.state is PeerState.REPLICATE
            if replicating and (len(progress.inflight) >= min(progress.window, self._config.max_inflight_appends)
                                or progress.next_index > self._log.last_index):
                return
            prev_index = progress.next_index - 1
            prev_view = self._log.view_at(prev_index)
            if prev_view is None or prev_index < self._log.base_index:
                progress.become_snapshot()
                if progress.recently_active:
                    self._request_snapshot(peer)
                return
            entries: list[Entry] = []
            if progress.next_index <= self._log.last_index:
                entries = self._log.batch_from(progress.next_index, self._config.max_entries_per_message,
                                               self._config.max_bytes_per_message)
            self._appends_sent += 1
            message = AppendEntries(self._view, prev_index, prev_view, self._commit_index, tuple(entries),
                                    self._appends_sent)
            self._outbox.append((peer, message))
            if not replicating:
                progress.probe_sent = True
                return
            progress.next_index = entries[-1].index + 1
            progress.inflight.append(entries[-1].index)

    def _on_append_reply(self, sender: str, message: AppendReply) -> None:
        progress = self._progress.get(sender) if self._role is Role.PRIMARY else None
        if progress is None or message.index > self._log.last_index or message.sequence > self._appends_sent:
            return  # of no position or no append of this primary's
        if message.success:
            if progress.acknowledge(message.index, self._appends_sent):
                self._maybe_commit()
            if progress.state is PeerState.PROBE:
                progress.become_replicate()
            elif progress.state is PeerState.SNAPSHOT and progress.match_index >= self._log.base_index:
                if progress.snapshot is not None:
                    self._snapshot_transfers_ended.append((sender, TransferEnd.CAUGHT_UP))
                progress.become_probe(progress.match_index + 1)
            self._send_appends(sender)
            return
        if progress.state is PeerState.SNAPSHOT:
            return
        if progress.state is PeerState.REPLICATE and message.index <= progress.match_index:
            return  # a refusal of an append older than what the backup since acknowledged
        if progress.state is PeerState.PROBE and message.index != progress.next_index - 1:
            return  # a refusal of an earlier probe
        lost = message.index <= progress.match_index
        if lost and message.sequence <= progress.match_known_after:
            return  # of an append sent before the acknowledgement of that position arrived: stale
        candidate = self._log.find_conflict_by_view(min(message.hint_index, message.index), message.hint_view)
        progress.become_probe(min(message.index, candidate + 1))
        if lost:
            # The backup refuses a position it had acknowledged before this append left (a refusal
            # overtaken by the acknowledgement, duplicated or reordered, answers an earlier append):
            # entries it promised were on its disk are gone, which is outside the failure model. Said
            # once; the probe stays at match_index + 1, retried at heartbeat pace, not at full speed.
            progress.loss_refusals += 1
            if not progress.loss_reported:
                progress.loss_reported = True
                self._events.append(BackupLostEntries(sender, progress.match_index, message.index))
            progress.probe_sent = True
            return
        self._send_appends(sender)

    def _on_heartbeat_reply(self, sender: str, message: HeartbeatReply) -> None:
        progress = self._progress.get(sender) if self._role is Role.PRIMARY else None
        if progress is None:
            return
        round_seen = min(message.read_round, self._read_round)
        if round_seen > progress.read_round_acknowledged:
            progress.read_round_acknowledged = round_seen
            self._confirm_reads()
        below = message.last_index < progress.match_index
        if progress.state is PeerState.PROBE and (progress.match_index < self._log.last_index or below):
            progress.probe_sent = False  # the backup is reachable: probe again
            self._send_appends(sender)
        elif progress.state is PeerState.REPLICATE and below and not progress.inflight:
            # Its log ends below what it acknowledged, with nothing in flight to show it: a probe at that
            # position finds out whether entries are lost (_on_append_reply) or the reply was stale (one
            # sent before the acknowledgement and delivered after it: the probe then succeeds).
            progress.become_probe(progress.match_index + 1)
            self._send_appends(sender)

    def _on_snapshot_reply(self, sender: str, message: SnapshotReply) -> None:
        progress = self._progress.get(sender) if self._role is Role.PRIMARY else None
        if progress is None:
            return
        transfer = progress.snapshot
        if transfer is None or message.snapshot_index != transfer.index or message.offer != transfer.offer:
            return  # about another transfer, or an earlier offer of this one
        transfer.silent_ticks = 0
        if message.installed:
            if progress.acknowledge(transfer.index, self._appends_sent):
                self._maybe_commit()
            progress.become_probe(transfer.index + 1)
            self._snapshot_transfers_ended.append((sender, TransferEnd.INSTALLED))
            self._send_appends(sender)
            return
        if message.received_bytes == 0 and transfer.acknowledged_bytes >= transfer.total_bytes:
            # The backup had every byte and refused the stream (or lost it): this copy is
            # dropped, and a fresh one is asked for after an election timeout, so a
            # damaged checkpoint is never streamed again and again.
            self._drop_snapshot_transfer(sender, progress)
            return
        transfer.reported_bytes = min(message.received_bytes, transfer.total_bytes)
        if transfer.reported_bytes > transfer.acknowledged_bytes:
            transfer.acknowledged_bytes = transfer.reported_bytes
            transfer.stalled_heartbeats = 0
            self._send_snapshot_chunk(sender, transfer)

    def _send_snapshot_chunk(self, peer: str, transfer: OutgoingSnapshot) -> None:
        offset = transfer.acknowledged_bytes
        # Once every byte is acknowledged the read is empty: a probe that the backup
        # answers with how its install went (or with 0 if it lost the transfer).
        length = max(0, min(self._config.snapshot_chunk_bytes, transfer.total_bytes - offset))
        self._snapshot_reads.append(SnapshotRead(peer, self._view, transfer.index, transfer.view, offset, length,
                                                 transfer.total_bytes, transfer.offer))
        transfer.stalled_heartbeats = 0

    def _maybe_commit(self) -> None:
        """Move the commit point to the highest index durable on a quorum, if it is of this view.

        The quorum always includes the primary's own durable copy (DESIGN.md,
        rule 3): a majority of backups may hold an entry before the primary's
        own fsync of it finished, but it commits only once that fsync did, so
        an acknowledged entry is never missing from the node that answered.
        """
        durable = sorted((self._persisted_index if voter == self.node_id else self._progress[voter].match_index
                          for voter in self._membership.voters), reverse=True)
        candidate = min(durable[self._commit_quorum_size() - 1], self._persisted_index)
        if candidate > self._commit_index and self._may_commit_entry_of_view(self._log.view_at(candidate)):
            self._commit_index = candidate
            self._learn_first_known_commit(candidate)
            self._step_down_if_removed()

    def _learn_first_known_commit(self, index: int) -> None:
        """Keeps the first commit index heard in the latest view heard from (first_known_commit_index)."""
        if self._first_known_commit_index is None or self._view > self._first_known_commit_view:
            self._first_known_commit_index = index
            self._first_known_commit_view = self._view

    def _commit_quorum_size(self) -> int:
        """Majorities are counted among the voters of the configuration in effect (learners never count)."""
        return self._membership.quorum

    def _step_down_if_removed(self) -> None:
        """A primary the committed configuration leaves out of the voters stops leading (Raft thesis 4.2.2):
        until the change committed it led without counting itself; now the others elect a successor."""
        if (self._role is Role.PRIMARY and not self._membership.is_voter(self.node_id)
                and self.membership_index <= self._commit_index):
            self._become_backup(self._view, None, f"removed from the voters by the configuration committed "
                                                  f"at index {self.membership_index}")

    def _may_commit_entry_of_view(self, view: int | None) -> bool:
        """Counting replicas commits only entries of the current view (Raft figure 8)."""
        return view == self._view

    def _committed_in_current_view(self) -> bool:
        return self._role is Role.PRIMARY and self._log.view_at(self._commit_index) == self._view

    # ------------------------------------------------------------------ read index

    def _flush_reads(self) -> None:
        """Start one confirmation round for every read that arrived since the last Ready."""
        if not self._unsent_reads or not self._committed_in_current_view():
            return
        self._read_round += 1
        for origin, request_id in self._unsent_reads:
            self._pending_reads.append((origin, request_id, self._commit_index, self._read_round))
        self._unsent_reads.clear()
        self._raise_floors()
        for peer, progress in self._progress.items():
            self._send_heartbeat(peer, progress)
        self._confirm_reads()

    def _confirm_reads(self) -> None:
        if not self._pending_reads:
            return
        rounds = sorted((self._read_round if voter == self.node_id else self._progress[voter].read_round_acknowledged
                         for voter in self._membership.voters), reverse=True)
        confirmed_round = rounds[self._membership.quorum - 1]
        still_waiting = []
        for pending in self._pending_reads:
            origin, request_id, read_index, read_round = pending
            if read_round <= confirmed_round:
                self._answer_read(origin, request_id, read_index, True)
            else:
                still_waiting.append(pending)
        self._pending_reads = still_waiting

    def _hard_state(self) -> HardState:
        return HardState(self._view, self._voted_for, self._commit_index)


# Messages the primary sends about its own log. They may leave before the
# primary's own write is durable, because the core counts the primary's copy
# of an entry only after advance(). Read-index requests and answers promise
# nothing about this node's disk (a read index is a commit index, durable on a
# majority already). Everything else (votes, replies) promises what is on this
# node's disk and waits for the fsync.
_SENT_BEFORE_PERSIST = (AppendEntries, Heartbeat, InstallSnapshot, ReadIndex, ReadIndexReply)


def _split_outbox(outbox: list[tuple[str, Message]]) -> tuple[tuple[tuple[str, Message], ...],
                                                              tuple[tuple[str, Message], ...]]:
    early = tuple(item for item in outbox if isinstance(item[1], _SENT_BEFORE_PERSIST))
    after_persist = tuple(item for item in outbox if not isinstance(item[1], _SENT_BEFORE_PERSIST))
    return early, after_persist


def _configs_valid(entries: tuple[Entry, ...]) -> bool:
    for entry in entries:
        if entry.kind is EntryKind.CONFIG:
            try:
                Membership.decode(entry.payload)
            except MembershipError:
                return False
    return True


def _durable_prefix(committed: tuple[Entry, ...], entries: tuple[Entry, ...]) -> int:
    """How many committed entries an earlier Ready made durable: those below this Ready's first new entry."""
    if not entries:
        return len(committed)
    first_new_index = entries[0].index
    return sum(1 for entry in committed if entry.index < first_new_index)
