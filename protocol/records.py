"""Configuration, start-up state and the output records of the replica."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from protocol.membership import MAX_MEMBERS, Membership
from protocol.messages import Message
from protocol.types import MAX_ENTRIES_PER_MESSAGE, Entry, HardState

MEBIBYTE = 1024 * 1024


class TransferEnd(StrEnum):
    """Why the primary ended a snapshot transfer (``Ready.snapshot_transfers_ended``)."""

    INSTALLED = "installed"        # the backup installed it
    DROPPED = "dropped"            # silent too long, or refused with every byte sent: a fresh one is asked for
    CAUGHT_UP = "caught_up"        # the backup reached the log through appends
    PEER_REMOVED = "peer_removed"  # the backup left the configuration


class Role(StrEnum):
    PRIMARY = "primary"
    BACKUP = "backup"
    CANDIDATE = "candidate"


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """Static settings of one replica; every limit the core enforces lives here.

    ``max_bytes_per_message`` bounds how many entry bytes are batched into one
    AppendEntries; a single entry larger than it still travels alone, bounded by
    ``max_entry_bytes``. ``snapshot_chunk_bytes`` is the size of one snapshot
    chunk. The transport's frame limit must exceed all three plus a few KiB of
    framing. A snapshot's total size has no limit here: its bytes never pass
    through the core, which only counts offsets (the driver streams them from
    and to disk).
    """

    node_id: str
    members: tuple[str, ...]
    election_timeout_ticks: int = 10
    heartbeat_interval_ticks: int = 2
    max_entries_per_message: int = 256
    max_bytes_per_message: int = 4 * MEBIBYTE
    max_inflight_appends: int = 64
    max_pending_reads: int = 4096
    check_quorum: bool = True
    max_entry_bytes: int = 12 * MEBIBYTE
    max_uncommitted_entries: int = 65_536
    snapshot_chunk_bytes: int = 1 * MEBIBYTE
    max_committed_entries_per_ready: int = 4096
    max_committed_bytes_per_ready: int = 256 * 1024
    # The bootstrap configuration's learners: a node that joins a running cluster starts with the
    # voters it was told of in ``members`` and itself here, so it never campaigns before the log
    # (or a snapshot) tells it the real configuration.
    learners: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        everyone = self.members + self.learners
        if not self.members or len(everyone) > MAX_MEMBERS:
            raise ValueError(f"a configuration has 1 to {MAX_MEMBERS} members, at least one of them a voter")
        if len(set(everyone)) != len(everyone) or self.node_id not in everyone:
            raise ValueError("members and learners must be distinct and include node_id")
        if any(not member for member in everyone):
            raise ValueError("member ids must be non-empty")
        if self.heartbeat_interval_ticks < 1 or self.election_timeout_ticks <= self.heartbeat_interval_ticks:
            raise ValueError("need 1 <= heartbeat_interval_ticks < election_timeout_ticks")
        positive = ("max_entries_per_message", "max_bytes_per_message", "max_inflight_appends",
                    "max_pending_reads", "max_entry_bytes", "max_uncommitted_entries",
                    "snapshot_chunk_bytes", "max_committed_entries_per_ready", "max_committed_bytes_per_ready")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_entries_per_message > MAX_ENTRIES_PER_MESSAGE:
            raise ValueError(f"max_entries_per_message must be at most {MAX_ENTRIES_PER_MESSAGE} (what a peer decodes)")


@dataclass(frozen=True, slots=True)
class RestoredState:
    """What the driver recovered from its WAL and store: the core's starting point."""

    hard_state: HardState
    snapshot_index: int
    snapshot_view: int
    entries: tuple[Entry, ...]
    # The configuration in effect at snapshot_index (the store's); None: the bootstrap one of ReplicaConfig.
    membership: Membership | None = None
    # The members' floors this node last made durable (Replica.floors); those of non-members are dropped.
    floors: tuple[tuple[str, int], ...] = ()
    # Where this start numbers its polls from (PreVote.poll): above every number an earlier start of this
    # node used, so that a reply to an earlier start's poll, delivered late, is never taken for a reply to
    # one of this start's (Replica._sent_after). The node takes its wall clock in nanoseconds.
    first_poll: int = 0


@dataclass(frozen=True, slots=True)
class ReadResult:
    """Answer to request_read: once ok, reply after the store has applied read_index.

    Not ok: the read could not be confirmed here (leadership lost, the primary
    changed, or the primary refused); ``overloaded`` says the refusal was the
    bound on pending reads, which is overload, not a missing primary.
    """

    request_id: int
    read_index: int
    ok: bool
    overloaded: bool = False


@dataclass(frozen=True, slots=True)
class SnapshotToInstall:
    """The driver installed a snapshot at (index, view) into its store; the log now starts after it."""

    index: int
    view: int


@dataclass(frozen=True, slots=True)
class SnapshotRead:
    """Primary side: read ``length`` bytes at ``offset`` of the snapshot offered to ``peer`` and send them.

    The driver sends ``InstallSnapshot(view, index, snapshot_view, offset,
    total_bytes, data, crc32(data), offer)``; the bytes never pass through the core.
    """

    peer: str
    view: int
    index: int
    snapshot_view: int
    offset: int
    length: int
    total_bytes: int
    offer: int


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """Backup side: stage ``data`` at ``offset`` of the snapshot at (index, view) before sending replies.

    ``offset == 0`` starts a new transfer (drop any earlier staging). When
    ``complete`` is true the stream is whole: the driver verifies and installs
    it off the event loop, then calls ``snapshot_installed`` or
    ``snapshot_failed``.
    """

    sender: str
    index: int
    view: int
    offset: int
    total_bytes: int
    data: bytes
    complete: bool


@dataclass(frozen=True, slots=True)
class BecamePrimary:
    view: int


@dataclass(frozen=True, slots=True)
class SteppedDown:
    """The primary of ``view`` stopped leading; ``reason`` says why, for a log reader."""

    view: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PrimaryChanged:
    view: int
    primary_id: str | None


@dataclass(frozen=True, slots=True)
class ElectionStarted:
    """This node became a candidate in ``view``; ``reason`` says what it had (not) heard, for a log reader."""

    view: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class MembershipChanged:
    """The configuration in effect here changed: an entry at ``index`` was appended, or a truncation
    or snapshot brought another back (index is then where that one stands; 0 for the bootstrap one)."""

    index: int
    membership: Membership


@dataclass(frozen=True, slots=True)
class BackupLostEntries:
    """A backup refused a log position at or below what it had acknowledged to this primary, in answer
    to an append sent after that acknowledgement arrived (AppendEntries.sequence): entries it
    promised were on its disk are gone (its data directory restored from an older copy, or a disk that
    lied about an fsync). Said once per backup and term of this primary, for a log reader; the primary
    goes on probing it at heartbeat pace and never counts it for anything past what it acknowledged."""

    peer: str
    acknowledged_index: int
    refused_index: int


@dataclass(frozen=True, slots=True)
class MemberBelowFloor:
    """A member's log ends (``last_index``) below its floor, the highest index it once acknowledged that
    was also committed (Heartbeat.floors): it lost entries it promised were on its disk. Its vote is not
    counted, and it is not voted for, while it stays there (``as_what``: "voter" or "candidate", the part
    it asked to play). Said once per member and floor, for a log reader."""

    member: str
    floor: int
    last_index: int
    as_what: str


Event = (BecamePrimary | SteppedDown | PrimaryChanged | ElectionStarted | MembershipChanged | BackupLostEntries
         | MemberBelowFloor)


@dataclass(frozen=True, slots=True)
class Ready:
    """One batch of work for the driver, carried out in this order.

    1. reset the log base to ``snapshot`` (the store already holds it: the
       driver installed it before calling ``snapshot_installed``);
    2. send ``messages`` and read and send ``snapshot_reads`` at once: they
       promise nothing about this node's disk. They are the primary's own
       appends, heartbeats and snapshot chunks, which need not wait for its
       disk, because the core counts the primary's own copy of an entry only
       after ``advance()`` (Raft thesis 10.2.1; etcd's ``Ready.Messages``
       beside ``MsgStorageAppend``), and the read-index requests and answers
       (``ReadIndex``, ``ReadIndexReply``: a read index is a commit index,
       durable on a majority already). Empty when this Ready carries a new
       view or vote: then every message waits for the fsync;
    3. apply ``committed_durable``: the first ``committed_durable_count``
       committed entries, which an earlier Ready already made durable here, so
       their requests may be answered before this batch's fsync;
    4. drop the persisted log from ``truncate_from`` on, append ``entries``,
       write ``hard_state``; stage ``snapshot_chunks`` in order; fsync if
       ``must_sync``. It is false when the only change is the hard state's
       commit index (etcd's ``MustSync``): that record may wait in the WAL's
       buffer for the next fsync, because a node that restarts with an older
       commit index learns the newer one again from the primary, while a vote,
       a view, a truncation, an installed snapshot and entries are promised by
       the replies of step 5;
    5. send ``messages_after_persist`` (votes, polls and replies, the
       ``HeartbeatReply`` that echoes a read round included: they promise what
       is on disk, as etcd's ``msgsAfterAppend``);
    6. apply ``committed_after_persist``; answer ``read_results`` once
       applied >= read_index; drop the sources of ``snapshot_transfers_ended``
       (each with its TransferEnd); offer snapshots for ``snapshot_requests``;
       log ``events``;
    7. call ``advance(ready)`` with this Ready, before asking for the next.

    A driver may also do everything after the fsync; the split only says what
    may go earlier. The node driver and the simulator both follow it, and
    docs/replication.md states it.
    """

    hard_state: HardState | None
    truncate_from: int | None
    entries: tuple[Entry, ...]
    snapshot: SnapshotToInstall | None
    messages: tuple[tuple[str, Message], ...]
    committed: tuple[Entry, ...]
    read_results: tuple[ReadResult, ...]
    snapshot_requests: tuple[str, ...]
    events: tuple[Event, ...]
    snapshot_reads: tuple[SnapshotRead, ...] = ()
    snapshot_chunks: tuple[SnapshotChunk, ...] = ()
    snapshot_transfers_ended: tuple[tuple[str, TransferEnd], ...] = ()
    messages_after_persist: tuple[tuple[str, Message], ...] = ()
    committed_durable_count: int = 0
    must_sync: bool = False

    @property
    def committed_durable(self) -> tuple[Entry, ...]:
        return self.committed[:self.committed_durable_count]

    @property
    def committed_after_persist(self) -> tuple[Entry, ...]:
        return self.committed[self.committed_durable_count:]

    @property
    def all_messages(self) -> tuple[tuple[str, Message], ...]:
        return self.messages + self.messages_after_persist
