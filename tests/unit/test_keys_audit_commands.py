"""The runtime key and audit commands (tokenvault.core.commands): round trips and the hostile-input decoder."""

from __future__ import annotations

import msgpack
import pytest

from tokenvault.core.commands import (
    AUDIT_TAG,
    COMMAND_FORMAT_VERSION,
    CREATE_API_KEY_TAG,
    MAX_AUDIT_RECORDS,
    REVOKE_API_KEY_TAG,
    ROTATE_EPOCH_TAG,
    Actor,
    AuditCommand,
    AuditRecord,
    CommandError,
    CreateApiKeyCommand,
    RevokeApiKeyCommand,
    RotateEpochCommand,
    decode_command,
    encode_command,
)

KEY_ID = "0123456789abcdef"
ACTOR = Actor(name="admin", key_id=None, node="n1", request_id="0011223344556677")


def make_create(**overrides) -> CreateApiKeyCommand:
    fields = dict(key_id=KEY_ID, name="ci.job-1", scopes=("detokenize", "tokenize"), salt=b"s" * 16,
                  digest=b"d" * 32, created_at_ms=5, actor=ACTOR)
    fields.update(overrides)
    return CreateApiKeyCommand(**fields)


def make_record(**overrides) -> AuditRecord:
    fields = dict(at_ms=7, node="n2", key_name="reader", key_id=KEY_ID, action="detokenize", items=3, found=2,
                  request_id="r", subject=None)
    fields.update(overrides)
    return AuditRecord(**fields)


@pytest.mark.parametrize("command", [
    make_create(),
    RevokeApiKeyCommand(key_id=KEY_ID, revoked_at_ms=9, actor=ACTOR),
    AuditCommand(records=(make_record(), make_record(action="key.create", subject=KEY_ID, key_id=None))),
    RotateEpochCommand(2, b"w", 5, "admin", None, None, actor=ACTOR),
])
def test_key_and_audit_commands_round_trip(command):
    assert decode_command(encode_command(command)) == command


def test_a_rotation_written_before_the_audit_trail_still_decodes_with_no_actor():
    old = msgpack.packb([COMMAND_FORMAT_VERSION, ROTATE_EPOCH_TAG, 2, b"w", 5, "admin", None, None])
    assert decode_command(old) == RotateEpochCommand(2, b"w", 5, "admin", None, None)
    assert encode_command(RotateEpochCommand(2, b"w", 5, "admin", None, None)) == old


@pytest.mark.parametrize("overrides", [
    {"key_id": "0123456789ABCDEF"}, {"key_id": "0123"}, {"key_id": 5},
    {"name": ""}, {"name": "-x"}, {"name": "x" * 65}, {"name": "a b"},
    {"scopes": ()}, {"scopes": ("root",)}, {"scopes": ("tokenize", "detokenize")},
    {"scopes": ("tokenize", "tokenize")}, {"scopes": ["tokenize"]},
    {"salt": b"s" * 15}, {"digest": b"d" * 31}, {"digest": "d" * 32},
    {"created_at_ms": -1}, {"created_at_ms": True},
    {"actor": ("admin", None, "n1", None)}, {"actor": None},
])
def test_invalid_create_key_fields_are_refused(overrides):
    with pytest.raises(CommandError):
        make_create(**overrides)


@pytest.mark.parametrize("overrides", [
    {"node": ""}, {"node": "n" * 33}, {"action": "delete.everything"}, {"items": -1}, {"items": 100_001},
    {"found": 4}, {"found": -1}, {"request_id": "r" * 65}, {"subject": "s" * 65}, {"key_name": 3},
    {"at_ms": 2**63},
])
def test_invalid_audit_records_are_refused(overrides):
    with pytest.raises(CommandError):
        make_record(**overrides)


def test_actor_fields_are_bounded():
    with pytest.raises(CommandError):
        Actor(node="n" * 33)
    with pytest.raises(CommandError):
        Actor(request_id="")


def _packed(fields: list) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


VALID_RECORD = [7, "n2", "reader", KEY_ID, "detokenize", 3, 2, "r", None]


@pytest.mark.parametrize("payload", [
    _packed([COMMAND_FORMAT_VERSION, CREATE_API_KEY_TAG, KEY_ID, "n", ["tokenize"], b"s" * 16, b"d" * 32, 5]),
    _packed([COMMAND_FORMAT_VERSION, CREATE_API_KEY_TAG, KEY_ID, "n", "tokenize", b"s" * 16, b"d" * 32, 5,
             None, None, None, None]),
    _packed([COMMAND_FORMAT_VERSION, CREATE_API_KEY_TAG, KEY_ID, "n", ["tokenize"] * 7, b"s" * 16, b"d" * 32, 5,
             None, None, None, None]),
    _packed([COMMAND_FORMAT_VERSION, REVOKE_API_KEY_TAG, KEY_ID, 5, None, None, None]),
    _packed([COMMAND_FORMAT_VERSION, REVOKE_API_KEY_TAG, KEY_ID, 5, 1, None, None, None]),
    _packed([COMMAND_FORMAT_VERSION, ROTATE_EPOCH_TAG, 2, b"w", 5, None, None, None, None, None]),
    _packed([COMMAND_FORMAT_VERSION, AUDIT_TAG, []]),
    _packed([COMMAND_FORMAT_VERSION, AUDIT_TAG, [VALID_RECORD[:-1]]]),
    _packed([COMMAND_FORMAT_VERSION, AUDIT_TAG, [VALID_RECORD + [None]]]),
    _packed([COMMAND_FORMAT_VERSION, AUDIT_TAG, VALID_RECORD]),
    _packed([COMMAND_FORMAT_VERSION, AUDIT_TAG, [VALID_RECORD] * (MAX_AUDIT_RECORDS + 1)]),
    _packed([COMMAND_FORMAT_VERSION, AUDIT_TAG, [VALID_RECORD], "extra"]),
    _packed([COMMAND_FORMAT_VERSION, AUDIT_TAG, [[7, "n2", "reader", KEY_ID, "detokenize", 3, 9, "r", None]]]),
])
def test_malformed_key_and_audit_payloads_raise_command_error(payload):
    with pytest.raises(CommandError):
        decode_command(payload)


def test_errors_name_the_field_never_its_content():
    secret_name = "SECRET-NAME-" + "x" * 60
    with pytest.raises(CommandError) as raised:
        make_create(name=secret_name)
    assert "SECRET" not in str(raised.value) and "name" in str(raised.value)
