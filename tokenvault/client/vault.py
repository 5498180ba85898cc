"""Client library for the TokenVault HTTP API.

`AsyncClient` (aiohttp) talks to one or more nodes; give it the cluster CA
(`ca_file`, the `ca_file` of cluster.json) to verify `https://` nodes. Any node serves the whole
API, so the client keeps the node that answered last and moves on to the next
URL when a node cannot be reached or answers 503; after a full round of
failures it waits (honouring Retry-After, capped) and tries again until its
deadline. No try starts past the deadline but the first, so a call ends within
the deadline and one try's timeout. A request that is not safe to repeat (a key create) is never sent
again once its outcome is unknown (the connection dropped after it was sent, it
timed out, or a 503 did not say it had no effect): that is `OutcomeUnknown`.
`Client` is a small synchronous wrapper for scripts and the CLI.

Errors are typed: a problem+json answer becomes a `ProblemError` subclass that
carries the server's fields; no node reachable is `NoNodeAvailable`. No error
message ever contains the API key or a submitted value.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from multidict import CIMultiDict

from tokenvault.crypto.tls import TlsError, http_client_context
from tokenvault.errors import EFFECT_NONE, EFFECT_UNKNOWN

DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_DEADLINE_SECONDS = 15.0
DEFAULT_RETRY_AFTER_CAP_SECONDS = 2.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_REMEMBERED_FAILURES = 12
INITIAL_BACKOFF_SECONDS = 0.1
# How often the member list is read again while it shows a change that is not committed yet.
MEMBER_POLL_SECONDS = 0.5


class VaultError(Exception):
    """Base class of every error raised by this module."""


class ConfigurationError(VaultError, ValueError):
    """The client was given an unusable URL or API key."""


class ResponseError(VaultError):
    """A node answered with something that is not what the contract promises."""


class NoNodeAvailable(VaultError):
    """No node could be reached (or all answered 503) before the deadline."""

    def __init__(self, failures: Sequence[str]) -> None:
        self.failures = tuple(failures)
        super().__init__(f"no node available: {_summarize_failures(self.failures)}")


def _summarize_failures(failures: Sequence[str]) -> str:
    """Each distinct failure once, in the order first seen, with how often it came among those remembered
    when more than once: a client retrying one unreachable URL until its deadline meets the same failure
    on every round, and the message named it once per round (ten times over for the CLI's 10 s)."""
    if not failures:
        return "no attempt made"
    counts = Counter(failures)  # in the order first seen
    return "; ".join(failure if count == 1 else f"{failure} ({count} times)" for failure, count in counts.items())


class OutcomeUnknown(VaultError):
    """A request that is not safe to repeat was sent, and whether it took effect is unknown: the connection
    dropped after it was sent, it timed out, or a node answered 503 without saying it had no effect. It was
    not sent again (a repeat could take effect twice); ``check`` says how to find out what happened."""

    def __init__(self, action: str, url: str, reason: str, check: str) -> None:
        self.action = action
        self.url = url
        self.reason = reason
        self.check = check
        super().__init__(f"the outcome of the {action} sent to {url} is unknown ({reason}); it was not sent "
                         f"again, since a repeat could take effect twice. {check}")


class MembershipChangeFailed(VaultError):
    """A membership change that cannot be reported made: the member list shows it but not committed when
    the wait ended, or an id asked to be added is a member already at another peer address."""


class ProblemError(VaultError):
    """A node answered with an HTTP error (application/problem+json)."""

    def __init__(self, status: int, title: str, detail: str, problem_type: str, url: str,
                 retry_after_seconds: float | None = None, effect: str | None = None) -> None:
        # Set by the client when an earlier try of this same request had an unknown outcome (it may have
        # taken effect), so that this answer may describe the state that try left.
        self.after_unknown_outcome = False
        # A 503's ``effect`` member: "none" (the request certainly had no effect) or "unknown" (it may
        # still take effect, once); None when the answer had none.
        self.effect = effect
        self.status = status
        self.title = title
        self.detail = detail
        self.problem_type = problem_type
        self.url = url
        self.retry_after_seconds = retry_after_seconds
        text = f"{status} {title}"
        if detail:
            text += f": {detail}"
        super().__init__(f"{text} (from {url})")


class BadRequest(ProblemError):
    """400: the request was malformed."""


class Unauthorized(ProblemError):
    """401: missing or unknown API key."""


class Forbidden(ProblemError):
    """403: the API key lacks the endpoint's scope."""


class NotFound(ProblemError):
    """404 or 405: unknown path or method."""


class Conflict(ProblemError):
    """409: a request with the same idempotency key is still in flight."""


class PayloadTooLarge(ProblemError):
    """413: too many items or a body that is too large."""


class UnsupportedMediaType(ProblemError):
    """415: the request was not JSON."""


class Unprocessable(ProblemError):
    """422: the idempotency key was reused with a different body."""


class RequestTimeout(ProblemError):
    """408: the request's body stopped arriving for longer than the node waits for it."""


class RateLimited(ProblemError):
    """429: the API key is past its rate limit on that node (``retry_after_seconds`` says when to try again),
    or too many requests were pipelined on one connection."""


class ServiceUnavailable(ProblemError):
    """503: no primary or no quorum right now."""


class ServerError(ProblemError):
    """Any other status, which the contract never promises."""


_ERROR_CLASSES: dict[int, type[ProblemError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: NotFound,
    408: RequestTimeout, 409: Conflict, 413: PayloadTooLarge, 415: UnsupportedMediaType, 422: Unprocessable,
    429: RateLimited, 503: ServiceUnavailable,
}


def _tokens_document(tokens: Sequence[str], epoch: int | None) -> dict[str, Any]:
    """The body of a request about tokens: ``epoch`` (where card and digits tokens are) only when given."""
    document: dict[str, Any] = {"tokens": list(tokens)}
    if epoch is not None:
        document["epoch"] = epoch
    return document


@dataclass(frozen=True, slots=True)
class TokenizeResult:
    epoch: int
    tokens: tuple[str, ...]
    replayed: bool


@dataclass(frozen=True, slots=True)
class DetokenizeResult:
    """Each token's value and metadata: None where the token is unknown or expired (and, for metadata, where
    it has none)."""

    values: tuple[str | None, ...]
    metadata: tuple[dict[str, Any] | None, ...]


@dataclass(frozen=True, slots=True)
class RotateResult:
    epoch: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class EpochInfo:
    epoch: int
    created_at: str
    state: str


@dataclass(frozen=True, slots=True)
class EpochList:
    active_epoch: int
    epochs: tuple[EpochInfo, ...]


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """A runtime API key as listed; ``key`` is set only in the answer to its creation."""

    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: str
    key: str | None = None

    def __repr__(self) -> str:
        # The key is a secret: a repr (logs, tracebacks) never shows it.
        return f"ApiKeyInfo(id={self.id!r}, name={self.name!r}, scopes={self.scopes!r})"


@dataclass(frozen=True, slots=True)
class RevokeResult:
    """A revoke that is done: ``already_gone`` when a retry, after a try whose outcome was unknown, found no
    key with this id (that try, or someone else, had revoked it already)."""

    id: str
    already_gone: bool = False


@dataclass(frozen=True, slots=True)
class AuditPage:
    records: tuple[dict[str, Any], ...]
    last_seq: int
    next_after: int | None
    # (seq, hash hex) of the last record an audit trim dropped: the first record links to it. None if
    # the trail was never trimmed.
    anchor: tuple[int, str] | None = None


@dataclass(frozen=True, slots=True)
class AuditTrimResult:
    """What a trim dropped: the records up to ``trimmed_through`` (``removed`` of them this time)."""

    trimmed_through: int
    removed: int
    anchor_hash: str


@dataclass(frozen=True, slots=True)
class RetokenizeResult:
    """The active epoch and one new token per token asked (None: unknown or deleted)."""

    epoch: int
    tokens: tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class TokenPage:
    """One page of an epoch's tokens; ``next_after`` is the cursor of the next page (None: last page)."""

    epoch: int
    state: str
    tokens: tuple[str, ...]
    next_after: str | None


@dataclass(frozen=True, slots=True)
class _Answer:
    url: str
    status: int
    headers: Mapping[str, str]
    body: Any


def normalize_urls(urls: str | Iterable[str]) -> tuple[str, ...]:
    """Split comma-separated entries, validate each base URL, drop duplicates, keep order."""
    if isinstance(urls, str):
        urls = [urls]
    result: list[str] = []
    for entry in urls:
        for part in str(entry).split(","):
            candidate = part.strip().rstrip("/")
            if not candidate:
                continue
            parsed = urlsplit(candidate)
            if "@" in parsed.netloc:
                # Not shown: it may hold a password, which every later message naming the URL would repeat.
                raise ConfigurationError("a base URL takes no user name or password (the API key authenticates; "
                                         "the URL is not shown)")
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ConfigurationError(f"not an http(s) base URL: {candidate!r}")
            if parsed.query or parsed.fragment:
                raise ConfigurationError(f"a base URL takes no query or fragment: {candidate!r}")
            if candidate not in result:
                result.append(candidate)
    if not result:
        raise ConfigurationError("no node URL given")
    return tuple(result)


def _validate_api_key(api_key: str | None) -> str | None:
    if api_key is None or api_key == "":
        return None
    # Why: the key goes into a header; refuse anything that could split it. Never echo the key.
    if len(api_key) > 1024 or not all(33 <= ord(character) <= 126 for character in api_key):
        raise ConfigurationError("the API key contains characters that are not printable ASCII")
    return api_key


def parse_retry_after(value: str | None, cap_seconds: float) -> float | None:
    """Whole seconds from a Retry-After header, capped; None when it is absent or not a short ASCII number.

    Why ASCII: str.isdigit() also accepts digits such as '²', which float() refuses (a ValueError that
    would escape the failover loop)."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 6:
        return None
    return min(float(value), cap_seconds)


def printable_text(text: str, limit: int) -> str:
    """A node's text (a problem's title, detail or type) cut to ``limit`` characters, each one that is not
    printable a '?'. Why: it reaches a terminal and logs (the CLI prints the error), where a hostile node's
    escape sequences, line breaks or bidirectional overrides would drive the one and forge lines in the other."""
    return "".join(character if character.isprintable() else "?" for character in text[:limit])


def _problem_from(answer: _Answer, retry_after_cap_seconds: float) -> ProblemError:
    body = answer.body if isinstance(answer.body, dict) else {}

    def text(field: str, default: str) -> str:
        value = body.get(field)
        return printable_text(value, 1000) if isinstance(value, str) else default

    error_class = _ERROR_CLASSES.get(answer.status, ServerError)
    return error_class(
        status=answer.status,
        title=text("title", f"HTTP {answer.status}"),
        detail=text("detail", ""),
        problem_type=text("type", "about:blank"),
        url=answer.url,
        retry_after_seconds=parse_retry_after(answer.headers.get("Retry-After"), retry_after_cap_seconds),
        effect=body.get("effect") if body.get("effect") in (EFFECT_NONE, EFFECT_UNKNOWN) else None,
    )


def client_ssl_context(ca_file: str | Path | None) -> ssl.SSLContext | None:
    """The context that verifies nodes against the cluster CA in `ca_file`; None without one."""
    if ca_file is None or ca_file == "":
        return None
    try:
        return http_client_context(Path(ca_file))
    except TlsError as error:
        raise ConfigurationError(str(error)) from None


# Connection failures before anything was sent: the request cannot have taken effect, so the next URL may
# be tried even for a request that is not safe to repeat. ConnectionTimeoutError: aiohttp 3.10 and later.
_NOT_SENT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,) + tuple(
    error for error in (getattr(aiohttp, "ConnectionTimeoutError", None),) if isinstance(error, type))


def _had_no_effect(problem: ProblemError) -> bool:
    """Whether a 503 says the request took no effect (``"effect": "none"``, docs/api.md, Errors); any
    other 503 may be followed by its effect."""
    return problem.effect == EFFECT_NONE


# What the TLS library says when an https:// URL meets a node that answers in plain HTTP (its answer read as
# a TLS record); OpenSSL 3.2 and later may say RECORD_LAYER_FAILURE where earlier versions said the first.
_PLAIN_HTTP_SSL_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"})


def _scheme_hint(error: BaseException, url: str) -> str:
    """A hint, after the failure, that the URL's scheme may be the wrong one for the node; "" otherwise.
    Why: an http:// URL of a node serving TLS failed with only "Server disconnected" (the node closes the
    connection on the bytes that are not a TLS handshake, before any response), and an https:// URL of a
    plain HTTP node with only the TLS library's "wrong version number"."""
    if isinstance(error, aiohttp.ServerDisconnectedError) and url.startswith("http://"):
        return f" (is the node serving HTTPS? try https://{url.removeprefix('http://')})"
    if isinstance(error, aiohttp.ClientSSLError) and url.startswith("https://"):
        cause = getattr(error, "os_error", None)
        if isinstance(cause, ssl.SSLError) and cause.reason in _PLAIN_HTTP_SSL_REASONS:
            return f" (is the node serving plain HTTP? try http://{url.removeprefix('https://')})"
    return ""


def _describe_failure(error: BaseException, url: str) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    name = type(error).__name__
    # Why: aiohttp connection errors describe the address, never request content.
    message = str(error).splitlines()[0][:200] if str(error) else ""
    if (isinstance(error, aiohttp.ClientConnectorError)
            and not isinstance(error, aiohttp.ClientConnectorCertificateError)):
        # Why: aiohttp's own words name the TLS context each request carries as Python shows an object
        # ("ssl:<ssl.SSLContext object at 0x...>"); the address and the reason are what helps.
        message = f"Cannot connect to host {error.host}:{error.port} [{error.strerror}]"[:200]
    described = f"{name}: {message}" if message else name
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        described += ("; its certificate is not one this client trusts: give the cluster CA (ca_file; the CLI's "
                      "--ca-file, or --cluster-json, whose ca_file it is)")
    return described + _scheme_hint(error, url)


def _require_int(body: Any, field: str) -> int:
    value = body.get(field) if isinstance(body, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ResponseError(f"response field {field!r} is missing or not an integer")
    return value


class AsyncClient:
    """Async client for a TokenVault cluster; use as `async with AsyncClient(urls, key) as client`."""

    def __init__(self, urls: str | Iterable[str], api_key: str | None = None, *,
                 timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
                 deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
                 retry_after_cap_seconds: float = DEFAULT_RETRY_AFTER_CAP_SECONDS,
                 session: aiohttp.ClientSession | None = None,
                 ca_file: str | Path | None = None) -> None:
        self.urls = normalize_urls(urls)
        # The CA certificate to verify https nodes against; kept for the TLS transport to use.
        self.ca_file = ca_file
        self._api_key = _validate_api_key(api_key)
        # https:// nodes are verified against the cluster CA when one is given, on every request, through
        # a session the caller gave too (else as the session's connector does: the system's CAs by default).
        self._ssl_context = client_ssl_context(ca_file)
        self._timeout_seconds = timeout_seconds
        self._deadline_seconds = deadline_seconds
        self._retry_after_cap_seconds = retry_after_cap_seconds
        self._session = session
        self._owns_session = session is None
        self._preferred_index = 0

    def __repr__(self) -> str:
        return f"AsyncClient(urls={list(self.urls)!r})"

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exception_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    @property
    def current_url(self) -> str:
        """The URL the next request goes to first (the node that answered last)."""
        return self.urls[self._preferred_index]

    async def tokenize(self, values: Sequence[str], idempotency_key: str | None = None, *,
                       token_format: str | None = None, metadata: dict[str, Any] | None = None,
                       ttl_seconds: int | None = None) -> TokenizeResult:
        """Tokenize ``values``; the version 2 options (``format``, ``metadata``, ``ttl_seconds``) are sent
        only when given."""
        # An empty key is sent as given (the node answers 400), never taken for no key.
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
        document: dict[str, Any] = {"values": list(values)}
        for name, option in (("format", token_format), ("metadata", metadata), ("ttl_seconds", ttl_seconds)):
            if option is not None:
                document[name] = option
        answer = await self._request("POST", "/v1/tokenize", document, headers,
                                     idempotent=idempotency_key is not None)
        epoch = _require_int(answer.body, "epoch")
        tokens = answer.body.get("tokens")
        # Why printable and not empty: no token is otherwise, and the CLI prints one a line (a line break
        # would pair every later token with the wrong value; an escape sequence would drive the terminal).
        if not isinstance(tokens, list) or len(tokens) != len(values) or \
                not all(isinstance(token, str) and token and token.isprintable() for token in tokens):
            raise ResponseError("tokenize response does not hold one token per value")
        return TokenizeResult(epoch, tuple(tokens), _replayed(answer))

    async def detokenize(self, tokens: Sequence[str], *, epoch: int | None = None) -> tuple[str | None, ...]:
        """The values of ``tokens``; ``epoch`` resolves card and digits tokens (default: the active one)."""
        return (await self._detokenize(tokens, epoch, include_metadata=False)).values

    async def detokenize_with_metadata(self, tokens: Sequence[str], *, epoch: int | None = None) -> DetokenizeResult:
        """The values of ``tokens`` and the metadata each was tokenized with (``include_metadata``); a key with
        only the ``detokenize_masked`` scope is refused (Forbidden)."""
        return await self._detokenize(tokens, epoch, include_metadata=True)

    async def _detokenize(self, tokens: Sequence[str], epoch: int | None, *,
                          include_metadata: bool) -> DetokenizeResult:
        document = _tokens_document(tokens, epoch)
        if include_metadata:
            document["include_metadata"] = True
        answer = await self._request("POST", "/v1/detokenize", document, {})
        values = answer.body.get("values") if isinstance(answer.body, dict) else None
        if not isinstance(values, list) or len(values) != len(tokens) or \
                not all(value is None or isinstance(value, str) for value in values):
            raise ResponseError("detokenize response does not hold one value or null per token")
        if not include_metadata:
            return DetokenizeResult(tuple(values), (None,) * len(values))
        metadata = answer.body.get("metadata")
        if not isinstance(metadata, list) or len(metadata) != len(tokens) or \
                not all(entry is None or isinstance(entry, dict) for entry in metadata):
            raise ResponseError("detokenize response does not hold one metadata object or null per token")
        return DetokenizeResult(tuple(values), tuple(metadata))

    async def rotate_epoch(self, idempotency_key: str | None = None) -> RotateResult:
        """Rotate the epoch. Without a key, one is generated so that a retry never rotates twice."""
        key = idempotency_key if idempotency_key is not None else f"tvclient-rotate-{uuid.uuid4()}"
        answer = await self._request("POST", "/v1/admin/epochs", {}, {"Idempotency-Key": key},
                                     idempotent=True)
        return RotateResult(_require_int(answer.body, "epoch"), _replayed(answer))

    async def list_epochs(self) -> EpochList:
        answer = await self._request("GET", "/v1/admin/epochs", None, {})
        active = _require_int(answer.body, "active_epoch")
        entries = answer.body.get("epochs")
        if not isinstance(entries, list):
            raise ResponseError("epoch list response has no 'epochs' list")
        epochs = []
        for entry in entries:
            created_at = entry.get("created_at") if isinstance(entry, dict) else None
            state = entry.get("state") if isinstance(entry, dict) else None
            if not isinstance(created_at, str) or not isinstance(state, str):
                raise ResponseError("epoch list entry lacks created_at or state")
            epochs.append(EpochInfo(_require_int(entry, "epoch"), created_at, state))
        return EpochList(active, tuple(epochs))

    async def delete_tokens(self, tokens: Sequence[str], *, epoch: int | None = None) -> int:
        """Remove the mappings of ``tokens`` (scope delete); returns how many existed. Deleting again is harmless.
        ``epoch``: where card and digits tokens are (default: the active epoch)."""
        document = _tokens_document(tokens, epoch)
        answer = await self._request("POST", "/v1/tokens/delete", document, {})
        return _require_int(answer.body, "deleted")

    async def retokenize(self, tokens: Sequence[str], *, epoch: int | None = None) -> RetokenizeResult:
        """Each token's value tokenized in the active epoch, in its format, computed inside the vault (scope
        retokenize); ``epoch`` is where card and digits tokens are looked up (default: the active one)."""
        document = _tokens_document(tokens, epoch)
        answer = await self._request("POST", "/v1/retokenize", document, {})
        new = answer.body.get("tokens")
        if not isinstance(new, list) or len(new) != len(tokens) or \
                not all(token is None or isinstance(token, str) for token in new):
            raise ResponseError("retokenize response does not hold one token or null per token")
        return RetokenizeResult(_require_int(answer.body, "epoch"), tuple(new))

    async def destroy_epoch(self, epoch: int) -> str:
        """Crypto-shred ``epoch`` on every node (admin); returns its state, "destroyed". Repeating it is harmless."""
        if type(epoch) is not int or epoch < 1:
            raise ConfigurationError("an epoch is an integer from 1")
        answer = await self._request("POST", f"/v1/admin/epochs/{epoch}/destroy", {}, {})
        if answer.body.get("state") != "destroyed":
            raise ResponseError("destroy response does not say the epoch is destroyed")
        return "destroyed"

    async def epoch_tokens(self, epoch: int, after: str | None = None, limit: int = 100) -> TokenPage:
        """One page of the tokens issued in ``epoch`` after the token ``after`` (admin)."""
        if type(epoch) is not int or epoch < 1:
            raise ConfigurationError("an epoch is an integer from 1")
        query = f"limit={int(limit)}" + (f"&after={quote(after, safe='')}" if after is not None else "")
        answer = await self._request("GET", f"/v1/admin/epochs/{epoch}/tokens?{query}", None, {})
        tokens, next_after, state = (answer.body.get(name) for name in ("tokens", "next_after", "state"))
        if (not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens)
                or not (next_after is None or isinstance(next_after, str)) or not isinstance(state, str)):
            raise ResponseError("epoch token page is malformed")
        return TokenPage(_require_int(answer.body, "epoch"), state, tuple(tokens), next_after)

    async def create_key(self, name: str, scopes: Sequence[str]) -> ApiKeyInfo:
        """Create a runtime API key; the answer holds the key itself, which no node can show again.

        No Idempotency-Key protects it, so it is sent to another node only when the first could not be
        reached at all (or answered 503 saying it had no effect): once its outcome is unknown (dropped
        connection after sending, timeout, a 503 that may still take effect) it raises OutcomeUnknown
        rather than risk a second key."""
        check = (f"Run `tokenvault admin key list` (GET /v1/admin/keys): a key named {name!r} created at "
                 f"about this time is the one this request made, and nobody has its key: revoke it "
                 f"(`tokenvault admin key revoke ID`), then create the key again")
        answer = await self._request("POST", "/v1/admin/keys", {"name": name, "scopes": list(scopes)}, {},
                                     single_shot=("key create", check))
        info = _key_info(answer.body)
        key = answer.body.get("key")
        if not isinstance(key, str):
            raise ResponseError("key creation response has no 'key'")
        return ApiKeyInfo(info.id, info.name, info.scopes, info.created_at, key)

    async def list_keys(self) -> tuple[ApiKeyInfo, ...]:
        answer = await self._request("GET", "/v1/admin/keys", None, {})
        entries = answer.body.get("keys")
        if not isinstance(entries, list):
            raise ResponseError("key list response has no 'keys' list")
        return tuple(_key_info(entry) for entry in entries)

    async def revoke_key(self, key_id: str) -> RevokeResult:
        """Revoke the key ``key_id``. A revoke is idempotent in effect: a retry after a try whose outcome was
        unknown (it may have revoked the key) that finds no such key (404) is done, ``already_gone``."""
        if not isinstance(key_id, str) or not key_id.isalnum() or len(key_id) > 64:
            raise ConfigurationError("a key id is 16 lowercase hex characters")
        try:
            await self._request("POST", f"/v1/admin/keys/{key_id}/revoke", {}, {})
        except NotFound as missing:
            if missing.status == 404 and missing.after_unknown_outcome:
                return RevokeResult(key_id, already_gone=True)
            raise
        return RevokeResult(key_id)

    async def audit_page(self, after: int = 0, limit: int = 1000) -> AuditPage:
        answer = await self._request("GET", f"/v1/admin/audit?after={int(after)}&limit={int(limit)}", None, {})
        records = answer.body.get("records")
        next_after = answer.body.get("next_after")
        if not isinstance(records, list) or not (next_after is None or type(next_after) is int):
            raise ResponseError("audit response has no 'records' list or a malformed 'next_after'")
        anchor = answer.body.get("anchor")
        if anchor is not None:
            if (not isinstance(anchor, dict) or type(anchor.get("seq")) is not int
                    or not isinstance(anchor.get("hash"), str)):
                raise ResponseError("audit response has a malformed 'anchor'")
            anchor = (anchor["seq"], anchor["hash"])
        return AuditPage(tuple(records), _require_int(answer.body, "last_seq"), next_after, anchor)

    async def trim_audit(self, through_seq: int, through_hash: str) -> AuditTrimResult:
        """Drop the audit records up to ``through_seq`` (admin), whose hash ``through_hash`` an export
        gave; a trail is only trimmed as far as that matches (409 audit-trim-refused otherwise)."""
        answer = await self._request("POST", "/v1/admin/audit/trim",
                                     {"through_seq": through_seq, "through_hash": through_hash}, {})
        return AuditTrimResult(_require_int(answer.body, "trimmed_through"), _require_int(answer.body, "removed"),
                               str(answer.body.get("anchor_hash", "")))

    async def health(self, url: str | None = None) -> dict[str, Any]:
        """The /health body of the given node, or of the first node that answers."""
        if url is not None:
            base_url = normalize_urls(url)[0]
            try:
                answer = await self._send_once(base_url, "GET", "/health", None, {})
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                raise NoNodeAvailable([f"{base_url}: {_describe_failure(error, base_url)}"]) from None
            if answer.status != 200:
                raise _problem_from(answer, self._retry_after_cap_seconds)
        else:
            answer = await self._request("GET", "/health", None, {})
        if not isinstance(answer.body, dict):
            raise ResponseError("health response is not a JSON object")
        return answer.body

    async def cluster(self) -> dict[str, Any]:
        """The /v1/admin/cluster body from the first node that answers."""
        answer = await self._request("GET", "/v1/admin/cluster", None, {})
        if not isinstance(answer.body, dict) or not isinstance(answer.body.get("nodes"), list):
            raise ResponseError("cluster response has no 'nodes' list")
        return answer.body

    async def list_members(self) -> dict[str, Any]:
        """The configuration in effect: every member's id, peer address, role (voter or learner) and progress."""
        answer = await self._request("GET", "/v1/admin/members", None, {})
        body: dict[str, Any] = answer.body
        if not isinstance(body.get("members"), list):
            raise ResponseError("member list response has no 'members' list")
        return body

    async def change_member(self, action: str, node_id: str, peer_addr: str | None = None) -> dict[str, Any]:
        """One change, answered once committed: "add" (as a learner, with its peer_addr), "promote" or "remove"."""
        if action == "add":
            answer = await self._request("POST", "/v1/admin/members", {"node_id": node_id, "peer_addr": peer_addr}, {})
        elif action in ("promote", "remove") and node_id.replace("-", "").replace(".", "").replace("_", "").isalnum():
            answer = await self._request("POST", f"/v1/admin/members/{node_id}/{action}", {}, {})
        else:
            raise ConfigurationError("action is add, promote or remove, and a node id is [A-Za-z0-9_.-]")
        changed: dict[str, Any] = answer.body
        return changed

    async def add_voter(self, node_id: str, peer_addr: str, wait_seconds: float = 300.0) -> dict[str, Any]:
        """Add a node as a learner, wait until it has caught up and promote it. A step already done (shown
        committed by the member list) is skipped, and a refusal that the step is done (after a retry
        whose first try's outcome was unknown) counts as done, so a retry is safe. A step the list shows
        but not committed is waited for; refusals the cluster lifts by itself (a change still
        committing, the learner still catching up: 409 with Retry-After) are retried; both until
        ``wait_seconds`` pass (then MembershipChangeFailed or the refusal)."""
        deadline = asyncio.get_running_loop().time() + wait_seconds
        for action in ("add", "promote"):
            await self.change_member_once(action, node_id, peer_addr if action == "add" else None, deadline)
        return await self.list_members()

    async def change_member_once(self, action: str, node_id: str, peer_addr: str | None, deadline: float) -> bool:
        """Make one change unless it is made already, as the member list shows it before and after a
        409 refusal: made and committed. A change the list shows uncommitted (a leader change may still
        undo it) is waited for until ``deadline`` (the loop's clock), then MembershipChangeFailed; an
        "add" of an id that is a member at another peer address is MembershipChangeFailed at once.
        False when the list showed it made before this call asked for anything (a removal of an id that
        is no member, an add of one that is: nothing to do), True when this call made it."""
        if await self._change_is_made(action, node_id, peer_addr, deadline):
            return False
        try:
            await self.change_member_when_possible(action, node_id, peer_addr, deadline)
        except ProblemError as refused:
            if refused.status != 409 or not await self._change_is_made(action, node_id, peer_addr, deadline):
                raise
        return True

    async def _change_is_made(self, action: str, node_id: str, peer_addr: str | None, deadline: float) -> bool:
        """Whether the member list shows the change made and says the configuration is committed; while
        it shows the change but not committed, it is read again until ``deadline``."""
        loop = asyncio.get_running_loop()
        while True:
            listed = await self.list_members()
            members = {member.get("id"): member for member in listed["members"] if isinstance(member, dict)}
            member = members.get(node_id)
            if action == "add":
                if member is not None and member.get("peer_addr") != peer_addr:
                    listed_addr = member.get("peer_addr")
                    where = (f"at {listed_addr}" if isinstance(listed_addr, str)
                             else "at the address the nodes' static config gives it")
                    raise MembershipChangeFailed(
                        f"{node_id} is already a member {where}, not at {peer_addr}; nothing was changed. To "
                        f"add a node at {peer_addr} under this id, remove it first (tokenvault admin member "
                        f"remove {node_id}), then add it again")
                shown = member is not None
            elif action == "promote":
                shown = member is not None and member.get("role") == "voter"
            else:
                shown = member is None
            if not shown:
                return False
            if listed.get("committed") is True:
                return True
            remaining_seconds = deadline - loop.time()
            if remaining_seconds <= 0:
                raise MembershipChangeFailed(
                    f"the {action} of {node_id} is in the configuration at index "
                    f"{listed.get('configuration_index')}, which is not committed (commit index "
                    f"{listed.get('commit_index')}) at the end of the wait: a leader change may still undo it. "
                    f"List the members to see, and run the change again (it is skipped once committed)")
            await asyncio.sleep(min(MEMBER_POLL_SECONDS, remaining_seconds))

    async def change_member_when_possible(self, action: str, node_id: str, peer_addr: str | None,
                                          deadline: float) -> None:
        """``change_member``, retried while the refusal is one the cluster lifts by itself (409 with
        Retry-After) and the loop's clock is before ``deadline``."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.change_member(action, node_id, peer_addr)
                return
            except ProblemError as refused:
                if refused.status != 409 or refused.retry_after_seconds is None or loop.time() >= deadline:
                    raise
                await asyncio.sleep(min(refused.retry_after_seconds, max(0.0, deadline - loop.time())))

    async def _request(self, method: str, path: str, body: Any, headers: dict[str, str], *,
                       idempotent: bool = False, single_shot: tuple[str, str] | None = None) -> _Answer:
        """Send to the preferred node, failing over on connection errors and 503 until the deadline.

        ``idempotent``: the request carries an Idempotency-Key, so a 409 (still in flight) after a try whose
        outcome is unknown (a dropped connection, a timeout, a 503) is retried too. ``single_shot``: (what
        the request does, how to check its outcome) for a request that is not safe to repeat: it is sent
        again only after a failure that proves it had no effect, else OutcomeUnknown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._deadline_seconds
        failures: list[str] = []
        last_problem: ProblemError | None = None
        backoff_seconds = INITIAL_BACKOFF_SECONDS
        outcome_unknown = False
        tried = False
        while True:
            wait_seconds = backoff_seconds
            untrusted = 0  # nodes of this round whose certificate this client does not trust
            for offset in range(len(self.urls)):
                if tried and loop.time() >= deadline:
                    break  # Why: a round of URLs each waited out to its timeout ran deadline + N timeouts
                tried = True
                index = (self._preferred_index + offset) % len(self.urls)
                url = self.urls[index]
                try:
                    answer = await self._send_once(url, method, path, body, headers)
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    # Why: after a timeout or a dropped connection the request may still take effect.
                    if not isinstance(error, _NOT_SENT_ERRORS):
                        outcome_unknown = True
                        if single_shot is not None:
                            raise OutcomeUnknown(single_shot[0], url, _describe_failure(error, url),
                                                 single_shot[1]) from None
                    failures.append(f"{url}: {_describe_failure(error, url)}")
                    untrusted += isinstance(error, aiohttp.ClientConnectorCertificateError)
                    continue
                retry_conflict = answer.status == 409 and idempotent and outcome_unknown
                if answer.status == 503 or retry_conflict:
                    last_problem = _problem_from(answer, self._retry_after_cap_seconds)
                    if answer.status == 503 and not _had_no_effect(last_problem):
                        # Why: "not confirmed in time; it may still take effect" leaves the outcome as
                        # unknown as a dropped connection does (a keyed retry may then meet a 409).
                        outcome_unknown = True
                        if single_shot is not None:
                            raise OutcomeUnknown(single_shot[0], url, f"503 {last_problem.title}"
                                                 + (f": {last_problem.detail}" if last_problem.detail else ""),
                                                 single_shot[1])
                    last_problem.after_unknown_outcome = outcome_unknown
                    failures.append(f"{url}: {answer.status} {last_problem.title}")
                    if last_problem.retry_after_seconds is not None:
                        wait_seconds = max(wait_seconds, last_problem.retry_after_seconds)
                    continue
                self._preferred_index = index
                if answer.status >= 300:
                    refused = _problem_from(answer, self._retry_after_cap_seconds)
                    refused.after_unknown_outcome = outcome_unknown
                    raise refused
                if not isinstance(answer.body, dict):
                    raise ResponseError(f"{method} {path} answered with a body that is not a JSON object")
                return answer
            remaining_seconds = deadline - loop.time()
            # Why: a certificate is not trusted the next second either; waiting out the deadline only hid why.
            if remaining_seconds <= 0 or untrusted == len(self.urls):
                if last_problem is not None:
                    raise last_problem
                raise NoNodeAvailable(failures[-MAX_REMEMBERED_FAILURES:])
            await asyncio.sleep(min(wait_seconds, self._retry_after_cap_seconds, remaining_seconds))
            backoff_seconds = min(backoff_seconds * 2, self._retry_after_cap_seconds)

    async def _send_once(self, url: str, method: str, path: str, body: Any,
                         headers: dict[str, str]) -> _Answer:
        session = self._get_session()
        request_headers = {"Accept": "application/json, application/problem+json", **headers}
        if self._api_key is not None:
            request_headers["Authorization"] = f"Bearer {self._api_key}"
        data = None
        if body is not None:
            try:
                data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                # Why: Python reads bytes that are not UTF-8 (from a file, a pipe, a command line) as lone
                # surrogates, which no JSON body can carry. The error held the whole body, values too.
                raise ConfigurationError("the request holds text that is not valid UTF-8 (a lone surrogate, as "
                                         "Python reads bytes that are not UTF-8); nothing was sent") from None
            request_headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(total=self._timeout_seconds)
        # Why per request: a session the caller gave has its own connector, whose TLS settings (the system's
        # CAs, or none at all) would otherwise replace the cluster CA this client was given.
        tls: dict[str, Any] = {"ssl": self._ssl_context} if self._ssl_context is not None else {}
        async with session.request(method, url + path, data=data, headers=request_headers,
                                   timeout=timeout, allow_redirects=False, **tls) as response:
            raw = await _read_bounded(response)
            return _Answer(url, response.status, CIMultiDict(response.headers), _decode_json(raw))

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl_context) if self._ssl_context is not None else None
            self._session = aiohttp.ClientSession(connector=connector)
            self._owns_session = True
        return self._session


def _key_info(entry: Any) -> ApiKeyInfo:
    if not isinstance(entry, dict):
        raise ResponseError("a key entry is not a JSON object")
    fields = [entry.get(name) for name in ("id", "name", "created_at")]
    scopes = entry.get("scopes")
    if not all(isinstance(value, str) for value in fields) or not isinstance(scopes, list) or \
            not all(isinstance(scope, str) for scope in scopes):
        raise ResponseError("a key entry lacks id, name, scopes or created_at")
    key_id, name, created_at = (str(value) for value in fields)
    return ApiKeyInfo(key_id, name, tuple(scopes), created_at)


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    total_bytes = 0
    async for chunk in response.content.iter_chunked(65536):
        total_bytes += len(chunk)
        if total_bytes > MAX_RESPONSE_BYTES:
            raise ResponseError(f"response body larger than {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: nesting deeper than the parser's stack (e.g. 5000 '['), as bounded bytes allow.
        return None


def _replayed(answer: _Answer) -> bool:
    return answer.headers.get("Idempotent-Replayed", "").strip().lower() == "true"


class Client:
    """Synchronous wrapper around `AsyncClient` with its own event loop.

    Meant for scripts and the CLI; do not call it from inside a running event loop
    (use `AsyncClient` there).
    """

    def __init__(self, urls: str | Iterable[str], api_key: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = AsyncClient(urls, api_key, **options)

    def __repr__(self) -> str:
        return f"Client(urls={list(self._client.urls)!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exception_info: object) -> None:
        self.close()

    @property
    def urls(self) -> tuple[str, ...]:
        return self._client.urls

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._client.close())
            self._loop.close()

    def tokenize(self, values: Sequence[str], idempotency_key: str | None = None, *,
                 token_format: str | None = None, metadata: dict[str, Any] | None = None,
                 ttl_seconds: int | None = None) -> TokenizeResult:
        return self._loop.run_until_complete(self._client.tokenize(
            values, idempotency_key, token_format=token_format, metadata=metadata, ttl_seconds=ttl_seconds))

    def detokenize(self, tokens: Sequence[str], *, epoch: int | None = None) -> tuple[str | None, ...]:
        return self._loop.run_until_complete(self._client.detokenize(tokens, epoch=epoch))

    def detokenize_with_metadata(self, tokens: Sequence[str], *, epoch: int | None = None) -> DetokenizeResult:
        return self._loop.run_until_complete(self._client.detokenize_with_metadata(tokens, epoch=epoch))

    def rotate_epoch(self, idempotency_key: str | None = None) -> RotateResult:
        return self._loop.run_until_complete(self._client.rotate_epoch(idempotency_key))

    def list_epochs(self) -> EpochList:
        return self._loop.run_until_complete(self._client.list_epochs())

    def delete_tokens(self, tokens: Sequence[str], *, epoch: int | None = None) -> int:
        return self._loop.run_until_complete(self._client.delete_tokens(tokens, epoch=epoch))

    def retokenize(self, tokens: Sequence[str], *, epoch: int | None = None) -> RetokenizeResult:
        return self._loop.run_until_complete(self._client.retokenize(tokens, epoch=epoch))

    def destroy_epoch(self, epoch: int) -> str:
        return self._loop.run_until_complete(self._client.destroy_epoch(epoch))

    def epoch_tokens(self, epoch: int, after: str | None = None, limit: int = 100) -> TokenPage:
        return self._loop.run_until_complete(self._client.epoch_tokens(epoch, after, limit))

    def health(self, url: str | None = None) -> dict[str, Any]:
        return self._loop.run_until_complete(self._client.health(url))

    def cluster(self) -> dict[str, Any]:
        return self._loop.run_until_complete(self._client.cluster())
