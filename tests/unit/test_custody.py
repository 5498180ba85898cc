"""Key custody: where the master key comes from, what it protects, and how bad sources fail.

The promises checked (docs/security.md, "Key custody"):

* PKCS#11 (SoftHSM2): epoch secrets are wrapped and unwrapped by an AES key that
  stays inside the token, in the same 60-byte format a key file gives; the same
  token gives the same epoch keys and idempotency fingerprints in every session;
  a key that could leave the token is refused; a node runs on it and restarts
  to the same tokens.
* TOKENVAULT_MASTER_KEY and the PIN variable are removed from the environment as
  they are read, and the sealer child of a real node has neither.
* Bad sources (key file missing, short, not hex, too open, inside the data
  directory; PKCS#11 module missing, wrong PIN, no such token or key) stop the
  node with a message that names what is wrong, without a traceback, the PIN or
  key material.
* A copy of a node's data directory holds no value and no key; it shows
  ciphertexts, value lengths and equality within an epoch; with the master key
  too, every value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


from node_support import child_pids, make_configs, start_node, wait_until
from softhsm_support import (MASTER_KEY_LABEL, REQUIRE_SOFTHSM_VARIABLE, SoftHsm, create_aes_key, import_aes_key,
                             make_softhsm, softhsm_missing)
from tokenvault.config import ConfigError, NodeConfig, Pkcs11Config, parse_config, to_toml, write_node_config
from tokenvault.crypto.keys import (WRAPPED_SECRET_BYTES, KeyCustodyError, KeyRing, MasterKey, UnwrapError,
                               new_epoch_secret)
from tokenvault.crypto.custody import Pkcs11MasterKey, _Login, _pin_digest
from tokenvault.core.store import VaultStore

REPOSITORY = Path(__file__).resolve().parents[2]
TOKENVAULT = str(Path(sys.executable).parent / "tokenvault")
PIN_VARIABLE = "TOKENVAULT_PKCS11_PIN"


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    token = make_softhsm(tmp_path_factory.mktemp("softhsm"))
    create_aes_key(token, MASTER_KEY_LABEL)
    create_aes_key(token, "other-master")
    create_aes_key(token, "extractable", extractable=True)
    create_aes_key(token, "not-sensitive", sensitive=False)
    create_aes_key(token, "cannot-sign", sign=False)
    create_aes_key(token, "aes-128", bits=128)
    create_aes_key(token, "twice")
    create_aes_key(token, "twice")
    import_aes_key(token, "imported", bytes.fromhex(IMPORTED_KEY_HEX))
    return token


IMPORTED_KEY_HEX = "5e" * 16 + "a7" * 16


def pkcs11_config(softhsm: SoftHsm, **overrides: object) -> Pkcs11Config:
    fields = {"module": softhsm.module, "token_label": softhsm.token_label, "key_label": MASTER_KEY_LABEL}
    fields.update(overrides)
    return Pkcs11Config(**fields)  # type: ignore[arg-type]


def open_token(softhsm: SoftHsm, **overrides: object) -> Pkcs11MasterKey:
    return Pkcs11MasterKey.open(pkcs11_config(softhsm, **overrides), {PIN_VARIABLE: softhsm.pin})


def pin_file(directory: Path, pin: str) -> Path:
    path = directory / "pin"
    path.write_text(pin + "\n")
    path.chmod(0o600)
    return path


# ------------------------------------------------------------------ PKCS#11: wrapping on the token


def test_the_token_wraps_in_the_format_a_key_file_gives_and_unwraps_what_it_wrapped(softhsm: SoftHsm) -> None:
    key = open_token(softhsm)
    try:
        secret = new_epoch_secret()
        blob = key.wrap_epoch_secret(3, secret)
        assert len(blob) == WRAPPED_SECRET_BYTES and secret not in blob
        assert key.unwrap_epoch_secret(3, blob) == secret
        assert key.wrap_epoch_secret(3, secret) != blob  # a fresh nonce every time
        assert "pin" not in repr(key).lower() and softhsm.pin not in repr(key)
    finally:
        key.close()


def test_a_blob_of_another_key_or_epoch_or_tampered_does_not_unwrap(softhsm: SoftHsm) -> None:
    key, other = open_token(softhsm), open_token(softhsm, key_label="other-master")
    try:
        blob = key.wrap_epoch_secret(1, new_epoch_secret())
        with pytest.raises(UnwrapError, match="epoch 1 does not authenticate"):
            other.unwrap_epoch_secret(1, blob)
        with pytest.raises(UnwrapError, match="epoch 2 does not authenticate"):
            key.unwrap_epoch_secret(2, blob)
        tampered = bytearray(blob)
        tampered[20] ^= 1
        with pytest.raises(UnwrapError):
            key.unwrap_epoch_secret(1, bytes(tampered))
        with pytest.raises(UnwrapError, match="exactly 60 bytes"):
            key.unwrap_epoch_secret(1, blob[:-1])
        with pytest.raises(UnwrapError):  # a key file's key is another key too
            MasterKey.generate().unwrap_epoch_secret(1, blob)
    finally:
        key.close()
        other.close()


def test_every_session_gives_the_same_epoch_keys_and_idempotency_fingerprints(softhsm: SoftHsm) -> None:
    first = open_token(softhsm)
    wrapped = [(epoch, first.wrap_epoch_secret(epoch, new_epoch_secret())) for epoch in (1, 2)]
    fingerprint = first.idempotency_fingerprint("tokenizer", "tokenize", b'["4111"]')
    tokens = [KeyRing.from_wrapped(first, wrapped).get(epoch).token_for("4111 1111") for epoch in (1, 2)]
    first.close()
    second = open_token(softhsm)  # as after a restart
    try:
        ring = KeyRing.from_wrapped(second, wrapped)
        assert [ring.get(epoch).token_for("4111 1111") for epoch in (1, 2)] == tokens
        assert second.idempotency_fingerprint("tokenizer", "tokenize", b'["4111"]') == fingerprint
        assert second.idempotency_fingerprint("other", "tokenize", b'["4111"]') != fingerprint
        other = open_token(softhsm, key_label="other-master")
        assert other.idempotency_fingerprint("tokenizer", "tokenize", b'["4111"]') != fingerprint
        other.close()
    finally:
        second.close()


def test_a_key_files_key_moved_into_a_token_opens_the_same_epochs(softhsm: SoftHsm) -> None:
    """The token wraps exactly as MasterKey does (AES-256-GCM, nonce || ciphertext || tag, the
    epoch as associated data), so a cluster can move its key file's key into a token."""
    in_memory = MasterKey.from_hex(IMPORTED_KEY_HEX)
    token = open_token(softhsm, key_label="imported")
    try:
        secret = new_epoch_secret()
        assert token.unwrap_epoch_secret(4, in_memory.wrap_epoch_secret(4, secret)) == secret
        assert in_memory.unwrap_epoch_secret(4, token.wrap_epoch_secret(4, secret)) == secret
        # The idempotency fingerprint key is derived differently (AES-CMAC on the token, HKDF in memory).
        assert token.idempotency_fingerprint("p", "tokenize", b"{}") != \
            in_memory.idempotency_fingerprint("p", "tokenize", b"{}")
    finally:
        token.close()


def test_the_token_key_cannot_be_read_out_and_a_key_that_could_is_refused(softhsm: SoftHsm) -> None:
    import pkcs11

    token = pkcs11.lib(str(softhsm.module)).get_token(token_label=softhsm.token_label)
    with token.open(user_pin=softhsm.pin) as session:
        key = session.get_key(label=MASTER_KEY_LABEL, key_type=pkcs11.KeyType.AES)
        with pytest.raises(pkcs11.AttributeSensitive):
            key[pkcs11.Attribute.VALUE]
    for label in ("extractable", "not-sensitive"):
        with pytest.raises(KeyCustodyError, match=f"the key '{label}' .* can leave the token"):
            open_token(softhsm, key_label=label)


PKCS11_FAILURES = {
    "module not found": ({"module": Path("/nonexistent/libpkcs11.so")},
                         "PKCS#11 module /nonexistent/libpkcs11.so not found"),
    "not a PKCS#11 module": ({"module": Path("/etc/hostname")}, "/etc/hostname cannot be loaded"),
    "no such token": ({"token_label": "no-such-token"}, "no token labelled 'no-such-token'"),
    "no such key": ({"key_label": "no-such-key"}, "no AES key labelled 'no-such-key' on PKCS#11 token"),
    "two keys of that label": ({"key_label": "twice"}, "more than one AES key labelled 'twice'"),
    "key cannot sign": ({"key_label": "cannot-sign"}, "must allow CKA_SIGN"),
    "AES-128 key": ({"key_label": "aes-128"}, "is AES-128; AES-256 is required"),
}


@pytest.mark.parametrize("case", sorted(PKCS11_FAILURES))
def test_pkcs11_failures_name_what_is_wrong(softhsm: SoftHsm, case: str) -> None:
    overrides, expected = PKCS11_FAILURES[case]
    with pytest.raises(KeyCustodyError) as raised:
        open_token(softhsm, **overrides)
    assert expected in str(raised.value)
    assert softhsm.pin not in str(raised.value)


def test_a_wrong_or_missing_pin_names_the_token_and_never_the_pin(softhsm: SoftHsm, tmp_path: Path) -> None:
    source = pkcs11_config(softhsm)
    with pytest.raises(KeyCustodyError, match="the PIN for PKCS#11 token 'tokenvault-test' is incorrect") as raised:
        Pkcs11MasterKey.open(source, {PIN_VARIABLE: "0000-wrong"})
    assert "0000-wrong" not in str(raised.value)
    with pytest.raises(KeyCustodyError, match=f"no PIN for PKCS#11 token 'tokenvault-test': set {PIN_VARIABLE}"):
        Pkcs11MasterKey.open(source, {})
    loose = pin_file(tmp_path, softhsm.pin)
    loose.chmod(0o644)
    with pytest.raises(KeyCustodyError, match="has mode 0644"):
        Pkcs11MasterKey.open(pkcs11_config(softhsm, pin_file=loose), {})
    with pytest.raises(KeyCustodyError, match="does not exist"):
        Pkcs11MasterKey.open(pkcs11_config(softhsm, pin_file=tmp_path / "absent"), {})
    loose.chmod(0o600)
    Pkcs11MasterKey.open(pkcs11_config(softhsm, pin_file=loose), {}).close()


def test_a_pin_variable_that_is_not_utf8_is_refused_without_any_of_the_pin(softhsm: SoftHsm) -> None:
    """os.environ holds a variable's bytes that are not UTF-8 as lone surrogates (0xff is "\\udcff"). The
    module's PIN encoding raised UnicodeEncodeError, no KeyCustodyError, quoting that character and its
    position in the PIN."""
    environment = {PIN_VARIABLE: softhsm.pin + "\udcff"}
    with pytest.raises(KeyCustodyError, match=f"^{PIN_VARIABLE} is not UTF-8 text$"):
        Pkcs11MasterKey.open(pkcs11_config(softhsm), environment)
    assert environment == {}  # removed all the same


def test_the_shared_login_does_not_show_the_digest_of_its_pin() -> None:
    """The process's login keeps a SHA-256 of the PIN to check a second open's PIN; a PIN of a few digits
    is found from it by trying every one, so its repr (a log line, a traceback's locals) leaves it out."""
    digest = _pin_digest("4711")
    shown = repr(_Login(session=None, pin_digest=digest))
    assert digest.hex() not in shown and repr(digest) not in shown and "pin_digest" not in shown


def test_the_pin_variable_is_removed_from_the_environment_as_it_is_read(softhsm: SoftHsm) -> None:
    environment = {PIN_VARIABLE: softhsm.pin, "OTHER": "kept"}
    Pkcs11MasterKey.open(pkcs11_config(softhsm), environment).close()
    assert environment == {"OTHER": "kept"}
    environment = {"MY_PIN": softhsm.pin}
    Pkcs11MasterKey.open(pkcs11_config(softhsm, pin_env="MY_PIN"), environment).close()
    assert environment == {}


# ------------------------------------------------------------------ the config


def _config(tmp_path: Path, **overrides: object) -> NodeConfig:
    (config,) = make_configs(tmp_path, 1)
    return dataclasses.replace(config, **overrides)


def test_the_pkcs11_section_round_trips_and_never_holds_the_pin(softhsm: SoftHsm, tmp_path: Path) -> None:
    config = _config(tmp_path, master_key_file=None,
                     pkcs11=pkcs11_config(softhsm, pin_env="VAULT_PIN", pin_file=tmp_path / "pin"))
    text = to_toml(config)
    assert "[pkcs11]" in text and softhsm.pin not in text
    assert parse_config(text) == config
    with pytest.raises(ConfigError, match=r"\[pkcs11\] must not hold the PIN"):
        parse_config(text.replace("[pkcs11]\n", '[pkcs11]\npin = "1234"\n'))
    with pytest.raises(ConfigError, match="pkcs11.pin_env must be an environment variable name"):
        parse_config(text.replace('pin_env = "VAULT_PIN"', 'pin_env = "NOT A NAME"'))
    with pytest.raises(ConfigError, match=r"\[pkcs11\] is missing key_label"):
        parse_config("\n".join(line for line in text.splitlines() if not line.startswith("key_label")))
    with pytest.raises(ConfigError, match="pkcs11.module must be an absolute path"):
        parse_config(text.replace(f'module = "{softhsm.module}"', 'module = "libsofthsm2.so"'))


def test_one_source_only(softhsm: SoftHsm, tmp_path: Path) -> None:
    config = _config(tmp_path)
    with pytest.raises(ConfigError, match="set either master_key_file or \\[pkcs11\\], not both"):
        dataclasses.replace(config, pkcs11=pkcs11_config(softhsm))
    token_config = dataclasses.replace(config, master_key_file=None, pkcs11=pkcs11_config(softhsm))
    environment = {"TOKENVAULT_MASTER_KEY": MasterKey.generate().to_hex(), PIN_VARIABLE: softhsm.pin}
    with pytest.raises(ConfigError, match="TOKENVAULT_MASTER_KEY is set but the config keeps the master key in a "
                                          "PKCS#11 token"):
        token_config.load_master_key(environment)
    assert "TOKENVAULT_MASTER_KEY" not in environment  # removed all the same


def test_a_key_pin_or_cluster_secret_file_inside_the_data_directory_is_refused(softhsm: SoftHsm, tmp_path: Path) -> None:
    config = _config(tmp_path)
    inside = config.data_dir / "keys" / "master.key"
    with pytest.raises(ConfigError, match=f"master_key_file {inside} is inside the data directory "
                                          f"{config.data_dir}"):
        dataclasses.replace(config, master_key_file=inside)
    with pytest.raises(ConfigError, match="is inside the data directory"):
        dataclasses.replace(config, master_key_file=config.data_dir / ".." / "data" / "master.key")
    with pytest.raises(ConfigError, match="pkcs11.pin_file .* is inside the data directory"):
        dataclasses.replace(config, master_key_file=None,
                            pkcs11=pkcs11_config(softhsm, pin_file=config.data_dir / "pin"))
    with pytest.raises(ConfigError, match="cluster_secret_file .* is inside the data directory"):
        dataclasses.replace(config, cluster_secret_file=config.data_dir / "cluster.secret")
    # Through a symlink: the real path is checked when the key is loaded.
    config.data_dir.mkdir(parents=True)
    MasterKey.generate().write_file(config.data_dir / "master.key")
    (tmp_path / "link").symlink_to(config.data_dir)
    linked = dataclasses.replace(config, master_key_file=tmp_path / "link" / "master.key")
    with pytest.raises(ConfigError, match="is inside the data directory"):
        linked.load_master_key({})
    linked_secret = dataclasses.replace(config, cluster_secret_file=tmp_path / "link" / "cluster.secret")
    with pytest.raises(ConfigError, match="cluster_secret_file .* is inside the data directory"):
        linked_secret.load_cluster_secret()


def test_the_master_key_variable_is_removed_from_the_environment_as_it_is_read(tmp_path: Path) -> None:
    key = MasterKey.generate()
    environment = {"TOKENVAULT_MASTER_KEY": key.to_hex(), "OTHER": "kept"}
    loaded = _config(tmp_path, master_key_file=None).load_master_key(environment)
    assert isinstance(loaded, MasterKey) and loaded.to_hex() == key.to_hex()
    assert environment == {"OTHER": "kept"}


# ------------------------------------------------------------------ a node on a PKCS#11 token


async def test_a_node_keeps_its_master_key_in_the_token_and_restarts_to_the_same_tokens(
        softhsm: SoftHsm, tmp_path: Path) -> None:
    config = _config(tmp_path, master_key_file=None,
                     pkcs11=pkcs11_config(softhsm, pin_file=pin_file(tmp_path, softhsm.pin)))
    running = await start_node(config)
    try:
        assert isinstance(running.node.master_key, Pkcs11MasterKey)
        await wait_until(lambda: running.node.store.active_epoch() == 1, 5.0, "epoch 1")
        first = json.loads((await running.service.tokenize("p", ["4111 1111 1111 1111", "jane"], None)).body)
        rotated = await running.service.rotate_epoch("p", None)
        assert rotated.status == 201
        second = json.loads((await running.service.tokenize("p", ["jane"], None)).body)
        assert second["epoch"] == 2 and second["tokens"] != first["tokens"][1:]
    finally:
        await running.close()
    running = await start_node(config)
    try:
        await wait_until(running.is_primary, 5.0, "the restarted node to be primary")
        tokens = first["tokens"] + second["tokens"]
        assert await running.service.detokenize(tokens) == ["4111 1111 1111 1111", "jane", "jane"]
        again = json.loads((await running.service.tokenize("p", ["jane"], None)).body)
        assert again["tokens"] == second["tokens"]
    finally:
        await running.close()
    # The same wrapped secrets do not open under another key: the store is useless without the token.
    other = dataclasses.replace(config, pkcs11=dataclasses.replace(config.pkcs11, key_label="other-master"))
    with pytest.raises(UnwrapError):
        await start_node(other)


class _FailingToken:
    """A master key whose token has gone away (removed, logged out by an administrator)."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def wrap_epoch_secret(self, epoch: int, secret: bytes) -> bytes:
        raise KeyCustodyError("PKCS#11 error DeviceRemoved while wrapping an epoch secret (token 't')")

    def unwrap_epoch_secret(self, epoch: int, blob: bytes) -> bytes:
        raise KeyCustodyError("PKCS#11 error DeviceRemoved while unwrapping an epoch secret (token 't')")

    def idempotency_fingerprint(self, principal: str, kind: str, body: bytes) -> bytes:
        return self._inner.idempotency_fingerprint(principal, kind, body)  # type: ignore[attr-defined]


async def test_a_token_that_cannot_wrap_makes_a_rotation_503_with_nothing_proposed(tmp_path: Path) -> None:
    from tokenvault.errors import Unavailable

    running = await start_node(_config(tmp_path))
    try:
        await wait_until(lambda: running.node.store.active_epoch() == 1, 5.0, "epoch 1")
        commit_index = running.node.replica.commit_index
        running.node.master_key = _FailingToken(running.node.master_key)  # type: ignore[assignment]
        with pytest.raises(Unavailable, match="cannot wrap a new epoch secret"):
            await running.service.rotate_epoch("p", None)
        assert running.node.replica.commit_index == commit_index and running.node.store.active_epoch() == 1
        assert running.node.fatal_error is None
    finally:
        await running.close()


async def test_a_token_that_cannot_unwrap_a_committed_epoch_stops_the_node(tmp_path: Path) -> None:
    """Serving on without the new epoch's keys would fail every tokenize in it: the node stops (exit 2
    under `tokenvault serve`) and unwraps again from its store when restarted."""
    config = _config(tmp_path)
    running = await start_node(config)
    try:
        await wait_until(lambda: running.node.store.active_epoch() == 1, 5.0, "epoch 1")
        running.node.keyring = KeyRing(_FailingToken(running.node.master_key))  # type: ignore[arg-type]
        with contextlib.suppress(Exception):
            await running.service.rotate_epoch("p", None)
        await wait_until(lambda: running.node.fatal_error is not None, 5.0, "the node to stop")
        assert running.node.fatal_error.startswith("KeyCustodyError: PKCS#11 error DeviceRemoved")
    finally:
        await running.close()
    running = await start_node(config)
    try:
        await wait_until(running.is_primary, 5.0, "the restarted node to be primary")
        assert running.node.store.active_epoch() == 2 and 2 in running.node.keyring
    finally:
        await running.close()


# ------------------------------------------------------------------ real node processes


def _serve_environment(**extra: str) -> dict[str, str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("TOKENVAULT_")}
    environment.update(extra)
    return environment


def _run_serve(config: NodeConfig, directory: Path, environment: dict[str, str]) -> subprocess.CompletedProcess:
    path = directory / "node.toml"
    write_node_config(path, config)
    return subprocess.run([TOKENVAULT, "serve", "--config", str(path)], env=environment, cwd=REPOSITORY,
                          capture_output=True, text=True, timeout=60)


def _bad_key_file(directory: Path, case: str) -> Path:
    path = directory / "keys" / "master.key"
    path.parent.mkdir(exist_ok=True)
    if case == "missing":
        return path
    path.write_text({"short": "abcd\n", "not hex": "zz" * 32 + "\n"}.get(case, "ab" * 32 + "\n"))
    path.chmod(0o644 if case == "too open" else 0o600)
    return path


KEY_FILE_FAILURES = {
    "missing": "does not exist",
    "short": "must contain exactly 64 hex characters",
    "not hex": "must contain exactly 64 hex characters",
    "too open": "has mode 0644; it must not be readable or writable by group or others",
}


@pytest.mark.parametrize("case", sorted(KEY_FILE_FAILURES) + ["inside the data directory"])
def test_a_node_with_a_bad_key_file_does_not_start_and_says_why(tmp_path: Path, case: str) -> None:
    config = _config(tmp_path)
    if case == "inside the data directory":
        config.data_dir.mkdir(parents=True)
        MasterKey.generate().write_file(config.data_dir / "master.key")
        config = dataclasses.replace(config, master_key_file=tmp_path / "placeholder.key")
        path = tmp_path / "node.toml"
        write_node_config(path, config)
        path.write_text(path.read_text().replace(str(tmp_path / "placeholder.key"),
                                                 str(config.data_dir / "master.key")))
        result = subprocess.run([TOKENVAULT, "serve", "--config", str(path)], env=_serve_environment(),
                                capture_output=True, text=True, timeout=60)
        expected = f"master_key_file {config.data_dir / 'master.key'} is inside the data directory {config.data_dir}"
    else:
        key_path = _bad_key_file(tmp_path, case)
        result = _run_serve(dataclasses.replace(config, master_key_file=key_path), tmp_path, _serve_environment())
        expected = KEY_FILE_FAILURES[case]
        assert str(key_path) in result.stderr
        assert "node.refused_to_start" in result.stderr
        assert not config.data_dir.exists()  # refused before the data directory was even created
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "ab" * 32 not in result.stdout + result.stderr


PROCESS_PKCS11_FAILURES = {
    "module not found": ({"module": Path("/nonexistent/libpkcs11.so")}, None, "not found"),
    "wrong PIN": ({}, "9999-wrong-pin", "is incorrect"),
    "no such token": ({"token_label": "no-such-token"}, None, "no token labelled 'no-such-token'"),
    "no such key": ({"key_label": "no-such-key"}, None, "no AES key labelled 'no-such-key'"),
}


@pytest.mark.parametrize("case", sorted(PROCESS_PKCS11_FAILURES))
def test_a_node_with_an_unusable_token_does_not_start_and_says_why(softhsm: SoftHsm, tmp_path: Path,
                                                                     case: str) -> None:
    overrides, pin, expected = PROCESS_PKCS11_FAILURES[case]
    config = _config(tmp_path, master_key_file=None, pkcs11=pkcs11_config(softhsm, **overrides))
    environment = _serve_environment(**softhsm.environment(), TOKENVAULT_PKCS11_PIN=pin or softhsm.pin)
    result = _run_serve(config, tmp_path, environment)
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr
    assert "node.refused_to_start" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert softhsm.pin not in result.stdout + result.stderr and "9999-wrong-pin" not in result.stdout + result.stderr
    assert not config.data_dir.exists()  # refused before the data directory was even created


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[list[subprocess.Popen]]:
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _start_serving(config: NodeConfig, directory: Path, environment: dict[str, str],
                   processes: list[subprocess.Popen]) -> tuple[subprocess.Popen, list[int]]:
    """A real node process; returns it and its children's pids (the sealer and the HTTP workers) once
    /health answers."""
    path = directory / "node.toml"
    write_node_config(path, config)
    process = subprocess.Popen([TOKENVAULT, "serve", "--config", str(path)], env=environment, cwd=REPOSITORY,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    processes.append(process)
    url = f"http://127.0.0.1:{config.http.port}/health"
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the node did not answer /health"
        time.sleep(0.05)
    workers = config.http.workers
    assert workers is not None and workers >= 1  # node_support.make_configs sets it
    children = child_pids(process.pid)
    assert len(children) == 1 + workers, children  # the sealer and the workers
    return process, children


def test_the_children_of_a_real_node_have_no_master_key_in_their_environment(
        tmp_path: Path, serving: list[subprocess.Popen]) -> None:
    key = MasterKey.generate()
    config = _config(tmp_path, master_key_file=None)
    assert config.sealer.enabled
    process, children = _start_serving(config, tmp_path, _serve_environment(TOKENVAULT_MASTER_KEY=key.to_hex()),
                                       serving)
    for child in children:  # the sealer and every HTTP worker
        environ = Path(f"/proc/{child}/environ").read_bytes()
        assert b"TOKENVAULT_MASTER_KEY" not in environ and key.to_hex().encode() not in environ
        assert key.to_hex().encode() not in Path(f"/proc/{child}/cmdline").read_bytes()
        assert b"PATH=" in environ


def test_the_children_of_a_node_on_a_token_have_no_pin_in_their_environment(
        softhsm: SoftHsm, tmp_path: Path, serving: list[subprocess.Popen]) -> None:
    config = _config(tmp_path, master_key_file=None, pkcs11=pkcs11_config(softhsm))
    environment = _serve_environment(**softhsm.environment(), TOKENVAULT_PKCS11_PIN=softhsm.pin)
    process, children = _start_serving(config, tmp_path, environment, serving)
    for child in children:  # the sealer and every HTTP worker
        environ = Path(f"/proc/{child}/environ").read_bytes()
        assert softhsm.pin.encode() not in environ and b"TOKENVAULT_PKCS11_PIN" not in environ


# ------------------------------------------------------------------ a stolen data directory


async def test_a_copy_of_a_data_directory_holds_no_value_and_no_key(tmp_path: Path) -> None:
    """What a copy of one node's data directory gives: ciphertexts, value lengths and equality
    within an epoch, never a value, the master key or an epoch's secret or keys; with the
    master key too, every value."""
    (config,) = make_configs(tmp_path / "node", 1)
    values = [f"4111-1111-{number:04d}-secret-{os.getpid()}" for number in range(40)] + ["jane.doe@example.com"]
    running = await start_node(config)
    try:
        await wait_until(lambda: running.node.store.active_epoch() == 1, 5.0, "epoch 1")
        epoch1 = json.loads((await running.service.tokenize("p", values, None)).body)["tokens"]
        assert (await running.service.rotate_epoch("p", None)).status == 201
        epoch2 = json.loads((await running.service.tokenize("p", values[:1], "idempotent-1")).body)["tokens"]
    finally:
        await running.close()
    stolen = tmp_path / "stolen"
    shutil.copytree(config.data_dir, stolen)
    master_key = MasterKey.from_file(config.master_key_file)
    store = VaultStore.open(stolen / "store")
    try:
        records = store.epochs()
        secrets = [master_key.unwrap_epoch_secret(record.epoch, record.wrapped_secret) for record in records]
        derived = [key for record in records for key in KeyRing.from_wrapped(
            master_key, [(record.epoch, record.wrapped_secret)]).get(record.epoch).derived_keys()]
        forbidden = [value.encode() for value in values] + [bytes.fromhex(master_key.to_hex()),
                                                             master_key.to_hex().encode()]
        forbidden += secrets + [secret.hex().encode() for secret in secrets] + derived
        files = [path for path in stolen.rglob("*") if path.is_file()]
        assert len(files) >= 5
        for path in files:
            content = path.read_bytes()
            for needle in forbidden:
                assert needle not in content, f"{path} holds a value or key"
        # The copy holds the wrapped epoch secrets, which no other key opens.
        assert [record.epoch for record in records] == [1, 2]
        with pytest.raises(UnwrapError):
            KeyRing.from_wrapped(MasterKey.generate(), [(record.epoch, record.wrapped_secret) for record in records])
        # What it does show: one ciphertext per token, 16 bytes longer than the value (lengths leak);
        # a value's token and ciphertext are the same every time within an epoch (equality leaks), and
        # differ across epochs.
        ciphertexts = store.lookup(epoch1 + epoch2)
        assert len(ciphertexts) == len(values) + 1
        for value, token in zip(values, epoch1):
            assert len(ciphertexts[token]) == len(value.encode()) + 16
        assert epoch2[0] != epoch1[0] and ciphertexts[epoch2[0]] != ciphertexts[epoch1[0]]
        # With the master key as well: every value.
        ring = KeyRing.from_wrapped(master_key, [(record.epoch, record.wrapped_secret) for record in records])
        assert [ring.decrypt(token, ciphertexts[token]) for token in epoch1] == values
        # The equality that leaks, as said above: a value sealed again in its epoch gives the same token and
        # ciphertext as the stored ones (deterministic encryption); in the next epoch, others.
        assert ring.get(1).seal_many(values[:3]) == [(token, ciphertexts[token]) for token in epoch1[:3]]
        assert ring.get(2).seal_many(values[:1]) == [(epoch2[0], ciphertexts[epoch2[0]])]
    finally:
        store.close()


async def test_a_token_that_cannot_wrap_logs_epoch_wrap_failed_with_its_reason_cut_to_300_characters(
        tmp_path: Path) -> None:
    """docs/logs.md, `epoch.wrap_failed`: the master key could not wrap a new epoch secret; one line at
    error with `reason` (300 characters at most). A rotation whose wrap works logs none."""
    from structlog.testing import capture_logs

    from tokenvault.errors import Unavailable

    reason = "PKCS#11 error DeviceRemoved while wrapping an epoch secret (token 't'); " + "r" * 400

    class _FailingAtLength(_FailingToken):
        def wrap_epoch_secret(self, epoch: int, secret: bytes) -> bytes:
            raise KeyCustodyError(reason)

    running = await start_node(_config(tmp_path))
    try:
        await wait_until(lambda: running.node.store.active_epoch() == 1, 5.0, "epoch 1")
        with capture_logs() as working:
            assert (await running.service.rotate_epoch("p", None)).status == 201
        running.node.master_key = _FailingAtLength(running.node.master_key)  # type: ignore[assignment]
        with capture_logs() as failing:
            with pytest.raises(Unavailable):
                await running.service.rotate_epoch("p", None)
        assert running.node.store.active_epoch() == 2
    finally:
        await running.close()
    assert [entry for entry in working if entry["event"] == "epoch.wrap_failed"] == []
    assert [entry for entry in failing if entry["event"] == "epoch.wrap_failed"] == [
        {"event": "epoch.wrap_failed", "log_level": "error", "logger": "service", "reason": reason[:300]}]


def test_without_softhsm_the_custody_tests_skip_saying_why_and_fail_where_ci_requires_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A newcomer's ./run_tests.sh on a machine without SoftHSM2 skips them with the reason (they failed);
    .ci/run, which installs it, sets TOKENVAULT_REQUIRE_SOFTHSM so that they can never be skipped there."""
    monkeypatch.delenv(REQUIRE_SOFTHSM_VARIABLE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="SoftHSM2 is not installed .apt-get install softhsm2"):
        softhsm_missing("SoftHSM2 is not installed")
    monkeypatch.setenv(REQUIRE_SOFTHSM_VARIABLE, "1")
    with pytest.raises(pytest.fail.Exception, match="SoftHSM2 is not installed"):
        softhsm_missing("SoftHSM2 is not installed")
    assert f"export {REQUIRE_SOFTHSM_VARIABLE}=1" in (Path(__file__).parents[2] / ".ci" / "run").read_text()
