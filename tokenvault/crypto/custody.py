"""Key custody: the master key kept in a PKCS#11 token, where it never leaves.

The other two sources (a key file, the TOKENVAULT_MASTER_KEY variable) give a
``tokenvault.crypto.keys.MasterKey`` held in memory. With a token, the node holds
only a session and a handle to an AES-256 key that is sensitive and not
extractable, and asks the token to do the two things the master key is for:

* Wrapping an epoch secret: AES-256-GCM *on the token* (CKM_AES_GCM), with a
  random 12-byte nonce and the same associated data as ``MasterKey`` (the
  epoch), so a wrapped blob is nonce || ciphertext || tag, 60 bytes, exactly
  the format a ``MasterKey`` writes. Unwrapping is the token's GCM decryption;
  the epoch secret then lives in the node's memory as it does with a key file
  (the node needs it to derive the epoch's token and data keys).
* The idempotency fingerprint key, derived once at start on the token with
  AES-CMAC as the PRF of NIST SP 800-108's counter-mode KDF; the fingerprint
  HMAC then runs in memory, as it is used on every request with an
  Idempotency-Key. It differs from what a key file's HKDF gives, so a cluster
  keeps one source (changing sources only affects idempotency repeats of
  requests sent before the change).

The token key must allow CKA_ENCRYPT, CKA_DECRYPT and CKA_SIGN and be
CKA_SENSITIVE and not CKA_EXTRACTABLE: a key that can leave the token protects
no better than a key file, so it is refused. Every failure (module not found,
no such token or key, wrong PIN, a mechanism the module lacks, an error from
the token) is a ``KeyCustodyError`` that names what is wrong, never the PIN.

Calls into the module block; they happen at start, at each epoch rotation and
when a snapshot is installed, a handful of times per process, so they run on
the caller's thread under a lock (one session is not safe for concurrent use).
A PKCS#11 login belongs to the whole process, not to a session, so every
``Pkcs11MasterKey`` of one token in a process shares one logged-in session
(counted, logged out when the last one closes); a second one must still
present the same PIN.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NoReturn, Protocol

from tokenvault.crypto.keys import (EPOCH_SECRET_BYTES, GCM_NONCE_BYTES, GCM_TAG_BYTES, WRAPPED_SECRET_BYTES,
                               CryptoError, KeyCustodyError, UnwrapError, epoch_wrap_associated_data,
                               read_private_text_file, take_from_environment)


class Pkcs11Source(Protocol):
    """Where the master key is and how to log in (tokenvault.config.Pkcs11Config, the ``[pkcs11]`` table,
    which validated it)."""

    @property
    def module(self) -> Path: ...

    @property
    def token_label(self) -> str: ...

    @property
    def key_label(self) -> str: ...

    @property
    def pin_env(self) -> str: ...

    @property
    def pin_file(self) -> Path | None: ...

MAX_PIN_BYTES = 256
FINGERPRINT_KEY_LABEL = b"tokenvault idempotency"
FINGERPRINT_KEY_BITS = 256
_CMAC_BYTES = 16


def read_pin(source: Pkcs11Source, environ: Mapping[str, str] | None = None) -> str:
    """The PIN from ``pin_file`` when set, else from the ``pin_env`` variable, which is
    removed from the environment as it is read (so no child process inherits it)."""
    from_environment = take_from_environment(source.pin_env, environ)
    if source.pin_file is not None:
        try:
            return read_private_text_file(source.pin_file, "PKCS#11 PIN", MAX_PIN_BYTES)
        except CryptoError as error:  # names the file and what is wrong with it, never its content
            raise KeyCustodyError(str(error)) from None
    if not from_environment:
        raise KeyCustodyError(f"no PIN for PKCS#11 token {source.token_label!r}: set {source.pin_env} "
                              f"or [pkcs11].pin_file")
    try:
        # os.environ holds a variable's bytes that are not UTF-8 as lone surrogates, which the token's
        # module cannot encode: its UnicodeEncodeError would quote a character of the PIN.
        encoded = from_environment.encode("utf-8")
    except UnicodeEncodeError:
        raise KeyCustodyError(f"{source.pin_env} is not UTF-8 text") from None
    if len(encoded) > MAX_PIN_BYTES:
        raise KeyCustodyError(f"{source.pin_env} is longer than {MAX_PIN_BYTES} bytes")
    return from_environment


@dataclass(slots=True)
class _Login:
    """The process's one logged-in session with a token, shared by its users."""

    session: Any
    # A digest of a short PIN gives the PIN back by trying them all: never in a repr.
    pin_digest: bytes = field(repr=False)
    users: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_logins: dict[tuple[str, str], _Login] = {}
_logins_lock = threading.Lock()


def _pin_digest(pin: str) -> bytes:
    return hashlib.sha256(b"tokenvault pkcs11 pin\x00" + pin.encode("utf-8")).digest()


def _import_pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise KeyCustodyError("[pkcs11] is configured but the python-pkcs11 package is not installed "
                              "(pip install python-pkcs11)") from None
    return pkcs11


class Pkcs11MasterKey:
    """A ``KeyWrapper`` whose key stays inside a PKCS#11 token."""

    __slots__ = ("_pkcs11", "_login", "_login_key", "_key", "_lock", "_fingerprint_hmac", "_where", "_closed")

    def __init__(self, pkcs11: Any, login: _Login, login_key: tuple[str, str], key: Any, where: str) -> None:
        self._pkcs11 = pkcs11
        self._login = login
        self._login_key = login_key
        self._key = key
        self._lock = login.lock
        self._where = where
        self._closed = False
        fingerprint_key = self._derive_fingerprint_key()
        self._fingerprint_hmac = hmac.new(fingerprint_key, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return f"Pkcs11MasterKey({self._where})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Pkcs11MasterKey cannot be pickled")

    @classmethod
    def open(cls, source: Pkcs11Source, environ: Mapping[str, str] | None = None) -> "Pkcs11MasterKey":
        """Log in to the token and find the key; checks that it can do what is needed.
        Raises KeyCustodyError naming what is wrong."""
        pin = read_pin(source, environ)
        pkcs11 = _import_pkcs11()
        module = str(source.module)
        if not os.path.isfile(module):
            raise KeyCustodyError(f"PKCS#11 module {module} not found (no such file)")
        where = f"token {source.token_label!r}, key {source.key_label!r}"
        try:
            library = pkcs11.lib(module)
        except pkcs11.PKCS11Error:
            raise KeyCustodyError(f"PKCS#11 module {module} cannot be loaded (not a PKCS#11 library, or "
                                  f"one of its own dependencies is missing)") from None
        login_key = (module, source.token_label)
        with _logins_lock:
            login = _logins.get(login_key)
            if login is None:
                login = _Login(_log_in(pkcs11, library, module, source, pin), _pin_digest(pin))
                _logins[login_key] = login
            elif not hmac.compare_digest(login.pin_digest, _pin_digest(pin)):
                raise KeyCustodyError(f"the PIN for PKCS#11 token {source.token_label!r} is incorrect")
            login.users += 1
        try:
            with login.lock:
                key = _find_key(pkcs11, login.session, source)
                _check_mechanisms(pkcs11, login.session, source)
            master_key = cls(pkcs11, login, login_key, key, where)
            master_key._self_test()
        except BaseException:
            _release(login_key, login)
            raise
        return master_key

    def close(self) -> None:
        """Give up this user of the token's login; the last one logs out."""
        if not self._closed:
            self._closed = True
            _release(self._login_key, self._login)

    # ------------------------------------------------------------ the KeyWrapper protocol

    def wrap_epoch_secret(self, epoch: int, secret: bytes) -> bytes:
        """nonce || AES-256-GCM(secret) computed by the token, the epoch as associated data."""
        associated_data = epoch_wrap_associated_data(epoch)
        if not isinstance(secret, bytes) or len(secret) != EPOCH_SECRET_BYTES:
            raise ValueError(f"an epoch secret is exactly {EPOCH_SECRET_BYTES} bytes")
        nonce = os.urandom(GCM_NONCE_BYTES)
        sealed = self._call("wrapping an epoch secret", self._key.encrypt, secret,
                            mechanism=self._pkcs11.Mechanism.AES_GCM,
                            mechanism_param=self._pkcs11.GCMParams(nonce, associated_data, 8 * GCM_TAG_BYTES))
        if len(sealed) != EPOCH_SECRET_BYTES + GCM_TAG_BYTES:
            raise KeyCustodyError(f"the PKCS#11 token ({self._where}) returned a wrapped secret of the wrong size")
        return nonce + bytes(sealed)

    def unwrap_epoch_secret(self, epoch: int, blob: bytes) -> bytes:
        associated_data = epoch_wrap_associated_data(epoch)
        if not isinstance(blob, (bytes, bytearray)) or len(blob) != WRAPPED_SECRET_BYTES:
            raise UnwrapError(f"a wrapped epoch secret is exactly {WRAPPED_SECRET_BYTES} bytes")
        blob = bytes(blob)
        params = self._pkcs11.GCMParams(blob[:GCM_NONCE_BYTES], associated_data, 8 * GCM_TAG_BYTES)
        with self._lock:
            try:
                secret = self._key.decrypt(blob[GCM_NONCE_BYTES:], mechanism=self._pkcs11.Mechanism.AES_GCM,
                                           mechanism_param=params)
            except (self._pkcs11.EncryptedDataInvalid, self._pkcs11.EncryptedDataLenRange,
                    self._pkcs11.GeneralError):
                # The token's way of saying "the tag does not verify" (SoftHSM2 says GeneralError).
                raise UnwrapError(f"the wrapped secret of epoch {epoch} does not authenticate under the "
                                  f"master key in the PKCS#11 token ({self._where})") from None
            except self._pkcs11.PKCS11Error as error:
                raise _custody_error(self._where, "unwrapping an epoch secret", error) from None
        if len(secret) != EPOCH_SECRET_BYTES:
            raise UnwrapError(f"the wrapped secret of epoch {epoch} has the wrong size")
        return bytes(secret)

    def idempotency_fingerprint(self, principal: str, kind: str, canonical_body: bytes) -> bytes:
        """As ``MasterKey.idempotency_fingerprint``, with the key derived on the token."""
        if "\x00" in principal or "\x00" in kind:
            raise ValueError("principal and kind must not contain NUL")
        mac = self._fingerprint_hmac.copy()
        mac.update(principal.encode("utf-8"))
        mac.update(b"\x00")
        mac.update(kind.encode("utf-8"))
        mac.update(b"\x00")
        mac.update(canonical_body)
        return mac.digest()

    # ------------------------------------------------------------ inside

    def _call(self, doing: str, function: Any, *arguments: Any, **options: Any) -> Any:
        with self._lock:
            try:
                return function(*arguments, **options)
            except self._pkcs11.PKCS11Error as error:
                raise _custody_error(self._where, doing, error) from None

    def _derive_fingerprint_key(self) -> bytes:
        """SP 800-108 counter mode, PRF = AES-CMAC on the token: K(i) = CMAC(key, [i]_32 || label || 0x00 ||
        [L]_32), fingerprint key = K(1) || K(2)."""
        blocks = []
        for counter in range(1, FINGERPRINT_KEY_BITS // (8 * _CMAC_BYTES) + 1):
            message = (counter.to_bytes(4, "big") + FINGERPRINT_KEY_LABEL + b"\x00"
                       + FINGERPRINT_KEY_BITS.to_bytes(4, "big"))
            block = self._call("deriving the idempotency key (AES-CMAC)", self._key.sign, message,
                               mechanism=self._pkcs11.Mechanism.AES_CMAC)
            if len(block) != _CMAC_BYTES:
                raise KeyCustodyError(f"the PKCS#11 token ({self._where}) returned an AES-CMAC of the wrong size")
            blocks.append(bytes(block))
        return b"".join(blocks)

    def _self_test(self) -> None:
        """Wrap and unwrap one throw-away secret, so that a token that cannot is found at start, not at the
        first rotation."""
        secret = os.urandom(EPOCH_SECRET_BYTES)
        try:
            unwrapped = self.unwrap_epoch_secret(1, self.wrap_epoch_secret(1, secret))
        except UnwrapError:
            unwrapped = b""
        if not hmac.compare_digest(unwrapped, secret):
            raise KeyCustodyError(f"the PKCS#11 token ({self._where}) does not give back what it wrapped "
                                  f"(AES-GCM round trip failed)")


def _log_in(pkcs11: Any, library: Any, module: str, source: Pkcs11Source, pin: str) -> Any:
    label = source.token_label
    try:
        token = library.get_token(token_label=label)
    except pkcs11.NoSuchToken:
        raise KeyCustodyError(f"no token labelled {label!r} in PKCS#11 module {module}") from None
    except pkcs11.MultipleTokensReturned:
        raise KeyCustodyError(f"more than one token labelled {label!r} in PKCS#11 module {module}") from None
    except pkcs11.PKCS11Error as error:
        raise _custody_error(f"token {label!r}", "looking for the token", error) from None
    try:
        return token.open(user_pin=pin)
    except pkcs11.PinIncorrect:
        raise KeyCustodyError(f"the PIN for PKCS#11 token {label!r} is incorrect") from None
    except pkcs11.PinLocked:
        raise KeyCustodyError(f"the PIN for PKCS#11 token {label!r} is locked (too many wrong tries)") from None
    except (pkcs11.PinInvalid, pkcs11.PinLenRange):
        raise KeyCustodyError(f"the PIN for PKCS#11 token {label!r} is not a valid PIN for it") from None
    except pkcs11.PKCS11Error as error:
        raise _custody_error(f"token {label!r}", "logging in", error) from None


def _find_key(pkcs11: Any, session: Any, source: Pkcs11Source) -> Any:
    where = f"on PKCS#11 token {source.token_label!r}"
    attribute = pkcs11.Attribute
    try:
        # The whole search is read (not session.get_key, which leaves it open): few objects share a label.
        found = list(session.get_objects({attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                                          attribute.KEY_TYPE: pkcs11.KeyType.AES,
                                          attribute.LABEL: source.key_label}))
    except pkcs11.PKCS11Error as error:
        raise _custody_error(f"token {source.token_label!r}", "looking for the key", error) from None
    if not found:
        raise KeyCustodyError(f"no AES key labelled {source.key_label!r} {where}")
    if len(found) > 1:
        raise KeyCustodyError(f"more than one AES key labelled {source.key_label!r} {where}")
    key = found[0]
    try:
        flags = {name: bool(key[getattr(attribute, name)])
                 for name in ("ENCRYPT", "DECRYPT", "SIGN", "SENSITIVE", "EXTRACTABLE")}
        length_bytes = int(key[attribute.VALUE_LEN])
    except pkcs11.PKCS11Error as error:
        raise _custody_error(f"token {source.token_label!r}", "reading the key's attributes", error) from None
    missing = [f"CKA_{name}" for name in ("ENCRYPT", "DECRYPT", "SIGN") if not flags[name]]
    if missing:
        raise KeyCustodyError(f"the key {source.key_label!r} {where} must allow {', '.join(missing)} "
                              f"(AES-GCM wraps, AES-CMAC derives the idempotency key)")
    if not flags["SENSITIVE"] or flags["EXTRACTABLE"]:
        raise KeyCustodyError(f"the key {source.key_label!r} {where} can leave the token (it must be "
                              f"CKA_SENSITIVE and not CKA_EXTRACTABLE); generate it on the token")
    if length_bytes != 32:
        raise KeyCustodyError(f"the key {source.key_label!r} {where} is AES-{8 * length_bytes}; AES-256 is required")
    return key


def _check_mechanisms(pkcs11: Any, session: Any, source: Pkcs11Source) -> None:
    try:
        mechanisms = set(session.token.slot.get_mechanisms())
    except pkcs11.PKCS11Error as error:
        raise _custody_error(f"token {source.token_label!r}", "listing its mechanisms", error) from None
    missing = [name for name in ("AES_GCM", "AES_CMAC") if getattr(pkcs11.Mechanism, name) not in mechanisms]
    if missing:
        raise KeyCustodyError(f"PKCS#11 token {source.token_label!r} does not offer "
                              f"{', '.join('CKM_' + name for name in missing)}, which the master key needs")


def _custody_error(where: str, doing: str, error: BaseException) -> KeyCustodyError:
    # The exception's class names the PKCS#11 return code (PinExpired, DeviceRemoved, ...); its text may
    # be empty, and never carries key material, but only the class is shown to stay on the safe side.
    return KeyCustodyError(f"PKCS#11 error {type(error).__name__} while {doing} ({where})")


def _release(login_key: tuple[str, str], login: _Login) -> None:
    with _logins_lock:
        login.users -= 1
        if login.users > 0:
            return
        if _logins.get(login_key) is login:
            del _logins[login_key]
    with login.lock:
        _close_quietly(login.session)


def _close_quietly(session: Any) -> None:
    try:
        session.close()
    except Exception:  # noqa: BLE001 - closing a session the token already dropped is not an error
        pass
