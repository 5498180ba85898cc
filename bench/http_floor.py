"""What one HTTP request costs a server process before any vault work: the floor under a worker's CPU.

Each server answers ``POST /v1/tokenize`` by decoding the JSON body and
returning a small fixed JSON body, nothing else. Four servers:

- ``aiohttp-app``: an aiohttp ``web.Application`` with a route and two
  pass-through middlewares, as a worker's was before its own route table;
- ``aiohttp-lowlevel``: aiohttp's low-level ``web.Server`` (no router, no
  middlewares), the least aiohttp's request and response objects cost;
- ``tokenvault``: the node's own server (tokenvault/api/httpserver.py) with a
  one-route app, what a worker's HTTP costs now;
- ``httptools``: a bare ``asyncio.Protocol`` with the httptools parser (llhttp,
  which the node's server and aiohttp both use), which builds no request or
  response objects: the floor under any server on this parser.

The server runs in its own process under uvloop, pinned to CPU 0 where
``taskset`` exists, and the raw client of bench/httpclients.py (one
keep-alive connection per in-flight request) runs in this process on CPU 1,
so the server's CPU per request is read from /proc. Prints req/s and the
server's µs of CPU per request; asserts nothing.

    .venv/bin/python bench/http_floor.py --concurrency 32 --duration 5 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from httpclients import open_client  # noqa: E402

ANSWER = json.dumps({"epoch": 1, "tokens": ["tv1_" + "a" * 32]}).encode()
REQUEST = json.dumps({"values": ["4111111111111111"]}).encode()


def _answer(body: bytes) -> bytes:
    if not isinstance(json.loads(body).get("values"), list):
        raise ValueError("values must be a list")
    return ANSWER


def serve(kind: str, port: int) -> None:
    """The server side, in a process of its own."""
    import uvloop

    if kind in ("aiohttp-app", "aiohttp-lowlevel"):
        from aiohttp import web

        async def tokenize(request: web.BaseRequest) -> web.Response:
            return web.Response(body=_answer(await request.read()), content_type="application/json")

        async def main() -> None:
            if kind == "aiohttp-app":
                @web.middleware
                async def first(request: web.Request, handler):  # type: ignore[no-untyped-def]
                    return await handler(request)

                @web.middleware
                async def second(request: web.Request, handler):  # type: ignore[no-untyped-def]
                    return await handler(request)

                app = web.Application(middlewares=[first, second])
                app.router.add_post("/v1/tokenize", tokenize)
                runner: web.BaseRunner = web.AppRunner(app, access_log=None)
            else:
                runner = web.ServerRunner(web.Server(tokenize, access_log=None))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            await asyncio.Event().wait()
    elif kind == "tokenvault":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tokenvault.api.httpserver import HttpServer, Request, Response

        class App:
            max_connections = 1024
            header_timeout_seconds = 60.0
            max_body_bytes = 1 << 20

            async def __call__(self, request: Request) -> Response:
                chunks = []
                while not request.at_eof():
                    chunks.append(request.read_nowait() or await request.readany())
                return Response(body=_answer(b"".join(chunks)), content_type="application/json")

            def malformed(self, status: int, error_type: str) -> Response:
                return Response(status=status)

            def refused(self) -> bytes:
                return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"

        async def main() -> None:
            await HttpServer(App()).start("127.0.0.1", port)
            await asyncio.Event().wait()
    elif kind == "httptools":
        import httptools

        class Connection(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: asyncio.WriteTransport = transport  # type: ignore[assignment]
                self.parser = httptools.HttpRequestParser(self)
                self.body: list[bytes] = []

            def on_body(self, body: bytes) -> None:
                self.body.append(body)

            def on_message_complete(self) -> None:
                answer = _answer(b"".join(self.body))
                self.body = []
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))

            def data_received(self, data: bytes) -> None:
                self.parser.feed_data(data)

        async def main() -> None:
            await asyncio.get_running_loop().create_server(Connection, "127.0.0.1", port)
            await asyncio.Event().wait()
    else:
        raise SystemExit(f"unknown server {kind}")
    uvloop.install()
    asyncio.run(main())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _load(port: int, concurrency: int, duration: float) -> int:
    url = f"http://127.0.0.1:{port}/v1/tokenize"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}
    done = 0
    async with open_client("raw", concurrency) as client:
        end = time.monotonic() + duration

        async def one(worker: int) -> None:
            nonlocal done
            while time.monotonic() < end:
                status, _ = await client.post(worker, url, REQUEST, headers)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}")
                done += 1

        await asyncio.gather(*(one(worker) for worker in range(concurrency)))
    return done


def measure(kind: str, concurrency: int, duration: float) -> None:
    port = _free_port()
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    server = subprocess.Popen([*pin, sys.executable, __file__, "--serve", kind, "--port", str(port)])
    affinity = os.sched_getaffinity(0)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"{kind}: the server did not start")
                time.sleep(0.05)
        if pin:
            os.sched_setaffinity(0, {1})
        asyncio.run(_load(port, concurrency, 0.5))  # warm-up
        before = _cpu_seconds(server.pid)
        done = asyncio.run(_load(port, concurrency, duration))
        used = _cpu_seconds(server.pid) - before
        print(f"{kind:18} {done / duration:9,.0f} req/s   server CPU {used * 1e6 / max(done, 1):6.1f} us per request")
    finally:
        os.sched_setaffinity(0, affinity)
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve:
        serve(arguments.serve, arguments.port)
        return
    kinds = ["aiohttp-app", "aiohttp-lowlevel", "tokenvault", "httptools"]
    for _ in range(arguments.rounds):
        for kind in kinds:
            measure(kind, arguments.concurrency, arguments.duration)


if __name__ == "__main__":
    main()
