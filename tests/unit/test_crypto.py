import errno
import hashlib
import hmac
import os
import pickle
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tokenvault.crypto.keys import (
    WRAPPED_SECRET_BYTES,
    DecryptError,
    EpochKeys,
    KeyRing,
    KeyRingConflictError,
    MasterKey,
    MasterKeyError,
    SecretFileError,
    UnknownEpochError,
    UnwrapError,
    ValueEncodingError,
    new_epoch_secret,
    read_secret_file,
    write_secret_file,
)
from tokenvault.config import ConfigError, LimitsConfig
from tokenvault.core import commands
from tokenvault.crypto import keys as keys_module
from tokenvault.crypto.tokens import TokenFormatError, encode_token_body, is_token, parse_token

FIXED_MASTER = bytes(range(32))
FIXED_SECRET = bytes(range(100, 132))


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def test_token_matches_the_specified_construction() -> None:
    # Recomputed independently from the spec: HKDF token key, HMAC-SHA256,
    # first 20 bytes, lowercase base32.
    token_key = _hkdf(FIXED_SECRET, b"tokenvault token key", 32)
    digest = hmac.new(token_key, "héllo".encode("utf-8"), hashlib.sha256).digest()[:20]
    keys = EpochKeys(5, FIXED_SECRET)
    assert keys.token_for("héllo") == "tv5_" + encode_token_body(digest)


def test_every_token_of_a_batch_is_the_standard_hmac_of_its_value() -> None:
    # The token HMAC is computed from precomputed padded-key states; it must agree
    # with the standard library's HMAC for short, long, non-ASCII and repeated values.
    token_key = _hkdf(FIXED_SECRET, b"tokenvault token key", 32)
    keys = EpochKeys(2, FIXED_SECRET)
    values = ["a", "b" * 63, "c" * 64, "d" * 65, "ü" * 200, "value with spaces", "a", "\U0001f600" * 9]
    expected = ["tv2_" + encode_token_body(hmac.new(token_key, value.encode("utf-8"), hashlib.sha256).digest()[:20])
                for value in values]
    assert [token for token, _ in keys.seal_many(values)] == expected
    assert [keys.token_for(value) for value in values] == expected


def test_ciphertext_matches_the_specified_construction() -> None:
    data_key = _hkdf(FIXED_SECRET, b"tokenvault data key", 64)
    keys = EpochKeys(5, FIXED_SECRET)
    token = keys.token_for("value")
    expected = AESSIV(data_key).encrypt(b"value", [token.encode("ascii")])
    assert keys.encrypt(token, "value") == expected
    assert keys.seal("value") == (token, expected)


def test_wrap_uses_aes_gcm_with_epoch_associated_data() -> None:
    master = MasterKey(FIXED_MASTER)
    blob = master.wrap_epoch_secret(9, FIXED_SECRET)
    assert len(blob) == WRAPPED_SECRET_BYTES
    opened = AESGCM(FIXED_MASTER).decrypt(blob[:12], blob[12:], b"tokenvault/epoch/9")
    assert opened == FIXED_SECRET
    assert master.unwrap_epoch_secret(9, blob) == FIXED_SECRET


def test_wrap_is_randomised_but_unwraps_to_the_same_secret() -> None:
    master = MasterKey.generate()
    secret = new_epoch_secret()
    first, second = master.wrap_epoch_secret(1, secret), master.wrap_epoch_secret(1, secret)
    assert first != second
    assert master.unwrap_epoch_secret(1, first) == master.unwrap_epoch_secret(1, second) == secret


def test_unwrap_refuses_wrong_epoch_wrong_key_and_tampering() -> None:
    master = MasterKey.generate()
    blob = master.wrap_epoch_secret(2, new_epoch_secret())
    with pytest.raises(UnwrapError):
        master.unwrap_epoch_secret(3, blob)
    with pytest.raises(UnwrapError):
        MasterKey.generate().unwrap_epoch_secret(2, blob)
    for position in (0, 12, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[position] ^= 1
        with pytest.raises(UnwrapError):
            master.unwrap_epoch_secret(2, bytes(tampered))
    with pytest.raises(UnwrapError):
        master.unwrap_epoch_secret(2, blob[:-1])


def test_new_epoch_secrets_are_32_random_bytes() -> None:
    secrets = {new_epoch_secret() for _ in range(50)}
    assert len(secrets) == 50
    assert all(len(secret) == 32 for secret in secrets)


def test_decrypt_round_trip_and_failures_carry_no_data() -> None:
    keys = EpochKeys(1, new_epoch_secret())
    value = "card 4111 1111 1111 1111"
    token, ciphertext = keys.seal(value)
    assert keys.decrypt(token, ciphertext) == value
    other_token = keys.token_for("another value")
    with pytest.raises(DecryptError) as caught:
        keys.decrypt(other_token, ciphertext)
    message = str(caught.value)
    assert "4111" not in message and token not in message and ciphertext.hex() not in message
    tampered = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    with pytest.raises(DecryptError):
        keys.decrypt(token, tampered)
    with pytest.raises(DecryptError):
        keys.decrypt(token, b"")
    with pytest.raises(DecryptError):
        EpochKeys(1, new_epoch_secret()).decrypt(token, ciphertext)


def test_values_that_are_not_unicode_are_refused_without_echo() -> None:
    keys = EpochKeys(1, new_epoch_secret())
    with pytest.raises(ValueEncodingError) as caught:
        keys.token_for("abc\ud800def")
    assert "abc" not in str(caught.value)
    with pytest.raises(ValueEncodingError):
        keys.seal(b"bytes")  # type: ignore[arg-type]


def test_epoch_keys_differ_per_epoch_and_token_names_the_epoch() -> None:
    first = EpochKeys(1, new_epoch_secret()).token_for("x")
    second = EpochKeys(2, new_epoch_secret()).token_for("x")
    assert parse_token(first).epoch == 1 and parse_token(second).epoch == 2
    assert first.split("_")[1] != second.split("_")[1]
    assert is_token(first) and len(first.split("_")[1]) == 32


def test_key_ring_rebuilt_from_wrapped_secret_gives_identical_results() -> None:
    master_hex = MasterKey.generate().to_hex()
    master = MasterKey.from_hex(master_hex)
    wrapped = master.wrap_epoch_secret(4, new_epoch_secret())
    first = KeyRing.from_wrapped(master, [(4, wrapped)])
    # A "restart": a new MasterKey object and a new ring from the same bytes.
    second = KeyRing.from_wrapped(MasterKey.from_hex(master_hex), [(4, wrapped)])
    assert first.get(4).seal("same value") == second.get(4).seal("same value")
    token, ciphertext = first.get(4).seal("same value")
    assert second.decrypt(token, ciphertext) == "same value"


def test_key_ring_membership_unknown_epoch_and_conflicts() -> None:
    master = MasterKey.generate()
    ring = KeyRing(master)
    secret = new_epoch_secret()
    keys = ring.add(1, master.wrap_epoch_secret(1, secret))
    assert 1 in ring and 2 not in ring and len(ring) == 1
    # The same secret re-wrapped (fresh nonce) is the same epoch: no-op.
    assert ring.add(1, master.wrap_epoch_secret(1, secret)) is keys
    with pytest.raises(KeyRingConflictError):
        ring.add(1, master.wrap_epoch_secret(1, new_epoch_secret()))
    with pytest.raises(UnknownEpochError):
        ring.get(2)
    with pytest.raises(UnknownEpochError):
        ring.decrypt("tv2_" + "a" * 32, b"x" * 20)
    with pytest.raises(TokenFormatError):
        ring.decrypt("not a token", b"x" * 20)
    with pytest.raises(UnwrapError):
        ring.add(3, master.wrap_epoch_secret(2, new_epoch_secret()))
    assert ring.epochs() == [1]


def test_no_key_material_in_repr_str_or_pickle() -> None:
    master = MasterKey(FIXED_MASTER)
    keys = EpochKeys(1, FIXED_SECRET)
    ring = KeyRing(master)
    ring.add(1, master.wrap_epoch_secret(1, FIXED_SECRET))
    token_key = _hkdf(FIXED_SECRET, b"tokenvault token key", 32)
    for obj in (master, keys, ring):
        for text in (repr(obj), str(obj)):
            for secret in (FIXED_MASTER, FIXED_SECRET, token_key):
                assert secret.hex() not in text and repr(secret) not in text
        with pytest.raises(TypeError):
            pickle.dumps(obj)


def test_idempotency_fingerprint_separates_its_fields() -> None:
    master = MasterKey.generate()
    base = master.idempotency_fingerprint("alice", "tokenize", b'{"values":["a"]}')
    assert base == master.idempotency_fingerprint("alice", "tokenize", b'{"values":["a"]}')
    assert len(base) == 32
    others = {
        master.idempotency_fingerprint("bob", "tokenize", b'{"values":["a"]}'),
        master.idempotency_fingerprint("alice", "rotate", b'{"values":["a"]}'),
        master.idempotency_fingerprint("alice", "tokenize", b'{"values":["b"]}'),
        # Moving bytes across the separator must change the fingerprint.
        master.idempotency_fingerprint("alic", "etokenize", b'{"values":["a"]}'),
        MasterKey.generate().idempotency_fingerprint("alice", "tokenize", b'{"values":["a"]}'),
    }
    assert base not in others and len(others) == 5
    with pytest.raises(ValueError):
        master.idempotency_fingerprint("al\x00ice", "tokenize", b"")


def test_fingerprint_key_is_hkdf_of_master_key() -> None:
    master = MasterKey(FIXED_MASTER)
    fingerprint_key = _hkdf(FIXED_MASTER, b"tokenvault idempotency", 32)
    expected = hmac.new(fingerprint_key, b"p\x00k\x00body", hashlib.sha256).digest()
    assert master.idempotency_fingerprint("p", "k", b"body") == expected


def _write_mode(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_master_key_from_file_accepts_0600_and_0400(tmp_path: Path) -> None:
    for mode in (0o600, 0o400):
        path = _write_mode(tmp_path / f"key{mode:o}", FIXED_MASTER.hex() + "\n", mode)
        assert MasterKey.from_file(path).to_hex() == FIXED_MASTER.hex()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o610])
def test_master_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _write_mode(tmp_path / "key", FIXED_MASTER.hex(), mode)
    with pytest.raises(SecretFileError) as caught:
        MasterKey.from_file(path)
    assert "chmod 600" in str(caught.value)
    assert FIXED_MASTER.hex() not in str(caught.value)


@pytest.mark.parametrize(
    "content",
    ["", "00" * 31, "00" * 33, "zz" * 32, FIXED_MASTER.hex() + "x", "é" * 64],
)
def test_malformed_key_file_is_refused_without_echo(tmp_path: Path, content: str) -> None:
    path = _write_mode(tmp_path / "key", content, 0o600)
    with pytest.raises(SecretFileError) as caught:
        MasterKey.from_file(path)
    if content:
        assert content not in str(caught.value)


def test_missing_symlinked_directory_and_huge_key_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="does not exist"):
        MasterKey.from_file(tmp_path / "absent")
    target = _write_mode(tmp_path / "real", FIXED_MASTER.hex(), 0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(SecretFileError):
        MasterKey.from_file(link)
    with pytest.raises(SecretFileError):
        MasterKey.from_file(tmp_path)
    huge = _write_mode(tmp_path / "huge", "0" * 5000, 0o600)
    with pytest.raises(SecretFileError, match="too large"):
        MasterKey.from_file(huge)


def test_environment_overrides_file_and_is_validated(tmp_path: Path) -> None:
    path = _write_mode(tmp_path / "key", FIXED_MASTER.hex(), 0o600)
    other = bytes(32).hex()
    assert MasterKey.load(path, {"TOKENVAULT_MASTER_KEY": other}).to_hex() == other
    assert MasterKey.load(path, {}).to_hex() == FIXED_MASTER.hex()
    assert MasterKey.load(None, {"TOKENVAULT_MASTER_KEY": other}).to_hex() == other
    with pytest.raises(MasterKeyError) as caught:
        MasterKey.load(path, {"TOKENVAULT_MASTER_KEY": "ab" * 31 + "zz"})
    assert "ab" * 31 not in str(caught.value)
    with pytest.raises(MasterKeyError, match="no master key"):
        MasterKey.load(None, {})


def test_write_secret_file_creates_0600_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    write_secret_file(path, FIXED_SECRET)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert read_secret_file(path, "cluster secret") == FIXED_SECRET
    with pytest.raises(FileExistsError):
        write_secret_file(path, new_epoch_secret())
    assert read_secret_file(path, "cluster secret") == FIXED_SECRET
    master = MasterKey.generate()
    master.write_file(tmp_path / "master.key")
    assert MasterKey.from_file(tmp_path / "master.key").to_hex() == master.to_hex()


def test_a_secret_file_whose_write_fails_is_not_left_half_written(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way (a full disk) leaves no file under the key's name, which every later try
    would refuse to replace; and nothing else in the directory. The next try, once it can write, succeeds."""
    import tokenvault.crypto.keys as keys_module

    def half(descriptor: int, data: bytes) -> None:
        os.write(descriptor, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(keys_module, "write_whole", half)
    path = tmp_path / "master.key"
    with pytest.raises(OSError):
        write_secret_file(path, FIXED_SECRET)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_secret_file(path, FIXED_SECRET)
    assert read_secret_file(path, "master key") == FIXED_SECRET
    assert [entry.name for entry in tmp_path.iterdir()] == ["master.key"]


def test_master_key_must_be_32_bytes() -> None:
    for bad in (b"", bytes(31), bytes(33)):
        with pytest.raises(MasterKeyError):
            MasterKey(bad)
    with pytest.raises(MasterKeyError):
        MasterKey.from_hex("00" * 16)


def test_a_value_of_the_largest_configurable_size_is_accepted_everywhere_and_decrypts() -> None:
    """[limits] max_value_bytes may be 1 MiB, and the log takes its ciphertext; decryption refused any
    ciphertext over 1 MiB, so such a value was acknowledged and read back as null for ever (checked on
    the code before). One bound now serves all three."""
    keys = EpochKeys(1, new_epoch_secret())
    value = "a" * keys_module.MAX_VALUE_BYTES
    assert LimitsConfig(max_value_bytes=keys_module.MAX_VALUE_BYTES).max_value_bytes == len(value)
    with pytest.raises(ConfigError):
        LimitsConfig(max_value_bytes=keys_module.MAX_VALUE_BYTES + 1)
    token, ciphertext = keys.seal(value)
    assert len(ciphertext) == keys_module.MAX_CIPHERTEXT_BYTES == commands.MAX_CIPHERTEXT_BYTES
    commands.TokenizeCommand(1, ((token, ciphertext),), None, None, None, 0)  # the log takes it
    assert keys.decrypt(token, ciphertext) == value


def test_a_key_file_with_whitespace_between_its_hex_digits_is_refused(tmp_path: Path) -> None:
    """bytes.fromhex skips whitespace inside the text: 62 digits and two spaces passed the length check and
    gave a 31-byte cluster secret (checked on the code before)."""
    path = tmp_path / "cluster.secret"
    path.write_text("ab" * 15 + "  " + "cd" * 16 + "\n")
    os.chmod(path, 0o600)
    with pytest.raises(SecretFileError, match="exactly 64 hex characters"):
        read_secret_file(path, "cluster secret", 32)
    path.write_text("ab" * 32 + "\n")
    assert read_secret_file(path, "cluster secret", 32) == bytes.fromhex("ab" * 32)
