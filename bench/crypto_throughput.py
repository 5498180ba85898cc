"""Crypto cost per value: token + encryption (EpochKeys.seal_many) and decryption, in-process.

Usage:
    .venv/bin/python bench/crypto_throughput.py [--values N] [--batch N] [--runs N]

Prints the median of --runs timings for each operation, per value and as
values/s on one core. Values are synthetic strings of the load generator's
shape (34 characters); the epoch secret is random. Measures and prints only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenvault.crypto import EPOCH_SECRET_BYTES, EpochKeys  # noqa: E402


def median_seconds(operation, runs: int) -> float:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
