"""The pure replication core: messages, frame codec and the replica state machine.

Nothing in this package performs I/O, reads a clock or draws randomness on its
own; the node driver in ``tokenvault.core.node`` feeds it messages and ticks and
carries out the ``Ready`` batches it returns.
"""

from protocol.codec import DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION, FrameDecoder, decode_body, encode_frame
from protocol.errors import EntryTooLarge, NotPrimary, ProposalRejected, ProtocolError
from protocol.membership import Member, Membership, MembershipError
from protocol.messages import (MESSAGE_REGISTRY, MESSAGE_TYPES, AppendEntries, AppendReply, ForwardRequest,
                               ForwardResponse, Heartbeat, HeartbeatReply, Hello, HelloProof, HelloRefused,
                               InstallSnapshot, Message, Ping, PreVote, PreVoteReply, ReadIndex, ReadIndexReply,
                               ReplicatedSettings, RequestVote, SnapshotReply, VoteReply)
from protocol.records import (BackupLostEntries, BecamePrimary, ElectionStarted, Event, MemberBelowFloor,
                              MembershipChanged, PrimaryChanged, ReadResult, Ready, ReplicaConfig, RestoredState, Role, SnapshotChunk,
                              SnapshotRead, SnapshotToInstall, SteppedDown, TransferEnd)
from protocol.replica import Replica
from protocol.types import INITIAL_HARD_STATE, Entry, EntryKind, HardState

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES", "PROTOCOL_VERSION", "FrameDecoder", "decode_body", "encode_frame",
    "EntryTooLarge", "NotPrimary", "ProposalRejected", "ProtocolError",
    "Member", "Membership", "MembershipError", "MembershipChanged",
    "MESSAGE_REGISTRY", "MESSAGE_TYPES", "AppendEntries", "AppendReply", "ForwardRequest", "ForwardResponse",
    "Heartbeat", "HeartbeatReply", "Hello", "HelloProof", "HelloRefused", "InstallSnapshot", "Message", "Ping",
    "PreVote", "PreVoteReply",
    "ReadIndex", "ReadIndexReply", "ReplicatedSettings", "RequestVote",
    "SnapshotReply", "VoteReply",
    "BackupLostEntries", "BecamePrimary", "ElectionStarted", "Event", "MemberBelowFloor", "PrimaryChanged", "ReadResult", "Ready",
    "ReplicaConfig",
    "RestoredState", "Role", "SnapshotChunk", "SnapshotRead", "SnapshotToInstall", "SteppedDown", "TransferEnd",
    "Replica",
    "INITIAL_HARD_STATE", "Entry", "EntryKind", "HardState",
]
