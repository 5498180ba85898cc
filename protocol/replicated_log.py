"""The in-memory replicated log of one replica: a base (index, view) and the entries after it.

Entries at or below the base were compacted away: the driver's store holds
their effects. The view of the base itself is remembered so that an append
whose previous entry is the base can still be checked.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.types import Entry

# A rough per-entry framing cost used when bounding the bytes of one message.
ENTRY_OVERHEAD_BYTES = 24


class ReplicatedLog:
    __slots__ = ("_base_index", "_base_view", "_entries")

    def __init__(self, base_index: int, base_view: int, entries: Iterable[Entry] = ()) -> None:
        self._base_index = base_index
        self._base_view = base_view
        self._entries: list[Entry] = []
        self.append(list(entries))

    @property
    def base_index(self) -> int:
        return self._base_index

    @property
    def base_view(self) -> int:
        return self._base_view

    @property
    def last_index(self) -> int:
        return self._base_index + len(self._entries)

    @property
    def last_view(self) -> int:
        return self._entries[-1].view if self._entries else self._base_view

    def view_at(self, index: int) -> int | None:
        """The view of the entry at index, or None when it is compacted or beyond the end."""
        if index == self._base_index:
            return self._base_view
        if self._base_index < index <= self._base_index + len(self._entries):
            return self._entries[index - self._base_index - 1].view
        return None

    def entry(self, index: int) -> Entry:
        if not self._base_index < index <= self.last_index:
            raise IndexError(f"entry {index} is not held (base {self._base_index}, last {self.last_index})")
        return self._entries[index - self._base_index - 1]

    def entries_between(self, first_index: int, last_index: int) -> list[Entry]:
        """Entries first_index..last_index inclusive; both must be held."""
        if first_index > last_index:
            return []
        start = first_index - self._base_index - 1
        if start < 0 or last_index > self.last_index:
            raise IndexError("range not held")
        return self._entries[start:last_index - self._base_index]

    def batch_from(self, first_index: int, max_count: int, max_bytes: int) -> list[Entry]:
        """Entries from first_index on, at most max_count and about max_bytes, but at least one."""
        start = first_index - self._base_index - 1
        if start < 0:
            raise IndexError("batch starts in the compacted part of the log")
        batch: list[Entry] = []
        total_bytes = 0
        for entry in self._entries[start:start + max_count]:
            total_bytes += len(entry.payload) + ENTRY_OVERHEAD_BYTES
            if batch and total_bytes > max_bytes:
                break
            batch.append(entry)
        return batch

    def append(self, entries: list[Entry]) -> None:
        expected_index = self.last_index + 1
        previous_view = self.last_view
        for entry in entries:
            if entry.index != expected_index or entry.view < previous_view:
                raise ValueError(f"entry {entry.index}/{entry.view} does not extend the log at {expected_index - 1}")
            expected_index += 1
            previous_view = entry.view
        self._entries.extend(entries)

    def truncate_from(self, index: int) -> None:
        """Drop the entries at index and after."""
        if index <= self._base_index:
            raise ValueError("cannot truncate into the compacted part of the log")
        del self._entries[index - self._base_index - 1:]

    def compact_to(self, index: int) -> None:
        """Drop entries at or below index; index must be held."""
        view = self.view_at(index)
        if view is None:
            raise ValueError(f"cannot compact to {index}: not held")
        del self._entries[:index - self._base_index]
        self._base_index, self._base_view = index, view

    def reset(self, base_index: int, base_view: int) -> None:
        """Forget every entry: the log now starts after a snapshot at (base_index, base_view)."""
        self._entries.clear()
        self._base_index, self._base_view = base_index, base_view

    def find_conflict_by_view(self, index: int, view: int) -> int:
        """The largest held index <= index whose entry's view is <= view (the base at worst).

        Used on both sides of a refused append to skip back over a whole view
        of conflicting entries in one round trip instead of one entry at a time.
        """
        index = min(index, self.last_index)
        while index > self._base_index and self._entries[index - self._base_index - 1].view > view:
            index -= 1
        return index


def entries_follow(prev_index: int, prev_view: int, entries: Iterable[Entry], max_view: int) -> bool:
    """True if entries follow (prev_index, prev_view) contiguously, views never decreasing nor above max_view."""
    expected_index = prev_index + 1
    previous_view = prev_view
    for entry in entries:
        if entry.index != expected_index or entry.view < previous_view or entry.view > max_view:
            return False
        expected_index += 1
        previous_view = entry.view
    return True
