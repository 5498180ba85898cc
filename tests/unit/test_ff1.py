"""FF1 (tokenvault.crypto.ff1) against the sample vectors NIST published for SP 800-38G
("FF1samples.pdf", Computer Security Resource Center, examples of block cipher modes),
and its inverse; plus the card and digits tokens built on it (tokenvault.crypto.formats)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenvault.crypto.ff1 import Ff1, Ff1Error, digits_to_numerals, numerals_to_digits
from tokenvault.crypto.formats import (CARD_MAX_DIGITS, CARD_MIN_DIGITS, FormatError, FormatKeys, check_digits,
                                       luhn_valid, mask_value, normalize_card)

KEY_128 = "2B7E151628AED2A6ABF7158809CF4F3C"
KEY_192 = KEY_128 + "EF4359D8D580AA4F"
KEY_256 = KEY_192 + "7F036D6F04FC6A94"
TWEAK = "39383736353433323130"
ALPHABET_36 = "0123456789abcdefghijklmnopqrstuvwxyz"

# (key, tweak, ciphertext) of the radix-10 samples 1, 2, 4, 5, 7 and 8; plaintext 0123456789.
RADIX_10_SAMPLES = [
    (KEY_128, "", "2433477484"),
    (KEY_128, TWEAK, "6124200773"),
    (KEY_192, "", "2830668132"),
    (KEY_192, TWEAK, "2496655549"),
    (KEY_256, "", "6657667009"),
    (KEY_256, TWEAK, "1001623463"),
]
# Samples 3, 6 and 9: radix 36, plaintext 0123456789abcdefghi, tweak 3737373770717273373737.
RADIX_36_SAMPLES = [(KEY_128, "a9tv40mll9kdu509eum"), (KEY_192, "xbj3kv35jrawxv32ysr"),
                    (KEY_256, "xs8a0azh2avyalyzuwd")]


@pytest.mark.parametrize(("key", "tweak", "ciphertext"), RADIX_10_SAMPLES)
def test_nist_radix_10_samples(key: str, tweak: str, ciphertext: str) -> None:
    ff1 = Ff1(bytes.fromhex(key), 10)
    encrypted = numerals_to_digits(ff1.encrypt(digits_to_numerals("0123456789"), bytes.fromhex(tweak)))
    assert encrypted == ciphertext
    assert numerals_to_digits(ff1.decrypt(digits_to_numerals(ciphertext), bytes.fromhex(tweak))) == "0123456789"


@pytest.mark.parametrize(("key", "ciphertext"), RADIX_36_SAMPLES)
def test_nist_radix_36_samples(key: str, ciphertext: str) -> None:
    ff1 = Ff1(bytes.fromhex(key), 36)
    tweak = bytes.fromhex("3737373770717273373737")
    encrypted = ff1.encrypt([ALPHABET_36.index(c) for c in "0123456789abcdefghi"], tweak)
    assert "".join(ALPHABET_36[n] for n in encrypted) == ciphertext
    assert "".join(ALPHABET_36[n] for n in ff1.decrypt(encrypted, tweak)) == "0123456789abcdefghi"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789", min_size=6, max_size=40), st.binary(max_size=32))
def test_decrypt_inverts_encrypt(digits: str, tweak: bytes) -> None:
    ff1 = Ff1(bytes(range(32)), 10)
    assert ff1.decrypt(ff1.encrypt(digits_to_numerals(digits), tweak), tweak) == digits_to_numerals(digits)


def test_ff1_is_a_permutation_of_a_small_domain() -> None:
    ff1 = Ff1(bytes(16), 10)
    outputs = {tuple(ff1.encrypt(digits_to_numerals(f"{number:06d}"))) for number in range(0, 1_000_000, 97)}
    assert len(outputs) == len(range(0, 1_000_000, 97))


def test_ff1_refuses_what_it_cannot_take() -> None:
    with pytest.raises(Ff1Error):
        Ff1(b"short", 10)
    ff1 = Ff1(bytes(16), 10)
    for numerals in ([1, 2, 3, 4, 5], [1] * 129, [1, 2, 3, 4, 5, 10]):
        with pytest.raises(Ff1Error) as error:
            ff1.encrypt(numerals)
        assert "12345" not in str(error.value)
    with pytest.raises(Ff1Error):
        ff1.encrypt([1] * 10, b"t" * 65)
    assert "<redacted>" in repr(ff1)


# ---------------------------------------------------------------- card and digits tokens

def luhn_complete(partial: str) -> str:
    """``partial`` with the check digit that makes it Luhn-valid."""
    return next(partial + check for check in "0123456789" if luhn_valid(partial + check))


CARD_NUMBERS = st.builds(
    luhn_complete, st.text(alphabet="0123456789", min_size=CARD_MIN_DIGITS - 1, max_size=CARD_MAX_DIGITS - 1))


def test_luhn_check_on_known_numbers() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112") and not luhn_valid("79927398710")


@settings(max_examples=300, deadline=None)
@given(CARD_NUMBERS)
def test_card_tokens_keep_length_and_last_four_and_are_never_luhn_valid(card: str) -> None:
    formats = FormatKeys(bytes(range(32)))
    token = formats.card_token(card)
    assert len(token) == len(card) and token.isdigit()
    assert token[-4:] == card[-4:]
    assert not luhn_valid(token)
    assert token != card
    assert formats.card_token(card) == token  # deterministic


def test_card_tokens_of_one_length_and_last_four_never_collide() -> None:
    formats = FormatKeys(bytes(32))
    cards = {luhn_complete(f"41111{number:06d}111") for number in range(0, 1_000_000, 331)}
    tokens = {formats.card_token(card) for card in cards}
    assert len(tokens) == len(cards)


def test_card_numbers_are_normalized_and_checked() -> None:
    assert normalize_card("4111 1111-1111 1111") == "4111111111111111"
    for bad in ("4111 1111 1111 1112", "411111111111", "41111111111111111111", "4111x11111111111", "٤١١١١١١١١١١١١١١١"):
        with pytest.raises(FormatError) as error:
            normalize_card(bad)
        assert bad not in str(error.value)


def test_digits_tokens_keep_length_and_differ_by_key() -> None:
    first, second = FormatKeys(bytes(32)), FormatKeys(bytes([1]) * 32)
    assert len(first.digits_token("123456")) == 6
    assert first.digits_token("123456789012") != second.digits_token("123456789012")
    with pytest.raises(FormatError):
        check_digits("12345")
    with pytest.raises(FormatError):
        check_digits("12345a")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789", min_size=6, max_size=128))
def test_digits_tokens_are_digit_strings_of_the_same_length_deterministic_and_invertible(digits: str) -> None:
    """docs/tokens.md, digits: FF1 of the whole string under the tweak "digits", the same length; since FF1
    is a permutation of the strings of one length, two values never get one token (shown here by the key
    holder's inverse giving the value back)."""
    key = bytes(range(32))
    token = FormatKeys(key).digits_token(check_digits(digits))
    assert len(token) == len(digits) and token.isdigit() and token.isascii()
    assert FormatKeys(key).digits_token(digits) == token  # deterministic: a new cipher, the same token
    assert numerals_to_digits(Ff1(key, 10).decrypt(digits_to_numerals(token), b"digits")) == digits


@pytest.mark.parametrize("length", [6, 16, 40])
def test_digits_tokens_of_one_length_never_collide(length: int) -> None:
    formats = FormatKeys(bytes(32))
    values = {f"{number:0{length}d}" for number in range(0, 1_000_000, 331)}
    values |= {f"{number:0{length}d}"[::-1] for number in range(0, 1_000_000, 331)}  # leading digits vary too
    tokens = {formats.digits_token(value) for value in values}
    assert len(tokens) == len(values)


def test_masking_never_shows_the_whole_value() -> None:
    assert mask_value("4111 1111 1111 1111") == "************1111"
    assert mask_value("4111111111111111") == "************1111"
    assert mask_value("alice@example.com") == "*************.com"
    assert mask_value("secret") == "***ret"
    assert mask_value("ab") == "*b"
    assert mask_value("x") == "*"
    for value in ("12345678", "abcd", "4111111111111112"):
        masked = mask_value(value)
        assert masked != value and len(masked) == len(value)
