"""Record framing and replay of the write-ahead log's segment files.

The format (record layout, record types, what recovery cuts off and what it
refuses) is described in ``tokenvault.core.wal``, which re-exports the public names
defined here. This module holds the part of the log that deals with single
records and reading segments back: encoding a record and its CRC, checking the
fields of a decoded record, replaying a segment's records into the log being
rebuilt, telling a torn tail (an interrupted write, never acknowledged) from
corruption, and listing the segment files. Nothing here writes, truncates or
deletes a file; ``tokenvault.core.wal`` does all of that, so every durability step
stays in one place.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Union

import msgpack

from protocol import Entry, EntryKind, HardState

# The largest command is 64 MiB (tokenvault.core.commands.MAX_COMMAND_BYTES); an
# entry adds a few bytes of framing. A longer length field is corruption, and is
# refused before anything is allocated for it.
MAX_RECORD_PAYLOAD_BYTES = 64 * 1024 * 1024 + 64 * 1024
MAX_VOTED_FOR_CHARS = 255
MAX_LOG_INTEGER = 2**63 - 1
# Unwritten parts of a torn write show up as zeros in whole disk sectors.
SECTOR_BYTES = 512

SEGMENT_PATTERN = re.compile(r"segment-([0-9]{16})\.wal\Z")

_HEADER = struct.Struct(">IIB")
_LENGTH_AND_TYPE = struct.Struct(">IB")
HEADER_BYTES = _HEADER.size


class RecordType(IntEnum):
    ENTRY = 1
    HARD_STATE = 2
    TRUNCATE = 3
    BASE = 4


_RECORD_TYPE_VALUES = frozenset(int(record_type) for record_type in RecordType)


class WalCorruption(Exception):
    """The log is damaged before its tail: the node must not start from it."""


def segment_name(sequence: int) -> str:
    return f"segment-{sequence:016d}.wal"


def encode_record(record_type: RecordType, payload: bytes) -> bytes:
    """One framed record; exposed for tests that build damaged logs by hand."""
    prefix = _LENGTH_AND_TYPE.pack(len(payload), record_type)
    crc = zlib.crc32(payload, zlib.crc32(prefix))
    return _HEADER.pack(len(payload), crc, record_type) + payload


# A segment's bytes as read for replay: a read-only memory map of the file.
SegmentData = Union[bytes, mmap.mmap]
RecordHeader = tuple[int, int, int]  # (payload length, CRC, record type)


def _record_crc(length: int, record_type: int, payload: bytes | memoryview | mmap.mmap) -> int:
    return zlib.crc32(payload, zlib.crc32(_LENGTH_AND_TYPE.pack(length, record_type)))


def _hard_state_fields(hard_state: HardState | None) -> tuple[int, str | None, int] | None:
    if hard_state is None:
        return None
    return (hard_state.view, hard_state.voted_for, hard_state.commit_index)


def _base_record(index: int, view: int, reset: bool, hard_state: HardState | None) -> bytes:
    return encode_record(RecordType.BASE, msgpack.packb((index, view, reset, _hard_state_fields(hard_state))))


def _hard_state_record(hard_state: HardState) -> bytes:
    return encode_record(RecordType.HARD_STATE, msgpack.packb(_hard_state_fields(hard_state)))


# ---------------------------------------------------------------- recovery
@dataclass(slots=True)
class _SegmentInfo:
    """Bookkeeping of one segment file, used to decide which segments may be deleted."""

    sequence: int
    path: Path
    size_bytes: int
    header_bytes: int              # size of the BASE record
    start_index: int               # the position (index, view) of the segment's BASE record
    start_view: int
    high_water_index: int          # the largest index the segment holds or starts from
    lowest_truncate_from: int | None


class _ReplayState:
    """The log being rebuilt from records; every check failure is corruption."""

    def __init__(self) -> None:
        self.base_index = 0
        self.base_view = 0
        self.entries: list[Entry] = []
        self.hard_state: HardState | None = None
        self.records_replayed = 0

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.base_index

    @property
    def last_view(self) -> int:
        return self.entries[-1].view if self.entries else self.base_view

    def apply(self, record_type: int, fields: list[Any], first_segment: bool, segment: _SegmentInfo) -> None:
        if record_type == RecordType.ENTRY:
            index, view, kind, payload = fields
            if index != self.last_index + 1 or view < self.last_view:
                raise ValueError("entry does not continue the log")
            self.entries.append(Entry(index, view, EntryKind(kind), payload))
            segment.high_water_index = max(segment.high_water_index, index)
        elif record_type == RecordType.HARD_STATE:
            self.hard_state = HardState(fields[0], fields[1], fields[2])
        elif record_type == RecordType.TRUNCATE:
            (from_index,) = fields
            if not self.base_index < from_index <= self.last_index + 1:
                raise ValueError("truncation outside the log")
            del self.entries[from_index - self.base_index - 1:]
            lowest = segment.lowest_truncate_from
            segment.lowest_truncate_from = from_index if lowest is None else min(lowest, from_index)
        else:
            self._apply_base(fields, first_segment, segment)
        self.records_replayed += 1

    def _apply_base(self, fields: list[Any], first_segment: bool, segment: _SegmentInfo) -> None:
        index, view, reset, hard_state = fields
        if hard_state is not None:
            self.hard_state = HardState(hard_state[0], hard_state[1], hard_state[2])
        if first_segment or reset:
            self.base_index, self.base_view, self.entries = index, view, []
        elif (index, view) != (self.last_index, self.last_view):
            raise ValueError("segment does not continue the previous one")
        segment.start_index = segment.high_water_index = index
        segment.start_view = view


def _valid_integer(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_LOG_INTEGER


def _valid_hard_state_fields(fields: object) -> bool:
    return (type(fields) is list and len(fields) == 3 and _valid_integer(fields[0]) and _valid_integer(fields[2])
            and (fields[1] is None or (type(fields[1]) is str and 0 < len(fields[1]) <= MAX_VOTED_FOR_CHARS)))


_ENTRY_KINDS = frozenset(int(kind) for kind in EntryKind)


def _decode_fields(record_type: int, payload: bytes) -> list[Any]:
    """Parse a record payload whose CRC matched; a malformed one raises ValueError."""
    fields = msgpack.unpackb(payload, raw=False, use_list=True, max_map_len=0, max_ext_len=0,
                             max_array_len=8, max_str_len=MAX_VOTED_FOR_CHARS * 4)
    if type(fields) is not list:
        raise ValueError("record payload is not an array")
    if record_type == RecordType.ENTRY:
        ok = (len(fields) == 4 and _valid_integer(fields[0]) and fields[0] >= 1 and _valid_integer(fields[1])
              and type(fields[2]) is int and fields[2] in _ENTRY_KINDS
              and type(fields[3]) is bytes)
    elif record_type == RecordType.HARD_STATE:
        ok = _valid_hard_state_fields(fields)
    elif record_type == RecordType.TRUNCATE:
        ok = len(fields) == 1 and _valid_integer(fields[0]) and fields[0] >= 1
    else:
        ok = (len(fields) == 4 and _valid_integer(fields[0]) and _valid_integer(fields[1])
              and type(fields[2]) is bool and (fields[3] is None or _valid_hard_state_fields(fields[3])))
    if not ok:
        raise ValueError("record fields are malformed")
    return fields


def _trailing_zero_start(data: SegmentData, size: int) -> int:
    """Offset where the run of zero bytes at the end of ``data`` begins (``size`` if none)."""
    chunk_bytes = 1 << 16
    end = size
    while end > 0:
        start = max(0, end - chunk_bytes)
        stripped = len(bytes(data[start:end]).rstrip(b"\0"))
        if stripped:
            return start + stripped
        end = start
    return 0


def _length_bit_flip_verifies(data: SegmentData, offset: int, size: int, length: int, crc: int, record_type: int) -> bool:
    """True when flipping one bit of the length field gives a record whose CRC matches.

    A record that claims to run past the end of the file normally is an
    interrupted write. If instead a single flipped bit in its length field made
    it look that way, the record with the corrected length is intact and
    verifies: that is corruption of a synced record, not a torn write.
    """
    for bit in range(32):
        candidate = length ^ (1 << bit)
        end = offset + HEADER_BYTES + candidate
        if candidate <= MAX_RECORD_PAYLOAD_BYTES and end <= size:
            if _record_crc(candidate, record_type, data[offset + HEADER_BYTES:end]) == crc:
                return True
    return False


# What a record after a damaged one must start with: its type byte, then the msgpack
# array marker its payload always begins with (a fixarray of 3 or 4 fields, or 1 for
# a TRUNCATE). BASE is left out: it is only ever a segment's first record.
_LATER_RECORD_STARTS = ((RecordType.ENTRY, 0x94), (RecordType.HARD_STATE, 0x93), (RecordType.TRUNCATE, 0x91))
# The CRC work one search may do (a torn 64 MiB record of random bytes needs well under
# 1 GiB on average); past it the record is not called torn, so the node refuses to start
# rather than risk cutting synced records.
LATER_RECORD_SEARCH_MAX_BYTES = 4 << 30


def _later_record_verifies(data: SegmentData, start: int, size: int) -> bool:
    """True when a whole record whose CRC matches starts anywhere in ``data[start:size]``.

    A torn write is the last thing in a file: nothing after the record it cut
    short was written (segments are new files, never preallocated or reused,
    and a cut tail is truncated away before anything is appended). So a valid
    record after a record that claims to run past the end of the file means
    that record's length field is damaged, and the records after it are synced
    ones that must not be cut. A regular expression finds the few offsets whose
    header could start a record that fits (type byte, array marker, a length
    no longer than the bytes left); only those are checked with their CRC.
    """
    room = min(size - start - HEADER_BYTES, MAX_RECORD_PAYLOAD_BYTES)
    if room <= 0:
        return False
    starts = b"|".join(b"\\x%02x\\x%02x" % pair for pair in _LATER_RECORD_STARTS)
    pattern = re.compile(b"(?=[\\x00-\\x%02x].{7}(?:%s))" % (room >> 24, starts), re.DOTALL)
    view = memoryview(data)
    budget = LATER_RECORD_SEARCH_MAX_BYTES
    try:
        for match in pattern.finditer(data, start, size):
            position = match.start()
            length, crc, record_type = _HEADER.unpack_from(data, position)
            end = position + HEADER_BYTES + length
            if length > MAX_RECORD_PAYLOAD_BYTES or end > size:
                continue
            budget -= length
            if budget < 0:
                return True  # too much to search: refuse rather than risk cutting synced records
            if _record_crc(length, record_type, view[position + HEADER_BYTES:end]) == crc:
                return True
        return False
    finally:
        view.release()


def _is_torn_tail(data: SegmentData, offset: int, size: int, end: int, header: RecordHeader | None) -> bool:
    """Whether the damaged record at ``offset`` of the last segment is an interrupted write."""
    zero_start = _trailing_zero_start(data, size)
    if zero_start <= offset:
        return True  # the file was extended but the data never reached the disk
    if header is None:
        return True  # fewer bytes than a header: a cut record
    first_zero_sector = -(-zero_start // SECTOR_BYTES) * SECTOR_BYTES
    if first_zero_sector < offset + HEADER_BYTES:
        # The header itself runs into whole sectors of zeros a crash left unwritten:
        # its type and CRC never reached the disk (a type read as 0 is no damage).
        return True
    length, crc, record_type = header
    if record_type not in _RECORD_TYPE_VALUES:
        return False
    if end > size:
        # Cut short by the end of the file, unless its length field is what is
        # damaged: one flipped bit that a corrected length verifies, or any
        # damage with whole valid records after it.
        return (length <= MAX_RECORD_PAYLOAD_BYTES
                and not _length_bit_flip_verifies(data, offset, size, length, crc, record_type)
                and not _later_record_verifies(data, offset + HEADER_BYTES, size))
    # A complete record that fails its CRC is torn only when its end lies in
    # whole sectors of zeros that a crash left unwritten.
    return first_zero_sector < end


def _scan_segment(path: Path, data: SegmentData, size: int, is_last: bool, state: _ReplayState,
                  segment: _SegmentInfo, first_segment: bool) -> int:
    """Replay one segment's records into ``state``; returns where the valid records end."""
    offset = 0
    while offset < size:
        header: RecordHeader | None = (_HEADER.unpack_from(data, offset) if size - offset >= HEADER_BYTES
                                       else None)
        end = offset + HEADER_BYTES + header[0] if header is not None else size + 1
        problem = _record_problem(data, header, offset, end, size)
        if problem is not None:
            if is_last and _is_torn_tail(data, offset, size, end, header):
                return offset
            raise WalCorruption(f"write-ahead log {path.name} is corrupt at offset {offset}: {problem}")
        assert header is not None, "a record without a header is a problem above"
        record_type = header[2]
        try:
            if offset == 0 and record_type != RecordType.BASE:
                raise ValueError("a segment must start with a BASE record")
            if offset != 0 and record_type == RecordType.BASE:
                raise ValueError("a BASE record inside a segment")
            fields = _decode_fields(record_type, data[offset + HEADER_BYTES:end])
            state.apply(record_type, fields, first_segment, segment)
            if offset == 0:
                segment.header_bytes = end
        except Exception as error:  # msgpack raises many types; all of them mean a bad record here.
            raise WalCorruption(
                f"write-ahead log {path.name} has an invalid record at offset {offset}: {error}") from None
        offset = end
    return offset


def _record_problem(data: SegmentData, header: RecordHeader | None, offset: int, end: int, size: int) -> str | None:
    if header is None:
        return "incomplete record header"
    length, crc, record_type = header
    if length > MAX_RECORD_PAYLOAD_BYTES:
        return f"record length {length} exceeds the maximum"
    if end > size:
        return "record runs past the end of the file"
    if record_type not in _RECORD_TYPE_VALUES:
        return f"unknown record type {record_type}"
    if _record_crc(length, record_type, data[offset + HEADER_BYTES:end]) != crc:
        return "CRC mismatch"
    return None


# A BASE record's payload is four small fields (a voted-for id of at most 255 characters).
_BASE_PAYLOAD_MAX_BYTES = 4096


def _starts_with_reset(path: Path) -> bool:
    """Whether the segment's first record is a whole, valid BASE record marked ``reset``."""
    try:
        with open(path, "rb") as file:
            head = file.read(HEADER_BYTES)
            if len(head) < HEADER_BYTES:
                return False
            length, crc, record_type = _HEADER.unpack(head)
            if record_type != RecordType.BASE or length > _BASE_PAYLOAD_MAX_BYTES:
                return False
            payload = file.read(length)
    except OSError:
        return False
    if len(payload) != length or _record_crc(length, record_type, payload) != crc:
        return False
    try:
        fields = _decode_fields(record_type, payload)
    except Exception:  # msgpack raises many types; all of them mean a bad record here.
        return False
    return fields[2] is True


def _newest_reset_position(segments: list[tuple[int, Path]]) -> int:
    """Position of the newest segment that starts with a valid reset BASE record (0 if none).

    reset_base writes and syncs a reset segment, with the hard state in its
    BASE record, only once the store durably holds the snapshot it starts
    from, and deletes older segments only after that. So a reset segment whose
    BASE record is whole supersedes every segment before it: replay starts
    there, and whatever lies before it (gaps left by deletions a crash
    interrupted, even damage) is never read, then deleted.
    """
    for position in range(len(segments) - 1, 0, -1):
        if _starts_with_reset(segments[position][1]):
            return position
    return 0


def _list_segments(directory: Path) -> list[tuple[int, Path]]:
    """The segment files, oldest first."""
    segments = []
    for path in directory.iterdir():
        match = SEGMENT_PATTERN.match(path.name)
        if match:
            segments.append((int(match.group(1)), path))
    segments.sort()
    return segments


def _check_contiguous(segments: list[tuple[int, Path]]) -> None:
    for (previous, _), (sequence, path) in zip(segments, segments[1:]):
        if sequence != previous + 1:
            raise WalCorruption(f"write-ahead log segment {segment_name(previous + 1)} is missing "
                                f"(found {path.name} after {segment_name(previous)})")


def _replay_file(path: Path, sequence: int, is_last: bool, state: _ReplayState,
                 first_segment: bool) -> tuple[_SegmentInfo, int]:
    """Replay one file; returns its info (size = valid bytes) and the bytes past the valid end."""
    segment = _SegmentInfo(sequence, path, 0, 0, state.last_index, state.last_view, state.last_index, None)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        valid_end = 0
        if size:
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                valid_end = _scan_segment(path, data, size, is_last, state, segment, first_segment)
    if valid_end == 0 and not is_last:
        raise WalCorruption(f"write-ahead log {path.name} is empty but is not the last segment")
    segment.size_bytes = valid_end
    return segment, size - valid_end
