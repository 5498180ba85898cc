"""Property tests for tokenvault.core.wal: damaged logs recover a valid prefix or refuse to start.

A model replays the same operations record by record, so every state the log
passed through is known. After random batches (with truncations, hard states,
segment rollovers and base resets) one segment file is truncated at any offset
or has any single bit flipped. Reopening must then either raise WalCorruption
or recover exactly one of the model's states, and never one older than the last
sync that finished before the damaged byte. A truncation of the last segment
is an interrupted write and must never be refused.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocol import Entry, EntryKind, HardState
from tokenvault.core.wal import HEADER_BYTES, WalCorruption, WriteAheadLog

# TOKENVAULT_PROP_EXAMPLES raises the example count for a longer soak run.
PROPERTY_SETTINGS = settings(max_examples=int(os.environ.get("TOKENVAULT_PROP_EXAMPLES", "120")), deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LogState = tuple[int, int, tuple[Entry, ...], HardState | None]


@dataclass
class Model:
    """The log as the writer intends it, with every intermediate state recorded."""

    base_index: int = 0
    base_view: int = 0
    entries: list[Entry] = field(default_factory=list)
    hard_state: HardState | None = None
    highest_view: int = 0
    states: list[LogState] = field(default_factory=list)
    # (segment sequence, file size after the sync, index into states) per finished sync
    sync_points: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.base_index

    def record_state(self) -> None:
        self.states.append((self.base_index, self.base_view, tuple(self.entries), self.hard_state))


def active_segment(directory: Path) -> tuple[int, int]:
    path = sorted(directory.glob("segment-*.wal"))[-1]
    return int(path.name[8:24]), path.stat().st_size


def draw_append(data, model: Model) -> dict:
    truncate_from = None
    if model.last_index > model.base_index and data.draw(st.integers(0, 4)) == 0:
        truncate_from = data.draw(st.integers(model.base_index + 1, model.last_index + 1))
    next_index = truncate_from if truncate_from is not None else model.last_index + 1
    entries = []
    for offset in range(data.draw(st.integers(0, 3))):
        model.highest_view += data.draw(st.integers(0, 1))
        kind = data.draw(st.sampled_from([EntryKind.COMMAND, EntryKind.NOOP]))
        payload = data.draw(st.binary(max_size=48)) if kind == EntryKind.COMMAND else b""
        entries.append(Entry(next_index + offset, model.highest_view, kind, payload))
    hard_state = None
    if data.draw(st.booleans()):
        hard_state = HardState(model.highest_view, data.draw(st.sampled_from([None, "n1", "n2"])),
                               data.draw(st.integers(0, next_index + len(entries) - 1)))
    return {"truncate_from": truncate_from, "entries": entries, "hard_state": hard_state}


def apply_to_model(model: Model, truncate_from, entries, hard_state) -> None:
    """Mirror append's record order: truncation, then each entry, then the hard state."""
    if truncate_from is not None:
        del model.entries[truncate_from - model.base_index - 1:]
        model.record_state()
    for new_entry in entries:
        model.entries.append(new_entry)
        model.record_state()
    if hard_state is not None:
        model.hard_state = hard_state
        model.record_state()


def write_history(data, directory: Path, max_segment_bytes: int, allow_reset: bool) -> Model:
    model = Model()
    model.record_state()
    log, _ = WriteAheadLog.open(directory, max_segment_bytes=max_segment_bytes, fsync=False)
    model.sync_points.append((*active_segment(directory), 0))
    for _ in range(data.draw(st.integers(1, 12))):
        if allow_reset and data.draw(st.integers(0, 9)) == 0:
            index = data.draw(st.integers(model.last_index, model.last_index + 20))
            model.highest_view += 1
            log.reset_base(index, model.highest_view)
            model.base_index, model.base_view, model.entries = index, model.highest_view, []
            model.record_state()
        else:
            for _ in range(data.draw(st.integers(1, 3))):
                arguments = draw_append(data, model)
                log.append(**arguments)
                apply_to_model(model, **arguments)
            log.sync()
        model.sync_points.append((*active_segment(directory), len(model.states) - 1))
    log.close()
    return model


def last_state_synced_before(model: Model, sequence: int, offset: int) -> int:
    synced = [state for seq, size, state in model.sync_points if (seq, size) <= (sequence, offset)]
    return synced[-1] if synced else 0


def recover(directory: Path, max_segment_bytes: int) -> LogState | None:
    """The recovered state, or None when the log refused to open with WalCorruption."""
    try:
        log, recovered = WriteAheadLog.open(directory, max_segment_bytes=max_segment_bytes, fsync=False)
    except WalCorruption:
        return None
    log.close()
    return (recovered.base_index, recovered.base_view, recovered.entries, recovered.hard_state)


def check_recovery(model: Model, recovered: LogState | None, earliest_allowed: int, refusal_allowed: bool) -> None:
    if recovered is None:
        assert refusal_allowed, "an interrupted write of the last segment must be recovered, not refused"
        return
    matches = [position for position, state in enumerate(model.states) if state == recovered]
    assert matches, "recovered a state the writer never had"
    assert max(matches) >= earliest_allowed, "lost records that were synced before the damage"


@PROPERTY_SETTINGS
@given(data=st.data(), max_segment_bytes=st.sampled_from([96, 256, 1 << 20]), allow_reset=st.booleans())
def test_truncation_at_any_offset_recovers_everything_synced_before_it(data, max_segment_bytes, allow_reset):
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary) / "wal"
        model = write_history(data, directory, max_segment_bytes, allow_reset)
        paths = sorted(directory.glob("segment-*.wal"))
        path = data.draw(st.sampled_from(paths))
        size = path.stat().st_size
        path_head = path.read_bytes()[:4]
        cut_offset = data.draw(st.integers(0, size - 1))
        with open(path, "r+b") as file:
            file.truncate(cut_offset)
        sequence = int(path.name[8:24])
        recovered = recover(directory, max_segment_bytes)
        # A lone segment whose older neighbours were deleted cannot lose its
        # first (BASE) record: the log before it is gone. That alone may refuse.
        lone_successor = len(paths) == 1 and sequence > 1
        cut_inside_base = cut_offset < HEADER_BYTES + int.from_bytes(path_head[:4], "big")
        check_recovery(model, recovered, last_state_synced_before(model, sequence, cut_offset),
                       refusal_allowed=path != paths[-1] or (lone_successor and cut_inside_base))
        if recovered is not None:
            # The cut is durable: a second open finds the same log and nothing left to cut.
            assert recover(directory, max_segment_bytes) == recovered


@PROPERTY_SETTINGS
@given(data=st.data(), max_segment_bytes=st.sampled_from([96, 256, 1 << 20]), allow_reset=st.booleans())
def test_any_bit_flip_recovers_a_valid_prefix_or_refuses(data, max_segment_bytes, allow_reset):
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary) / "wal"
        model = write_history(data, directory, max_segment_bytes, allow_reset)
        path = data.draw(st.sampled_from(sorted(directory.glob("segment-*.wal"))))
        content = bytearray(path.read_bytes())
        flip_offset = data.draw(st.integers(0, len(content) - 1))
        content[flip_offset] ^= 1 << data.draw(st.integers(0, 7))
        path.write_bytes(bytes(content))
        sequence = int(path.name[8:24])
        recovered = recover(directory, max_segment_bytes)
        check_recovery(model, recovered, last_state_synced_before(model, sequence, flip_offset),
                       refusal_allowed=True)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_undamaged_log_recovers_the_final_state_exactly(data):
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary) / "wal"
        model = write_history(data, directory, data.draw(st.sampled_from([96, 1 << 20])), True)
        recovered = recover(directory, 1 << 20)
        assert recovered == model.states[-1]


def record_offsets(content: bytes) -> list[int]:
    offsets, offset = [], 0
    while offset + HEADER_BYTES <= len(content):
        offsets.append(offset)
        offset += HEADER_BYTES + struct.unpack_from(">I", content, offset)[0]
    return offsets


@PROPERTY_SETTINGS
@given(data=st.data(), max_segment_bytes=st.sampled_from([256, 1 << 20]), allow_reset=st.booleans())
def test_a_damaged_length_field_followed_by_whole_records_is_refused(data, max_segment_bytes, allow_reset):
    """Any damage to the length field of a record of the last segment with whole records after it
    (whatever length it then claims, even one past the end of the file) is refused, never cut as a
    torn tail: the records after it were synced."""
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary) / "wal"
        write_history(data, directory, max_segment_bytes, allow_reset)
        path = sorted(directory.glob("segment-*.wal"))[-1]
        content = bytearray(path.read_bytes())
        offsets = record_offsets(bytes(content))
        assume(len(offsets) >= 2)
        offset = data.draw(st.sampled_from(offsets[:-1]))
        mask = data.draw(st.integers(1, 2**32 - 1))
        length = struct.unpack_from(">I", content, offset)[0]
        struct.pack_into(">I", content, offset, length ^ mask)
        path.write_bytes(bytes(content))
        assert recover(directory, max_segment_bytes) is None


@PROPERTY_SETTINGS
@given(data=st.data(), synced=st.lists(st.integers(0, 1500), min_size=1, max_size=4),
       last=st.lists(st.integers(0, 1500), min_size=1, max_size=6))
def test_a_last_write_whose_sectors_from_any_boundary_on_stayed_zeros_is_cut(data, synced, last):
    """A crash inside the last write: its sectors up to some boundary reached the disk, the later ones
    stayed zeros (and the file size may stop anywhere after the boundary). Whatever record or header
    the boundary cuts, the log opens with everything synced before that write and a prefix of it."""
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary) / "wal"
        log, _ = WriteAheadLog.open(directory, fsync=False)
        entries = [Entry(index, 1, EntryKind.COMMAND, bytes([index % 251 + 1]) * size)
                   for index, size in enumerate(synced + last + [600], start=1)]
        log.append(truncate_from=None, entries=entries[:len(synced)], hard_state=HardState(1, "n1", 0))
        log.sync()
        path = sorted(directory.glob("segment-*.wal"))[-1]
        before = path.stat().st_size
        log.append(truncate_from=None, entries=entries[len(synced):], hard_state=HardState(1, "n1", len(synced)))
        log.close()
        content = path.read_bytes()
        boundary = data.draw(st.sampled_from(range(-(-(before + 1) // 512) * 512, len(content), 512)))
        torn_size = data.draw(st.integers(boundary, len(content)))
        path.write_bytes(content[:boundary] + b"\0" * (torn_size - boundary))
        recovered = recover(directory, 1 << 20)
        assert recovered is not None, "a torn last write must be cut, not refused"
        base_index, _, recovered_entries, _ = recovered
        assert base_index == 0 and recovered_entries == tuple(entries[:len(recovered_entries)])
        assert len(recovered_entries) >= len(synced)
