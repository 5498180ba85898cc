"""Test doubles for the HTTP layer: an in-memory FakeService, API keys, servers.

A module of its own (not conftest.py) so test modules can import it by a
unique name.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp.test_utils import BaseTestServer
from yarl import URL

from protocol import Membership, MembershipError
from tokenvault import auth
from tokenvault.api.members import validate_member_change
from tokenvault.errors import (AuditTrimRefused, EpochActive, EpochDestroyed, IdempotencyInFlight, IdempotencyMismatch,
                               MembershipChangeRefused, NotFound, Outcome,
                               Unavailable)
from tokenvault.api.http import HttpApp, http_server
from tokenvault.api.httpserver import HttpServer
from tokenvault.crypto.tokens import parse_token

FAKE_NODE_ID = "fake-1"
LIVE_SERVER_START_TIMEOUT_SECONDS = 10.0


def fake_token(epoch: int, value: str) -> str:
    """A deterministic token of the real grammar (not the real HMAC: this is a fake)."""
    digest = hashlib.sha256(f"{epoch}\x00{value}".encode("utf-8")).digest()[:20]
    return f"tv{epoch}_{base64.b32encode(digest).decode('ascii').lower()}"


def _json_bytes(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


class FakeService:
    """The methods tokenvault.api.http calls on the service, in memory, with switches to provoke each service error.

    ``unavailable``: every call raises Unavailable (503).
    ``tokenize_gate``: when set, tokenize waits on it after claiming its
    idempotency key, so a concurrent repeat sees 409.
    ``crash_with``: tokenize raises this exception (an unexpected bug).
    """

    def __init__(self) -> None:
        self.node_id = FAKE_NODE_ID
        self.membership = Membership.of((FAKE_NODE_ID,))
        self.active_epoch = 1
        self.epoch_created_at = {1: "2024-01-01T00:00:00.000Z"}
        self.vault: dict[str, str] = {}
        self.idempotency: dict[tuple[str, str], tuple[str, bytes, Outcome]] = {}
        self.in_flight: set[tuple[str, str]] = set()
        self.unavailable = False
        self.tokenize_gate: asyncio.Event | None = None
        self.crash_with: BaseException | None = None
        self.tokenize_calls: list[tuple[str, list[str], str | None]] = []
        self.detokenize_calls: list[list[str]] = []
        self.backups_opened = 0
        self.runtime_keys: dict[str, auth.RuntimeKey] = {}
        # The runtime key id each membership change named (None: a bootstrap key), in order.
        self.member_change_keys: list[str | None] = []
        # The runtime key id each admin read that reaches the primary named (None: a bootstrap key), in order.
        self.admin_read_keys: list[tuple[str, str | None]] = []
        self.detokenize_actors: list[object] = []
        self.format_vault: dict[tuple[int, str], str] = {}
        self.tokenize_options: list[tuple[str, str | None, int | None]] = []
        self.reveal_calls: list[tuple[list[str], int | None, bool, bool]] = []
        self.destroyed: set[int] = set()
        self.lifecycle_calls: list[tuple[str, object]] = []

    def _check_available(self) -> None:
        if self.unavailable:
            raise Unavailable("no primary is known right now; retry shortly")

    def health(self) -> dict:
        return {"status": "ok", "node_id": self.node_id, "role": "primary", "view": 3, "primary_id": self.node_id,
                "commit_index": 7, "applied_index": 7, "active_epoch": self.active_epoch}

    async def read_health(self) -> dict:
        return self.health()

    async def _idempotent(self, principal: str, key: str | None, kind: str, fingerprint: bytes, work) -> Outcome:
        if key is None:
            return await work()
        stored = self.idempotency.get((principal, key))
        if stored is not None:
            stored_kind, stored_fingerprint, outcome = stored
            if stored_kind != kind or stored_fingerprint != fingerprint:
                raise IdempotencyMismatch()
            return Outcome(outcome.status, outcome.body, True)
        if (principal, key) in self.in_flight:
            raise IdempotencyInFlight()
        self.in_flight.add((principal, key))
        try:
            outcome = await work()
            self.idempotency[(principal, key)] = (kind, fingerprint, outcome)
            return outcome
        finally:
            self.in_flight.discard((principal, key))

    async def tokenize(self, principal: str, values: list[str], idempotency_key: str | None,
                       token_format: str = "opaque", metadata_json: str | None = None,
                       ttl_seconds: int | None = None) -> Outcome:
        self._check_available()
        if self.crash_with is not None:
            raise self.crash_with
        self.tokenize_calls.append((principal, list(values), idempotency_key))
        if token_format != "opaque" or metadata_json is not None or ttl_seconds is not None:
            self.tokenize_options.append((token_format, metadata_json, ttl_seconds))
        fingerprint = hashlib.sha256(_json_bytes([values, token_format, metadata_json, ttl_seconds])).digest()

        async def work() -> Outcome:
            if self.tokenize_gate is not None:
                await self.tokenize_gate.wait()
            epoch = self.active_epoch
            if token_format == "opaque":
                tokens = [fake_token(epoch, value) for value in values]
                for token, value in zip(tokens, values):
                    self.vault.setdefault(token, value)
            else:  # not FF1: a fake of the same shape (same length, digits)
                tokens = [str(int(hashlib.sha256(f"{epoch}{value}".encode()).hexdigest(), 16))[:len(value)]
                          for value in values]
                for token, value in zip(tokens, values):
                    self.format_vault.setdefault((epoch, token), value)
            return Outcome(200, _json_bytes({"epoch": epoch, "tokens": tokens}), False)

        return await self._idempotent(principal, idempotency_key, "tokenize", fingerprint, work)

    async def detokenize(self, tokens: list[str], actor: object = None) -> list[str | None]:
        self._check_available()
        self.detokenize_actors.append(actor)
        for token in tokens:
            parse_token(token)  # the HTTP layer promised grammar-checked tokens
        self.detokenize_calls.append(list(tokens))
        return [self.vault.get(token) for token in tokens]

    async def reveal(self, tokens: list[str], actor: object = None, epoch: int | None = None,
                     include_metadata: bool = False, masked: bool = False) -> dict:
        self._check_available()
        self.detokenize_actors.append(actor)
        self.reveal_calls.append((list(tokens), epoch, include_metadata, masked))
        epoch = self.active_epoch if epoch is None else epoch
        values = [self.vault.get(token) if token.startswith("tv") else self.format_vault.get((epoch, token))
                  for token in tokens]
        if masked:
            values = [None if value is None else "*" * (len(value) - len(value) // 2) + value[len(value) - len(value) // 2:]
                      for value in values]
        document: dict = {"values": values}
        if include_metadata:
            document["metadata_json"] = [None for _ in tokens]
        return document

    async def rotate_epoch(self, principal: str, idempotency_key: str | None, actor: object = None) -> Outcome:
        self._check_available()

        async def work() -> Outcome:
            self.active_epoch += 1
            self.epoch_created_at[self.active_epoch] = "2024-01-02T00:00:00.000Z"
            return Outcome(201, _json_bytes({"epoch": self.active_epoch}), False)

        return await self._idempotent(principal, idempotency_key, "rotate", b"{}", work)

    async def list_epochs(self, key_id: str | None = None) -> dict:
        self._check_available()
        self.admin_read_keys.append(("epochs", key_id))
        epochs = [
            {"epoch": epoch, "created_at": created_at, "state": self._state(epoch)}
            for epoch, created_at in sorted(self.epoch_created_at.items())
        ]
        return {"active_epoch": self.active_epoch, "epochs": epochs}

    def _state(self, epoch: int) -> str:
        return "active" if epoch == self.active_epoch else "destroyed" if epoch in self.destroyed else "retired"

    async def delete_tokens(self, tokens: list[str], actor: object = None, epoch: int | None = None) -> Outcome:
        self._check_available()
        self.lifecycle_calls.append(("delete", list(tokens)))
        deleted = sum(self.vault.pop(token, None) is not None for token in dict.fromkeys(tokens))
        return Outcome(200, _json_bytes({"deleted": deleted}), False)

    async def retokenize(self, tokens: list[str], actor: object = None, epoch: int | None = None) -> dict:
        self._check_available()
        self.lifecycle_calls.append(("retokenize", list(tokens)))
        for position, token in enumerate(tokens):
            token_epoch = parse_token(token).epoch if token.startswith("tv") else (epoch or self.active_epoch)
            if token_epoch in self.destroyed:
                raise EpochDestroyed(f"tokens[{position}] belongs to a destroyed epoch")
        answer = []
        for token in tokens:  # card and digits tokens: the fake holds none, so null
            value = self.vault.get(token)
            new = None if value is None else fake_token(self.active_epoch, value)
            if new is not None:
                self.vault[new] = value
            answer.append(new)
        return {"epoch": self.active_epoch, "tokens": answer}

    async def destroy_epoch(self, epoch: int, actor: object = None) -> Outcome:
        self._check_available()
        self.lifecycle_calls.append(("destroy", epoch))
        if epoch == self.active_epoch:
            raise EpochActive("the active epoch cannot be destroyed")
        if epoch not in self.epoch_created_at:
            raise NotFound("no epoch has this number")
        self.destroyed.add(epoch)
        for token in [token for token in self.vault if parse_token(token).epoch == epoch]:
            del self.vault[token]
        return Outcome(200, _json_bytes({"epoch": epoch, "state": "destroyed"}), False)

    async def epoch_tokens(self, epoch: int, after: str | None, limit: int, key_id: str | None = None) -> dict:
        self._check_available()
        self.admin_read_keys.append(("epoch tokens", key_id))
        if epoch not in self.epoch_created_at:
            raise NotFound("no epoch has this number")
        tokens = sorted(token for token in self.vault if parse_token(token).epoch == epoch
                        and (after is None or token > after))[:limit]
        return {"epoch": epoch, "state": self._state(epoch), "tokens": tokens,
                "next_after": tokens[-1] if len(tokens) == limit else None}

    def api_key(self, key_id: str) -> auth.RuntimeKey | None:
        return self.runtime_keys.get(key_id)

    async def create_key(self, name: str, scopes: list[str], actor: object) -> Outcome:
        self._check_available()
        key_id, key, salt, digest = auth.new_runtime_key()
        self.runtime_keys[key_id] = auth.RuntimeKey(key_id, name, frozenset(scopes), salt, digest, 0, "fake")
        body = {"id": key_id, "name": name, "scopes": sorted(set(scopes)),
                "created_at": "2024-01-01T00:00:00.000Z", "key": key}
        return Outcome(201, _json_bytes(body), False)

    async def list_keys(self, key_id: str | None = None) -> dict:
        self._check_available()
        self.admin_read_keys.append(("keys", key_id))
        return {"keys": [{"id": entry.key_id, "name": entry.name, "scopes": sorted(entry.scopes),
                          "created_at": "2024-01-01T00:00:00.000Z"} for entry in self.runtime_keys.values()]}

    async def revoke_key(self, key_id: str, actor: object) -> Outcome:
        self._check_available()
        if self.runtime_keys.pop(key_id, None) is None:
            raise NotFound("no runtime API key has this id")
        return Outcome(200, _json_bytes({"id": key_id, "revoked": True}), False)

    async def list_members(self, key_id: str | None = None) -> dict:
        self._check_available()
        self.admin_read_keys.append(("members", key_id))
        return {"primary_id": self.node_id, "configuration_index": 1, "committed": True, "commit_index": 1,
                "members": [{"id": member.node_id, "peer_addr": member.address or None,
                             "role": "voter" if member.voter else "learner", "match_index": 1,
                             "added_at_index": member.since}
                            for member in self.membership.members]}

    async def change_member(self, action: str, node_id: str, peer_addr: str | None,
                            key_id: str | None = None) -> Outcome:
        """As the real service: validated, then applied at once (a real primary waits for the commit)."""
        self._check_available()
        self.member_change_keys.append(key_id)
        action, node_id, peer_addr = validate_member_change(action, node_id, peer_addr)
        try:
            if action == "add":
                self.membership = self.membership.with_learner(node_id, peer_addr or "")
            elif action == "promote":
                self.membership = self.membership.promoted(node_id)
            else:
                self.membership = self.membership.without(node_id)
        except MembershipError as error:
            raise MembershipChangeRefused(str(error)) from None
        body = {"action": action, "node_id": node_id, "configuration_index": 2,
                "voters": list(self.membership.voters), "learners": list(self.membership.learners)}
        return Outcome(201 if action == "add" else 200, _json_bytes(body), False)

    async def audit_page(self, after: int, limit: int) -> dict:
        self._check_available()
        return {"records": [], "last_seq": 0, "next_after": None, "anchor": None}

    async def trim_audit(self, through_seq: int, through_hash: bytes, actor: object = None) -> Outcome:
        """The fake's trail is empty: every trim names a record that does not exist."""
        self._check_available()
        raise AuditTrimRefused(f"there is no audit record {through_seq} yet")

    async def cluster_view(self) -> dict:
        self._check_available()
        return {"node_id": self.node_id, "view": 3, "primary_id": self.node_id,
                "nodes": [{"id": self.node_id, "role": "primary", "reachable": True, "is_self": True}]}

    async def open_backup(self) -> "FakeBackupStream":
        self._check_available()
        self.backups_opened += 1
        return FakeBackupStream()


class FakeBackupStream:
    """What open_backup returns (tokenvault.core.backup.BackupStream's interface), from memory."""

    index, view = 7, 3

    def __init__(self) -> None:
        self.data = b"TVSNAP1\n" + bytes(range(256)) * 64
        self.total_bytes = len(self.data)
        self.sent_bytes = 0

    async def chunks(self, chunk_bytes: int):
        for start in range(0, self.total_bytes, chunk_bytes):
            self.sent_bytes = min(self.total_bytes, start + chunk_bytes)
            yield self.data[start:start + chunk_bytes]

    async def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Plain API keys for the test principals, by name; the app only sees their hashes."""

    keys: dict[str, str]
    scopes: dict[str, frozenset[str]]

    def table(self, runtime_lookup: auth.RuntimeKeyLookup | None = None) -> auth.ApiKeyTable:
        return auth.ApiKeyTable(
            (auth.ApiKeyEntry(name=name, sha256=auth.hash_api_key(key), scopes=self.scopes[name])
             for name, key in self.keys.items()),
            runtime_lookup,
        )

    def bearer(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}


def make_key_ring() -> KeyRing:
    scopes = {
        "admin": frozenset({auth.ADMIN}),
        "tokenizer": frozenset({auth.TOKENIZE}),
        "detokenizer": frozenset({auth.DETOKENIZE}),
        "full": frozenset({auth.ADMIN, auth.TOKENIZE, auth.DETOKENIZE, auth.DELETE, auth.RETOKENIZE}),
    }
    return KeyRing(keys={name: auth.generate_api_key() for name in scopes}, scopes=scopes)


class ProblemTestServer(BaseTestServer):
    """A test server for aiohttp's TestClient, serving an HttpApp on the node's own server
    (tokenvault/api/httpserver.py, as http_server builds it: problem+json for malformed HTTP, the
    connection limits)."""

    def __init__(self, app: HttpApp, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.http_app = app
        self.http_server: HttpServer | None = None
        super().__init__(**kwargs)

    async def _make_runner(self, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError("served by HttpServer, not an aiohttp runner")

    @property
    def started(self) -> bool:
        return self.http_server is not None

    async def start_server(self, loop=None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if self.http_server is not None:
            return
        self._loop = loop
        self.http_server = http_server(self.http_app)
        await self.http_server.start(self.host, self.port or 0)
        self.host, self.port = self.http_server.addresses[0][:2]
        self.scheme = self.scheme or "http"
        self._root = URL(f"{self.scheme}://{self.host}:{self.port}")

    async def close(self) -> None:
        if self.http_server is not None and not self._closed:
            await self.http_server.close(0)
            self._root = None
            self._closed = True


# ---------------------------------------------------------------- live server in a thread


class LiveServer:
    """Runs the node's HTTP app on 127.0.0.1, port 0, in its own thread and event loop."""

    def __init__(self, app_factory: Callable[[], HttpApp]) -> None:
        self._app_factory = app_factory
        self._loop = asyncio.new_event_loop()
        self._server: HttpServer | None = None
        self._thread = threading.Thread(target=self._run, name="live-http-server", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.base_url = ""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as error:  # reported to the starting thread
            self._error = error
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._server.close(0))
        self._loop.close()

    async def _start(self) -> None:
        self._server = http_server(self._app_factory())
        await self._server.start("127.0.0.1", 0)
        host, port = self._server.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"

    def start(self) -> str:
        self._thread.start()
        if not self._started.wait(LIVE_SERVER_START_TIMEOUT_SECONDS):
            raise TimeoutError("the live server did not start in time")
        if self._error is not None:
            raise self._error
        return self.base_url

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(LIVE_SERVER_START_TIMEOUT_SECONDS)


@dataclass(frozen=True, slots=True)
class HttpTarget:
    """Where sync tests send requests, and the API key (all scopes) they use."""

    base_url: str
    full_key: str
    is_fake: bool


