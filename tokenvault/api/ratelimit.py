"""Rate limits per API key: one token bucket per (key name, endpoint kind).

Each request an API key sends to an endpoint of a kind (``tokenize``,
``detokenize`` or ``admin``) takes one token from that key's bucket of that
kind; a bucket holds at most ``burst`` tokens and refills at
``rate_per_second``. Every key has the same default limits, and single keys
may have their own (by key name). Requests are counted, not items: the limit is checked
right after authentication, before the body is read, so a key past its limit
costs the node no body buffering and no parsing, and the item limit per
request (``max_items``) bounds the items a key can send to ``rate x max_items``
per second.

The limiter is local to one node: every node enforces the configured rate on
the requests it receives from clients, so across an N-node cluster a key gets
at most N times the rate. A request a backup forwards to the primary was
counted by the backup and is not counted again by the primary.

Memory is bounded: at most ``max_buckets`` buckets are kept, the least
recently used one is dropped first. A dropped bucket comes back full, which is
what an idle bucket would have refilled to anyway; with fewer than
``max_buckets / 3`` keys (the key table is bounded) nothing is ever dropped.
The clock is injected, so tests drive time by hand.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

TOKENIZE = "tokenize"
DETOKENIZE = "detokenize"
ADMIN = "admin"
KINDS = (TOKENIZE, DETOKENIZE, ADMIN)
DEFAULT_MAX_BUCKETS = 10_000


@dataclass(frozen=True, slots=True)
class BucketLimit:
    """``rate_per_second`` tokens per second up to ``burst``; a rate of 0 means unlimited."""

    rate_per_second: float = 0.0
    burst: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_per_second) and self.rate_per_second >= 0):
            raise ValueError("rate_per_second must be a finite number of at least 0")
        if not (math.isfinite(self.burst) and self.burst >= 0):
            raise ValueError("burst must be a finite number of at least 0")
        if self.rate_per_second > 0 and self.burst < 1:
            raise ValueError("burst must be at least 1 when a rate is set")

    @property
    def unlimited(self) -> bool:
        return self.rate_per_second == 0


UNLIMITED = BucketLimit()


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``rate_per_second``; starts full."""

    __slots__ = ("rate_per_second", "capacity", "tokens", "updated_at")

    def __init__(self, rate_per_second: float, capacity: float, now: float) -> None:
        if rate_per_second <= 0 or capacity < 1:
            raise ValueError("a bucket needs a positive rate and a capacity of at least 1")
        self.rate_per_second = rate_per_second
        self.capacity = capacity
        self.tokens = capacity
        self.updated_at = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens: 0.0 when taken, else the seconds until they would be there (nothing taken)."""
        # A clock that steps back (it should not: the default is monotonic) must not drain the bucket.
        elapsed = max(0.0, now - self.updated_at)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate_per_second)
        self.updated_at = max(self.updated_at, now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate_per_second


def _check_kinds(limits: Mapping[str, BucketLimit]) -> None:
    unknown = set(limits) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown rate limit kinds {sorted(unknown)}; known: {list(KINDS)}")


class _Same:
    """The default of ``RateLimiter.check``'s ``limits_of``: the bucket's own key."""


_SAME = _Same()


class RateLimiter:
    """The buckets of every (key name, kind) on this node, with the limits of each kind.

    ``limits`` holds every key's default per kind (absent: unlimited);
    ``key_limits`` holds single keys' own limits by key name, per kind (absent:
    the default).
    """

    def __init__(self, limits: Mapping[str, BucketLimit], *,
                 key_limits: Mapping[str, Mapping[str, BucketLimit]] | None = None,
                 clock: Callable[[], float] = time.monotonic, max_buckets: int = DEFAULT_MAX_BUCKETS) -> None:
        _check_kinds(limits)
        for own in (key_limits or {}).values():
            _check_kinds(own)
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self._limits = {kind: limits.get(kind, UNLIMITED) for kind in KINDS}
        self._key_limits = {name: dict(own) for name, own in (key_limits or {}).items()}
        self._clock = clock
        self._max_buckets = max_buckets
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        limits = [*self._limits.values(), *(limit for own in self._key_limits.values() for limit in own.values())]
        return any(not limit.unlimited for limit in limits)

    def limit_of(self, key_name: str | None, kind: str) -> BucketLimit:
        """A named key's own limit for ``kind`` if the config gives one, else every key's default."""
        own = self._key_limits.get(key_name) if key_name is not None else None
        if own is not None and kind in own:
            return own[kind]
        return self._limits[kind]

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str, kind: str, *, limits_of: str | None | _Same = _SAME) -> float:
        """Take one request from the bucket of (key, kind): 0.0 when allowed, else seconds to wait.

        ``key`` names the bucket (one per API key); ``limits_of`` names the
        key whose own configured limits apply (by default ``key`` itself; None:
        only the defaults, as for runtime keys, whose names an admin chooses
        and which must not inherit a configured key's limits by naming)."""
        limit = self.limit_of(key if isinstance(limits_of, _Same) else limits_of, kind)
        if limit.unlimited:
            return 0.0
        now = self._clock()
        slot = (key, kind)
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = TokenBucket(limit.rate_per_second, limit.burst, now)
            self._buckets[slot] = bucket
            if len(self._buckets) > self._max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(slot)
        return bucket.take(now)


def retry_after_seconds(wait_seconds: float) -> int:
    """Retry-After in whole seconds, at least 1 (rounded up, so a retry then finds a token)."""
    return max(1, math.ceil(wait_seconds))
