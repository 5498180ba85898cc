import base64

import pytest

from tokenvault.crypto.tokens import (
    MAX_EPOCH,
    MAX_TOKEN_CHARS,
    ParsedToken,
    TokenFormatError,
    encode_token_body,
    format_token,
    is_token,
    parse_token,
)

BODY_32 = "abcdefghijklmnopqrstuvwxyz234567"


def test_format_token_gives_prefix_epoch_and_32_char_base32_body() -> None:
    token = format_token(7, bytes(range(20)))
    assert token == "tv7_" + base64.b32encode(bytes(range(20))).decode().lower()
    prefix, body = token.split("_")
    assert prefix == "tv7"
    assert len(body) == 32
    assert set(body) <= set("abcdefghijklmnopqrstuvwxyz234567")


def test_encode_token_body_matches_rfc4648_base32() -> None:
    for body in (bytes(20), b"\xff" * 20, bytes(range(20)), bytes(range(200, 220))):
        assert encode_token_body(body) == base64.b32encode(body).decode().lower()


@pytest.mark.parametrize("length", [0, 19, 21, 32])
def test_format_token_refuses_wrong_body_length(length: int) -> None:
    with pytest.raises(ValueError):
        format_token(1, bytes(length))


@pytest.mark.parametrize("epoch", [0, -1, MAX_EPOCH + 1])
def test_format_token_refuses_out_of_range_epoch(epoch: int) -> None:
    with pytest.raises(ValueError):
        format_token(epoch, bytes(20))


@pytest.mark.parametrize("epoch", [True, 1.0, "1"])
def test_format_token_refuses_non_int_epoch(epoch: object) -> None:
    with pytest.raises(TypeError):
        format_token(epoch, bytes(20))  # type: ignore[arg-type]


def test_parse_round_trips_format() -> None:
    token = format_token(123, b"\x01" * 20)
    assert parse_token(token) == ParsedToken(epoch=123, body=token.split("_")[1])


def test_parse_accepts_contract_grammar_minimum_body() -> None:
    assert parse_token("tv1_" + "a" * 26) == ParsedToken(1, "a" * 26)


def test_parse_accepts_epoch_beyond_issuable_range_as_grammar() -> None:
    # Well-formed but never issued: the HTTP layer answers null, not 400.
    parsed = parse_token("tv" + "9" * 30 + "_" + BODY_32)
    assert parsed.epoch == int("9" * 30)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tv",
        "tv1_",
        "tv1_" + "a" * 25,  # body too short
        "tv0_" + BODY_32,  # epoch 0
        "tv01_" + BODY_32,  # leading zero
        "tv-1_" + BODY_32,
        "TV1_" + BODY_32,
        "tv1_" + BODY_32.upper(),
        "tv1_" + BODY_32[:-1] + "1",  # 1 is not base32
        "tv1_" + BODY_32[:-1] + "=",
        "tv1-" + BODY_32,
        "tv_" + BODY_32,
        "tv1_" + BODY_32 + "\n",  # $ would accept a trailing newline
        " tv1_" + BODY_32,
        "tv\u0661_" + BODY_32,  # Arabic-Indic digit one
        "tv1_" + "a" * (MAX_TOKEN_CHARS - 3),  # one character too long
    ],
)
def test_parse_rejects_non_tokens(text: str) -> None:
    with pytest.raises(TokenFormatError):
        parse_token(text)
    assert not is_token(text)


def test_max_length_token_is_accepted() -> None:
    text = "tv1_" + "a" * (MAX_TOKEN_CHARS - 4)
    assert len(text) == MAX_TOKEN_CHARS
    assert is_token(text)


@pytest.mark.parametrize("value", [None, 1, b"tv1_" + BODY_32.encode(), ["tv1_" + BODY_32]])
def test_non_strings_are_not_tokens(value: object) -> None:
    assert not is_token(value)
    with pytest.raises(TokenFormatError):
        parse_token(value)


def test_parse_error_never_echoes_the_input() -> None:
    secret_looking = "4111111111111111-not-a-token"
    with pytest.raises(TokenFormatError) as caught:
        parse_token(secret_looking)
    assert secret_looking not in str(caught.value)
    assert "4111" not in str(caught.value)
