"""Properties of tokens and value encryption over generated values.

Keys are fixed bytes so that a failing example replays exactly; the properties
hold for any key.
"""

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenvault.crypto.keys import DecryptError, KeyRing, MasterKey
from tokenvault.crypto.tokens import (
    MAX_EPOCH,
    TOKEN_BODY_CHARS,
    TokenFormatError,
    encode_token_body,
    format_token,
    is_token,
    parse_token,
)

MASTER_HEX = bytes(range(1, 33)).hex()
SECRET_ONE = bytes(range(40, 72))
SECRET_TWO = bytes(range(80, 112))
BASE32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
# Characters a token can contain anywhere (prefix, epoch digits, separator, body).
TOKEN_CHARACTERS = set(BASE32_ALPHABET) | set("0123456789_tv")

_WRAPPED = {
    1: MasterKey.from_hex(MASTER_HEX).wrap_epoch_secret(1, SECRET_ONE),
    2: MasterKey.from_hex(MASTER_HEX).wrap_epoch_secret(2, SECRET_TWO),
}


def _fresh_ring() -> KeyRing:
    """What a node builds on start: a master key read anew and the wrapped
    secrets read from the log."""
    return KeyRing.from_wrapped(MasterKey.from_hex(MASTER_HEX), _WRAPPED.items())


RING = _fresh_ring()
values = st.text(max_size=200)


@settings(max_examples=300)
@given(value=values)
def test_same_value_and_epoch_give_same_token_and_ciphertext_across_restarts(value: str) -> None:
    first = RING.get(1).seal(value)
    after_restart = _fresh_ring().get(1).seal(value)
    assert first == after_restart
    assert RING.get(1).token_for(value) == first[0]
    assert RING.get(1).encrypt(first[0], value) == first[1]


@settings(max_examples=200)
@given(batch=st.lists(values, unique=True, min_size=2, max_size=60))
def test_distinct_values_get_distinct_tokens_and_ciphertexts_within_an_epoch(batch: list[str]) -> None:
    sealed = RING.get(1).seal_many(batch)
    tokens = [token for token, _ in sealed]
    assert len(set(tokens)) == len(batch)
    assert len({ciphertext for _, ciphertext in sealed}) == len(batch)
    # Avalanche: 160-bit bodies of distinct values do not even share an
    # 8-character (40-bit) prefix, so near-equal values give unrelated tokens.
    assert len({token.split("_")[1][:8] for token in tokens}) == len(batch)


@settings(max_examples=300)
@given(value=values)
def test_decrypt_inverts_encrypt(value: str) -> None:
    token, ciphertext = RING.get(1).seal(value)
    assert RING.get(1).decrypt(token, ciphertext) == value
    assert _fresh_ring().decrypt(token, ciphertext) == value


@settings(max_examples=300)
@given(value=values)
def test_token_never_contains_any_part_of_the_value(value: str) -> None:
    """The body is 32 base32 characters of an HMAC output; the rest of the token
    is ``tv<epoch>_``. So:

    * any value substring holding a character a token cannot contain (an
      uppercase letter, a space, punctuation, 0, 1, 8, 9, non-ASCII, ...) can
      never appear: checked for every such substring of length >= 4;
    * a value made only of token characters can match part of a random body by
      coincidence (about 29 / 32**4 for a given 4-character substring) without
      revealing anything, since the body is a keyed PRF output. What would be a
      leak is the value, or a long run of it, being copied in: checked for
      every substring of length >= 10 (coincidence about 23 / 32**10).
    """
    token = RING.get(1).token_for(value)
    assert is_token(token) and len(token.split("_")[1]) == TOKEN_BODY_CHARS
    for length in range(4, len(value) + 1):
        for start in range(len(value) - length + 1):
            part = value[start : start + length]
            if not set(part) <= TOKEN_CHARACTERS or length >= 10:
                assert part not in token


@settings(max_examples=200)
@given(value=st.text(alphabet=BASE32_ALPHABET, min_size=10, max_size=64))
def test_base32_looking_values_are_not_copied_into_the_token(value: str) -> None:
    token = RING.get(1).token_for(value)
    assert value not in token
    assert value[:10] not in token and value[-10:] not in token


@settings(max_examples=200)
@given(value=values)
def test_different_epochs_give_different_tokens(value: str) -> None:
    token_one = RING.get(1).token_for(value)
    token_two = RING.get(2).token_for(value)
    assert parse_token(token_one).epoch == 1 and parse_token(token_two).epoch == 2
    assert token_one.split("_")[1] != token_two.split("_")[1]
    # Epoch 1's ciphertext does not open under epoch 2's data key.
    ciphertext = RING.get(1).encrypt(token_one, value)
    with pytest.raises(DecryptError):
        RING.get(2).decrypt(token_one, ciphertext)


@settings(max_examples=200)
@given(pair=st.lists(values, unique=True, min_size=2, max_size=2))
def test_ciphertext_does_not_decrypt_under_another_token(pair: list[str]) -> None:
    keys = RING.get(1)
    token_a, ciphertext_a = keys.seal(pair[0])
    token_b, ciphertext_b = keys.seal(pair[1])
    with pytest.raises(DecryptError):
        keys.decrypt(token_b, ciphertext_a)
    with pytest.raises(DecryptError):
        keys.decrypt(token_a, ciphertext_b)


@given(epoch=st.integers(1, MAX_EPOCH), body=st.binary(min_size=20, max_size=20))
def test_format_then_parse_round_trips(epoch: int, body: bytes) -> None:
    token = format_token(epoch, body)
    parsed = parse_token(token)
    assert parsed.epoch == epoch
    assert parsed.body == base64.b32encode(body).decode().lower() == encode_token_body(body)


@settings(max_examples=500)
@given(text=st.one_of(st.text(max_size=140), st.from_regex(r"tv[0-9]{1,4}_[a-z2-9=]{20,40}", fullmatch=True)))
def test_parser_accepts_exactly_the_grammar_and_raises_only_its_error(text: str) -> None:
    try:
        parsed = parse_token(text)
    except TokenFormatError:
        assert not is_token(text)
        return
    assert is_token(text)
    assert text == f"tv{parsed.epoch}_{parsed.body}"
    assert parsed.epoch >= 1 and len(parsed.body) >= 26 and set(parsed.body) <= set(BASE32_ALPHABET)
