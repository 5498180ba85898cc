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

import re
from typing import Any, Protocol

from tokenvault.errors import InvalidRequest, PayloadTooLarge
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

    Memory is a few copies of the body, time a few passes at C speed (about
    50 ms for 8 MiB). For valid JSON the count is exact but for empty arrays
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
