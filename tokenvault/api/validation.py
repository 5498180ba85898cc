"""Checks of request items shared by the HTTP layer and the primary's forwarded-request path.

A request reaches the service either from a client through tokenvault/api/http.py
or from a backup over the peer link (tokenvault/api/service.py, forwarded
requests). Both run the same functions here, so a request the HTTP layer would
refuse is refused by the primary too, whoever sent it.

``check_json_structure`` is the cheap bound that runs on the raw body before
it is parsed: it counts the JSON values a body holds with a few C-speed passes
over the bytes (no Python loop per byte or per value), so a body of millions of
tiny values (``[{},{},...]``) is refused before ``json`` builds millions of
objects. Errors name what is wrong by field and position, never the content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from tokenvault.crypto import formats
from tokenvault.errors import InvalidRequest, PayloadTooLarge, UnprocessableValue
from tokenvault.crypto.tokens import is_token

# Printable ASCII is 0x20-0x7E; HTTP parsing already strips surrounding spaces.
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[\x20-\x7e]{1,255}\Z")
# The JSON values a request may hold beyond its item list: member names, the
# document itself, small optional members. Generous, since the point is only to
# keep the count proportional to max_items rather than to the body's size.
STRUCTURE_SLACK_VALUES = 1024
# After escapes are neutralised a JSON string is a quote, any non-quotes, a
# quote; the possessive quantifier never backtracks.
_STRING = re.compile(rb'"[^"]*+"')


class ItemLimits(Protocol):
    """What the item checks need: HttpLimits and the node config's LimitsConfig both have it."""

    @property
    def max_items(self) -> int: ...

    @property
    def max_value_bytes(self) -> int: ...


def max_json_values(limits: ItemLimits) -> int:
    """The most JSON values (strings, numbers, containers, member names) an allowed request holds."""
    return limits.max_items + STRUCTURE_SLACK_VALUES


def check_json_structure(body: bytes, max_values: int) -> None:
    """400 when the quotes of ``body`` do not pair or it holds more than STRUCTURE_SLACK_VALUES arrays
    and objects; 413 when it holds more than ``max_values`` strings, or more than ``max_values`` JSON values.

    Memory is a few copies of the body, time a few passes at C speed (20 to
    31 ms for 8 MiB, linear: bench/body_scan.py). For valid JSON the count is exact but for empty arrays
    and objects, which count twice; for invalid JSON it may be anything, and
    the parser that runs next refuses such a body anyway.
    """
    # An escape is a backslash and one character, read left to right: drop the
    # escaped backslashes first, then what remains before a quote escapes it.
    neutral = body.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    quotes = neutral.count(b'"')
    if quotes % 2:
        raise InvalidRequest("the request body is not valid JSON (a string is not closed)")
    if quotes // 2 > max_values:
        raise PayloadTooLarge(f"the request body holds more than {max_values} JSON strings")
    skeleton = _STRING.sub(b'""', neutral)
    containers = skeleton.count(b"[") + skeleton.count(b"{")
    if containers > STRUCTURE_SLACK_VALUES:
        # Items are strings: no allowed request holds more than a few arrays and objects.
        raise InvalidRequest(f"the request body holds more than {STRUCTURE_SLACK_VALUES} JSON arrays and objects "
                             "(or nests them too deeply)")
    # Outside strings every value but the first follows a ',' or ':' or is the first in its container:
    # an upper bound, exact but for an empty array or object, which counts twice.
    values = 1 + skeleton.count(b",") + skeleton.count(b":") + containers
    if values > max_values:
        raise PayloadTooLarge(f"the request body holds more than {max_values} JSON values")


def validate_idempotency_key(value: str) -> str:
    """An Idempotency-Key is 1-255 printable ASCII characters."""
    if IDEMPOTENCY_KEY_PATTERN.match(value) is None:
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters")
    return value


def require_item_list(document: dict[str, Any], member: str, limits: ItemLimits) -> list[Any]:
    """A non-empty JSON array of at most max_items items (413 past the limit)."""
    items = document[member]
    if not isinstance(items, list):
        raise InvalidRequest(f"'{member}' must be an array of strings")
    if not items:
        raise InvalidRequest(f"'{member}' must not be empty")
    if len(items) > limits.max_items:
        raise PayloadTooLarge(f"'{member}' has {len(items)} items; at most {limits.max_items} are allowed")
    return items


def validate_values(items: list[Any], limits: ItemLimits) -> list[str]:
    """Every value is a non-empty string of valid Unicode of at most max_value_bytes UTF-8 bytes."""
    for position, value in enumerate(items):
        if not isinstance(value, str):
            raise InvalidRequest(f"values[{position}] must be a string")
        if not value:
            raise InvalidRequest(f"values[{position}] must not be empty")
        try:
            size_bytes = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            # A lone surrogate escape such as "\ud800" is valid JSON but not Unicode text.
            raise InvalidRequest(f"values[{position}] is not valid Unicode text") from None
        if size_bytes > limits.max_value_bytes:
            raise InvalidRequest(
                f"values[{position}] is {size_bytes} UTF-8 bytes; at most {limits.max_value_bytes} are allowed"
            )
    return items


def validate_tokens(items: list[Any]) -> list[str]:
    """Every token is a string of the token grammar tv<epoch>_<body>."""
    for position, token in enumerate(items):
        if not isinstance(token, str):
            raise InvalidRequest(f"tokens[{position}] must be a string")
        if not is_token(token):
            raise InvalidRequest(f"tokens[{position}] is not a token (expected tv<epoch>_<base32 body>)")
    return items


# ---------------------------------------------------------------- version 2: formats, metadata, expiry

MAX_METADATA_BYTES = 1024
MIN_TTL_SECONDS = 1
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600  # ten years of 365 days
MAX_LOOKUP_EPOCH = 2**32 - 1  # the store keeps epochs in 4 bytes (tokenvault/core/store_layout.py MAX_STORED_EPOCH)


@dataclass(frozen=True, slots=True)
class TokenizeOptions:
    """The version 2 members of a tokenize request, checked (validate_options)."""

    token_format: str = formats.OPAQUE
    metadata_json: str | None = None
    ttl_seconds: int | None = None

    @property
    def extended(self) -> bool:
        return self != TokenizeOptions()

    @property
    def answerable_as_read(self) -> bool:
        """A request without TTL or metadata changes nothing when every mapping exists and lives."""
        return self.metadata_json is None and self.ttl_seconds is None

    @property
    def merges_with_ttl(self) -> bool:
        """An opaque request with a TTL and no metadata: group commit merges it with others, each item
        with its own expiry (tokenvault/api/coalesce.py)."""
        return self.token_format == formats.OPAQUE and self.metadata_json is None and self.ttl_seconds is not None

    def forwarded(self) -> dict[str, Any]:
        return {"token_format": self.token_format, "metadata_json": self.metadata_json,
                "ttl_seconds": self.ttl_seconds}


def canonical_metadata(document: object) -> str:
    """A request's ``metadata`` as canonical JSON text (sorted keys, no spaces): 400 unless a JSON
    object, 422 when its UTF-8 encoding is longer than MAX_METADATA_BYTES."""
    if not isinstance(document, dict):
        raise InvalidRequest("'metadata' must be a JSON object")
    try:
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (RecursionError, ValueError):
        raise InvalidRequest("'metadata' is nested too deeply") from None
    try:
        size_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidRequest("'metadata' holds text that is not valid Unicode") from None
    if size_bytes > MAX_METADATA_BYTES:
        raise UnprocessableValue(f"'metadata' is {size_bytes} bytes as canonical JSON; at most "
                                 f"{MAX_METADATA_BYTES} are allowed")
    return text


def validate_metadata_json(text: object) -> str:
    """Metadata text as it travels between nodes: canonical_metadata of a JSON object, unchanged."""
    if not isinstance(text, str) or len(text) > MAX_METADATA_BYTES:
        raise InvalidRequest("metadata must be the canonical JSON text of an object")
    try:
        document = json.loads(text)
    except ValueError:
        raise InvalidRequest("metadata must be the canonical JSON text of an object") from None
    if canonical_metadata(document) != text:
        raise InvalidRequest("metadata must be the canonical JSON text of an object")
    return text


def validate_ttl(ttl_seconds: object) -> int:
    """400 unless an integer, 422 unless in [MIN_TTL_SECONDS, MAX_TTL_SECONDS]."""
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int):
        raise InvalidRequest("'ttl_seconds' must be an integer")
    if not MIN_TTL_SECONDS <= ttl_seconds <= MAX_TTL_SECONDS:
        raise UnprocessableValue(f"'ttl_seconds' must be between {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS} "
                                 "(ten years)")
    return ttl_seconds


def validate_options(token_format: object, metadata_json: object, ttl_seconds: object) -> TokenizeOptions:
    if not isinstance(token_format, str) or token_format not in formats.FORMATS:
        raise InvalidRequest(f"'format' must be one of {list(formats.FORMATS)}")
    return TokenizeOptions(token_format,
                           None if metadata_json is None else validate_metadata_json(metadata_json),
                           None if ttl_seconds is None else validate_ttl(ttl_seconds))


def normalize_values(values: list[str], token_format: str) -> list[str]:
    """The values as stored for ``token_format`` (card numbers without separators); 422 for a value
    that does not fit it, naming its position and the rule, never the value."""
    if token_format == formats.OPAQUE:
        return values
    normalized = []
    for position, value in enumerate(values):
        try:
            normalized.append(formats.normalize(token_format, value))
        except formats.FormatError as error:
            raise UnprocessableValue(f"values[{position}] does not fit format '{token_format}': {error}") from None
    return normalized


def validate_lookup_tokens(items: list[Any]) -> list[str]:
    """Detokenize's tokens: opaque tokens (tv<epoch>_<body>) or card and digits tokens (6-128 digits)."""
    for position, token in enumerate(items):
        if not isinstance(token, str):
            raise InvalidRequest(f"tokens[{position}] must be a string")
        if not is_token(token) and not formats.is_format_token(token):
            raise InvalidRequest(f"tokens[{position}] is not a token (expected tv<epoch>_<base32 body>, "
                                 f"or {formats.DIGITS_MIN_LENGTH}-{formats.DIGITS_MAX_LENGTH} digits)")
    return items


def lookup_tokens_and_epoch(document: dict[str, Any], limits: ItemLimits) -> tuple[list[str], int | None]:
    """A request body's ``tokens`` (opaque, card or digits) and its optional ``epoch``, where card and digits
    tokens are (detokenize, delete, re-tokenize); ``"epoch": null`` is refused rather than read as absent."""
    tokens = validate_lookup_tokens(require_item_list(document, "tokens", limits))
    if "epoch" in document and document["epoch"] is None:
        raise InvalidRequest("'epoch' must be an integer when given")
    return tokens, validate_lookup_epoch(document.get("epoch"))


def validate_lookup_epoch(epoch: object) -> int | None:
    """Detokenize's optional ``epoch`` (for card and digits tokens)."""
    return None if epoch is None else validate_epoch(epoch)


def validate_epoch(epoch: object) -> int:
    """An epoch number as the store keeps it: an integer in [1, 2**32 - 1] (400 otherwise)."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= MAX_LOOKUP_EPOCH:
        raise InvalidRequest(f"'epoch' must be an integer in [1, {MAX_LOOKUP_EPOCH}]")
    return epoch


def validate_sealed_items(items: object, count: int) -> list[tuple[str, bytes]]:
    """A worker's (or a backup's worker's) sealed pairs: exactly one [token, ciphertext] per value (400)."""
    if (not isinstance(items, list) or len(items) != count
            or not all(isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                       and isinstance(item[1], bytes) for item in items)):
        raise InvalidRequest("items must be one [token, ciphertext] pair per value")
    return [(token, ciphertext) for token, ciphertext in items]


# A tokenize sealed already, as an HTTP worker hands it to its core and a backup forwards one with a format,
# a TTL or metadata to the primary: exactly these members.
SEALED_TOKENIZE_MEMBERS = ("principal", "epoch", "values", "items", "token_format", "metadata_json", "ttl_seconds",
                           "metadata")


@dataclass(frozen=True, slots=True)
class SealedTokenize:
    epoch: int
    values: list[str]
    items: list[tuple[str, bytes]]
    options: TokenizeOptions
    metadata: list[bytes] | None


def validate_sealed_tokenize(arguments: dict[str, Any], limits: ItemLimits) -> SealedTokenize:
    """A sealed tokenize's members (SEALED_TOKENIZE_MEMBERS; the principal is the caller's to check):
    the values and the version 2 options as any tokenize's (400 / 422; the values are normalized by the
    service), one [token, ciphertext] pair per value, digit-string tokens for card and digits, and one
    metadata ciphertext per value exactly when the request has metadata."""
    values = validate_values(require_item_list(arguments, "values", limits), limits)
    options = validate_options(arguments["token_format"], arguments["metadata_json"], arguments["ttl_seconds"])
    items = validate_sealed_items(arguments["items"], len(values))
    if options.token_format != formats.OPAQUE and not all(formats.is_format_token(token) for token, _ in items):
        raise InvalidRequest("card and digits tokens are strings of digits")
    metadata = arguments["metadata"]
    if options.metadata_json is None:
        if metadata is not None:
            raise InvalidRequest("metadata ciphertexts come only with metadata_json")
    elif (not isinstance(metadata, list) or len(metadata) != len(values)
          or not all(isinstance(ciphertext, bytes) for ciphertext in metadata)):
        raise InvalidRequest("metadata must be one ciphertext per value")
    return SealedTokenize(validate_epoch(arguments["epoch"]), values, items, options, metadata)


def require_members(document: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The body as a JSON object holding the ``required`` members and perhaps some ``optional`` ones."""
    if not isinstance(document, dict):
        raise InvalidRequest("the request body must be a JSON object")
    unknown = len(set(document) - set(required) - set(optional))
    if unknown:
        raise InvalidRequest(f"the request body has {unknown} unknown member(s); allowed: {list(required + optional)}")
    for name in required:
        if name not in document:
            raise InvalidRequest(f"the request body must have a '{name}' member")
    return document
