"""The client half of `tokenvault admin backup`: download a node's backup, verify it, keep it.

``download_backup`` prefers the primary (from ``/health``), writes ``FILE.partial`` (never a byte past
the count the node announced in ``X-TokenVault-Backup-Bytes``, and exactly that many), fsyncs it,
stages the whole stream once more to verify it (tokenvault.core.backup.verify_backup_file, the code
that checks a snapshot before a node installs it), and only then renames it to ``FILE``. It talks to
the nodes with the client library's TLS settings and errors (tokenvault.client.vault). No error
message here ever holds a value, a token or a key.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import aiohttp

from tokenvault.client.vault import (AsyncClient, NoNodeAvailable, ProblemError, client_ssl_context, parse_retry_after,
                                     printable_text)
from tokenvault.core.backup import (BACKUP_CHUNK_BYTES, BACKUP_CONTENT_TYPE, HEADER_BYTES, HEADER_INDEX, HEADER_NODE,
                                    HEADER_ROLE, HEADER_VIEW, MAX_HEADER_DIGITS, PARTIAL_SUFFIX, ROUTE_BACKUP,
                                    BackupError, BackupRefused, verify_backup_file)
from tokenvault.core.snapshots import PendingShred
from tokenvault.smallfiles import fsync_directory

Report = Callable[[str], None]


def _silent(message: str) -> None:
    del message


@dataclass(frozen=True, slots=True)
class AnnouncedBackup:
    """The backup a node streamed, as its response headers announced it, and the URL it came from."""

    url: str
    node_id: str | None
    role: str | None
    index: int
    view: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class DownloadedBackup(AnnouncedBackup):
    """A backup received, verified and renamed into place: what was announced, and what verifying it found."""

    path: Path
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


async def _download_from(session: Any, url: str, headers: dict[str, str], partial: Path,
                         report: Report) -> AnnouncedBackup:
    async with session.get(url + ROUTE_BACKUP, headers=headers, allow_redirects=False) as response:
        if response.status != 200:
            problem = await _problem_document(response)
            title = printable_text(str(problem.get("title") or f"HTTP {response.status}"), 200)
            if response.status == 503:
                raise _Busy(title, _retry_after(response.headers.get("Retry-After")))
            raise ProblemError(response.status, title, printable_text(str(problem.get("detail") or ""), 1000),
                               printable_text(str(problem.get("type") or "about:blank"), 1000), url)
        index, view = _header_int(response, HEADER_INDEX), _header_int(response, HEADER_VIEW)
        announced_bytes = _header_int(response, HEADER_BYTES)
        # The node's words for itself reach the terminal: each character that is not printable a '?'.
        node_id, role = (printable_text(value, 64) if value is not None else None
                         for value in (response.headers.get(HEADER_NODE), response.headers.get(HEADER_ROLE)))
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
        return AnnouncedBackup(url, node_id, role, index, view, size_bytes)


async def _finish_download(received: AnnouncedBackup, partial: Path, destination: Path,
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
    try:
        os.replace(partial, destination)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise BackupError(f"cannot rename {partial} to {destination}: {error.strerror or error}; nothing was "
                          "kept, run the command again") from None
    try:
        fsync_directory(destination.parent)
    except OSError as error:
        raise BackupError(f"{destination} is written and verified, but its directory could not be synced "
                          f"({error.strerror or error}): a crash now could lose the name; run 'sync' or take "
                          "the backup again") from None
    announced = {field.name: getattr(received, field.name) for field in fields(AnnouncedBackup)}
    return DownloadedBackup(**announced, path=destination, seconds=time.monotonic() - started,
                            token_count=verified.token_count, pending_shred=verified.pending_shred)


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
