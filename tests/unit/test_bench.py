"""The load generator: its minimal HTTP/1.1 client (parsing, a real round trip) and its CPU accounting."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from httpclients import MAX_HEADER_BYTES, open_client, parse_response  # noqa: E402


def test_a_response_with_content_length_is_parsed_only_once_complete() -> None:
    whole = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhelloNEXT"
    assert parse_response(whole[:20]) is None
    assert parse_response(whole[:-6]) is None
    status, body, consumed, keep_alive = parse_response(whole)
    assert (status, body, keep_alive) == (200, b"hello", True)
    assert whole[consumed:] == b"NEXT"


def test_a_chunked_response_is_reassembled() -> None:
    whole = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    assert parse_response(whole[:-2]) is None
    status, body, consumed, _ = parse_response(whole)
    assert (status, body, consumed) == (201, b"abcde", len(whole))


def test_connection_close_and_http_1_0_end_keep_alive() -> None:
    assert parse_response(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")[3] is False
    assert parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")[3] is False
    assert parse_response(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")[3] is True


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"SMTP 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nbody without a length",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
    b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * MAX_HEADER_BYTES,
])
def test_malformed_or_oversized_responses_are_refused(response: bytes) -> None:
    with pytest.raises(ValueError):
        parse_response(response)


async def test_both_clients_post_to_a_real_server_and_reuse_connections() -> None:
    peers: set[object] = set()

    async def echo(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername"))
        body = await request.read()
        return web.Response(status=201, body=body[::-1], headers={"X-Auth": request.headers["Authorization"]})

    app = web.Application()
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        for kind in ("raw", "aiohttp"):
            peers.clear()
            async with open_client(kind, 1) as client:
                for number in range(3):
                    status, body = await client.post(0, f"http://127.0.0.1:{port}/echo", b"abc%d" % number,
                                                      {"Authorization": "Bearer k"})
                    assert (status, body) == (201, b"%dcba" % number)
            assert len(peers) == 1, kind  # one keep-alive connection carried all three
    finally:
        await runner.cleanup()


async def test_the_raw_client_refuses_anything_but_plain_http() -> None:
    async with open_client("raw", 1) as client:
        with pytest.raises(ValueError):
            await client.post(0, "https://127.0.0.1:1/x", b"", {})
    with pytest.raises(ValueError):
        async with open_client("curl", 1):
            pass


def test_the_cpu_accounting_reads_proc_and_reports_per_acknowledged_request(tmp_path: Path) -> None:
    import os

    import loadgen

    before = loadgen.process_cpu_seconds([os.getpid()])
    deadline = loadgen.own_cpu_seconds() + 0.05
    while loadgen.own_cpu_seconds() < deadline:
        pass
    assert loadgen.process_cpu_seconds([os.getpid()]) > before
    assert loadgen.process_cpu_seconds([os.getpid(), 2 ** 22 + 12345]) is None  # no such process
    (tmp_path / "good.pid").write_text(f"{os.getpid()}\n")
    (tmp_path / "bad.pid").write_text("not a pid")
    assert loadgen.read_pids([tmp_path / "good.pid", tmp_path / "bad.pid", tmp_path / "missing.pid", None]) == [
        os.getpid()]
    measurement = loadgen.Measurement(requests=10, values=10, latencies_ms=[1.0] * 10, window_seconds=1.0,
                                      completed_ok=20, server_cpu_seconds=0.01, client_cpu_seconds=0.002)
    assert "servers 500 us, load generator 100 us" in loadgen.report_line("x", measurement)
    measurement.server_cpu_seconds = None
    assert "CPU per" not in loadgen.report_line("x", measurement)
