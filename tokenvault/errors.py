"""Typed errors the service raises and the problem+json bodies the HTTP layer sends.

The service layer (tokenvault/api/service.py) raises ServiceError subclasses; the
HTTP layer turns each into an RFC 9457 ``application/problem+json`` response
with the error's status, title, detail and extra headers. Every detail text
is written by this project and never contains a submitted value, token or key:
callers must build details from counts, positions and names only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus

PROBLEM_CONTENT_TYPE = "application/problem+json"
# Problem types are URNs rather than URLs so that nobody is tempted to
# dereference them; docs/api.md lists every one of them.
PROBLEM_TYPE_PREFIX = "urn:tokenvault:problem:"
DEFAULT_RETRY_AFTER_SECONDS = 1


# Statuses of the 2xx-5xx range whose answer carries no body (RFC 9110).
_BODILESS_STATUSES = frozenset({204, 205, 304})


def is_body_status(status: object) -> bool:
    """Whether an answer of ``status`` may carry the JSON body every answer of this service has: 200-599
    but 204, 205 and 304 (a client or proxy would read such a body as the next answer). Answers that come
    from another process (a worker's core, a forwarded request's primary) are checked with it."""
    return type(status) is int and 200 <= status <= 599 and status not in _BODILESS_STATUSES


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished write as the service returns it: status and JSON body bytes, sent as-is.

    ``replayed`` is true when the body is the stored first response of an
    idempotent request; the HTTP layer then adds ``Idempotent-Replayed: true``.
    """

    status: int
    body: bytes
    replayed: bool


class ServiceError(Exception):
    """An error the client is told about: status, short title, detail and headers.

    Subclasses fix ``status``, ``title`` and ``problem``; the detail is
    chosen at the raise site and must never contain a value, token or key.
    """

    status: int = 500
    title: str = "Internal error"
    problem: str = "internal"
    # For a 503: true when the request certainly had no effect (never proposed, or refused before it was),
    # so a client may send it again even where a repeat could act twice; false: it may still take effect
    # once. A 503's problem body says which in its ``effect`` member (problem_body_of).
    no_effect: bool = False

    def __init__(self, detail: str | None = None, *, headers: Mapping[str, str] | None = None) -> None:
        self.detail = detail if detail is not None else self.title
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(self.detail)


class Unavailable(ServiceError):
    """No primary or no quorum right now: the request had no effect or will complete exactly once."""

    status = 503
    title = "Service unavailable"
    problem = "unavailable"

    def __init__(
        self,
        detail: str | None = None,
        *,
        retry_after_seconds: int = DEFAULT_RETRY_AFTER_SECONDS,
        headers: Mapping[str, str] | None = None,
        no_effect: bool = False,
    ) -> None:
        merged = {"Retry-After": str(max(0, int(retry_after_seconds)))}
        merged.update(headers or {})
        super().__init__(detail or "no primary or no quorum right now; retry later", headers=merged)
        if no_effect:
            self.no_effect = True


class IdempotencyInFlight(ServiceError):
    """A request with the same Idempotency-Key is still being processed."""

    status = 409
    title = "Idempotent request in flight"
    problem = "idempotency-in-flight"

    def __init__(self, detail: str | None = None, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(
            detail or "a request with this Idempotency-Key is still in progress; retry later",
            headers=headers,
        )


class IdempotencyMismatch(ServiceError):
    """The Idempotency-Key was used before with a different request body."""

    status = 422
    title = "Idempotency key reused with a different request"
    problem = "idempotency-mismatch"

    def __init__(self, detail: str | None = None, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(
            detail or "this Idempotency-Key was already used with a different request body",
            headers=headers,
        )


def problem_type(slug: str) -> str:
    """The full ``type`` URI for a problem slug such as ``invalid-request``."""
    return PROBLEM_TYPE_PREFIX + slug


# The ``effect`` member of every 503 problem body: whether the request certainly had no effect.
EFFECT_NONE = "none"
EFFECT_UNKNOWN = "unknown"


def problem_body(status: int, slug: str, title: str, detail: str, *, no_effect: bool = False) -> bytes:
    """Serialise a problem+json document; ASCII-only output so it is always valid UTF-8. A 503's also says
    whether the request had no effect (``"effect": "none"``) or may still take effect once (``"unknown"``)."""
    document: dict[str, object] = {"type": problem_type(slug), "title": title, "status": status, "detail": detail}
    if status == 503:
        document["effect"] = EFFECT_NONE if no_effect else EFFECT_UNKNOWN
    return json.dumps(document, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def problem_body_of(error: ServiceError) -> bytes:
    """The problem body of ``error``, as a node answers it."""
    return problem_body(error.status, error.problem, error.title, error.detail, no_effect=error.no_effect)


def default_title(status: int) -> str:
    """The standard reason phrase for ``status``, or a generic one for unknown codes."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_from_problem(status: int, slug: str, detail: str, headers: Mapping[str, str], *,
                       no_effect: bool = False) -> ServiceError | None:
    """The error class a peer raised, rebuilt from its problem type and status (forwarded requests),
    with ``no_effect`` as the peer said (a class whose errors always had none keeps saying so).

    A backup that forwarded a request raises the same class the primary
    raised, so callers and the HTTP layer treat a forwarded error exactly as a
    local one. None when no class of this project has that type and status.
    """
    pending: list[type[ServiceError]] = [ServiceError]
    while pending:
        error_class = pending.pop()
        pending.extend(error_class.__subclasses__())
        if error_class.problem == slug and error_class.status == status:
            error = error_class.__new__(error_class)
            ServiceError.__init__(error, detail, headers=headers)
            if no_effect:
                error.no_effect = True
            return error
    return None


class InvalidRequest(ServiceError):
    """The request is not JSON, has the wrong shape or types, or holds an invalid item or header."""

    status = 400
    title = "Invalid request"
    problem = "invalid-request"


class Unauthenticated(ServiceError):
    """No API key, a malformed Authorization header, or an unknown key."""

    status = 401
    title = "Authentication required"
    problem = "unauthenticated"


def revoked_key() -> Unauthenticated:
    """The answer to a request of a runtime key that was authenticated before its revocation reached the
    node, and that the node finds gone before it answers (docs/security.md, "Revocation")."""
    return Unauthenticated("unknown API key (it was revoked)",
                           headers={"WWW-Authenticate": 'Bearer realm="tokenvault", error="invalid_token"'})


class Forbidden(ServiceError):
    """The API key is valid but lacks the scope the endpoint needs."""

    status = 403
    title = "Insufficient scope"
    problem = "forbidden"


class PayloadTooLarge(ServiceError):
    """The body is larger than max_body_bytes or holds more than max_items items."""

    status = 413
    title = "Payload too large"
    problem = "payload-too-large"


class UnsupportedMediaType(ServiceError):
    """The request body is not declared as JSON."""

    status = 415
    title = "Unsupported media type"
    problem = "unsupported-media-type"


class EpochChanged(ServiceError):
    """Between a node's core and its HTTP workers only: the worker sealed in an epoch that is no longer
    the active one (or that the core did not confirm); the worker then lets the core seal. Never
    answered to a client."""

    status = 409
    title = "Epoch changed"
    problem = "epoch-changed"


class Overloaded(Unavailable):
    """Too many requests are in progress on this node; the rejected one had no effect."""

    problem = "overloaded"
    no_effect = True

    def __init__(self, detail: str | None = None, *, retry_after_seconds: int = DEFAULT_RETRY_AFTER_SECONDS) -> None:
        super().__init__(
            detail or "too many requests in progress on this node; retry later",
            retry_after_seconds=retry_after_seconds,
        )


class NotFound(ServiceError):
    """The named resource (a runtime API key) does not exist."""

    status = 404
    title = "Not found"
    problem = "not-found"


class KeyLimitReached(ServiceError):
    """The replicated API key table is full; revoke a key first."""

    status = 409
    title = "Conflict"
    problem = "key-limit"


class RateLimited(ServiceError):
    """The API key is past its rate limit (or its share of bodies being received); retry after Retry-After."""

    status = 429
    title = "Too many requests"
    problem = "rate-limited"

    def __init__(self, detail: str | None = None, *, retry_after_seconds: int = DEFAULT_RETRY_AFTER_SECONDS) -> None:
        # Retry-After is whole seconds and at least 1: "0" would invite an immediate retry that fails again.
        super().__init__(
            detail or "this API key is past its rate limit; retry after the time in Retry-After",
            headers={"Retry-After": str(max(1, int(retry_after_seconds)))},
        )


class RequestTimeout(ServiceError):
    """The request body stopped arriving for longer than the body timeout; the connection is closed."""

    status = 408
    title = "Request timeout"
    problem = "request-timeout"
    close_connection = True

    def __init__(self, detail: str | None = None) -> None:
        # Why no Connection header: the HTTP server writes it for close_connection (it drops a handler's).
        super().__init__(detail or "the request body stopped arriving; the connection is closed")


class UnprocessableValue(ServiceError):
    """A well-formed request whose content does not fit: a value that is not of the requested token
    format, metadata too large, a TTL out of range. The detail names the field and position only."""

    status = 422
    title = "Unprocessable content"
    problem = "unprocessable"


class TokenCollision(ServiceError):
    """A format-preserving token of this request is held, in this epoch, by another value of another
    format (card and digits tokens of one length share a space); nothing of the request was stored."""

    status = 409
    title = "Conflict"
    problem = "format-token-collision"


class EpochActive(ServiceError):
    """The active epoch cannot be destroyed: new tokens are issued in it. Rotate first."""

    status = 409
    title = "Conflict"
    problem = "epoch-active"


class EpochDestroyed(ServiceError):
    """A token of a destroyed epoch was given where its value would be needed (re-tokenize, migrate)."""

    status = 422
    title = "Unprocessable content"
    problem = "epoch-destroyed"


class MembershipChangeRefused(ServiceError):
    """A membership change the cluster cannot make now (an earlier change is not committed, a learner
    has not caught up) or at all (the node is a member already, or is not one); the detail says which."""

    status = 409
    title = "Conflict"
    problem = "membership-change-refused"


class AuditTrimRefused(ServiceError):
    """An audit trim that would drop records nobody can show were exported: the record named does not
    exist, has another hash, or was trimmed away already; the detail says which. Nothing was dropped."""

    status = 409
    title = "Conflict"
    problem = "audit-trim-refused"
