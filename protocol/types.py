"""Core value types shared by the replication core and the node's storage.

These are plain immutable records; they carry no behaviour so that the
write-ahead log, the store and the replica can all depend on them without
depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class EntryKind(IntEnum):
    """What a log entry carries: a no-op (a new primary's first entry), an opaque command, or a
    configuration (protocol/membership.py), which the core reads and the store records."""

    NOOP = 0
    COMMAND = 1
    CONFIG = 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One replicated log entry: its position, the view that created it, and its payload."""

    index: int
    view: int
    kind: EntryKind
    payload: bytes


@dataclass(frozen=True, slots=True)
class HardState:
    """State that must be durable before any message that depends on it is sent."""

    view: int
    voted_for: str | None
    commit_index: int


INITIAL_HARD_STATE = HardState(view=0, voted_for=None, commit_index=0)

# Entries one AppendEntries may carry: every receiver refuses a frame with more (protocol.codec bounds
# the decode by it), so ReplicaConfig.max_entries_per_message may not exceed it.
MAX_ENTRIES_PER_MESSAGE = 1024
