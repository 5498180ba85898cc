"""Crypto cost per value: token + encryption (EpochKeys.seal_many) and decryption, in-process.

Usage:
    .venv/bin/python bench/crypto_throughput.py [--values N] [--batch N] [--runs N]

Prints the median of --runs timings for each operation, per value and as
values/s on one core, then the token HMAC alone built three ways: the
library's keyed context copied per value (what EpochKeys does), a new context
per value, and HMAC assembled by hand from the two padded-key SHA-256 states
(what the code did before), so the choice can be checked on any machine. Values are synthetic strings of the load generator's
shape (34 characters); the epoch secret is random. Measures and prints only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import hashes, hmac  # noqa: E402

from tokenvault.crypto.keys import EPOCH_SECRET_BYTES, EpochKeys  # noqa: E402

SHA256_BLOCK_BYTES = 64


def hmac_constructions(key: bytes) -> dict[str, object]:
    """Three ways to compute HMAC-SHA256(key, value); all give the same digest."""
    context = hmac.HMAC(key, hashes.SHA256())

    def copied_context(value: bytes) -> bytes:
        mac = context.copy()
        mac.update(value)
        return mac.finalize()

    def new_context(value: bytes) -> bytes:
        mac = hmac.HMAC(key, hashes.SHA256())
        mac.update(value)
        return mac.finalize()

    padded = key.ljust(SHA256_BLOCK_BYTES, b"\x00")
    inner_state = hashlib.sha256(bytes(byte ^ 0x36 for byte in padded))
    outer_state = hashlib.sha256(bytes(byte ^ 0x5C for byte in padded))

    def hand_assembled(value: bytes) -> bytes:
        inner = inner_state.copy()
        inner.update(value)
        outer = outer_state.copy()
        outer.update(inner.digest())
        return outer.digest()

    return {"library context, copied per value": copied_context, "library context, new per value": new_context,
            "hand-assembled SHA-256 states": hand_assembled}


def median_seconds(operation: Callable[[], object], runs: int) -> float:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        operation()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=int, default=20_000, help="values per run")
    parser.add_argument("--batch", type=int, default=100, help="values per seal_many call")
    parser.add_argument("--runs", type=int, default=5, help="runs; the median is printed")
    arguments = parser.parse_args(argv)
    if arguments.values < 1 or arguments.batch < 1 or arguments.runs < 1:
        parser.error("--values, --batch and --runs must be at least 1")
    keys = EpochKeys(1, os.urandom(EPOCH_SECRET_BYTES))
    values = [f"synthetic-{number:024x}" for number in range(arguments.values)]
    batches = [values[start:start + arguments.batch] for start in range(0, len(values), arguments.batch)]
    sealed = keys.seal_many(values)

    def seal() -> None:
        for batch in batches:
            keys.seal_many(batch)

    def decrypt() -> None:
        for token, ciphertext in sealed:
            keys.decrypt(token, ciphertext)

    print(f"python {sys.version.split()[0]}, {arguments.values} values, batches of {arguments.batch}, "
          f"median of {arguments.runs} runs, one core")
    for label, operation in (("token + encryption (seal_many)", seal), ("decryption", decrypt)):
        seconds = median_seconds(operation, arguments.runs)
        print(f"{label:<32} {seconds / arguments.values * 1e6:6.2f} us/value  "
              f"{arguments.values / seconds:>10,.0f} values/s")
    encoded = [value.encode("utf-8") for value in values]
    constructions = hmac_constructions(os.urandom(32))
    digests = {function(encoded[0]) for function in constructions.values()}
    assert len(digests) == 1, "the three HMAC constructions disagree"
    print("token HMAC alone:")
    for label, function in constructions.items():
        seconds = median_seconds(lambda: [function(value) for value in encoded], arguments.runs)
        print(f"  {label:<36} {seconds / arguments.values * 1e6:6.2f} us/value")
    return 0


if __name__ == "__main__":
    sys.exit(main())
