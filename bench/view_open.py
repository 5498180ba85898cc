"""What opening a worker's view of the store costs as the store grows: a RocksDB secondary instance
(tokenvault.core.store_reader) over a store of N random tokens, in-process.

Usage:
    .venv/bin/python bench/view_open.py [--tokens 1000000,10000000] [--directory DIR]

A view opens again whenever the core's WAL files change (a flush: a full write
buffer, or a shred), so this is what each flush costs every worker once. For
each N it fills a store with N tokens (1,000 per entry, as coalesced entries
carry them), then prints the time to open a view, to catch it up with nothing
new, to open it again after a flush, and one 100-token lookup. Asserts nothing.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import Entry, EntryKind  # noqa: E402
from sizes import run_over_sizes  # noqa: E402
from tokenvault.core.commands import Actor, RotateEpochCommand, TokenizeCommand, encode_command  # noqa: E402
from tokenvault.core.store import VaultStore  # noqa: E402
from tokenvault.core.store_files import STORE_DIRECTORY  # noqa: E402
from tokenvault.core.store_reader import StoreReader  # noqa: E402

ITEMS_PER_ENTRY = 1000
ENTRIES_PER_BATCH = 20


def random_token(generator: random.Random) -> str:
    return "tv1_" + "".join(generator.choices("abcdefghijklmnopqrstuvwxyz234567", k=32))


def fill(store: VaultStore, tokens: int, generator: random.Random) -> list[str]:
    """Apply ``tokens`` random tokens after epoch 1; a sample of them for the lookups."""
    rotate = RotateEpochCommand(1, b"w" * 60, 1_000, None, None, None, Actor(node="n1", request_id="bootstrap"))
    store.apply_batch([Entry(1, 1, EntryKind.COMMAND, encode_command(rotate))])
    index, made, sample = 2, 0, []
    while made < tokens:
        batch = []
        for _ in range(ENTRIES_PER_BATCH):
            count = min(ITEMS_PER_ENTRY, tokens - made)
            if count <= 0:
                break
            items = tuple((random_token(generator), generator.randbytes(28)) for _ in range(count))
            sample.extend(token for token, _ in items[:1])
            command = TokenizeCommand(1, items, None, None, None, 2_000)
            batch.append(Entry(index, 1, EntryKind.COMMAND, encode_command(command)))
            index += 1
            made += count
        store.apply_batch(batch)
    return sample


def timed(action) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def measure(directory: Path, tokens: int) -> str:
    data = directory / "data"
    data.mkdir()
    store = VaultStore.open(data / STORE_DIRECTORY)
    started = time.perf_counter()
    sample = fill(store, tokens, random.Random(tokens))
    fill_seconds = time.perf_counter() - started
    store._db.flush()
    store._db.compact_range(None, None)
    reader = StoreReader(data / STORE_DIRECTORY, directory / "view")
    open_ms = timed(reader.open)
    catch_up_ms = timed(reader.catch_up)
    wals = sorted(path.name for path in (data / STORE_DIRECTORY).rglob("*.log"))
    fill_more = TokenizeCommand(1, ((random_token(random.Random(0)), b"c" * 28),), None, None, None, 3_000)
    store.apply_batch([Entry(store.applied_index + 1, 1, EntryKind.COMMAND, encode_command(fill_more))])
    store._db.flush()  # a new WAL file: the view's next catch-up opens it again
    assert sorted(path.name for path in (data / STORE_DIRECTORY).rglob("*.log")) != wals
    reopen_ms = timed(reader.catch_up)
    lookups = sample[:100]
    lookup_ms = timed(lambda: reader.lookup(lookups, 0))
    reader.close()
    store.close()
    return (f"{tokens:>11,} tokens (filled in {fill_seconds:5.1f} s): open {open_ms:7.1f} ms, catch-up with "
            f"nothing new {catch_up_ms:6.2f} ms, open again after a flush {reopen_ms:7.1f} ms, "
            f"100-token lookup {lookup_ms:5.2f} ms")


def main() -> int:
    return run_over_sizes(__doc__ or "", "tokens", "1000000,10000000", "tokenvault-view-", measure)


if __name__ == "__main__":
    raise SystemExit(main())
