"""Unit tests for tokenvault.core.commands: round trips, validation and hostile payloads."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenvault.core.commands import (
    COMMAND_FORMAT_VERSION,
    MAX_CIPHERTEXT_BYTES,
    MAX_ITEMS,
    MAX_TOKEN_CHARS,
    ROTATE_EPOCH_TAG,
    TOKENIZE_TAG,
    CommandError,
    RotateEpochCommand,
    TokenizeCommand,
    decode_command,
    encode_command,
)

TOKEN = "tv1_" + "a" * 32


def make_tokenize(**overrides) -> TokenizeCommand:
    fields = dict(epoch=1, items=((TOKEN, b"ciphertext"),), principal="tokenizer",
                  idempotency_key="key-1", fingerprint=b"f" * 32, issued_at_ms=1_700_000_000_000)
    fields.update(overrides)
    return TokenizeCommand(**fields)


def make_rotate(**overrides) -> RotateEpochCommand:
    fields = dict(epoch=2, wrapped_secret=b"w" * 60, created_at_ms=1_700_000_000_000, principal="admin",
                  idempotency_key=None, fingerprint=None)
    fields.update(overrides)
    return RotateEpochCommand(**fields)


def test_tokenize_round_trip_keeps_every_field_and_item_order():
    items = tuple((f"tv7_{index:032d}", bytes([index % 256]) * (index + 1)) for index in range(1000))
    command = make_tokenize(epoch=7, items=items)
    decoded = decode_command(encode_command(command))
    assert decoded == command
    assert decoded.items[0][0] == "tv7_" + "0" * 32
    assert decoded.items[-1][1] == bytes([999 % 256]) * 1000


def test_rotate_round_trip_without_idempotency():
    command = make_rotate()
    assert decode_command(encode_command(command)) == command


def test_rotate_round_trip_with_idempotency():
    command = make_rotate(idempotency_key="rotate-1", fingerprint=b"x" * 32)
    assert decode_command(encode_command(command)) == command


def test_commands_are_frozen():
    command = make_tokenize()
    with pytest.raises(AttributeError):
        command.epoch = 2  # type: ignore[misc]


@pytest.mark.parametrize("overrides", [
    {"epoch": 0},
    {"epoch": True},
    {"epoch": 2**63},
    {"items": ()},
    {"items": [(TOKEN, b"c")]},
    {"items": ((TOKEN,),)},
    {"items": (("", b"c"),)},
    {"items": (("t" * (MAX_TOKEN_CHARS + 1), b"c"),)},
    {"items": ((TOKEN, b""),)},
    {"items": ((TOKEN, "text"),)},
    {"items": ((TOKEN, b"c" * (MAX_CIPHERTEXT_BYTES + 1)),)},
    {"items": ((b"bytes-token", b"c"),)},
    {"principal": ""},
    {"principal": "p" * 256},
    {"idempotency_key": "k" * 256},
    {"fingerprint": b""},
    {"fingerprint": "text"},
    {"fingerprint": None},
    {"principal": None},
    {"issued_at_ms": -1},
    {"issued_at_ms": 1.5},
])
def test_invalid_tokenize_fields_are_refused(overrides):
    with pytest.raises(CommandError):
        make_tokenize(**overrides)


def test_item_count_is_bounded():
    items = ((TOKEN, b"c"),) * (MAX_ITEMS + 1)
    with pytest.raises(CommandError):
        make_tokenize(items=items)
    assert len(make_tokenize(items=items[:MAX_ITEMS]).items) == MAX_ITEMS


@pytest.mark.parametrize("overrides", [
    {"epoch": -3},
    {"wrapped_secret": b""},
    {"wrapped_secret": b"w" * 1025},
    {"created_at_ms": "now"},
    {"idempotency_key": "k"},  # a key without a fingerprint cannot be recorded
])
def test_invalid_rotate_fields_are_refused(overrides):
    with pytest.raises(CommandError):
        make_rotate(**overrides)


def test_error_messages_never_contain_field_content():
    secret_like = "my-secret-value-" * 10
    with pytest.raises(CommandError) as raised:
        make_tokenize(items=((secret_like, b"c"),))
    assert "my-secret-value" not in str(raised.value)


def _packed(fields: list) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


VALID_TOKENIZE_FIELDS = [COMMAND_FORMAT_VERSION, TOKENIZE_TAG, 1, [TOKEN], [b"c"], "p", None, None, 5]


@pytest.mark.parametrize("payload", [
    b"",
    b"\xc1",
    b"\x92\x01",
    _packed({"version": 1}),
    _packed([COMMAND_FORMAT_VERSION]),
    _packed([2, TOKENIZE_TAG] + VALID_TOKENIZE_FIELDS[2:]),
    _packed([True, TOKENIZE_TAG] + VALID_TOKENIZE_FIELDS[2:]),
    _packed([COMMAND_FORMAT_VERSION, 99] + VALID_TOKENIZE_FIELDS[2:]),
    _packed(VALID_TOKENIZE_FIELDS[:-1]),
    _packed(VALID_TOKENIZE_FIELDS + [1]),
    _packed(VALID_TOKENIZE_FIELDS[:3] + [[TOKEN, TOKEN], [b"c"]] + VALID_TOKENIZE_FIELDS[5:]),
    _packed(VALID_TOKENIZE_FIELDS[:3] + [TOKEN, b"c"] + VALID_TOKENIZE_FIELDS[5:]),
    _packed([COMMAND_FORMAT_VERSION, ROTATE_EPOCH_TAG, 1, b"w", 5, None, None]),
    _packed(VALID_TOKENIZE_FIELDS) + b"\x00",
    b"\xa2\xff\xfe",
    msgpack.packb([COMMAND_FORMAT_VERSION, TOKENIZE_TAG, msgpack.ExtType(5, b"x")], use_bin_type=True),
    b"\xdd\xff\xff\xff\xff",  # an array header claiming 4 billion elements
    b"\x91" * 100_000,  # deep nesting
])
def test_garbage_payloads_raise_command_error(payload):
    with pytest.raises(CommandError):
        decode_command(payload)


def test_valid_hand_packed_payload_decodes():
    command = decode_command(_packed(VALID_TOKENIZE_FIELDS))
    assert command == TokenizeCommand(1, ((TOKEN, b"c"),), "p", None, None, 5)


def test_non_bytes_input_is_refused():
    with pytest.raises(CommandError):
        decode_command(bytearray(_packed(VALID_TOKENIZE_FIELDS)))  # type: ignore[arg-type]


def test_encode_refuses_other_objects():
    with pytest.raises(CommandError):
        encode_command(object())  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_command_error(payload):
    try:
        decode_command(payload)
    except CommandError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.text(max_size=40),
                          st.binary(max_size=40), st.lists(st.text(max_size=5), max_size=3),
                          st.lists(st.binary(max_size=5), max_size=3)), max_size=10),
       st.sampled_from([TOKENIZE_TAG, ROTATE_EPOCH_TAG]))
def test_structured_garbage_raises_only_command_error(fields, tag):
    try:
        command = decode_command(_packed([COMMAND_FORMAT_VERSION, tag] + fields))
    except CommandError:
        return
    assert decode_command(encode_command(command)) == command
