"""Configuration, start-up state and the output records of the replica."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from protocol.messages import Message
from protocol.types import Entry, HardState

MEBIBYTE = 1024 * 1024


class Role(StrEnum):
    PRIMARY = "primary"
    BACKUP = "backup"
    CANDIDATE = "candidate"


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """Static settings of one replica; every limit the core enforces lives here.

    ``max_bytes_per_message`` bounds how many entry bytes are batched into one
    AppendEntries and the size of one snapshot chunk; a single entry larger
    than it still travels alone, bounded by ``max_entry_bytes``. The transport's
    frame limit must exceed both plus a few KiB of framing.
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
    max_snapshot_bytes: int = 1024 * MEBIBYTE
    max_committed_entries_per_ready: int = 4096

    def __post_init__(self) -> None:
        if len(self.members) not in (1, 3, 5):
            raise ValueError("a cluster has 1, 3 or 5 members")
        if len(set(self.members)) != len(self.members) or self.node_id not in self.members:
            raise ValueError("members must be distinct and include node_id")
        if any(not member for member in self.members):
            raise ValueError("member ids must be non-empty")
        if self.heartbeat_interval_ticks < 1 or self.election_timeout_ticks <= self.heartbeat_interval_ticks:
            raise ValueError("need 1 <= heartbeat_interval_ticks < election_timeout_ticks")
        positive = ("max_entries_per_message", "max_bytes_per_message", "max_inflight_appends",
                    "max_pending_reads", "max_entry_bytes", "max_uncommitted_entries",
                    "max_snapshot_bytes", "max_committed_entries_per_ready")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True, slots=True)
class RestoredState:
    """What the driver recovered from its WAL and store: the core's starting point."""

    hard_state: HardState
    snapshot_index: int
    snapshot_view: int
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class ReadResult:
    """Answer to request_read: once ok, reply after the store has applied read_index."""

    request_id: int
    read_index: int
    ok: bool


@dataclass(frozen=True, slots=True)
class SnapshotToInstall:
    """A complete snapshot received from the primary; the log now starts after (index, view)."""

    index: int
    view: int
    data: bytes


@dataclass(frozen=True, slots=True)
class BecamePrimary:
    view: int


@dataclass(frozen=True, slots=True)
class SteppedDown:
    view: int


@dataclass(frozen=True, slots=True)
class PrimaryChanged:
    view: int
    primary_id: str | None


@dataclass(frozen=True, slots=True)
class ElectionStarted:
    view: int


Event = BecamePrimary | SteppedDown | PrimaryChanged | ElectionStarted


@dataclass(frozen=True, slots=True)
class Ready:
    """One batch of work for the driver, carried out in this order.

    1. install ``snapshot`` into the store and reset the log base to it;
    2. drop the persisted log from ``truncate_from`` on, append ``entries``,
       write ``hard_state``, fsync;
    3. send ``messages``;
    4. apply ``committed``; answer ``read_results`` once applied >= read_index;
       offer snapshots for ``snapshot_requests``; log ``events``;
    5. call ``advance(ready)``.
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
