"""Online backup of a live node, and restore of a node's data directory from a backup.

A backup is a snapshot stream (``tokenvault.core.snapshots``): a header with the
manifest (format version, applied index and view, file names, sizes and
SHA-256 each), the bytes of a consistent checkpoint of the store, and a
trailing SHA-256 of everything before it. The same stream ships a store to a
lagging backup node, so a backup file is checked by exactly the code that
checks a snapshot before a node installs it.

Three parts, the second of them in the client:

- **Serving** (``BackupStream``): ``GET /v1/admin/backup`` takes a checkpoint
  of the store of the node the request reached and streams it. Every blocking
  step (the checkpoint, each 1 MiB read, the clean-up) runs in a worker
  thread, so the event loop never waits on the disk and writes go on while a
  backup streams; at most ``[http] max_backup_streams`` (default 1) run at a
  time per node, further requests get 503 with ``Retry-After``. The checkpoint is
  deleted when the response ends, fails, or the client goes away.
- **Downloading** is the client's (tokenvault/cli/backup.py, ``tokenvault admin
  backup``): it verifies the file it received with ``verify_backup_file`` below.
- **Restoring** (``restore_data_dir``, used by ``tokenvault admin restore`` and
  ``./run_cluster.sh restore``): refuses a data directory that is not empty,
  stages and verifies the backup, checks that the master key opens every epoch
  in it, installs the checkpoint as the store's first generation and starts the
  replication log after (index, view). The directory is built next to the
  target and renamed into place, so a failed restore leaves nothing behind;
  what a killed one (or a killed verification) leaves, the next run in that
  directory removes (ScratchDirectory).

A backup holds what the node had applied when it was taken: on the primary,
everything acknowledged before the request started; on a backup node, a
consistent prefix of the log that may be a little older. No error message here
ever holds a value, a token or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import HardState
from tokenvault.crypto.keys import CryptoError, KeyRing
from tokenvault.errors import Unavailable
from tokenvault.logs import get_logger
from tokenvault.core.shred import ShredRecord
from tokenvault.core.snapshots import (PendingShred, ShredState, SnapshotSource, StagedSnapshot, create_source,
                                      stage_file)
from tokenvault.core.store import VaultStore
from tokenvault.core.store_files import fsync_tree
from tokenvault.core.store_layout import SnapshotRejected, StoreError
from tokenvault.core.wal import WalFatal, WriteAheadLog
from tokenvault.smallfiles import fsync_directory

log = get_logger("tokenvault.core.backup")

BACKUP_CHUNK_BYTES = 1024 * 1024
BACKUP_RETRY_AFTER_SECONDS = 5
# Under the node's data directory: checkpoints being streamed (hard links into the store where the
# file system allows, so they cost little space); removed when each stream ends.
BACKUP_WORK_DIR_NAME = "backup-checkpoints"
STORE_DIR_NAME = "store"
WAL_DIR_NAME = "wal"
PARTIAL_SUFFIX = ".partial"
BACKUP_CONTENT_TYPE = "application/octet-stream"
HEADER_INDEX = "X-TokenVault-Backup-Index"
HEADER_VIEW = "X-TokenVault-Backup-View"
HEADER_BYTES = "X-TokenVault-Backup-Bytes"
HEADER_NODE = "X-TokenVault-Backup-Node"
HEADER_ROLE = "X-TokenVault-Backup-Role"
ROUTE_BACKUP = "/v1/admin/backup"
# The longest index, view or byte count header the download accepts: 2**64 - 1 has 20 digits.
MAX_HEADER_DIGITS = 20

class BackupBusy(Unavailable):
    """This node already streams as many backups as it allows; the request had no effect."""

    problem = "backup-busy"
    no_effect = True

    def __init__(self, limit: int) -> None:
        super().__init__(f"this node is already streaming {limit} backup(s), its limit; retry later or take "
                         f"the backup from another node", retry_after_seconds=BACKUP_RETRY_AFTER_SECONDS)


class BackupError(Exception):
    """A backup could not be taken, downloaded, verified or restored; the message says why."""


class BackupRefused(BackupError):
    """The backup file is truncated, altered or not a backup (SnapshotRejected, with its reason)."""


# ---------------------------------------------------------------- serving


class BackupStream:
    """One backup being served: a SnapshotSource whose blocking methods run in worker threads."""

    # Work directories of the streams open in this process; any other entry of a work root is a
    # leftover of a process that died mid-stream and is removed when the next stream opens (and when the
    # node starts: tokenvault.core.node). Read by that removal in its thread, at each entry (is_active):
    # a copy taken when the stream opened would not hold a stream opened meanwhile, whose checkpoint the
    # removal would then delete.
    _active_work_dirs: set[Path] = set()
    _active_lock = threading.Lock()
    _closing_tasks: set[asyncio.Task[None]] = set()

    def __init__(self, source: Any, work_dir: Path) -> None:
        self._source = source
        self._work_dir = work_dir
        self.index: int = source.index
        self.view: int = source.view
        self.total_bytes: int = source.total_bytes
        self.sent_bytes = 0
        self._pending_read: asyncio.Future[bytes] | None = None
        self._closed = False

    @classmethod
    async def open(cls, store: Any, work_root: Path, shreds: ShredState) -> BackupStream:
        """Take a checkpoint of ``store`` (in a worker thread) under a fresh directory in ``work_root``; its
        manifest says whether it may hold rows deleted and not yet shredded (``shreds``: the node's shredder)."""
        work_dir = work_root / f"backup-{uuid.uuid4().hex}"
        with cls._active_lock:
            cls._active_work_dirs.add(work_dir)
        created = asyncio.ensure_future(_create_source(store, work_root, work_dir, cls.is_active, shreds))
        try:
            source = await asyncio.shield(created)
        except asyncio.CancelledError:
            # The checkpoint is still being taken in its thread: delete it once it exists.
            created.add_done_callback(lambda future: cls._discard_later(future, work_dir))
            raise
        except BaseException:
            await cls._discard(None, work_dir)
            raise
        return cls(source, work_dir)

    @classmethod
    def _discard_later(cls, future: asyncio.Future[Any], work_dir: Path) -> None:
        source = None if future.cancelled() or future.exception() is not None else future.result()
        cls._keep_until_done(asyncio.get_running_loop().create_task(cls._discard(source, work_dir)))

    @classmethod
    def _keep_until_done(cls, task: asyncio.Task[None]) -> None:
        # The loop holds tasks only weakly: keep a clean-up alive even when nobody awaits it.
        cls._closing_tasks.add(task)
        task.add_done_callback(cls._closing_tasks.discard)

    @classmethod
    async def _discard(cls, source: SnapshotSource | None, work_dir: Path) -> None:
        try:
            await asyncio.to_thread(_discard_files, source, work_dir)
        finally:
            with cls._active_lock:
                cls._active_work_dirs.discard(work_dir)

    @classmethod
    def is_active(cls, work_dir: Path) -> bool:
        """Whether ``work_dir`` is the work directory of a stream open now (callable from any thread)."""
        with cls._active_lock:
            return work_dir in cls._active_work_dirs

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the stream from ``offset``, read in a worker thread."""
        if self._closed:
            raise BackupError("the backup stream was closed")
        self._pending_read = asyncio.get_running_loop().run_in_executor(None, self._source.read, offset, length)
        # Shielded: a cancelled handler must not leave a read running while close() deletes the files.
        data = await asyncio.shield(self._pending_read)
        if len(data) != length:
            raise BackupError(f"the checkpoint gave {len(data)} bytes at offset {offset}, not {length}")
        self.sent_bytes = max(self.sent_bytes, offset + length)
        return data

    async def chunks(self, chunk_bytes: int = BACKUP_CHUNK_BYTES) -> AsyncIterator[bytes]:
        """The stream in order, ``chunk_bytes`` at a time."""
        offset = 0
        while offset < self.total_bytes:
            length = min(chunk_bytes, self.total_bytes - offset)
            yield await self.read(offset, length)
            offset += length

    async def close(self) -> None:
        """Delete the checkpoint (after any read still running); runs to the end even if cancelled."""
        if self._closed:
            return
        self._closed = True
        task = asyncio.get_running_loop().create_task(self._close_after_reads())
        self._keep_until_done(task)
        await asyncio.shield(task)

    async def _close_after_reads(self) -> None:
        pending = self._pending_read
        if pending is not None and not pending.done():
            await asyncio.wait([pending])
        await self._discard(self._source, self._work_dir)


def _discard_files(source: SnapshotSource | None, work_dir: Path) -> None:
    """Close the source (which deletes its checkpoint) and remove the stream's work directory."""
    try:
        if source is not None:
            source.close()
    except Exception as error:  # noqa: BLE001 - the clean-up below still runs; the type is logged
        log.warning("backup.close_failed", error_type=type(error).__name__)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


async def _create_source(store: Any, work_root: Path, work_dir: Path, is_active: Callable[[Path], bool],
                         shreds: ShredState) -> SnapshotSource:
    await asyncio.to_thread(_remove_leftovers, work_root, is_active)
    return await create_source(store, work_dir, shreds, asyncio.to_thread)


def _remove_leftovers(work_root: Path, is_active: Callable[[Path], bool]) -> None:
    work_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for leftover in work_root.iterdir():
        if not is_active(leftover):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


# ---------------------------------------------------------------- verifying


@dataclass(frozen=True, slots=True)
class VerifiedBackup:
    """What a verified backup holds (no secret in it)."""

    index: int
    view: int
    size_bytes: int
    file_count: int
    token_count: int  # opaque tokens: the store's count (card and digits tokens are not in it)
    # Rows it may hold that were deleted and not yet shredded when it was taken (its manifest; None: none).
    pending_shred: PendingShred | None


def shred_scope(pending: PendingShred) -> str:
    """What a node restored from a backup holding ``pending`` compacts at its start, for the operator."""
    count = pending.key_count
    return "its whole store" if count is None else f"the ranges of the {count} keys the backup lists"


SCRATCH_PREFIX = ".tokenvault-restore-"
BUILDING_INFIX = ".restoring-"


class ScratchDirectory:
    """A new hidden directory under ``parent`` (named ``prefix`` and a random part: a staged backup, a data
    directory being built), held under an exclusive flock on the directory itself for as long as it is in
    use.

    A run killed meanwhile (cron's timeout sends SIGTERM, which runs no ``finally``; kill -9; a crash) leaves
    its directory, which may be as large as the store; the kernel drops the lock with the process. So each
    ``create`` first removes every directory under ``parent`` named ``prefix``... whose lock it can take:
    its owner is dead. One in use is never touched. Where the file system has no flock (some network file
    systems), leftovers stay, as before, and nothing in use is removed.
    """

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    @classmethod
    def create(cls, parent: Path, prefix: str) -> ScratchDirectory:
        """Remove the dead leftovers, then make and lock a new directory. Raises OSError."""
        remove_dead_scratch(parent, prefix)
        while True:
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            try:
                descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue  # another run took it for a leftover before it was locked, and removed it
            try:
                try:
                    # Blocks only while another run that took it for a leftover removes it (it is empty).
                    fcntl.flock(descriptor, fcntl.LOCK_EX)
                except OSError:
                    pass  # no flock on this file system: used unlocked, and no run removes anything as dead
                if os.path.samestat(os.fstat(descriptor), os.stat(path, follow_symlinks=False)):
                    return cls(path, descriptor)
            except FileNotFoundError:
                pass
            except BaseException:  # interrupted while it waited for the lock, say: the descriptor goes too
                os.close(descriptor)
                raise
            os.close(descriptor)  # removed meanwhile as above: make another

    def remove(self) -> None:
        """Delete the directory, then release its lock."""
        if self._descriptor is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Release the lock, leaving the directory (moved away from its scratch name meanwhile)."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def remove_dead_scratch(parent: Path, prefix: str) -> None:
    """Delete each directory under ``parent`` named ``prefix``... that no live process holds (ScratchDirectory)."""
    try:
        candidates = [entry for entry in parent.iterdir() if entry.name.startswith(prefix)]
    except OSError:
        return  # creating the new one then says what is wrong with ``parent``
    for candidate in candidates:
        descriptor = _lock_directory(candidate)
        if descriptor is not None:
            try:
                shutil.rmtree(candidate, ignore_errors=True)
            finally:
                os.close(descriptor)


def _lock_directory(path: Path) -> int | None:
    """A descriptor of the directory ``path`` holding an exclusive flock on it, taken without waiting, once
    ``path`` still names that directory; None where another process holds the lock, where ``path`` is no
    directory, a link, or gone, or where the file system has no flock (then nothing is taken for dead)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.fstat(descriptor), os.stat(path, follow_symlinks=False)):
            return descriptor
    except OSError:
        pass
    os.close(descriptor)
    return None


@contextlib.contextmanager
def staged_backup(path: Path, scratch_parent: Path) -> Any:
    """Stage and verify the backup file in a temporary directory under ``scratch_parent``; yields the
    StagedSnapshot and removes the directory afterwards. Raises BackupRefused or BackupError."""
    path = Path(path)
    if not path.is_file():
        raise BackupError(f"backup file {path} does not exist or is not a file")
    try:
        scratch = ScratchDirectory.create(Path(scratch_parent), SCRATCH_PREFIX)
    except OSError as error:
        raise BackupError(f"cannot create a staging directory in {scratch_parent}: {error.strerror}") from None
    try:
        try:
            staged = stage_file(path, scratch.path / "staged")
        except SnapshotRejected as error:
            raise BackupRefused(f"backup file {path} is refused: {error}") from None
        except OSError as error:
            raise BackupError(f"cannot read backup file {path}: {error.strerror}") from None
        yield staged
    finally:
        scratch.remove()


def verify_backup_file(path: Path, scratch_parent: Path | None = None) -> VerifiedBackup:
    """Check a whole backup file by staging it once: trailer, manifest, every file's SHA-256, and then the
    checkpoint itself as a store would before installing it (RocksDB opens it; meta, epochs, token count)."""
    path = Path(path)
    with staged_backup(path, scratch_parent or path.absolute().parent) as staged:
        try:
            token_count = VaultStore.verify_checkpoint(staged.checkpoint_dir, staged.index, staged.view)
        except SnapshotRejected as error:
            raise BackupRefused(f"backup file {path} is refused: {error}") from None
        return VerifiedBackup(index=staged.index, view=staged.view, size_bytes=path.stat().st_size,
                              file_count=len(staged.manifest.files), token_count=token_count,
                              pending_shred=staged.manifest.pending)


# ---------------------------------------------------------------- restoring


@dataclass(frozen=True, slots=True)
class RestoredNode:
    node_id: str
    data_dir: Path
    index: int
    view: int
    epochs: int
    token_count: int
    # The backup's (its manifest's): the node's first shred pass takes those rows (None: nothing pending).
    pending_shred: PendingShred | None


def _check_empty_data_dir(data_dir: Path) -> None:
    if data_dir.is_symlink() or (data_dir.exists() and not data_dir.is_dir()):
        raise BackupError(f"data directory {data_dir} exists and is not a directory")
    if data_dir.exists() and any(data_dir.iterdir()):
        raise BackupError(f"data directory {data_dir} is not empty: a restore only fills an empty one (stop "
                          f"the node and move its data directory away first, or restore into a new one)")


def restore_data_dir(backup_file: Path, config: Any, master_key: Any = None) -> RestoredNode:
    """Fill the (empty or missing) data directory of ``config`` from ``backup_file``.

    ``master_key`` defaults to the config's (file or TOKENVAULT_MASTER_KEY); it must open every epoch of
    the backup, or nothing is written. Raises BackupRefused or BackupError.
    """
    data_dir = Path(config.data_dir).absolute()
    _check_empty_data_dir(data_dir)
    try:
        data_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:  # a file where a directory of the path should be, a read-only file system
        raise BackupError(f"cannot create {data_dir.parent}, the data directory's parent: "
                          f"{error.strerror or type(error).__name__}") from None
    with staged_backup(Path(backup_file), data_dir.parent) as staged:
        return install_staged(staged, config, master_key, consume=True)


def install_staged(staged: StagedSnapshot, config: Any, master_key: Any = None, *, consume: bool = False) -> RestoredNode:
    """Build the node's data directory from a staged, verified snapshot. The snapshot is copied, so one
    staged backup can fill several nodes, unless ``consume`` (then it is moved: the last or only node).
    The staging directory must be on the data directory's file system."""
    data_dir = Path(config.data_dir).absolute()
    _check_empty_data_dir(data_dir)
    try:
        key = master_key if master_key is not None else config.load_master_key()
    except CryptoError as error:
        raise BackupError(f"cannot load the master key of {config.node_id}: {error}") from None
    scratch: ScratchDirectory | None = None
    in_place = False
    try:
        scratch = ScratchDirectory.create(data_dir.parent, f".{data_dir.name}{BUILDING_INFIX}")
        building = scratch.path
        epochs, token_count = _install_store(building / STORE_DIR_NAME, staged, config, key, consume)
        _start_log_after(building / WAL_DIR_NAME, staged.index, staged.view, config)
        if (pending := staged.manifest.pending) is not None:
            # The backup may hold rows deleted and not yet shredded when it was taken; the restored node never
            # applies those deletes, so its first shred pass compacts their keys' ranges, or its whole key
            # space when the manifest does not list them.
            ShredRecord(building).record(staged.index, pending)
        fsync_tree(building)
        if data_dir.exists():
            data_dir.rmdir()  # empty, checked above; rename() cannot replace it on every file system
        os.replace(building, data_dir)  # the lock goes with the directory, which no longer has a scratch name
        in_place = True
        fsync_directory(data_dir.parent)
        scratch.release()
    except BaseException as error:
        if scratch is not None:
            scratch.remove()
        if in_place and isinstance(error, OSError):
            # The data directory is whole and in place; only the sync of its name failed (a failing disk).
            raise BackupError(f"the data directory of {config.node_id} is restored in {data_dir}, but syncing "
                              f"{data_dir.parent} failed ({error.strerror or error}): a crash before the next "
                              "sync could lose its name; run 'sync' before starting the node") from None
        if isinstance(error, (OSError, WalFatal)):
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise BackupError(f"cannot build the data directory of {config.node_id} in {data_dir.parent}: "
                              f"{reason}") from None
        if isinstance(error, ValueError):
            # A backup that verification passed and the store or the log still cannot take (the log refused
            # an index past 2**63 - 1 this way): a clear refusal, never a traceback. These messages name no value.
            raise BackupError(f"cannot build the data directory of {config.node_id} from this backup: "
                              f"{error}") from None
        raise
    return RestoredNode(config.node_id, data_dir, staged.index, staged.view, epochs, token_count,
                        staged.manifest.pending)


def _install_store(store_dir: Path, staged: StagedSnapshot, config: Any, master_key: Any, consume: bool) -> tuple[int, int]:
    """Install the staged checkpoint (moved when ``consume``, else a copy) as the live generation of a new
    store; returns (epochs, tokens) after checking that ``master_key`` unwraps every epoch secret in it."""
    checkpoint = store_dir.parent / "checkpoint"
    if consume:
        os.rename(staged.checkpoint_dir, checkpoint)
    else:
        shutil.copytree(staged.checkpoint_dir, checkpoint)
    try:
        # A new, empty store, into which the checkpoint is installed as a received snapshot would be:
        # prepare_install verifies it (RocksDB options, meta at (index, view), epochs, token count).
        store = VaultStore.open(store_dir, retention_ms=config.idempotency.retention_ms)
    except StoreError as error:
        raise BackupError(f"cannot create the store in {store_dir}: {error}") from None
    try:
        try:
            prepared = store.prepare_install(checkpoint, staged.index, staged.view)
            # commit_install loads the new generation's state (API keys, audit head and anchor, ...): a row it
            # cannot read raises the store's own error, a refusal like any other damage, not a traceback.
            store.commit_install(prepared).close()
        except StoreError as error:
            raise BackupRefused(f"the backup's checkpoint is refused: {error}") from None
        store.forget_membership()  # the new cluster starts with its own members, not the old cluster's
        if (store.applied_index, store.applied_view) != (staged.index, staged.view):
            raise BackupError(f"the installed store is at index {store.applied_index}, view "
                              f"{store.applied_view}, not the backup's {staged.index}, {staged.view}")
        records = store.epochs()
        try:
            KeyRing.from_wrapped(master_key, store.wrapped_secrets())  # a destroyed epoch has nothing to open
        except CryptoError:
            raise BackupError("the master key does not open the epoch secrets of this backup: it was taken "
                              "from a cluster with another master key (pass that cluster's master.key)") from None
        return len(records), store.token_count()
    finally:
        store.close()
        shutil.rmtree(checkpoint, ignore_errors=True)


def _start_log_after(wal_dir: Path, index: int, view: int, config: Any) -> None:
    """An empty replication log that starts after (index, view), with a hard state in that view."""
    wal, _ = WriteAheadLog.open(wal_dir, max_segment_bytes=config.wal.max_segment_bytes, fsync=True)
    try:
        # The hard state first: reset_base syncs it and copies it into the new segment's header.
        wal.append(truncate_from=None, entries=(), hard_state=HardState(view, None, index))
        wal.reset_base(index, view)
    finally:
        wal.close()
