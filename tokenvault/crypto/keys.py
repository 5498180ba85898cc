"""Keys, tokens and value encryption.

Key hierarchy:

* The master key only wraps epoch secrets and derives the idempotency
  fingerprint key. It is 32 bytes from a mode-0600 file or TOKENVAULT_MASTER_KEY
  (``MasterKey``, here), or an AES key that never leaves a PKCS#11 token
  (``tokenvault.crypto.custody.Pkcs11MasterKey``); both wrap alike and both satisfy
  ``KeyWrapper``, which is all that ``KeyRing`` and the node use.
* Each epoch has a random 32-byte secret. It is wrapped with AES-256-GCM under
  the master key (associated data ``b"tokenvault/epoch/" + str(epoch)``) and the
  wrapped blob travels through the replicated log, so every node holds it.
* HKDF-SHA256 derives, from an epoch secret, the token key (HMAC-SHA256 key for
  token bodies), the 64-byte data key (AES-SIV-256 for values, with the
  token as associated data) and the 32-byte format key (AES-256 for FF1, the
  card and digits tokens of tokenvault.crypto.formats).

Objects holding keys override ``__repr__`` so that keys never reach logs or
tracebacks, and every error raised here carries no key, value or ciphertext.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Iterable, Mapping, MutableMapping, NoReturn, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tokenvault.crypto.formats import FORMAT_KEY_BYTES, FormatKeys
from tokenvault.crypto.tokens import MAX_EPOCH, TOKEN_BODY_BYTES, TOKEN_PREFIX, encode_token_body, parse_token
from tokenvault.smallfiles import fsync_directory, write_whole

MASTER_KEY_BYTES = 32
EPOCH_SECRET_BYTES = 32
GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16
WRAPPED_SECRET_BYTES = GCM_NONCE_BYTES + EPOCH_SECRET_BYTES + GCM_TAG_BYTES
FINGERPRINT_BYTES = 32
TOKEN_KEY_BYTES = 32
DATA_KEY_BYTES = 64
MASTER_KEY_ENVIRONMENT_VARIABLE = "TOKENVAULT_MASTER_KEY"

TOKEN_KEY_INFO = b"tokenvault token key"
DATA_KEY_INFO = b"tokenvault data key"
IDEMPOTENCY_KEY_INFO = b"tokenvault idempotency"
FORMAT_KEY_INFO = b"tokenvault format key"
EPOCH_WRAP_CONTEXT = b"tokenvault/epoch/"
METADATA_CONTEXT = b"tokenvault metadata"

# A key file holds 64 hex characters and perhaps a newline; anything far
# larger is not a key file and is refused before it is read.
_MAX_SECRET_FILE_BYTES = 1024
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# The largest value the vault seals ([limits] max_value_bytes may be at most this), and its ciphertext:
# AES-SIV adds a 16-byte tag. Every bound on a stored ciphertext (the log's, this module's) is this one,
# so a value accepted is a value that decrypts.
MAX_VALUE_BYTES = 1 << 20
SIV_TAG_BYTES = 16
MAX_CIPHERTEXT_BYTES = MAX_VALUE_BYTES + SIV_TAG_BYTES


class CryptoError(Exception):
    """Base of every error raised here; messages never contain key material."""


class SecretFileError(CryptoError):
    """A key file is missing, unreadable, too permissive or malformed."""


class MasterKeyError(CryptoError):
    """The master key could not be loaded."""


class KeyCustodyError(CryptoError):
    """The key source (a PKCS#11 token, its module, PIN or key) cannot be used."""


class UnwrapError(CryptoError):
    """A wrapped epoch secret failed authentication: wrong master key, wrong
    epoch or tampered bytes."""


class DecryptError(CryptoError):
    """A value ciphertext failed authentication for the given token."""


class ValueEncodingError(CryptoError, ValueError):
    """A value is not encodable as UTF-8 (for example a lone surrogate)."""


class UnknownEpochError(CryptoError, KeyError):
    """The key ring holds no secret for the requested epoch."""


class KeyRingConflictError(CryptoError):
    """A different secret was offered for an epoch the ring already holds."""


def _parse_hex_key(text: str, description: str, expected_bytes: int) -> bytes:
    """Decode hex key text, with errors that describe the problem but never
    include the text."""
    stripped = text.strip()
    if len(stripped) != 2 * expected_bytes:
        raise MasterKeyError(
            f"{description} must be {2 * expected_bytes} hex characters, got {len(stripped)}"
        )
    if not all(character in _HEX_DIGITS for character in stripped):
        # bytes.fromhex would skip whitespace inside and hand back a shorter key.
        raise MasterKeyError(f"{description} must be {2 * expected_bytes} hex characters, with nothing between them")
    try:
        return bytes.fromhex(stripped)
    except ValueError:
        raise MasterKeyError(f"{description} is not valid hex") from None


def _read_owner_only_file(path: Path, description: str) -> bytes:
    """The bytes of a regular file that only its owner can read; errors name the file, never its content."""
    try:
        # O_NOFOLLOW and fstat on the opened descriptor check the file that is
        # actually read, not whatever a symlink or a racing rename points at;
        # O_NONBLOCK keeps a FIFO planted at the path from hanging the open.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SecretFileError(f"{description} file {str(path)!r} does not exist") from None
    except OSError as error:
        raise SecretFileError(f"{description} file {str(path)!r} cannot be opened ({error.strerror})") from None
    try:
        return _read_private_file(descriptor, path, description)
    finally:
        os.close(descriptor)


def read_secret_file(path: Path | str, description: str, expected_bytes: int = 32) -> bytes:
    """Read a hex-encoded secret from a regular file that only its owner can
    read (no group or other permission bits: mode 0600 or 0400)."""
    path = Path(path)
    content = _read_owner_only_file(path, description)
    if len(content) > _MAX_SECRET_FILE_BYTES:
        raise SecretFileError(f"{description} file {str(path)!r} is too large to be a key file")
    try:
        text = content.decode("ascii")
        return _parse_hex_key(text, f"{description} file {str(path)!r}", expected_bytes)
    except (UnicodeDecodeError, MasterKeyError):
        raise SecretFileError(
            f"{description} file {str(path)!r} must contain exactly {2 * expected_bytes} "
            f"hex characters"
        ) from None


def read_private_text_file(path: Path | str, description: str, max_bytes: int = 256) -> str:
    """The text of a small file that only its owner can read (a PIN file), without
    its trailing newline; errors name the file, never its content."""
    path = Path(path)
    content = _read_owner_only_file(path, description)
    if len(content) > max_bytes:
        raise SecretFileError(f"{description} file {str(path)!r} is longer than {max_bytes} bytes")
    try:
        text = content.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise SecretFileError(f"{description} file {str(path)!r} is not UTF-8 text") from None
    if not text:
        raise SecretFileError(f"{description} file {str(path)!r} is empty")
    return text


def take_from_environment(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The value of environment variable ``name`` ("" when unset), removed from the
    environment as it is read, so that no child process started later inherits it.
    A read-only mapping (tests) is only read."""
    environment = os.environ if environ is None else environ
    if isinstance(environment, MutableMapping):
        return str(environment.pop(name, ""))
    return environment.get(name, "")


def _read_private_file(descriptor: int, path: Path, description: str) -> bytes:
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        raise SecretFileError(f"{description} file {str(path)!r} is not a regular file")
    permissions = stat.S_IMODE(status.st_mode)
    if permissions & 0o077:
        raise SecretFileError(
            f"{description} file {str(path)!r} has mode {permissions:04o}; it must not be "
            f"readable or writable by group or others (chmod 600)"
        )
    chunks = []
    remaining = _MAX_SECRET_FILE_BYTES + 1
    while remaining > 0:
        chunk = os.read(descriptor, remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def write_secret_file(path: Path | str, secret: bytes) -> None:
    """Write ``secret`` as hex to a new file created with mode 0600.

    Refuses to overwrite an existing file, so a cluster's keys are never
    replaced by accident. A write that fails half-way (a full disk) removes
    the file it created, so no partial key file is left behind that every
    later try would refuse to replace. Written in place, not under a
    temporary name linked into place: a process killed meanwhile would leave
    a hidden whole copy of the secret that nothing removes, where a partial
    file under the key's own name is seen (the key's reader refuses it as
    malformed, naming it), and hard links are not on every file system."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(path, flags, 0o600)
    try:
        try:
            os.fchmod(descriptor, 0o600)
            write_whole(descriptor, (secret.hex() + "\n").encode("ascii"))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except BaseException:
        path.unlink(missing_ok=True)  # this call created it (O_EXCL): only ever our own partial file
        raise
    fsync_directory(path.parent)


def _hkdf(secret: bytes, info: bytes, length_bytes: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length_bytes, salt=None, info=info).derive(secret)


def _wrap_associated_data(epoch: int) -> bytes:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= MAX_EPOCH:
        raise ValueError("epoch must be an int between 1 and 2**63-1")
    return EPOCH_WRAP_CONTEXT + str(epoch).encode("ascii")


def new_epoch_secret() -> bytes:
    """A fresh random epoch secret, drawn once when an epoch is created."""
    return os.urandom(EPOCH_SECRET_BYTES)


class KeyWrapper(Protocol):
    """What the node needs of a master key, wherever the key lives."""

    def wrap_epoch_secret(self, epoch: int, secret: bytes) -> bytes: ...

    def unwrap_epoch_secret(self, epoch: int, blob: bytes) -> bytes: ...

    def idempotency_fingerprint(self, principal: str, kind: str, canonical_body: bytes) -> bytes: ...


def epoch_wrap_associated_data(epoch: int) -> bytes:
    """The AES-GCM associated data that binds a wrapped secret to its epoch (shared with custody.py)."""
    return _wrap_associated_data(epoch)


class MasterKey:
    """The key-encryption key held in memory (from a key file or the environment).
    It never leaves this object except through ``to_hex`` (for writing the
    cluster's key file at set-up)."""

    __slots__ = ("_key", "_wrapper", "_fingerprint_hmac")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != MASTER_KEY_BYTES:
            raise MasterKeyError(f"a master key is exactly {MASTER_KEY_BYTES} bytes")
        self._key = key
        self._wrapper = AESGCM(key)
        fingerprint_key = _hkdf(key, IDEMPOTENCY_KEY_INFO, 32)
        self._fingerprint_hmac = hmac.new(fingerprint_key, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return "MasterKey(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a MasterKey cannot be pickled")

    @classmethod
    def generate(cls) -> "MasterKey":
        return cls(os.urandom(MASTER_KEY_BYTES))

    @classmethod
    def from_hex(cls, text: str) -> "MasterKey":
        return cls(_parse_hex_key(text, "the master key", MASTER_KEY_BYTES))

    @classmethod
    def from_file(cls, path: Path | str) -> "MasterKey":
        return cls(read_secret_file(path, "master key", MASTER_KEY_BYTES))

    @classmethod
    def load(
        cls, path: Path | str | None, environ: Mapping[str, str] | None = None
    ) -> "MasterKey":
        """The environment variable wins when set (and non-empty); otherwise the
        key file is read. The variable is removed from the environment as it is
        read (``take_from_environment``), before any child process can start."""
        from_environment = take_from_environment(MASTER_KEY_ENVIRONMENT_VARIABLE, environ)
        if from_environment:
            return cls(
                _parse_hex_key(
                    from_environment, MASTER_KEY_ENVIRONMENT_VARIABLE, MASTER_KEY_BYTES
                )
            )
        if path is None:
            raise MasterKeyError(
                f"no master key: set master_key_file in the config or "
                f"{MASTER_KEY_ENVIRONMENT_VARIABLE}"
            )
        return cls.from_file(path)

    def to_hex(self) -> str:
        return self._key.hex()

    def write_file(self, path: Path | str) -> None:
        """Create the key file (mode 0600); refuses to overwrite one."""
        write_secret_file(path, self._key)

    def wrap_epoch_secret(self, epoch: int, secret: bytes) -> bytes:
        """nonce (12 bytes) || AES-256-GCM(secret) with the epoch bound in as
        associated data, so a blob cannot be replayed as another epoch's."""
        if not isinstance(secret, bytes) or len(secret) != EPOCH_SECRET_BYTES:
            raise ValueError(f"an epoch secret is exactly {EPOCH_SECRET_BYTES} bytes")
        nonce = os.urandom(GCM_NONCE_BYTES)
        return nonce + self._wrapper.encrypt(nonce, secret, _wrap_associated_data(epoch))

    def unwrap_epoch_secret(self, epoch: int, blob: bytes) -> bytes:
        associated_data = _wrap_associated_data(epoch)
        if not isinstance(blob, (bytes, bytearray)) or len(blob) != WRAPPED_SECRET_BYTES:
            raise UnwrapError(f"a wrapped epoch secret is exactly {WRAPPED_SECRET_BYTES} bytes")
        blob = bytes(blob)
        try:
            return self._wrapper.decrypt(
                blob[:GCM_NONCE_BYTES], blob[GCM_NONCE_BYTES:], associated_data
            )
        except InvalidTag:
            raise UnwrapError(
                f"the wrapped secret of epoch {epoch} does not authenticate under this "
                f"master key"
            ) from None

    def idempotency_fingerprint(self, principal: str, kind: str, canonical_body: bytes) -> bytes:
        """HMAC(fingerprint key, principal 0x00 kind 0x00 body): equal exactly when
        the same principal sends the same kind of request with the same body.

        A NUL inside principal or kind would make two different triples
        encode alike, so it is refused."""
        if "\x00" in principal or "\x00" in kind:
            raise ValueError("principal and kind must not contain NUL")
        mac = self._fingerprint_hmac.copy()
        mac.update(principal.encode("utf-8"))
        mac.update(b"\x00")
        mac.update(kind.encode("utf-8"))
        mac.update(b"\x00")
        mac.update(canonical_body)
        return mac.digest()


class EpochKeys:
    """The token key and data key of one epoch, with the token key's keyed HMAC
    context and the AES-SIV object built once and reused, since they are used
    for every value."""

    __slots__ = ("epoch", "_token_key", "_data_key", "_token_hmac", "_cipher", "_prefix", "_formats",
                 "_format_key")
    _formats: FormatKeys | None
    _format_key: bytes | None

    def __init__(self, epoch: int, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != EPOCH_SECRET_BYTES:
            raise ValueError(f"an epoch secret is exactly {EPOCH_SECRET_BYTES} bytes")
        self._set_keys(epoch, _hkdf(secret, TOKEN_KEY_INFO, TOKEN_KEY_BYTES),
                       _hkdf(secret, DATA_KEY_INFO, DATA_KEY_BYTES))
        self._format_key = _hkdf(secret, FORMAT_KEY_INFO, FORMAT_KEY_BYTES)
        self._formats = FormatKeys(self._format_key)

    @classmethod
    def from_derived_keys(cls, epoch: int, token_key: bytes, data_key: bytes,
                          format_key: bytes | None = None) -> "EpochKeys":
        """The keys ``derived_keys`` (and ``derived_format_key``) returned: how the sealer process and
        the HTTP workers get an epoch without the master key or the epoch secret. Without
        ``format_key`` (the sealer's case) the keys seal opaque tokens only."""
        if not (isinstance(token_key, bytes) and len(token_key) == TOKEN_KEY_BYTES
                and isinstance(data_key, bytes) and len(data_key) == DATA_KEY_BYTES):
            raise ValueError(f"derived keys are {TOKEN_KEY_BYTES} and {DATA_KEY_BYTES} bytes")
        keys = cls.__new__(cls)
        keys._set_keys(epoch, token_key, data_key)
        keys._format_key = format_key
        keys._formats = None if format_key is None else FormatKeys(format_key)  # FormatKeys checks its size
        return keys

    def derived_keys(self) -> tuple[bytes, bytes]:
        """(token key, data key): everything sealing opaque tokens in this epoch needs, and nothing for
        other epochs."""
        return self._token_key, self._data_key

    def derived_format_key(self) -> bytes | None:
        """The epoch's FF1 key (card and digits tokens), None when these keys carry none: what an HTTP
        worker needs beside ``derived_keys`` to seal format tokens, and nothing for other epochs."""
        return self._format_key

    @property
    def seals_formats(self) -> bool:
        """Whether these keys compute card and digits tokens (``formats`` would not raise)."""
        return self._formats is not None

    def _set_keys(self, epoch: int, token_key: bytes, data_key: bytes) -> None:
        _wrap_associated_data(epoch)  # validates the epoch
        self.epoch = epoch
        self._token_key = token_key
        self._data_key = data_key
        # The library's keyed HMAC-SHA256 context, copied per value: the key is
        # absorbed once. A copy costs 0.6 us per value against 1.6 us for a new
        # context and 0.7 us for the hand-assembled SHA-256 states used before
        # (bench/crypto_throughput.py prints the three side by side).
        self._token_hmac = crypto_hmac.HMAC(token_key, hashes.SHA256())
        self._cipher = AESSIV(data_key)
        self._prefix = f"{TOKEN_PREFIX}{epoch}_"

    def __repr__(self) -> str:
        return f"EpochKeys(epoch={self.epoch}, keys=<redacted>)"

    @property
    def formats(self) -> FormatKeys:
        """The epoch's card and digits tokenizer (FF1 under the format key)."""
        if self._formats is None:
            raise CryptoError("these epoch keys carry no format key")
        return self._formats

    def seal_format(self, format_name: str, normalized: str) -> tuple[str, bytes]:
        """The (token, ciphertext) of a normalized card or digits value: an FF1 token, and the
        value under AES-SIV bound to that token (the same ciphertext rule as opaque tokens)."""
        token = self.formats.token_for(format_name, normalized)
        return token, self.encrypt(token, normalized)

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("EpochKeys cannot be pickled")

    def token_for(self, value: str) -> str:
        """``tv<epoch>_`` + base32 of HMAC-SHA256(token key, value) cut to 20 bytes."""
        return self._token(_encode_value(value))

    def _token(self, encoded: bytes) -> str:
        context = self._token_hmac.copy()
        context.update(encoded)
        return self._prefix + encode_token_body(context.finalize()[:TOKEN_BODY_BYTES])

    def encrypt(self, token: str, value: str) -> bytes:
        """Deterministic AES-SIV of the value, bound to its token."""
        return self._cipher.encrypt(_encode_value(value), [token.encode("ascii")])

    def decrypt(self, token: str, ciphertext: bytes) -> str:
        if not isinstance(ciphertext, (bytes, bytearray)) or len(ciphertext) > MAX_CIPHERTEXT_BYTES:
            raise DecryptError("ciphertext has an invalid type or size")
        try:
            associated_data = token.encode("ascii")
            plaintext = self._cipher.decrypt(bytes(ciphertext), [associated_data])
            return plaintext.decode("utf-8")
        except (InvalidTag, ValueError, UnicodeError):
            raise DecryptError("ciphertext does not authenticate for this token") from None

    def encrypt_metadata(self, token: str, document: bytes) -> bytes:
        """A mapping's metadata (canonical JSON bytes) under the data key, bound to its token."""
        return self._cipher.encrypt(document, [METADATA_CONTEXT, token.encode("ascii")])

    def decrypt_metadata(self, token: str, ciphertext: bytes) -> bytes:
        if not isinstance(ciphertext, (bytes, bytearray)) or len(ciphertext) > MAX_CIPHERTEXT_BYTES:
            raise DecryptError("metadata ciphertext has an invalid type or size")
        try:
            return self._cipher.decrypt(bytes(ciphertext), [METADATA_CONTEXT, token.encode("ascii")])
        except (InvalidTag, ValueError):
            raise DecryptError("metadata does not authenticate for this token") from None

    def seal(self, value: str) -> tuple[str, bytes]:
        """The (token, ciphertext) pair stored for ``value``."""
        encoded = _encode_value(value)
        token = self._token(encoded)
        return token, self._cipher.encrypt(encoded, [token.encode("ascii")])

    def seal_many(self, values: Iterable[str]) -> list[tuple[str, bytes]]:
        """``seal`` for a batch, in order."""
        return [self.seal(value) for value in values]


def _encode_value(value: str) -> bytes:
    if not isinstance(value, str):
        raise ValueEncodingError("a value must be a string")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueEncodingError("a value must be valid Unicode (no lone surrogates)") from None


class KeyRing:
    """Epoch -> EpochKeys, built by unwrapping the wrapped secrets read from the
    log or the store. Derived keys are computed once per epoch and kept."""

    __slots__ = ("_master_key", "_keys", "_secret_digests")

    def __init__(self, master_key: KeyWrapper) -> None:
        self._master_key = master_key
        self._keys: dict[int, EpochKeys] = {}
        # A digest of each secret lets ``add`` tell a re-delivered epoch (same
        # secret, fresh nonce) from a conflicting one without keeping secrets.
        self._secret_digests: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return f"KeyRing(epochs={sorted(self._keys)})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a KeyRing cannot be pickled")

    @classmethod
    def from_wrapped(
        cls, master_key: KeyWrapper, wrapped_secrets: Iterable[tuple[int, bytes]]
    ) -> "KeyRing":
        ring = cls(master_key)
        for epoch, wrapped in wrapped_secrets:
            ring.add(epoch, wrapped)
        return ring

    def add(self, epoch: int, wrapped: bytes) -> EpochKeys:
        """Unwrap and add an epoch; adding the same secret again is a no-op.
        Raises UnwrapError or KeyRingConflictError."""
        secret = self._master_key.unwrap_epoch_secret(epoch, wrapped)
        digest = hashlib.sha256(b"tokenvault keyring\x00" + secret).digest()
        existing = self._secret_digests.get(epoch)
        if existing is not None:
            if not hmac.compare_digest(existing, digest):
                raise KeyRingConflictError(f"epoch {epoch} already holds a different secret")
            return self._keys[epoch]
        keys = EpochKeys(epoch, secret)
        self._keys[epoch] = keys
        self._secret_digests[epoch] = digest
        return keys

    def forget(self, epoch: int) -> None:
        """Drop an epoch's keys (a destroyed epoch): nothing here can decrypt its values any more.
        Python cannot wipe the memory the keys held; it is freed with the objects."""
        self._keys.pop(epoch, None)
        self._secret_digests.pop(epoch, None)

    def get(self, epoch: int) -> EpochKeys:
        keys = self._keys.get(epoch)
        if keys is None:
            raise UnknownEpochError(f"no key for epoch {epoch}")
        return keys

    def __contains__(self, epoch: object) -> bool:
        return epoch in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def epochs(self) -> list[int]:
        return sorted(self._keys)

    def decrypt(self, token: str, ciphertext: bytes) -> str:
        """Decrypt with the keys of the epoch the token names. Raises
        TokenFormatError, UnknownEpochError or DecryptError."""
        return self.get(parse_token(token).epoch).decrypt(token, ciphertext)

