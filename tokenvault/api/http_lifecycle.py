"""The HTTP routes of the token lifecycle (docs/api.md, "Lifecycle"); tokenvault/api/http.py adds them.

Each handler runs the checks in the order tokenvault/api/http.py's docstring
fixes (admit, receive the body, in-flight slot, parse and validate) and makes
one NodeService call (tokenvault/api/lifecycle.py) with plain values:

- ``POST /v1/tokens/delete`` (scope ``delete``) ``{"tokens": [...]}`` -> ``{"deleted": n}``;
- ``POST /v1/retokenize`` (scope ``retokenize``) ``{"tokens": [...]}`` -> ``{"epoch", "tokens"}``;
- ``POST /v1/admin/epochs/{epoch}/destroy`` (admin) ``{}`` or no body -> ``{"epoch", "state"}``;
- ``GET /v1/admin/epochs/{epoch}/tokens?after=<token>&limit=<n>`` (admin): a page of the
  epoch's tokens for ``tokenvault admin epoch migrate``.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from typing import Any, Protocol

from tokenvault import auth
from tokenvault.api.httpserver import AnyResponse, Request
from tokenvault.api.interface import VaultService
from tokenvault.api.routing import Router, path_parameter
from tokenvault.api.responses import EMPTY_BODY, NO_STORE_HEADERS, json_response, outcome_response
from tokenvault.api.validation import ItemLimits, lookup_tokens_and_epoch, require_members
from tokenvault.core import commands
from tokenvault.core.store_layout import MAX_STORED_EPOCH, MAX_TOKEN_PAGE
from tokenvault.crypto import formats
from tokenvault.crypto.tokens import is_token
from tokenvault.errors import InvalidRequest, NotFound


class Application(Protocol):
    """What the lifecycle routes take from the application that adds them (tokenvault/api/http.py's): its
    checks and slots, in the order that module's docstring gives, and the service behind it."""

    @property
    def service(self) -> VaultService: ...

    @property
    def limits(self) -> ItemLimits: ...

    def admit(self, request: Request, scope: str, alternative: str | None = None) -> auth.Principal: ...

    def actor(self, principal: auth.Principal) -> commands.Actor: ...

    def inflight_slot(self) -> AbstractContextManager[None]: ...

    async def receive_body(self, request: Request, *, idempotent: bool = False) -> bytes: ...

    async def read_json(self, request: Request, *, body_required: bool) -> Any: ...

ROUTE_DELETE = "/v1/tokens/delete"
ROUTE_RETOKENIZE = "/v1/retokenize"
ROUTE_EPOCH_DESTROY = "/v1/admin/epochs/{epoch}/destroy"
ROUTE_EPOCH_TOKENS = "/v1/admin/epochs/{epoch}/tokens"
ROUTE_AUDIT_TRIM = "/v1/admin/audit/trim"
_AUDIT_HASH = re.compile(r"[0-9a-f]{64}")
DEFAULT_TOKEN_PAGE = 100
_EPOCH_TEXT = re.compile(r"[1-9][0-9]{0,9}\Z")
_LIMIT_TEXT = re.compile(r"[1-9][0-9]{0,3}\Z")


def path_epoch(request: Request) -> int:
    """The ``{epoch}`` of the path; anything that is not a stored epoch number is a 404, like a key id."""
    text = path_parameter(request, "epoch")
    if not _EPOCH_TEXT.match(text) or int(text) > MAX_STORED_EPOCH:
        raise NotFound("no epoch has this number (epochs are decimal integers from 1)")
    return int(text)


def token_page_query(request: Request) -> tuple[str | None, int]:
    """``after`` (a token, default none) and ``limit`` (1..MAX_TOKEN_PAGE, default DEFAULT_TOKEN_PAGE)."""
    query = request.query
    unknown = len(set(query) - {"after", "limit"})
    if unknown:
        raise InvalidRequest(f"the query has {unknown} unknown parameter(s); allowed: after, limit")
    for name in ("after", "limit"):
        if len(query.getall(name, [])) > 1:
            raise InvalidRequest(f"'{name}' is given more than once")
    after = query.get("after")
    if after is not None and not is_token(after) and not formats.is_format_token(after):
        raise InvalidRequest("'after' must be a token (tv<epoch>_<base32 body>, or a card or digits token)")
    limit_text = query.get("limit")
    if limit_text is None:
        return after, DEFAULT_TOKEN_PAGE
    if not _LIMIT_TEXT.match(limit_text) or int(limit_text) > MAX_TOKEN_PAGE:
        raise InvalidRequest(f"'limit' must be a decimal integer in [1, {MAX_TOKEN_PAGE}]")
    return after, int(limit_text)


class LifecycleRoutes:
    """The lifecycle handlers over the application (its checks, slots and service)."""

    def __init__(self, api: Application) -> None:
        self.api = api

    async def _tokens_and_epoch(self, request: Request) -> tuple[list[str], int | None]:
        """Opaque tokens, and card and digits tokens of ``"epoch"`` (default: the active one), as detokenize."""
        document = require_members(await self.api.read_json(request, body_required=True), ("tokens",), ("epoch",))
        return lookup_tokens_and_epoch(document, self.api.limits)

    async def delete(self, request: Request) -> AnyResponse:
        principal = self.api.admit(request, auth.DELETE)
        await self.api.receive_body(request)
        with self.api.inflight_slot():
            tokens, epoch = await self._tokens_and_epoch(request)
            outcome = await self.api.service.delete_tokens(tokens, self.api.actor(principal), epoch)
            return outcome_response(outcome)

    async def retokenize(self, request: Request) -> AnyResponse:
        principal = self.api.admit(request, auth.RETOKENIZE)
        await self.api.receive_body(request)
        with self.api.inflight_slot():
            tokens, epoch = await self._tokens_and_epoch(request)
            document = await self.api.service.retokenize(tokens, self.api.actor(principal), epoch)
            if len(document["tokens"]) != len(tokens):
                raise AssertionError("the service answered a different number of tokens than asked")
            return json_response(document, headers=NO_STORE_HEADERS)

    async def destroy_epoch(self, request: Request) -> AnyResponse:
        principal = self.api.admit(request, auth.ADMIN)
        await self.api.receive_body(request)
        with self.api.inflight_slot():
            document = await self.api.read_json(request, body_required=False)
            if document is not EMPTY_BODY:
                require_members(document, ())
            epoch = path_epoch(request)
            return outcome_response(await self.api.service.destroy_epoch(epoch, self.api.actor(principal)))

    async def trim_audit(self, request: Request) -> AnyResponse:
        """``{"through_seq": S, "through_hash": H}``: drop the audit records up to S, whose hash an export
        gave as H (docs/security.md, "Growth and retention")."""
        principal = self.api.admit(request, auth.ADMIN)
        await self.api.receive_body(request)
        with self.api.inflight_slot():
            document = require_members(await self.api.read_json(request, body_required=True),
                                       ("through_seq", "through_hash"))
            through_seq, through_hash = document["through_seq"], document["through_hash"]
            if type(through_seq) is not int or not 1 <= through_seq < 2**63:
                raise InvalidRequest("'through_seq' must be an audit record number (an integer of at least 1)")
            if not isinstance(through_hash, str) or not _AUDIT_HASH.fullmatch(through_hash):
                raise InvalidRequest("'through_hash' must be the record's hash: 64 lowercase hex digits")
            return outcome_response(await self.api.service.trim_audit(through_seq, bytes.fromhex(through_hash),
                                                                      self.api.actor(principal)))

    async def epoch_tokens(self, request: Request) -> AnyResponse:
        principal = self.api.admit(request, auth.ADMIN)
        epoch = path_epoch(request)
        after, limit = token_page_query(request)
        return json_response(await self.api.service.epoch_tokens(epoch, after, limit, principal.key_id),
                             headers=NO_STORE_HEADERS)


def add_lifecycle_routes(router: Router, api: Application) -> None:
    routes = LifecycleRoutes(api)
    router.add_post(ROUTE_DELETE, routes.delete)
    router.add_post(ROUTE_RETOKENIZE, routes.retokenize)
    router.add_post(ROUTE_EPOCH_DESTROY, routes.destroy_epoch)
    router.add_get(ROUTE_EPOCH_TOKENS, routes.epoch_tokens)
    router.add_post(ROUTE_AUDIT_TRIM, routes.trim_audit)
