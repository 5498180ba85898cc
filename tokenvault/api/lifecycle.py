"""The token lifecycle on one node: delete, re-tokenize, an epoch's token pages and epoch destroy.

``LifecycleOperations`` is mixed into ``tokenvault.api.service.NodeService``; every
operation is one async method taking and returning plain values (or an Outcome),
routed to the primary like the other writes. Each change is one replicated log
entry (tokenvault/core/commands.py) that every node applies the same way
(tokenvault/core/store.py); the node then shreds the removed bytes from its files
(tokenvault/core/shred.py).

Re-tokenize never lets a value leave the primary's process: the primary decrypts
the stored ciphertexts, seals the values in the active epoch and proposes the
new pairs as an ordinary tokenize entry (insert-once, deterministic), so a
re-tokenized token is exactly the token a tokenize of the value gives in the
active epoch. A token of a destroyed epoch cannot be re-tokenized (422
epoch-destroyed): its value is gone for good.

Card and digits tokens carry no epoch in their text: re-tokenize looks them up
in the epoch the request names (default: the active one), as detokenize does,
and an epoch's pages list them after its opaque tokens. Their rows do not record
which of the two formats a token is; the epoch's FF1 tells (``_format_of``).
FF1 costs about 15 µs a token, and a re-tokenize of a thousand card tokens
needs two or three each, so they are computed ``tokenvault.futures.SLICE_ITEMS``
at a time with a turn of the event loop between (``computed_in_slices``): the
primary's loop is never held for the whole batch.
Re-tokenize carries each mapping's expiry and metadata over to the new token.
Delete takes them with an epoch too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol import NotPrimary
from tokenvault.api.audit import AuditUnavailable
from tokenvault.api.validation import require_item_list, validate_lookup_epoch, validate_lookup_tokens
from tokenvault.core import commands
from tokenvault.core.store_layout import DESTROYED, MAX_TOKEN_PAGE, ApplyResult
from tokenvault.core.store_layout import Outcome as ApplyOutcome
from tokenvault.crypto import formats
from tokenvault.crypto.tokens import is_token, parse_token
from tokenvault.futures import computed_in_slices
from tokenvault.errors import (AuditTrimRefused, EpochActive, EpochDestroyed, InvalidRequest, NotFound, Outcome,
                               ServiceError, TokenCollision, Unavailable)

if TYPE_CHECKING:
    from tokenvault.api.audit import AuditBuffer
    from tokenvault.core.node import Node

DELETE_TOKENS = "token.delete"
RETOKENIZE = "token.retokenize"
DESTROY_EPOCH = "epoch.destroy"
EPOCH_TOKENS = "epoch.tokens"
AUDIT_TRIM = "audit.trim"
MAX_EPOCH_RETRIES = 5
# The members each kind of forwarded lifecycle request carries, exactly.
LIFECYCLE_FORWARDED_MEMBERS: dict[str, tuple[str, ...]] = {
    DELETE_TOKENS: ("tokens", "actor", "epoch"),
    RETOKENIZE: ("tokens", "epoch"),
    DESTROY_EPOCH: ("epoch", "actor"),
    EPOCH_TOKENS: ("epoch", "after", "limit"),
    AUDIT_TRIM: ("through_seq", "through_hash", "actor"),
}
# Forwarded kinds whose answer is a JSON document rather than an Outcome.
LIFECYCLE_DOCUMENT_KINDS = frozenset({RETOKENIZE, EPOCH_TOKENS})


def _results_of_entries_proposed_together(answers: list[ApplyResult | BaseException]) -> list[ApplyResult]:
    """The results of entries proposed together, or the failure to answer: one that may still take effect
    if any does; a refusal (never proposed) only when every entry was refused, since a refusal's "no effect"
    is its own entry's, and the request took effect in part when another entry was written."""
    failures = [answer for answer in answers if isinstance(answer, BaseException)]
    if not failures:
        return [answer for answer in answers if not isinstance(answer, BaseException)]
    unknown = [failure for failure in failures if not (isinstance(failure, NotPrimary) or (
        isinstance(failure, ServiceError) and (failure.no_effect or failure.status < 500)))]
    if unknown:
        raise unknown[0]
    if len(failures) == len(answers):
        raise failures[0]
    raise Unavailable("some of this request's entries were written and another was refused; it took effect in "
                      "part: retry")


def _json(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


_actor = commands.actor_from_fields


@dataclass(frozen=True, slots=True)
class _Mapping:
    """A live mapping to issue again in the active epoch: its value, format, expiry and metadata text."""

    value: str
    token_format: str
    expires_at_ms: int | None
    metadata_json: str | None


def _epoch_of(token: str) -> int:
    """The epoch a token was issued in (opaque tokens name it; see the module docstring)."""
    return parse_token(token).epoch


class LifecycleOperations:
    """The lifecycle half of NodeService; see the module docstring."""

    node: Node
    node_id: str
    _audit: AuditBuffer | None

    if TYPE_CHECKING:
        async def _route(self, kind: str, arguments: dict[str, Any],
                         local: Callable[..., Awaitable[Any]]) -> Any: ...

        async def _propose(self, payload: bytes) -> ApplyResult: ...

        async def _read_barrier(self) -> None: ...

        async def _refuse_revoked_key(self, actor: commands.Actor | None, index: int | None,
                                      anything_found: bool = True) -> None: ...

        async def _refuse_revoked_key_id(self, key_id: str | None) -> None: ...

        async def _seal(self, epoch: int, values: list[str]) -> tuple[tuple[str, bytes], ...]: ...

        def _decrypt(self, token: str, ciphertext: bytes) -> str | None: ...

        def _read_mappings(self, tokens: list[str], epoch: int | None, include_metadata: bool,
                           now_ms: int) -> dict[str, tuple[str, str | None]]: ...

        def _decrypt_metadata(self, epoch: int, token: str, ciphertext: bytes) -> str | None: ...

    # ------------------------------------------------------------------ delete
    async def delete_tokens(self, tokens: list[str], actor: commands.Actor | None = None,
                            epoch: int | None = None) -> Outcome:
        """Remove the mappings of ``tokens``; answers ``{"deleted": n}``, n counting those that existed. Card
        and digits tokens are those of ``epoch`` (default: the active epoch, read after a read barrier)."""
        arguments = {"tokens": list(dict.fromkeys(tokens)), "actor": (actor or commands.NO_ACTOR).fields(),
                     "epoch": epoch}
        result: Outcome = await self._route(DELETE_TOKENS, arguments, self._delete_tokens_here)
        return result

    async def _delete_tokens_here(self, tokens: list[str], actor: list[Any] | None = None,
                                  epoch: int | None = None) -> Outcome:
        if epoch is None and not all(map(is_token, tokens)):
            await self._read_barrier()  # a rotation acknowledged before the request started counts
            epoch = self.node.store.active_epoch() or None
        command = commands.DeleteTokensCommand(tokens=tuple(tokens), deleted_at_ms=int(time.time() * 1000),
                                               actor=_actor(actor), epoch=epoch)
        result = await self._propose(commands.encode_command(command))
        if result.outcome != ApplyOutcome.OK or result.response is None:
            raise Unavailable("the delete could not be recorded")
        return Outcome(200, result.response, False)

    # ------------------------------------------------------------------ re-tokenize
    async def retokenize(self, tokens: list[str], actor: commands.Actor | None = None,
                         epoch: int | None = None) -> dict[str, Any]:
        """``{"epoch": active, "tokens": [...]}``: each token's value tokenized in the active epoch, in the
        token's own format, with its expiry and metadata (None for an unknown, deleted or expired token),
        computed on the primary; card and digits tokens are looked up in ``epoch`` (default: the active
        one). Audited like a detokenize. A backup forwards it naming no key, and the primary writes the new
        mappings, so the runtime key that asked is checked here first (_refuse_revoked_key_id: 401 and
        nothing written if it was revoked before the request started; docs/security.md, "Revocation")."""
        await self._refuse_revoked_key_id(actor.key_id if actor is not None else None)
        arguments: dict[str, Any] = {"tokens": tokens, "epoch": epoch}
        document: dict[str, Any] = await self._route(RETOKENIZE, arguments, self._retokenize_here)
        if self._audit is not None:
            actor = actor or commands.NO_ACTOR
            found = sum(token is not None for token in document["tokens"])
            record = commands.AuditRecord(
                at_ms=int(time.time() * 1000), node=self.node_id, key_name=actor.name, key_id=actor.key_id,
                action=RETOKENIZE, items=len(tokens), found=found, request_id=actor.request_id,
                subject=str(document["epoch"]))
            try:
                index = await self._audit.append(record)
            except AuditUnavailable as error:
                raise Unavailable(f"{error}; the new tokens were not returned (every re-tokenize is audited)") from None
            await self._refuse_revoked_key(actor, index)
        return document

    async def _retokenize_here(self, tokens: list[str], epoch: int | None = None) -> dict[str, Any]:
        await self._read_barrier()
        states = {record.epoch: record.state for record in self.node.store.epochs()}
        format_epoch = epoch if epoch is not None else self.node.store.active_epoch()
        for position, token in enumerate(tokens):
            if states.get(_epoch_of(token) if is_token(token) else format_epoch) == DESTROYED:
                raise EpochDestroyed(f"tokens[{position}] belongs to a destroyed epoch; its value is gone "
                                     "and cannot be re-tokenized")
        mappings = await self._mappings_to_reissue(tokens, format_epoch)
        for _ in range(MAX_EPOCH_RETRIES):
            active = self.node.store.active_epoch()
            if active == 0:
                raise Unavailable("the cluster has no active epoch yet; retry shortly")
            # A mapping read live may expire before its new entry is issued: it answers null, as any
            # expired token, and the entry never carries an expiry already past.
            issued_at_ms = int(time.time() * 1000)
            live = {token: mapping for token, mapping in mappings.items()
                    if mapping.expires_at_ms is None or mapping.expires_at_ms > issued_at_ms}
            reissued = await self._reissue(active, live, issued_at_ms)
            if reissued is not None:
                answer = [live.get(token) for token in tokens]
                return {"epoch": active, "tokens": [None if mapping is None else
                                                    reissued[(mapping.token_format, mapping.value)]
                                                    for mapping in answer]}
            # EPOCH_MISMATCH: a rotation was applied first; seal again in the new epoch.
        raise Unavailable("the active epoch kept changing; retry")

    async def _mappings_to_reissue(self, tokens: list[str], format_epoch: int) -> dict[str, _Mapping]:
        """The live mappings among ``tokens`` (format tokens of ``format_epoch``), each with its format, its
        expiry and its metadata, read from this node's store after the read barrier."""
        found = self._read_mappings(tokens, format_epoch, False, int(time.time() * 1000))
        lives = self.node.store.lives(None, [token for token in found if is_token(token)])
        lives.update(self.node.store.lives(format_epoch, [token for token in found if not is_token(token)]))
        format_pairs = [(token, value) for token, (value, _) in found.items() if not is_token(token)]
        format_of = dict(zip((token for token, _ in format_pairs), await computed_in_slices(
            lambda pair: self._format_of(format_epoch, *pair), format_pairs)))
        mappings: dict[str, _Mapping] = {}
        for token, (value, _) in found.items():
            opaque = is_token(token)
            token_format = formats.OPAQUE if opaque else format_of[token]
            if token_format is None:
                continue
            expires_at_ms, sealed_metadata = lives.get(token, (None, None))
            metadata_json = None
            if sealed_metadata is not None:
                token_epoch = _epoch_of(token) if opaque else format_epoch
                metadata_json = self._decrypt_metadata(token_epoch, token, sealed_metadata)
            mappings[token] = _Mapping(value, token_format, expires_at_ms, metadata_json)
        return mappings

    def _format_of(self, epoch: int, token: str, value: str) -> str | None:
        """Which format ``token`` was issued in for ``value``: the rows do not record it, but the epoch's FF1
        gives each format's token of the value, and only the one it was issued in is ``token``."""
        if epoch not in self.node.keyring:
            return None
        keys = self.node.keyring.get(epoch).formats
        if (formats.CARD_MIN_DIGITS <= len(value) <= formats.CARD_MAX_DIGITS and formats.luhn_valid(value)
                and keys.card_token(value) == token):
            return formats.CARD
        with contextlib.suppress(formats.FormatError, ValueError):
            if keys.digits_token(formats.check_digits(value)) == token:
                return formats.DIGITS
        return None

    async def _reissue(self, epoch: int, mappings: dict[str, _Mapping],
                       issued_at_ms: int) -> dict[tuple[str, str], str] | None:
        """Tokenize each mapping's value in ``epoch``, in its format, with its expiry and metadata: one
        entry per (format, with or without metadata), each item with its own expiry, proposed together;
        the new token of each (format, value), or None when a rotation was applied first (EPOCH_MISMATCH:
        the caller seals again). A value's token depends only on its format and the epoch, whichever entry
        carries it. A value that several mappings of one entry share is issued once, with the latest of
        their expiries (none, if one has none) and the first one's metadata. The entries carry lives over
        (``carries_lives``): a mapping without an expiry makes the value's live mapping in ``epoch``, if it
        has one with an expiry, permanent, so the new mapping lives at least as long as the old one did."""
        groups: dict[tuple[str, bool], list[_Mapping]] = {}
        for mapping in dict.fromkeys(mappings.values()):
            groups.setdefault((mapping.token_format, mapping.metadata_json is not None), []).append(mapping)
        keys = self.node.keyring.get(epoch)
        commands_by_group: list[tuple[list[_Mapping], commands.TokenizeCommand]] = []
        for (token_format, with_metadata), members in groups.items():
            first_of_value: dict[str, _Mapping] = {}
            expiry_of_value: dict[str, int | None] = {}
            for mapping in members:
                if first_of_value.setdefault(mapping.value, mapping) is mapping:
                    expiry_of_value[mapping.value] = mapping.expires_at_ms
                    continue
                current = expiry_of_value[mapping.value]
                expiry_of_value[mapping.value] = (None if current is None or mapping.expires_at_ms is None
                                                  else max(current, mapping.expires_at_ms))
            values, members = list(first_of_value), list(first_of_value.values())
            expiries = tuple(expiry_of_value[value] for value in values)
            one_expiry = len(set(expiries)) == 1
            if token_format == formats.OPAQUE:
                items = await self._seal(epoch, values)
            else:
                items = tuple(await computed_in_slices(functools.partial(keys.seal_format, token_format), values))
            metadata = None
            if with_metadata:
                metadata = tuple(keys.encrypt_metadata(token, (mapping.metadata_json or "").encode("utf-8"))
                                 for (token, _), mapping in zip(items, members))
            command = commands.TokenizeCommand(
                epoch=epoch, items=items, principal=None, idempotency_key=None, fingerprint=None,
                issued_at_ms=issued_at_ms, token_format=token_format,
                expires_at_ms=expiries[0] if one_expiry else None, metadata=metadata,
                item_expires_at_ms=None if one_expiry else expiries, carries_lives=True)
            commands_by_group.append((members, command))
        answers = await asyncio.gather(*(self._propose(commands.encode_command(command))
                                         for _, command in commands_by_group), return_exceptions=True)
        results = _results_of_entries_proposed_together(answers)
        if any(result.outcome == ApplyOutcome.TOKEN_COLLISION for result in results):
            raise TokenCollision("a card or digits token this re-tokenize would issue is held by a value of the "
                                 "other format in the active epoch; re-tokenize the others, or after a rotation")
        if any(result.outcome != ApplyOutcome.OK for result in results):
            return None
        return {(command.token_format, mapping.value): token
                for members, command in commands_by_group for mapping, (token, _) in zip(members, command.items)}

    # ------------------------------------------------------------------ an epoch's tokens
    async def epoch_tokens(self, epoch: int, after: str | None, limit: int,
                           key_id: str | None = None) -> dict[str, Any]:
        """A page of the tokens issued in ``epoch`` after the token ``after``, for the migration. ``key_id``:
        the runtime key that asked (None: a bootstrap key), checked here (_refuse_revoked_key_id)."""
        await self._refuse_revoked_key_id(key_id)
        arguments = {"epoch": epoch, "after": after, "limit": limit}
        document: dict[str, Any] = await self._route(EPOCH_TOKENS, arguments, self._epoch_tokens_here)
        return document

    async def _epoch_tokens_here(self, epoch: int, after: str | None, limit: int) -> dict[str, Any]:
        if not isinstance(limit, int) or not 1 <= limit <= MAX_TOKEN_PAGE:
            raise InvalidRequest(f"'limit' must be an integer in [1, {MAX_TOKEN_PAGE}]")
        await self._read_barrier()
        records = {record.epoch: record for record in self.node.store.epochs()}
        if epoch not in records:
            raise NotFound("no epoch has this number")
        # One token past the page says whether anything follows it, so that a walk never ends on an
        # empty page (docs/api.md: next_after is null on the last page).
        tokens = self.node.store.epoch_tokens(epoch, after, limit + 1)
        more = len(tokens) > limit
        del tokens[limit:]
        return {"epoch": epoch, "state": records[epoch].state, "tokens": tokens,
                "next_after": tokens[-1] if more else None}

    # ------------------------------------------------------------------ destroy
    async def destroy_epoch(self, epoch: int, actor: commands.Actor | None = None) -> Outcome:
        """Crypto-shred ``epoch``: 200 ``{"epoch", "state": "destroyed"}`` (again for a destroyed one),
        409 for the active epoch, 404 for an epoch that never existed."""
        arguments = {"epoch": epoch, "actor": (actor or commands.NO_ACTOR).fields()}
        result: Outcome = await self._route(DESTROY_EPOCH, arguments, self._destroy_epoch_here)
        return result

    async def _destroy_epoch_here(self, epoch: int, actor: list[Any] | None = None) -> Outcome:
        command = commands.DestroyEpochCommand(epoch=epoch, destroyed_at_ms=int(time.time() * 1000),
                                               actor=_actor(actor))
        result = await self._propose(commands.encode_command(command))
        if result.outcome == ApplyOutcome.EPOCH_ACTIVE:
            raise EpochActive("the active epoch cannot be destroyed; rotate to a new epoch first")
        if result.outcome == ApplyOutcome.EPOCH_NOT_FOUND:
            raise NotFound("no epoch has this number")
        if result.outcome != ApplyOutcome.OK or result.response is None:
            raise Unavailable("the destroy could not be recorded")
        return Outcome(200, result.response, False)

    # ------------------------------------------------------------------ audit trim
    async def trim_audit(self, through_seq: int, through_hash: bytes, actor: commands.Actor | None = None) -> Outcome:
        """Drop the audit records up to ``through_seq``, whose hash must be ``through_hash`` (from an
        export): 200 ``{"trimmed_through", "removed", "anchor_hash"}``, the trim itself recorded; 409
        audit-trim-refused, nothing dropped, when that record does not exist, has another hash or was
        trimmed away already. Trimming again to the anchor with its hash answers 200 with 0 removed."""
        arguments = {"through_seq": through_seq, "through_hash": through_hash.hex(),
                     "actor": (actor or commands.NO_ACTOR).fields()}
        result: Outcome = await self._route(AUDIT_TRIM, arguments, self._trim_audit_here)
        return result

    async def _trim_audit_here(self, through_seq: int, through_hash: str, actor: list[Any] | None = None) -> Outcome:
        try:
            digest = bytes.fromhex(through_hash)
            command = commands.AuditTrimCommand(through_seq=through_seq, through_hash=digest,
                                                trimmed_at_ms=int(time.time() * 1000), actor=_actor(actor))
        except (ValueError, TypeError):
            raise InvalidRequest("through_seq must be a record number and through_hash 64 hex digits") from None
        result = await self._propose(commands.encode_command(command))
        if result.outcome == ApplyOutcome.AUDIT_RECORD_NOT_FOUND:
            raise AuditTrimRefused(f"there is no audit record {through_seq} yet")
        if result.outcome == ApplyOutcome.AUDIT_HASH_MISMATCH:
            raise AuditTrimRefused(f"audit record {through_seq} has another hash: export the trail again and "
                                   "trim through a record of that export")
        if result.outcome == ApplyOutcome.AUDIT_TRIMMED_ALREADY:
            anchor = self.node.store.audit_anchor[0]
            raise AuditTrimRefused(f"the trail was trimmed through record {anchor} already")
        if result.outcome != ApplyOutcome.OK or result.response is None:
            raise Unavailable("the trim could not be recorded")
        return Outcome(200, result.response, False)

    # ------------------------------------------------------------------ forwarded
    async def _run_forwarded_lifecycle(self, kind: str, arguments: dict[str, Any]) -> tuple[int, bytes]:
        """A lifecycle request a backup forwarded: its tokens and epoch checked as the HTTP layer checks
        them; commands re-validate every other field (CommandError, a ValueError: 400)."""
        if kind in (DELETE_TOKENS, RETOKENIZE):  # opaque tokens, and card and digits tokens of the epoch named
            # Forwarded requests always carry "epoch", null when the client named none.
            tokens = validate_lookup_tokens(require_item_list(arguments, "tokens", self.node.config.limits))
            epoch = validate_lookup_epoch(arguments["epoch"])
            if kind == RETOKENIZE:
                return 200, _json(await self._retokenize_here(tokens, epoch))
            outcome = await self._delete_tokens_here(tokens, arguments["actor"], epoch)
            return outcome.status, outcome.body
        if kind == AUDIT_TRIM:
            if type(arguments["through_seq"]) is not int or not isinstance(arguments["through_hash"], str):
                raise InvalidRequest("the forwarded trim is malformed")
            outcome = await self._trim_audit_here(arguments["through_seq"], arguments["through_hash"],
                                                  arguments["actor"])
            return outcome.status, outcome.body
        epoch = arguments["epoch"]
        if type(epoch) is not int or not 1 <= epoch <= commands.MAX_EPOCH:
            raise InvalidRequest("the forwarded epoch is not an epoch number")
        if kind == DESTROY_EPOCH:
            outcome = await self._destroy_epoch_here(epoch, arguments["actor"])
            return outcome.status, outcome.body
        after = arguments["after"]
        if after is not None and not isinstance(after, str):
            raise InvalidRequest("the forwarded cursor must be a token or null")
        if after is not None and not is_token(after) and not formats.is_format_token(after):
            raise InvalidRequest("the forwarded cursor must be a token or null")
        return 200, _json(await self._epoch_tokens_here(epoch, after, arguments["limit"]))
