"""FF1 format-preserving encryption (NIST SP 800-38G, section 5.1, Algorithms 7 and 8).

FF1 is a ten-round Feistel network over numeral strings of a given radix; its
round function is AES (the block cipher comes from ``cryptography``, used here
one block at a time in ECB mode, which is what the standard's PRF and CIPH
steps call for). The PRF of step 6.ii is AES-CBC-MAC with a zero IV over
``P || Q``; P is the same for every round of one call, so its first block is
encrypted once per call and each round continues the chain from there.

Only what the vault needs is here: numeral strings as lists of ints in
``[0, radix)``, radix 2..2**16, lengths from the standard's minimum
(``radix ** length >= 1_000_000``) up to ``MAX_LENGTH``. Inputs are checked
and errors never carry the numerals. An ``Ff1`` object keeps one AES context
and is meant for one thread (the node's event loop).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK_BYTES = 16
ROUNDS = 10
MIN_DOMAIN = 1_000_000  # SP 800-38G rev. 1: radix ** minlen >= 1,000,000
MAX_LENGTH = 128  # far above any format the vault offers; keeps the work per call bounded
MAX_TWEAK_BYTES = 64
MAX_RADIX = 1 << 16
_ZERO_BLOCK = bytes(BLOCK_BYTES)


class Ff1Error(ValueError):
    """The input is not a numeral string FF1 accepts here. Never names the numerals."""


class Ff1:
    """FF1 under one AES key (16, 24 or 32 bytes) for one radix."""

    __slots__ = ("_radix", "_block", "_min_length", "_cache")

    def __init__(self, key: bytes, radix: int = 10) -> None:
        if not isinstance(key, bytes) or len(key) not in (16, 24, 32):
            raise Ff1Error("an FF1 key is 16, 24 or 32 bytes")
        if isinstance(radix, bool) or not isinstance(radix, int) or not 2 <= radix <= MAX_RADIX:
            raise Ff1Error(f"radix must be an integer in [2, {MAX_RADIX}]")
        self._radix = radix
        # ECB over single blocks is the standard's CIPH; the context is reused for every block.
        self._block = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        self._min_length = max(2, math.ceil(math.log(MIN_DOMAIN, radix) - 1e-9))
        self._cache: dict[tuple[int, int], tuple[int, int, int, int, int, int, int]] = {}

    def __repr__(self) -> str:
        return f"Ff1(radix={self._radix}, key=<redacted>)"

    @property
    def radix(self) -> int:
        return self._radix

    @property
    def min_length(self) -> int:
        """The shortest numeral string whose domain is at least MIN_DOMAIN."""
        return self._min_length

    def encrypt(self, numerals: Sequence[int], tweak: bytes = b"") -> list[int]:
        return self._run(numerals, tweak, decrypt=False)

    def decrypt(self, numerals: Sequence[int], tweak: bytes = b"") -> list[int]:
        return self._run(numerals, tweak, decrypt=True)

    def _check(self, numerals: Sequence[int], tweak: bytes) -> None:
        if not isinstance(tweak, bytes) or len(tweak) > MAX_TWEAK_BYTES:
            raise Ff1Error(f"the tweak must be at most {MAX_TWEAK_BYTES} bytes")
        if not self._min_length <= len(numerals) <= MAX_LENGTH:
            raise Ff1Error(f"FF1 takes {self._min_length} to {MAX_LENGTH} numerals in radix {self._radix}")
        radix = self._radix
        if not all(type(numeral) is int and 0 <= numeral < radix for numeral in numerals):
            raise Ff1Error(f"every numeral must be an integer in [0, {radix})")

    def _run(self, numerals: Sequence[int], tweak: bytes, *, decrypt: bool) -> list[int]:
        self._check(numerals, tweak)
        radix = self._radix
        n = len(numerals)
        u, v, b, d, chain, modulus_u, modulus_v = self._parameters(n, len(tweak))
        q_prefix = tweak + bytes((-len(tweak) - b - 1) % BLOCK_BYTES)
        a_number = _number(numerals[:u], radix)
        b_number = _number(numerals[u:], radix)
        rounds = range(ROUNDS - 1, -1, -1) if decrypt else range(ROUNDS)
        for i in rounds:
            # Decryption runs the rounds backwards with the halves' roles swapped.
            source = a_number if decrypt else b_number
            q = q_prefix + bytes([i]) + source.to_bytes(b, "big")
            y = self._round_value(chain, q, d)
            modulus = modulus_u if i % 2 == 0 else modulus_v
            if decrypt:
                c = (b_number - y) % modulus
                a_number, b_number = c, a_number
            else:
                c = (a_number + y) % modulus
                a_number, b_number = b_number, c
        return _numerals(a_number, u, radix) + _numerals(b_number, v, radix)

    def _parameters(self, n: int, t: int) -> tuple[int, int, int, int, int, int, int]:
        """Steps 1-5 for a length and tweak length: u, v, b, d, the CBC-MAC state after P, radix**u, radix**v.

        Kept per (n, t) (at most MAX_LENGTH * (MAX_TWEAK_BYTES + 1) entries): they are the same for
        every call of one token format."""
        key = (n, t)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        radix = self._radix
        u = n // 2
        v = n - u
        b = math.ceil(math.ceil(v * math.log2(radix)) / 8)
        d = 4 * math.ceil(b / 4) + 4
        # P = [1]1 [2]1 [1]1 [radix]3 [10]1 [u mod 256]1 [n]4 [t]4.
        p_block = (bytes([1, 2, 1]) + radix.to_bytes(3, "big") + bytes([10, u % 256])
                   + n.to_bytes(4, "big") + t.to_bytes(4, "big"))
        chain = int.from_bytes(self._block.update(p_block), "big")
        cached = (u, v, b, d, chain, radix ** u, radix ** v)
        self._cache[key] = cached
        return cached

    def _round_value(self, chain: int, q: bytes, d: int) -> int:
        """Steps 6.ii-6.iv: R = PRF(P || Q), S = the first d bytes of R || CIPH(R xor [1]) || ..., y = NUM(S)."""
        state = chain
        block = self._block
        for start in range(0, len(q), BLOCK_BYTES):
            state ^= int.from_bytes(q[start:start + BLOCK_BYTES], "big")
            state = int.from_bytes(block.update(state.to_bytes(BLOCK_BYTES, "big")), "big")
        if d <= BLOCK_BYTES:
            return state >> (8 * (BLOCK_BYTES - d))
        s = state.to_bytes(BLOCK_BYTES, "big")
        for j in range(1, math.ceil(d / BLOCK_BYTES)):
            s += block.update((state ^ j).to_bytes(BLOCK_BYTES, "big"))
        return int.from_bytes(s[:d], "big")


def _number(numerals: Sequence[int], radix: int) -> int:
    """NUM_radix: the numerals as a number, most significant first."""
    value = 0
    for numeral in numerals:
        value = value * radix + numeral
    return value


def _numerals(number: int, length: int, radix: int) -> list[int]:
    """STR^length_radix: ``number`` as exactly ``length`` numerals, most significant first."""
    result = [0] * length
    for position in range(length - 1, -1, -1):
        number, result[position] = divmod(number, radix)
    return result


def digits_to_numerals(text: str) -> list[int]:
    """ASCII decimal digits as radix-10 numerals; Ff1Error for anything else (the text is not named)."""
    if not text.isascii() or not text.isdigit():
        raise Ff1Error("expected ASCII decimal digits")
    return [ord(character) - 48 for character in text]


def numerals_to_digits(numerals: Sequence[int]) -> str:
    return "".join(chr(48 + numeral) for numeral in numerals)
