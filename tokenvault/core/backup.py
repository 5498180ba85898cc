"""Online backup of a live node, and restore of a node's data directory from a backup.

A backup is a snapshot stream (``tokenvault.core.snapshots``): a header with the
manifest (format version, applied index and view, file names, sizes and
SHA-256 each), the bytes of a consistent checkpoint of the store, and a
trailing SHA-256 of everything before it. The same stream ships a store to a
lagging backup node, so a backup file is checked by exactly the code that
checks a snapshot before a node installs it.

Three parts:

- **Serving** (``BackupStream``): ``GET /v1/admin/backup`` takes a checkpoint
  of the store of the node the request reached and streams it. Every blocking
  step (the checkpoint, each 1 MiB read, the clean-up) runs in a worker
  thread, so the event loop never waits on the disk and writes go on while a
  backup streams; at most ``[http] max_backup_streams`` (default 1) run at a
  time per node, further requests get 503 with ``Retry-After``. The checkpoint is
  deleted when the response ends, fails, or the client goes away.
- **Downloading** (``download_backup``, used by ``tokenvault admin backup``):
  prefers the primary (from ``/health``), writes ``FILE.partial`` (never a
  byte past the count the node announced in ``X-TokenVault-Backup-Bytes``, and
  exactly that many), fsyncs it, stages the whole stream once more to verify
  it, and only then renames it to ``FILE``.
- **Restoring** (``restore_data_dir``, used by ``tokenvault admin restore`` and
  ``./run_cluster.sh restore``): refuses a data directory that is not empty,
  stages and verifies the backup, checks that the master key opens every epoch
  in it, installs the checkpoint as the store's first generation and starts the
  replication log after (index, view). The directory is built next to the
  target and renamed into place, so a failed restore leaves nothing behind.

A backup holds what the node had applied when it was taken: on the primary,
everything acknowledged before the request started; on a backup node, a
consistent prefix of the log that may be a little older. No error message here
ever holds a value, a token or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from protocol import HardState
from tokenvault.client.vault import AsyncClient, NoNodeAvailable, ProblemError, client_ssl_context, parse_retry_after
from tokenvault.crypto.keys import CryptoError, KeyRing
from tokenvault.errors import Unavailable
from tokenvault.logs import get_logger
from tokenvault.core.shred import ShredRecord
from tokenvault.core.snapshots import (PendingShred, ShredState, SnapshotSource, StagedSnapshot, create_source,
                                      stage_file)
from tokenvault.core.store import VaultStore
from tokenvault.core.store_files import fsync_tree
from tokenvault.core.store_layout import SnapshotRejected, StoreError
from tokenvault.core.wal import WalFatal, WriteAheadLog, fsync_directory

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

Report = Callable[[str], None]


def _silent(message: str) -> None:
    del message


class BackupBusy(Unavailable):
    """This node already streams as many backups as it allows; the request had no effect."""

    problem = "backup-busy"

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
    # leftover of a process that died mid-stream and is removed when the next stream opens.
    _active_work_dirs: set[Path] = set()
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
        cls._active_work_dirs.add(work_dir)
        created = asyncio.ensure_future(_create_source(store, work_root, work_dir, frozenset(cls._active_work_dirs),
                                                       shreds))
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
            cls._active_work_dirs.discard(work_dir)  # on the loop's thread, like every other use of the set

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


async def _create_source(store: Any, work_root: Path, work_dir: Path, active: frozenset[Path],
                         shreds: ShredState) -> SnapshotSource:
    await asyncio.to_thread(_remove_leftovers, work_root, active)
    return await create_source(store, work_dir, shreds, asyncio.to_thread)


def _remove_leftovers(work_root: Path, active: frozenset[Path]) -> None:
    work_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for leftover in work_root.iterdir():
        if leftover not in active:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


# ---------------------------------------------------------------- verifying


@dataclass(frozen=True, slots=True)
class VerifiedBackup:
    """What a verified backup holds (no secret in it)."""

    index: int
    view: int
    size_bytes: int
    file_count: int
    token_count: int | None
    # Rows it may hold that were deleted and not yet shredded when it was taken (its manifest; None: none).
    pending_shred: PendingShred | None


def shred_scope(pending: PendingShred) -> str:
    """What a node restored from a backup holding ``pending`` compacts at its start, for the operator."""
    count = pending.key_count
    return "its whole store" if count is None else f"the ranges of the {count} keys the backup lists"


def _staged_summary(staged: StagedSnapshot, size_bytes: int) -> VerifiedBackup:
    # The manifest (format 1) has no token count; a later format may carry one.
    token_count = getattr(staged.manifest, "token_count", None)
    return VerifiedBackup(index=staged.index, view=staged.view, size_bytes=size_bytes,
                          file_count=len(staged.manifest.files),
                          token_count=token_count if isinstance(token_count, int) else None,
                          pending_shred=staged.manifest.pending)


@contextlib.contextmanager
def staged_backup(path: Path, scratch_parent: Path) -> Any:
    """Stage and verify the backup file in a temporary directory under ``scratch_parent``; yields the
    StagedSnapshot and removes the directory afterwards. Raises BackupRefused or BackupError."""
    path = Path(path)
    if not path.is_file():
        raise BackupError(f"backup file {path} does not exist or is not a file")
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".tokenvault-restore-", dir=scratch_parent))
    except OSError as error:
        raise BackupError(f"cannot create a staging directory in {scratch_parent}: {error.strerror}") from None
    try:
        try:
            staged = stage_file(path, scratch / "staged")
        except SnapshotRejected as error:
            raise BackupRefused(f"backup file {path} is refused: {error}") from None
        except OSError as error:
            raise BackupError(f"cannot read backup file {path}: {error.strerror}") from None
        yield staged
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def verify_backup_file(path: Path, scratch_parent: Path | None = None) -> VerifiedBackup:
    """Check a whole backup file by staging it once: trailer, manifest, every file's SHA-256, and then the
    checkpoint itself as a store would before installing it (RocksDB opens it; meta, epochs, token count)."""
    path = Path(path)
    with staged_backup(path, scratch_parent or path.absolute().parent) as staged:
        try:
            VaultStore.verify_checkpoint(staged.checkpoint_dir, staged.index, staged.view)
        except SnapshotRejected as error:
            raise BackupRefused(f"backup file {path} is refused: {error}") from None
        return _staged_summary(staged, path.stat().st_size)


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
    data_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
    building: Path | None = None
    try:
        building = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.restoring-", dir=data_dir.parent))
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
        os.replace(building, data_dir)
        fsync_directory(data_dir.parent)
    except BaseException as error:
        if building is not None:
            shutil.rmtree(building, ignore_errors=True)
        if isinstance(error, (OSError, WalFatal)):
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise BackupError(f"cannot build the data directory of {config.node_id} in {data_dir.parent}: "
                              f"{reason}") from None
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
        store = VaultStore.open(store_dir, retention_ms=config.idempotency.retention_hours * 3600 * 1000)
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
            KeyRing.from_wrapped(master_key, ((record.epoch, record.wrapped_secret) for record in records))
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


# ---------------------------------------------------------------- downloading


@dataclass(frozen=True, slots=True)
class DownloadedBackup:
    path: Path
    url: str
    node_id: str | None
    role: str | None
    index: int
    view: int
    size_bytes: int
    seconds: float
    token_count: int | None
    pending_shred: PendingShred | None


async def order_by_role(urls: Sequence[str], prefer: str, health: Callable[[str], Any]) -> list[str]:
    """The URLs with the preferred role first ("primary" or "backup"; "any" keeps the order);
    nodes that do not answer /health go last."""
    if prefer == "any":
        return list(urls)

    async def role_of(url: str) -> str | None:
        try:
            answer = await health(url)
        except Exception:  # noqa: BLE001 - an unreachable node is simply tried last
            return None
        role = answer.get("role") if isinstance(answer, dict) else None
        return role if isinstance(role, str) else None

    roles = await asyncio.gather(*(role_of(url) for url in urls))
    ranked = sorted(range(len(urls)), key=lambda i: (roles[i] is None, roles[i] != prefer, i))
    return [urls[i] for i in ranked]


async def download_backup(urls: Sequence[str], api_key: str | None, destination: Path, *,
                          prefer: str = "primary", timeout_seconds: float = 5.0, retry_seconds: float = 10.0,
                          read_timeout_seconds: float = 60.0, overwrite: bool = False,
                          report: Report = _silent, ca_file: str | Path | None = None) -> DownloadedBackup:
    """Download a backup to ``destination`` (via ``destination.partial``), fsync it, verify it, rename it.

    Tries the nodes in order of preference; a node that is unreachable or busy (503) before the
    stream starts is skipped, and after a full round the download waits (Retry-After, capped at
    2 s) until ``retry_seconds`` have passed. A stream that breaks off midway fails the download.
    Raises the client's errors (ProblemError, NoNodeAvailable), BackupRefused or BackupError.
    """
    destination = Path(destination).absolute()
    if destination.exists() and not overwrite:
        raise BackupError(f"{destination} exists already; choose another --out or pass --force")
    if not destination.parent.is_dir():
        raise BackupError(f"directory {destination.parent} does not exist")
    partial = destination.with_name(destination.name + PARTIAL_SUFFIX)
    async with AsyncClient(urls, api_key, timeout_seconds=timeout_seconds, ca_file=ca_file) as client:
        ordered = await order_by_role(client.urls, prefer, client.health)
    ssl_context = client_ssl_context(ca_file)
    connector = aiohttp.TCPConnector(ssl=ssl_context) if ssl_context is not None else None
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_seconds
    failures: list[str] = []
    timeout = aiohttp.ClientTimeout(total=None, connect=timeout_seconds, sock_connect=timeout_seconds,
                                    sock_read=read_timeout_seconds)
    headers = {"Accept": f"{BACKUP_CONTENT_TYPE}, application/problem+json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        while True:
            wait_seconds = 0.2
            for url in ordered:
                try:
                    result = await _download_from(session, url, headers, partial, report)
                except _Busy as busy:
                    failures.append(f"{url}: 503 {busy.title}")
                    wait_seconds = max(wait_seconds, busy.retry_after_seconds)
                    continue
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    # Before the stream started (a broken stream is a BackupError): try the next node.
                    failures.append(f"{url}: {type(error).__name__}")
                    continue
                if result is not None:
                    return await _finish_download(result, partial, destination, started)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NoNodeAvailable(failures[-12:])
            await asyncio.sleep(min(wait_seconds, 2.0, remaining))


class _Busy(Exception):
    def __init__(self, title: str, retry_after_seconds: float) -> None:
        super().__init__(title)
        self.title = title
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True, slots=True)
class _Received:
    url: str
    node_id: str | None
    role: str | None
    index: int
    view: int
    size_bytes: int


async def _download_from(session: Any, url: str, headers: dict[str, str], partial: Path,
                         report: Report) -> _Received:
    async with session.get(url + ROUTE_BACKUP, headers=headers, allow_redirects=False) as response:
        if response.status != 200:
            problem = await _problem_document(response)
            title = str(problem.get("title") or f"HTTP {response.status}")[:200]
            if response.status == 503:
                raise _Busy(title, _retry_after(response.headers.get("Retry-After")))
            raise ProblemError(response.status, title, str(problem.get("detail") or "")[:1000],
                               str(problem.get("type") or "about:blank"), url)
        index, view = _header_int(response, HEADER_INDEX), _header_int(response, HEADER_VIEW)
        announced_bytes = _header_int(response, HEADER_BYTES)
        node_id, role = response.headers.get(HEADER_NODE), response.headers.get(HEADER_ROLE)
        report(f"streaming the backup of {node_id or url} ({role or 'unknown role'}) at index {index}, "
               f"view {view}")
        size_bytes = 0
        try:
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                try:
                    async for chunk in response.content.iter_chunked(BACKUP_CHUNK_BYTES):
                        # The node announced the stream's size: a byte past it is never written.
                        if size_bytes + len(chunk) > announced_bytes:
                            raise BackupError(f"the backup stream from {url} goes on past the {announced_bytes} "
                                              f"bytes its {HEADER_BYTES} header announced; nothing was kept")
                        handle.write(chunk)
                        size_bytes += len(chunk)
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    raise BackupError(f"the backup stream from {url} broke off after {size_bytes} bytes "
                                      f"({type(error).__name__}); nothing was kept, run the command again") \
                        from None
                if size_bytes != announced_bytes:
                    raise BackupError(f"the backup stream from {url} ended after {size_bytes} of the "
                                      f"{announced_bytes} bytes its {HEADER_BYTES} header announced; nothing "
                                      f"was kept, run the command again")
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException as error:
            partial.unlink(missing_ok=True)
            if isinstance(error, OSError):
                raise BackupError(f"cannot write {partial}: {error.strerror or error}") from None
            raise
        return _Received(url, node_id, role, index, view, size_bytes)


async def _finish_download(received: _Received, partial: Path, destination: Path,
                           started: float) -> DownloadedBackup:
    try:
        verified = await asyncio.to_thread(verify_backup_file, partial, destination.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if (verified.index, verified.view) != (received.index, received.view):
        partial.unlink(missing_ok=True)
        raise BackupRefused(f"the backup's manifest says index {verified.index}, view {verified.view}, but the "
                            f"node announced {received.index}, {received.view}")
    os.replace(partial, destination)
    fsync_directory(destination.parent)
    return DownloadedBackup(destination, received.url, received.node_id, received.role, received.index,
                            received.view, received.size_bytes, time.monotonic() - started,
                            verified.token_count, verified.pending_shred)


async def _problem_document(response: Any) -> dict[str, Any]:
    try:
        document = json.loads(await response.content.read(65536))
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: nesting deeper than the parser's stack (e.g. 5000 '[') fits in 64 KiB.
        return {}
    return document if isinstance(document, dict) else {}


def _retry_after(value: str | None) -> float:
    """The wait before asking a busy node again: its Retry-After (client.vault's reading of it), at most
    2 s; 1 s when it gave none that reads as a number."""
    seconds = parse_retry_after(value, 2.0)
    return 1.0 if seconds is None else seconds


def _header_int(response: Any, name: str) -> int:
    """A non-negative integer header of the backup response (at most 20 digits: a 64-bit count)."""
    text = response.headers.get(name, "").strip()
    # Why ASCII: str.isdigit() also accepts digits such as '²', which int() refuses.
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_HEADER_DIGITS):
        raise BackupError(f"the backup response lacks a valid {name} header (a decimal number of at most "
                          f"{MAX_HEADER_DIGITS} digits); nothing was kept")
    return int(text)
