"""Format-preserving tokens: ``card`` and ``digits`` (docs/tokens.md explains the choices).

Both are computed with FF1 (tokenvault.crypto.ff1) under the epoch's format
key, so within one epoch, format and length the map from values to tokens is
a permutation: two different values never get the same token, without any
lookup. The vault still stores every mapping (the token is not decrypted on
detokenize; the value's AES-SIV ciphertext is), so FF1 only has to make tokens
unique, deterministic and of the right shape.

``card``: the value is a card number, 13 to 19 ASCII digits once spaces and
dashes are removed, that passes the Luhn check (a real card number always
does). The token has the same number of digits and keeps the last four; the
leading ``m = n - 4`` digits ("the head") are replaced:

1. the head's last digit is raised by one (mod 10). That digit sits at an odd
   position counted from the right, which the Luhn sum does not double, so
   the sum moves by exactly one: a Luhn-valid number becomes an invalid one,
   and the step is a bijection on heads;
2. FF1 encrypts the head, tweaked with the kept digits and the length, again
   and again until the head and the kept digits fail the Luhn check
   ("cycle-walking"). FF1 is a permutation of the heads, and the start of the
   walk is itself Luhn-invalid, so the walk stops, and it is a permutation of
   the Luhn-invalid heads: injective.

So a card token is never Luhn-valid, and never equal to its value (which is).
A value that is not Luhn-valid is refused: there are ten times more digit
strings than Luhn-valid ones and only nine tenths of them are Luhn-invalid,
so no injective map from every digit string to Luhn-invalid tokens exists.

``digits``: any string of ASCII digits of DIGITS_MIN_LENGTH (a domain of at
least 10**6, FF1's floor) to DIGITS_MAX_LENGTH; the token is FF1 of the whole
string, the same length. Its tokens may be Luhn-valid: use ``card`` for cards.
"""

from __future__ import annotations

from tokenvault.crypto.ff1 import Ff1, digits_to_numerals, numerals_to_digits

OPAQUE = "opaque"
CARD = "card"
DIGITS = "digits"
FORMATS = (OPAQUE, CARD, DIGITS)
CARD_MIN_DIGITS = 13
CARD_MAX_DIGITS = 19
CARD_KEPT_DIGITS = 4
DIGITS_MIN_LENGTH = 6
DIGITS_MAX_LENGTH = 128  # the longest token a command carries (tokenvault.core.commands.MAX_TOKEN_CHARS)
FORMAT_KEY_BYTES = 32
# Cycle-walking steps before giving up: each step leaves with probability 9/10 at least,
# so more than this many is an impossibility, asserted rather than looped on forever.
MAX_CYCLE_WALK_STEPS = 1000
_CARD_SEPARATORS = str.maketrans("", "", " -")
# Tweaks stay short so that FF1's Q is one AES block per round (a 21-byte tweak needs two): the
# card tweak is its length byte and the four kept digits, the digits tweak a label.
_DIGITS_TWEAK = b"digits"


class FormatError(ValueError):
    """A value does not fit the requested format. The message never contains the value."""


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of ASCII decimal digits, the check digit last."""
    total = 0
    for position, character in enumerate(reversed(digits)):
        digit = ord(character) - 48
        if position % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def normalize_card(value: str) -> str:
    """The card number's digits without spaces and dashes; FormatError unless 13-19 digits, Luhn-valid."""
    digits = value.translate(_CARD_SEPARATORS)
    if not digits.isascii() or not digits.isdigit():
        raise FormatError("a card number holds only digits, spaces and dashes")
    if not CARD_MIN_DIGITS <= len(digits) <= CARD_MAX_DIGITS:
        raise FormatError(f"a card number has {CARD_MIN_DIGITS} to {CARD_MAX_DIGITS} digits")
    if not luhn_valid(digits):
        raise FormatError("a card number passes the Luhn check")
    return digits


def check_digits(value: str) -> str:
    """The value itself if it is DIGITS_MIN_LENGTH to DIGITS_MAX_LENGTH ASCII digits, else FormatError."""
    if not value.isascii() or not value.isdigit():
        raise FormatError("a digits value holds only the digits 0-9")
    if not DIGITS_MIN_LENGTH <= len(value) <= DIGITS_MAX_LENGTH:
        raise FormatError(f"a digits value has {DIGITS_MIN_LENGTH} to {DIGITS_MAX_LENGTH} digits")
    return value


def normalize(format_name: str, value: str) -> str:
    """The value as it is stored and returned for ``format_name`` (cards lose their separators)."""
    if format_name == CARD:
        return normalize_card(value)
    if format_name == DIGITS:
        return check_digits(value)
    if format_name == OPAQUE:
        return value
    raise FormatError("unknown token format")


def is_format_token(text: object) -> bool:
    """Whether ``text`` has the shape of a card or digits token (only digits, a possible length)."""
    return (isinstance(text, str) and DIGITS_MIN_LENGTH <= len(text) <= DIGITS_MAX_LENGTH
            and text.isascii() and text.isdigit())


class FormatKeys:
    """The FF1 cipher of one epoch's format key; computes card and digits tokens."""

    __slots__ = ("_ff1",)

    def __init__(self, format_key: bytes) -> None:
        if not isinstance(format_key, bytes) or len(format_key) != FORMAT_KEY_BYTES:
            raise ValueError(f"a format key is {FORMAT_KEY_BYTES} bytes")
        self._ff1 = Ff1(format_key, 10)

    def __repr__(self) -> str:
        return "FormatKeys(<redacted>)"

    def card_token(self, digits: str) -> str:
        """The card token of normalized, Luhn-valid card digits (normalize_card's result)."""
        kept = digits[-CARD_KEPT_DIGITS:]
        head = digits_to_numerals(digits[:-CARD_KEPT_DIGITS])
        head[-1] = (head[-1] + 1) % 10
        tweak = bytes([len(digits)]) + kept.encode("ascii")
        for _ in range(MAX_CYCLE_WALK_STEPS):
            head = self._ff1.encrypt(head, tweak)
            token = numerals_to_digits(head) + kept
            if not luhn_valid(token):
                return token
        raise AssertionError("cycle-walking did not leave the Luhn-valid numbers")

    def digits_token(self, digits: str) -> str:
        """The digits token of a check_digits value."""
        return numerals_to_digits(self._ff1.encrypt(digits_to_numerals(digits), _DIGITS_TWEAK))

    def token_for(self, format_name: str, normalized: str) -> str:
        if format_name == CARD:
            return self.card_token(normalized)
        if format_name == DIGITS:
            return self.digits_token(normalized)
        raise FormatError("not a format-preserving token format")


MASK_CHARACTER = "*"
MASK_KEPT_CHARACTERS = 4


def mask_value(value: str) -> str:
    """The value as a caller with only the ``detokenize_masked`` scope sees it; never the whole value.

    A card number (what normalize_card accepts) is its digits with all but the
    last four masked: ``************1111``. Any other value keeps its last four
    characters and masks the rest, but never more than half of it is shown, so
    a value of eight characters or fewer keeps ``len // 2`` (none for one character).
    """
    digits = value.translate(_CARD_SEPARATORS)
    if (digits.isascii() and digits.isdigit() and CARD_MIN_DIGITS <= len(digits) <= CARD_MAX_DIGITS
            and luhn_valid(digits)):
        return MASK_CHARACTER * (len(digits) - CARD_KEPT_DIGITS) + digits[-CARD_KEPT_DIGITS:]
    kept = min(MASK_KEPT_CHARACTERS, len(value) // 2)
    return MASK_CHARACTER * (len(value) - kept) + value[len(value) - kept:]
