"""API keys: generation, hashing and constant-time verification, and scopes.

Two kinds of keys authenticate requests:

- bootstrap keys, from the node config, which stores each key's name, scopes
  and HMAC-SHA256 under a random per-key salt (configs written before version
  2 hold a plain SHA-256 instead, still accepted);
- runtime keys, created and revoked through the admin API as replicated log
  entries (``tvk1_<key id>_<secret>``). The store keeps the public key id, a
  random per-key salt and HMAC-SHA256(salt, key); the id finds the entry with
  one lookup and the digest is compared in constant time.

Runtime keys carry 256 random bits, so a salted fast hash is the right tool:
a slow KDF protects guessable passwords, and nothing here is guessable. The
salt makes equal keys hash differently and keeps precomputed tables useless.
The principal's identity scopes idempotency keys and names the caller in the
audit trail; the key itself never leaves the client and this module's stack
frames.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable

ADMIN = "admin"
TOKENIZE = "tokenize"
DETOKENIZE = "detokenize"
# Version 2: detokenize answers masked values only (tokenvault.crypto.formats.mask_value).
DETOKENIZE_MASKED = "detokenize_masked"
# The token lifecycle (docs/api.md): removing mappings, and re-issuing tokens in the active epoch.
DELETE = "delete"
RETOKENIZE = "retokenize"
ALL_SCOPES: frozenset[str] = frozenset({ADMIN, TOKENIZE, DETOKENIZE, DETOKENIZE_MASKED, DELETE, RETOKENIZE})

RUNTIME_KEY_PREFIX = "tvk1_"
RUNTIME_KEY_ID_BYTES = 8
# 8 bytes are 16 lowercase hex characters: the public id of a runtime key.
RUNTIME_KEY_ID_PATTERN = re.compile(r"[0-9a-f]{16}\Z")
RUNTIME_KEY_SALT_BYTES = 16
RUNTIME_KEY_DIGEST_BYTES = 32

API_KEY_PREFIX = "tvk_"
API_KEY_RANDOM_BYTES = 32
# 32 bytes are 43 urlsafe base64 characters without padding.
API_KEY_CHARS = len(API_KEY_PREFIX) + 43
# Keys we issue are 47 characters. Longer presented keys are refused before
# hashing so a hostile header cannot make every request hash megabytes.
MAX_PRESENTED_KEY_CHARS = 256
PRINCIPAL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# A runtime key's identity (Principal.identity); no bootstrap key may be named so.
RUNTIME_IDENTITY_PATTERN = re.compile(r"key-[0-9a-f]{16}\Z")
_SHA256_HEX_PATTERN = re.compile(r"[0-9a-f]{64}\Z")
_SALT_HEX_PATTERN = re.compile(r"[0-9a-f]{32}\Z")


def looks_like_a_key(name: str) -> bool:
    """Whether a name given to an API key starts as the vault's keys do (``tvk_``, ``tvk1_``): an API key
    pasted where its name goes. A name is logged, counted in metrics, written in the audit trail and
    echoed in errors, so such a name is refused, and never echoed."""
    return name.startswith((API_KEY_PREFIX, RUNTIME_KEY_PREFIX))


KEY_AS_NAME = ("an API key name may not start with 'tvk_' or 'tvk1_' as API keys do (the key itself pasted "
               "where its name goes?); the name is logged and audited: choose another")


class ApiKeyTableError(ValueError):
    """The configured API key entries are invalid (never includes a hash)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a request: the API key's name, its scopes and, for a runtime key, its id."""

    name: str
    scopes: frozenset[str]
    key_id: str | None = None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def identity(self) -> str:
        """What scopes idempotency keys: the bootstrap key's name, or ``key-<id>`` for a runtime key.

        Runtime key names are labels chosen by an admin and may repeat or equal
        a bootstrap name; the id is unique, and no bootstrap key may be named ``key-<16 hex digits>``
        (ApiKeyEntry), so the two kinds never share an identity: idempotency keys, rate buckets,
        body slots."""
        return self.name if self.key_id is None else f"key-{self.key_id}"


def runtime_key_id_of_identity(identity: object) -> str | None:
    """The runtime key id in a principal's identity ``key-<id>`` (Principal.identity), or None: a
    bootstrap key's name, which never has that form (ApiKeyEntry), or anything else."""
    if isinstance(identity, str) and RUNTIME_IDENTITY_PATTERN.match(identity):
        return identity[len("key-"):]
    return None


@dataclass(frozen=True, slots=True)
class RuntimeKey:
    """One replicated API key as the store holds it: never the key, only its salted digest."""

    key_id: str
    name: str
    scopes: frozenset[str]
    salt: bytes
    digest: bytes
    created_at_ms: int
    created_by: str


def new_runtime_key() -> tuple[str, str, bytes, bytes]:
    """(key id, key, salt, digest) of a new runtime key; only the id, salt and digest are stored."""
    key_id = os.urandom(RUNTIME_KEY_ID_BYTES).hex()
    secret = base64.urlsafe_b64encode(os.urandom(API_KEY_RANDOM_BYTES)).rstrip(b"=").decode("ascii")
    key = f"{RUNTIME_KEY_PREFIX}{key_id}_{secret}"
    salt = os.urandom(RUNTIME_KEY_SALT_BYTES)
    return key_id, key, salt, runtime_key_digest(salt, key)


def runtime_key_digest(salt: bytes, key: str) -> bytes:
    """HMAC-SHA256 keyed by the per-key salt over the whole key."""
    return hmac.new(salt, key.encode("utf-8"), hashlib.sha256).digest()


def runtime_key_id(presented: str) -> str | None:
    """The public id of a presented runtime key, or None if it does not have the runtime format."""
    if not presented.startswith(RUNTIME_KEY_PREFIX):
        return None
    start = len(RUNTIME_KEY_PREFIX)
    key_id = presented[start:start + 2 * RUNTIME_KEY_ID_BYTES]
    if presented[start + len(key_id):start + len(key_id) + 1] != "_" or not RUNTIME_KEY_ID_PATTERN.match(key_id):
        return None
    return key_id


@dataclass(frozen=True, slots=True)
class ApiKeyEntry:
    """One configured (bootstrap) API key: its name, digest and scopes.

    With ``salt`` (32 hex characters: 16 random bytes) ``sha256`` is the hex
    HMAC-SHA256(salt, key), as configs generated since version 2 hold it;
    without, it is the plain SHA-256 of the key (version 1 configs, still
    accepted)."""

    name: str
    sha256: str
    scopes: frozenset[str]
    salt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not PRINCIPAL_NAME_PATTERN.match(self.name):
            raise ApiKeyTableError(
                "an API key name is 1-64 characters of [A-Za-z0-9_.-] starting with a letter "
                "or digit"
            )
        if looks_like_a_key(self.name):
            raise ApiKeyTableError(KEY_AS_NAME)
        if RUNTIME_IDENTITY_PATTERN.match(self.name):
            raise ApiKeyTableError(
                f"API key name {self.name!r} has the form key-<16 hex digits>, which is how the vault names "
                "a runtime key (admin key create); choose another name"
            )
        if not isinstance(self.sha256, str) or not _SHA256_HEX_PATTERN.match(self.sha256):
            raise ApiKeyTableError(
                f"API key {self.name!r}: sha256 must be 64 lowercase hex characters"
            )
        if self.salt is not None and (not isinstance(self.salt, str) or not _SALT_HEX_PATTERN.match(self.salt)):
            raise ApiKeyTableError(f"API key {self.name!r}: salt must be 32 lowercase hex characters")
        if not isinstance(self.scopes, frozenset) or not self.scopes:
            raise ApiKeyTableError(f"API key {self.name!r}: scopes must be a non-empty set")
        unknown = self.scopes - ALL_SCOPES
        if unknown:
            raise ApiKeyTableError(
                f"API key {self.name!r}: unknown scopes {sorted(unknown)}; known scopes are "
                f"{sorted(ALL_SCOPES)}"
            )


def generate_api_key() -> str:
    """A new random API key: ``tvk_`` + 43 urlsafe base64 characters (256 bits)."""
    encoded = base64.urlsafe_b64encode(os.urandom(API_KEY_RANDOM_BYTES)).rstrip(b"=")
    return API_KEY_PREFIX + encoded.decode("ascii")


def hash_api_key(key: str) -> str:
    """The plain SHA-256 hex that version 1 node configs store (still accepted; new configs hold
    salted_api_key_hash instead). API keys are 256-bit random, so
    a plain hash suffices: there is nothing to brute-force that a slow hash
    would protect."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def salted_api_key_hash(key: str) -> tuple[str, str]:
    """(salt hex, HMAC-SHA256(salt, key) hex) for a bootstrap key in a node config: a fresh
    random salt per key and node config, so equal keys never show as equal digests."""
    salt = os.urandom(RUNTIME_KEY_SALT_BYTES)
    return salt.hex(), runtime_key_digest(salt, key).hex()


def bearer_credentials(authorization: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer <key>`` header, or None when
    the header is absent or of another scheme."""
    if authorization is None:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    credentials = credentials.strip()
    return credentials or None


RuntimeKeyLookup = Callable[[str], "RuntimeKey | None"]


class ApiKeyTable:
    """The configured (bootstrap) API keys, checked in constant time, plus the replicated runtime keys."""

    __slots__ = ("_digests", "_salts", "_principals", "_runtime_lookup", "_matched")

    def __init__(self, entries: Iterable[ApiKeyEntry], runtime_lookup: RuntimeKeyLookup | None = None) -> None:
        self._runtime_lookup = runtime_lookup
        digests: list[bytes] = []
        salts: list[bytes | None] = []
        principals: list[Principal] = []
        names: set[str] = set()
        for entry in entries:
            if entry.name in names:
                raise ApiKeyTableError(f"API key name {entry.name!r} appears twice")
            digest = bytes.fromhex(entry.sha256)
            if entry.salt is None and digest in digests:
                raise ApiKeyTableError(f"API key {entry.name!r} has the same hash as another key")
            names.add(entry.name)
            digests.append(digest)
            salts.append(None if entry.salt is None else bytes.fromhex(entry.salt))
            principals.append(Principal(name=entry.name, scopes=entry.scopes))
        self._digests = tuple(digests)
        self._salts = tuple(salts)
        self._principals = tuple(principals)
        # SHA-256 of a presented key that matched -> its principal. Only matches are kept, and a salted
        # digest matches one key, so this holds at most one item per bootstrap key (the table is fixed).
        self._matched: dict[bytes, Principal] = {}

    def __repr__(self) -> str:
        return f"ApiKeyTable(names={[principal.name for principal in self._principals]})"

    def __len__(self) -> int:
        return len(self._principals)

    def authenticate(self, presented: str | None) -> Principal | None:
        """The principal whose key hashes to the presented key's hash, or None.

        Every stored hash is compared with hmac.compare_digest and the loop
        never exits early, so the time taken does not reveal which entry, if
        any, matched or how far a guess got. A key that matched once is found
        again by its SHA-256 without the loop (one HMAC per bootstrap key
        cost a worker about 5 % of a request): that is faster only for a
        key the caller holds already, so it tells a guesser nothing."""
        if not isinstance(presented, str) or not presented:
            return None
        if len(presented) > MAX_PRESENTED_KEY_CHARS:
            return None
        try:
            encoded = presented.encode("utf-8")
        except UnicodeEncodeError:
            return None
        key_id = runtime_key_id(presented)
        if key_id is not None:
            return self._authenticate_runtime(key_id, presented)
        plain = hashlib.sha256(encoded).digest()
        matched = self._matched.get(plain)
        if matched is not None:
            return matched
        for stored, salt, principal in zip(self._digests, self._salts, self._principals):
            digest = plain if salt is None else hmac.new(salt, encoded, hashlib.sha256).digest()
            if hmac.compare_digest(stored, digest):
                matched = principal
        if matched is not None:
            self._matched[plain] = matched
        return matched

    def _authenticate_runtime(self, key_id: str, presented: str) -> Principal | None:
        """The runtime key's principal if the id is in the replicated table and the digest matches.

        The id is public (it is part of the key and of audit records), so finding
        the entry by it reveals nothing; only the digest comparison is secret and
        it runs in constant time. A revoked key is no longer in the table."""
        if self._runtime_lookup is None:
            return None
        entry = self._runtime_lookup(key_id)
        if entry is None:
            return None
        if not hmac.compare_digest(runtime_key_digest(entry.salt, presented), entry.digest):
            return None
        return Principal(name=entry.name, scopes=entry.scopes, key_id=entry.key_id)
