"""What the primary knows about each backup, and snapshot transfers in both directions."""

from __future__ import annotations

from collections import deque
from enum import Enum


# The most appends a window may ever allow (the replica's configured in-flight limit is lower).
MAX_WINDOW = 1 << 16


class PeerState(Enum):
    """How the primary currently feeds one backup.

    PROBE: one append at a time until the backup's log position is found.
    REPLICATE: appends are pipelined, up to the in-flight limit; the window
    opens at one append after a probe and doubles with each acknowledgement
    that moves the match index, so a link that delivers out of order (or a
    backup that keeps refusing) costs a few appends per entry instead of a
    full window per refusal (docs/replication.md, flow control).
    SNAPSHOT: the backup needs entries the primary compacted; a snapshot is
    requested from the driver or being streamed.
    """

    PROBE = 1
    REPLICATE = 2
    SNAPSHOT = 3


class OutgoingSnapshot:
    """A snapshot being streamed to one backup, one chunk per round trip; the driver holds the bytes."""

    __slots__ = ("index", "view", "total_bytes", "offer", "acknowledged_bytes", "reported_bytes",
                 "stalled_heartbeats", "silent_ticks")

    def __init__(self, index: int, view: int, total_bytes: int, offer: int) -> None:
        self.index = index
        self.view = view
        self.total_bytes = total_bytes
        self.offer = offer
        self.acknowledged_bytes = 0
        # The most recent count the receiver reported; after a stall the stream
        # resumes there, which also covers a receiver that restarted from zero.
        self.reported_bytes = 0
        self.stalled_heartbeats = 0
        # Ticks since the backup last answered this transfer at all (resends do not reset it).
        self.silent_ticks = 0


class IncomingSnapshot:
    """A snapshot a backup is receiving; keyed so chunks of another transfer never mix in.

    The bytes go to the driver's staging area as they arrive; the core counts
    them. Once ``received_bytes`` reaches the total the transfer is
    ``installing`` until the driver reports how the install went.
    """

    __slots__ = ("key", "received_bytes", "installing")

    def __init__(self, key: tuple[int, str, int, int, int, int]) -> None:
        self.key = key
        self.received_bytes = 0
        self.installing = False

    @property
    def sender(self) -> str:
        return self.key[1]

    @property
    def total_bytes(self) -> int:
        return self.key[4]

    @property
    def offer(self) -> int:
        return self.key[5]


class PeerProgress:
    """Replication state of one backup, as seen by the primary."""

    __slots__ = ("match_index", "next_index", "state", "probe_sent", "inflight", "recently_active",
                 "read_round_acknowledged", "match_at_last_heartbeat", "stalled_heartbeats",
                 "snapshot", "snapshot_wait_ticks", "window", "match_known_after", "loss_refusals",
                 "loss_reported")

    def __init__(self, next_index: int) -> None:
        self.match_index = 0
        self.next_index = next_index
        self.state = PeerState.PROBE
        self.probe_sent = False
        # Last index carried by each append sent in REPLICATE state and not yet acknowledged.
        self.inflight: deque[int] = deque()
        self.recently_active = False
        self.read_round_acknowledged = 0
        self.match_at_last_heartbeat = 0
        self.stalled_heartbeats = 0
        self.snapshot: OutgoingSnapshot | None = None
        self.snapshot_wait_ticks = 0
        # Appends allowed in flight now: 1 after each probe, doubled by each acknowledgement that
        # moves match_index, up to MAX_WINDOW (the replica caps it with its configured limit).
        self.window = 1
        # The primary's append sequence when match_index was last raised: a refusal of a position at or
        # below match_index that answers a later append is a loss (the backup acknowledged that position
        # before the append left); one that answers an earlier append is stale. Such losses counted, and
        # whether records.BackupLostEntries was said for this backup.
        self.match_known_after = 0
        self.loss_refusals = 0
        self.loss_reported = False

    def become_probe(self, next_index: int) -> None:
        self.state = PeerState.PROBE
        self.next_index = max(next_index, self.match_index + 1)
        self.probe_sent = False
        self.inflight.clear()
        self.stalled_heartbeats = 0
        self.snapshot = None

    def become_replicate(self) -> None:
        self.state = PeerState.REPLICATE
        self.next_index = self.match_index + 1
        self.inflight.clear()
        self.stalled_heartbeats = 0
        self.window = 1

    def become_snapshot(self) -> None:
        self.state = PeerState.SNAPSHOT
        self.inflight.clear()
        self.snapshot = None
        self.snapshot_wait_ticks = 0

    def acknowledge(self, index: int, appends_sent: int) -> bool:
        """Record that the backup durably holds everything up to index, learnt when the primary had sent
        ``appends_sent`` appends; True if that is news."""
        while self.inflight and self.inflight[0] <= index:
            self.inflight.popleft()
        if index <= self.match_index:
            return False
        self.window = min(2 * self.window, MAX_WINDOW)
        self.match_index = index
        self.match_known_after = appends_sent
        self.next_index = max(self.next_index, index + 1)
        return True
