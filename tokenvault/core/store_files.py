"""The store's files: generations, the ``CURRENT`` pointer, fsyncs, and the install of a received checkpoint.

Layout. ``path`` is a directory holding a pointer file ``CURRENT`` (the name of
the live generation, e.g. ``gen-000001``) and that generation directory, a
RocksDB database. A snapshot install adds the next generation beside it and
switches ``CURRENT`` with write-temp + fsync + rename + directory fsync, so a
crash leaves either the old or the new generation named; open deletes every
other generation and temporary file. A new store is built in a sibling
directory ``<path>.creating`` and renamed into place, so ``path`` never exists
half-made.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rocksdict import Cache, Rdict, WriteBatch, WriteOptions

from protocol import Membership
from protocol.codec import MAX_INTEGER
from tokenvault.auth import RuntimeKey
from tokenvault.core.store_layout import (AGE, AGE_END, AGE_HEADER_BYTES, LIFE, LIFE_END, MAX_WRITE_BUFFERS,
                                          META_KEY, NO_RECORDS, VERIFY_CACHE_BYTES, WRITE_BUFFER_BYTES, SnapshotRejected, StoreCorruption, StoreError,
                                          age_created_at, check_epochs, check_token_count, database_options,
                                          encode_meta, first_key, open_database, read_api_keys, read_audit_anchor,
                                          read_audit_head, read_epochs, read_membership)
from tokenvault.smallfiles import fsync_directory
from tokenvault.smallfiles import FileTooLarge, read_small_file

# The store's directory inside a node's data directory (tokenvault.core.node, and its HTTP workers' views).
STORE_DIRECTORY = "store"
CURRENT_FILE = "CURRENT"
CURRENT_TEMP_FILE = "CURRENT.tmp"
# CURRENT holds one generation name and a newline (about 11 bytes); more is not a file the store wrote.
MAX_CURRENT_BYTES = 256
CREATING_SUFFIX = ".creating"
GENERATION_PREFIX = "gen-"
_GENERATION_NAME = re.compile(r"gen-(\d{6,})")
# The most bytes a checkpoint's RocksDB WAL files (``*.log``) may hold, together. Opening a database, even
# read-only, replays every WAL file into memtables, in memory; a received checkpoint (a snapshot, a backup
# file) is refused above this before anything opens it. The store's own checkpoints hold far less: the
# memtable is flushed first (VaultStore.create_checkpoint, then RocksDB's Checkpoint again just before it
# copies the live WAL file), so their WAL holds only what was applied in between, never more than the
# memtables the store itself keeps (its write buffer times its write buffers).
MAX_CHECKPOINT_WAL_BYTES = WRITE_BUFFER_BYTES * MAX_WRITE_BUFFERS
# The most bytes a checkpoint's CURRENT, IDENTITY and OPTIONS-* files may hold, together. An open, read-only
# too, reads each of them whole into memory (measured: one of 400 MB in a checkpoint took the verifier from
# 36 MB to 550-590 MB, and an IDENTITY file that large passed verification). RocksDB writes one manifest
# name into CURRENT, a UUID into IDENTITY and about 8 KiB into an OPTIONS file.
MAX_CHECKPOINT_WHOLE_READ_BYTES = 1024 * 1024
_WHOLE_READ_FILES = ("CURRENT", "IDENTITY")
_WHOLE_READ_PREFIX = "OPTIONS-"

# A test hook: called after each step of an install (and of the CURRENT switch)
# so a test can stop the install there, as a crash would.
_after_install_step: Callable[[str], None] = lambda step: None


def install_step(step: str) -> None:
    """Tell the test hook that an install finished ``step``."""
    _after_install_step(step)


# ---------------------------------------------------------------- files
def generation_name(number: int) -> str:
    return f"{GENERATION_PREFIX}{number:06d}"


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory under ``directory`` (deepest first), and itself."""
    for root, directories, files in os.walk(directory, topdown=False):
        for name in files:
            entry = Path(root) / name
            if not entry.is_symlink():
                _fsync_file(entry)
        fsync_directory(Path(root))


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def write_current(store_directory: Path, generation: str) -> None:
    """Point CURRENT at ``generation`` (replace_file)."""
    replace_file(store_directory / CURRENT_FILE, f"{generation}\n".encode(), store_directory / CURRENT_TEMP_FILE,
                 steps=("current_temp_written", "current_renamed"))


def replace_file(path: Path, content: bytes, temporary: Path, steps: tuple[str, str] | None = None) -> None:
    """Put ``content`` at ``path`` durably and whole: write ``temporary`` (owner only), fsync it, rename it
    over ``path``, fsync the directory. ``steps``: the install_step names after the write and after the
    rename, for the crash tests."""
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = memoryview(content)
        while data:
            data = data[os.write(descriptor, data):]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if steps is not None:
        install_step(steps[0])
    os.replace(temporary, path)
    if steps is not None:
        install_step(steps[1])
    fsync_directory(path.parent)


def read_current(store_directory: Path) -> str:
    current = store_directory / CURRENT_FILE
    if not current.is_file():
        raise StoreCorruption(f"{store_directory} holds files but no {CURRENT_FILE} pointer: "
                              "not a TokenVault store, or a damaged one")
    try:
        text = read_small_file(current, MAX_CURRENT_BYTES).decode("ascii")
    except (OSError, UnicodeDecodeError, FileTooLarge):
        raise StoreCorruption(f"{current} is unreadable, or too large to be a generation pointer") from None
    name = text[:-1] if text.endswith("\n") else ""
    if _GENERATION_NAME.fullmatch(name) is None:
        raise StoreCorruption(f"{current} does not name a generation")
    if not (store_directory / name).is_dir():
        raise StoreCorruption(f"{current} names {name}, which is missing")
    return name


def remove_leftovers(store_directory: Path, current: str) -> None:
    """Delete generations other than ``current`` and a temporary CURRENT: leftovers of an interrupted install."""
    removed = False
    for entry in store_directory.iterdir():
        if entry.name == CURRENT_TEMP_FILE or (_GENERATION_NAME.fullmatch(entry.name) and entry.name != current):
            remove_tree(entry)
            removed = True
    if removed:
        fsync_directory(store_directory)


def create_store(path: Path, cache: Cache) -> None:
    """Build an empty store beside ``path`` and rename it into place, so ``path`` is never half-made."""
    building = path.with_name(path.name + CREATING_SUFFIX)
    building.mkdir()
    generation = generation_name(1)
    database = Rdict(str(building / generation), database_options(cache, create=True))
    try:
        batch = WriteBatch(raw_mode=True)
        batch.put(META_KEY, encode_meta(0, 0, 0))
        sync = WriteOptions()
        sync.sync = True
        database.write(batch, sync)
    finally:
        database.close()
    fsync_tree(building / generation)
    write_current(building, generation)
    os.rename(building, path)
    fsync_directory(path.parent)


@dataclass(frozen=True, slots=True)
class LoadedState:
    """What the store keeps in memory of a generation (VaultStore._set_state), read by ``read_state``."""

    meta: tuple[int, int, int]  # applied_index, applied_view, token_count
    active_epoch: int
    api_keys: dict[str, RuntimeKey]
    audit_head: tuple[int, bytes]  # seq, hash
    audit_anchor: tuple[int, bytes]
    membership: Membership | None
    idempotency_floor_ms: int  # the oldest idempotency record's time, NO_RECORDS when there is none
    has_life: bool  # whether any mapping may have a life row


def read_state(database: Rdict, meta: tuple[int, int, int], error: type[StoreError],
               epoch_limit: int | None = None) -> LoadedState:
    """Read and check every row a generation's in-memory state is made of: the epochs, the API keys (at most
    MAX_API_KEYS), the audit head and anchor, the configuration, and the first key of the age and life
    indexes. Bounded work, never a scan; any malformed row raises ``error``. ``verify_checkpoint`` runs it on
    a received checkpoint and ``VaultStore.commit_install`` before it switches CURRENT, so an install never
    makes live a generation the store then cannot load."""
    active_epoch = check_epochs(read_epochs(database, error, limit=epoch_limit), error)
    api_keys = read_api_keys(database, error)
    audit_head = read_audit_head(database, error)
    audit_anchor = read_audit_anchor(database, error)
    membership = read_membership(database, error)
    first = first_key(database, AGE, AGE_END)
    if first is not None and len(first) < AGE_HEADER_BYTES:
        raise error("an idempotency age key is malformed")
    # No idempotency record is older than the floor: a purge with an earlier
    # cut-off would delete nothing, so it is skipped (the same on every node).
    floor_ms = NO_RECORDS if first is None else age_created_at(first)
    has_life = first_key(database, LIFE, LIFE_END) is not None
    return LoadedState(meta, active_epoch, api_keys, audit_head, audit_anchor, membership, floor_ms, has_life)


def verify_checkpoint(directory: Path, index: int, view: int) -> int:
    """Check a received checkpoint without a full scan; raises SnapshotRejected, never anything else.
    Returns its token count (the meta's: opaque tokens), checked as below.

    Checks, before anything opens it: RocksDB's WAL files within
    MAX_CHECKPOINT_WAL_BYTES, and the files an open reads whole within
    MAX_CHECKPOINT_WHOLE_READ_BYTES. Then: a RocksDB database of one column
    family and our options, the marker and schema version, meta at (index,
    view), epochs 1..n with at most one (the newest) active, a token count that fits the token rows
    and the number of entries, and every other row the install loads into
    memory (``read_state``: the API keys, the audit head and anchor, the
    configuration), so that a checkpoint that passes is one the store can
    switch to. RocksDB verifies the checksum of every block it reads; blocks
    not read are not checked here.
    """
    if not all(type(number) is int and 0 <= number <= MAX_INTEGER for number in (index, view)):
        raise SnapshotRejected(f"checkpoint index and view must be integers from 0 to {MAX_INTEGER}")
    check_checkpoint_wal(Path(directory))
    check_checkpoint_whole_reads(Path(directory))
    try:
        options = database_options(Cache(VERIFY_CACHE_BYTES))
        database, (meta_index, meta_view, token_count) = open_database(
            Path(directory), options, SnapshotRejected, read_only=True)
    except SnapshotRejected:
        raise
    except Exception:
        raise SnapshotRejected("checkpoint cannot be opened") from None
    try:
        if (meta_index, meta_view) != (index, view):
            raise SnapshotRejected("checkpoint is not at the announced index and view")
        read_state(database, (meta_index, meta_view, token_count), SnapshotRejected, epoch_limit=index)
        check_token_count(database, token_count, SnapshotRejected)
    except SnapshotRejected:
        raise
    except Exception:
        raise SnapshotRejected("checkpoint is damaged") from None
    finally:
        database.close()
    return token_count


def check_checkpoint_wal(directory: Path) -> None:
    """Refuse (SnapshotRejected) a checkpoint whose WAL files hold more than MAX_CHECKPOINT_WAL_BYTES
    together, or one that is no regular file: an open would replay them all into memory. Opens nothing."""
    names = wal_file_names(directory)
    for name in names:
        try:
            status = os.lstat(directory / name)
        except OSError:
            continue  # the open says what is wrong
        if not stat.S_ISREG(status.st_mode):
            raise SnapshotRejected(f"checkpoint WAL file {name[:64]} is not a regular file")
    total = wal_file_bytes(directory, names)
    if total > MAX_CHECKPOINT_WAL_BYTES:
        raise SnapshotRejected(
            f"checkpoint's RocksDB WAL files (*.log) hold {total} bytes, more than the {MAX_CHECKPOINT_WAL_BYTES} "
            f"bytes ({MAX_CHECKPOINT_WAL_BYTES >> 20} MiB: the store's write buffer times its write buffers) "
            f"a checkpoint may hold; not opened, as an open would replay them into memory")


def check_checkpoint_whole_reads(directory: Path) -> None:
    """Refuse (SnapshotRejected) a checkpoint whose CURRENT, IDENTITY and OPTIONS-* files hold more than
    MAX_CHECKPOINT_WHOLE_READ_BYTES together, or one of them that is no regular file: an open reads each of
    them whole into memory. Opens nothing."""
    total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name in _WHOLE_READ_FILES or entry.name.startswith(_WHOLE_READ_PREFIX):
                    status = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(status.st_mode):
                        raise SnapshotRejected(f"checkpoint file {entry.name[:64]} is not a regular file")
                    total += status.st_size
    except OSError:
        return  # the open says what is wrong
    if total > MAX_CHECKPOINT_WHOLE_READ_BYTES:
        raise SnapshotRejected(
            f"checkpoint's CURRENT, IDENTITY and OPTIONS files hold {total} bytes, more than the "
            f"{MAX_CHECKPOINT_WHOLE_READ_BYTES} bytes they may hold; not opened, as an open reads each whole "
            f"into memory")


# ---------------------------------------------------------------- installs
@dataclass(eq=False)
class PreparedInstall:
    """A verified checkpoint moved into the store as the next generation, open, not yet live."""

    index: int
    view: int
    directory: Path
    _database: Rdict | None = field(repr=False, default=None)


class RetiredGeneration:
    """The generation an install replaced. ``close()`` (or calling it; from a worker thread: it can
    take 0.3 s) closes its database and deletes its directory; a crash before that leaves it for the
    next open to delete."""

    def __init__(self, database: Rdict, directory: Path, lock: threading.Lock) -> None:
        self._database: Rdict | None = database
        self.directory = directory
        self._lock = lock  # held by create_checkpoint while it reads a database

    def close(self) -> None:
        with self._lock:
            database, self._database = self._database, None
            if database is None:
                return
            database.close()
        install_step("old_closed")
        remove_tree(self.directory)
        fsync_directory(self.directory.parent)

    __call__ = close


def wal_file_names(directory: Path) -> tuple[str, ...]:
    """The names of RocksDB's WAL files in a generation, sorted (empty when none is listed).

    What the workers' views (tokenvault.core.store_reader) follow the store by. A flush starts a new
    WAL file and, once its table file is in the MANIFEST, deletes the old one; a view opened or caught
    up while either happened may have read the MANIFEST before the table file was added and then
    found the old WAL gone: the rows of both are missing from it (measured: tokens never deleted
    read back as unknown). Any change of this set during a view's open or catch-up therefore opens
    the view again."""
    return followed_files(directory)[0]


def followed_files(directory: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names of a generation's WAL files and of its MANIFEST files, each sorted, from one listing
    (empty when none is listed).

    A view follows the MANIFEST files too: RocksDB starts a new MANIFEST once one is past
    MAX_MANIFEST_BYTES (tokenvault.core.store_layout), writing the new file before it deletes the old,
    and a secondary instance that caught up across that switch was measured to lose rows it had (a
    five-node soak: four tokens read back null by a view whose applied index had moved past them).
    Any change of them during a view's open or since, like a change of the WAL files, opens the view
    again."""
    wals: list[str] = []
    manifests: list[str] = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(".log"):
                    wals.append(entry.name)
                elif entry.name.startswith("MANIFEST-"):
                    manifests.append(entry.name)
    except OSError:
        return (), ()
    return tuple(sorted(wals)), tuple(sorted(manifests))


def wal_file_bytes(directory: Path, names: Sequence[str]) -> int:
    """The bytes of the named WAL files now (a file already gone counts nothing)."""
    total = 0
    for name in names:
        try:
            total += os.stat(directory / name).st_size
        except OSError:
            pass
    return total
