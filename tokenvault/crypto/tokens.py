"""The token grammar: ``tv<epoch>_<body>``.

``<epoch>`` is the decimal epoch the token was issued in (an integer >= 1, no
leading zeros) and ``<body>`` is lowercase, unpadded base32 (``[a-z2-7]``).
Tokens this service issues always have a 32-character body (20 bytes, 160
bits). The parser accepts the wider contract grammar (a body of at least 26
characters) so that a well-formed token we did not issue is answered with
"unknown" rather than rejected as malformed; its total length is bounded so
hostile input never costs more than a bounded amount of work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOKEN_PREFIX = "tv"
TOKEN_BODY_BYTES = 20
TOKEN_BODY_CHARS = 32
MIN_BODY_CHARS = 26
MAX_TOKEN_CHARS = 128
# The grammar accepts epochs up to a signed 64-bit integer; the store keeps far
# fewer (tokenvault/core/store.py MAX_STORED_EPOCH), so a larger one is never found.
MAX_EPOCH = 2**63 - 1

# \Z rather than $ so that a trailing newline is not accepted, and [0-9]
# rather than \d so that non-ASCII digits are not accepted.
_TOKEN_PATTERN = re.compile(r"tv([1-9][0-9]*)_([a-z2-7]{26,})\Z")


_BASE32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
# Every pair of base32 characters (10 bits), so a 160-bit body is encoded with
# 16 table lookups; this is about twice as fast as base64.b32encode().lower()
# and token bodies are computed for every tokenized value. encode_token_body
# relies on TOKEN_BODY_BYTES == 20 (two halves of 80 bits, 8 pairs each).
_BASE32_PAIRS = tuple(first + second for first in _BASE32_ALPHABET for second in _BASE32_ALPHABET)


class TokenFormatError(ValueError):
    """The text is not a token. The message never contains the text itself."""


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A token split into its parts. ``epoch`` may exceed MAX_EPOCH for a
    well-formed token that this service can never have issued."""

    epoch: int
    body: str


def format_token(epoch: int, body_bytes: bytes) -> str:
    """Build the token for ``epoch`` from the 20 body bytes (a truncated HMAC)."""
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError("epoch must be an int")
    if not 1 <= epoch <= MAX_EPOCH:
        raise ValueError("epoch out of range")
    if not isinstance(body_bytes, (bytes, bytearray, memoryview)):
        raise TypeError("body_bytes must be bytes")
    if len(body_bytes) != TOKEN_BODY_BYTES:
        raise ValueError(f"token body must be exactly {TOKEN_BODY_BYTES} bytes")
    return f"{TOKEN_PREFIX}{epoch}_{encode_token_body(bytes(body_bytes))}"


def encode_token_body(body_bytes: bytes) -> str:
    """Lowercase, unpadded base32 of exactly 20 bytes: 32 characters of
    [a-z2-7]. Equal to base64.b32encode(body_bytes).lower() (RFC 4648); 20 bytes
    are a multiple of 5, so there is no padding."""
    if len(body_bytes) != TOKEN_BODY_BYTES:
        raise ValueError(f"token body must be exactly {TOKEN_BODY_BYTES} bytes")
    # Two 80-bit halves and the lookups written out: small integers shift faster
    # than one 160-bit one, and there is no loop (measured about 1.4x faster).
    pairs = _BASE32_PAIRS
    high = int.from_bytes(body_bytes[:10], "big")
    low = int.from_bytes(body_bytes[10:], "big")
    return "".join((pairs[high >> 70], pairs[(high >> 60) & 1023], pairs[(high >> 50) & 1023],
                    pairs[(high >> 40) & 1023], pairs[(high >> 30) & 1023], pairs[(high >> 20) & 1023],
                    pairs[(high >> 10) & 1023], pairs[high & 1023],
                    pairs[low >> 70], pairs[(low >> 60) & 1023], pairs[(low >> 50) & 1023],
                    pairs[(low >> 40) & 1023], pairs[(low >> 30) & 1023], pairs[(low >> 20) & 1023],
                    pairs[(low >> 10) & 1023], pairs[low & 1023]))


def parse_token(text: object) -> ParsedToken:
    """Split ``text`` into epoch and body, or raise TokenFormatError."""
    if not isinstance(text, str):
        raise TokenFormatError("a token must be a string")
    if len(text) > MAX_TOKEN_CHARS:
        raise TokenFormatError(f"a token has at most {MAX_TOKEN_CHARS} characters")
    match = _TOKEN_PATTERN.match(text)
    if match is None:
        raise TokenFormatError("not a token: expected tv<epoch>_<base32 body>")
    return ParsedToken(epoch=int(match.group(1)), body=match.group(2))


def is_token(text: object) -> bool:
    """True when ``text`` is of the token grammar."""
    if not isinstance(text, str) or len(text) > MAX_TOKEN_CHARS:
        return False
    return _TOKEN_PATTERN.match(text) is not None
