"""Wire messages exchanged between replicas, with an explicit type-tag registry.

Every message is a frozen, slotted dataclass. The codec serialises the fields
in declaration order after a numeric tag; the tags below are part of the wire
format and must never be reused for a different message. The sender of a
message is not carried in it: the transport authenticates the peer in its
handshake and passes its id to ``Replica.step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from protocol.types import Entry


@dataclass(frozen=True, slots=True)
class Message:
    """Base class of every frame the codec knows."""

    TYPE_TAG: ClassVar[int] = 0


# --------------------------------------------------------------------------- elections


@dataclass(frozen=True, slots=True)
class RequestVote(Message):
    """A candidate asks for a vote in ``view``; its log ends at (last_index, last_view); ``since`` is the
    index of the configuration entry that added it, as its own log says (Member.since: 0 for a member of
    the bootstrap configuration), which tells a voter that does not count it whether it may have been
    added by a configuration the voter has not seen."""

    TYPE_TAG: ClassVar[int] = 1
    view: int
    last_index: int
    last_view: int
    since: int = 0


@dataclass(frozen=True, slots=True)
class VoteReply(Message):
    """The answer to RequestVote; sent only after the voter's view and vote are durable.

    ``last_index`` is the voter's last log index: a candidate does not count the vote of a member whose
    log ends below that member's floor (Heartbeat.floors)."""

    TYPE_TAG: ClassVar[int] = 2
    view: int
    granted: bool
    last_index: int


# --------------------------------------------------------------------------- replication


@dataclass(frozen=True, slots=True)
class AppendEntries(Message):
    """The primary's entries following (prev_index, prev_view), and its commit index. ``sequence`` numbers
    the primary's appends (the reply echoes it): a refusal of an append sent before an acknowledgement
    reached the primary is stale, one of an append sent after it is not."""

    TYPE_TAG: ClassVar[int] = 3
    view: int
    prev_index: int
    prev_view: int
    commit_index: int
    entries: tuple[Entry, ...]
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class AppendReply(Message):
    """A backup's answer to AppendEntries, sent only after the entries are durable.

    On success ``index`` is the last index the backup now holds in agreement
    with the primary. On refusal ``index`` is the refused ``prev_index`` and
    (hint_index, hint_view) is the backup's last entry that may still agree,
    so the primary can skip back a whole view at a time. ``sequence`` is the
    AppendEntries's, echoed (0 in the answer to a message of an older view).
    """

    TYPE_TAG: ClassVar[int] = 4
    view: int
    success: bool
    index: int
    hint_index: int
    hint_view: int
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Keeps backups from starting elections and carries a read-index confirmation round.

    ``floors`` holds, for each member (this primary included), the highest index it is known to have
    acknowledged that is also committed: every node keeps them, so that a member whose log later ends
    below its floor (its data directory put back from an older copy) counts in no election, whoever
    leads by then (docs/failure-modes.md).

    ``commit_index`` is the primary's, capped at what this backup acknowledged (what its log is known
    to agree with); ``cluster_commit_index`` the primary's own once it has committed an entry of its
    view (before that, its commit index may be one it restored, older than the cluster's), else 0: how
    far a restarted node must apply to have caught up (node.recovered)."""

    TYPE_TAG: ClassVar[int] = 5
    view: int
    commit_index: int
    read_round: int
    floors: tuple[tuple[str, int], ...]
    cluster_commit_index: int = 0


@dataclass(frozen=True, slots=True)
class HeartbeatReply(Message):
    """Echoes the read round: proof that this backup still follows the primary in ``view``. ``last_index``
    is the backup's last log index: one below what it acknowledged makes the primary probe it, so a backup
    that lost entries is found when nothing is being written too."""

    TYPE_TAG: ClassVar[int] = 6
    view: int
    read_round: int
    last_index: int


@dataclass(frozen=True, slots=True)
class InstallSnapshot(Message):
    """One chunk of a snapshot of the applied state through (snapshot_index, snapshot_view).

    ``checksum`` is the CRC-32 of ``data``; the receiver drops a chunk that does
    not match it (and the stream as a whole is checked by the driver's format).
    ``offer`` numbers the primary's offers: two offers of the same position
    (a fresh checkpoint after a refused one) never mix their chunks.
    """

    TYPE_TAG: ClassVar[int] = 7
    view: int
    snapshot_index: int
    snapshot_view: int
    offset: int
    total_bytes: int
    data: bytes
    checksum: int
    offer: int


@dataclass(frozen=True, slots=True)
class SnapshotReply(Message):
    """How many bytes of the snapshot the receiver holds, and whether it installed it."""

    TYPE_TAG: ClassVar[int] = 8
    view: int
    snapshot_index: int
    received_bytes: int
    installed: bool
    offer: int


@dataclass(frozen=True, slots=True)
class PreVote(Message):
    """Would you vote for me in ``view``? Asked before a real election; changes no state anywhere.

    A replica that was cut off cannot win a pre-vote, so it never raises its
    view and cannot depose a healthy primary when it comes back.
    """

    TYPE_TAG: ClassVar[int] = 9
    view: int
    last_index: int
    last_view: int
    poll: int  # numbers the poller's polls; the reply echoes it
    since: int = 0  # as RequestVote's


@dataclass(frozen=True, slots=True)
class PreVoteReply(Message):
    """Answer to PreVote: ``view`` is the asked view if granted, else the voter's own view;
    ``last_index`` the voter's last log index (as in VoteReply); ``poll`` the PreVote's."""

    TYPE_TAG: ClassVar[int] = 10
    view: int
    granted: bool
    last_index: int
    poll: int


@dataclass(frozen=True, slots=True)
class ReadIndex(Message):
    """A backup asks the primary of ``view`` for a read index (etcd's MsgReadIndex).

    The primary confirms it still leads with a heartbeat round, as for its own
    reads, and answers with its commit index at the start of that round; the backup then
    answers the read once it has applied that far.
    """

    TYPE_TAG: ClassVar[int] = 11
    view: int
    request_id: int


@dataclass(frozen=True, slots=True)
class ReadIndexReply(Message):
    """The primary's answer to ReadIndex: ``read_index`` when ``ok``, else refused (retry or forward);
    ``overloaded``: refused because the primary's read queue is full, not for want of a primary."""

    TYPE_TAG: ClassVar[int] = 12
    view: int
    request_id: int
    read_index: int
    ok: bool
    overloaded: bool = False


# --------------------------------------------------------------------------- transport frames
# The replica ignores these; the node's transport and request forwarding use them.

# The settings that shape the replicated state, which every node of a cluster must share (a Hello carries the
# sender's): (name, value) pairs, sorted by name, each name once (protocol/codec.py bounds and checks them).
ReplicatedSettings = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Opens a peer connection: who is calling, a fresh challenge nonce, the incarnation of the caller's
    data directory (tokenvault/core/incarnations.py) and the caller's replicated-state settings (its
    ``[idempotency]`` retention: two nodes that differ would apply one log to different states), which the
    caller's proof covers."""

    TYPE_TAG: ClassVar[int] = 16
    node_id: str
    nonce: bytes
    incarnation: bytes
    settings: ReplicatedSettings = ()


@dataclass(frozen=True, slots=True)
class HelloProof(Message):
    """Answers a Hello with a MAC over the challenge, proving knowledge of the cluster secret."""

    TYPE_TAG: ClassVar[int] = 17
    node_id: str
    mac: bytes


@dataclass(frozen=True, slots=True)
class ForwardRequest(Message):
    """A client request a backup forwards to the primary."""

    TYPE_TAG: ClassVar[int] = 18
    request_id: int
    kind: str
    body: bytes


@dataclass(frozen=True, slots=True)
class ForwardResponse(Message):
    """The primary's answer to a ForwardRequest."""

    TYPE_TAG: ClassVar[int] = 19
    request_id: int
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Transport keepalive on an otherwise idle link; lets a silent peer be noticed as down."""

    TYPE_TAG: ClassVar[int] = 20
    sequence: int


@dataclass(frozen=True, slots=True)
class HelloRefused(Message):
    """The first frame after a handshake, from a side that has proved itself: the other side proved the
    cluster secret too but is refused (its data directory changed under its id), and why, so that its own
    log says so. The connection is closed right after."""

    TYPE_TAG: ClassVar[int] = 21
    node_id: str
    reason: str


MESSAGE_TYPES: tuple[type[Message], ...] = (
    RequestVote, VoteReply, AppendEntries, AppendReply, Heartbeat, HeartbeatReply,
    InstallSnapshot, SnapshotReply, PreVote, PreVoteReply, ReadIndex, ReadIndexReply, Hello, HelloProof,
    ForwardRequest, ForwardResponse, Ping, HelloRefused,
)


def _build_registry() -> dict[int, type[Message]]:
    registry: dict[int, type[Message]] = {}
    for message_type in MESSAGE_TYPES:
        tag = message_type.TYPE_TAG
        if tag <= 0 or tag in registry:
            raise RuntimeError(f"type tag {tag} of {message_type.__name__} is invalid or reused")
        registry[tag] = message_type
    return registry


MESSAGE_REGISTRY: dict[int, type[Message]] = _build_registry()
