"""The node's HTTP/1.1 server: an asyncio protocol on httptools' parser (llhttp), with the vault's own
request and response types.

It replaces aiohttp's server (the vault keeps aiohttp's client): aiohttp's
request and response objects and its connection handler cost a worker 31-37 µs
of CPU per request even without its application layer, this server 18-22, a
bare protocol on the same parser 8 (``bench/http_floor.py``), and a worker
spends all its time on requests. What the server does, and its bounds:

- **Connections.** At most ``max_connections`` open at once, each counted
  from its accept: over TLS the server accepts the socket itself and only
  then runs the handshake, so connections still in their handshake count
  too (the event loop's own TLS server would hold any number of them,
  uncounted). One more is answered ``503`` (problem+json) and closed as soon
  as it is accepted; over TLS it is closed at once with no handshake (an
  answer would cost the handshake that the bound is there to refuse). A TLS
  handshake must be done within ``header_timeout_seconds`` of the accept. A
  connection must deliver a request's headers within
  ``header_timeout_seconds`` of opening (of its handshake's end, over TLS) or
  of its previous response, or it is closed (an idle keep-alive connection
  is one waiting for headers); a request being handled is never cut off by
  it. Keep-alive follows HTTP/1.1 (and
  HTTP/1.0's ``Connection: keep-alive``).
- **Hostile bytes.** A request target (path and query) over ``MAX_LINE_BYTES``, a header line over
  ``MAX_LINE_BYTES``, more than ``MAX_HEADERS`` headers or a header block over
  ``MAX_HEAD_BYTES`` is refused (414 / 431) before more is buffered (a chunked
  body's trailer section is a header block too, and a chunk's framing is
  counted with it: the bytes that are not body, as exactly as one read allows;
  the refusal answers the request even once its handler has begun); anything
  llhttp rejects (a bad request line, a control character in a header, a bad
  chunk, both Content-Length and chunked), a transfer coding other than
  chunked alone and any ``Transfer-Encoding`` in a request that is not
  HTTP/1.1 (faulty framing in HTTP/1.0, RFC 9112 6.1) are ``400``. These
  answers are built by the application's ``malformed`` callback from fixed
  texts (never the offending bytes) and close the connection: its sending side
  at once, the rest after what the client still sends has been read and
  dropped (at most ``LINGER_SECONDS``), so that the answer is not lost to a
  reset. A request to switch protocols is answered without switching, and the
  connection closes behind it (a streamed answer too: nothing more is read, so
  no timer would ever close it). Requests
  pipelined behind the one being answered are parsed ahead at most one read
  at a time (the transport is paused meanwhile) and at most ``MAX_PIPELINED``.
- **Bodies.** llhttp removes the chunked framing; ``Content-Encoding`` gzip and
  deflate (the zlib wrapper or raw deflate) are decoded as the handler reads,
  never more than ``max_body_bytes`` decoded nor taken as sent (a larger body
  is ``BodyTooLarge``). Such a body is one whole stream: a broken one, one cut
  short (checked at the end of the body, however its last piece was read) and
  one with bytes after the stream's end (a second gzip member too) are
  ``BodyError``, as is any other encoding. A piece that decodes to nothing (a
  gzip header, a checksum) is not the end: ``readany`` returns ``b""`` only at
  the end of the body. At most ``READ_AHEAD_BYTES`` of a body wait in memory
  for the handler: past that the transport stops reading until the handler
  takes them. A handler that answers
  before reading the whole body closes the connection behind its response (a
  connection mid-body cannot carry another request).
- **Answers.** One handler call per request, in order; a response is one write
  (``Content-Length``, or chunked for a ``StreamResponse``, which waits for the
  transport to drain). A client that does not read its answers gets no next
  request handled until it has read enough of this one (down to the
  transport's high-water mark), so unread answers never pile up; one that
  reads nothing of it for ``header_timeout_seconds`` is disconnected, of a
  streamed answer too (the stream's write then raises ``ConnectionResetError``,
  as for a client gone). ``HEAD`` gets the headers of the answer without its
  body. A client that goes away does not cancel its handler: its response is
  dropped (and a ``100 Continue`` to it is not sent: its body read fails).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import errno
import re
import socket
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, unquote

import httptools
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from tokenvault.logs import get_logger

_log = get_logger("tokenvault.api.httpserver")

MAX_LINE_BYTES = 8190  # the request target, and each header line (aiohttp's limits, and most servers')
MAX_HEADERS = 100
MAX_HEAD_BYTES = 64 * 1024
READ_AHEAD_BYTES = 64 * 1024
MAX_PIPELINED = 64
LINGER_SECONDS = 1.0
LISTEN_BACKLOG = 1024  # connections a listening socket queues before they are accepted
# accept() failing for want of descriptors or memory (or any error that is not one client's): wait this
# long before the next, as asyncio's own servers do, rather than spin (open connections are served on).
ACCEPT_RETRY_SECONDS = 1.0
# accept() errors that concern one connection only (reset or aborted before it was taken): go on at once.
_ACCEPT_CLIENT_ERRORS = frozenset({errno.ECONNABORTED, errno.ECONNRESET, errno.EAGAIN, errno.EWOULDBLOCK,
                                   errno.EINTR, errno.EPROTO, errno.EPERM})
HttpVersion = tuple[int, int]
HTTP_11: HttpVersion = (1, 1)


class BodyError(Exception):
    """The request body could not be read: a broken transfer or content encoding (a client error)."""


class BodyTooLarge(BodyError):
    """The decoded request body is larger than the server's ``max_body_bytes``."""


class _Head:
    """A response's status and headers (a copy: the caller's mapping is never changed), and whether
    the connection closes behind it."""

    __slots__ = ("status", "headers", "closing")

    def __init__(self, status: int, headers: Mapping[str, str] | None, content_type: str | None) -> None:
        self.status = status
        self.headers: dict[str, str] = dict(headers) if headers else {}
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self.closing = False

    def force_close(self) -> None:
        """Close the connection once this response is written."""
        self.closing = True


class Response(_Head):
    """A whole response: status, headers and body, written in one piece."""

    __slots__ = ("body",)

    def __init__(self, *, body: bytes = b"", status: int = 200, headers: Mapping[str, str] | None = None,
                 content_type: str | None = None) -> None:
        super().__init__(status, headers, content_type)
        self.body = body


class StreamResponse(_Head):
    """A response sent in chunks (chunked transfer coding) as the handler produces them:
    ``await prepare(request)``, ``await write(data)`` ..., ``await write_eof()``; each write waits for
    the client to take what is buffered. The status cannot change once prepared."""

    __slots__ = ("_request", "_done")

    def __init__(self, *, status: int = 200, headers: Mapping[str, str] | None = None,
                 content_type: str | None = None) -> None:
        super().__init__(status, headers, content_type)
        self._request: Request | None = None
        self._done = False

    async def prepare(self, request: Request) -> None:
        if self._request is not None:
            return
        self._request = request
        connection = request.connection
        self.closing = connection.start_stream(request, self.status, self.headers, self.closing)
        await connection.drain()

    async def write(self, data: bytes) -> None:
        if self._request is None or self._done:
            raise RuntimeError("write before prepare or after write_eof")
        if data:
            connection = self._request.connection
            connection.write(b"%x\r\n%b\r\n" % (len(data), data))
            await connection.drain()

    async def write_eof(self) -> None:
        if self._request is None or self._done:
            return
        self._done = True
        connection = self._request.connection
        connection.write(b"0\r\n\r\n")
        await connection.drain()
        connection.finish_answer(self._request, self.closing)


AnyResponse = Response | StreamResponse


class Request:
    """One parsed request: method, path, headers, query, and its body as it arrives.

    Also a small mapping (``request[key] = value``) for what the application
    keeps per request. ``connection`` is the connection it came on."""

    __slots__ = ("method", "raw_path", "query_string", "version", "headers", "keep_alive", "body_exists",
                 "content_length", "connection", "_values", "_chunks", "_buffered", "_complete", "_failed",
                 "_waiter", "_decoder", "_encoded", "_decoded", "_query", "answered", "_path_safe")

    def __init__(self, connection: _Connection, method: str, raw_path: str, query_string: str,
                 version: HttpVersion, headers: CIMultiDictProxy[str], keep_alive: bool,
                 content_length: int | None, body_exists: bool) -> None:
        self.connection = connection
        self.method = method
        self.raw_path = raw_path
        self.query_string = query_string
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.body_exists = body_exists
        self.answered = False
        self._values: dict[Any, Any] = {}
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = not body_exists
        self._failed: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._decoder: _Inflater | None = None
        self._encoded = 0
        self._decoded = 0
        self._query: MultiDictProxy[str] | None = None
        self._path_safe: str | None = None

    # ------------------------------------------------------------ what the application keeps
    def __getitem__(self, key: Any) -> Any:
        return self._values[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._values[key] = value

    def __contains__(self, key: Any) -> bool:
        return key in self._values

    def get(self, key: Any, default: Any = None) -> Any:
        return self._values.get(key, default)

    # ------------------------------------------------------------ the request line and headers
    @property
    def path_safe(self) -> str:
        """The path percent-decoded, except ``%2F`` and ``%25`` (so a segment never spans a ``/``)."""
        if self._path_safe is None:
            raw = self.raw_path
            self._path_safe = raw if "%" not in raw else "".join(
                part if index % 2 else unquote(part) for index, part in enumerate(_PROTECTED.split(raw)))
        return self._path_safe

    @property
    def query(self) -> MultiDictProxy[str]:
        if self._query is None:
            self._query = MultiDictProxy(MultiDict(parse_qsl(self.query_string, keep_blank_values=True)))
        return self._query

    @property
    def content_type(self) -> str:
        """The media type of Content-Type, lower case ("" when absent)."""
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    @property
    def charset(self) -> str | None:
        """The ``charset`` parameter of Content-Type, or None."""
        for parameter in self.headers.get("Content-Type", "").split(";")[1:]:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "charset":
                return value.strip().strip('"') or None
        return None

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.connection.transport

    def send_continue(self) -> None:
        """``100 Continue``: the client waits for it before sending a body it announced with Expect. To a
        client already gone nothing is sent: reading the body then fails as for any client gone mid-body."""
        try:
            self.connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        except ConnectionError:
            pass

    # ------------------------------------------------------------ the body
    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_AHEAD_BYTES:
            self.connection.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self._complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self._complete:
            self._failed = error
            self._wake()

    @property
    def body_complete(self) -> bool:
        """Whether the whole body has arrived (it may still wait to be read)."""
        return self._complete

    def at_eof(self) -> bool:
        return self._complete and not self._chunks

    def read_nowait(self) -> bytes:
        """What has arrived and not been read, decoded; b"" when nothing has, when what has decodes to
        nothing yet (a piece of a compressed body can), or at the end (``at_eof()`` tells which). Once
        the end has come and all is read, a content encoding that did not finish is BodyError, whether
        its last piece was read with the end or before it."""
        data = b""
        if self._chunks:
            received = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            self.connection.resume_reading()
            data = self._decode(received)
        elif self._failed is not None:
            raise BodyError("the request body ended early") from self._failed
        if self._complete and not self._chunks and self._decoder is not None and not self._decoder.finished:
            raise BodyError("the request body's content encoding is cut short")
        return data

    async def readany(self) -> bytes:
        """The next piece of the body, decoded, waiting for it; b"" only at the end (pieces of a
        compressed body that decode to nothing are waited past)."""
        while True:
            while not self._chunks and not self._complete:
                if self._failed is not None:
                    raise BodyError("the request body ended early") from self._failed
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            data = self.read_nowait()
            if data or self.at_eof():
                return data

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _decode(self, data: bytes) -> bytes:
        decoder = self._decoder
        if decoder is None:
            encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding == "identity":
                return data
            if encoding not in ("gzip", "x-gzip", "deflate"):
                raise BodyError("unsupported content encoding")
            # gzip: the gzip wrapper; deflate: the zlib wrapper, or raw deflate as some clients send.
            decoder = self._decoder = _Inflater(16 + zlib.MAX_WBITS if encoding != "deflate" else None)
        limit = self.connection.server.app.max_body_bytes
        # The bytes as sent are held to the bound too (a declared Content-Length is, before any is read): a
        # chunked body's stream could go on without end and decode to nothing (empty blocks, a gzip name).
        self._encoded += len(data)
        if self._encoded > limit:
            raise BodyTooLarge("the request body as sent is too large")
        try:
            out: bytes = decoder.decompress(data, limit + 1 - self._decoded)
        except zlib.error:
            raise BodyError("the request body's content encoding is broken") from None
        self._decoded += len(out)
        if self._decoded > limit or decoder.unconsumed:
            raise BodyTooLarge("the decoded request body is too large")
        if decoder.data_after_end:  # a second gzip member too: one stream is what is decoded
            raise BodyError("the request body's content encoding is broken: data after its end")
        return out


_PROTECTED = re.compile(r"(%2[Ff]|%25)")


class _Inflater:
    """zlib decoding with an output bound, of one whole stream; ``wbits`` None: "deflate", the zlib
    wrapper or raw deflate (told apart by the wrapper's two-byte header), else as zlib takes it."""

    def __init__(self, wbits: int | None) -> None:
        self._decompressor = zlib.decompressobj(wbits if wbits is not None else zlib.MAX_WBITS)
        # "deflate": its first bytes until there are two, the zlib wrapper's header (a first piece of one
        # byte cannot tell the two apart, and zlib would take it for a header yet to finish).
        self._undecided: bytes | None = b"" if wbits is None else None
        self.unconsumed = b""

    @property
    def finished(self) -> bool:
        return self._decompressor.eof

    @property
    def data_after_end(self) -> bool:
        """Whether bytes came after the end of the stream (zlib keeps them, never decoded)."""
        return bool(self._decompressor.unused_data)

    def decompress(self, data: bytes, max_length: int) -> bytes:
        bound = max(max_length, 1)
        if self._undecided is None:
            out = self._decompressor.decompress(data, bound)
        else:
            data = self._undecided + data
            if len(data) < 2:
                self._undecided = data
                return b""
            self._undecided = None
            try:
                out = self._decompressor.decompress(data, bound)
            except zlib.error:
                # "deflate" without the zlib wrapper, as some clients send it.
                self._decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
                out = self._decompressor.decompress(data, bound)
        self.unconsumed = self._decompressor.unconsumed_tail
        return out


class App(Protocol):
    """What the server serves: a handler for each request, the bounds it reads, and its fixed answers."""

    @property
    def max_connections(self) -> int: ...

    @property
    def header_timeout_seconds(self) -> float: ...

    @property
    def max_body_bytes(self) -> int: ...

    def __call__(self, request: Request) -> Awaitable[AnyResponse]: ...

    def malformed(self, status: int, error_type: str) -> Response:
        """The answer to a request that cannot be parsed (or is over a bound): fixed text, no echo."""

    def refused(self) -> bytes:
        """The whole answer written to a connection over ``max_connections``."""


_REASONS = {status.value: status.phrase for status in HTTPStatus}
_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


# Written by _head alone, from the body's length and whether the connection closes behind the answer: a
# handler's (or a forwarded error's) header of these names would frame the answer a second, other way.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "date", "te",
                              "trailer", "upgrade"})


def _head(status: int, headers: Mapping[str, str], length: int | None, close: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Unknown").encode("ascii"))]
    for name, value in headers.items():
        if name.lower() in FRAMING_HEADERS:
            continue
        # The application's own texts; anything outside Latin-1 (or a line break) cannot go in a header.
        lines.append(f"{name}: {value}".replace("\r", " ").replace("\n", " ").encode("latin-1", "replace"))
    lines.append(b"Date: " + _date())
    if length is None:
        lines.append(b"Transfer-Encoding: chunked")
    else:
        lines.append(b"Content-Length: %d" % length)
    if close:
        lines.append(b"Connection: close")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


class _Refused(Exception):
    """A request that cannot be parsed or is over a bound: raised from a parser callback to stop
    parsing, then queued to be answered after the requests before it."""

    def __init__(self, status: int, error_type: str) -> None:
        super().__init__(error_type)
        self.status = status
        self.error_type = error_type


class _Connection(asyncio.Protocol):
    """One client connection: parses its requests and answers them in order."""

    def __init__(self, server: HttpServer, *, admitted: bool = False) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._admitted = admitted  # counted at accept, before its TLS handshake (HttpServer._admit_tls)
        self._parser = httptools.HttpRequestParser(self)
        self._queue: collections.deque[Request | _Refused] = collections.deque()
        self._parsing: Request | None = None
        self._current: Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        # Bytes read of what is not body: the head being parsed, or a chunked body's framing since its
        # last chunk began and its trailer section (which llhttp buffers whole, as it does a head's line).
        self._head_bytes = 0
        self._url = b""
        self._header_list: list[tuple[str, str]] = []
        self._closing = False
        self._reading_paused = False
        self._writing_paused: asyncio.Future[None] | None = None
        self._can_write = True
        self._eof = False
        self._stopped = False
        self._close_after_answers = False

    # ------------------------------------------------------------ transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        server = self.server
        refuse = not self._admitted and len(server.connections) >= server.app.max_connections
        server.connections.add(self)
        if refuse:
            server.note_refused()
            self.transport.write(server.app.refused())
            self._close()
            return
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        gone = ConnectionResetError("the client closed the connection")
        for request in (self._parsing, self._current):
            if request is not None:
                request.fail(gone)
        if self._writing_paused is not None and not self._writing_paused.done():
            self._writing_paused.set_exception(gone)
        self.transport = None

    def pause_writing(self) -> None:
        self._can_write = False

    def resume_writing(self) -> None:
        self._can_write = True
        if self._writing_paused is not None and not self._writing_paused.done():
            self._writing_paused.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._stopped:
            return  # a refused or closing connection's bytes are dropped unread
        self._head_bytes += len(data)  # less what reaches on_body; reset where a head or chunk begins
        try:
            self._parser.feed_data(data)
        except _Refused as refused:
            self._refuse(refused.status, refused.error_type)
            return
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.status, cause.error_type)
            else:
                self._refuse(400, type(cause).__name__ if cause is not None else type(error).__name__)
            return
        except httptools.HttpParserUpgrade:
            # The request asked to switch protocols (or was a CONNECT): it is answered as any other,
            # never switched, and the connection closes behind the answer (what follows is not HTTP).
            self._stopped = True
            self._close_after_answers = True
            return
        except httptools.HttpParserError as error:
            self._refuse(400, type(error).__name__)
            return
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, "HeadersTooLarge")

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._parsing is not None:
            self._parsing.fail(ConnectionResetError("the client stopped sending mid-request"))
        if self._current is None and not self._queue:
            self._close()
            return None
        # Half-closed: answer what was asked, then close (TLS cannot stay half-open: it closes now).
        return None if self.transport is None or self.transport.get_extra_info("sslcontext") else True

    # ------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._header_list = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE_BYTES:
            raise _Refused(414, "RequestLineTooLong")

    def on_header(self, name: bytes, value: bytes | None) -> None:
        value = value or b""
        if len(name) + len(value) + 2 > MAX_LINE_BYTES:
            raise _Refused(431, "HeaderLineTooLong")
        if len(self._header_list) >= MAX_HEADERS:
            raise _Refused(431, "TooManyHeaders")
        self._header_list.append((name.decode("utf-8", "surrogateescape"),
                                  value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self._head_bytes = 0
        parser = self._parser
        try:
            parsed = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            raise _Refused(400, "HttpParserInvalidURLError") from None
        headers = CIMultiDictProxy(CIMultiDict(self._header_list))
        length_text = headers.get("Content-Length", "").strip()
        content_length = int(length_text) if length_text.isdigit() else None
        codings = headers.getall("Transfer-Encoding", [])
        version_text = parser.get_http_version()
        version = (1, 1) if version_text == "1.1" else (1, 0) if version_text == "1.0" else (0, 9)
        if codings and version != HTTP_11:
            # Transfer codings are HTTP/1.1's: in an HTTP/1.0 message the framing is faulty, and the
            # connection closes behind the answer (RFC 9112 6.1), whatever llhttp would make of it.
            raise _Refused(400, "TransferEncodingNotHttp11")
        if codings and (len(codings) > 1 or codings[0].strip().lower() != "chunked"):
            # Only chunked framing is understood; anything else leaves the body's end unknown (RFC 9112 6.1).
            raise _Refused(400, "TransferCodingNotChunked")
        chunked = bool(codings)
        request = Request(self, parser.get_method().decode("ascii"),
                          (parsed.path or b"/").decode("utf-8", "surrogateescape"),
                          (parsed.query or b"").decode("utf-8", "surrogateescape"),
                          version, headers, parser.should_keep_alive(), content_length,
                          chunked or bool(content_length))
        self._parsing = request if request.body_exists else None
        self._enqueue(request)

    def on_body(self, body: bytes) -> None:
        # A body's bytes are bounded by the handler's reads (READ_AHEAD_BYTES), not as a head's are. The
        # counts of one read are not split where a head or chunk begins in it: what follows such a point
        # in the same read goes uncounted (a bound looser by at most one read, never a false 431).
        self._head_bytes = max(self._head_bytes - len(body), 0)
        if self._parsing is not None:
            self._parsing.feed(body)

    def on_chunk_header(self) -> None:
        # A chunk's framing is counted from here (so many small chunks never add up to a bound), and
        # after the last chunk's, the trailer section: a header block as the head is (MAX_HEAD_BYTES).
        self._head_bytes = 0

    def on_message_complete(self) -> None:
        self._head_bytes = 0
        if self._parsing is not None:
            self._parsing.feed_eof()
            self._parsing = None

    # ------------------------------------------------------------ answering
    def _enqueue(self, item: Request | _Refused) -> None:
        if len(self._queue) >= MAX_PIPELINED:
            raise _Refused(429, "TooManyPipelinedRequests")
        self._queue.append(item)
        if self._current is not None or len(self._queue) > 1:
            # A pipelined request waits for the one being answered: read no further meanwhile.
            self.pause_reading()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._answer_queue())

    def _refuse(self, status: int, error_type: str) -> None:
        """Answer a request that cannot be parsed (after those before it), then close. A request refused
        mid-body (a bad chunk, a trailer section over the bound) gets the refusal as its answer: in its
        place in the queue, or at once when its handler has begun and not answered yet (whose body read
        then fails, and whose own answer is dropped)."""
        self._stopped = True  # parse nothing more; answer what came before, then this
        refused = _Refused(status, error_type)
        parsing, self._parsing = self._parsing, None
        if parsing is not None:
            parsing.fail(ConnectionResetError("the rest of the request could not be parsed"))
            if parsing in self._queue:
                self._queue.remove(parsing)
            elif parsing is self._current and not parsing.answered:
                parsing.answered = True
                self._answer_refused(refused)
                return
        self._queue.append(refused)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._answer_queue())

    def _answer_refused(self, refused: _Refused) -> None:
        self.server.note_malformed(refused.status, refused.error_type)
        answer = self.server.app.malformed(refused.status, refused.error_type)
        if self.transport is not None:
            self.transport.write(_head(answer.status, answer.headers, len(answer.body), True) + answer.body)
        self._close_lingering()

    async def _answer_queue(self) -> None:
        app = self.server.app
        try:
            while self._queue:
                item = self._queue.popleft()
                if isinstance(item, _Refused):
                    self._answer_refused(item)
                    return
                self._current = item  # the header timer, when it fires, leaves a connection in a request alone
                if not self._queue:
                    self.resume_reading()
                response: AnyResponse
                try:
                    response = await app(item)
                except Exception as error:  # the application answers its own errors; this is a bug
                    _log.error("http.handler_failed", error_type=type(error).__name__)
                    response = app.malformed(500, type(error).__name__)
                if not item.answered:
                    self._send(item, response)
                if not self._can_write:
                    # The client is not reading: take its next request only once it has read this answer,
                    # so what waits for it is at most one answer past the transport's high-water mark.
                    try:
                        await self.drain()  # a client that reads nothing for the header timeout is cut off
                    except ConnectionError:
                        self.abort()
                        return
                self._current = None
                if self.transport is None or self.transport.is_closing():
                    return
            if self._eof:
                self._close()  # the client sent all it will: nothing more can come
            elif self._stopped and not self._closing:
                self._close()  # nothing more is read (a request to switch protocols), and no timer would close it
            elif not self._closing:
                self._arm_timer()
        except Exception as error:  # a bug here must cost this connection, not leave it hanging
            _log.error("http.connection_failed", error_type=type(error).__name__)
            self._close()
        finally:
            self._task = None

    def _send(self, request: Request, response: AnyResponse) -> None:
        if isinstance(response, StreamResponse):  # a stream's handler returned it unprepared
            response = Response(status=response.status, headers=response.headers)
        close = self._closes_behind(request, response.closing)
        body = response.body
        head = _head(response.status, response.headers, len(body), close)
        request.answered = True
        if self.transport is not None:
            self.transport.write(head if request.method == "HEAD" or not body else head + body)
        if close:
            self._close()

    def _closes_behind(self, request: Request, closing: bool) -> bool:
        """Whether the connection closes behind the answer to ``request``: asked to, no keep-alive, a body
        not all read (a connection mid-body cannot carry another request), or nothing more to be read
        (closing, or a request to switch protocols)."""
        return (closing or not request.keep_alive or not request.body_complete or self._closing
                or self._close_after_answers)

    def send_now(self, request: Request, response: Response) -> None:
        """Write ``response`` at once and close the connection behind it (a request refused mid-body)."""
        response.force_close()
        if not request.answered:
            self._send(request, response)
        elif not self._closing:  # else it closes already (lingering behind a refusal: left to finish)
            self._close()

    # StreamResponse's side
    def start_stream(self, request: Request, status: int, headers: Mapping[str, str], close: bool) -> bool:
        """Write a stream's head; whether the connection closes behind the stream (its head says so)."""
        request.answered = True
        close = self._closes_behind(request, close)
        self.write(_head(status, headers, None, close))
        return close

    def finish_answer(self, request: Request, close: bool) -> None:
        if self._closes_behind(request, close):
            self._close()

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the client has taken what is buffered (down to the transport's low-water mark). A
        client that has not taken it down that far within ``header_timeout_seconds`` is disconnected
        (ConnectionResetError): it holds its connection, and a stream's handler, no longer. One that reads
        nothing is cut off so; so is one that reads less than the buffer's high-water mark (64 KiB) in
        that time, a few KiB a second at the default 10 s."""
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        if not self._can_write:
            self._writing_paused = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._writing_paused, self.server.app.header_timeout_seconds)
            except TimeoutError:
                self.abort()
                raise ConnectionResetError(
                    "the client did not take the buffered answer within the header timeout") from None

    # ------------------------------------------------------------ flow and life
    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read on, unless a pipelined request waits (or the connection is closing)."""
        if (self._reading_paused and self.transport is not None and not self._closing and not self._stopped
                and not self._queue):
            self._reading_paused = False
            self.transport.resume_reading()

    def _arm_timer(self) -> None:
        """The next request's headers are due ``header_timeout_seconds`` from now. One timer at a time:
        a keep-alive connection answers many requests per timeout, so each response only moves the
        deadline, and the timer, when it fires early, waits again for the deadline."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.server.app.header_timeout_seconds
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closing or self._current is not None or self._queue:
            return  # a request is being answered: its response arms the timer again
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._on_timer)
            return
        self._close()  # no request's headers in time (or an idle keep-alive connection)

    def _close_lingering(self) -> None:
        """Close after a refusal without losing the answer: a socket closed with unread bytes sends
        a reset, which can destroy the answer before the client reads it. So the sending side is
        shut (the client sees the answer, then the end), what still arrives is read and dropped,
        and the connection is closed after LINGER_SECONDS at most (at once over TLS, which cannot
        half-close)."""
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        self._closing = True  # data_received drops what comes now
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self._close)

    def _close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    @property
    def idle(self) -> bool:
        return self._current is None and not self._queue

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class HttpServer:
    """Serves ``app`` on one or more listening sockets: ``await start(host, port)`` or
    ``await start_on_socket(sock)``, then ``await close(timeout)``."""

    def __init__(self, app: App, *, on_refused: Callable[[], None] | None = None,
                 on_malformed: Callable[[int, str], None] | None = None) -> None:
        self.app = app
        self.connections: set[_Connection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._tls_listeners: list[tuple[socket.socket, asyncio.Task[None]]] = []
        self._handshakes: set[asyncio.Task[None]] = set()
        self._on_refused = on_refused
        self._on_malformed = on_malformed

    def note_refused(self) -> None:
        if self._on_refused is not None:
            self._on_refused()

    def note_malformed(self, status: int, error_type: str) -> None:
        if self._on_malformed is not None:
            self._on_malformed(status, error_type)

    def _protocol(self) -> _Connection:
        return _Connection(self)

    async def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                    reuse_address: bool = True) -> None:
        if ssl_context is not None:
            await self.start_on_socket(listening_socket(host, port), ssl_context=ssl_context)
            return
        server = await asyncio.get_running_loop().create_server(
            self._protocol, host, port, reuse_address=reuse_address)
        self._servers.append(server)

    async def start_on_socket(self, sock: socket.socket, *, ssl_context: ssl.SSLContext | None = None) -> None:
        if ssl_context is None:
            self._servers.append(await asyncio.get_running_loop().create_server(self._protocol, sock=sock))
            return
        sock.setblocking(False)
        self._tls_listeners.append((sock, asyncio.ensure_future(self._accept_tls(sock, ssl_context))))

    async def _accept_tls(self, listener: socket.socket, context: ssl.SSLContext) -> None:
        """Accept TLS connections on ``listener`` one by one, each counted before its handshake."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(listener)
            except OSError as error:
                if listener.fileno() < 0:
                    return  # closed by stop_listening
                if error.errno not in _ACCEPT_CLIENT_ERRORS:  # out of descriptors or memory, and the like
                    _log.error("http.accept_failed", reason=error.strerror or type(error).__name__,
                               retry_seconds=ACCEPT_RETRY_SECONDS)
                    await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            self._admit_tls(client, context)

    def _admit_tls(self, client: socket.socket, context: ssl.SSLContext) -> None:
        if len(self.connections) >= self.app.max_connections:
            self.note_refused()
            client.close()
            return
        connection = _Connection(self, admitted=True)
        self.connections.add(connection)
        task = asyncio.ensure_future(self._handshake(connection, client, context))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, connection: _Connection, client: socket.socket, context: ssl.SSLContext) -> None:
        """The server side of one TLS handshake, bounded by the header timeout. Done, the connection
        is made (``connection_made``, with the decrypted stream); failed, timed out or cancelled, the
        event loop closes the socket and the connection stops counting."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: connection, client, ssl=context, ssl_handshake_timeout=self.app.header_timeout_seconds)
        except asyncio.CancelledError:  # stop_listening
            self._drop_unmade(connection)
            raise
        except Exception:  # a client's failed or timed-out handshake (any error): that client's alone
            self._drop_unmade(connection)

    def _drop_unmade(self, connection: _Connection) -> None:
        if connection.transport is None:
            self.connections.discard(connection)

    @property
    def addresses(self) -> list[Any]:
        return [sock.getsockname() for server in self._servers
                for sock in (getattr(server, "sockets", None) or ())] + [
                    sock.getsockname() for sock, _ in self._tls_listeners if sock.fileno() >= 0]

    def stop_listening(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []
        for sock, task in self._tls_listeners:
            task.cancel()
            sock.close()
        self._tls_listeners = []
        for handshake in list(self._handshakes):
            handshake.cancel()

    async def close(self, timeout_seconds: float) -> None:
        """Stop listening, close idle connections, give requests being answered ``timeout_seconds`` to
        finish, then drop every connection."""
        self.stop_listening()
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        while True:
            for connection in list(self.connections):
                if connection.idle:
                    connection._close()
            if not self.connections or asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.abort()


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port`` (its first address), ``SO_REUSEADDR`` set, and
    ``SO_REUSEPORT`` where ``reuse_port`` (the node's HTTP workers share one port that way). Raises
    ``OSError``."""
    family, kind, protocol, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    listener = socket.socket(family, kind, protocol)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(address)
        listener.listen(LISTEN_BACKLOG)
    except OSError:
        listener.close()
        raise
    return listener
