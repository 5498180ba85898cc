"""The snapshot stream: what a source reads is what a stager accepts, and nothing else is."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tokenvault.core.snapshots import (MAGIC, MAX_SHRED_KEY_BYTES, MAX_SHRED_KEYS, Manifest, PendingShred,
                                      SnapshotSource, SnapshotStager, SnapshotStreamError, stage_file,
                                      take_checkpoint)


class FakeStore:
    """Writes a few files of random bytes as its checkpoint, as RocksDB's Checkpoint would."""

    def __init__(self, sizes: list[int], index: int = 42, view: int = 3) -> None:
        self.sizes, self.index, self.view = sizes, index, view

    def create_checkpoint(self, directory: Path) -> tuple[int, int]:
        directory.mkdir()
        rng = random.Random(len(self.sizes))
        for number, size in enumerate(self.sizes):
            (directory / f"{number:06d}.sst").write_bytes(rng.randbytes(size))
        (directory / "CURRENT").write_bytes(b"MANIFEST-000001\n")
        return self.index, self.view


def make_source(tmp_path: Path, sizes: list[int]) -> SnapshotSource:
    return SnapshotSource.from_checkpoint(*take_checkpoint(FakeStore(sizes), tmp_path / "work"), PendingShred(None))


def stream_of(source: SnapshotSource) -> bytes:
    return source.read(0, source.total_bytes)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, 1 << 20])
def test_a_stream_staged_in_chunks_of_any_size_gives_back_the_same_files(tmp_path: Path, chunk_bytes: int) -> None:
    source = make_source(tmp_path, [0, 10, 5000, 70_000])
    stager = SnapshotStager(tmp_path / "stage", expected_total=source.total_bytes)
    offset = 0
    while offset < source.total_bytes:
        data = source.read(offset, chunk_bytes)
        stager.write(offset, data)
        offset += len(data)
    staged = stager.finish()
    assert (staged.index, staged.view, staged.total_bytes) == (42, 3, source.total_bytes)
    for path in source.directory.iterdir():
        assert (staged.checkpoint_dir / path.name).read_bytes() == path.read_bytes()
    source.close()
    assert not source.directory.exists(), "closing a source deletes its checkpoint"


def test_reads_at_any_offset_agree_with_the_whole_stream(tmp_path: Path) -> None:
    source = make_source(tmp_path, [3, 100, 0, 2000])
    whole = stream_of(source)
    assert whole.startswith(MAGIC) and len(whole) == source.total_bytes
    rng = random.Random(5)
    for _ in range(200):
        offset = rng.randrange(source.total_bytes + 1)
        length = rng.randrange(300)
        assert source.read(offset, length) == whole[offset:offset + length]


def test_a_truncated_stream_is_refused(tmp_path: Path) -> None:
    source = make_source(tmp_path, [100, 200])
    whole = stream_of(source)
    for cut in (5, len(whole) // 2, len(whole) - 1):
        stager = SnapshotStager(tmp_path / f"stage-{cut}")
        stager.write(0, whole[:cut])
        with pytest.raises(SnapshotStreamError, match="ended early"):
            stager.finish()
        stager.discard()
        assert not (tmp_path / f"stage-{cut}").exists()


def test_every_flipped_byte_is_caught(tmp_path: Path) -> None:
    source = make_source(tmp_path, [50, 60])
    whole = stream_of(source)
    for position in range(0, len(whole), 3):
        altered = bytearray(whole)
        altered[position] ^= 0x40
        path = tmp_path / "altered"
        path.write_bytes(bytes(altered))
        with pytest.raises(SnapshotStreamError):
            stage_file(path, tmp_path / "stage")
        assert not (tmp_path / "stage").exists()


def test_a_stream_with_bytes_past_its_end_or_out_of_order_is_refused(tmp_path: Path) -> None:
    source = make_source(tmp_path, [10])
    whole = stream_of(source)
    stager = SnapshotStager(tmp_path / "stage")
    with pytest.raises(SnapshotStreamError, match="past its end"):
        stager.write(0, whole + b"x")
    stager = SnapshotStager(tmp_path / "stage2")
    with pytest.raises(SnapshotStreamError, match="expected 0"):
        stager.write(5, whole[5:])


def test_a_manifest_that_does_not_add_up_to_the_announced_size_is_refused(tmp_path: Path) -> None:
    source = make_source(tmp_path, [10])
    stager = SnapshotStager(tmp_path / "stage", expected_total=source.total_bytes + 1)
    with pytest.raises(SnapshotStreamError, match="announced size"):
        stager.write(0, stream_of(source))


def test_hostile_headers_are_refused_before_anything_large_is_buffered(tmp_path: Path) -> None:
    cases = {
        b"NOTASNAP" + bytes(4): "bad magic",
        MAGIC + (64 * 1024 * 1024).to_bytes(4, "big"): "length out of range",
        MAGIC + (3).to_bytes(4, "big") + b"\xc1\xc1\xc1": "not valid msgpack",
    }
    for number, (data, message) in enumerate(cases.items()):
        stager = SnapshotStager(tmp_path / f"stage-{number}")
        with pytest.raises(SnapshotStreamError, match=message):
            stager.write(0, data)


@pytest.mark.parametrize("pending", [None, PendingShred(None), PendingShred((b"L1tv1_x", b"Ttv1_x"))],
                         ids=["shredded", "anywhere", "keys"])
def test_the_manifest_says_whether_the_checkpoint_may_hold_rows_not_yet_shredded_and_whose(
        tmp_path: Path, pending: PendingShred | None) -> None:
    source = SnapshotSource.from_checkpoint(*take_checkpoint(FakeStore([10, 20]), tmp_path / "work"), pending)
    stager = SnapshotStager(tmp_path / "stage", expected_total=source.total_bytes)
    stager.write(0, stream_of(source))
    manifest = stager.finish().manifest
    assert manifest.shred_pending is (pending is not None) and manifest.pending == pending


def test_a_manifest_whose_keys_do_not_fit_its_bound_says_rows_may_wait_anywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files come first: keys that would take the manifest past MAX_MANIFEST_BYTES are left out, and the
    manifest then says only that rows may wait (the installing node compacts its whole store)."""
    from tokenvault.core import snapshots

    keys = tuple(sorted(b"T" + bytes([number]) * 200 for number in range(1, 11)))
    fits = SnapshotSource.from_checkpoint(*take_checkpoint(FakeStore([10]), tmp_path / "a"), PendingShred(keys))
    assert fits.manifest.pending == PendingShred(keys)
    monkeypatch.setattr(snapshots, "MAX_MANIFEST_BYTES", len(fits.manifest.encode()) - 1)
    cut = SnapshotSource.from_checkpoint(*take_checkpoint(FakeStore([10]), tmp_path / "b"), PendingShred(keys))
    assert cut.manifest.pending == PendingShred(None)


def test_a_checkpoint_of_more_files_than_a_receiver_decodes_is_refused_at_its_source(tmp_path: Path) -> None:
    """A receiver decodes a manifest of at most MAX_FILES files; the source bounded only the manifest's bytes
    (1 MiB, about 20,000 files), so on the code before a checkpoint of 10,001 files streamed a manifest every
    receiver refused as "not valid msgpack": a backup node that could never catch up by snapshot, and a backup
    file the CLI downloaded, refused and deleted."""
    from tokenvault.core.snapshots import MAX_FILES

    most = SnapshotSource.from_checkpoint(*take_checkpoint(FakeStore([0] * (MAX_FILES - 1)), tmp_path / "a"), None)
    assert len(Manifest.decode(most.manifest.encode()).files) == MAX_FILES  # CURRENT too
    most.close()
    work = tmp_path / "b"
    with pytest.raises(ValueError, match=f"checkpoint has {MAX_FILES + 1} files, more than the {MAX_FILES}"):
        SnapshotSource.from_checkpoint(*take_checkpoint(FakeStore([0] * MAX_FILES), work), None)
    assert list(work.iterdir()) == []  # the checkpoint is removed


def test_a_manifest_without_shred_pending_counts_as_pending_and_a_non_boolean_one_is_refused() -> None:
    """A node from before the field sends none: its checkpoint may hold anything, as that node assumed."""
    import msgpack
    manifest = {"format": 1, "index": 1, "view": 1, "created_at_ms": 0, "files": [["a", 1, bytes(32)]]}
    assert Manifest.decode(msgpack.packb(manifest)).shred_pending is True
    for value in (0, 1, "false", None):
        with pytest.raises(SnapshotStreamError, match="shred_pending"):
            Manifest.decode(msgpack.packb({**manifest, "shred_pending": value}))



@pytest.mark.parametrize("field", ["index", "view", "created_at_ms"])
def test_a_manifest_index_view_or_time_outside_0_to_2_63_minus_1_is_refused(field: str) -> None:
    """msgpack holds integers up to 2**64 - 1; the replication log holds indexes and views up to 2**63 - 1. A
    manifest past that passed, and a restore from it failed in the log with a traceback (checked on the code
    before)."""
    import msgpack
    manifest = {"format": 1, "index": 1, "view": 1, "created_at_ms": 0, "files": [["a", 1, bytes(32)]]}
    assert getattr(Manifest.decode(msgpack.packb({**manifest, field: 2**63 - 1})), field) == 2**63 - 1
    for number in (2**63, 2**64 - 1, -1):
        with pytest.raises(SnapshotStreamError, match="index, view or time is not an integer from 0 to "
                                                      "9223372036854775807"):
            Manifest.decode(msgpack.packb({**manifest, field: number}))


@pytest.mark.parametrize(("keys", "pending", "message"), [
    ([b"Ta"] * 2, False, "nothing is pending"),
    ("Ta", True, "not a list"),
    ([b"Ta"] * (MAX_SHRED_KEYS + 1), True, "not a list of at most"),
    ([b"Ta", "Tb"], True, "malformed shred key"),
    ([b""], True, "malformed shred key"),
    ([b"T" * (MAX_SHRED_KEY_BYTES + 1)], True, "not valid msgpack"),  # past the decoder's own bound
])
def test_a_manifest_with_malformed_shred_keys_is_refused(keys: object, pending: bool, message: str) -> None:
    import msgpack
    manifest = {"format": 1, "index": 1, "view": 1, "created_at_ms": 0, "files": [["a", 1, bytes(32)]],
                "shred_pending": pending, "shred_keys": keys}
    with pytest.raises(SnapshotStreamError, match=message):
        Manifest.decode(msgpack.packb(manifest))


def test_a_manifests_shred_keys_are_kept_sorted_and_once_each() -> None:
    import msgpack
    manifest = {"format": 1, "index": 1, "view": 1, "created_at_ms": 0, "files": [["a", 1, bytes(32)]],
                "shred_pending": True, "shred_keys": [b"Tb", b"Ta", b"Tb"]}
    assert Manifest.decode(msgpack.packb(manifest)).pending == PendingShred((b"Ta", b"Tb"))


def test_a_file_name_with_a_path_in_it_is_refused(tmp_path: Path) -> None:
    import msgpack
    manifest = msgpack.packb({"format": 1, "index": 1, "view": 1, "created_at_ms": 0,
                              "files": [["../escape", 1, bytes(32)]]})
    stager = SnapshotStager(tmp_path / "stage")
    with pytest.raises(SnapshotStreamError, match="plain name"):
        stager.write(0, MAGIC + len(manifest).to_bytes(4, "big") + manifest)
    assert not (tmp_path / "escape").exists()


def test_staging_refuses_a_stream_larger_than_the_free_disk(tmp_path: Path, monkeypatch) -> None:
    import shutil as shutil_module
    source = make_source(tmp_path, [1000])

    class Usage:
        total, used, free = 10_000, 9_900, 100

    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: Usage())
    stager = SnapshotStager(tmp_path / "stage")
    with pytest.raises(SnapshotStreamError, match="disk space"):
        stager.write(0, stream_of(source))
    stager.discard()
    assert os.listdir(tmp_path) == ["work"]
