"""A small in-memory stand-in for a TokenVault node, for client and CLI tests.

It runs an aiohttp server on 127.0.0.1:0 in a background thread, so both
synchronous tests (click's CliRunner) and async tests can use it. It behaves
like a node for the happy path (tokenize, detokenize, epochs, health, cluster)
and lets a test script any answer per endpoint, including dropping the
connection, and records every request it received.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tokenvault.config import LimitsConfig
from tokenvault.crypto.tls import NodeTlsFiles, create_cluster_tls, http_server_context

DROP = "drop"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    query: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


Responder = Callable[[RecordedRequest], "Reply | str | None"]


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> Reply:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return Reply(status, body, headers or {})


class FakeVaultServer:
    """In-memory node; `responders[(method, path)]` overrides the default answer when it returns a reply."""

    def __init__(self, node_id: str = "n1", role: str = "primary", api_key: str | None = None,
                 tls_files: NodeTlsFiles | None = None) -> None:
        self.node_id = node_id
        self.tls_files = tls_files  # serve https:// with this certificate, as a TLS node does
        self.role = role
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.responders: dict[tuple[str, str], Responder] = {}
        self.active_epoch = 1
        self.mapping: dict[str, str] = {}
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> "FakeVaultServer":
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.url = future.result(timeout=10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> "FakeVaultServer":
        return self.start()

    def __exit__(self, *exception_info: object) -> None:
        self.stop()

    def calls(self, path: str) -> list[RecordedRequest]:
        return [request for request in self.requests if request.path == path]

    async def _start(self) -> str:
        # Why: a node's default body bound (8 MiB), not aiohttp's 1 MiB.
        app = web.Application(client_max_size=LimitsConfig().max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        context = http_server_context(self.tls_files) if self.tls_files is not None else None
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"{'https' if context is not None else 'http'}://127.0.0.1:{port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        recorded = RecordedRequest(request.method, request.path, dict(request.headers), body, dict(request.query))
        self.requests.append(recorded)
        responder = self.responders.get((request.method, request.path))
        reply = responder(recorded) if responder is not None else None
        if reply is None:
            reply = self._default(recorded)
        if reply == DROP:
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        content_type = "application/problem+json" if reply.status >= 400 else "application/json"
        return web.Response(status=reply.status, text=json.dumps(reply.body), headers=reply.headers,
                            content_type=content_type)

    def _authorized(self, request: RecordedRequest) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def token_for(self, value: str, epoch: int) -> str:
        digest = hashlib.sha256(f"{epoch}:{value}".encode()).digest()[:20]
        return f"tv{epoch}_" + base64.b32encode(digest).decode().lower().rstrip("=")

    def _default(self, request: RecordedRequest) -> Reply:
        if request.path == "/health":
            return Reply(200, {"status": "ok", "node_id": self.node_id, "role": self.role, "view": 3,
                               "primary_id": "n1", "commit_index": 42, "applied_index": 41,
                               "active_epoch": self.active_epoch})
        if not self._authorized(request):
            return problem(401, "Unauthorized", "missing or unknown API key",
                           {"WWW-Authenticate": "Bearer"})
        if (request.method, request.path) == ("POST", "/v1/tokenize"):
            tokens = [self.token_for(value, self.active_epoch) for value in request.body["values"]]
            self.mapping.update(zip(tokens, request.body["values"]))
            return Reply(200, {"epoch": self.active_epoch, "tokens": tokens})
        if (request.method, request.path) == ("POST", "/v1/detokenize"):
            return Reply(200, {"values": [self.mapping.get(token) for token in request.body["tokens"]]})
        if (request.method, request.path) == ("POST", "/v1/admin/epochs"):
            self.active_epoch += 1
            return Reply(201, {"epoch": self.active_epoch})
        if (request.method, request.path) == ("GET", "/v1/admin/epochs"):
            epochs = [{"epoch": epoch, "created_at": f"2024-01-0{min(epoch, 9)}T00:00:00Z",
                       "state": "active" if epoch == self.active_epoch else "retired"}
                      for epoch in range(1, self.active_epoch + 1)]
            return Reply(200, {"active_epoch": self.active_epoch, "epochs": epochs})
        if (request.method, request.path) == ("GET", "/v1/admin/cluster"):
            return Reply(200, {"nodes": [
                {"id": "n1", "role": "primary", "reachable": True, "match_index": 42},
                {"id": "n2", "role": "backup", "reachable": False, "match_index": 40},
            ]})
        return problem(404, "Not Found", "no such endpoint")


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was bound and released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def node_tls_files(directory: Path) -> NodeTlsFiles:
    """A fresh cluster CA under `directory` and the files of one node (n1) on 127.0.0.1."""
    return create_cluster_tls(directory, {"n1": ["127.0.0.1"]}).nodes["n1"]
