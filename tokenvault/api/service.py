"""The vault's request logic on one node: what the HTTP layer calls.

On the primary a tokenize computes its tokens and ciphertexts with the active
epoch, proposes them as one log entry and answers once that entry is applied;
the apply step re-checks the epoch and the idempotency key, so a request can
never span a rotation and a key is honoured once even across failovers. A node
that is not the primary forwards writes, and detokenizes of tokens it has not
applied, to the primary over the authenticated peer link.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgpack

from protocol import EntryTooLarge, ForwardRequest, ForwardResponse, NotPrimary, ProposalRejected, Role
from protocol.codec import unpack_bounded
from tokenvault import auth
from tokenvault.core import commands
from tokenvault.api.audit import AuditBuffer, AuditUnavailable
from tokenvault.api.coalesce import TokenizeCoalescer
from tokenvault.api.lifecycle import (LIFECYCLE_DOCUMENT_KINDS, LIFECYCLE_FORWARDED_MEMBERS, RETOKENIZE,
                                      LifecycleOperations)
from tokenvault.core.backup import BACKUP_WORK_DIR_NAME, BackupStream
from tokenvault.crypto.keys import DecryptError, KeyCustodyError, new_epoch_secret
from tokenvault.auth import PRINCIPAL_NAME_PATTERN
from tokenvault.errors import (EpochChanged, IdempotencyInFlight, IdempotencyMismatch, InvalidRequest,
                               KeyLimitReached, NotFound, Outcome, Overloaded, PayloadTooLarge, ServiceError,
                               TokenCollision, Unavailable, EFFECT_NONE, error_from_problem, is_body_status,
                               problem_body_of, revoked_key)
from tokenvault.logs import SummedEvent, get_logger
from tokenvault.futures import await_future, computed_in_slices
from tokenvault.core.node import MAX_FRAME_BYTES, Node, NodeBusy, ProposalLost, ProposalOutcomeUnknown
from tokenvault.core.sealer import Sealer, SealerUnavailable
from tokenvault.core.store_layout import MAX_API_KEYS as MAX_RUNTIME_KEYS
from tokenvault.core.store_layout import ApplyResult
from tokenvault.core.store_layout import Outcome as ApplyOutcome
from tokenvault.crypto import formats
from tokenvault.crypto.tokens import MAX_TOKEN_CHARS, is_token, parse_token
from tokenvault.api.validation import (MAX_METADATA_BYTES, SEALED_TOKENIZE_MEMBERS, TokenizeOptions,
                                       normalize_values, require_item_list, validate_idempotency_key,
                                       validate_lookup_epoch, validate_lookup_tokens, validate_options,
                                       validate_sealed_tokenize, validate_tokens, validate_values)
from tokenvault.api.members import CHANGE_MEMBER, LIST_MEMBERS, MembershipOperations
from tokenvault.config import LimitsConfig

log = get_logger("service")
# Damaged stored bytes read as unknown and are said loudly, but summed: one detokenize of many damaged
# tokens, or a client asking for them again and again, makes a line a second per epoch, not one per token.
CIPHERTEXT_CORRUPT = SummedEvent(log, "store.ciphertext_corrupt", ("epoch",), level="error")
METADATA_CORRUPT = SummedEvent(log, "store.metadata_corrupt", ("epoch",), level="error")

MAX_EPOCH_RETRIES = 5
MAX_FORWARDS_IN_FLIGHT = 4096
# The largest forwarded request or answer body a peer link carries: its frame bound less room for the
# frame's other fields. Only limits above the defaults reach it ([limits] max_body_bytes up to 1 GiB).
MAX_FORWARDED_FRAME_BODY_BYTES = MAX_FRAME_BYTES - 64 * 1024
# Forwarded requests the primary serves at once, from all backups together.
MAX_FORWARDS_SERVED = 2 * MAX_FORWARDS_IN_FLIGHT
TOKENIZE = "tokenize"
TOKENIZE_EXTENDED = "tokenize.v2"
# A plain tokenize a backup's HTTP worker sealed, forwarded with its pairs: the primary checks them as
# a worker's (NodeService.tokenize_sealed) instead of sealing every value itself, and coalesces them.
TOKENIZE_SEALED = "tokenize.sealed"
# The same for a tokenize with a format, a TTL or metadata (validation.SEALED_TOKENIZE_MEMBERS): the primary
# checks it as a worker's extended request and proposes the pairs (and metadata ciphertexts) it was given.
TOKENIZE_SEALED_EXTENDED = "tokenize.sealed.v2"
# The members a plain ``tokenize.sealed`` leaves out, as an extended one would carry them.
PLAIN_SEALED_OPTIONS: dict[str, Any] = {"token_format": formats.OPAQUE, "metadata_json": None, "ttl_seconds": None,
                                        "metadata": None}
# A sealed tokenize whose pairs pack larger than this is forwarded as values (the peer frame bound is 16 MiB).
MAX_FORWARDED_SEALED_BYTES = 8 * 1024 * 1024
# msgpack's headers for one value and its [token, ciphertext] pair: str, array, str and bin, 5 bytes each at most.
SEALED_ITEM_OVERHEAD_BYTES = 20
# A metadata ciphertext is the document's bytes plus AES-SIV's 16-byte tag; msgpack's bin header is 5 bytes at most.
METADATA_CIPHERTEXT_OVERHEAD_BYTES = 16 + 5
ROTATE = "rotate"
CREATE_KEY = "key.create"
REVOKE_KEY = "key.revoke"
LIST_KEYS = "keys"
AUDIT = "audit"
DETOKENIZE = "detokenize"
REVEAL = "reveal"
EPOCHS = "epochs"
# The background purge of expired mappings (on the primary): how often it looks, and the most
# mappings one purge entry deletes.
EXPIRY_PURGE_INTERVAL_SECONDS = 1.0
EXPIRY_PURGE_LIMIT = 256
MASKED_SUBJECT = "masked"
# What a routed call answers: its local function's result, here or (decoded) from the primary.
_Result = TypeVar("_Result")


class ForwardedError(ServiceError):
    """An error the primary answered to a forwarded request whose type this node does not know, passed on."""

    def __init__(self, status: int, title: str, detail: str, problem: str, headers: dict[str, str], *,
                 no_effect: bool = False) -> None:
        self.status = status
        self.title = title
        self.problem = problem
        self.no_effect = no_effect
        super().__init__(detail, headers=headers)


def _token_collision() -> TokenCollision:
    """What a tokenize answers when its entry is refused with TOKEN_COLLISION, sealed here or by a worker."""
    return TokenCollision("a card or digits token of this request is held by a value of the other "
                          "format in this epoch; nothing was stored (tokenize these values as "
                          "opaque, or again after a rotation)")


def _forward_answer(error: ServiceError) -> tuple[int, bytes, tuple[tuple[str, str], ...]]:
    """A forwarded request's answer for ``error``: its status, problem body and headers."""
    return error.status, problem_body_of(error), tuple(error.headers.items())


def _json(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _now_ms() -> int:
    """This node's clock, which reads judge expiry by."""
    return int(time.time() * 1000)


def _rfc3339(milliseconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(milliseconds / 1000)) + f".{milliseconds % 1000:03d}Z"


class NodeService(LifecycleOperations, MembershipOperations):
    """What tokenvault.api.http calls, on top of a Node (tests stand in for it with a fake of the same methods).

    The token lifecycle (delete, re-tokenize, epoch destroy) is in tokenvault/api/lifecycle.py, membership
    changes in tokenvault/api/members.py."""

    def __init__(self, node: Node, sealer: Sealer | None = None) -> None:
        self.node = node
        self._sealer = sealer
        self.node_id = node.node_id
        self._timeout_seconds = node.config.timing.request_timeout_ms / 1000
        self._in_flight: set[tuple[str, str]] = set()
        self._forward_ids = itertools.count(1)
        self._forwards_waiting: dict[int, tuple[str, asyncio.Future[ForwardResponse]]] = {}
        self._forward_tasks: set[asyncio.Task[None]] = set()
        # Bytes of the forwarded bodies being served: at most what this node's HTTP layer takes of its own
        # clients at once (max_inflight_requests bodies of max_body_bytes), whatever a peer sends.
        self._forward_bytes_served = 0
        self._max_forward_bytes_served = node.config.http.max_inflight_requests * node.config.limits.max_body_bytes
        node.forward_handler = self._on_forward_request
        node.forward_response_handler = self._on_forward_response
        node.peer_down_handler = self._on_peer_down
        # Sealed tokenizes of many requests become one entry (tokenvault.api.coalesce).
        self._coalescer = TokenizeCoalescer(self._propose, timeout_seconds=self._timeout_seconds)
        if sealer is not None:
            node.epoch_destroyed_handlers.append(sealer.forget)
        audit_config = node.config.audit
        self._audit: AuditBuffer | None = None
        if audit_config.enabled:
            self._audit = AuditBuffer(self._write_audit, flush_ms=audit_config.flush_ms,
                                      max_batch_records=audit_config.max_batch_records,
                                      max_pending_records=audit_config.max_pending_records)
        self.expiry_purge_interval_seconds = EXPIRY_PURGE_INTERVAL_SECONDS
        self.expiry_purge_limit = EXPIRY_PURGE_LIMIT
        self._purge_task: asyncio.Task[None] | None = None
        try:
            self._purge_task = asyncio.get_running_loop().create_task(self._purge_expired_loop())
        except RuntimeError:
            pass  # built outside an event loop (a test double's setup): no background purge

    def api_key(self, key_id: str) -> auth.RuntimeKey | None:
        """The replicated runtime key with this id, as this node has applied it (for authentication)."""
        return self.node.store.api_key(key_id)

    async def close(self) -> None:
        await self._coalescer.close()
        if self._purge_task is not None:
            self._purge_task.cancel()
        if self._audit is not None:
            await self._audit.close()
        for task in list(self._forward_tasks):
            task.cancel()
        for _, future in self._forwards_waiting.values():
            if not future.done():
                future.cancel()

    def health(self) -> dict[str, Any]:
        return self.node.health()

    async def read_health(self) -> dict[str, Any]:
        """health() for the HTTP layer, whose service may be in another process (tokenvault.api.remote)."""
        return self.node.health()

    # ------------------------------------------------------------------ expiry
    async def _purge_expired_loop(self) -> None:
        """On the primary, every interval: while a mapping's expiry has passed, propose a purge entry
        of at most expiry_purge_limit mappings (the entry carries this node's clock, so every node
        deletes the same ones). Backups only apply those entries."""
        while True:
            await asyncio.sleep(self.expiry_purge_interval_seconds)
            try:
                while await self.purge_expired_once() >= self.expiry_purge_limit:
                    pass  # a full batch: more may be waiting
            except asyncio.CancelledError:
                raise
            except (ServiceError, NotPrimary):
                pass  # no quorum or a change of primary: the next round tries again
            except Exception:
                log.exception("expiry.purge_failed")

    async def purge_expired_once(self) -> int:
        """One purge entry if this node is the primary and a mapping has expired; the number deleted."""
        if not self._is_primary():
            return 0
        now_ms = _now_ms()
        next_expiry_ms = self.node.store.next_expiry_ms()
        if next_expiry_ms is None or next_expiry_ms > now_ms:
            return 0
        command = commands.PurgeExpiredCommand(now_ms=now_ms, limit=self.expiry_purge_limit)
        result = await self._propose(commands.encode_command(command))
        if result.outcome == ApplyOutcome.OK and result.items:
            log.info("expiry.purged", mappings=result.items, index=result.index)
        return result.items if result.outcome == ApplyOutcome.OK else 0

    # ------------------------------------------------------------------ routing
    def _is_primary(self) -> bool:
        return self.node.replica.role == Role.PRIMARY

    async def _route(self, kind: str, arguments: dict[str, Any],
                     local: Callable[..., Awaitable[_Result]]) -> _Result:
        """Run ``local`` here if this node is the primary, else forward to the primary, whose answer
        is decoded into what ``local`` returns (_decode_forward_response).

        Here on the primary, a request of a runtime key its table no longer holds is 401 before anything
        runs: its own HTTP workers authenticate against the table the core last pushed them, which may lag
        a revocation the core applied (a forwarded request is checked so too: _serve_forward)."""
        if self._is_primary():
            self._refuse_gone_key(_runtime_key_of(arguments))
            try:
                return await local(**arguments)
            except NotPrimary:
                pass
        primary_id = self.node.replica.primary_id
        if primary_id is None or primary_id == self.node_id:
            raise Unavailable("no primary is known right now; retry shortly", no_effect=True)
        forwarded: _Result = await self._forward(primary_id, kind, arguments)
        return forwarded

    # ------------------------------------------------------------------ tokenize
    async def tokenize(self, principal: str, values: list[str], idempotency_key: str | None,
                       token_format: str = formats.OPAQUE, metadata_json: str | None = None,
                       ttl_seconds: int | None = None) -> Outcome:
        """Tokenize ``values`` in the active epoch. Version 2 options: ``token_format`` (opaque, card,
        digits), ``metadata_json`` (a JSON object's canonical text, validation.canonical_metadata) and
        ``ttl_seconds``; a request without them is exactly the version 1 request."""
        options = validate_options(token_format, metadata_json, ttl_seconds)
        if idempotency_key is None and not self._is_primary() and options.answerable_as_read:
            repeat = await self._repeat_on_backup(normalize_values(values, options.token_format), options)
            if repeat is not None:
                self._refuse_revoked_principal(principal)
                return repeat
        arguments = {"principal": principal, "values": values, "idempotency_key": idempotency_key}
        if options.extended:
            arguments.update(options.forwarded())
            return await self._route(TOKENIZE_EXTENDED, arguments, self._tokenize_extended_here)
        return await self._route(TOKENIZE, arguments, self._tokenize_here)

    async def _tokenize_extended_here(self, principal: str, values: list[str], idempotency_key: str | None,
                                      token_format: str, metadata_json: str | None,
                                      ttl_seconds: int | None) -> Outcome:
        return await self._tokenize_here(principal, values, idempotency_key,
                                         validate_options(token_format, metadata_json, ttl_seconds))

    async def _repeat_on_backup(self, values: list[str], options: TokenizeOptions | None = None) -> Outcome | None:
        """A backup answers a tokenize whose tokens all exist, with a read index from the primary.

        None when it cannot (a new value, a rotation meanwhile, no primary to
        ask, the read not confirmed): the request is then forwarded as a write.
        """
        epoch = self.node.store.active_epoch()
        if epoch == 0:
            return None
        try:
            tokens = await self._answer_as_read(epoch, values, options)
        except (NotPrimary, ServiceError):
            return None
        if tokens is None:
            return None
        self.node.metrics.record_tokenize_answered_as_read(len(tokens))
        return Outcome(200, _json({"epoch": epoch, "tokens": tokens}), False)

    async def _tokenize_here(self, principal: str, values: list[str], idempotency_key: str | None,
                             options: TokenizeOptions | None = None) -> Outcome:
        options = options or TokenizeOptions()
        values = normalize_values(values, options.token_format)
        fingerprint = None
        if idempotency_key is not None:
            # A version 1 request keeps its fingerprint; the options join it only when used.
            canonical = msgpack.packb([values, *options.forwarded().values()] if options.extended else values,
                                      use_bin_type=True)
            fingerprint = self.node.master_key.idempotency_fingerprint(principal, TOKENIZE, canonical)
        async with self._idempotency_slot(principal, idempotency_key, TOKENIZE, fingerprint) as replay:
            if replay is not None:
                return replay
            for _ in range(MAX_EPOCH_RETRIES):
                epoch = self.node.store.active_epoch()
                if epoch == 0:
                    raise Unavailable("the cluster has no active epoch yet; retry shortly")
                # FF1 tokens cost tens of microseconds each: computed once, for the read and the write,
                # a slice at a time (the loop serves other requests between).
                format_tokens = None
                if options.token_format != formats.OPAQUE:
                    format_keys = self.node.keyring.get(epoch).formats
                    format_tokens = await computed_in_slices(
                        functools.partial(format_keys.token_for, options.token_format), values)
                if idempotency_key is None and options.answerable_as_read:
                    tokens = await self._answer_as_read(epoch, values, options, format_tokens)
                    if tokens is not None:
                        self.node.metrics.record_tokenize_answered_as_read(len(tokens))
                        return Outcome(200, _json({"epoch": epoch, "tokens": tokens}), False)
                    if self.node.store.active_epoch() != epoch:
                        continue  # a rotation was applied meanwhile: recompute in the new epoch
                if idempotency_key is None and options.merges_with_ttl:
                    # A TTL request forwarded by a backup (or on a node without workers): sealed here, it
                    # joins the group commit as the requests a worker sealed do (tokenvault/api/coalesce.py).
                    items = await self._seal(epoch, values)
                    result = await self._coalescer.submit(epoch, list(items), options.ttl_seconds)
                else:
                    command = await self._tokenize_command(epoch, values, principal, idempotency_key,
                                                           fingerprint, options, format_tokens)
                    items = command.items
                    result = await self._propose(commands.encode_command(command))
                if result.outcome == ApplyOutcome.OK:
                    body = _json({"epoch": epoch, "tokens": [token for token, _ in items]})
                    return Outcome(200, body, False)
                if result.outcome == ApplyOutcome.DUPLICATE:
                    return self._replay(principal, idempotency_key, TOKENIZE, fingerprint)
                if result.outcome == ApplyOutcome.TOKEN_COLLISION:
                    raise _token_collision()
                # EPOCH_MISMATCH: a rotation was applied first; recompute in the new epoch.
            raise Unavailable("the active epoch kept changing; retry")

    async def tokenize_sealed(self, principal: str, epoch: int, values: list[str],
                              items: list[tuple[str, bytes]], options: TokenizeOptions | None = None,
                              metadata: list[bytes] | None = None) -> Outcome:
        """A tokenize an HTTP worker sealed already (no Idempotency-Key): ``items`` are the
        (token, ciphertext) pairs of ``values`` in ``epoch``, which must be the active epoch, in
        ``options.token_format``; ``metadata`` is ``options.metadata_json`` sealed per token.

        The core checks the epoch (EpochChanged if it is not the active one: the worker then sends
        the values to be sealed here) and re-seals the first value, as it does the sealer's answers;
        a difference is refused and logged. Then it is a tokenize as any other, with the tokens and
        ciphertexts computed already: answered as a read when every pair is stored (no HMAC or
        encryption here beyond the first value's check), else proposed on the primary through the
        coalescer; a backup that cannot answer it as a read forwards the values with their pairs
        (``tokenize.sealed``), and the primary runs this same method on them. A request with a format,
        a TTL or metadata goes on in ``_tokenize_sealed_extended``.
        """
        keyring = self.node.keyring
        if epoch != self.node.store.active_epoch() or epoch not in keyring:
            raise EpochChanged("the worker sealed in an epoch that is not the active one")
        keys = keyring.get(epoch)
        if options is not None and options.extended:
            return await self._tokenize_sealed_extended(principal, epoch, values, items, options, metadata)
        if len(items) != len(values) or metadata is not None or keys.seal(values[0]) != items[0]:
            log.error("worker.sealing_mismatch", epoch=epoch, items=len(items))
            raise Unavailable("the request was sealed inconsistently; it had no effect: retry", no_effect=True)
        tokens = [token for token, _ in items]
        found = self.node.store.lookup(tokens, _now_ms())
        if len(found) == len(set(tokens)) and all(found[token] == ciphertext for token, ciphertext in items):
            try:
                await self._read_barrier()
            except (NotPrimary, ServiceError):
                if self._is_primary():
                    raise
            else:
                if self.node.store.active_epoch() != epoch:
                    raise EpochChanged("a rotation was applied meanwhile")
                # Mappings can be deleted: what was found before the barrier must still be there after it.
                if len(self.node.store.lookup(tokens, _now_ms())) == len(found):
                    self._refuse_revoked_principal(principal)
                    self.node.metrics.record_tokenize_answered_as_read(len(tokens))
                    return Outcome(200, _json({"epoch": epoch, "tokens": tokens}), False)
        if not self._is_primary():
            if _sealed_forward_bytes(values, items) > _max_forwarded_sealed_bytes(self.node.config.limits):
                arguments: dict[str, Any] = {"principal": principal, "values": values, "idempotency_key": None}
                return await self._route(TOKENIZE, arguments, self._tokenize_here)
            arguments = {"principal": principal, "epoch": epoch, "values": values,
                         "items": [[token, ciphertext] for token, ciphertext in items]}
            return await self._route(TOKENIZE_SEALED, arguments, self._tokenize_sealed_here)
        self._refuse_revoked_principal(principal)  # this node's own workers' table may lag (_route)
        self.node.metrics.record_sealed("worker", len(items))
        result = await self._coalescer.submit(epoch, items)
        if result.outcome == ApplyOutcome.OK:
            return Outcome(200, _json({"epoch": epoch, "tokens": tokens}), False)
        raise EpochChanged("a rotation was applied first")

    async def _tokenize_sealed_here(self, principal: str, epoch: int, values: list[str],
                                    items: list[list[Any]]) -> Outcome:
        """``tokenize_sealed`` with the pairs as they travel (lists): a forwarded sealed tokenize, or
        one a backup meant to forward and runs itself because it became the primary meanwhile."""
        return await self.tokenize_sealed(principal, epoch, values, [(token, ciphertext) for token, ciphertext in items])

    async def _tokenize_sealed_extended(self, principal: str, epoch: int, values: list[str],
                                        items: list[tuple[str, bytes]], options: TokenizeOptions,
                                        metadata: list[bytes] | None) -> Outcome:
        """``tokenize_sealed`` for a card or digits request, or one with a TTL or metadata.

        The same checks with the format's own sealing: the values normalized here (a value that
        does not fit is the same 422 as when the core seals), the first one re-sealed in the format
        and, with metadata, its metadata ciphertext re-encrypted. Answered as a read exactly as the
        core-sealed path (``_answer_as_read``, with the worker's pairs), else proposed as ONE entry
        of its own, not merged (tokenvault.api.coalesce): an entry has one format, one expiry and
        one metadata rule, and TOKEN_COLLISION refuses a whole entry, so a merged request would
        fail for another's card token. The expiry is this core's clock, as when it seals itself.
        """
        keys = self.node.keyring.get(epoch)
        normalized = normalize_values(values, options.token_format)
        if options.token_format == formats.OPAQUE:
            first = keys.seal(normalized[0])
        else:
            first = keys.seal_format(options.token_format, normalized[0])
        document = None if options.metadata_json is None else options.metadata_json.encode("utf-8")
        if (len(items) != len(values) or first != items[0] or (metadata is None) != (document is None)
                or (metadata is not None and document is not None
                    and (len(metadata) != len(items) or keys.encrypt_metadata(first[0], document) != metadata[0]))):
            log.error("worker.sealing_mismatch", epoch=epoch, items=len(items))
            raise Unavailable("the request was sealed inconsistently; it had no effect: retry", no_effect=True)
        tokens = [token for token, _ in items]
        if options.answerable_as_read:
            try:
                answered = await self._answer_as_read(epoch, normalized, options, sealed=items)
            except (NotPrimary, ServiceError):
                if self._is_primary():
                    raise
                answered = None  # a backup without a read index: the primary answers the forward
            if answered is not None:
                self.node.metrics.record_tokenize_answered_as_read(len(answered))
                return Outcome(200, _json({"epoch": epoch, "tokens": answered}), False)
        if not self._is_primary():
            if (_sealed_forward_bytes(values, items, options.metadata_json, metadata)
                    <= _max_forwarded_sealed_bytes(self.node.config.limits, with_metadata=True)):
                arguments = {"principal": principal, "epoch": epoch, "values": values,
                             "items": [[token, ciphertext] for token, ciphertext in items], "metadata": metadata,
                             **options.forwarded()}
                return await self._route(TOKENIZE_SEALED_EXTENDED, arguments, self._tokenize_sealed_extended_here)
            arguments = {"principal": principal, "values": values, "idempotency_key": None, **options.forwarded()}
            return await self._route(TOKENIZE_EXTENDED, arguments, self._tokenize_extended_here)
        self._refuse_revoked_principal(principal)  # this node's own workers' table may lag (_route)
        self.node.metrics.record_sealed("worker", len(items))
        if options.merges_with_ttl:  # opaque, a TTL, no metadata: merged with others (coalesce.py)
            result = await self._coalescer.submit(epoch, items, options.ttl_seconds)
        else:
            command = await self._tokenize_command(
                epoch, normalized, principal, None, None, options,
                sealed=(tuple(items), None if metadata is None else tuple(metadata)))
            result = await self._propose(commands.encode_command(command))
        if result.outcome == ApplyOutcome.OK:
            return Outcome(200, _json({"epoch": epoch, "tokens": tokens}), False)
        if result.outcome == ApplyOutcome.TOKEN_COLLISION:
            raise _token_collision()
        raise EpochChanged("a rotation was applied first")

    async def _tokenize_sealed_extended_here(self, principal: str, epoch: int, values: list[str],
                                             items: list[list[Any]], token_format: str, metadata_json: str | None,
                                             ttl_seconds: int | None, metadata: list[bytes] | None) -> Outcome:
        """``tokenize_sealed`` of a request with a format, a TTL or metadata, as it travels: run by a
        backup that meant to forward it and became the primary meanwhile (the primary runs a forwarded
        one through ``_run_forwarded``)."""
        pairs = [(token, ciphertext) for token, ciphertext in items]
        return await self.tokenize_sealed(principal, epoch, values, pairs,
                                          validate_options(token_format, metadata_json, ttl_seconds), metadata)

    async def tokenize_read_point(self, epoch: int) -> int:
        """For a plain tokenize an HTTP worker answers as a read from its own view of the store (every pair
        stored already): a read barrier (a backup's read index), then ``epoch`` must still be
        the active one (EpochChanged otherwise: the worker takes the usual path), and the answer is this
        node's last removal index (Node.removal_index), which the worker's view must have applied
        before it answers. The store is not read here."""
        await self._read_barrier_anywhere()
        if self.node.store.active_epoch() != epoch:
            raise EpochChanged("the worker's epoch is not the active one")
        return self.node.removal_index

    async def _tokenize_command(self, epoch: int, values: list[str], principal: str, idempotency_key: str | None,
                                fingerprint: bytes | None, options: TokenizeOptions,
                                format_tokens: list[str] | None = None,
                                sealed: tuple[tuple[tuple[str, bytes], ...], tuple[bytes, ...] | None] | None = None,
                                ) -> commands.TokenizeCommand:
        """The log entry of a tokenize: tokens and ciphertexts, and for version 2 options the expiry
        time (from this node's clock, carried in the entry) and the metadata sealed per token.
        ``sealed``: the items and metadata a worker computed (checked by ``tokenize_sealed``)."""
        issued_at_ms = int(time.time() * 1000)
        metadata = None
        if sealed is not None:
            items, metadata = sealed
        elif options.token_format == formats.OPAQUE:
            items = await self._seal(epoch, values)
        else:
            keys = self.node.keyring.get(epoch)
            if format_tokens is None:
                items = tuple(keys.seal_format(options.token_format, value) for value in values)
            else:
                items = tuple((token, keys.encrypt(token, value)) for token, value in zip(format_tokens, values))
            self.node.metrics.record_sealed("node", len(items))
        if sealed is None and options.metadata_json is not None:
            keys = self.node.keyring.get(epoch)
            document = options.metadata_json.encode("utf-8")
            metadata = tuple(keys.encrypt_metadata(token, document) for token, _ in items)
        expires_at_ms = None if options.ttl_seconds is None else issued_at_ms + options.ttl_seconds * 1000
        return commands.TokenizeCommand(
            epoch=epoch, items=items, principal=principal, idempotency_key=idempotency_key,
            fingerprint=fingerprint, issued_at_ms=issued_at_ms, token_format=options.token_format,
            expires_at_ms=expires_at_ms, metadata=metadata)

    async def _answer_as_read(self, epoch: int, values: list[str], options: TokenizeOptions | None = None,
                              format_tokens: list[str] | None = None,
                              sealed: Sequence[tuple[str, bytes]] | None = None) -> list[str] | None:
        """The tokens of ``values`` in ``epoch`` when this tokenize can be answered as a read, else None.

        A tokenize whose (token, ciphertext) pairs are all stored already
        changes nothing, so it needs no log entry, only a read barrier (on a
        backup, a read index from the primary). The barrier makes this node's
        store reflect every write acknowledged before the request started, a
        rotation included, so the epoch check after it never misses an
        acknowledged rotation. Mappings are insert-once, so a token found
        before the barrier is still there after it, unless it expires
        meanwhile: then the answer is what the write path would give too (a
        request without a TTL leaves a live mapping's expiry as it is). Only the tokens are
        computed first (one HMAC per value), so a tokenize of new values pays
        one lookup; the ciphertexts (deterministic AES-SIV) are compared only
        when every token exists, and any difference leaves it to the write path. ``sealed``: the
        (token, ciphertext) pairs a worker computed (``tokenize_sealed`` checked the first), compared
        as they are, so nothing is computed here.
        """
        if not values:
            return None  # not a valid tokenize: the command's own checks answer it
        keys = self.node.keyring.get(epoch)
        token_format = formats.OPAQUE if options is None else options.token_format
        if sealed is not None:
            tokens = [token for token, _ in sealed]
        elif token_format == formats.OPAQUE:
            tokens = [keys.token_for(value) for value in values]
        else:
            tokens = format_tokens or [keys.formats.token_for(token_format, value) for value in values]
        if token_format == formats.OPAQUE:
            found = self.node.store.lookup(tokens, _now_ms())
        else:
            found = self.node.store.lookup_format(epoch, tokens, _now_ms())
        if len(found) != len(set(tokens)):
            return None
        ciphertexts = ((ciphertext for _, ciphertext in sealed) if sealed is not None
                       else (keys.encrypt(token, value) for token, value in zip(tokens, values)))
        if any(found[token] != ciphertext for token, ciphertext in zip(tokens, ciphertexts)):
            return None
        await self._read_barrier()
        if self.node.store.active_epoch() != epoch:
            return None
        # Mappings can be deleted: what was found before the barrier must still be there after it.
        if token_format == formats.OPAQUE:
            still = self.node.store.lookup(tokens, _now_ms())
        else:
            still = self.node.store.lookup_format(epoch, tokens, _now_ms())
        return tokens if len(still) == len(found) else None

    async def _seal(self, epoch: int, values: list[str]) -> tuple[tuple[str, bytes], ...]:
        """The (token, ciphertext) pairs of ``values`` in ``epoch``: by the sealer process
        when it takes the batch, else here (same keys, same code, same result)."""
        keys = self.node.keyring.get(epoch)
        sealer = self._sealer
        if sealer is not None and sealer.wants(len(values)):
            try:
                items = await sealer.seal(keys, values)
            except SealerUnavailable:
                pass
            else:
                self.node.metrics.record_sealed("helper", len(items))
                return items
        items = tuple(keys.seal_many(values))
        self.node.metrics.record_sealed("node", len(items))
        return items

    async def _propose(self, payload: bytes, timeout_seconds: float | None = None) -> ApplyResult:
        """Propose one command; ``timeout_seconds`` (default: the request timeout) bounds the wait."""
        try:
            return await self.node.propose(payload, self._timeout_seconds if timeout_seconds is None
                                           else timeout_seconds)
        except (asyncio.TimeoutError, ProposalOutcomeUnknown):
            raise Unavailable("the write was not confirmed by a majority in time; it may still take effect "
                              "(once): retry, ideally with an Idempotency-Key") from None
        except ProposalLost:
            raise Unavailable("the primary changed before the write committed; it had no effect",
                              no_effect=True) from None
        except NodeBusy:
            raise Overloaded("the primary's work queue is full; the write had no effect: retry later") from None
        except EntryTooLarge as too_large:
            raise PayloadTooLarge(f"the request needs a log entry of {too_large.size} bytes, over the log's "
                                  f"{too_large.bound}-byte bound; it had no effect: send fewer or smaller values, "
                                  "or less metadata") from None
        except ProposalRejected as rejected:
            raise Overloaded(f"the primary refused the write ({rejected.reason}); it had no effect: "
                             "retry later") from None

    # ------------------------------------------------------------------ idempotency
    def _idempotency_slot(self, principal: str, idempotency_key: str | None, kind: str,
                          fingerprint: bytes | None) -> _IdempotencySlot:
        return _IdempotencySlot(self, principal, idempotency_key, kind, fingerprint)

    def _replay(self, principal: str, idempotency_key: str | None, kind: str, fingerprint: bytes | None) -> Outcome:
        record = self.node.store.idempotency_get(principal, idempotency_key) if idempotency_key else None
        if record is None:
            raise Unavailable("the first request with this Idempotency-Key is not visible yet; retry")
        if record.kind != kind or record.fingerprint != fingerprint:
            raise IdempotencyMismatch()
        return Outcome(record.status, record.response, True)

    # ------------------------------------------------------------------ detokenize
    async def detokenize(self, tokens: list[str], actor: commands.Actor | None = None) -> list[str | None]:
        """The values of ``tokens``, answered only once the audit record of this detokenize is committed.

        A token found in this node's store is answered only once the node has applied everything
        committed before the request started (mappings can be deleted): with the audit trail on, the
        record's own entry is that point — it commits after the request started, so once this node
        has applied it, any delete or epoch destroy acknowledged before is applied here too, and the
        tokens are looked up again (a deleted one reads null, one of an epoch destroyed meanwhile too:
        its keys are gone, though its row may still be there); with it off (or an index unknown), a
        read barrier."""
        self._refuse_key_gone(actor)
        found = self.node.store.lookup(tokens, _now_ms())
        values = await self._detokenize(tokens, found, barrier=self._audit is None)
        index = await self._audit_detokenize(values, actor, None)
        await self._refuse_revoked_key(actor, index, any(value is not None for value in values))
        if found and self._audit is not None:
            await self._caught_up_to(index)
            still = self._still_live(list(found), None, _now_ms())
            values = [None if token in found and token not in still else value for token, value in zip(tokens, values)]
        return values

    async def reveal(self, tokens: list[str], actor: commands.Actor | None = None, epoch: int | None = None,
                     include_metadata: bool = False, masked: bool = False) -> dict[str, Any]:
        """Detokenize with the version 2 options: card and digits tokens resolved in ``epoch`` (default:
        the active epoch, after a read barrier), expired mappings as null, ``{"values": [...]}`` plus
        metadata when asked, and with ``masked`` every value masked (formats.mask_value) before it
        leaves this method; metadata comes as ``"metadata_json"``, each mapping's canonical JSON text or
        None. Audited like ``detokenize``; a masked reveal's record says "masked"."""
        self._refuse_key_gone(actor)
        found, local, epoch = await self._lookup_mappings(tokens, epoch, include_metadata,
                                                          barrier=self._audit is None)
        values = [found[token][0] if token in found else None for token in tokens]
        found_count = sum(value is not None for value in values)
        self.node.metrics.record_detokenized(found_count, len(values) - found_count)
        index = await self._audit_detokenize(values, actor, MASKED_SUBJECT if masked else None)
        await self._refuse_revoked_key(actor, index, found_count > 0)
        if local and self._audit is not None:
            # As in detokenize: what this node found itself is answered once it applied the record's own
            # entry, and looked up again (the primary answered the rest after its own read barrier).
            await self._caught_up_to(index)
            still = self._still_live(sorted(local), epoch, _now_ms())
            found = {token: pair for token, pair in found.items() if token not in local or token in still}
            if include_metadata:
                # Read again: a tokenize acknowledged before the request started may have replaced a
                # mapping's metadata since the first read.
                now = self._read_metadata(sorted(local & still), epoch)
                found = {token: (pair[0], now.get(token)) if token in local else pair for token, pair in found.items()}
            values = [found[token][0] if token in found else None for token in tokens]
        if masked:
            values = [None if value is None else formats.mask_value(value) for value in values]
        document: dict[str, Any] = {"values": values}
        if include_metadata:
            # Canonical JSON text, not objects: plain strings cross any process boundary unchanged.
            document["metadata_json"] = [found[token][1] if token in found else None for token in tokens]
        return document

    async def detokenize_read_point(self, items: int, found: int, actor: commands.Actor, *, masked: bool = False,
                                    active_epoch: int | None = None, metadata: bool = False) -> int:
        """For a detokenize (or a reveal) an HTTP worker answers from its own view of the store
        (tokenvault.core.store_reader): commit its audit record (``items`` tokens asked, ``found`` of them
        in the worker's view; "masked" for a masked reveal), catch up to that record's entry, which
        commits after the request started (with the audit trail off, a read barrier instead), and return
        the last index at which this node removed or made unreadable any mapping (Node.removal_index), as
        of then. ``active_epoch``: the worker resolved card and digits tokens in that epoch as the active
        one; it must still be, after a read barrier as ``reveal`` takes (EpochChanged before anything is
        written otherwise: the worker sends the request to ``reveal``).

        The worker's view only needs to have applied that index: entries after it only add mappings (or
        lengthen their lives), so a token live in a view at or past it is live now, and one the view
        lacks is asked of the core. Deletes and destroys are rare, so the view seldom has to catch up.
        ``metadata``: the worker answers metadata too, which a later tokenize may have replaced: the index
        returned is then also at or past the last that did (Node.metadata_index)."""
        self._refuse_key_gone(actor)
        if active_epoch is not None:
            await self._read_barrier_anywhere()
            if self.node.store.active_epoch() != active_epoch:
                raise EpochChanged("the worker's epoch is not the active one")
        index = await self._audit_counts(items, found, actor, MASKED_SUBJECT if masked else None)
        await self._caught_up_to(index)
        await self._refuse_revoked_key(actor, index)
        return max(self.node.removal_index, self.node.metadata_index) if metadata else self.node.removal_index

    async def _audit_detokenize(self, values: list[str | None], actor: commands.Actor | None,
                                subject: str | None) -> int | None:
        """Commit the audit record of a detokenize or reveal; the log index of its entry (None when the
        audit trail is off or the primary did not say)."""
        return await self._audit_counts(len(values), sum(value is not None for value in values), actor, subject)

    async def _audit_counts(self, items: int, found: int, actor: commands.Actor | None,
                            subject: str | None) -> int | None:
        if self._audit is None:
            return None
        actor = actor or commands.NO_ACTOR
        record = commands.AuditRecord(
            at_ms=int(time.time() * 1000), node=self.node_id, key_name=actor.name, key_id=actor.key_id,
            action="detokenize", items=items, found=found, request_id=actor.request_id, subject=subject)
        try:
            return await self._audit.append(record)
        except AuditUnavailable as error:
            raise Unavailable(f"{error}; the values were not returned (every detokenize is audited)") from None

    def _refuse_gone_key(self, key_id: str | None) -> None:
        """401 when the runtime key ``key_id`` (None: a bootstrap key, never checked) is not in this node's
        table now: the one check every revocation path below makes, at its own moment."""
        if key_id is not None and self.node.store.api_key(key_id) is None:
            raise revoked_key()

    def _refuse_key_gone(self, actor: commands.Actor | None) -> None:
        """401 at once, before anything is looked up or audited, when the runtime key that sent the request
        is no longer in this node's table (a revocation this node has applied since the HTTP layer, or a
        worker whose table lagged, authenticated it)."""
        self._refuse_gone_key(None if actor is None else actor.key_id)

    async def _refuse_revoked_key(self, actor: commands.Actor | None, index: int | None,
                                  anything_found: bool = True) -> None:
        """401 when the runtime key that sent a detokenize, reveal or re-tokenize is no longer in this
        node's table once it has applied ``index``, the entry of the request's audit record: the HTTP layer
        authenticated the key against the table as it was, which may not hold a revocation acknowledged
        before the request started yet (a node catching up, a slow one); that entry comes after it. With
        the audit trail off (no index) the table as of the read barrier the lookup took is checked. When
        nothing was found (``anything_found`` false: every value null) there is nothing to withhold, and
        the request does not wait for its entry."""
        if actor is None or actor.key_id is None or not anything_found:
            return
        if index is not None:
            await self._caught_up_to(index)
        self._refuse_key_gone(actor)

    def _refuse_revoked_principal(self, principal: str) -> None:
        """401 when a tokenize answered as a read here, after its read barrier (so with every revocation
        acknowledged before the request started applied), comes from a runtime key no longer in the table."""
        self._refuse_gone_key(auth.runtime_key_id_of_identity(principal))

    async def _refuse_revoked_key_id(self, key_id: str | None) -> None:
        """401 when the runtime key ``key_id`` (None: a bootstrap key, never checked) is not in this node's
        table after a read barrier (a backup's read index), which applies every revocation acknowledged
        before the request started: for the requests that reach the primary naming no key (admin reads,
        membership changes), which the primary cannot check (docs/security.md, "Revocation")."""
        if key_id is None:
            return
        await self._read_barrier_anywhere()
        self._refuse_gone_key(key_id)

    async def _refuse_forwarded_revoked_key(self, key_id: str | None) -> None:
        """On the primary: 401 for a forwarded request of a runtime key it no longer holds. The backup
        authenticated the key against the table it has applied, which may lag a revocation; a key created
        a moment ago that this node has not applied yet is not refused (checked again after a read barrier)."""
        if key_id is None or self.node.store.api_key(key_id) is not None:
            return
        await self._read_barrier()
        self._refuse_gone_key(key_id)

    async def _lookup_mappings(self, tokens: list[str], epoch: int | None, include_metadata: bool, *,
                               barrier: bool = False
                               ) -> tuple[dict[str, tuple[str, str | None]], set[str], int | None]:
        """token -> (value, metadata JSON text or None) for the live mappings among ``tokens``: found
        here, or else asked of the primary (a backup answers only what it has applied); the tokens
        found here; and the epoch format tokens were resolved in. ``barrier``: mappings found here are
        read again after a read barrier (mappings can be deleted; with the audit trail on, the caller
        waits for the audit entry instead)."""
        if epoch is None and any(not is_token(token) for token in tokens):
            # Format tokens carry no epoch: "the active one" is the one as of a read barrier.
            await self._read_barrier_anywhere()
            epoch = self.node.store.active_epoch() or None
        found = self._read_mappings(tokens, epoch, include_metadata, _now_ms())
        if found and barrier:
            await self._caught_up_to(None)
            found = self._read_mappings(tokens, epoch, include_metadata, _now_ms())
        local = set(found)
        missing = sorted({token for token in tokens if token not in found})
        if missing:
            arguments = {"tokens": missing, "epoch": epoch, "include_metadata": include_metadata}
            answered = await self._route(REVEAL, arguments, self._reveal_missing_here)
            for token, pair in answered.items():
                # A pair is [value, metadata JSON text or None]; the primary never answers a None value.
                if pair is not None and token in missing and pair[0] is not None:
                    found[token] = (pair[0], pair[1])
        return found, local, epoch

    async def _reveal_missing_here(self, tokens: list[str], epoch: int | None,
                                   include_metadata: bool) -> dict[str, list[str | None] | None]:
        """On the primary: confirm leadership and catch up, then look the tokens up again."""
        await self._read_barrier()
        if epoch is None:
            epoch = self.node.store.active_epoch() or None
        found = self._read_mappings(tokens, epoch, include_metadata, _now_ms())
        return {token: list(found[token]) if token in found else None for token in tokens}

    def _still_live(self, tokens: list[str], epoch: int | None, now_ms: int) -> set[str]:
        """Which of ``tokens``, found and decrypted here before, are still live mappings here whose
        epoch's keys this node still holds (a destroyed epoch's rows may outlive its keys a while):
        the second look of a detokenize or reveal after its audit entry, without decrypting again.
        ``epoch``: the one card and digits tokens were resolved in."""
        store, keyring = self.node.store, self.node.keyring
        opaque = [token for token in tokens if is_token(token)]
        live = {token for token in store.lookup(opaque, now_ms) if parse_token(token).epoch in keyring}
        formatted = [token for token in tokens if not is_token(token)]
        if formatted and epoch is not None and epoch in keyring:
            live.update(store.lookup_format(epoch, formatted, now_ms))
        return live

    def _read_mappings(self, tokens: list[str], epoch: int | None, include_metadata: bool,
                       now_ms: int) -> dict[str, tuple[str, str | None]]:
        """This node's live mappings among ``tokens``, decrypted; metadata only when asked."""
        store = self.node.store
        opaque = [token for token in tokens if is_token(token)]
        found: dict[str, tuple[str, str | None]] = {}
        for token, ciphertext in store.lookup(opaque, now_ms).items():
            value = self._decrypt(token, ciphertext)
            if value is not None:
                found[token] = (value, None)
        formatted = [token for token in tokens if not is_token(token)]
        if formatted and epoch is not None:
            for token, ciphertext in store.lookup_format(epoch, formatted, now_ms).items():
                value = self._decrypt(token, ciphertext, epoch)
                if value is not None:
                    found[token] = (value, None)
        if include_metadata and found:
            for token, metadata in self._read_metadata(list(found), epoch).items():
                found[token] = (found[token][0], metadata)
        return found

    def _read_metadata(self, tokens: list[str], epoch: int | None) -> dict[str, str | None]:
        """The metadata of those of ``tokens`` that have any here, decrypted (None where it does not
        decrypt); card and digits tokens of ``epoch``."""
        store = self.node.store
        metadata: dict[str, str | None] = {}
        opaque = [token for token in tokens if is_token(token)]
        for token, ciphertext in store.metadata(None, opaque).items():
            metadata[token] = self._decrypt_metadata(parse_token(token).epoch, token, ciphertext)
        formatted = [token for token in tokens if not is_token(token)]
        if epoch is not None and formatted:
            for token, ciphertext in store.metadata(epoch, formatted).items():
                metadata[token] = self._decrypt_metadata(epoch, token, ciphertext)
        return metadata

    def _decrypt_metadata(self, epoch: int, token: str, ciphertext: bytes) -> str | None:
        if epoch not in self.node.keyring:
            return None
        try:
            return self.node.keyring.get(epoch).decrypt_metadata(token, ciphertext).decode("utf-8")
        except (DecryptError, UnicodeDecodeError):
            METADATA_CORRUPT.add(1, epoch)
            return None

    async def _read_barrier_anywhere(self) -> None:
        """A read barrier here, on the primary or a backup (a backup's read index); 503 without a primary."""
        try:
            await self._read_barrier()
        except NotPrimary:
            raise Unavailable("no primary is known right now; retry shortly", no_effect=True) from None

    async def _caught_up_to(self, index: int | None) -> None:
        """This node has applied ``index`` (an entry committed after the request started), else a read barrier."""
        try:
            if index is None:
                await self._read_barrier()
            else:
                await self.node.wait_applied(index, self._timeout_seconds)
        except NotPrimary:
            raise Unavailable("no primary is known right now; retry shortly", no_effect=True) from None
        except asyncio.TimeoutError:
            raise Unavailable("this node did not catch up with the primary in time") from None

    async def _write_audit(self, records: tuple[commands.AuditRecord, ...]) -> int | None:
        """Commit one batch of this node's audit records: proposed here on the primary, else forwarded.
        Returns the log index of the entry that holds them (None if the primary did not say)."""
        arguments = {"records": [record.fields() for record in records]}
        outcome = await self._route(AUDIT, arguments, self._audit_here)
        try:
            index = json.loads(outcome.body).get("index")
        except (ValueError, AttributeError):
            return None
        return index if type(index) is int and index > 0 else None

    async def _audit_here(self, records: Sequence[commands.AuditRecord | list[Any]]) -> Outcome:
        command = commands.AuditCommand(records=tuple(
            record if isinstance(record, commands.AuditRecord) else commands.AuditRecord(*record)
            for record in records))
        result = await self._propose(commands.encode_command(command))
        if result.outcome != ApplyOutcome.OK:
            raise Unavailable("the audit records were not applied")
        return Outcome(200, _json({"index": result.index}), False)

    async def _detokenize(self, tokens: list[str], found: dict[str, bytes], *, barrier: bool) -> list[str | None]:
        if found and barrier:
            # Mappings can be deleted (and epochs destroyed), so a token found here is answered only
            # after a read barrier: a delete acknowledged before this request started is applied here
            # by then, on a backup, a new primary or a deposed one alike (docs/api.md, "Lifecycle").
            await self._caught_up_to(None)
            found = self.node.store.lookup(tokens, _now_ms())
        missing = sorted({token for token in tokens if token not in found})
        plain: dict[str, str | None] = {}
        if missing:
            plain = await self._route(DETOKENIZE, {"tokens": missing}, self._detokenize_missing_here)
        values: list[str | None] = []
        for token in tokens:
            ciphertext = found.get(token)
            values.append(self._decrypt(token, ciphertext) if ciphertext is not None else plain.get(token))
        found_count = sum(value is not None for value in values)
        self.node.metrics.record_detokenized(found_count, len(values) - found_count)
        return values

    async def _detokenize_missing_here(self, tokens: list[str]) -> dict[str, str | None]:
        """On the primary: confirm leadership and catch up, then look the tokens up again."""
        await self._read_barrier()
        found = self.node.store.lookup(tokens, _now_ms())
        return {token: self._decrypt(token, found[token]) if token in found else None for token in tokens}

    async def _read_barrier(self) -> None:
        try:
            await self.node.read_barrier(self._timeout_seconds)
        except asyncio.TimeoutError:
            raise Unavailable("could not confirm a majority in time") from None
        except NodeBusy:
            raise Overloaded("the primary's work queue is full; retry later") from None

    def _decrypt(self, token: str, ciphertext: bytes, epoch: int | None = None) -> str | None:
        """The value of a stored mapping; ``epoch`` for card and digits tokens, which carry none."""
        if epoch is None:
            epoch = parse_token(token).epoch
        if epoch not in self.node.keyring:
            return None
        try:
            return self.node.keyring.get(epoch).decrypt(token, ciphertext)
        except DecryptError:
            # Only corrupt storage gets here; the mapping is unusable, so it reads as unknown
            # and the operator is told loudly (without the token or any data).
            CIPHERTEXT_CORRUPT.add(1, epoch)
            return None

    # ------------------------------------------------------------------ epochs
    async def rotate_epoch(self, principal: str, idempotency_key: str | None,
                           actor: commands.Actor | None = None) -> Outcome:
        arguments = {"principal": principal, "idempotency_key": idempotency_key,
                     "actor": (actor or commands.NO_ACTOR).fields()}
        return await self._route(ROTATE, arguments, self._rotate_here)

    async def _rotate_here(self, principal: str, idempotency_key: str | None,
                           actor: list[Any] | None = None) -> Outcome:
        fingerprint = None
        if idempotency_key is not None:
            fingerprint = self.node.master_key.idempotency_fingerprint(principal, ROTATE, b"{}")
        async with self._idempotency_slot(principal, idempotency_key, ROTATE, fingerprint) as replay:
            if replay is not None:
                return replay
            for _ in range(MAX_EPOCH_RETRIES):
                epoch = self.node.store.active_epoch() + 1
                command = commands.RotateEpochCommand(
                    epoch=epoch, wrapped_secret=self._wrap_new_secret(epoch),
                    created_at_ms=int(time.time() * 1000), principal=principal,
                    idempotency_key=idempotency_key, fingerprint=fingerprint, actor=_actor(actor))
                result = await self._propose(commands.encode_command(command))
                if result.outcome == ApplyOutcome.OK:
                    return Outcome(201, _json({"epoch": epoch}), False)
                if result.outcome == ApplyOutcome.DUPLICATE:
                    return self._replay(principal, idempotency_key, ROTATE, fingerprint)
                # STALE_EPOCH: another rotation won this number; take the next one.
            raise Unavailable("concurrent rotations kept racing; retry")

    def _wrap_new_secret(self, epoch: int) -> bytes:
        """A fresh epoch secret wrapped by the master key; a PKCS#11 token that fails
        (removed, logged out) makes the rotation 503, with nothing proposed."""
        try:
            return self.node.master_key.wrap_epoch_secret(epoch, new_epoch_secret())
        except KeyCustodyError as error:
            log.error("epoch.wrap_failed", reason=str(error)[:300])
            raise Unavailable("the master key's token cannot wrap a new epoch secret right now; retry") from None

    async def list_epochs(self, key_id: str | None = None) -> dict[str, Any]:
        """``key_id``: the runtime key that asked (None: a bootstrap key), checked here (_refuse_revoked_key_id)."""
        await self._refuse_revoked_key_id(key_id)
        return await self._route(EPOCHS, {}, self._list_epochs_here)

    async def _list_epochs_here(self) -> dict[str, Any]:
        await self._read_barrier()
        records = self.node.store.epochs()
        return {"active_epoch": self.node.store.active_epoch(),
                "epochs": [{"epoch": record.epoch, "created_at": _rfc3339(record.created_at_ms),
                            "state": record.state} for record in records]}

    # ------------------------------------------------------------------ runtime API keys
    async def create_key(self, name: str, scopes: list[str], actor: commands.Actor) -> Outcome:
        """Create a runtime key on the primary; the answer holds the key, which is never stored."""
        arguments = {"name": name, "scopes": sorted(set(scopes)), "actor": actor.fields()}
        return await self._route(CREATE_KEY, arguments, self._create_key_here)

    async def _create_key_here(self, name: str, scopes: list[str], actor: list[Any]) -> Outcome:
        if len(self.node.store.api_keys()) >= MAX_RUNTIME_KEYS:
            raise KeyLimitReached(f"the cluster holds {MAX_RUNTIME_KEYS} runtime API keys; revoke one first")
        key_id, key, salt, digest = auth.new_runtime_key()
        created_at_ms = int(time.time() * 1000)
        command = commands.CreateApiKeyCommand(key_id=key_id, name=name, scopes=tuple(sorted(set(scopes))),
                                               salt=salt, digest=digest, created_at_ms=created_at_ms,
                                               actor=_actor(actor))
        result = await self._propose(commands.encode_command(command))
        if result.outcome == ApplyOutcome.KEY_LIMIT:
            raise KeyLimitReached(f"the cluster holds {MAX_RUNTIME_KEYS} runtime API keys; revoke one first")
        if result.outcome != ApplyOutcome.OK:
            raise Unavailable("the new key could not be recorded; no key was created", no_effect=True)
        body = {"id": key_id, "name": name, "scopes": list(command.scopes),
                "created_at": _rfc3339(created_at_ms), "key": key}
        log.info("api_key.created", key_id=key_id, scopes=list(command.scopes))
        return Outcome(201, _json(body), False)

    async def revoke_key(self, key_id: str, actor: commands.Actor) -> Outcome:
        arguments = {"key_id": key_id, "actor": actor.fields()}
        return await self._route(REVOKE_KEY, arguments, self._revoke_key_here)

    async def _revoke_key_here(self, key_id: str, actor: list[Any]) -> Outcome:
        command = commands.RevokeApiKeyCommand(key_id=key_id, revoked_at_ms=int(time.time() * 1000),
                                               actor=_actor(actor))
        result = await self._propose(commands.encode_command(command))
        if result.outcome == ApplyOutcome.KEY_NOT_FOUND:
            raise NotFound("no runtime API key has this id (it may have been revoked already)")
        if result.outcome != ApplyOutcome.OK:
            raise Unavailable("the revocation could not be recorded")
        log.info("api_key.revoked", key_id=key_id)
        return Outcome(200, _json({"id": key_id, "revoked": True}), False)

    async def list_keys(self, key_id: str | None = None) -> dict[str, Any]:
        """``key_id``: the runtime key that asked (None: a bootstrap key), checked here (_refuse_revoked_key_id)."""
        await self._refuse_revoked_key_id(key_id)
        return await self._route(LIST_KEYS, {}, self._list_keys_here)

    async def _list_keys_here(self) -> dict[str, Any]:
        await self._read_barrier()
        return {"keys": [{"id": entry.key_id, "name": entry.name, "scopes": sorted(entry.scopes),
                          "created_at": _rfc3339(entry.created_at_ms)} for entry in self.node.store.api_keys()]}

    # ------------------------------------------------------------------ audit trail
    async def audit_page(self, after: int, limit: int) -> dict[str, Any]:
        """This node's applied audit records after ``after``: never forwarded, so a verifier can read
        each node's own copy of the chain.

        ``next_after`` is null on the last page: one with fewer than ``limit`` records (none included) or
        one that reaches the head. A page is never continued past a short one, even when the head names a
        later record: those records are missing (cut off on disk), and the verifier, at the end of its
        walk, compares the last record it checked with ``last_seq`` and reports them."""
        records = self.node.store.audit_page(after, limit)
        last = records[-1]["seq"] if records else after
        anchor_seq, anchor_hash = self.node.store.audit_anchor
        head = self.node.store.audit_seq
        return {"records": records, "last_seq": head,
                "next_after": last if len(records) == limit and last < head else None,
                # After a trim the first record links to the hash of the last one dropped.
                "anchor": {"seq": anchor_seq, "hash": anchor_hash.hex()} if anchor_seq else None}

    async def cluster_view(self) -> dict[str, Any]:
        """Every member of the configuration in effect here (and this node, if it is not one), as this
        node sees them; ``voter`` is false for a learner."""
        replica = self.node.replica
        progress = replica.progress() if replica.role == Role.PRIMARY else {}
        transport = self.node.transport
        static = {member.id: member for member in self.node.config.members}
        members = [(member.node_id, member.address, member.voter) for member in replica.membership.members]
        if self.node_id not in {node_id for node_id, _, _ in members}:
            members.append((self.node_id, "", False))
        nodes = []
        for node_id, address, voter in members:
            is_self = node_id == self.node_id
            if is_self:
                role = self.node.role_name()
            else:
                role = "primary" if node_id == replica.primary_id else "backup"
            entry: dict[str, Any] = {
                "id": node_id, "role": role, "voter": voter, "is_self": is_self,
                "reachable": is_self or (transport is not None and transport.is_connected(node_id))}
            configured = static.get(node_id)
            if configured is not None:
                entry["http_url"] = configured.http_url
            if address:
                entry["peer_addr"] = address
            elif configured is not None:
                entry["peer_addr"] = configured.peer_addr
            if node_id in progress:
                match_index, next_index = progress[node_id]
                entry.update(match_index=match_index, next_index=next_index)
            if is_self:
                entry.update(view=replica.view, commit_index=replica.commit_index,
                             applied_index=self.node.store.applied_index,
                             active_epoch=self.node.store.active_epoch())
            nodes.append(entry)
        return {"node_id": self.node_id, "view": replica.view, "primary_id": replica.primary_id, "nodes": nodes}

    # ------------------------------------------------------------------ backup
    async def open_backup(self) -> BackupStream:
        """A consistent checkpoint of this node's own store, never forwarded: on a backup node it holds a
        committed prefix of the log that may lag the primary's a little."""
        return await BackupStream.open(self.node.store, self.node.data_dir / BACKUP_WORK_DIR_NAME,
                                       self.node.shredder)

    # ------------------------------------------------------------------ forwarding
    async def _forward(self, primary_id: str, kind: str, arguments: dict[str, Any]) -> Any:
        """The primary's answer to a forwarded call, decoded by kind (_decode_forward_response)."""
        if len(self._forwards_waiting) >= MAX_FORWARDS_IN_FLIGHT:
            raise Unavailable("too many requests are being forwarded to the primary", no_effect=True)
        body = msgpack.packb(arguments, use_bin_type=True)
        if len(body) > MAX_FORWARDED_FRAME_BODY_BYTES:
            raise PayloadTooLarge(f"the request is too large to forward to the primary ({len(body)} bytes, over "
                                  f"the peer links' {MAX_FORWARDED_FRAME_BODY_BYTES}-byte bound); it had no effect: "
                                  "send fewer values, or send it to the primary")
        request_id = next(self._forward_ids)
        future: asyncio.Future[ForwardResponse] = asyncio.get_running_loop().create_future()
        self._forwards_waiting[request_id] = (primary_id, future)
        try:
            if not self.node.send_to_peer(primary_id, ForwardRequest(request_id=request_id, kind=kind, body=body)):
                if self.node.is_linked(primary_id):  # linked, but the link's send queue is full
                    raise Overloaded("the link to the primary is full; the request had no effect: retry later")
                raise Unavailable("the primary is not reachable from this node right now", no_effect=True)
            response: ForwardResponse = await await_future(future, self._timeout_seconds + 1)
        except asyncio.TimeoutError:
            raise Unavailable("the primary did not answer in time; the request takes effect at most once") from None
        finally:
            self._forwards_waiting.pop(request_id, None)
        return _decode_forward_response(kind, response)

    def _on_forward_response(self, sender: str, response: ForwardResponse) -> None:
        waiting = self._forwards_waiting.get(response.request_id)
        if waiting is not None and waiting[0] == sender and not waiting[1].done():
            waiting[1].set_result(response)

    def _on_peer_down(self, peer_id: str) -> None:
        """The link to a peer dropped: requests forwarded there will never be answered."""
        for destination, future in self._forwards_waiting.values():
            if destination == peer_id and not future.done():
                future.set_exception(Unavailable("the link to the primary dropped while it handled this "
                                                 "request; it took effect at most once: retry"))

    def _on_forward_request(self, sender: str, request: ForwardRequest) -> None:
        size = len(request.body)
        if len(self._forward_tasks) >= MAX_FORWARDS_SERVED or (
                self._forward_tasks and self._forward_bytes_served + size > self._max_forward_bytes_served):
            # Bounded like the sender's side, in requests and in bytes: a peer cannot make this node hold
            # unbounded work (one body alone is always taken: the frame bound caps it).
            status, body, headers = _forward_answer(
                Overloaded("the primary is serving too many forwarded requests; retry later"))
            self.node.send_to_peer(sender, ForwardResponse(request_id=request.request_id, status=status,
                                                           body=body, headers=headers))
            return
        task = asyncio.get_running_loop().create_task(self._serve_forward(sender, request))
        self._forward_tasks.add(task)
        self._forward_bytes_served += size
        task.add_done_callback(functools.partial(self._forward_served, size))

    def _forward_served(self, size: int, task: asyncio.Task[None]) -> None:
        self._forward_tasks.discard(task)
        self._forward_bytes_served -= size

    async def _serve_forward(self, sender: str, request: ForwardRequest) -> None:
        """Answer a backup's forwarded request here; never forward again (no loops)."""
        headers: tuple[tuple[str, str], ...]
        status, body, headers = 503, b"", ()
        try:
            status, body, headers = await self._run_forwarded(request, sender)
        except ServiceError as error:
            status, body, headers = _forward_answer(error)
        except NotPrimary:
            status, body, headers = _forward_answer(Unavailable("the node asked is no longer the primary; retry",
                                                                no_effect=True))
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            status, body, headers = _forward_answer(InvalidRequest("malformed forwarded request"))
        except Exception:
            # Answered at once rather than leaving the backup to time out (logged as the HTTP layer does).
            log.exception("forward.unexpected_error", kind=request.kind[:32])
            status, body, headers = _forward_answer(Unavailable("the primary could not serve this request; retry"))
        if len(body) > MAX_FORWARDED_FRAME_BODY_BYTES:
            # Over the peer link it would close the link; the request was served (a read), the answer cannot go.
            status, body, headers = _forward_answer(PayloadTooLarge(
                f"the answer ({len(body)} bytes) is too large to carry back over the peer links; ask for fewer "
                "items at a time, or ask the primary"))
        self.node.send_to_peer(sender, ForwardResponse(request_id=request.request_id, status=status,
                                                       body=body, headers=headers))

    async def _run_forwarded(self, request: ForwardRequest, sender: str
                             ) -> tuple[int, bytes, tuple[tuple[str, str], ...]]:
        """Run a backup's forwarded request after the same checks the HTTP layer makes (validation.py):
        a peer is authenticated, but what it forwards is still a client's request."""
        if not self._is_primary():
            raise NotPrimary(self.node.replica.primary_id)
        limits = self.node.config.limits
        if request.kind not in FORWARDED_MEMBERS:
            raise InvalidRequest("a forwarded request of an unknown kind")
        if request.kind == TOKENIZE_SEALED:
            max_bytes = _max_forwarded_sealed_bytes(limits)
        elif request.kind == TOKENIZE_SEALED_EXTENDED:
            max_bytes = _max_forwarded_sealed_bytes(limits, with_metadata=True)
        else:
            max_bytes = _max_forwarded_bytes(limits)
        arguments = _forwarded_arguments(request, FORWARDED_MEMBERS[request.kind], max_bytes)
        if "actor" in arguments:
            arguments["actor"] = _actor_of_peer(arguments["actor"], sender)
        await self._refuse_forwarded_revoked_key(_runtime_key_of(arguments))
        if request.kind in (TOKENIZE_SEALED, TOKENIZE_SEALED_EXTENDED):
            if request.kind == TOKENIZE_SEALED:  # the same checks, with a plain request's options
                arguments = {**arguments, **PLAIN_SEALED_OPTIONS}
            sealed = validate_sealed_tokenize(arguments, limits)
            outcome = await self.tokenize_sealed(_principal(arguments), sealed.epoch, sealed.values, sealed.items,
                                                 sealed.options, sealed.metadata)
            return outcome.status, outcome.body, ()
        if request.kind in (TOKENIZE, TOKENIZE_EXTENDED):
            values = validate_values(require_item_list(arguments, "values", limits), limits)
            options = None
            if request.kind == TOKENIZE_EXTENDED:
                options = validate_options(arguments["token_format"], arguments["metadata_json"],
                                           arguments["ttl_seconds"])
            outcome = await self._tokenize_here(_principal(arguments), values,
                                                _optional_idempotency_key(arguments), options)
            return outcome.status, outcome.body, (("Idempotent-Replayed", "true"),) if outcome.replayed else ()
        if request.kind == ROTATE:
            outcome = await self._rotate_here(_principal(arguments), _optional_idempotency_key(arguments),
                                              arguments["actor"])
            return outcome.status, outcome.body, (("Idempotent-Replayed", "true"),) if outcome.replayed else ()
        if request.kind in (CREATE_KEY, REVOKE_KEY, AUDIT):
            outcome = await self._run_forwarded_change(request.kind, arguments, sender)
            return outcome.status, outcome.body, ()
        if request.kind == LIST_KEYS:
            return 200, _json(await self._list_keys_here()), ()
        if request.kind in LIFECYCLE_FORWARDED_MEMBERS:
            status, body = await self._run_forwarded_lifecycle(request.kind, arguments)
            return status, body, ()
        if request.kind in (LIST_MEMBERS, CHANGE_MEMBER):
            status, body = await self.run_forwarded_member_request(request.kind, arguments)
            return status, body, ()
        if request.kind == DETOKENIZE:
            tokens = validate_tokens(require_item_list(arguments, "tokens", limits))
            return 200, msgpack.packb(await self._detokenize_missing_here(tokens), use_bin_type=True), ()
        if request.kind == REVEAL:
            tokens = validate_lookup_tokens(require_item_list(arguments, "tokens", limits))
            include_metadata = arguments["include_metadata"]
            if not isinstance(include_metadata, bool):
                raise InvalidRequest("include_metadata must be a boolean")
            answer = await self._reveal_missing_here(tokens, validate_lookup_epoch(arguments["epoch"]),
                                                     include_metadata)
            return 200, msgpack.packb(answer, use_bin_type=True), ()
        return 200, _json(await self._list_epochs_here()), ()


    async def _run_forwarded_change(self, kind: str, arguments: dict[str, Any], sender: str) -> Outcome:
        """A key change or audit batch from a backup; the commands re-validate every field (400 if not),
        and a peer may write audit records only in its own name."""
        try:
            if kind == CREATE_KEY:
                return await self._create_key_here(str(arguments["name"]), _strings(arguments["scopes"]),
                                                   arguments["actor"])
            if kind == REVOKE_KEY:
                return await self._revoke_key_here(str(arguments["key_id"]), arguments["actor"])
            records = arguments["records"]
            if not isinstance(records, list) or not all(isinstance(record, list) for record in records):
                raise TypeError("records")
            audit_records = [commands.AuditRecord(*record) for record in records]
            if any(record.node != sender for record in audit_records):
                raise ValueError("audit records name another node than the peer that sent them")
            return await self._audit_here(audit_records)
        except commands.CommandError:
            raise ValueError("malformed forwarded change") from None


_actor = commands.actor_from_fields


def _actor_of_peer(fields: object, sender: str) -> list[Any]:
    """The actor of a request forwarded by ``sender``, whose audit record names the node that took the
    request: the sender itself (a peer may write audit records only in its own name; none named: the
    sender), else 400."""
    try:
        actor = _actor(fields)
    except commands.CommandError:
        raise InvalidRequest("the actor is malformed") from None
    if actor.node is None:
        return [actor.name, actor.key_id, sender, actor.request_id]
    if actor.node != sender:
        raise InvalidRequest("the actor names another node than the peer that forwarded the request")
    return actor.fields()


def _runtime_key_of(arguments: dict[str, Any]) -> str | None:
    """The id of the runtime key a forwarded request acts for: its actor's key id, or the id in a
    principal of the form ``key-<id>`` (auth.Principal.identity); None for a bootstrap key or a request
    that names no key."""
    actor = arguments.get("actor")
    if isinstance(actor, list) and len(actor) == 4 and isinstance(actor[1], str):
        return actor[1]
    return auth.runtime_key_id_of_identity(arguments.get("principal"))


def _strings(items: object) -> list[str]:
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise TypeError("expected a list of strings")
    return items


# The members each kind of forwarded request carries, exactly.
FORWARDED_MEMBERS: dict[str, tuple[str, ...]] = {
    TOKENIZE: ("principal", "values", "idempotency_key"),
    TOKENIZE_EXTENDED: ("principal", "values", "idempotency_key", "token_format", "metadata_json", "ttl_seconds"),
    TOKENIZE_SEALED: ("principal", "epoch", "values", "items"),
    TOKENIZE_SEALED_EXTENDED: SEALED_TOKENIZE_MEMBERS,
    REVEAL: ("tokens", "epoch", "include_metadata"),
    ROTATE: ("principal", "idempotency_key", "actor"),
    DETOKENIZE: ("tokens",),
    EPOCHS: (),
    CREATE_KEY: ("name", "scopes", "actor"),
    REVOKE_KEY: ("key_id", "actor"),
    AUDIT: ("records",),
    LIST_KEYS: (),
    **LIFECYCLE_FORWARDED_MEMBERS,
    LIST_MEMBERS: (),
    CHANGE_MEMBER: ("action", "node_id", "peer_addr"),
}


def _max_forwarded_bytes(limits: LimitsConfig) -> int:
    """The largest msgpack body an allowed request packs to: every item at its largest (a value or a
    token), plus headroom for member names, the principal and the Idempotency-Key."""
    return limits.max_items * (max(limits.max_value_bytes, MAX_TOKEN_CHARS) + 8) + 4096


def _max_forwarded_sealed_bytes(limits: LimitsConfig, with_metadata: bool = False) -> int:
    """The largest ``tokenize.sealed`` body a primary takes: an allowed request's values with their pairs
    (a token and a ciphertext of the value's length plus its tag), at most MAX_FORWARDED_SEALED_BYTES;
    ``with_metadata``: a ``tokenize.sealed.v2`` body's, with a metadata ciphertext per value and the
    metadata document once. A backup forwards a larger one as values (``_sealed_forward_bytes``), so the
    two always agree."""
    per_item = 2 * max(limits.max_value_bytes, MAX_TOKEN_CHARS) + MAX_TOKEN_CHARS + SEALED_ITEM_OVERHEAD_BYTES
    document = 0
    if with_metadata:
        per_item += MAX_METADATA_BYTES + METADATA_CIPHERTEXT_OVERHEAD_BYTES
        document = MAX_METADATA_BYTES + 5
    return min(limits.max_items * per_item + document + 4096, MAX_FORWARDED_SEALED_BYTES)


def _sealed_forward_bytes(values: Sequence[str], items: Sequence[tuple[str, bytes]], metadata_json: str | None = None,
                          metadata: Sequence[bytes] | None = None) -> int:
    """At least what a ``tokenize.sealed`` (or ``.v2``) body of ``values`` and ``items`` (and a metadata
    document with its ciphertexts) packs to: msgpack adds at most SEALED_ITEM_OVERHEAD_BYTES a value and pair
    and 5 bytes a string or bin, and the other members stay within 4 KiB."""
    size = sum(len(value.encode()) + len(token) + len(ciphertext) + SEALED_ITEM_OVERHEAD_BYTES
               for value, (token, ciphertext) in zip(values, items)) + 4096
    if metadata_json is not None:
        size += len(metadata_json.encode()) + 5
    return size + sum(len(ciphertext) + 5 for ciphertext in metadata or ())


def _forwarded_arguments(request: ForwardRequest, members: tuple[str, ...], max_bytes: int) -> dict[str, Any]:
    """The forwarded body as a map of exactly ``members``: size first, then msgpack, then shape (400 / 413)."""
    if len(request.body) > max_bytes:
        raise PayloadTooLarge(f"the forwarded request is larger than {max_bytes} bytes")
    try:
        # Bounded (protocol.codec.unpack_bounded) by what an allowed request holds: one map of ``members``;
        # lists of at most commands.MAX_ITEMS (the ceiling of limits.max_items; an audit batch is at most
        # 4,096 records of 9 fields). The ceiling, not this node's max_items: a list over max_items is
        # then refused by validation with the 413 a direct request gets, not as malformed msgpack; the
        # body's bytes are bounded by max_items already. In elements (a container counts itself and its members): a sealed
        # tokenize counts 6 an item (the value, the [token, ciphertext] pair, the metadata ciphertext) and
        # 20 more, any other request at most 1 an item and 13 more, or 11 an audit record; 1,024 more and,
        # for the others, twice their item count leave slack. Strings and byte strings are bounded by
        # ``max_bytes``, already checked.
        per_item = 6 if "items" in members else 2
        arguments = unpack_bounded(request.body, max_elements=per_item * commands.MAX_ITEMS + 1024,
                                   max_array_len=commands.MAX_ITEMS, max_map_len=len(members),
                                   max_str_len=max_bytes, max_bin_len=max_bytes)
    except (ValueError, msgpack.UnpackException):
        raise InvalidRequest("the forwarded request is not valid msgpack") from None
    if not isinstance(arguments, dict) or set(arguments) != set(members):
        raise InvalidRequest(f"a forwarded request must be a map of exactly {list(members)}")
    return arguments


def _principal(arguments: dict[str, Any]) -> str:
    principal = arguments["principal"]
    if not isinstance(principal, str) or PRINCIPAL_NAME_PATTERN.match(principal) is None:
        raise InvalidRequest("the forwarded principal is not an API key name")
    return principal


def _optional_idempotency_key(arguments: dict[str, Any]) -> str | None:
    key = arguments["idempotency_key"]
    if key is None:
        return None
    if not isinstance(key, str):
        raise InvalidRequest("the forwarded Idempotency-Key must be a string")
    return validate_idempotency_key(key)


def _decode_forward_response(kind: str, response: ForwardResponse) -> Any:
    """What the local call of ``kind`` would have returned: the decoded document of a read (msgpack or
    JSON), else an Outcome; an error answer is raised as the matching ServiceError."""
    headers = dict(response.headers)
    if not is_body_status(response.status):
        # Out of HTTP's range, or one that cannot carry the body it came with: only a broken primary answers
        # so. Passed on, it would make a status line no client reads; what the primary did is unknown.
        raise Unavailable("the primary answered with a status no answer of this request has; it may have taken "
                          "effect (once): retry, ideally with an Idempotency-Key")
    if response.status >= 400:
        try:
            problem = json.loads(response.body)
            title, detail = str(problem["title"]), str(problem["detail"])
            slug = str(problem["type"]).rsplit(":", 1)[-1]
            no_effect = problem.get("effect") == EFFECT_NONE
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested too deeply
            title, detail, slug, no_effect = "Error", "the primary refused the request", "forwarded", False
        headers.pop("Content-Type", None)
        raise (error_from_problem(response.status, slug, detail, headers, no_effect=no_effect)
               or ForwardedError(response.status, title, detail, slug, headers, no_effect=no_effect))
    if kind in (DETOKENIZE, REVEAL):
        return _forwarded_lookup(kind, response.body)
    if kind in (EPOCHS, LIST_KEYS, LIST_MEMBERS) or kind in LIFECYCLE_DOCUMENT_KINDS:
        try:
            return json.loads(response.body)
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply
            # The primary ran the request before it answered: a read had no effect, a re-tokenize may have
            # issued its tokens.
            raise Unavailable("the primary's answer could not be read", no_effect=kind != RETOKENIZE) from None
    return Outcome(response.status, response.body, headers.get("Idempotent-Replayed") == "true")


def _forwarded_lookup(kind: str, body: bytes) -> dict[str, Any]:
    """The primary's answer to a forwarded detokenize ({token: value or None}) or reveal ({token: [value,
    metadata JSON or None] or None}), decoded with bounds (a frame of nested empty arrays would cost about
    64 bytes of memory a byte) and checked in shape; anything else is a 503 with no effect, never a 500."""
    try:
        # A map of at most MAX_ITEMS tokens (it counts 1 and 2 an item), each answered by a value or a pair
        # (3 more): 5 elements an item, 1 more.
        document = unpack_bounded(body, max_elements=5 * commands.MAX_ITEMS + 1, max_array_len=2,
                                  max_map_len=commands.MAX_ITEMS, max_str_len=len(body), max_bin_len=0)
    except (ValueError, msgpack.UnpackException):
        document = None
    if isinstance(document, dict) and all(type(token) is str for token in document):
        answers = document.values()
        if kind == DETOKENIZE and all(value is None or type(value) is str for value in answers):
            return document
        if kind == REVEAL and all(pair is None or (type(pair) is list and len(pair) == 2
                                                   and all(part is None or type(part) is str for part in pair))
                                  for pair in answers):
            return document
    raise Unavailable("the primary's answer could not be read", no_effect=True)


class _IdempotencySlot:
    """Claims (principal, key) for the duration of one request, or yields the stored first answer."""

    def __init__(self, service: NodeService, principal: str, key: str | None, kind: str,
                 fingerprint: bytes | None) -> None:
        self.service, self.principal, self.key, self.kind, self.fingerprint = (
            service, principal, key, kind, fingerprint)
        self.claimed = False

    async def __aenter__(self) -> Outcome | None:
        if self.key is None:
            return None
        store = self.service.node.store
        record = store.idempotency_get(self.principal, self.key)
        # A record past the retention that no purge has reached yet no longer answers: the apply puts the
        # new request in its place (VaultStore._existing_response), so it is proposed, not replayed or 422.
        if record is not None and record.created_at_ms >= _now_ms() - store.retention_ms:
            return self.service._replay(self.principal, self.key, self.kind, self.fingerprint)
        slot = (self.principal, self.key)
        if slot in self.service._in_flight:
            raise IdempotencyInFlight()
        self.service._in_flight.add(slot)
        self.claimed = True
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        if self.claimed:
            self.service._in_flight.discard((self.principal, self.key))
