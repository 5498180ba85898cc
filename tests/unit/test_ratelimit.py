"""tokenvault.api.ratelimit: token buckets per (API key name, endpoint kind), driven by a hand-moved clock."""

from __future__ import annotations

import pytest

from tokenvault.api.ratelimit import (
    ADMIN,
    DETOKENIZE,
    TOKENIZE,
    BucketLimit,
    RateLimiter,
    TokenBucket,
    retry_after_seconds,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_starts_full_and_refuses_past_its_burst() -> None:
    bucket = TokenBucket(rate_per_second=2, capacity=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    # Empty: one token comes back after 1/rate seconds, and a refusal takes nothing.
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.0) == pytest.approx(0.5)


def test_a_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket(rate_per_second=2, capacity=3, now=0.0)
    for _ in range(3):
        bucket.take(0.0)
    assert bucket.take(0.25) == pytest.approx(0.25)  # half a token there, half missing
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) == pytest.approx(0.5)
    # A long idle time refills to the capacity, not beyond.
    assert [bucket.take(100.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) > 0


def test_a_clock_that_steps_back_does_not_drain_or_refill_a_bucket() -> None:
    bucket = TokenBucket(rate_per_second=1, capacity=1, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) == pytest.approx(1.0)
    assert bucket.take(11.0) == 0.0


def test_the_limiter_keeps_one_bucket_per_key_and_kind() -> None:
    clock = Clock()
    limiter = RateLimiter({TOKENIZE: BucketLimit(rate_per_second=1, burst=2)}, clock=clock)
    assert [limiter.check("tenant-a", TOKENIZE) for _ in range(2)] == [0.0, 0.0]
    assert limiter.check("tenant-a", TOKENIZE) == pytest.approx(1.0)
    # Another key has its own bucket; a kind without a limit is never refused.
    assert limiter.check("tenant-b", TOKENIZE) == 0.0
    assert all(limiter.check("tenant-a", kind) == 0.0 for kind in (DETOKENIZE, ADMIN) for _ in range(50))
    clock.now += 1.0
    assert limiter.check("tenant-a", TOKENIZE) == 0.0
    assert limiter.check("tenant-a", TOKENIZE) > 0


def test_an_unlimited_limiter_keeps_no_state() -> None:
    limiter = RateLimiter({}, clock=Clock())
    assert not limiter.enabled
    assert all(limiter.check(f"key-{number}", TOKENIZE) == 0.0 for number in range(100))
    assert len(limiter) == 0


def test_bucket_state_is_bounded_and_the_least_recently_used_goes_first() -> None:
    clock = Clock()
    limiter = RateLimiter({DETOKENIZE: BucketLimit(rate_per_second=1, burst=1)}, clock=clock, max_buckets=3)
    for name in ("a", "b", "c"):
        assert limiter.check(name, DETOKENIZE) == 0.0
    assert limiter.check("a", DETOKENIZE) > 0  # "a" is now the most recently used
    assert limiter.check("d", DETOKENIZE) == 0.0  # pushes out "b", the least recently used
    assert len(limiter) == 3
    assert limiter.check("a", DETOKENIZE) > 0  # kept, still empty
    assert limiter.check("c", DETOKENIZE) > 0  # kept, still empty
    assert limiter.check("b", DETOKENIZE) == 0.0  # dropped, so it came back full


@pytest.mark.parametrize(("keys", "first_key_kept"), [(10_000 // 3, True), (10_000 // 3 + 1, False)])
def test_a_process_keeps_10_000_buckets_so_a_third_as_many_keys_never_lose_one(keys: int, first_key_kept: bool) -> None:
    """docs/security.md, "Bounded state": at most 10,000 buckets in each process that serves HTTP (the
    default bound), so a key table of fewer than a third as many keys, three kinds each, loses none."""
    clock = Clock()
    limit = BucketLimit(rate_per_second=1, burst=1)
    limiter = RateLimiter({TOKENIZE: limit, DETOKENIZE: limit, ADMIN: limit}, clock=clock)
    for number in range(keys):
        for kind in (TOKENIZE, DETOKENIZE, ADMIN):
            assert limiter.check(f"key-{number}", kind) == 0.0
    assert len(limiter) == min(3 * keys, 10_000)
    # A bucket kept is still empty; one dropped comes back full.
    assert (limiter.check("key-0", TOKENIZE) > 0) is first_key_kept


@pytest.mark.parametrize(("wait_seconds", "header"), [(0.001, 1), (0.5, 1), (1.0, 1), (1.01, 2), (59.2, 60)])
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(wait_seconds: float, header: int) -> None:
    assert retry_after_seconds(wait_seconds) == header


@pytest.mark.parametrize("arguments", [
    {"rate_per_second": -1, "burst": 1},
    {"rate_per_second": float("nan"), "burst": 1},
    {"rate_per_second": 1, "burst": 0},
    {"rate_per_second": 1, "burst": float("inf")},
])
def test_invalid_limits_are_refused(arguments: dict) -> None:
    with pytest.raises(ValueError):
        BucketLimit(**arguments)


def test_unknown_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown rate limit kinds"):
        RateLimiter({"delete": BucketLimit(rate_per_second=1, burst=1)})


def test_a_key_with_its_own_limits_uses_them_and_the_others_the_default() -> None:
    clock = Clock()
    limiter = RateLimiter({TOKENIZE: BucketLimit(rate_per_second=1, burst=1)},
                          key_limits={"bulk": {TOKENIZE: BucketLimit(rate_per_second=1, burst=3)},
                                      "trusted": {TOKENIZE: BucketLimit()}}, clock=clock)
    assert [limiter.check("bulk", TOKENIZE) == 0.0 for _ in range(4)] == [True, True, True, False]
    assert [limiter.check("other", TOKENIZE) == 0.0 for _ in range(2)] == [True, False]
    assert all(limiter.check("trusted", TOKENIZE) == 0.0 for _ in range(100))
    assert limiter.enabled and not RateLimiter({}, key_limits={"trusted": {ADMIN: BucketLimit()}}).enabled


def test_a_bucket_key_apart_from_the_name_whose_own_limits_apply() -> None:
    """A runtime key named after a configured key gets its own bucket and only the default limits."""
    limiter = RateLimiter({TOKENIZE: BucketLimit(rate_per_second=1, burst=1)},
                          key_limits={"bulk": {TOKENIZE: BucketLimit(rate_per_second=1, burst=3)}}, clock=Clock())
    assert [limiter.check("key-0123", TOKENIZE, limits_of=None) == 0.0 for _ in range(2)] == [True, False]
    # The configured key's own bucket is untouched by the runtime key's requests.
    assert [limiter.check("bulk", TOKENIZE) == 0.0 for _ in range(4)] == [True, True, True, False]
