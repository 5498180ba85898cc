"""The HTTP API of a node: routing, authentication, validation, problem+json (served by httpserver.py).

This module is the only place where client bytes become service calls, so it
validates everything before the service sees it. Before any request, the
connection itself is bounded (tokenvault/api/httpserver.py): at most
``max_connections`` are open at once (the rest are answered 503 and closed at
once), and a connection must deliver a request's headers within
``header_timeout_seconds`` of opening or of its previous response, or it is
closed; an idle keep-alive connection counts as one waiting for headers.

The checks of a request run in this order, and the first failing one answers
(an endpoint handler calls ``admit``, then ``receive_body`` if it takes a body,
then holds ``inflight_slot`` around the rest):

1. route and method (404, 405), by the node's router (tokenvault/api/routing.py);
2. authentication (401 with ``WWW-Authenticate: Bearer``), then scope (403) —
   before the body is read, so an unauthenticated client makes the node parse
   nothing and buffer no more than the server reads ahead of a handler
   (tokenvault/api/httpserver.py, ``READ_AHEAD_BYTES`` plus one read of the
   socket); a request refused before its body is read closes its connection
   (``_body_left_unread``);
3. the key's rate limit for the endpoint's kind (429 with ``Retry-After``,
   tokenvault/api/ratelimit.py), still before the body is read; handlers do 2 and
   3 in one call, ``admit``;
4. the ``Idempotency-Key`` header (400), on the endpoints that take one;
5. receiving the body (``receive_body``), for requests that have one: the
   content type (415), the declared Content-Length (413), then the body itself
   under two bounds on bodies being received at once, ``max_body_reads_per_key``
   for the key (429 with ``Retry-After``) and ``max_body_reads`` for the node
   (503 with ``Retry-After``); then the ``Expect`` header, only now that the
   body will be read (417 for anything but ``100-continue``, which is answered
   ``100 Continue``). Each piece of the body must arrive within
   ``body_timeout_seconds`` of the previous one (else 408 and the connection is
   closed), and the bytes received count against ``max_body_bytes`` as they
   arrive (413, also for chunked and compressed bodies);
6. the in-flight bound (503 with ``Retry-After``), so the requests being
   worked on stay bounded; it is taken only once the body is in memory, so a
   slow sender never holds an in-flight slot, and the per-key body bound keeps
   one key's slow senders from holding every body slot. For ``GET
   /v1/admin/backup`` instead the backup-stream bound (at most
   ``max_backup_streams`` streams at a time, 503 with ``Retry-After``), so a
   long download never holds a request slot;
7. the structure bound on the raw body, before it is parsed
   (tokenvault/api/validation.py, a few C-speed passes): unpaired quotes (400),
   more strings than any allowed request holds (413), more arrays and objects
   than a fixed slack (400), more JSON values than ``max_items`` plus that
   slack (413) — so parsing never builds millions of objects or holds the
   event loop; then JSON syntax and UTF-8 (400), the document's shape (400),
   the item count (413), then each item (400); then the version 2 members of
   tokenize (``format``, ``metadata``, ``ttl_seconds``: 400 for a wrong type,
   422 for metadata over 1 KiB, a TTL out of range or a value that does not
   fit its format) and of detokenize (``epoch``, ``include_metadata``: 400; a
   ``detokenize_masked``-only key asking for metadata: 403); for ``GET /v1/admin/audit``
   the query parameters ``after`` and ``limit`` (400); path parameters (an
   epoch or a key id: 404; a node id: 400) are checked here too, by their
   handlers, after the body: the router matches only the path's shape;
8. the service's own answers: 409 / 422 for idempotency conflicts, 503.

Error bodies are ``application/problem+json`` built from fixed texts, counts
and positions; they never contain a submitted value, token or key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenvault import auth
from tokenvault.config import HttpConfig, LimitsConfig, NodeConfig
from tokenvault.core import backup
from tokenvault.core import commands
from tokenvault.core.store_layout import MAX_AUDIT_PAGE, StoreDamaged
from tokenvault.api import ratelimit
from tokenvault.api.http_lifecycle import add_lifecycle_routes
from tokenvault.api.httpserver import (HTTP_11, AnyResponse, BodyError, BodyTooLarge, HttpServer, Request, Response,
                                       StreamResponse)
from tokenvault.api.members import validate_member_change
from tokenvault.api.routing import PATH_PARAMETERS, Match, MethodNotAllowed, RouteNotFound, Router, path_parameter
from tokenvault.api.responses import EMPTY_BODY, JSON_CONTENT_TYPE, NO_STORE_HEADERS, json_response, outcome_response
from tokenvault.errors import (
    PROBLEM_CONTENT_TYPE,
    Forbidden,
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServiceError,
    Unauthenticated,
    Unavailable,
    UnsupportedMediaType,
    default_title,
    problem_body,
    problem_body_of,
)
from tokenvault.logs import SummedEvent, get_logger
from tokenvault.metrics import METRICS_CONTENT_TYPE, METRICS_MAX_AGE_SECONDS, UNMATCHED_ROUTE, Metrics, RecentRender
from tokenvault.api.validation import (
    canonical_metadata,
    check_json_structure,
    lookup_tokens_and_epoch,
    max_json_values,
    normalize_values,
    require_item_list,
    require_members,
    validate_idempotency_key,
    validate_options,
    validate_ttl,
    validate_values,
)
from tokenvault.crypto import formats
from tokenvault.crypto.tokens import is_token

if TYPE_CHECKING:
    from tokenvault.api.interface import VaultService

ROUTE_HEALTH = "/health"
ROUTE_METRICS = "/metrics"
ROUTE_TOKENIZE = "/v1/tokenize"
ROUTE_DETOKENIZE = "/v1/detokenize"
ROUTE_EPOCHS = "/v1/admin/epochs"
ROUTE_CLUSTER = "/v1/admin/cluster"
ROUTE_BACKUP = backup.ROUTE_BACKUP
ROUTE_KEYS = "/v1/admin/keys"
ROUTE_KEY_REVOKE = "/v1/admin/keys/{key_id}/revoke"
ROUTE_AUDIT = "/v1/admin/audit"
# The optional members of a tokenize request (version 2).
TOKENIZE_OPTIONS = ("format", "metadata", "ttl_seconds")
ROUTE_MEMBERS = "/v1/admin/members"
ROUTE_MEMBER_ACTION = "/v1/admin/members/{node_id}/{action:promote|remove}"
# GET /v1/admin/audit: at most this many records per page, and this many when not asked.
DEFAULT_AUDIT_PAGE = 100
_DECIMAL = re.compile(r"(0|[1-9][0-9]{0,18})\Z")
MAX_AUDIT_SEQ = 2**63 - 2

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
REQUEST_ID_HEADER = "X-Request-Id"
# Open files a node's process needs besides its HTTP connections: the store's table files, which
# RocksDB keeps open (about 50 at 50 M tokens, and each worker's view of the store as many), the WAL,
# the peer links, the workers' channels, the log; with room. A process whose limit on open files
# leaves less than max_connections beyond this takes fewer connections (connections_allowed).
OPEN_FILES_HEADROOM = 512
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Per request: the admitted principal, its rate-limit kind and the received body.
_PRINCIPAL = "tokenvault.principal"
_KIND = "tokenvault.rate_limit_kind"
_BODY = "tokenvault.body"
# The endpoint kind a scope's requests are counted under (tokenvault/api/ratelimit.py).
# Delete and re-tokenize are writes of the token table: they count as tokenize.
RATE_LIMIT_KIND_OF_SCOPE = {auth.TOKENIZE: ratelimit.TOKENIZE, auth.DETOKENIZE: ratelimit.DETOKENIZE,
                            auth.DETOKENIZE_MASKED: ratelimit.DETOKENIZE, auth.ADMIN: ratelimit.ADMIN,
                            auth.DELETE: ratelimit.TOKENIZE, auth.RETOKENIZE: ratelimit.TOKENIZE}

_log = get_logger("tokenvault.api.http")

# A node built without a config file gets the limits of one whose file leaves them out.
_DEFAULT_HTTP, _DEFAULT_LIMITS = HttpConfig(), LimitsConfig()


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Request and connection limits; the contract's defaults are 1000 items, 4096 bytes, 8 MiB.

    ``rate_limits`` maps an endpoint kind to every key's bucket (absent kinds are unlimited);
    ``key_rate_limits`` maps a key name to its own buckets by kind (absent: the default).
    """

    max_items: int = _DEFAULT_LIMITS.max_items
    max_value_bytes: int = _DEFAULT_LIMITS.max_value_bytes
    max_body_bytes: int = _DEFAULT_LIMITS.max_body_bytes
    max_inflight_requests: int = _DEFAULT_HTTP.max_inflight_requests
    max_backup_streams: int = _DEFAULT_HTTP.max_backup_streams
    backup_chunk_bytes: int = backup.BACKUP_CHUNK_BYTES
    header_timeout_seconds: float = _DEFAULT_HTTP.header_timeout_ms / 1000
    body_timeout_seconds: float = _DEFAULT_HTTP.body_timeout_ms / 1000
    max_connections: int = _DEFAULT_HTTP.max_connections
    max_body_reads: int = _DEFAULT_HTTP.max_body_reads
    max_body_reads_per_key: int = _DEFAULT_HTTP.max_body_reads_per_key
    rate_limits: Mapping[str, ratelimit.BucketLimit] = field(default_factory=dict)
    key_rate_limits: Mapping[str, Mapping[str, ratelimit.BucketLimit]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_items", "max_value_bytes", "max_body_bytes", "max_inflight_requests",
                     "max_backup_streams", "backup_chunk_bytes", "max_connections", "max_body_reads",
                     "max_body_reads_per_key"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("header_timeout_seconds", "body_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")

    @classmethod
    def from_config(cls, config: Any, *, share: int = 1) -> HttpLimits:
        """The limits of one process serving ``1/share`` of the node: a node of W HTTP workers gives
        each worker an even share (rounded up) of every per-node bound and rate limit, so the node as a
        whole holds them (tokenvault.api.workers; docs/architecture.md). The backup-stream bound is
        not shared: on a node of workers the core holds it for the whole node (CoreCalls)."""
        if share < 1:
            raise ValueError("share must be at least 1")
        limits, http = config.limits, config.http
        rates, key_rates = _bucket_limits(config.rate_limits, share)
        return cls(
            max_items=limits.max_items,
            max_value_bytes=limits.max_value_bytes,
            max_body_bytes=limits.max_body_bytes,
            max_inflight_requests=-(-http.max_inflight_requests // share),
            max_backup_streams=http.max_backup_streams,
            header_timeout_seconds=http.header_timeout_ms / 1000,
            body_timeout_seconds=http.body_timeout_ms / 1000,
            max_connections=min(-(-http.max_connections // share), connections_allowed()),
            max_body_reads=-(-http.max_body_reads // share),
            max_body_reads_per_key=-(-http.max_body_reads_per_key // share),
            rate_limits=rates,
            key_rate_limits=key_rates,
        )


def connections_allowed() -> int:
    """The HTTP connections a process of a node can hold open besides OPEN_FILES_HEADROOM descriptors, by
    its limit on open files in force, the soft one (tokenvault.serve raises it to the hard limit at start
    where it may, and the workers inherit it): past it a connection is answered 503 and closed at once,
    where it would otherwise fail to be accepted or take the descriptor a store file needs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, soft - OPEN_FILES_HEADROOM)


def _metric_key_label(principal: auth.Principal | None) -> str:
    """The key label of the rate-limit metric: a bootstrap key's configured name, or "runtime" for every
    runtime key (their names are an admin's to choose, so they would make the label set unbounded)."""
    if principal is None:
        return ""
    return principal.name if principal.key_id is None else "runtime"


def _bucket_limits(rate_limits: Any, share: int = 1) -> tuple[dict[str, ratelimit.BucketLimit],
                                                              dict[str, dict[str, ratelimit.BucketLimit]]]:
    """The config's [rate_limits] as buckets: every key's default per kind, and single keys' own; each
    rate and burst divided by ``share`` (a burst never below one request)."""
    def bucket(rate_and_burst: tuple[int, int]) -> ratelimit.BucketLimit:
        rate, burst = rate_and_burst
        if rate == 0:
            return ratelimit.BucketLimit(rate_per_second=0, burst=burst)
        return ratelimit.BucketLimit(rate_per_second=rate / share, burst=max(1.0, burst / share))

    defaults = {kind: bucket(rate_limits.rate_and_burst(kind)) for kind in ratelimit.KINDS}
    own = {entry.name: {kind: bucket(entry.rate_and_burst(kind))
                        for kind in ratelimit.KINDS if entry.rate_and_burst(kind) is not None}
           for entry in rate_limits.keys}
    return defaults, own


# ---------------------------------------------------------------- responses


def problem_response(
    status: int, slug: str, title: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    return Response(body=problem_body(status, slug, title, detail), status=status, headers=headers,
                    content_type=PROBLEM_CONTENT_TYPE)


def error_response(error: ServiceError) -> Response:
    """The problem response of a service error: its status, type, title, detail and headers."""
    return Response(body=problem_body_of(error), status=error.status, headers=error.headers,
                    content_type=PROBLEM_CONTENT_TYPE)


# ---------------------------------------------------------------- header checks


def authorize(request: Request, api_keys: auth.ApiKeyTable, scope: str,
              alternative: str | None = None) -> auth.Principal:
    """The request's principal if its bearer key is known and has ``scope`` (or ``alternative``); else 401 / 403."""
    headers = request.headers.getall("Authorization", [])
    if not headers:
        raise Unauthenticated("send an API key as 'Authorization: Bearer <key>'", headers=_challenge())
    if len(headers) > 1:
        raise Unauthenticated("send exactly one Authorization header", headers=_challenge("invalid_request"))
    presented = auth.bearer_credentials(headers[0])
    if presented is None:
        raise Unauthenticated(
            "the Authorization header must use the Bearer scheme", headers=_challenge("invalid_request")
        )
    principal = api_keys.authenticate(presented)
    if principal is None:
        raise Unauthenticated("unknown API key", headers=_challenge("invalid_token"))
    if not principal.has_scope(scope) and (alternative is None or not principal.has_scope(alternative)):
        raise Forbidden(
            f"this API key lacks the '{scope}' scope",
            headers={"WWW-Authenticate": f'Bearer realm="tokenvault", error="insufficient_scope", scope="{scope}"'},
        )
    return principal


def _challenge(error: str | None = None) -> dict[str, str]:
    value = 'Bearer realm="tokenvault"'
    if error is not None:
        value += f', error="{error}"'
    return {"WWW-Authenticate": value}


def idempotency_key(request: Request) -> str | None:
    """The Idempotency-Key header (1-255 printable ASCII characters), or None when absent."""
    values = request.headers.getall(IDEMPOTENCY_KEY_HEADER, [])
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest("send at most one Idempotency-Key header")
    return validate_idempotency_key(values[0])


def require_json_content_type(request: Request) -> None:
    """415 unless the body is declared as JSON (application/json or */*+json) in UTF-8."""
    if "Content-Type" not in request.headers:
        raise UnsupportedMediaType("send the body with 'Content-Type: application/json'")
    media_type = request.content_type
    is_json = media_type == JSON_CONTENT_TYPE or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )
    if not is_json:
        raise UnsupportedMediaType("the request body must be application/json")
    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType("JSON request bodies must be UTF-8")


# ---------------------------------------------------------------- body checks


class _DuplicateMember(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise _DuplicateMember
    return document


def _refuse_constant(_name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


# Built once: json.loads with hooks would construct a new decoder for every request.
_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicates, parse_constant=_refuse_constant)


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate object members, no NaN/Infinity, bounded nesting."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    try:
        return _STRICT_DECODER.decode(text)
    except _DuplicateMember:
        raise InvalidRequest("a JSON object in the body has a duplicate member name") from None
    except RecursionError:
        raise InvalidRequest("the JSON body is nested too deeply") from None
    except ValueError:
        # json's messages hold only positions, but ours is fixed text to be sure.
        raise InvalidRequest("the request body is not valid JSON") from None


def validate_key_request(document: dict[str, Any]) -> tuple[str, list[str]]:
    """The name (the principal name grammar) and scopes (non-empty, known, no repeats) of a new key."""
    name, scopes = document["name"], document["scopes"]
    if not isinstance(name, str) or not auth.PRINCIPAL_NAME_PATTERN.match(name):
        raise InvalidRequest("'name' must be 1-64 characters of [A-Za-z0-9_.-] starting with a letter or digit")
    if auth.looks_like_a_key(name):
        raise InvalidRequest(f"'name': {auth.KEY_AS_NAME}")
    if not isinstance(scopes, list) or not scopes:
        raise InvalidRequest("'scopes' must be a non-empty array of scope names")
    if len(scopes) > len(auth.ALL_SCOPES):
        raise InvalidRequest(f"'scopes' has more than the {len(auth.ALL_SCOPES)} known scopes")
    for position, scope in enumerate(scopes):
        if not isinstance(scope, str) or scope not in auth.ALL_SCOPES:
            raise InvalidRequest(f"scopes[{position}] is not one of {sorted(auth.ALL_SCOPES)}")
    if len(set(scopes)) != len(scopes):
        raise InvalidRequest("'scopes' lists a scope twice")
    return name, scopes


def audit_query(request: Request) -> tuple[int, int]:
    """``after`` (default 0) and ``limit`` (1..MAX_AUDIT_PAGE, default DEFAULT_AUDIT_PAGE) of an audit page."""
    query = request.query
    unknown = len(set(query) - {"after", "limit"})
    if unknown:
        raise InvalidRequest(f"the query has {unknown} unknown parameter(s); allowed: after, limit")
    values = {}
    for name, default, minimum, maximum in (("after", 0, 0, MAX_AUDIT_SEQ),
                                            ("limit", DEFAULT_AUDIT_PAGE, 1, MAX_AUDIT_PAGE)):
        given = query.getall(name, [])
        if len(given) > 1:
            raise InvalidRequest(f"'{name}' is given more than once")
        if not given:
            values[name] = default
            continue
        if not _DECIMAL.match(given[0]) or not minimum <= int(given[0]) <= maximum:
            raise InvalidRequest(f"'{name}' must be a decimal integer in [{minimum}, {maximum}]")
        values[name] = int(given[0])
    return values["after"], values["limit"]


def new_request_id() -> str:
    """A random id naming one request in the audit trail."""
    return os.urandom(8).hex()


# ---------------------------------------------------------------- the application


class _Api:
    """The route handlers, holding the service, key table, limits and metrics."""

    def __init__(self, service: VaultService, api_keys: auth.ApiKeyTable, limits: HttpLimits, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic,
                 node_metrics: Callable[[], Awaitable[str]] | None = None) -> None:
        self.service = service
        self._node_metrics = node_metrics
        # A worker relays the core's page, which the core keeps too: each keeps it for half the age.
        self._exposition = RecentRender(self._render_exposition, METRICS_MAX_AGE_SECONDS if node_metrics is None
                                        else METRICS_MAX_AGE_SECONDS / 2)
        self.api_keys = api_keys
        self.limits = limits
        self.metrics = metrics
        self.rate_limiter = ratelimit.RateLimiter(limits.rate_limits, key_limits=limits.key_rate_limits, clock=clock)
        self.inflight_requests = 0
        self.backup_streams = 0
        self.body_reads = 0
        # Bodies being received per key (its identity); a key leaves the map at
        # zero, so its size is bounded by the key table.
        self.body_reads_by_key: dict[str, int] = {}

    def admit(self, request: Request, scope: str, alternative: str | None = None) -> auth.Principal:
        """Authentication (401), scope (403), then the key's rate limit for the scope's kind (429)."""
        principal = authorize(request, self.api_keys, scope, alternative)
        kind = RATE_LIMIT_KIND_OF_SCOPE.get(scope, ratelimit.ADMIN)
        # One bucket per key (runtime keys may share a name); configured per-key limits apply by
        # name to bootstrap keys only, so naming a runtime key after one does not inherit its limits.
        configured_name = principal.name if principal.key_id is None else None
        wait_seconds = self.rate_limiter.check(principal.identity, kind, limits_of=configured_name)
        if wait_seconds > 0:
            self.metrics.record_rate_limited(_metric_key_label(principal), kind, "rate")
            raise RateLimited(f"this API key is past its {kind} rate limit on this node",
                              retry_after_seconds=ratelimit.retry_after_seconds(wait_seconds))
        request[_PRINCIPAL] = principal
        request[_KIND] = kind
        return principal

    async def receive_body(self, request: Request, *, idempotent: bool = False) -> bytes:
        """The request body, received once under the body bounds (order steps 4 and 5); b"" when there is
        none. ``idempotent``: the endpoint takes an Idempotency-Key, checked first."""
        received = request.get(_BODY)
        if isinstance(received, bytes):
            return received
        if idempotent:
            idempotency_key(request)
        body = b""
        if request.body_exists:
            require_json_content_type(request)
            declared_bytes = request.content_length
            if declared_bytes is not None and declared_bytes > self.limits.max_body_bytes:
                raise PayloadTooLarge(f"the request body is larger than {self.limits.max_body_bytes} bytes")
            principal = request.get(_PRINCIPAL)
            with self.body_slot(principal, request.get(_KIND, "")):
                _expect(request)  # only now, when the body will be read: 417, or 100 Continue
                body = await self.read_body(request)
        request[_BODY] = body
        return body

    async def read_json(self, request: Request, *, body_required: bool) -> Any:
        """Content type, size and JSON checks; ``EMPTY_BODY`` when the body is empty and allowed."""
        if not body_required and not request.body_exists:
            return EMPTY_BODY
        require_json_content_type(request)
        body = await self.receive_body(request)
        if not body:
            if not body_required:
                return EMPTY_BODY
            raise InvalidRequest("the request body is empty; send a JSON object")
        check_json_structure(body, max_json_values(self.limits))
        return parse_json(body)

    async def read_body(self, request: Request) -> bytes:
        """The whole body, each piece within body_timeout_seconds of the last (of a compressed body, each
        piece that decodes to something) and at most max_body_bytes in all, as sent and decoded; a broken
        transfer or content encoding is the client's error (400)."""
        chunks: list[bytes] = []
        received_bytes = 0
        try:
            while True:
                # What has arrived already is taken without a timer: most bodies are in the first
                # packet, and arming and cancelling a timeout cost a tenth of a worker's request.
                chunk = request.read_nowait()
                if not chunk:
                    if request.at_eof():
                        return b"".join(chunks)
                    async with asyncio.timeout(self.limits.body_timeout_seconds):
                        chunk = await request.readany()
                    if not chunk:
                        return b"".join(chunks)
                received_bytes += len(chunk)
                if received_bytes > self.limits.max_body_bytes:
                    raise PayloadTooLarge(f"the request body is larger than {self.limits.max_body_bytes} bytes")
                chunks.append(chunk)
        except TimeoutError:
            self.metrics.record_body_timeout()
            raise RequestTimeout(
                f"no part of the request body arrived for {self.limits.body_timeout_seconds:g} s; "
                "the connection is closed") from None
        except BodyTooLarge:
            raise PayloadTooLarge(f"the request body is larger than {self.limits.max_body_bytes} bytes, "
                                  "as sent or once decoded") from None
        except BodyError:
            raise InvalidRequest("the request body could not be read (bad transfer or content encoding)") from None

    @contextlib.contextmanager
    def body_slot(self, principal: auth.Principal | None, kind: str) -> Iterator[None]:
        """Hold one of the key's max_body_reads_per_key (else 429) and the node's max_body_reads (else 503)."""
        key_name = principal.identity if principal is not None else ""
        held_by_key = self.body_reads_by_key.get(key_name, 0)
        if held_by_key >= self.limits.max_body_reads_per_key:
            self.metrics.record_rate_limited(_metric_key_label(principal), kind, "bodies")
            raise RateLimited(f"this API key already has {held_by_key} request bodies being received on this "
                              "node; send fewer at once")
        if self.body_reads >= self.limits.max_body_reads:
            raise Overloaded("too many request bodies are being received on this node; retry later")
        self.body_reads += 1
        self.body_reads_by_key[key_name] = held_by_key + 1
        try:
            yield
        finally:
            self.body_reads -= 1
            remaining = self.body_reads_by_key[key_name] - 1
            if remaining:
                self.body_reads_by_key[key_name] = remaining
            else:
                del self.body_reads_by_key[key_name]

    @contextlib.contextmanager
    def inflight_slot(self) -> Iterator[None]:
        """Hold one of max_inflight_requests slots, or refuse with 503 when none is free."""
        if self.inflight_requests >= self.limits.max_inflight_requests:
            raise Overloaded()
        self.inflight_requests += 1
        try:
            yield
        finally:
            self.inflight_requests -= 1

    @contextlib.contextmanager
    def backup_slot(self) -> Iterator[None]:
        """Hold one of max_backup_streams slots, or refuse with 503 when none is free."""
        if self.backup_streams >= self.limits.max_backup_streams:
            raise backup.BackupBusy(self.limits.max_backup_streams)
        self.backup_streams += 1
        try:
            yield
        finally:
            self.backup_streams -= 1

    async def health(self, request: Request) -> Response:
        return json_response(await self.service.read_health(), headers=NO_STORE_HEADERS)

    async def render_metrics(self) -> tuple[bytes, str]:
        """This process's registry, or (in a worker) the whole node's exposition from the core, at most
        METRICS_MAX_AGE_SECONDS old: the page needs no key, so a flood of scrapes must not cost a
        rendering each."""
        return await self._exposition.get(), METRICS_CONTENT_TYPE

    async def _render_exposition(self) -> bytes:
        if self._node_metrics is None:
            return self.metrics.render()[0]
        return (await self._node_metrics()).encode("utf-8")

    async def metrics_endpoint(self, request: Request) -> Response:
        body, content_type = await self.render_metrics()
        return Response(body=body, content_type=content_type)

    async def tokenize(self, request: Request) -> AnyResponse:
        principal = self.admit(request, auth.TOKENIZE)
        await self.receive_body(request, idempotent=True)
        with self.inflight_slot():
            return await self._tokenize(request, principal)

    async def _tokenize(self, request: Request, principal: auth.Principal) -> Response:
        key = idempotency_key(request)
        document = require_members(await self.read_json(request, body_required=True), ("values",),
                                   TOKENIZE_OPTIONS)
        values = validate_values(require_item_list(document, "values", self.limits), self.limits)
        if len(document) > 1:
            # Version 2 options: checked here (400 / 422) and again by the service (forwarded requests).
            options = validate_options(
                document.get("format", formats.OPAQUE),
                canonical_metadata(document["metadata"]) if "metadata" in document else None,
                validate_ttl(document["ttl_seconds"]) if "ttl_seconds" in document else None)
            normalize_values(values, options.token_format)
            outcome = await self.service.tokenize(principal.identity, values, key, options.token_format,
                                                  options.metadata_json, options.ttl_seconds)
        else:
            outcome = await self.service.tokenize(principal.identity, values, key)
        # Issued tokens are counted by the node when it applies them, once per
        # token across forwards; this layer counts only replays.
        if outcome.replayed:
            self.metrics.record_replay(ROUTE_TOKENIZE)
        return outcome_response(outcome)

    async def detokenize(self, request: Request) -> AnyResponse:
        principal = self.admit(request, auth.DETOKENIZE, auth.DETOKENIZE_MASKED)
        await self.receive_body(request)
        with self.inflight_slot():
            return await self._detokenize(request, principal)

    def actor(self, principal: auth.Principal) -> commands.Actor:
        """Who the audit trail names for this request."""
        return commands.Actor(name=principal.name, key_id=principal.key_id, node=self.service.node_id,
                              request_id=new_request_id())

    async def _detokenize(self, request: Request, principal: auth.Principal) -> Response:
        document = require_members(await self.read_json(request, body_required=True), ("tokens",),
                                   ("epoch", "include_metadata"))
        tokens, epoch = lookup_tokens_and_epoch(document, self.limits)
        include_metadata = document.get("include_metadata", False)
        if not isinstance(include_metadata, bool):
            raise InvalidRequest("'include_metadata' must be true or false")
        # A key with the detokenize scope sees values; one with only detokenize_masked, masked values.
        masked = not principal.has_scope(auth.DETOKENIZE)
        if masked and include_metadata:
            raise Forbidden("the 'detokenize_masked' scope does not reveal metadata; it needs 'detokenize'")
        actor = self.actor(principal)
        plain = not masked and len(document) == 1 and all(map(is_token, tokens))
        if plain:
            answer = {"values": await self.service.detokenize(tokens, actor)}
        else:
            answer = await self.service.reveal(tokens, actor, epoch, include_metadata, masked)
            if include_metadata:
                answer = {"values": answer["values"], "metadata": [
                    None if text is None else json.loads(text) for text in answer["metadata_json"]]}
        if len(answer["values"]) != len(tokens):
            raise AssertionError("the service answered a different number of values than tokens asked")
        # The id the audit record of this request carries, so a caller can find it there.
        return json_response(answer, headers={**NO_STORE_HEADERS, REQUEST_ID_HEADER: actor.request_id or ""})

    async def rotate_epoch(self, request: Request) -> AnyResponse:
        principal = self.admit(request, auth.ADMIN)
        await self.receive_body(request, idempotent=True)
        with self.inflight_slot():
            return await self._rotate_epoch(request, principal)

    async def _rotate_epoch(self, request: Request, principal: auth.Principal) -> Response:
        key = idempotency_key(request)
        # The body is `{}`; an empty body is accepted as the same request.
        document = await self.read_json(request, body_required=False)
        if document is not EMPTY_BODY:
            require_members(document, ())
        outcome = await self.service.rotate_epoch(principal.identity, key, actor=self.actor(principal))
        if outcome.replayed:
            self.metrics.record_replay(ROUTE_EPOCHS)
        return outcome_response(outcome)

    async def list_epochs(self, request: Request) -> Response:
        principal = self.admit(request, auth.ADMIN)
        return json_response(await self.service.list_epochs(principal.key_id), headers=NO_STORE_HEADERS)

    async def create_key(self, request: Request) -> AnyResponse:
        principal = self.admit(request, auth.ADMIN)
        await self.receive_body(request)
        with self.inflight_slot():
            document = require_members(await self.read_json(request, body_required=True), ("name", "scopes"))
            name, scopes = validate_key_request(document)
            outcome = await self.service.create_key(name, scopes, self.actor(principal))
            return outcome_response(outcome)

    async def list_keys(self, request: Request) -> Response:
        principal = self.admit(request, auth.ADMIN)
        return json_response(await self.service.list_keys(principal.key_id), headers=NO_STORE_HEADERS)

    async def revoke_key(self, request: Request) -> AnyResponse:
        principal = self.admit(request, auth.ADMIN)
        await self.receive_body(request)
        with self.inflight_slot():
            document = await self.read_json(request, body_required=False)
            if document is not EMPTY_BODY:
                require_members(document, ())
            key_id = path_parameter(request, "key_id")
            if not auth.RUNTIME_KEY_ID_PATTERN.match(key_id):
                raise NotFound("no runtime API key has this id (ids are 16 lowercase hex characters)")
            return outcome_response(await self.service.revoke_key(key_id, self.actor(principal)))

    async def audit(self, request: Request) -> Response:
        self.admit(request, auth.ADMIN)
        after, limit = audit_query(request)
        return json_response(await self.service.audit_page(after, limit), headers=NO_STORE_HEADERS)

    async def list_members(self, request: Request) -> Response:
        principal = self.admit(request, auth.ADMIN)
        return json_response(await self.service.list_members(principal.key_id), headers=NO_STORE_HEADERS)

    async def add_member(self, request: Request) -> AnyResponse:
        """Add a node as a learner; it counts in no majority until promoted (docs/api.md, "Membership")."""
        principal = self.admit(request, auth.ADMIN)
        await self.receive_body(request)
        with self.inflight_slot():
            document = require_members(await self.read_json(request, body_required=True), ("node_id", "peer_addr"))
            # Checked here too, not only by the service: a node of HTTP workers carries the fields to its core.
            _, node_id, peer_addr = validate_member_change("add", document["node_id"], document["peer_addr"])
            return outcome_response(await self.service.change_member("add", node_id, peer_addr, principal.key_id))

    async def change_member(self, request: Request) -> AnyResponse:
        """Promote a caught-up learner to voter, or remove a member (live or dead, the primary included)."""
        principal = self.admit(request, auth.ADMIN)
        await self.receive_body(request)
        with self.inflight_slot():
            document = await self.read_json(request, body_required=False)
            if document is not EMPTY_BODY:
                require_members(document, ())
            return outcome_response(await self.service.change_member(
                path_parameter(request, "action"), path_parameter(request, "node_id"), None, principal.key_id))

    async def cluster(self, request: Request) -> Response:
        self.admit(request, auth.ADMIN)
        return json_response(await self.service.cluster_view(), headers=NO_STORE_HEADERS)

    async def backup(self, request: Request) -> AnyResponse:
        """Stream a checkpoint of this node's store; the checkpoint is deleted however the stream ends."""
        self.admit(request, auth.ADMIN)
        with self.backup_slot():
            stream = await self.service.open_backup()
            try:
                response = await self._send_backup(request, stream)
            except BaseException:
                await stream.close()
                raise
        # The slot is free as soon as the last byte is out (no await in between), so a client that
        # asks again at once is served; the checkpoint is deleted right after, in a worker thread.
        await stream.close()
        return response

    async def _send_backup(self, request: Request, stream: Any) -> AnyResponse:
        """Once the headers are sent the status cannot change: a failure midway (or a client that
        goes away) closes the connection without the final chunk, so the client sees a broken
        transfer, and the stream's trailing SHA-256 makes any cut-off copy detectable anyway.
        """
        started = time.perf_counter()
        health = await self.service.read_health()
        response = StreamResponse(status=200, content_type=backup.BACKUP_CONTENT_TYPE, headers={
            **NO_STORE_HEADERS,
            backup.HEADER_INDEX: str(stream.index), backup.HEADER_VIEW: str(stream.view),
            backup.HEADER_BYTES: str(stream.total_bytes), backup.HEADER_NODE: str(health.get("node_id")),
            backup.HEADER_ROLE: str(health.get("role")),
            "Content-Disposition": f'attachment; filename="tokenvault-{health.get("node_id")}-'
                                   f'{stream.index}.backup"'})
        _log.info("backup.started", index=stream.index, view=stream.view, bytes=stream.total_bytes)
        await response.prepare(request)
        try:
            async for chunk in stream.chunks(self.limits.backup_chunk_bytes):
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            _log.warning("backup.aborted", reason="client gone", sent_bytes=stream.sent_bytes,
                         bytes=stream.total_bytes)
            return response
        except Exception as error:
            _log.error("backup.failed", error_type=type(error).__name__, sent_bytes=stream.sent_bytes)
            response.force_close()
            if request.transport is not None:
                request.transport.abort()
            return response
        _log.info("backup.finished", index=stream.index, bytes=stream.total_bytes,
                  seconds=round(time.perf_counter() - started, 3))
        return response


class HttpApp:
    """The node's HTTP API: its routes and the one dispatch every request goes through.

    The server (tokenvault/api/httpserver.py, built by ``http_server``) calls the app
    with each parsed request. The dispatch resolves the route (404, 405 with ``Allow``),
    runs the handler (which answers ``Expect: 100-continue`` once it reads the body), turns every error into
    problem+json (an unexpected exception is logged without its message), and
    records the request's route, method, status and duration in the metrics
    (a request cancelled because its client went away has no status and is not
    counted). The server reads its connection bounds from the app, and asks it
    for the answers to requests it cannot parse (``malformed``) and to
    connections over the cap (``refused``).
    """

    def __init__(self, api: _Api) -> None:
        self.api = api
        self.metrics = api.metrics
        self.router = Router()

    # The bounds the server reads (tokenvault/api/httpserver.py, ``App``), from the API's limits.
    @property
    def max_connections(self) -> int:
        return self.api.limits.max_connections

    @property
    def header_timeout_seconds(self) -> float:
        return self.api.limits.header_timeout_seconds

    @property
    def max_body_bytes(self) -> int:
        return self.api.limits.max_body_bytes

    def malformed(self, status: int, error_type: str) -> Response:
        """Requests the server cannot parse get fixed text (never the offending bytes, which may be an
        Authorization header); ``error_type`` is only logged."""
        if status >= 500:
            response = problem_response(status, "internal", "Internal error", "the request could not be handled")
        else:
            response = problem_response(status, "invalid-request", default_title(status),
                                        _MALFORMED_DETAILS.get(status, UNPARSABLE_REQUEST_DETAIL))
        response.force_close()
        return response

    def refused(self) -> bytes:
        return TOO_MANY_CONNECTIONS_RESPONSE

    async def __call__(self, request: Request) -> AnyResponse:
        started = time.perf_counter()
        route = UNMATCHED_ROUTE
        try:
            match = self._resolve(request)
            route = match.pattern
            request[PATH_PARAMETERS] = match.parameters
            response = await match.handler(request)
        except ServiceError as error:
            response = error_response(error)
            if getattr(error, "close_connection", False) or _body_left_unread(request):
                request.connection.send_now(request, response)
        except StoreDamaged:
            # A damaged store file: the node stops (docs/failure-modes.md), the other nodes serve. As the
            # workers answer it: 503.
            response = error_response(Unavailable("this node is stopping: its store is damaged; retry on another node"))
        except Exception:
            _log.exception("http.unexpected_error", route=route, method=request.method)
            response = problem_response(500, "internal", "Internal error",
                                        "an unexpected error occurred; it has been logged")
        # A request cancelled because its client went away (CancelledError) has no status: not counted.
        method = request.method if request.method in KNOWN_METHODS else "OTHER"
        self.metrics.observe_request(route, method, response.status, time.perf_counter() - started)
        return response

    def _resolve(self, request: Request) -> Match:
        try:
            return self.router.resolve(request.method, request.path_safe)
        except RouteNotFound:
            raise NotFound("no such endpoint") from None
        except MethodNotAllowed as refused:
            raise MethodNotAllowedError(refused.allowed) from None


def _expect(request: Request) -> None:
    """Right before the body is read (every check that needs no body has passed: the route, the key,
    its scope and rate, the Idempotency-Key, the content type, the declared size, a body slot):
    ``Expect: 100-continue`` on HTTP/1.1 is answered ``100 Continue`` (the client then sends its body);
    any other expectation is 417. An empty ``Expect`` names no expectation and is ignored, as is the
    header on a request whose body is never read."""
    if request.version != HTTP_11:
        return
    expectation = request.headers.get("Expect", "").strip()
    if not expectation:
        return
    if expectation.lower() != "100-continue":
        raise ExpectationFailed()
    request.send_continue()


def _body_left_unread(request: Request) -> bool:
    """Whether the request was refused before its body was read (401, 403, 429, 413, 415 ...).

    Such a connection is mid-request: it cannot carry another request, and
    reading and dropping the rest of the body would let one client without a
    valid key hold a connection slot as long as it keeps sending; it is closed.
    """
    return request.body_exists and _BODY not in request


def build_app(
    service: VaultService, api_keys: auth.ApiKeyTable, limits: HttpLimits, metrics: Metrics,
    node_metrics: Callable[[], Awaitable[str]] | None = None,
) -> HttpApp:
    """The application from its parts (create_app reads them from a NodeConfig)."""
    api = _Api(service, api_keys, limits, metrics, node_metrics=node_metrics)
    app = HttpApp(api)
    router = app.router
    router.add_get(ROUTE_HEALTH, api.health)
    router.add_get(ROUTE_METRICS, api.metrics_endpoint)
    router.add_post(ROUTE_TOKENIZE, api.tokenize)
    router.add_post(ROUTE_DETOKENIZE, api.detokenize)
    router.add_post(ROUTE_EPOCHS, api.rotate_epoch)
    router.add_get(ROUTE_EPOCHS, api.list_epochs)
    router.add_get(ROUTE_CLUSTER, api.cluster)
    router.add_post(ROUTE_KEYS, api.create_key)
    router.add_get(ROUTE_KEYS, api.list_keys)
    router.add_post(ROUTE_KEY_REVOKE, api.revoke_key)
    router.add_get(ROUTE_AUDIT, api.audit)
    router.add_get(ROUTE_MEMBERS, api.list_members)
    router.add_post(ROUTE_MEMBERS, api.add_member)
    router.add_post(ROUTE_MEMBER_ACTION, api.change_member)
    # No HEAD: it would take a checkpoint only to throw it away.
    router.add_get(ROUTE_BACKUP, api.backup, allow_head=False)
    add_lifecycle_routes(router, api)
    return app


def create_app(
    service: VaultService,
    config: NodeConfig,
    metrics: Metrics,
    *,
    share: int = 1,
    node_metrics: Callable[[], Awaitable[str]] | None = None,
) -> HttpApp:
    """The node's HTTP application: API key table and limits from ``config``.

    ``share``: how many processes serve the node's port (its limits are split evenly between them);
    ``node_metrics``: where a worker gets the node's whole exposition for ``GET /metrics``."""
    # Bootstrap keys from the config, plus the replicated runtime keys the node has applied.
    api_keys = auth.ApiKeyTable(config.api_keys, getattr(service, "api_key", None))
    limits = HttpLimits.from_config(config, share=share)
    return build_app(service, api_keys, limits, metrics, node_metrics)


# ---------------------------------------------------------------- errors before the application


_TOO_MANY_CONNECTIONS_BODY = problem_body_of(Overloaded("too many connections are open to this node; retry later"))
# Written straight to a connection refused at accept time, before any request of it is read.
TOO_MANY_CONNECTIONS_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: " + PROBLEM_CONTENT_TYPE.encode("ascii") + b"\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_TOO_MANY_CONNECTIONS_BODY)).encode("ascii") + b"\r\n\r\n"
    + _TOO_MANY_CONNECTIONS_BODY
)


# The details of the server's own refusals (tokenvault/api/httpserver.py); fixed texts, never the input.
UNPARSABLE_REQUEST_DETAIL = "the request is not valid HTTP/1.1"
_MALFORMED_DETAILS = {
    414: "the request line is too long",
    429: "too many requests were sent ahead on one connection",
    431: "the request's headers are too large or too many",
}

# A flood of refused connections or malformed requests must not become a flood of log lines.
# Each at most one line a second for each value of its fields, with the count (tokenvault.logs.SummedEvent).
FLOOD_LOG_INTERVAL_SECONDS = 1.0
_MALFORMED_REQUESTS = SummedEvent(_log, "http.malformed_request", ("status", "error_type"),
                                  FLOOD_LOG_INTERVAL_SECONDS, level="warning")
_REFUSED_CONNECTIONS = SummedEvent(_log, "http.connection_refused", ("reason", "max_connections"),
                                   FLOOD_LOG_INTERVAL_SECONDS, level="warning")


class MethodNotAllowedError(ServiceError):
    """The path exists, not with this method; ``Allow`` names the methods it has."""

    status = 405
    title = "Method not allowed"
    problem = "method-not-allowed"

    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__("this endpoint does not support the request's method", headers={"Allow": ",".join(allowed)})


class ExpectationFailed(ServiceError):
    """An ``Expect`` header other than ``100-continue``."""

    status = 417
    title = "Expectation failed"
    problem = "expectation-failed"

    def __init__(self) -> None:
        super().__init__("the only expectation this server meets is 'Expect: 100-continue'")


def http_server(app: HttpApp) -> HttpServer:
    """The server for ``app``: its refused connections and malformed requests counted in the metrics
    and in the (summed) log."""
    def refused() -> None:
        app.metrics.record_connection_refused()
        _REFUSED_CONNECTIONS.add(1, "max_connections", app.max_connections)

    def malformed(status: int, error_type: str) -> None:
        _MALFORMED_REQUESTS.add(1, status, error_type)

    return HttpServer(app, on_refused=refused, on_malformed=malformed)
