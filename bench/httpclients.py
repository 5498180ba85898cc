"""The two HTTP clients the load generator can drive a target with.

`aiohttp` is the general-purpose client. `raw` is a minimal HTTP/1.1 client
written on asyncio's Protocol API: one keep-alive connection per worker, the
request written as one buffer, the response read by Content-Length (or
chunked transfer coding). It does far less per request than aiohttp, so on a
machine where the load generator shares the cores with the system under test
it leaves more of them to the target. Both present the same interface:

    async with open_client("raw", concurrency) as client:
        status, body = await client.post(worker, url, data, headers)

Responses are bounded (headers 64 KiB, body 64 MiB) and anything malformed
raises ValueError; a dropped connection raises ConnectionError.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

REQUEST_TIMEOUT_SECONDS = 30.0
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
CLIENT_KINDS = ("aiohttp", "raw")


def ssl_context_for(ca_file: str | Path | None) -> ssl.SSLContext | None:
    """Verification against the cluster CA for https:// nodes (None: plain http, or the system's CAs)."""
    if not ca_file:
        return None
    from tokenvault.crypto.tls import http_client_context

    return http_client_context(Path(ca_file))


class AiohttpClient:
    """aiohttp's ClientSession behind the common `post` interface."""

    def __init__(self, concurrency: int, ca_file: str | Path | None = None) -> None:
        context = ssl_context_for(ca_file)
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=False,
                                         ssl=context if context is not None else True)
        self._session = aiohttp.ClientSession(connector=connector,
                                              timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS))

    async def post(self, worker: int, url: str, data: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        async with self._session.post(url, data=data, headers=headers) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        await self._session.close()


def parse_response(buffer: bytearray | bytes) -> tuple[int, bytes, int, bool] | None:
    """One complete HTTP/1.1 response at the start of ``buffer``, or None if more bytes are needed.

    Returns (status, body, bytes consumed, keep-alive). Raises ValueError for
    anything malformed or over the limits.
    """
    header_end = buffer.find(b"\r\n\r\n")
    if header_end < 0:
        if len(buffer) > MAX_HEADER_BYTES:
            raise ValueError("response headers too large")
        return None
    if header_end > MAX_HEADER_BYTES:
        raise ValueError("response headers too large")
    lines = bytes(buffer[:header_end]).split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise ValueError("malformed status line")
    status = int(parts[1])
    length: int | None = None
    chunked = False
    keep_alive = parts[0] == b"HTTP/1.1"
    for line in lines[1:]:
        name, separator, value = line.partition(b":")
        if not separator:
            raise ValueError("malformed header line")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            if not value.isdigit() or int(value) > MAX_BODY_BYTES:
                raise ValueError("bad Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.endswith(b"chunked")
        elif name == b"connection":
            keep_alive = value == b"keep-alive" if parts[0] == b"HTTP/1.0" else value != b"close"
    start = header_end + 4
    if chunked:
        return _parse_chunked(buffer, start, status, keep_alive)
    if length is None:
        if status in (204, 304) or 100 <= status < 200:
            return status, b"", start, keep_alive
        raise ValueError("response without Content-Length or chunked coding")
    if len(buffer) < start + length:
        return None
    return status, bytes(buffer[start:start + length]), start + length, keep_alive


def _parse_chunked(buffer: bytearray | bytes, position: int, status: int,
                   keep_alive: bool) -> tuple[int, bytes, int, bool] | None:
    body = bytearray()
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            if len(buffer) - position > 1024:
                raise ValueError("chunk size line too long")
            return None
        size_text = bytes(buffer[position:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ValueError("bad chunk size") from None
        if size < 0 or len(body) + size > MAX_BODY_BYTES:
            raise ValueError("chunked body too large")
        data_start = line_end + 2
        if size == 0:
            # Trailers (rare) end with an empty line as well.
            trailer_end = buffer.find(b"\r\n\r\n", line_end)
            if buffer[data_start:data_start + 2] == b"\r\n":
                return status, bytes(body), data_start + 2, keep_alive
            if trailer_end < 0:
                return None
            return status, bytes(body), trailer_end + 4, keep_alive
        if len(buffer) < data_start + size + 2:
            return None
        if buffer[data_start + size:data_start + size + 2] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        body += buffer[data_start:data_start + size]
        position = data_start + size + 2


class _RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            parsed = parse_response(self.buffer)
        except ValueError as error:
            waiter.set_exception(error)
            return
        if parsed is not None:
            status, body, consumed, keep_alive = parsed
            del self.buffer[:consumed]
            waiter.set_result((status, body, keep_alive))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("the server closed the connection"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class RawClient:
    """Minimal HTTP/1.1 client: one keep-alive connection per (worker, host, port)."""

    def __init__(self, ca_file: str | Path | None = None) -> None:
        self._connections: dict[tuple[int, str, int], _RawConnection] = {}
        self._targets: dict[str, tuple[str, int, str, bool]] = {}
        self._ssl_context = ssl_context_for(ca_file)

    def _target(self, url: str) -> tuple[str, int, str, bool]:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or parts.hostname is None:
                raise ValueError("the raw client speaks http:// and https:// only")
            if parts.scheme == "https" and self._ssl_context is None:
                raise ValueError("https:// needs the cluster CA (ca_file)")
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            secure = parts.scheme == "https"
            target = (parts.hostname, parts.port or (443 if secure else 80), path, secure)
            self._targets[url] = target
        return target

    async def post(self, worker: int, url: str, data: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        host, port, path, secure = self._target(url)
        key = (worker, host, port)
        connection = self._connections.get(key)
        loop = asyncio.get_running_loop()
        if connection is None or connection.closed:
            tls = {"ssl": self._ssl_context, "server_hostname": host} if secure else {}
            _, connection = await loop.create_connection(_RawConnection, host, port, **tls)
            self._connections[key] = connection
        head = [f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(data)}\r\n"]
        head.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        head.append("\r\n")
        waiter = loop.create_future()
        connection.waiter = waiter
        assert connection.transport is not None
        connection.transport.write("".join(head).encode("latin-1") + data)
        timer = loop.call_later(REQUEST_TIMEOUT_SECONDS, _expire, waiter)
        try:
            status, body, keep_alive = await waiter
        except BaseException:
            connection.close()
            raise
        finally:
            timer.cancel()
            connection.waiter = None
        if not keep_alive:
            connection.close()
        return status, body

    async def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


@contextlib.asynccontextmanager
async def open_client(kind: str, concurrency: int,
                      ca_file: str | Path | None = None) -> AsyncIterator[AiohttpClient | RawClient]:
    if kind not in CLIENT_KINDS:
        raise ValueError(f"unknown client {kind!r}; choose one of {', '.join(CLIENT_KINDS)}")
    client: AiohttpClient | RawClient = (AiohttpClient(concurrency, ca_file) if kind == "aiohttp"
                                         else RawClient(ca_file))
    try:
        yield client
    finally:
        await client.close()
