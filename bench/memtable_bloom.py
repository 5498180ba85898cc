"""What a lookup of a key that is not in the store costs while the rows sit in RocksDB's memtable,
with and without the memtable's whole-key bloom filter (store_layout.MEMTABLE_BLOOM_RATIO), in-process.

Usage:
    .venv/bin/python bench/memtable_bloom.py [--rows 100000,300000,600000] [--directory DIR]

Every new token is looked up where it is not yet stored: by the primary's read
check before it proposes, and by the apply of its entry on every node (the
insert-once check). Those rows are mostly in the memtable (64 MiB, up to about
a million rows), and without a filter each miss walks its skip list. For each
row count it fills one store with the filter and one with the ratio set to 0
(the same tokens, 1,000 per entry), then prints the time of a 10-token lookup
of new tokens, of stored tokens, and of applying an entry of 10 new tokens.
Asserts nothing.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import Entry, EntryKind  # noqa: E402
from sizes import run_over_sizes  # noqa: E402
from tokenvault.core import store_layout  # noqa: E402
from tokenvault.core.commands import TokenizeCommand, encode_command  # noqa: E402
from tokenvault.core.store import VaultStore  # noqa: E402
from tokenvault.core.store_files import STORE_DIRECTORY  # noqa: E402
from view_open import fill, random_token  # noqa: E402

LOOKUPS = 5_000
APPLIES = 1_000
TOKENS_PER_CALL = 10


def per_call_us(calls: int, action) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    for number in range(calls):
        action(number)
    return (time.perf_counter() - started) / calls * 1e6


def one_store(directory: Path, rows: int, ratio: float) -> str:
    store_layout.MEMTABLE_BLOOM_RATIO = ratio
    directory.mkdir()
    store = VaultStore.open(directory / STORE_DIRECTORY)
    stored = fill(store, rows, random.Random(rows))
    generator = random.Random(1)
    new = [[random_token(generator) for _ in range(TOKENS_PER_CALL)] for _ in range(LOOKUPS)]
    hits = [[stored[generator.randrange(len(stored))] for _ in range(TOKENS_PER_CALL)] for _ in range(LOOKUPS)]
    miss_us = per_call_us(LOOKUPS, lambda number: store.lookup(new[number], 0))
    hit_us = per_call_us(LOOKUPS, lambda number: store.lookup(hits[number], 0))
    entries = [encode_command(TokenizeCommand(1, tuple((token, b"c" * 28) for token in new[number]),
                                              None, None, None, 3_000)) for number in range(APPLIES)]
    first = store.applied_index + 1
    apply_us = per_call_us(APPLIES, lambda number: store.apply_batch(
        [Entry(first + number, 1, EntryKind.COMMAND, entries[number])]))
    store.close()
    return f"lookup of {TOKENS_PER_CALL} new {miss_us:6.1f} us, of {TOKENS_PER_CALL} stored {hit_us:6.1f} us, " \
           f"apply of {TOKENS_PER_CALL} new {apply_us:6.1f} us"


def measure(directory: Path, rows: int) -> str:
    configured = store_layout.MEMTABLE_BLOOM_RATIO
    try:
        with_filter = one_store(directory / "with", rows, configured)
        without = one_store(directory / "without", rows, 0.0)
    finally:
        store_layout.MEMTABLE_BLOOM_RATIO = configured
    return f"{rows:>9,} rows in the memtable\n    filter (ratio {configured}): {with_filter}\n" \
           f"    no filter:           {without}"


def main() -> int:
    return run_over_sizes(__doc__ or "", "rows", "100000,300000,600000", "tokenvault-memtable-", measure)


if __name__ == "__main__":
    raise SystemExit(main())
