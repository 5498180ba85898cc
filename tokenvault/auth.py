"""API keys: generation, hashing and constant-time verification, and scopes.

A node config stores only the SHA-256 of each API key with its name and scopes.
The name is the principal: it scopes idempotency keys and appears in logs; the
key itself never leaves the client and this module's stack frames.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from typing import Iterable

ADMIN = "admin"
TOKENIZE = "tokenize"
DETOKENIZE = "detokenize"
ALL_SCOPES: frozenset[str] = frozenset({ADMIN, TOKENIZE, DETOKENIZE})

API_KEY_PREFIX = "tvk_"
API_KEY_RANDOM_BYTES = 32
# 32 bytes are 43 urlsafe base64 characters without padding.
API_KEY_CHARS = len(API_KEY_PREFIX) + 43
# Keys we issue are 47 characters. Longer presented keys are refused before
# hashing so a hostile header cannot make every request hash megabytes.
MAX_PRESENTED_KEY_CHARS = 256
PRINCIPAL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_SHA256_HEX_PATTERN = re.compile(r"[0-9a-f]{64}\Z")


class ApiKeyTableError(ValueError):
    """The configured API key entries are invalid (never includes a hash)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a request: the API key's configured name and its scopes."""

    name: str
    scopes: frozenset[str]

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


@dataclass(frozen=True, slots=True)
class ApiKeyEntry:
    """One configured API key: its name, the SHA-256 hex of the key, its scopes."""

    name: str
    sha256: str
    scopes: frozenset[str]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not PRINCIPAL_NAME_PATTERN.match(self.name):
            raise ApiKeyTableError(
                "an API key name is 1-64 characters of [A-Za-z0-9_.-] starting with a letter "
                "or digit"
            )
        if not isinstance(self.sha256, str) or not _SHA256_HEX_PATTERN.match(self.sha256):
            raise ApiKeyTableError(
                f"API key {self.name!r}: sha256 must be 64 lowercase hex characters"
            )
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
    """The SHA-256 hex stored in node configs. API keys are 256-bit random, so
    a plain hash suffices: there is nothing to brute-force that a slow hash
    would protect."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


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


class ApiKeyTable:
    """The configured API keys, checked in constant time."""

    __slots__ = ("_digests", "_principals")

    def __init__(self, entries: Iterable[ApiKeyEntry]) -> None:
        digests: list[bytes] = []
        principals: list[Principal] = []
        names: set[str] = set()
        for entry in entries:
            if entry.name in names:
                raise ApiKeyTableError(f"API key name {entry.name!r} appears twice")
            digest = bytes.fromhex(entry.sha256)
            if digest in digests:
                raise ApiKeyTableError(f"API key {entry.name!r} has the same hash as another key")
            names.add(entry.name)
            digests.append(digest)
            principals.append(Principal(name=entry.name, scopes=entry.scopes))
        self._digests = tuple(digests)
        self._principals = tuple(principals)

    def __repr__(self) -> str:
        return f"ApiKeyTable(names={[principal.name for principal in self._principals]})"

    def __len__(self) -> int:
        return len(self._principals)

    def authenticate(self, presented: str | None) -> Principal | None:
        """The principal whose key hashes to the presented key's hash, or None.

        Every stored hash is compared with hmac.compare_digest and the loop
        never exits early, so the time taken does not reveal which entry, if
        any, matched or how far a guess got."""
        if not isinstance(presented, str) or not presented:
            return None
        if len(presented) > MAX_PRESENTED_KEY_CHARS:
            return None
        try:
            encoded = presented.encode("utf-8")
        except UnicodeEncodeError:
            return None
        digest = hashlib.sha256(encoded).digest()
        matched: Principal | None = None
        for stored, principal in zip(self._digests, self._principals):
            if hmac.compare_digest(stored, digest):
                matched = principal
        return matched
