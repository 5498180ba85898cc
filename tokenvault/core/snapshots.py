"""The snapshot stream: a store checkpoint as one byte stream, read from files and staged to files.

The same stream ships a store to a backup that fell behind the primary's
compacted log, and is the file ``tokenvault admin backup`` writes. Layout::

    magic  b"TVSNAP1\\n"                                   8 bytes
    length of the manifest, big-endian                    4 bytes
    manifest (msgpack map)                                ``length`` bytes
        format: 1, index, view, created_at_ms (each 0..2**63 - 1, as the replication log allows),
        files: [[name, size, sha256 digest], ...],
        shred_pending: whether the checkpoint may hold rows deleted (or an epoch secret destroyed) at
            or below ``index`` and not yet shredded by its source (absent, as from a node before it: true)
        shred_keys: with shred_pending, the store keys of those rows when its source knew them all and
            they are at most MAX_SHRED_KEYS (absent: they may be anywhere in its key space)
    the files' bytes, whole and in manifest order
    trailer: sha256(every file's bytes in order, then the manifest bytes)   32 bytes

Why this shape: the sender never holds more than one chunk in memory (it reads
``offset, length`` from the checkpoint's files, which RocksDB never changes),
and the receiver writes each file as its bytes arrive, hashing as it goes, so
it holds no more than one chunk either. The per-file digests locate damage; the
trailer covers every byte, the manifest included. (Chunks in flight carry a
CRC-32 of their own in the replication message.)

Every byte of a stream is hostile until verified: the manifest is bounded
before it is buffered, file names are plain names (no paths), sizes add up to
what was announced, and a stream that ends early, runs long or differs from
its digests raises SnapshotRejected with a message that names the problem,
never a value.

Blocking functions and methods (take_checkpoint, from_checkpoint, read, write, finish) are meant for a
worker thread; ``create_source`` runs them there and reads the node's shredder on the loop around them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import msgpack

from protocol.codec import MAX_INTEGER
from tokenvault.core.store_layout import SnapshotRejected
from tokenvault.smallfiles import fsync_directory

MAGIC = b"TVSNAP1\n"
FORMAT_VERSION = 1
LENGTH_BYTES = 4
DIGEST_BYTES = 32
# A manifest lists one line per checkpoint file: RocksDB keeps a few hundred SST
# files at 50 M tokens, so 1 MiB leaves room for about 10,000 files.
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_FILES = 10_000
# A manifest lists the keys of the rows its checkpoint may hold deleted and not yet shredded, up to this
# many (a deleted token leaves two, about 47 bytes each): the installing node then compacts only the
# ranges that hold them, not its whole key space. More keys than this rewrite most of a large store
# anyway (tokenvault/core/shred.py, SWEEP_FRACTION).
MAX_SHRED_KEYS = 1024
MAX_SHRED_KEY_BYTES = 256  # a store key is at most 134 bytes (a digits token's life row)
MAX_FILE_BYTES = 1 << 40
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CHECKPOINT_DIRECTORY = "checkpoint"
READ_BLOCK_BYTES = 1024 * 1024


class SnapshotStreamError(SnapshotRejected):
    """A snapshot stream is malformed, truncated, too long or does not match its digests."""


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: str
    size: int
    sha256: bytes


@dataclass(frozen=True, slots=True)
class PendingShred:
    """What a checkpoint may hold that its source had deleted (or destroyed) and not yet shredded: the rows
    of ``keys`` (sorted, at most MAX_SHRED_KEYS), or rows anywhere in its key space when ``keys`` is None."""

    keys: tuple[bytes, ...] | None = None

    @property
    def key_count(self) -> int | None:
        """How many keys are listed; None: none (the rows may be anywhere)."""
        return None if self.keys is None else len(self.keys)


@dataclass(frozen=True, slots=True)
class Manifest:
    index: int
    view: int
    created_at_ms: int
    files: tuple[FileEntry, ...]
    # What the checkpoint may hold of rows deleted at or below ``index`` that its source had not shredded
    # yet (None: nothing): the node that installs it compacts the ranges of its keys or, when they are not
    # listed, its whole key space (docs/guarantees.md, delete). On the wire: shred_pending, shred_keys.
    pending: PendingShred | None = PendingShred(None)

    @property
    def shred_pending(self) -> bool:
        return self.pending is not None

    @property
    def shred_key_count(self) -> int | None:
        """How many keys of those rows it lists; None: nothing pending, or none listed."""
        return None if self.pending is None else self.pending.key_count

    def encode(self) -> bytes:
        document = {"format": FORMAT_VERSION, "index": self.index, "view": self.view,
                    "created_at_ms": self.created_at_ms,
                    "files": [[entry.name, entry.size, entry.sha256] for entry in self.files],
                    "shred_pending": self.shred_pending}
        if self.pending is not None and self.pending.keys is not None:
            document["shred_keys"] = list(self.pending.keys)
        encoded: bytes = msgpack.packb(document)
        return encoded

    @classmethod
    def decode(cls, data: bytes) -> "Manifest":
        try:
            document = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_SHRED_KEY_BYTES,
                                       max_str_len=256, max_array_len=MAX_FILES, max_map_len=16)
        except Exception:
            raise SnapshotStreamError("snapshot manifest is not valid msgpack") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
            raise SnapshotStreamError("snapshot manifest has an unknown format")
        numbers: list[int] = []
        for name in ("index", "view", "created_at_ms"):
            number = document.get(name)
            if type(number) is not int or not 0 <= number <= MAX_INTEGER:
                raise SnapshotStreamError(f"snapshot manifest index, view or time is not an integer from 0 to "
                                          f"{MAX_INTEGER}")
            numbers.append(number)
        files = document.get("files")
        if not isinstance(files, list) or not files:
            raise SnapshotStreamError("snapshot manifest lists no files")
        entries: list[FileEntry] = []
        for item in files:
            if not (isinstance(item, list) and len(item) == 3):
                raise SnapshotStreamError("snapshot manifest has a malformed file entry")
            name, size, digest = item
            if type(name) is not str or not _FILE_NAME.fullmatch(name):
                raise SnapshotStreamError("snapshot manifest has a file name that is not a plain name")
            if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
                raise SnapshotStreamError("snapshot manifest has a file size out of range")
            if type(digest) is not bytes or len(digest) != DIGEST_BYTES:
                raise SnapshotStreamError("snapshot manifest has a malformed file digest")
            entries.append(FileEntry(name, size, digest))
        if len({entry.name for entry in entries}) != len(entries):
            raise SnapshotStreamError("snapshot manifest names a file twice")
        shred_pending = document.get("shred_pending", True)  # a source before the field: assume rows wait
        if type(shred_pending) is not bool:
            raise SnapshotStreamError("snapshot manifest shred_pending is not a boolean")
        keys = _decode_shred_keys(document.get("shred_keys"), shred_pending)
        return cls(numbers[0], numbers[1], numbers[2], tuple(entries), PendingShred(keys) if shred_pending else None)

    def total_bytes(self, encoded_length: int) -> int:
        return len(MAGIC) + LENGTH_BYTES + encoded_length + sum(entry.size for entry in self.files) + DIGEST_BYTES


def _decode_shred_keys(value: object, shred_pending: bool) -> tuple[bytes, ...] | None:
    """A manifest's ``shred_keys``: absent, or with shred_pending a list of at most MAX_SHRED_KEYS store
    keys of 1 to MAX_SHRED_KEY_BYTES bytes each (kept sorted and once each)."""
    if value is None:
        return None
    if not shred_pending:
        raise SnapshotStreamError("snapshot manifest lists shred_keys but says nothing is pending")
    if not isinstance(value, list) or len(value) > MAX_SHRED_KEYS:
        raise SnapshotStreamError(f"snapshot manifest shred_keys is not a list of at most {MAX_SHRED_KEYS} keys")
    if any(type(key) is not bytes or not 0 < len(key) <= MAX_SHRED_KEY_BYTES for key in value):
        raise SnapshotStreamError("snapshot manifest has a malformed shred key")
    return tuple(sorted(set(value)))


class SnapshotSource:
    """A checkpoint of a store, read as one stream by offset. Create and read it in a worker thread."""

    def __init__(self, directory: Path, manifest: Manifest, header: bytes, trailer: bytes) -> None:
        self.directory = directory
        self.manifest = manifest
        self._header = header
        self._trailer = trailer
        # (stream offset where the file starts, entry), in stream order
        self._layout: list[tuple[int, FileEntry]] = []
        offset = len(header)
        for entry in manifest.files:
            self._layout.append((offset, entry))
            offset += entry.size
        self._files_end = offset
        self.total_bytes = offset + DIGEST_BYTES

    @property
    def index(self) -> int:
        return self.manifest.index

    @property
    def view(self) -> int:
        return self.manifest.view

    @classmethod
    def from_checkpoint(cls, directory: Path, index: int, view: int,
                        pending: PendingShred | None) -> "SnapshotSource":
        """Describe the checkpoint in ``directory`` (hashing every file), saying ``pending`` (None: every
        delete at or below ``index`` was shredded when it was taken); on failure the directory is removed."""
        try:
            return cls._describe(directory, index, view, pending)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    @classmethod
    def _describe(cls, directory: Path, index: int, view: int, pending: PendingShred | None) -> "SnapshotSource":
        paths = sorted(path for path in directory.iterdir())
        if any(not path.is_file() or not _FILE_NAME.fullmatch(path.name) for path in paths):
            raise ValueError("a checkpoint holds plain files only")
        if len(paths) > MAX_FILES:  # a receiver refuses a manifest of more (Manifest.decode)
            raise ValueError(f"checkpoint has {len(paths)} files, more than the {MAX_FILES} one snapshot manifest "
                             f"may list")
        whole = hashlib.sha256()
        entries = []
        for path in paths:
            hasher = hashlib.sha256()
            size = 0
            with open(path, "rb") as handle:
                while block := handle.read(READ_BLOCK_BYTES):
                    hasher.update(block)
                    whole.update(block)
                    size += len(block)
            entries.append(FileEntry(path.name, size, hasher.digest()))
        manifest = Manifest(index, view, int(time.time() * 1000), tuple(entries), pending)
        encoded = manifest.encode()
        if len(encoded) > MAX_MANIFEST_BYTES and manifest.shred_key_count is not None:
            # Room for the files first: without its keys the manifest says rows may wait anywhere.
            manifest = dataclasses.replace(manifest, pending=PendingShred(None))
            encoded = manifest.encode()
        if len(encoded) > MAX_MANIFEST_BYTES:
            raise ValueError("checkpoint has too many files for one snapshot manifest")
        whole.update(encoded)
        header = MAGIC + len(encoded).to_bytes(LENGTH_BYTES, "big") + encoded
        return cls(directory, manifest, header, whole.digest())

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of the stream at ``offset`` (fewer only at its end)."""
        if offset < 0 or length < 0 or offset > self.total_bytes:
            raise ValueError("read outside the snapshot stream")
        end = min(self.total_bytes, offset + length)
        parts: list[bytes] = []
        if offset < len(self._header):
            parts.append(self._header[offset:end])
        for start, entry in self._layout:
            stop = start + entry.size
            if stop <= offset or start >= end or entry.size == 0:
                continue
            begin = max(offset, start)
            with open(self.directory / entry.name, "rb") as handle:
                handle.seek(begin - start)
                data = handle.read(min(end, stop) - begin)
            if len(data) != min(end, stop) - begin:
                raise OSError(f"checkpoint file {entry.name} shrank while being read")
            parts.append(data)
        if end > self._files_end:
            parts.append(self._trailer[max(0, offset - self._files_end):end - self._files_end])
        return b"".join(parts)

    def write_to(self, handle: BinaryIO, chunk_bytes: int = READ_BLOCK_BYTES) -> int:
        offset = 0
        while offset < self.total_bytes:
            data = self.read(offset, chunk_bytes)
            handle.write(data)
            offset += len(data)
        return offset

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class StagedSnapshot:
    """A verified stream, written out as a checkpoint directory ready to install."""

    checkpoint_dir: Path
    index: int
    view: int
    manifest: Manifest
    total_bytes: int


class ShredState(Protocol):
    """What a snapshot's source asks of its node's shredder (tokenvault/core/shred.py, Shredder)."""

    def shred_mark(self) -> Any: ...

    def pending_through(self, mark: Any, index: int) -> PendingShred | None: ...


def take_checkpoint(store: Any, work_directory: Path) -> tuple[Path, int, int]:
    """Checkpoint ``store`` in a new directory under ``work_directory``; the store keeps applying meanwhile.
    Returns the directory and the checkpoint's index and view."""
    work_directory.mkdir(parents=True, exist_ok=True)
    directory = work_directory / f"source-{time.monotonic_ns()}"
    index, view = store.create_checkpoint(directory)
    return directory, index, view


async def create_source(store: Any, work_directory: Path, shreds: ShredState,
                        in_thread: Callable[..., Awaitable[Any]]) -> SnapshotSource:
    """A checkpoint of ``store`` as a snapshot source, its blocking steps run by ``in_thread``; called on the
    event loop, which reads ``shreds`` just before and just after the checkpoint is taken, so that the
    manifest says whether its files may hold rows deleted and not yet shredded (``shred_pending``), and
    whose (``shred_keys``) where the shredder knows."""
    mark = shreds.shred_mark()
    directory, index, view = await in_thread(take_checkpoint, store, work_directory)
    pending = shreds.pending_through(mark, index)
    source: SnapshotSource = await in_thread(SnapshotSource.from_checkpoint, directory, index, view, pending)
    return source


class SnapshotStager:
    """Receives a stream in order and writes its files under ``directory`` as they arrive.

    ``expected_total``, when given, is the size the sender announced; a
    manifest that adds up to anything else is refused at once. The caller
    discards the stager (``discard``) on any error; ``finish`` returns the
    verified checkpoint.
    """

    def __init__(self, directory: Path, expected_total: int | None = None) -> None:
        self.directory = directory
        self.expected_total = expected_total
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        self._checkpoint_dir = directory / CHECKPOINT_DIRECTORY
        self._checkpoint_dir.mkdir()
        self._received = 0
        self._prefix = bytearray()  # magic, length and manifest until the manifest is whole
        self._manifest: Manifest | None = None
        self._encoded_manifest = b""
        self._total: int | None = None
        self._file_position = 0  # index into manifest.files
        self._file_written = 0
        self._file_handle: BinaryIO | None = None
        self._file_hasher = hashlib.sha256()
        self._whole = hashlib.sha256()
        self._trailer = bytearray()

    @property
    def received_bytes(self) -> int:
        return self._received

    def write(self, offset: int, data: bytes) -> None:
        if offset != self._received:
            raise SnapshotStreamError(f"snapshot bytes at offset {offset}, expected {self._received}")
        view = memoryview(data)
        while view:
            if self._manifest is None:
                view = self._take_prefix(view)
            elif self._file_position < len(self._manifest.files):
                view = self._take_file_bytes(view)
            else:
                room = DIGEST_BYTES - len(self._trailer)
                if len(view) > room:
                    raise SnapshotStreamError("snapshot stream runs past its end")
                self._trailer += view
                view = view[len(view):]
        self._received += len(data)

    def _take_prefix(self, view: memoryview) -> memoryview:
        fixed = len(MAGIC) + LENGTH_BYTES
        if len(self._prefix) < fixed:
            needed = fixed - len(self._prefix)
            self._prefix += view[:needed]
            view = view[needed:]
            if len(self._prefix) < fixed:
                return view
            if bytes(self._prefix[:len(MAGIC)]) != MAGIC:
                raise SnapshotStreamError("not a TokenVault snapshot stream (bad magic)")
            length = int.from_bytes(self._prefix[len(MAGIC):fixed], "big")
            if not 0 < length <= MAX_MANIFEST_BYTES:
                raise SnapshotStreamError("snapshot manifest length out of range")
        length = int.from_bytes(self._prefix[len(MAGIC):fixed], "big")
        needed = fixed + length - len(self._prefix)
        self._prefix += view[:needed]
        view = view[needed:]
        if len(self._prefix) == fixed + length:
            self._encoded_manifest = bytes(self._prefix[fixed:])
            manifest = Manifest.decode(self._encoded_manifest)
            self._total = manifest.total_bytes(length)
            if self.expected_total is not None and self._total != self.expected_total:
                raise SnapshotStreamError("snapshot manifest does not add up to the announced size")
            self._check_space(self._total)
            self._manifest = manifest
            self._open_next_file()
        return view

    def _check_space(self, total: int) -> None:
        usage = shutil.disk_usage(self.directory)
        if usage.free < total:
            raise SnapshotStreamError(f"not enough disk space to stage the snapshot: needs {total} bytes, "
                                      f"{usage.free} free")

    def _open_next_file(self) -> None:
        assert self._manifest is not None
        while self._file_position < len(self._manifest.files):
            entry = self._manifest.files[self._file_position]
            self._file_handle = open(self._checkpoint_dir / entry.name, "xb")
            self._file_written = 0
            self._file_hasher = hashlib.sha256()
            if entry.size:
                return
            self._close_file(entry)

    def _take_file_bytes(self, view: memoryview) -> memoryview:
        assert self._manifest is not None and self._file_handle is not None
        entry = self._manifest.files[self._file_position]
        part = view[:entry.size - self._file_written]
        self._file_handle.write(part)
        self._file_hasher.update(part)
        self._whole.update(part)
        self._file_written += len(part)
        if self._file_written == entry.size:
            self._close_file(entry)
            self._open_next_file()
        return view[len(part):]

    def _close_file(self, entry: FileEntry) -> None:
        assert self._file_handle is not None
        self._file_handle.flush()
        os.fsync(self._file_handle.fileno())
        self._file_handle.close()
        self._file_handle = None
        if self._file_hasher.digest() != entry.sha256:
            raise SnapshotStreamError(f"snapshot file {entry.name} does not match its digest")
        self._file_position += 1

    def finish(self) -> StagedSnapshot:
        """Verify the whole stream and return the staged checkpoint; raises SnapshotStreamError."""
        if self._manifest is None or self._total is None or self._received != self._total:
            raise SnapshotStreamError(f"snapshot stream ended early after {self._received} bytes")
        self._whole.update(self._encoded_manifest)
        if bytes(self._trailer) != self._whole.digest():
            raise SnapshotStreamError("snapshot stream does not match its trailing digest")
        fsync_directory(self._checkpoint_dir)
        fsync_directory(self.directory)
        manifest = self._manifest
        return StagedSnapshot(self._checkpoint_dir, manifest.index, manifest.view, manifest, self._total)

    def discard(self) -> None:
        if self._file_handle is not None:
            self._file_handle.close()
            self._file_handle = None
        shutil.rmtree(self.directory, ignore_errors=True)


def stage_file(path: Path, directory: Path, chunk_bytes: int = READ_BLOCK_BYTES) -> StagedSnapshot:
    """Stage and verify a whole stream file (a backup) under ``directory``; raises SnapshotStreamError."""
    stager = SnapshotStager(directory)
    try:
        with open(path, "rb") as handle:
            while data := handle.read(chunk_bytes):
                stager.write(stager.received_bytes, data)
        return stager.finish()
    except BaseException:
        stager.discard()
        raise
