"""A SoftHSM2 token for the key custody tests, in a temporary directory.

SoftHSM2 (Debian's ``softhsm2``; ``.ci/run`` installs it when ``softhsm2-util``
is missing) reads its configuration file from SOFTHSM2_CONF when the module is
first loaded into a process, and python-pkcs11 keeps a loaded module for the
life of the process; so one test session uses one SoftHSM2 directory, set up
once, with one token and several keys in it. Node processes started by the
tests get the same SOFTHSM2_CONF in their environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

MODULE_CANDIDATES = (Path("/usr/lib/softhsm/libsofthsm2.so"),
                     Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
                     Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"))
TOKEN_LABEL = "tokenvault-test"
USER_PIN = "4711-user-pin"
SECURITY_OFFICER_PIN = "8642-so-pin"
MASTER_KEY_LABEL = "tokenvault-master"
REQUIRE_SOFTHSM_VARIABLE = "TOKENVAULT_REQUIRE_SOFTHSM"


@dataclass(frozen=True, slots=True)
class SoftHsm:
    directory: Path
    module: Path
    token_label: str = TOKEN_LABEL
    pin: str = USER_PIN

    @property
    def conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    def environment(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}


def softhsm_missing(reason: str) -> NoReturn:
    """Without SoftHSM2 the PKCS#11 custody tests cannot run: skipped, saying why, on a machine that lacks
    it (a newcomer's ./run_tests.sh passes there); a failure where TOKENVAULT_REQUIRE_SOFTHSM is set, as
    .ci/run sets it after installing the package, so CI never skips them unseen."""
    message = f"{reason} (apt-get install softhsm2; .ci/run installs it): the PKCS#11 key custody tests need it"
    if os.environ.get(REQUIRE_SOFTHSM_VARIABLE, "") not in ("", "0"):
        pytest.fail(message)
    pytest.skip(message)


def softhsm_module() -> Path:
    for candidate in MODULE_CANDIDATES:
        if candidate.is_file():
            return candidate
    softhsm_missing("SoftHSM2 is not installed")


def make_softhsm(directory: Path) -> SoftHsm:
    """Initialise one token in ``directory`` and point this process's SOFTHSM2_CONF at it."""
    utility = shutil.which("softhsm2-util")
    module = softhsm_module()
    if utility is None:
        softhsm_missing("softhsm2-util is not on PATH")
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    softhsm = SoftHsm(directory, module)
    softhsm.conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    environment = {**os.environ, **softhsm.environment()}
    subprocess.run([utility, "--init-token", "--free", "--label", TOKEN_LABEL, "--pin", USER_PIN,
                    "--so-pin", SECURITY_OFFICER_PIN], env=environment, check=True, capture_output=True)
    os.environ["SOFTHSM2_CONF"] = str(softhsm.conf)
    return softhsm


def create_aes_key(softhsm: SoftHsm, label: str, *, bits: int = 256, sign: bool = True,
                   extractable: bool = False, sensitive: bool = True) -> None:
    """Generate an AES key on the token, as an operator would (pkcs11-tool --keygen)."""
    import pkcs11
    from pkcs11 import Attribute, KeyType

    token = pkcs11.lib(str(softhsm.module)).get_token(token_label=softhsm.token_label)
    with token.open(user_pin=softhsm.pin, rw=True) as session:
        session.generate_key(KeyType.AES, bits, label=label, store=True, template={
            Attribute.SENSITIVE: sensitive, Attribute.EXTRACTABLE: extractable, Attribute.SIGN: sign,
            Attribute.ENCRYPT: True, Attribute.DECRYPT: True})


def import_aes_key(softhsm: SoftHsm, label: str, value: bytes) -> None:
    """Put a known 32-byte AES key on the token, sensitive and not extractable from then on
    (how an operator would move a key file's key into a token)."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    token = pkcs11.lib(str(softhsm.module)).get_token(token_label=softhsm.token_label)
    with token.open(user_pin=softhsm.pin, rw=True) as session:
        session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.TOKEN: True,
            Attribute.LABEL: label, Attribute.VALUE: value, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.SIGN: True})
