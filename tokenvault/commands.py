"""Vault commands: the payloads of replicated log entries.

Every state change of the vault is one of these commands, proposed by the
primary, replicated in the log and applied by ``tokenvault.store``. A command
carries everything the primary decided (tokens, ciphertexts, the wrapped epoch
secret, timestamps), so applying it is a pure function of the log.

Wire format: a msgpack array ``[format_version, type_tag, field, ...]``. The
decoder treats its input as hostile: msgpack limits cap every container and
string before allocation, every field is checked for its exact type and bounds,
and any problem raises ``CommandError`` and nothing else. Error messages name
the field that is wrong but never echo its content.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

COMMAND_FORMAT_VERSION = 1
TOKENIZE_TAG = 1
ROTATE_EPOCH_TAG = 2

MAX_ITEMS = 100_000
MAX_TOKEN_CHARS = 128
# The largest configurable value is 1 MiB; AES-SIV adds a 16-byte tag.
MAX_CIPHERTEXT_BYTES = (1 << 20) + 16
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


class CommandError(ValueError):
    """A command is malformed. The message names the field, never its content."""


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
    """Insert a batch of (token, ciphertext) pairs issued in ``epoch``, optionally idempotent."""

    epoch: int
    items: tuple[tuple[str, bytes], ...]
    principal: str | None
    idempotency_key: str | None
    fingerprint: bytes | None
    issued_at_ms: int

    def __post_init__(self) -> None:
        _check_int("epoch", self.epoch, 1, MAX_EPOCH)
        _check_items(self.items)
        _check_idempotency(self.principal, self.idempotency_key, self.fingerprint)
        _check_int("issued_at_ms", self.issued_at_ms, 0, MAX_TIMESTAMP_MS)


@dataclass(frozen=True, slots=True)
class RotateEpochCommand:
    """Make ``epoch`` the active epoch, with its secret wrapped by the master key."""

    epoch: int
    wrapped_secret: bytes
    created_at_ms: int
    principal: str | None
    idempotency_key: str | None
    fingerprint: bytes | None

    def __post_init__(self) -> None:
        _check_int("epoch", self.epoch, 1, MAX_EPOCH)
        if type(self.wrapped_secret) is not bytes or not 0 < len(self.wrapped_secret) <= MAX_WRAPPED_SECRET_BYTES:
            raise CommandError(f"wrapped_secret must be 1 to {MAX_WRAPPED_SECRET_BYTES} bytes")
        _check_int("created_at_ms", self.created_at_ms, 0, MAX_TIMESTAMP_MS)
        _check_idempotency(self.principal, self.idempotency_key, self.fingerprint)


Command = TokenizeCommand | RotateEpochCommand


def encode_command(command: Command) -> bytes:
    """Serialize a command; its fields were validated when it was constructed."""
    if type(command) is TokenizeCommand:
        # Tokens and ciphertexts travel as two parallel arrays: fewer msgpack
        # containers to build and parse than one array per pair.
        tokens = [token for token, _ in command.items]
        ciphertexts = [ciphertext for _, ciphertext in command.items]
        fields = [COMMAND_FORMAT_VERSION, TOKENIZE_TAG, command.epoch, tokens, ciphertexts,
                  command.principal, command.idempotency_key, command.fingerprint, command.issued_at_ms]
    elif type(command) is RotateEpochCommand:
        fields = [COMMAND_FORMAT_VERSION, ROTATE_EPOCH_TAG, command.epoch, command.wrapped_secret,
                  command.created_at_ms, command.principal, command.idempotency_key, command.fingerprint]
    else:
        raise CommandError("not a vault command")
    encoded = msgpack.packb(fields, use_bin_type=True)
    if len(encoded) > MAX_COMMAND_BYTES:
        raise CommandError(f"encoded command exceeds {MAX_COMMAND_BYTES} bytes")
    return encoded


def _unpack(data: object) -> list:
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


def _decode_tokenize(fields: list) -> TokenizeCommand:
    if len(fields) != 9:
        raise CommandError("a tokenize command has 9 fields")
    _, _, epoch, tokens, ciphertexts, principal, idempotency_key, fingerprint, issued_at_ms = fields
    if type(tokens) is not list or type(ciphertexts) is not list or len(tokens) != len(ciphertexts):
        raise CommandError("tokens and ciphertexts must be arrays of equal length")
    return TokenizeCommand(epoch=epoch, items=tuple(zip(tokens, ciphertexts)), principal=principal,
                           idempotency_key=idempotency_key, fingerprint=fingerprint,
                           issued_at_ms=issued_at_ms)


def _decode_rotate(fields: list) -> RotateEpochCommand:
    if len(fields) != 8:
        raise CommandError("a rotate-epoch command has 8 fields")
    _, _, epoch, wrapped_secret, created_at_ms, principal, idempotency_key, fingerprint = fields
    return RotateEpochCommand(epoch=epoch, wrapped_secret=wrapped_secret, created_at_ms=created_at_ms,
                              principal=principal, idempotency_key=idempotency_key,
                              fingerprint=fingerprint)


def decode_command(data: bytes) -> Command:
    """Parse and validate a command; raises CommandError (only) on anything malformed."""
    fields = _unpack(data)
    tag = fields[1]
    if type(tag) is int and tag == TOKENIZE_TAG:
        return _decode_tokenize(fields)
    if type(tag) is int and tag == ROTATE_EPOCH_TAG:
        return _decode_rotate(fields)
    raise CommandError("unknown command type tag")
