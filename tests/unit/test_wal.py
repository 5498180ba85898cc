"""Unit tests for tokenvault.core.wal: recovery, truncation, base resets, segments, damage handling."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import msgpack
import pytest

from protocol import Entry, EntryKind, HardState
from tokenvault.core import wal as wal_module
from tokenvault.core.wal import (
    HEADER_BYTES,
    MAX_RECORD_PAYLOAD_BYTES,
    RecordType,
    WalCorruption,
    WalFatal,
    WriteAheadLog,
    encode_record,
    segment_name,
)


def entry(index: int, view: int = 1, payload: bytes | None = None) -> Entry:
    if payload is None:
        payload = f"command-{index}".encode()
    return Entry(index, view, EntryKind.COMMAND, payload)


def segment_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.wal"))


def reopen(directory: Path, **options):
    log, recovered = WriteAheadLog.open(directory, **options)
    log.close()
    return recovered


def write_entries(directory: Path, count: int, *, view: int = 1, **options) -> None:
    log, _ = WriteAheadLog.open(directory, **options)
    for index in range(1, count + 1):
        log.append(truncate_from=None, entries=[entry(index, view)], hard_state=HardState(view, "n1", index - 1))
        log.sync()
    log.close()


def test_fresh_directory_recovers_an_empty_log(tmp_path):
    log, recovered = WriteAheadLog.open(tmp_path / "wal")
    log.close()
    assert recovered.entries == () and recovered.hard_state is None
    assert (recovered.base_index, recovered.base_view, recovered.truncated_tail_bytes) == (0, 0, 0)


def test_entries_and_hard_state_survive_reopen(tmp_path):
    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory)
    log.append(truncate_from=None, entries=[entry(1), entry(2)], hard_state=HardState(1, "n2", 0))
    log.append(truncate_from=None, entries=[Entry(3, 1, EntryKind.NOOP, b"")], hard_state=HardState(1, "n2", 2))
    log.sync()
    log.close()
    recovered = reopen(directory)
    assert recovered.entries == (entry(1), entry(2), Entry(3, 1, EntryKind.NOOP, b""))
    assert recovered.hard_state == HardState(1, "n2", 2)
    assert recovered.truncated_tail_bytes == 0
    # BASE, three entries and two hard states.
    assert recovered.records_replayed == 1 + 3 + 2


def test_every_entry_kind_survives_reopen_and_an_unknown_kind_is_corruption(tmp_path):
    """A configuration entry is logged like any other (issue 12: a node whose WAL held one refused to start)."""
    directory = tmp_path / "wal"
    kinds = [Entry(number, 1, kind, b"payload-%d" % number) for number, kind in enumerate(EntryKind, start=1)]
    log, _ = WriteAheadLog.open(directory)
    log.append(truncate_from=None, entries=kinds, hard_state=HardState(1, "n1", 0))
    log.sync()
    log.close()
    assert EntryKind.CONFIG in {recovered.kind for recovered in reopen(directory).entries}
    assert reopen(directory).entries == tuple(kinds)
    path = segment_paths(directory)[-1]
    with path.open("ab") as segment:
        segment.write(encode_record(RecordType.ENTRY, msgpack.packb([len(kinds) + 1, 1, 99, b"x"])))
        segment.write(encode_record(RecordType.ENTRY, msgpack.packb([len(kinds) + 2, 1, 1, b"y"])))
    with pytest.raises(WalCorruption):
        reopen(directory)


def test_group_commit_writes_once_and_fsyncs_once(tmp_path, monkeypatch):
    log, _ = WriteAheadLog.open(tmp_path / "wal")
    calls = {"write": 0, "fdatasync": 0}
    real_write, real_fdatasync = os.write, os.fdatasync

    def counting_write(descriptor, data):
        calls["write"] += 1
        return real_write(descriptor, data)

    def counting_fdatasync(descriptor):
        calls["fdatasync"] += 1
        return real_fdatasync(descriptor)

    monkeypatch.setattr(wal_module.os, "write", counting_write)
    monkeypatch.setattr(wal_module.os, "fdatasync", counting_fdatasync)
    for index in range(1, 51):
        log.append(truncate_from=None, entries=[entry(index)], hard_state=HardState(1, None, index))
    assert calls == {"write": 0, "fdatasync": 0}
    log.sync()
    assert calls == {"write": 1, "fdatasync": 1}
    log.sync()  # nothing buffered: no write, no fsync
    assert calls == {"write": 1, "fdatasync": 1}
    monkeypatch.undo()
    log.close()


def test_unsynced_records_are_not_on_disk(tmp_path):
    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory)
    log.append(truncate_from=None, entries=[entry(1)], hard_state=None)
    log.sync()
    log.append(truncate_from=None, entries=[entry(2)], hard_state=None)
    size_before_close = segment_paths(directory)[0].stat().st_size
    log.close()  # close syncs what is buffered
    assert segment_paths(directory)[0].stat().st_size > size_before_close
    assert [e.index for e in reopen(directory).entries] == [1, 2]


def test_truncate_record_replaces_the_suffix(tmp_path):
    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory)
    log.append(truncate_from=None, entries=[entry(i, 1) for i in range(1, 6)], hard_state=None)
    log.sync()
    log.append(truncate_from=3, entries=[entry(3, 2, b"new-3"), entry(4, 2, b"new-4")], hard_state=None)
    log.sync()
    assert log.last_index == 4
    log.close()
    recovered = reopen(directory)
    assert recovered.entries == (entry(1, 1), entry(2, 1), entry(3, 2, b"new-3"), entry(4, 2, b"new-4"))


def test_truncate_without_new_entries(tmp_path):
    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory)
    log.append(truncate_from=None, entries=[entry(i) for i in range(1, 4)], hard_state=None)
    log.append(truncate_from=2, entries=[], hard_state=None)
    log.close()
    assert reopen(directory).entries == (entry(1),)


@pytest.mark.parametrize("truncate_from, entries", [
    (0, []),           # at or below the base
    (5, []),           # beyond last index + 1
    (None, [entry(4)]),  # a gap
    (None, [entry(2)]),  # a repeat without truncation
    (2, [entry(2, view=0)]),  # a view lower than the previous entry's
])
def test_append_refuses_entries_that_do_not_continue_the_log(tmp_path, truncate_from, entries):
    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory)
    log.append(truncate_from=None, entries=[entry(1), entry(2)], hard_state=None)
    with pytest.raises(ValueError):
        log.append(truncate_from=truncate_from, entries=entries, hard_state=None)
    # Nothing of the refused batch was buffered.
    log.append(truncate_from=None, entries=[entry(3)], hard_state=None)
    log.close()
    assert [e.index for e in reopen(directory).entries] == [1, 2, 3]


def test_append_refuses_bad_hard_state(tmp_path):
    log, _ = WriteAheadLog.open(tmp_path / "wal")
    with pytest.raises(ValueError):
        log.append(truncate_from=None, entries=[], hard_state=HardState(-1, None, 0))
    with pytest.raises(ValueError):
        log.append(truncate_from=None, entries=[], hard_state=HardState(1, "x" * 300, 0))
    log.close()


def test_reset_base_replaces_the_log_and_deletes_older_segments(tmp_path):
    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory, max_segment_bytes=200)
    for index in range(1, 11):
        log.append(truncate_from=None, entries=[entry(index)], hard_state=HardState(1, None, index))
        log.sync()
    assert len(segment_paths(directory)) > 1
    log.reset_base(100, 3)
    assert len(segment_paths(directory)) == 1
    assert log.last_index == 100
    log.append(truncate_from=None, entries=[entry(101, 3)], hard_state=None)
    log.sync()
    log.close()
    recovered = reopen(directory)
    assert (recovered.base_index, recovered.base_view) == (100, 3)
    assert recovered.entries == (entry(101, 3),)
    assert recovered.hard_state == HardState(1, None, 10)


def test_interrupted_reset_is_completed_on_open(tmp_path):
    """A reset segment written before the old ones were deleted wins over them."""
    directory = tmp_path / "wal"
    write_entries(directory, 5)
    reset_segment = encode_record(RecordType.BASE, msgpack.packb((50, 2, True, None)))
    (directory / segment_name(2)).write_bytes(reset_segment)
    log, recovered = WriteAheadLog.open(directory)
    log.close()
    assert (recovered.base_index, recovered.base_view, recovered.entries) == (50, 2, ())
    assert [path.name for path in segment_paths(directory)] == [segment_name(2)]


def test_segments_roll_over_and_each_starts_with_base_holding_the_hard_state(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 40, max_segment_bytes=256)
    paths = segment_paths(directory)
    assert len(paths) >= 5
    for path in paths:
        data = path.read_bytes()
        assert len(data) <= 256
        length, _, record_type = struct.unpack_from(">IIB", data, 0)
        assert record_type == RecordType.BASE
        base = msgpack.unpackb(data[HEADER_BYTES:HEADER_BYTES + length])
        if path != paths[0]:
            assert base[3] is not None and base[3][1] == "n1"
    recovered = reopen(directory, max_segment_bytes=256)
    assert [e.index for e in recovered.entries] == list(range(1, 41))
    assert recovered.hard_state == HardState(1, "n1", 39)


def test_a_batch_larger_than_a_segment_is_written_whole(tmp_path):
    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory, max_segment_bytes=64)
    log.append(truncate_from=None, entries=[entry(i, payload=b"p" * 100) for i in range(1, 4)], hard_state=None)
    log.sync()
    log.append(truncate_from=None, entries=[entry(4)], hard_state=None)
    log.sync()
    log.close()
    assert len(segment_paths(directory)) == 2
    assert [e.index for e in reopen(directory).entries] == [1, 2, 3, 4]


def test_release_deletes_covered_segments_but_never_the_active_one(tmp_path):
    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory, max_segment_bytes=256)
    for index in range(1, 41):
        log.append(truncate_from=None, entries=[entry(index)], hard_state=HardState(1, None, index))
        log.sync()
    total_segments = log.segment_count
    log.release(0)
    assert log.segment_count == total_segments
    log.release(20)
    kept = log.segment_count
    assert 1 < kept < total_segments
    log.release(1000)
    assert log.segment_count == 1 and len(segment_paths(directory)) == 1
    log.append(truncate_from=None, entries=[entry(41)], hard_state=None)
    log.close()
    recovered = reopen(directory)
    assert recovered.entries[-1] == entry(41)
    assert recovered.base_index >= 20
    assert [e.index for e in recovered.entries] == list(range(recovered.base_index + 1, 42))
    assert recovered.hard_state == HardState(1, None, 40)


def test_release_deletes_the_files_without_holding_the_log_so_appends_and_syncs_go_on(tmp_path, monkeypatch):
    import threading
    from pathlib import Path

    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory, max_segment_bytes=256)
    for index in range(1, 21):
        log.append(truncate_from=None, entries=[entry(index)], hard_state=HardState(1, None, index))
        log.sync()
    before = len(segment_paths(directory))
    deleting, go_on = threading.Event(), threading.Event()
    real_unlink = Path.unlink

    def slow_unlink(path, *args, **kwargs):
        deleting.set()
        assert go_on.wait(10), "the append and sync did not finish while a file was being deleted"
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", slow_unlink)
    releasing = threading.Thread(target=log.release, args=(10,))
    releasing.start()
    assert deleting.wait(10)
    # The release is inside a file deletion: the log takes and syncs an entry meanwhile.
    log.append(truncate_from=None, entries=[entry(21)], hard_state=HardState(1, None, 21))
    log.sync()
    go_on.set()
    releasing.join(10)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert len(segment_paths(directory)) < before
    log.close()
    recovered = reopen(directory)
    assert recovered.entries[-1] == entry(21) and 0 < recovered.base_index <= 10


def test_release_keeps_segments_a_later_truncation_reaches_into(tmp_path):
    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory, max_segment_bytes=200)
    for index in range(1, 11):
        log.append(truncate_from=None, entries=[entry(index, 1)], hard_state=None)
        log.sync()
    # A new primary replaced entries 5.. in a later segment.
    log.append(truncate_from=5, entries=[entry(i, 2, b"v2") for i in range(5, 8)], hard_state=None)
    log.sync()
    for index in range(8, 12):
        log.append(truncate_from=None, entries=[entry(index, 2, b"v2")], hard_state=None)
        log.sync()
    log.release(11)
    log.close()
    recovered = reopen(directory)
    expected = [entry(i, 1) for i in range(1, 5)] + [entry(i, 2, b"v2") for i in range(5, 12)]
    assert list(recovered.entries) == [e for e in expected if e.index > recovered.base_index]
    assert recovered.entries[-1] == entry(11, 2, b"v2")


def test_torn_tail_is_cut_and_reported(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 3)
    path = segment_paths(directory)[-1]
    full_size = path.stat().st_size
    with open(path, "r+b") as file:
        file.truncate(full_size - 3)
    log, recovered = WriteAheadLog.open(directory)
    # The last sync wrote entry 3 then its hard state; the hard state record is torn.
    assert [e.index for e in recovered.entries] == [1, 2, 3]
    assert recovered.hard_state == HardState(1, "n1", 1)
    assert recovered.truncated_tail_bytes > 0
    assert path.stat().st_size == full_size - 3 - recovered.truncated_tail_bytes
    log.append(truncate_from=None, entries=[entry(4)], hard_state=None)
    log.close()
    recovered_again = reopen(directory)
    assert [e.index for e in recovered_again.entries] == [1, 2, 3, 4]
    assert recovered_again.truncated_tail_bytes == 0


def test_zero_filled_tail_is_cut(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 2)
    path = segment_paths(directory)[-1]
    with open(path, "ab") as file:
        file.write(b"\0" * 4096)
    recovered = reopen(directory)
    assert [e.index for e in recovered.entries] == [1, 2]
    assert recovered.truncated_tail_bytes == 4096


def test_half_written_record_running_into_zero_sectors_is_cut(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 1)
    path = segment_paths(directory)[-1]
    before = path.read_bytes()
    record = encode_record(RecordType.ENTRY, msgpack.packb((2, 1, 1, b"z" * 2000)))
    padding = (-len(before)) % 512
    # The first sector of the record reached the disk, the rest stayed zeros.
    written = record[:512 + padding]
    path.write_bytes(before + written + b"\0" * (len(record) - len(written)))
    recovered = reopen(directory)
    assert [e.index for e in recovered.entries] == [1]
    assert recovered.truncated_tail_bytes == len(record)


def test_crc_mismatch_before_the_tail_is_refused_with_file_and_offset(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 5)
    path = segment_paths(directory)[-1]
    data = bytearray(path.read_bytes())
    base_length = struct.unpack_from(">I", data, 0)[0]
    first_entry_offset = HEADER_BYTES + base_length
    data[first_entry_offset + HEADER_BYTES + 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorruption) as raised:
        WriteAheadLog.open(directory)
    assert path.name in str(raised.value)
    assert f"offset {first_entry_offset}" in str(raised.value)


def test_corruption_of_the_last_complete_record_is_refused(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 3)
    path = segment_paths(directory)[-1]
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x40  # inside the last hard state record, which is complete
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorruption):
        WriteAheadLog.open(directory)


def test_single_bit_flip_in_a_length_field_is_corruption_not_a_torn_tail(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 3)
    path = segment_paths(directory)[-1]
    data = bytearray(path.read_bytes())
    # Find the last ENTRY record and make its length point past the end of the file.
    offset, last_entry_offset = 0, None
    while offset < len(data):
        length, _, record_type = struct.unpack_from(">IIB", data, offset)
        if record_type == RecordType.ENTRY:
            last_entry_offset = offset
        offset += HEADER_BYTES + length
    data[last_entry_offset + 2] ^= 0x01  # +256 bytes: past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorruption):
        WriteAheadLog.open(directory)


def test_damage_in_an_older_segment_is_refused_even_at_its_end(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 20, max_segment_bytes=256)
    first = segment_paths(directory)[0]
    with open(first, "r+b") as file:
        file.truncate(first.stat().st_size - 1)
    with pytest.raises(WalCorruption):
        WriteAheadLog.open(directory, max_segment_bytes=256)


def test_a_missing_middle_segment_is_refused(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 30, max_segment_bytes=256)
    paths = segment_paths(directory)
    assert len(paths) >= 3
    paths[1].unlink()
    with pytest.raises(WalCorruption, match="missing"):
        WriteAheadLog.open(directory)


def test_a_segment_that_does_not_continue_the_log_is_refused(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 3)
    foreign = encode_record(RecordType.BASE, msgpack.packb((77, 1, False, None)))
    (directory / segment_name(2)).write_bytes(foreign)
    with pytest.raises(WalCorruption, match="continue"):
        WriteAheadLog.open(directory)


def test_record_length_above_the_maximum_is_corruption(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 1)
    path = segment_paths(directory)[-1]
    header = struct.pack(">IIB", MAX_RECORD_PAYLOAD_BYTES + 1, 0, RecordType.ENTRY)
    path.write_bytes(path.read_bytes() + header + b"x" * 20)
    with pytest.raises(WalCorruption, match="exceeds"):
        WriteAheadLog.open(directory)


def test_valid_crc_with_malformed_payload_is_corruption(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 1)
    path = segment_paths(directory)[-1]
    bad = encode_record(RecordType.ENTRY, msgpack.packb(("not", "an", "entry", 1)))
    path.write_bytes(path.read_bytes() + bad)
    with pytest.raises(WalCorruption, match="invalid record"):
        WriteAheadLog.open(directory)


def test_empty_last_segment_from_an_interrupted_rollover_is_removed(tmp_path):
    directory = tmp_path / "wal"
    write_entries(directory, 3)
    (directory / segment_name(2)).write_bytes(b"")
    log, recovered = WriteAheadLog.open(directory)
    assert [e.index for e in recovered.entries] == [1, 2, 3]
    assert [path.name for path in segment_paths(directory)] == [segment_name(1)]
    log.append(truncate_from=None, entries=[entry(4)], hard_state=None)
    log.close()
    assert [e.index for e in reopen(directory).entries] == [1, 2, 3, 4]


def test_a_second_process_cannot_open_the_same_directory(tmp_path):
    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory)
    with pytest.raises(WalFatal, match="in use"):
        WriteAheadLog.open(directory)
    log.close()
    reopen(directory)


def test_fsync_failure_is_fatal_and_poisons_the_log(tmp_path, monkeypatch):
    log, _ = WriteAheadLog.open(tmp_path / "wal")
    log.append(truncate_from=None, entries=[entry(1)], hard_state=None)

    def failing_fdatasync(descriptor):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(wal_module.os, "fdatasync", failing_fdatasync)
    with pytest.raises(WalFatal):
        log.sync()
    monkeypatch.undo()
    with pytest.raises(WalFatal):
        log.append(truncate_from=None, entries=[entry(2)], hard_state=None)
    with pytest.raises(WalFatal):
        log.sync()
    log.close()


def test_roll_starts_a_segment_so_that_release_can_delete_an_entry_the_active_one_held(tmp_path):
    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory)  # 64 MiB segments: everything stays in the active one
    for index in range(1, 6):
        log.append(truncate_from=None, entries=[entry(index, payload=b"secret-%d" % index)], hard_state=None)
    log.sync()
    log.release(5)
    assert log.first_held_index == 1  # the active segment is never deleted
    assert log.roll(3) is True
    assert log.roll(3) is False  # the new active segment starts after entry 5 and holds nothing
    log.release(5)
    assert log.first_held_index == 6
    assert not any(b"secret-" in path.read_bytes() for path in segment_paths(directory))
    log.append(truncate_from=None, entries=[entry(6)], hard_state=None)
    log.close()
    recovered = reopen(directory)
    assert (recovered.base_index, [e.index for e in recovered.entries]) == (5, [6])


def test_a_torn_record_whose_header_straddles_a_sector_boundary_is_cut(tmp_path):
    """A crash mid-write left only the first 4 bytes of a record's header (the end of a sector) on disk;
    the sectors after stayed zeros, so its type byte reads 0. That is a torn tail, not corruption."""
    directory = tmp_path / "wal"
    write_entries(directory, 1)
    path = segment_paths(directory)[-1]
    before = path.read_bytes()
    # A synced record 2, sized so that the next record's header starts 4 bytes before a sector boundary.
    for size in range(1, 2000):
        record2 = encode_record(RecordType.ENTRY, msgpack.packb((2, 1, 1, b"p" * size)))
        if (len(before) + len(record2)) % 512 == 508:
            break
    record3 = encode_record(RecordType.ENTRY, msgpack.packb((3, 1, 1, b"q" * 2000)))
    path.write_bytes(before + record2 + record3[:4] + b"\0" * (len(record3) - 4))
    recovered = reopen(directory)
    assert [e.index for e in recovered.entries] == [1, 2]
    assert recovered.truncated_tail_bytes == len(record3)


def _blocking_unlink(monkeypatch, blocked_thread_name: str):
    """Make Path.unlink on the thread named ``blocked_thread_name`` wait until the returned event is set;
    the other event is set once it started waiting. Returns (started, go_on)."""
    import threading

    started, go_on = threading.Event(), threading.Event()
    real_unlink = Path.unlink

    def unlink(path, *args, **kwargs):
        if threading.current_thread().name == blocked_thread_name:
            started.set()
            assert go_on.wait(10)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    return started, go_on


def _copy_segments(directory: Path, into: Path) -> Path:
    """The directory as a crash at this moment leaves it."""
    import shutil

    into.mkdir()
    for path in segment_paths(directory):
        shutil.copy(path, into / path.name)
    return into


def test_a_crash_while_release_and_reset_base_both_delete_segments_opens_at_the_reset(tmp_path, monkeypatch):
    """release() unlinks its segments after letting go of the log's lock (the node's disk thread);
    reset_base() (a snapshot install, on the driver) deletes the segments the log still lists meanwhile.
    A crash then leaves the oldest segments, a gap, and the reset segment: the log opens at the reset
    (whose base supersedes every older segment) and deletes what lies before it."""
    import threading

    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory, max_segment_bytes=256)
    for index in range(1, 31):
        log.append(truncate_from=None, entries=[entry(index)], hard_state=HardState(1, "n1", index - 1))
        log.sync()
    assert log.segment_count >= 5
    started, go_on = _blocking_unlink(monkeypatch, "compaction")
    releaser = threading.Thread(target=log.release, args=(10,), name="compaction")
    releaser.start()
    assert started.wait(10)
    log.reset_base(40, 2)
    crashed = _copy_segments(directory, tmp_path / "crashed")
    go_on.set()
    releaser.join(10)
    log.close()
    names = [path.name for path in segment_paths(crashed)]
    # Segment 1 (release's file, not deleted yet), a gap, the reset segment.
    assert names[0] == segment_name(1) and names[1] != segment_name(2), names
    recovered = reopen(crashed)
    assert (recovered.base_index, recovered.base_view, recovered.entries) == (40, 2, ())
    assert recovered.hard_state == HardState(1, "n1", 29)
    assert [path.name for path in segment_paths(crashed)] == [names[-1]]
    assert (reopen(directory).base_index, reopen(crashed).base_index) == (40, 40)


def test_a_gap_after_the_newest_reset_segment_is_still_refused(tmp_path):
    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory, max_segment_bytes=256)
    log.reset_base(50, 2)
    for index in range(51, 81):
        log.append(truncate_from=None, entries=[entry(index, 2)], hard_state=HardState(2, "n1", index - 1))
        log.sync()
    log.close()
    paths = segment_paths(directory)
    assert len(paths) >= 3
    paths[1].unlink()
    with pytest.raises(WalCorruption, match="missing"):
        WriteAheadLog.open(directory)


def test_segments_before_a_reset_segment_are_ignored_even_when_damaged(tmp_path):
    """Everything before a reset segment is superseded: damage there does not stop the node."""
    directory = tmp_path / "wal"
    write_entries(directory, 30, max_segment_bytes=256)
    paths = segment_paths(directory)
    with open(paths[0], "r+b") as file:
        file.seek(20)
        file.write(b"\xff\xff")
    paths[2].unlink()
    reset = encode_record(RecordType.BASE, msgpack.packb((70, 3, True, (3, "n2", 70))))
    (directory / segment_name(len(paths) + 1)).write_bytes(reset)
    recovered = reopen(directory)
    assert (recovered.base_index, recovered.base_view, recovered.entries) == (70, 3, ())
    assert recovered.hard_state == HardState(3, "n2", 70)
    assert [path.name for path in segment_paths(directory)] == [segment_name(len(paths) + 1)]


def test_a_crash_while_two_releases_delete_segments_leaves_an_oldest_first_prefix_deleted(tmp_path, monkeypatch):
    """The node's compaction (disk thread) and the shredder (its own thread) both call release(). The
    later call waits for the earlier one's deletions, so files always go oldest first: a crash at any
    moment leaves a log that opens with every entry above both released indexes. Appends and syncs
    never wait for the deletions."""
    import threading

    directory = tmp_path / "wal"
    log, _ = WriteAheadLog.open(directory, max_segment_bytes=256)
    for index in range(1, 31):
        log.append(truncate_from=None, entries=[entry(index)], hard_state=HardState(1, "n1", index - 1))
        log.sync()
    assert log.segment_count >= 6
    started, go_on = _blocking_unlink(monkeypatch, "compaction")
    compaction = threading.Thread(target=log.release, args=(6,), name="compaction")  # segment 1
    compaction.start()
    assert started.wait(10)
    shredder = threading.Thread(target=log.release, args=(22,), name="shredder")  # the segments after it
    shredder.start()
    shredder.join(0.3)
    log.append(truncate_from=None, entries=[entry(31)], hard_state=HardState(1, "n1", 30))
    log.sync()
    crashed = _copy_segments(directory, tmp_path / "crashed")
    go_on.set()
    compaction.join(10)
    shredder.join(10)
    log.close()
    recovered = reopen(crashed)
    assert [e.index for e in recovered.entries if e.index > 22] == list(range(23, 32))
    after = reopen(directory)
    assert after.base_index >= 6 and [e.index for e in after.entries if e.index > 22] == list(range(23, 32))


def test_a_length_field_damaged_in_the_middle_of_the_last_segment_is_refused_not_cut(tmp_path):
    """Two flipped bits make a synced record's length run past the end of the file. Whole valid records
    follow it, and a torn write is always the last thing in the file: damage, refused with file and
    offset, never silently cut with the records after it."""
    directory = tmp_path / "wal"
    write_entries(directory, 5)
    path = segment_paths(directory)[-1]
    data = bytearray(path.read_bytes())
    offset, entry_offsets = 0, []
    while offset < len(data):
        length, _, record_type = struct.unpack_from(">IIB", data, offset)
        if record_type == RecordType.ENTRY:
            entry_offsets.append(offset)
        offset += HEADER_BYTES + length
    data[entry_offsets[1] + 1] ^= 0x30  # entry 2's length grows by 3 MiB: past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorruption) as raised:
        WriteAheadLog.open(directory)
    assert path.name in str(raised.value) and f"offset {entry_offsets[1]}" in str(raised.value)
