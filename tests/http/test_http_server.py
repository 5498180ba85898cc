"""The node's HTTP/1.1 server itself (tokenvault/api/httpserver.py), over raw sockets: the bounds its
docstring promises, pipelining, content encodings, half-closed connections and a graceful close.

Each test serves a small app of its own (the server's ``App`` protocol), so a
failure points at the server rather than at the API's handlers; the API's own
behaviour over this server is what the rest of tests/http checks.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import ssl
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvloop
from _http_checks import check_problem
from structlog.testing import capture_logs

from tokenvault.api import httpserver
from tokenvault.api.http import TOO_MANY_CONNECTIONS_RESPONSE, problem_response
from tokenvault.api.httpserver import (MAX_HEAD_BYTES, MAX_HEADERS, MAX_LINE_BYTES, MAX_PIPELINED, BodyError,
                                       BodyTooLarge, HttpServer, Request, Response, StreamResponse)
from tokenvault.crypto.tls import ClusterTlsFiles, create_cluster_tls, http_client_context, http_server_context

DEADLINE_SECONDS = 10.0
MARK = "ECHO-mark-5d1f"


class EchoApp:
    """Answers each request with its method, path and body length; ``gate`` holds answers back."""

    max_connections = 8
    header_timeout_seconds = 5.0
    max_body_bytes = 64 * 1024

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.started = 0

    async def __call__(self, request: Request) -> Response:
        self.started += 1
        if self.gate is not None:
            await self.gate.wait()
        try:
            body = await read_all(request)
        except BodyTooLarge:
            return problem_response(413, "payload-too-large", "Payload too large", "too large")
        except BodyError:
            return problem_response(400, "invalid-request", "Bad request", "unreadable body")
        document = {"method": request.method, "path": request.path_safe, "bytes": len(body)}
        return Response(body=json.dumps(document).encode(), content_type="application/json")

    def malformed(self, status: int, error_type: str) -> Response:
        return problem_response(status, "invalid-request", "Bad request", "the request is not valid HTTP/1.1")

    def refused(self) -> bytes:
        return TOO_MANY_CONNECTIONS_RESPONSE


async def read_all(request: Request) -> bytes:
    chunks = []
    while True:
        chunk = request.read_nowait()
        if not chunk:
            if request.at_eof():
                break
            chunk = await request.readany()
            if not chunk:
                break
        chunks.append(chunk)
    return b"".join(chunks)


Served = tuple["EchoApp", HttpServer, tuple[str, int]]


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    app = EchoApp()
    server = HttpServer(app)
    await server.start("127.0.0.1", 0)
    try:
        yield app, server, server.addresses[0][:2]
    finally:
        await server.close(0)


async def exchange(address: tuple[str, int], data: bytes, *, half_close: bool = False) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), DEADLINE_SECONDS)
    finally:
        writer.close()


async def exchange_with(app: EchoApp, data: bytes) -> bytes:
    """``exchange`` with a server of its own serving ``app``, closed after."""
    server = HttpServer(app)
    await server.start("127.0.0.1", 0)
    try:
        return await exchange(server.addresses[0][:2], data)
    finally:
        await server.close(0)


def responses(received: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in ``received`` (each with a Content-Length)."""
    found = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        length = int(headers["Content-Length"])
        found.append((int(status_line.split()[1]), headers, rest[:length]))
        received = rest[length:]
    return found


def get(path: str, *, close: bool = False) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode()


async def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    _, _, address = served
    received = await exchange(address, get("/a") + get("/b") + get("/c", close=True))
    assert [json.loads(body)["path"] for _, _, body in responses(received)] == ["/a", "/b", "/c"]


async def test_more_pipelined_requests_than_the_bound_are_refused_after_those_within_it(served: Served) -> None:
    _, _, address = served
    received = await exchange(address, get("/x") * (MAX_PIPELINED + 5))
    answers = responses(received)
    assert [status for status, _, _ in answers[:-1]] == [200] * MAX_PIPELINED
    status, headers, body = answers[-1]
    check_problem(status, headers, body, 429)
    assert headers["Connection"] == "close"


async def test_the_server_alone_frames_an_answer_whatever_headers_its_handler_gave() -> None:
    """A handler's Content-Length, Transfer-Encoding, Connection or Date (a forwarded error's headers, say)
    went out beside the server's own: two lengths, or a length and chunking, and a client or proxy reads the
    next answer from the wrong byte (checked on the code before: two Content-Length lines). Only the server's
    are written, and the connection goes on serving."""
    class FramingApp(EchoApp):
        async def __call__(self, request: Request) -> Response:
            await read_all(request)
            return Response(body=b'{"ok":true}', content_type="application/json", headers={
                "Content-Length": "0", "Transfer-Encoding": "chunked", "Connection": "close",
                "Keep-Alive": "timeout=1", "Date": "yesterday", "Retry-After": "1"})

    received = await exchange_with(FramingApp(), get("/a") + get("/b", close=True))
    answers = responses(received)
    assert [body for _, _, body in answers] == [b'{"ok":true}'] * 2
    first_head = received.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    assert first_head.count("content-length:") == 1 and "transfer-encoding" not in first_head
    assert "connection" not in first_head and "keep-alive" not in first_head and "yesterday" not in first_head
    assert first_head.count("date:") == 1 and "retry-after: 1" in first_head


async def test_a_request_line_over_the_bound_is_414_without_echo(served: Served) -> None:
    _, _, address = served
    received = await exchange(address, f"GET /{MARK}{'z' * MAX_LINE_BYTES} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    [(status, headers, body)] = responses(received)
    check_problem(status, headers, body, 414, [MARK])


async def test_too_many_headers_are_431(served: Served) -> None:
    _, _, address = served
    headers = "".join(f"X-H{index}: {MARK}\r\n" for index in range(MAX_HEADERS + 1))
    received = await exchange(address, f"GET / HTTP/1.1\r\nHost: t\r\n{headers}\r\n".encode())
    [(status, headers_back, body)] = responses(received)
    check_problem(status, headers_back, body, 431, [MARK])


async def test_a_header_block_that_never_ends_is_431_once_past_the_bound(served: Served) -> None:
    app, _, address = served
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Long: ")
        for _ in range(MAX_HEAD_BYTES // 4096 + 4):
            writer.write(b"a" * 4096)  # one header line that never ends, in pieces
            await writer.drain()
            await asyncio.sleep(0.001)
        received = await asyncio.wait_for(reader.read(), DEADLINE_SECONDS)
    finally:
        writer.close()
    [(status, headers, body)] = responses(received)
    check_problem(status, headers, body, 431)
    assert app.started == 0


async def test_a_trailer_section_that_never_ends_is_431_once_past_the_head_bound(served: Served) -> None:
    """A chunked body's trailer section is a header block too, which llhttp buffers as it does a head's
    unfinished line: past MAX_HEAD_BYTES it is refused as a head is (the request's handler had begun:
    the refusal is its answer), not buffered without bound."""
    _, _, address = served
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(b"POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\nX-Trailer: ")
        for _ in range(MAX_HEAD_BYTES // 4096 + 4):
            writer.write(b"a" * 4096)  # one trailer line that never ends, in pieces
            await writer.drain()
            await asyncio.sleep(0.001)
        try:
            received = await asyncio.wait_for(reader.read(), 2.0)
        except TimeoutError:
            raise AssertionError("a trailer line past MAX_HEAD_BYTES was taken without a refusal") from None
    finally:
        writer.close()
    [(status, headers, body)] = responses(received)
    check_problem(status, headers, body, 431)


async def test_a_body_of_many_small_chunks_and_trailers_is_read_whole(served: Served) -> None:
    """The trailer bound counts a chunk's framing from that chunk on, never a whole body's framing."""
    _, _, address = served
    count = 30_000
    chunks = b"1\r\nx\r\n" * count
    assert len(chunks) - count > 2 * MAX_HEAD_BYTES  # framing alone, well past the bound in all
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        for start in range(0, len(chunks), 6 * 1024):
            writer.write(chunks[start:start + 6 * 1024])  # in pieces, so that the server reads them so
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write(b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), DEADLINE_SECONDS)
    finally:
        writer.close()
    [(status, _, body)] = responses(received)
    assert status == 200 and json.loads(body)["bytes"] == count


@pytest.mark.parametrize("encoding,encode", [
    ("gzip", lambda data: zlib.compress(data, wbits=16 + zlib.MAX_WBITS)),
    ("deflate", zlib.compress),
    ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),  # raw deflate, as some clients send
])
async def test_encoded_bodies_are_decoded(served: Served, encoding: str, encode: Any) -> None:
    _, _, address = served
    body = encode(b"x" * 5000)
    head = (f"POST /e HTTP/1.1\r\nHost: t\r\nContent-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    [(status, _, answer)] = responses(await exchange(address, head + body))
    assert status == 200 and json.loads(answer)["bytes"] == 5000


@pytest.mark.parametrize("encoding,body,status", [
    ("br", b"anything", 400),
    ("gzip", zlib.compress(b"y" * 5000, wbits=16 + zlib.MAX_WBITS)[:-8], 400),  # cut short
    ("gzip", zlib.compress(b"y" * (64 * 1024 + 1), wbits=16 + zlib.MAX_WBITS), 413),  # over max_body_bytes decoded
    # data after the end of the stream: never decoded, so never silently dropped either
    ("gzip", zlib.compress(b"y" * 5000, wbits=16 + zlib.MAX_WBITS) + b"junk", 400),
    ("gzip", zlib.compress(b"y", wbits=16 + zlib.MAX_WBITS) * 2, 400),  # a second gzip member
    ("deflate", zlib.compress(b"y" * 5000) + b"junk", 400),
    ("deflate", zlib.compress(b"y" * 5000, wbits=-zlib.MAX_WBITS) + b"junk", 400),
])
async def test_unknown_broken_or_oversized_encodings_are_refused(
        served: Served, encoding: str, body: bytes, status: int) -> None:
    _, _, address = served
    head = (f"POST /e HTTP/1.1\r\nHost: t\r\nContent-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    [(answered, headers, answer)] = responses(await exchange(address, head + body))
    check_problem(answered, headers, answer, status)


async def exchange_in_pieces(address: tuple[str, int], pieces: list[bytes]) -> bytes:
    """Send ``pieces`` one by one on a fresh connection, each read by the server before the next is sent,
    and read until the server closes it. The server runs on this event loop: the pause after each piece
    lets it read the piece and its handler take it (asyncio sends each at once, with TCP_NODELAY)."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(PIECE_PAUSE_SECONDS)
        return await asyncio.wait_for(reader.read(), DEADLINE_SECONDS)
    finally:
        writer.close()


PIECE_PAUSE_SECONDS = 0.01
ENCODERS = {
    "gzip": lambda data: zlib.compress(data, wbits=16 + zlib.MAX_WBITS),
    "deflate": zlib.compress,
    "raw-deflate": lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS),  # sent as "deflate"
}


@pytest.mark.parametrize("split", ["byte-by-byte", "in-the-header"])
@pytest.mark.parametrize("encoder", list(ENCODERS))
async def test_encoded_bodies_sent_in_pieces_that_decode_to_nothing_are_decoded_whole(
        served: Served, encoder: str, split: str) -> None:
    """A piece of a compressed body can decode to nothing (a header, a trailer, a byte of either): the
    body goes on past it. Before, such a piece read as the end of the body (gzip: 0 bytes of 5000, or a
    few; "deflate" whose first piece was one byte was broken)."""
    _, _, address = served
    body = ENCODERS[encoder](b"x" * 5000)
    pieces = ([body[index:index + 1] for index in range(len(body))] if split == "byte-by-byte"
              else [body[:3], body[3:5], body[5:]])
    encoding = "gzip" if encoder == "gzip" else "deflate"
    head = (f"POST /e HTTP/1.1\r\nHost: t\r\nContent-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    [(status, _, answer)] = responses(await exchange_in_pieces(address, [head, *pieces]))
    assert status == 200 and json.loads(answer)["bytes"] == 5000


@pytest.mark.parametrize("encoding,cut,last", [
    ("gzip", zlib.compress(b"y" * 5000, wbits=16 + zlib.MAX_WBITS)[:-4], 4),  # its size never comes; the CRC last
    ("deflate", zlib.compress(b"y" * 5000)[:-1], 2),  # the checksum's last byte never comes
])
async def test_an_encoding_cut_short_is_refused_when_its_last_piece_decodes_to_nothing(
        served: Served, encoding: str, cut: bytes, last: int) -> None:
    """Before, the end of such a body was taken for the end of the stream: its data was all decoded with
    the piece before, and the body was answered 200 without its checksum checked."""
    _, _, address = served
    head = (f"POST /e HTTP/1.1\r\nHost: t\r\nContent-Encoding: {encoding}\r\nContent-Length: {len(cut)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    [(status, headers, answer)] = responses(await exchange_in_pieces(address, [head + cut[:-last], cut[-last:]]))
    check_problem(status, headers, answer, 400)


async def test_a_half_closed_connection_gets_its_answer_then_is_closed(served: Served) -> None:
    _, _, address = served
    received = await exchange(address, get("/half"), half_close=True)
    [(status, _, body)] = responses(received)
    assert status == 200 and json.loads(body)["path"] == "/half"


async def test_connections_past_the_cap_get_503_at_once(served: Served) -> None:
    app, _, address = served
    opened = [await asyncio.open_connection(*address) for _ in range(app.max_connections)]
    try:
        received = await exchange(address, get("/over"))
        assert received == TOO_MANY_CONNECTIONS_RESPONSE
    finally:
        for _, writer in opened:
            writer.close()


async def test_close_lets_a_request_being_answered_finish_and_drops_idle_connections() -> None:
    app = EchoApp()
    app.gate = asyncio.Event()
    server = HttpServer(app)
    await server.start("127.0.0.1", 0)
    address = server.addresses[0][:2]
    idle_reader, idle_writer = await asyncio.open_connection(*address)
    reader, writer = await asyncio.open_connection(*address)
    writer.write(get("/slow"))
    deadline = asyncio.get_running_loop().time() + DEADLINE_SECONDS
    while app.started == 0:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    closing = asyncio.ensure_future(server.close(DEADLINE_SECONDS))
    assert await asyncio.wait_for(idle_reader.read(), DEADLINE_SECONDS) == b""  # the idle one is closed
    assert not closing.done()
    app.gate.set()
    [(status, _, body)] = responses(await asyncio.wait_for(reader.read(), DEADLINE_SECONDS))
    assert status == 200 and json.loads(body)["path"] == "/slow"
    await asyncio.wait_for(closing, DEADLINE_SECONDS)
    writer.close()
    idle_writer.close()


async def test_a_header_value_that_cannot_be_sent_as_is_is_mended_and_the_connection_serves_on() -> None:
    class OddHeaderApp(EchoApp):
        async def __call__(self, request: Request) -> Response:
            return Response(body=b"{}", headers={"X-Odd": "caf\u00e9 \u20ac\r\nX-Injected: 1"})

    received = await exchange_with(OddHeaderApp(), get("/one") + get("/two", close=True))
    answers = responses(received)
    assert [status for status, _, _ in answers] == [200, 200]
    assert answers[0][1]["X-Odd"] == "caf\u00e9 ?  X-Injected: 1" and "X-Injected" not in answers[0][1]


async def test_a_client_that_does_not_read_its_answers_gets_no_more_handled_until_it_reads() -> None:
    big = b"x" * (1024 * 1024)

    class BigApp(EchoApp):
        async def __call__(self, request: Request) -> Response:
            self.started += 1
            return Response(body=big)

    app = BigApp()
    server = HttpServer(app)
    await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.addresses[0][:2])
    try:
        count = 24
        writer.write(get("/big") * count)
        await asyncio.sleep(0.5)  # the client reads nothing meanwhile
        [connection] = list(server.connections)
        assert connection.transport is not None
        # The kernel's buffers take a few answers; then the server waits for the client.
        assert app.started < count
        assert connection.transport.get_write_buffer_size() <= 2 * len(big)
        received = 0
        while received < count * len(big):
            chunk = await asyncio.wait_for(reader.read(1 << 20), DEADLINE_SECONDS)
            assert chunk
            received += len(chunk)
        assert app.started == count
    finally:
        writer.close()
        await server.close(0)


async def test_a_client_that_reads_nothing_of_an_answer_for_the_header_timeout_is_disconnected() -> None:
    class BigApp(EchoApp):
        header_timeout_seconds = 0.3

        async def __call__(self, request: Request) -> Response:
            return Response(body=b"x" * (4 * 1024 * 1024))

    server = HttpServer(BigApp())
    await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.addresses[0][:2])
    try:
        writer.write(get("/big") * 4)
        deadline = asyncio.get_running_loop().time() + DEADLINE_SECONDS
        await asyncio.sleep(0.05)
        while server.connections:
            assert asyncio.get_running_loop().time() < deadline, "the connection was kept"
            await asyncio.sleep(0.05)
    finally:
        writer.close()
        await server.close(0)


async def test_a_client_that_reads_nothing_of_a_streamed_answer_for_the_header_timeout_is_disconnected() -> None:
    """As for a whole answer: a stream's write waits for the client at most the header timeout, then the
    connection is dropped and the write raises ConnectionResetError (a client gone), so a client that
    stops reading a stream (GET /v1/admin/backup) holds neither its connection nor the handler."""
    class EndlessStreamApp(EchoApp):
        header_timeout_seconds = 0.3
        ended: BaseException | None = None

        async def __call__(self, request: Request) -> StreamResponse:
            response = StreamResponse(content_type="application/octet-stream")
            await response.prepare(request)
            try:
                while True:
                    await response.write(b"x" * (1024 * 1024))
            except ConnectionError as error:
                self.ended = error
                return response

    app = EndlessStreamApp()
    server = HttpServer(app)
    await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.addresses[0][:2], limit=1024)
    try:
        writer.write(get("/stream"))
        await _until(lambda: not server.connections and app.ended is not None,
                     "a client that reads nothing of a streamed answer is kept, with its handler")
        assert isinstance(app.ended, ConnectionResetError)
    finally:
        writer.close()
        await server.close(0)


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 id="length-and-chunked"),
    pytest.param(b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                 id="two-lengths"),
    pytest.param(b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", id="negative-length"),
    pytest.param(b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                 id="bad-chunk-size"),
    pytest.param(b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nhello", id="coding-not-chunked"),
    pytest.param(b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
                 id="two-codings"),
    # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing, kept-alive or not
    pytest.param(b"POST /a HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\n\r\n", id="chunked-in-http-1.0"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n", id="folded-header"),
    pytest.param(b"GET / HTTP/1.1\nHost: t\n\n", id="bare-line-feeds"),
    pytest.param(b"CONNECT elsewhere:443 HTTP/1.1\r\nHost: elsewhere:443\r\n\r\n", id="connect"),
])
async def test_ambiguous_framing_is_400_and_closes(served: Served, request_bytes: bytes) -> None:
    """Refused whole, and the connection closed (a bad chunk is found once the handler reads the body)."""
    _, _, address = served
    [(status, headers, body)] = responses(await exchange(address, request_bytes))
    check_problem(status, headers, body, 400)


async def test_a_request_to_switch_protocols_is_answered_without_switching_then_closed(served: Served) -> None:
    _, _, address = served
    upgrade = b"GET /up HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    received = await exchange(address, upgrade + b"not http at all")
    [(status, headers, body)] = responses(received)
    assert status == 200 and json.loads(body)["path"] == "/up" and headers["Connection"] == "close"


async def test_a_streamed_answer_to_a_request_to_switch_protocols_closes_the_connection_behind_it() -> None:
    """After a request to switch protocols nothing more is read and no header timer runs: the connection
    closes behind its answer, a streamed one (GET /v1/admin/backup's) too, or it would be held for ever."""
    class StreamApp(EchoApp):
        header_timeout_seconds = 0.3

        async def __call__(self, request: Request) -> StreamResponse:
            response = StreamResponse(content_type="application/octet-stream")
            await response.prepare(request)
            await response.write(b"part")
            await asyncio.sleep(2 * self.header_timeout_seconds)  # streamed for longer than that
            await response.write_eof()
            return response

    server = HttpServer(StreamApp())
    await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.addresses[0][:2])
    try:
        writer.write(b"GET /up HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        try:
            received = await asyncio.wait_for(reader.read(), 3.0)  # the stream, then several header timeouts
        except TimeoutError:
            raise AssertionError("the connection is still open after its streamed answer") from None
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close" in head
        assert body == b"4\r\npart\r\n0\r\n\r\n"
        await _until(lambda: not server.connections, "the closed connection still counts")
    finally:
        writer.close()
        await server.close(0)


class _StubConnection:
    """What a Request needs of its connection, for driving one by hand."""

    def __init__(self, max_body_bytes: int) -> None:
        self.server = type("Server", (), {"app": type("App", (), {"max_body_bytes": max_body_bytes})()})()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def encoded_request(encoding: str) -> Request:
    from multidict import CIMultiDict, CIMultiDictProxy

    headers = CIMultiDictProxy(CIMultiDict({"Content-Encoding": encoding, "Transfer-Encoding": "chunked"}))
    return Request(_StubConnection(64 * 1024), "POST", "/", "", (1, 1), headers,  # type: ignore[arg-type]
                   True, None, True)


def test_a_cut_short_encoding_is_an_error_even_when_its_last_piece_was_read_before_the_end_came() -> None:
    request = encoded_request("gzip")
    whole = zlib.compress(b"z" * 5000, wbits=16 + zlib.MAX_WBITS)
    request.feed(whole[:-8])  # the gzip trailer never comes
    assert request.read_nowait() == b"z" * 5000  # all the data, before the end is known
    request.feed_eof()
    assert request.at_eof()
    with pytest.raises(BodyError):
        request.read_nowait()


def test_a_whole_encoding_read_piece_by_piece_ends_cleanly() -> None:
    request = encoded_request("deflate")
    whole = zlib.compress(b"w" * 5000)
    request.feed(whole[:10])
    first = request.read_nowait()
    request.feed(whole[10:])
    request.feed_eof()
    assert first + request.read_nowait() == b"w" * 5000
    assert request.read_nowait() == b"" and request.at_eof()


async def test_a_cut_short_encoding_is_an_error_when_its_last_piece_decodes_to_nothing() -> None:
    """Read with read_nowait and with readany alike: the end comes after a piece that adds no data."""
    cut = zlib.compress(b"z" * 5000, wbits=16 + zlib.MAX_WBITS)[:-4]  # the gzip size field never comes
    by_nowait = encoded_request("gzip")
    by_nowait.feed(cut[:-4])
    assert by_nowait.read_nowait() == b"z" * 5000
    by_nowait.feed(cut[-4:])  # the CRC: decodes to nothing
    by_nowait.feed_eof()
    with pytest.raises(BodyError):
        by_nowait.read_nowait()

    by_readany = encoded_request("gzip")
    by_readany.feed(cut[:-4])
    assert await by_readany.readany() == b"z" * 5000
    by_readany.feed(cut[-4:])
    by_readany.feed_eof()
    with pytest.raises(BodyError):
        await by_readany.readany()


async def test_readany_waits_past_pieces_that_decode_to_nothing() -> None:
    """It returns b"" only at the end of the body: a piece that decodes to nothing is not the end."""
    request = encoded_request("gzip")
    whole = zlib.compress(b"v" * 5000, wbits=16 + zlib.MAX_WBITS)
    request.feed(whole[:3])  # part of the gzip header
    reading = asyncio.ensure_future(request.readany())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not reading.done(), reading.result()
    request.feed(whole[3:-4])
    assert await reading == b"v" * 5000
    request.feed(whole[-4:])  # the size field
    reading = asyncio.ensure_future(request.readany())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not reading.done(), reading.result()
    request.feed_eof()
    assert await reading == b"" and request.at_eof()


def test_deflate_whose_first_piece_is_one_byte_is_decoded_in_either_wrapper() -> None:
    """One byte cannot tell the zlib wrapper from raw deflate: it waits for the second. Before, zlib took
    the byte for the start of its header, and raw deflate sent so was broken."""
    for whole in (zlib.compress(b"u" * 5000), zlib.compress(b"u" * 5000, wbits=-zlib.MAX_WBITS)):
        request = encoded_request("deflate")
        request.feed(whole[:1])
        assert request.read_nowait() == b""
        request.feed(whole[1:])
        request.feed_eof()
        assert request.read_nowait() == b"u" * 5000 and request.at_eof()


def test_data_after_the_end_of_an_encoding_is_an_error_when_it_comes_in_a_later_piece() -> None:
    """zlib keeps bytes after the end of its stream aside, whenever they come: they are never dropped."""
    for encoding, whole in (("gzip", zlib.compress(b"t" * 5000, wbits=16 + zlib.MAX_WBITS)),
                            ("deflate", zlib.compress(b"t" * 5000))):
        request = encoded_request(encoding)
        request.feed(whole)
        assert request.read_nowait() == b"t" * 5000
        request.feed(b"\x00")
        with pytest.raises(BodyError):
            request.read_nowait()


# ---------------------------------------------------------------- TLS connections and the cap
# Run on both event loops the node may run on: the server runs its TLS handshakes itself, and the two
# loops differ in when an accepted socket starts reading.
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> ClusterTlsFiles:
    return create_cluster_tls(tmp_path_factory.mktemp("http-tls") / "tls", {"n1": ["127.0.0.1"]})


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE_SECONDS
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def _tls_get(address: tuple[str, int], tls_files: ClusterTlsFiles, path: str) -> bytes:
    """One request over TLS on a fresh connection: the bytes answered, or the error that ended it."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            *address, ssl=http_client_context(tls_files.ca_cert_file)), DEADLINE_SECONDS)
    except (ssl.SSLError, ConnectionError) as error:
        return f"error: {type(error).__name__}".encode()
    try:
        writer.write(get(path, close=True))
        return await asyncio.wait_for(reader.read(), DEADLINE_SECONDS)
    finally:
        writer.close()


def _tls_server(tls_files: ClusterTlsFiles) -> tuple[EchoApp, HttpServer, list[int], ssl.SSLContext]:
    app = EchoApp()
    refused: list[int] = []
    server = HttpServer(app, on_refused=lambda: refused.append(1))
    return app, server, refused, http_server_context(tls_files.nodes["n1"])


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_tls_connections_in_their_handshake_count_against_the_cap(tls_files: ClusterTlsFiles,
                                                                  loop_name: str) -> None:
    """The module docstring: over TLS a connection counts from its accept, so sockets that never finish
    a handshake hold at most ``max_connections`` slots; one more is closed with no handshake, and a
    handshake that fails (plain HTTP on the TLS port) or ends stops counting."""
    async def scenario() -> None:
        app, server, refused, context = _tls_server(tls_files)
        await server.start("127.0.0.1", 0, ssl_context=context)
        address = server.addresses[0][:2]
        try:
            assert b"HTTP/1.1 200" in await _tls_get(address, tls_files, "/first")
            await _until(lambda: not server.connections, "the first connection's close was never seen")
            silent = [await asyncio.open_connection(*address) for _ in range(app.max_connections)]
            await _until(lambda: len(server.connections) == app.max_connections,
                         f"{len(server.connections)} of {app.max_connections} handshaking sockets counted")
            over = await _tls_get(address, tls_files, "/over")
            assert over.startswith(b"error: ") or over == b"", over  # closed before any handshake
            assert refused and len(server.connections) == app.max_connections
            plain_reader, plain_writer = silent[0]
            plain_writer.write(get("/plain"))  # not a ClientHello: that handshake fails
            assert await asyncio.wait_for(plain_reader.read(), DEADLINE_SECONDS) == b""
            await _until(lambda: len(server.connections) == app.max_connections - 1,
                         "a failed handshake still counts")
            assert b"HTTP/1.1 200" in await _tls_get(address, tls_files, "/again")
            for _, writer in silent[1:]:
                writer.close()
            await _until(lambda: not server.connections, "closed handshakes still count")
        finally:
            await server.close(0)

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_tls_handshake_is_bounded_by_the_header_timeout_and_cut_by_close(tls_files: ClusterTlsFiles,
                                                                          loop_name: str) -> None:
    async def scenario() -> None:
        app, server, _, context = _tls_server(tls_files)
        app.header_timeout_seconds = 0.3
        await server.start("127.0.0.1", 0, ssl_context=context)
        address = server.addresses[0][:2]
        reader, writer = await asyncio.open_connection(*address)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), DEADLINE_SECONDS) == b""
        assert asyncio.get_running_loop().time() - started >= app.header_timeout_seconds
        await _until(lambda: not server.connections, "a timed-out handshake still counts")
        writer.close()
        app.header_timeout_seconds = DEADLINE_SECONDS
        reader, writer = await asyncio.open_connection(*address)
        await _until(lambda: len(server.connections) == 1, "the handshaking socket was not counted")
        await asyncio.wait_for(server.close(0), DEADLINE_SECONDS)
        assert await asyncio.wait_for(reader.read(), DEADLINE_SECONDS) == b""  # close cut the handshake
        assert not server.connections and not server.addresses
        writer.close()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(scenario())


# ---------------------------------------------------------------- TLS accept failures


class _ListenerFailingOnce(socket.socket):
    """A listening socket whose next ``accept()`` raises ``fail_with`` once it is set, as the kernel's fails
    when the process is out of descriptors or memory: the connection waiting stays in the backlog, for the
    next accept. Records the loop time of that failure and of every accept that succeeds."""

    def __init__(self) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.fail_with: OSError | None = None
        self.failed_at: float | None = None
        self.accepted_at: list[float] = []

    def accept(self) -> tuple[socket.socket, Any]:
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            self.failed_at = asyncio.get_running_loop().time()
            raise error
        accepted = super().accept()
        self.accepted_at.append(asyncio.get_running_loop().time())
        return accepted


def _listener_failing_once() -> _ListenerFailingOnce:
    listener = _ListenerFailingOnce()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


async def _keep_alive_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    """One request on an open connection, which stays open: the status answered."""
    writer.write(get(path))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_SECONDS)
    ((status, headers, _),) = responses(head)
    await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), DEADLINE_SECONDS)
    return status


# (loop, the error accept() raises, the `reason` logged): out of descriptors or memory (docs/failure-modes.md),
# another error that is not one client's, and an OSError with no errno (its type is the reason).
ACCEPT_FAILURES = {
    "asyncio-EMFILE": ("asyncio", lambda: _os_error(errno.EMFILE), os.strerror(errno.EMFILE)),
    "uvloop-EMFILE": ("uvloop", lambda: _os_error(errno.EMFILE), os.strerror(errno.EMFILE)),
    "asyncio-ENOMEM": ("asyncio", lambda: _os_error(errno.ENOMEM), os.strerror(errno.ENOMEM)),
    "asyncio-EINVAL": ("asyncio", lambda: _os_error(errno.EINVAL), os.strerror(errno.EINVAL)),
    "asyncio-no-errno": ("asyncio", lambda: OSError("no errno"), "OSError"),
}


@pytest.mark.parametrize("case", sorted(ACCEPT_FAILURES))
def test_a_tls_accept_failing_not_for_one_client_is_logged_and_retried_a_second_later(
        tls_files: ClusterTlsFiles, case: str) -> None:
    """docs/logs.md, `http.accept_failed` (docs/failure-modes.md, "Too few open files"): accepting a TLS
    connection fails for a reason that is not one client's (EMFILE, ENFILE, ENOBUFS, ENOMEM, say): one line
    at error with `reason` (the strerror, or the error's type) and `retry_seconds`; the listener accepts
    again 1 s later and serves the connections it has open meanwhile. The connection that waited is then
    accepted and answered."""
    loop_name, make_error, reason = ACCEPT_FAILURES[case]

    async def scenario() -> None:
        _, server, _, context = _tls_server(tls_files)
        listener = _listener_failing_once()
        await server.start_on_socket(listener, ssl_context=context)
        address = listener.getsockname()[:2]
        client_context = http_client_context(tls_files.ca_cert_file)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*address, ssl=client_context),
                                                    DEADLINE_SECONDS)
            assert await _keep_alive_get(reader, writer, "/before") == 200
            listener.fail_with = make_error()
            waiting = asyncio.ensure_future(_tls_get(address, tls_files, "/waited"))
            await _until(lambda: listener.failed_at is not None, "the accept never failed")
            assert await _keep_alive_get(reader, writer, "/meanwhile") == 200  # the open connection is served
            assert not waiting.done() and len(listener.accepted_at) == 1, "accepted again without waiting"
            assert b"HTTP/1.1 200" in await waiting
            assert len(listener.accepted_at) == 2
            # The back-off, on the loop's clock (1 ms allows for uvloop's, kept in whole milliseconds).
            assert listener.accepted_at[1] - listener.failed_at >= httpserver.ACCEPT_RETRY_SECONDS - 0.001
            writer.close()
        finally:
            await server.close(0)

    with capture_logs() as logs:
        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
            runner.run(scenario())
    failed = [entry for entry in logs if entry["event"] == "http.accept_failed"]
    assert failed == [{"event": "http.accept_failed", "log_level": "error", "logger": "tokenvault.api.httpserver",
                       "reason": reason, "retry_seconds": 1.0}]
    assert httpserver.ACCEPT_RETRY_SECONDS == 1.0  # docs/logs.md: "the listener retries after 1 s"


# One client's errors (reset or aborted before it was taken, a firewall's refusal, a protocol error):
# skipped silently. (EAGAIN and EINTR never reach the server: the event loop retries them itself.)
CLIENT_ACCEPT_ERRORS = [("asyncio", errno.ECONNABORTED), ("uvloop", errno.ECONNABORTED),
                        ("asyncio", errno.ECONNRESET), ("asyncio", errno.EPROTO), ("asyncio", errno.EPERM)]


@pytest.mark.parametrize(("loop_name", "code"), CLIENT_ACCEPT_ERRORS,
                         ids=[f"{name}-{errno.errorcode[code]}" for name, code in CLIENT_ACCEPT_ERRORS])
def test_a_tls_accept_failing_for_one_client_is_not_logged_and_the_next_is_accepted_at_once(
        tls_files: ClusterTlsFiles, loop_name: str, code: int) -> None:
    """docs/logs.md, `http.accept_failed`: a connection reset or aborted before it was taken is that client's
    alone: no line, no back-off; the listener accepts the next connection straight away."""
    async def scenario() -> None:
        _, server, _, context = _tls_server(tls_files)
        listener = _listener_failing_once()
        await server.start_on_socket(listener, ssl_context=context)
        address = listener.getsockname()[:2]
        try:
            assert b"HTTP/1.1 200" in await _tls_get(address, tls_files, "/first")  # the listener waits again
            listener.fail_with = _os_error(code)
            assert b"HTTP/1.1 200" in await _tls_get(address, tls_files, "/next")
            assert listener.failed_at is not None and len(listener.accepted_at) == 2
            assert listener.accepted_at[1] - listener.failed_at < httpserver.ACCEPT_RETRY_SECONDS
        finally:
            await server.close(0)

    with capture_logs() as logs:
        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
            runner.run(scenario())
    assert [entry for entry in logs if entry["event"] == "http.accept_failed"] == []
