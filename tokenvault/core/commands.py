"""Vault commands: the payloads of replicated log entries.

Every state change of the vault is one of these commands, proposed by the
primary, replicated in the log and applied by ``tokenvault.core.store``. A command
carries everything the primary decided (tokens, ciphertexts, the wrapped epoch
secret, timestamps), so applying it is a pure function of the log.

Wire format: a msgpack array ``[format_version, type_tag, field, ...]``. The
decoder treats its input as hostile: msgpack limits cap every container and
string before allocation, every field is checked for its exact type and bounds,
and any problem raises ``CommandError`` and nothing else. Error messages name
the field that is wrong but never echo its content.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import msgpack

from tokenvault.crypto import keys

COMMAND_FORMAT_VERSION = 1
TOKENIZE_TAG = 1
ROTATE_EPOCH_TAG = 2
CREATE_API_KEY_TAG = 3
REVOKE_API_KEY_TAG = 4
AUDIT_TAG = 5
# Far from the next free numbers, which other additions of version 2 take.
PURGE_EXPIRED_TAG = 16
# The token lifecycle (docs/api.md "Lifecycle"): deleting mappings and crypto-shredding an epoch.
DELETE_TOKENS_TAG = 6
DESTROY_EPOCH_TAG = 7
# Dropping the oldest audit records once exported (docs/security.md, "Growth and retention").
AUDIT_TRIM_TAG = 8
AUDIT_HASH_BYTES = 32

MAX_ITEMS = 100_000
MAX_TOKEN_CHARS = 128
MAX_CIPHERTEXT_BYTES = keys.MAX_CIPHERTEXT_BYTES  # the largest configurable value, sealed
MAX_PRINCIPAL_CHARS = 255
MAX_IDEMPOTENCY_KEY_CHARS = 255
MAX_FINGERPRINT_BYTES = 64
MAX_WRAPPED_SECRET_BYTES = 1024
MAX_EPOCH = 2**63 - 1
MAX_TIMESTAMP_MS = 2**63 - 1
# A whole encoded command; the write-ahead log bounds its records just above this.
MAX_COMMAND_BYTES = 64 * 1024 * 1024
# msgpack counts string lengths in bytes; no text field of a command is longer than this.
MAX_TEXT_FIELD_CHARS = 1024
# Runtime API keys (tokenvault.auth): a 16-hex-character public id, a 16-byte salt, a 32-byte digest.
KEY_ID_PATTERN = re.compile(r"[0-9a-f]{16}\Z")
KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
KEY_SALT_BYTES = 16
KEY_DIGEST_BYTES = 32
# The scope names a key entry may carry: those tokenvault.auth enforces and the version 2 names,
# so that entries a later version writes still decode. The HTTP layer admits only enforced ones.
KNOWN_SCOPES = frozenset({"admin", "tokenize", "detokenize", "delete", "retokenize", "detokenize_masked"})
MAX_SCOPES = len(KNOWN_SCOPES)
# Who did it: the node that took the request and the request's id, each bounded.
MAX_NODE_ID_CHARS = 32
MAX_REQUEST_ID_CHARS = 64
MAX_SUBJECT_CHARS = 64
# Audit records in one audit command: one node's buffer flushes at most this many at once.
MAX_AUDIT_RECORDS = 4096
AUDIT_ACTIONS = frozenset({"detokenize", "key.create", "key.revoke", "epoch.rotate",
                           "token.delete", "token.retokenize", "epoch.destroy"})
AUDIT_RECORD_FIELDS = 9
# Token formats (tokenvault.crypto.formats): opaque tokens are the tv<epoch>_ grammar, the others digits.
TOKEN_FORMATS = frozenset({"opaque", "card", "digits"})
OPAQUE_FORMAT = "opaque"
# A mapping's metadata is at most 1 KiB of canonical JSON; AES-SIV adds a 16-byte tag.
MAX_METADATA_CIPHERTEXT_BYTES = 1024 + 16
# Expired mappings one purge command deletes at most.
MAX_PURGE_PER_COMMAND = 10_000


class CommandError(ValueError):
    """A command is malformed. The message names the field, never its content."""


def is_digit_string(text: str) -> bool:
    """ASCII digits only: a card or digits token, told from an opaque one (``str.isdigit`` alone also
    takes other scripts' digits, which a format token's store key cannot hold)."""
    return text.isascii() and text.isdigit()


def _check_int(name: str, value: object, minimum: int, maximum: int) -> None:
    # bool is a subclass of int; an exact type check keeps True out of integer fields.
    if type(value) is not int or not minimum <= value <= maximum:
        raise CommandError(f"{name} must be an integer in [{minimum}, {maximum}]")


def _check_optional_text(name: str, value: object, maximum_chars: int) -> None:
    if value is None:
        return
    if type(value) is not str or not 0 < len(value) <= maximum_chars:
        raise CommandError(f"{name} must be null or a string of 1 to {maximum_chars} characters")


def _check_optional_bytes(name: str, value: object, maximum_bytes: int) -> None:
    if value is None:
        return
    if type(value) is not bytes or not 0 < len(value) <= maximum_bytes:
        raise CommandError(f"{name} must be null or 1 to {maximum_bytes} bytes")


def _check_idempotency(principal: object, idempotency_key: object, fingerprint: object) -> None:
    _check_optional_text("principal", principal, MAX_PRINCIPAL_CHARS)
    _check_optional_text("idempotency_key", idempotency_key, MAX_IDEMPOTENCY_KEY_CHARS)
    _check_optional_bytes("fingerprint", fingerprint, MAX_FINGERPRINT_BYTES)
    # The store keys idempotency records by (principal, key) and compares
    # fingerprints on replay, so a key without the other two cannot be recorded.
    if idempotency_key is not None and (principal is None or fingerprint is None):
        raise CommandError("an idempotency_key requires a principal and a fingerprint")


def _check_items(items: object) -> None:
    if type(items) is not tuple or not 0 < len(items) <= MAX_ITEMS:
        raise CommandError(f"items must be a tuple of 1 to {MAX_ITEMS} (token, ciphertext) pairs")
    # One plain loop with exact type checks: measured faster than map()/set()
    # passes over the items, and this runs for every tokenize command.
    for item in items:
        if type(item) is not tuple or len(item) != 2:
            raise CommandError("each item must be a (token, ciphertext) pair")
        token, ciphertext = item
        if type(token) is not str or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise CommandError(f"each token must be a string of 1 to {MAX_TOKEN_CHARS} characters")
        if type(ciphertext) is not bytes or not 0 < len(ciphertext) <= MAX_CIPHERTEXT_BYTES:
            raise CommandError(f"each ciphertext must be 1 to {MAX_CIPHERTEXT_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class TokenizeCommand:
    """Insert a batch of (token, ciphertext) pairs issued in ``epoch``, optionally idempotent.

    Version 2 adds the token format (``card`` and ``digits`` tokens are digit
    strings, stored per epoch), an expiry time and per-item encrypted metadata;
    a command that uses none of them encodes exactly as before. A re-tokenize
    carries each mapping's own expiry over: ``item_expires_at_ms``, one expiry
    (or None, no expiry) per item, in place of the one ``expires_at_ms``, so a
    batch of mappings with many expiries is still one entry; it is encoded as a
    13th field, only when set, so entries without it decode as before.
    ``carries_lives`` (a re-tokenize's entry): an item without an expiry makes a
    live mapping that expires never expire, since the mapping it was carried
    over from never does; in any other entry an item without an expiry leaves
    a live expiry as it is (docs/tokens.md). Encoded as a 14th field (true),
    after the 13th (null when there is no expiry per item), only when set.
    """

    epoch: int
    items: tuple[tuple[str, bytes], ...]
    principal: str | None
    idempotency_key: str | None
    fingerprint: bytes | None
    issued_at_ms: int
    token_format: str = OPAQUE_FORMAT
    expires_at_ms: int | None = None
    metadata: tuple[bytes, ...] | None = None
    item_expires_at_ms: tuple[int | None, ...] | None = None
    carries_lives: bool = False

    def __post_init__(self) -> None:
        _check_int("epoch", self.epoch, 1, MAX_EPOCH)
        _check_items(self.items)
        if type(self.carries_lives) is not bool:
            raise CommandError("carries_lives must be a boolean")
        _check_idempotency(self.principal, self.idempotency_key, self.fingerprint)
        _check_int("issued_at_ms", self.issued_at_ms, 0, MAX_TIMESTAMP_MS)
        if type(self.token_format) is not str or self.token_format not in TOKEN_FORMATS:
            raise CommandError(f"token_format must be one of {sorted(TOKEN_FORMATS)}")
        if self.token_format != OPAQUE_FORMAT and any(
                not is_digit_string(token) for token, _ in self.items):
            raise CommandError("card and digits tokens are strings of digits")
        if self.expires_at_ms is not None:
            _check_int("expires_at_ms", self.expires_at_ms, self.issued_at_ms + 1, MAX_TIMESTAMP_MS)
        if self.item_expires_at_ms is not None:
            if self.expires_at_ms is not None:
                raise CommandError("a tokenize command has one expiry or one per item, not both")
            if type(self.item_expires_at_ms) is not tuple or len(self.item_expires_at_ms) != len(self.items):
                raise CommandError("item_expires_at_ms must be null or one expiry (or null) per item")
            for expiry in self.item_expires_at_ms:
                if expiry is not None:
                    _check_int("item_expires_at_ms[]", expiry, self.issued_at_ms + 1, MAX_TIMESTAMP_MS)
        if self.metadata is not None:
            if (type(self.metadata) is not tuple or len(self.metadata) != len(self.items)
                    or any(type(item) is not bytes or not 0 < len(item) <= MAX_METADATA_CIPHERTEXT_BYTES
                           for item in self.metadata)):
                raise CommandError(f"metadata must be null or one ciphertext of 1 to "
                                   f"{MAX_METADATA_CIPHERTEXT_BYTES} bytes per item")

    @property
    def extended(self) -> bool:
        """Whether the command uses a version 2 field (a format, an expiry or metadata)."""
        return (self.token_format != OPAQUE_FORMAT or self.expires_at_ms is not None or self.metadata is not None
                or self.item_expires_at_ms is not None or self.carries_lives)

    def expiry_of(self, position: int) -> int | None:
        """The expiry the item at ``position`` is issued with (None: none)."""
        if self.item_expires_at_ms is not None:
            return self.item_expires_at_ms[position]
        return self.expires_at_ms


@dataclass(frozen=True, slots=True)
class PurgeExpiredCommand:
    """Delete up to ``limit`` mappings whose expiry time is at or before ``now_ms`` (the proposer's
    clock, carried in the entry so every node deletes the same ones), earliest expiry first."""

    now_ms: int
    limit: int

    def __post_init__(self) -> None:
        _check_int("now_ms", self.now_ms, 0, MAX_TIMESTAMP_MS)
        _check_int("limit", self.limit, 1, MAX_PURGE_PER_COMMAND)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asked for a change, as the audit trail records it: the key's name and id (None for a
    bootstrap key), the node that took the request and the request's id."""

    name: str | None = None
    key_id: str | None = None
    node: str | None = None
    request_id: str | None = None

    def __post_init__(self) -> None:
        _check_optional_text("actor name", self.name, MAX_PRINCIPAL_CHARS)
        _check_optional_text("actor key id", self.key_id, MAX_PRINCIPAL_CHARS)
        _check_optional_text("actor node", self.node, MAX_NODE_ID_CHARS)
        _check_optional_text("actor request id", self.request_id, MAX_REQUEST_ID_CHARS)

    def fields(self) -> list[Any]:
        return [self.name, self.key_id, self.node, self.request_id]


NO_ACTOR = Actor()


def actor_from_fields(fields: object) -> Actor:
    """An Actor from its field list (``Actor.fields``, as forwarded or sent by a worker); NO_ACTOR for
    None; CommandError (a ValueError) when malformed."""
    if fields is None:
        return NO_ACTOR
    if isinstance(fields, Actor):
        return fields
    if not isinstance(fields, list) or len(fields) != 4:
        raise CommandError("actor must be a list of 4 fields")
    return Actor(*fields)


def _check_actor(actor: object) -> None:
    if type(actor) is not Actor:
        raise CommandError("actor must be an Actor")


@dataclass(frozen=True, slots=True)
class RotateEpochCommand:
    """Make ``epoch`` the active epoch, with its secret wrapped by the master key."""

    epoch: int
    wrapped_secret: bytes
    created_at_ms: int
    principal: str | None
    idempotency_key: str | None
    fingerprint: bytes | None
    # Added with the audit trail; entries written before it decode with no actor.
    actor: Actor = NO_ACTOR

    def __post_init__(self) -> None:
        _check_int("epoch", self.epoch, 1, MAX_EPOCH)
        if type(self.wrapped_secret) is not bytes or not 0 < len(self.wrapped_secret) <= MAX_WRAPPED_SECRET_BYTES:
            raise CommandError(f"wrapped_secret must be 1 to {MAX_WRAPPED_SECRET_BYTES} bytes")
        _check_int("created_at_ms", self.created_at_ms, 0, MAX_TIMESTAMP_MS)
        _check_idempotency(self.principal, self.idempotency_key, self.fingerprint)
        _check_actor(self.actor)


@dataclass(frozen=True, slots=True)
class CreateApiKeyCommand:
    """Add a runtime API key: its public id, name, scopes, salt and salted digest (never the key)."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    salt: bytes
    digest: bytes
    created_at_ms: int
    actor: Actor

    def __post_init__(self) -> None:
        if type(self.key_id) is not str or not KEY_ID_PATTERN.match(self.key_id):
            raise CommandError("key_id must be 16 lowercase hex characters")
        if type(self.name) is not str or not KEY_NAME_PATTERN.match(self.name):
            raise CommandError("name must be 1-64 characters of [A-Za-z0-9_.-] starting with a letter or digit")
        if (type(self.scopes) is not tuple or not 0 < len(self.scopes) <= MAX_SCOPES
                or any(type(scope) is not str or scope not in KNOWN_SCOPES for scope in self.scopes)
                or list(self.scopes) != sorted(set(self.scopes))):
            raise CommandError(f"scopes must be a sorted, duplicate-free tuple of {sorted(KNOWN_SCOPES)}")
        if type(self.salt) is not bytes or len(self.salt) != KEY_SALT_BYTES:
            raise CommandError(f"salt must be {KEY_SALT_BYTES} bytes")
        if type(self.digest) is not bytes or len(self.digest) != KEY_DIGEST_BYTES:
            raise CommandError(f"digest must be {KEY_DIGEST_BYTES} bytes")
        _check_int("created_at_ms", self.created_at_ms, 0, MAX_TIMESTAMP_MS)
        _check_actor(self.actor)


@dataclass(frozen=True, slots=True)
class RevokeApiKeyCommand:
    """Remove a runtime API key from the replicated table: every node refuses it once applied."""

    key_id: str
    revoked_at_ms: int
    actor: Actor

    def __post_init__(self) -> None:
        if type(self.key_id) is not str or not KEY_ID_PATTERN.match(self.key_id):
            raise CommandError("key_id must be 16 lowercase hex characters")
        _check_int("revoked_at_ms", self.revoked_at_ms, 0, MAX_TIMESTAMP_MS)
        _check_actor(self.actor)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit record as a node proposes it; sequence number and hashes are added at apply.

    Never a value, never a token: counts, who, what and when."""

    at_ms: int
    node: str
    key_name: str | None
    key_id: str | None
    action: str
    items: int
    found: int
    request_id: str | None
    subject: str | None

    def __post_init__(self) -> None:
        _check_int("audit at_ms", self.at_ms, 0, MAX_TIMESTAMP_MS)
        if type(self.node) is not str or not 0 < len(self.node) <= MAX_NODE_ID_CHARS:
            raise CommandError(f"audit node must be a string of 1 to {MAX_NODE_ID_CHARS} characters")
        _check_optional_text("audit key_name", self.key_name, MAX_PRINCIPAL_CHARS)
        _check_optional_text("audit key_id", self.key_id, MAX_PRINCIPAL_CHARS)
        if type(self.action) is not str or self.action not in AUDIT_ACTIONS:
            raise CommandError(f"audit action must be one of {sorted(AUDIT_ACTIONS)}")
        _check_int("audit items", self.items, 0, MAX_ITEMS)
        _check_int("audit found", self.found, 0, self.items if type(self.items) is int else 0)
        _check_optional_text("audit request_id", self.request_id, MAX_REQUEST_ID_CHARS)
        _check_optional_text("audit subject", self.subject, MAX_SUBJECT_CHARS)

    def fields(self) -> list[Any]:
        """The canonical field order; the audit hash chain covers exactly these."""
        return [self.at_ms, self.node, self.key_name, self.key_id, self.action, self.items, self.found,
                self.request_id, self.subject]


@dataclass(frozen=True, slots=True)
class AuditCommand:
    """A batch of audit records from one node (group commit: one log entry for many detokenizes)."""

    records: tuple[AuditRecord, ...]

    def __post_init__(self) -> None:
        if (type(self.records) is not tuple or not 0 < len(self.records) <= MAX_AUDIT_RECORDS
                or any(type(record) is not AuditRecord for record in self.records)):
            raise CommandError(f"records must be a tuple of 1 to {MAX_AUDIT_RECORDS} audit records")


@dataclass(frozen=True, slots=True)
class DeleteTokensCommand:
    """Remove the mappings of ``tokens`` (those that exist); who asked goes to the audit trail. Card and
    digits tokens (digit strings) are those of ``epoch``; without one, only opaque tokens are removed. A
    command without an epoch encodes exactly as before it could carry one."""

    tokens: tuple[str, ...]
    deleted_at_ms: int
    actor: Actor
    epoch: int | None = None

    def __post_init__(self) -> None:
        if type(self.tokens) is not tuple or not 0 < len(self.tokens) <= MAX_ITEMS:
            raise CommandError(f"tokens must be a tuple of 1 to {MAX_ITEMS} tokens")
        for token in self.tokens:
            if type(token) is not str or not 0 < len(token) <= MAX_TOKEN_CHARS:
                raise CommandError(f"each token must be a string of 1 to {MAX_TOKEN_CHARS} characters")
        _check_int("deleted_at_ms", self.deleted_at_ms, 0, MAX_TIMESTAMP_MS)
        _check_actor(self.actor)
        if self.epoch is not None:  # the store keeps a format token's epoch in 4 bytes
            _check_int("epoch", self.epoch, 1, 2**32 - 1)


@dataclass(frozen=True, slots=True)
class DestroyEpochCommand:
    """Erase ``epoch``'s wrapped secret (crypto-shredding): its ciphertexts can never be decrypted again."""

    epoch: int
    destroyed_at_ms: int
    actor: Actor

    def __post_init__(self) -> None:
        _check_int("epoch", self.epoch, 1, MAX_EPOCH)
        _check_int("destroyed_at_ms", self.destroyed_at_ms, 0, MAX_TIMESTAMP_MS)
        _check_actor(self.actor)


@dataclass(frozen=True, slots=True)
class AuditTrimCommand:
    """Drop every audit record up to ``through_seq``, whose hash must be ``through_hash`` (the operator
    exported the trail that far and kept that hash): it becomes the anchor the rest of the chain starts
    from."""

    through_seq: int
    through_hash: bytes
    trimmed_at_ms: int
    actor: Actor

    def __post_init__(self) -> None:
        _check_int("through_seq", self.through_seq, 1, MAX_TIMESTAMP_MS)
        if type(self.through_hash) is not bytes or len(self.through_hash) != AUDIT_HASH_BYTES:
            raise CommandError(f"through_hash must be {AUDIT_HASH_BYTES} bytes")
        _check_int("trimmed_at_ms", self.trimmed_at_ms, 0, MAX_TIMESTAMP_MS)
        _check_actor(self.actor)


Command = (TokenizeCommand | RotateEpochCommand | CreateApiKeyCommand | RevokeApiKeyCommand | AuditCommand
           | PurgeExpiredCommand | DeleteTokensCommand | DestroyEpochCommand | AuditTrimCommand)


def encode_command(command: Command) -> bytes:
    """Serialize a command; its fields were validated when it was constructed."""
    if type(command) is TokenizeCommand:
        # Tokens and ciphertexts travel as two parallel arrays: fewer msgpack
        # containers to build and parse than one array per pair.
        tokens = [token for token, _ in command.items]
        ciphertexts = [ciphertext for _, ciphertext in command.items]
        fields = [COMMAND_FORMAT_VERSION, TOKENIZE_TAG, command.epoch, tokens, ciphertexts,
                  command.principal, command.idempotency_key, command.fingerprint, command.issued_at_ms]
        if command.extended:
            fields.extend([command.token_format, command.expires_at_ms,
                           None if command.metadata is None else list(command.metadata)])
        if command.item_expires_at_ms is not None or command.carries_lives:
            fields.append(None if command.item_expires_at_ms is None else list(command.item_expires_at_ms))
        if command.carries_lives:
            fields.append(True)
    elif type(command) is RotateEpochCommand:
        fields = [COMMAND_FORMAT_VERSION, ROTATE_EPOCH_TAG, command.epoch, command.wrapped_secret,
                  command.created_at_ms, command.principal, command.idempotency_key, command.fingerprint]
        if command.actor != NO_ACTOR:
            fields.extend(command.actor.fields())
    elif type(command) is CreateApiKeyCommand:
        fields = [COMMAND_FORMAT_VERSION, CREATE_API_KEY_TAG, command.key_id, command.name, list(command.scopes),
                  command.salt, command.digest, command.created_at_ms, *command.actor.fields()]
    elif type(command) is RevokeApiKeyCommand:
        fields = [COMMAND_FORMAT_VERSION, REVOKE_API_KEY_TAG, command.key_id, command.revoked_at_ms,
                  *command.actor.fields()]
    elif type(command) is AuditCommand:
        fields = [COMMAND_FORMAT_VERSION, AUDIT_TAG, [record.fields() for record in command.records]]
    elif type(command) is PurgeExpiredCommand:
        fields = [COMMAND_FORMAT_VERSION, PURGE_EXPIRED_TAG, command.now_ms, command.limit]
    elif type(command) is DeleteTokensCommand:
        fields = [COMMAND_FORMAT_VERSION, DELETE_TOKENS_TAG, list(command.tokens), command.deleted_at_ms,
                  *command.actor.fields()]
        if command.epoch is not None:
            fields.append(command.epoch)
    elif type(command) is DestroyEpochCommand:
        fields = [COMMAND_FORMAT_VERSION, DESTROY_EPOCH_TAG, command.epoch, command.destroyed_at_ms,
                  *command.actor.fields()]
    elif type(command) is AuditTrimCommand:
        fields = [COMMAND_FORMAT_VERSION, AUDIT_TRIM_TAG, command.through_seq, command.through_hash,
                  command.trimmed_at_ms, *command.actor.fields()]
    else:
        raise CommandError("not a vault command")
    encoded: bytes = msgpack.packb(fields, use_bin_type=True)
    if len(encoded) > MAX_COMMAND_BYTES:
        raise CommandError(f"encoded command exceeds {MAX_COMMAND_BYTES} bytes")
    return encoded


def _unpack(data: object) -> list[Any]:
    if type(data) is not bytes:
        raise CommandError("a command must be bytes")
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandError(f"encoded command exceeds {MAX_COMMAND_BYTES} bytes")
    try:
        # The limits refuse oversized containers and strings before anything is
        # allocated for them; maps and extension types are never part of a command.
        fields = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True,
            max_str_len=MAX_TEXT_FIELD_CHARS, max_bin_len=MAX_CIPHERTEXT_BYTES,
            max_array_len=MAX_ITEMS, max_map_len=0, max_ext_len=0)
    except Exception as error:  # msgpack raises many types on garbage; callers see only ours.
        raise CommandError("payload is not a valid msgpack command") from error
    if type(fields) is not list or len(fields) < 2:
        raise CommandError("a command must be an array starting with version and type tag")
    if fields[0] != COMMAND_FORMAT_VERSION or type(fields[0]) is not int:
        raise CommandError("unsupported command format version")
    return fields


def _decode_tokenize(fields: list[Any]) -> TokenizeCommand:
    if len(fields) not in (9, 12, 13, 14):
        raise CommandError("a tokenize command has 9 fields, 12 with format, expiry and metadata, 13 with "
                           "an expiry per item, or 14 when it carries lives over")
    _, _, epoch, tokens, ciphertexts, principal, idempotency_key, fingerprint, issued_at_ms = fields[:9]
    if type(tokens) is not list or type(ciphertexts) is not list or len(tokens) != len(ciphertexts):
        raise CommandError("tokens and ciphertexts must be arrays of equal length")
    token_format, expires_at_ms, metadata = fields[9:12] if len(fields) >= 12 else (OPAQUE_FORMAT, None, None)
    if metadata is not None:
        if type(metadata) is not list:
            raise CommandError("metadata must be null or an array")
        metadata = tuple(metadata)
    item_expires_at_ms = None
    if len(fields) == 13:
        if type(fields[12]) is not list:
            raise CommandError("item_expires_at_ms must be an array in a 13-field tokenize command")
        item_expires_at_ms = tuple(fields[12])
    if len(fields) == 14:
        if fields[13] is not True:
            raise CommandError("the 14th field of a tokenize command is true (it carries lives over)")
        if fields[12] is not None and type(fields[12]) is not list:
            raise CommandError("item_expires_at_ms must be null or an array in a 14-field tokenize command")
        item_expires_at_ms = None if fields[12] is None else tuple(fields[12])
    command = TokenizeCommand(epoch=epoch, items=tuple(zip(tokens, ciphertexts)), principal=principal,
                              idempotency_key=idempotency_key, fingerprint=fingerprint,
                              issued_at_ms=issued_at_ms, token_format=token_format,
                              expires_at_ms=expires_at_ms, metadata=metadata, item_expires_at_ms=item_expires_at_ms,
                              carries_lives=len(fields) == 14)
    if len(fields) == 12 and not command.extended:
        raise CommandError("a tokenize command without format, expiry or metadata has 9 fields")
    return command


def _decode_purge(fields: list[Any]) -> PurgeExpiredCommand:
    if len(fields) != 4:
        raise CommandError("a purge-expired command has 4 fields")
    return PurgeExpiredCommand(now_ms=fields[2], limit=fields[3])


def _decode_rotate(fields: list[Any]) -> RotateEpochCommand:
    if len(fields) not in (8, 12):
        raise CommandError("a rotate-epoch command has 8 fields, or 12 with its actor")
    _, _, epoch, wrapped_secret, created_at_ms, principal, idempotency_key, fingerprint = fields[:8]
    actor = Actor(*fields[8:]) if len(fields) == 12 else NO_ACTOR
    return RotateEpochCommand(epoch=epoch, wrapped_secret=wrapped_secret, created_at_ms=created_at_ms,
                              principal=principal, idempotency_key=idempotency_key,
                              fingerprint=fingerprint, actor=actor)


def _decode_create_key(fields: list[Any]) -> CreateApiKeyCommand:
    if len(fields) != 12:
        raise CommandError("a create-API-key command has 12 fields")
    _, _, key_id, name, scopes, salt, digest, created_at_ms = fields[:8]
    if type(scopes) is not list or len(scopes) > MAX_SCOPES:
        raise CommandError(f"scopes must be an array of at most {MAX_SCOPES} scopes")
    return CreateApiKeyCommand(key_id=key_id, name=name, scopes=tuple(scopes), salt=salt, digest=digest,
                               created_at_ms=created_at_ms, actor=Actor(*fields[8:]))


def _decode_revoke_key(fields: list[Any]) -> RevokeApiKeyCommand:
    if len(fields) != 8:
        raise CommandError("a revoke-API-key command has 8 fields")
    _, _, key_id, revoked_at_ms = fields[:4]
    return RevokeApiKeyCommand(key_id=key_id, revoked_at_ms=revoked_at_ms, actor=Actor(*fields[4:]))


def _decode_audit(fields: list[Any]) -> AuditCommand:
    if len(fields) != 3 or type(fields[2]) is not list or not 0 < len(fields[2]) <= MAX_AUDIT_RECORDS:
        raise CommandError(f"an audit command has 3 fields, the last 1 to {MAX_AUDIT_RECORDS} records")
    records = []
    for record in fields[2]:
        if type(record) is not list or len(record) != AUDIT_RECORD_FIELDS:
            raise CommandError(f"each audit record is an array of {AUDIT_RECORD_FIELDS} fields")
        records.append(AuditRecord(*record))
    return AuditCommand(records=tuple(records))


def _decode_delete_tokens(fields: list[Any]) -> DeleteTokensCommand:
    if len(fields) not in (8, 9) or type(fields[2]) is not list:
        raise CommandError("a delete-tokens command has 8 or 9 fields, the first an array of tokens")
    epoch = fields[8] if len(fields) == 9 else None
    return DeleteTokensCommand(tokens=tuple(fields[2]), deleted_at_ms=fields[3], actor=Actor(*fields[4:8]),
                               epoch=epoch)


def _decode_destroy_epoch(fields: list[Any]) -> DestroyEpochCommand:
    if len(fields) != 8:
        raise CommandError("a destroy-epoch command has 8 fields")
    return DestroyEpochCommand(epoch=fields[2], destroyed_at_ms=fields[3], actor=Actor(*fields[4:]))


def _decode_audit_trim(fields: list[Any]) -> AuditTrimCommand:
    if len(fields) != 9:
        raise CommandError("an audit-trim command has 9 fields")
    return AuditTrimCommand(through_seq=fields[2], through_hash=fields[3], trimmed_at_ms=fields[4],
                            actor=Actor(*fields[5:]))


_DECODERS: dict[int, Callable[[list[Any]], Command]] = {TOKENIZE_TAG: _decode_tokenize, ROTATE_EPOCH_TAG: _decode_rotate,
             CREATE_API_KEY_TAG: _decode_create_key, REVOKE_API_KEY_TAG: _decode_revoke_key,
             AUDIT_TAG: _decode_audit, PURGE_EXPIRED_TAG: _decode_purge, DELETE_TOKENS_TAG: _decode_delete_tokens,
             DESTROY_EPOCH_TAG: _decode_destroy_epoch, AUDIT_TRIM_TAG: _decode_audit_trim}

# Commands whose apply removes secrets or ciphertexts from the store, so the node then also
# removes the log entries that carried them (tokenvault/core/shred.py).
SHREDDING_TAGS = frozenset({DELETE_TOKENS_TAG, DESTROY_EPOCH_TAG})


def peek_tag(payload: bytes) -> int | None:
    """The type tag of an encoded command without decoding it (None when it is not where every
    command of this version puts it: a fixarray, the version, then a positive fixint tag)."""
    if len(payload) >= 3 and 0x92 <= payload[0] <= 0x9F and payload[1] == COMMAND_FORMAT_VERSION and payload[2] < 0x80:
        return payload[2]
    return None


def decode_command(data: bytes) -> Command:
    """Parse and validate a command; raises CommandError (only) on anything malformed."""
    fields = _unpack(data)
    tag = fields[1]
    decoder = _DECODERS.get(tag) if type(tag) is int else None
    if decoder is None:
        raise CommandError("unknown command type tag")
    return decoder(fields)
