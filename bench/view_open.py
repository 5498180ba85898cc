"""What opening a worker's view of the store costs as the store grows: a RocksDB secondary instance
(tokenvault.core.store_reader) over a store of N random tokens, in-process.

Usage:
    .venv/bin/python bench/view_open.py [--tokens 1000000,10000000] [--stores DIR] [--rounds 1]

A view opens again at its first catch-up after the core's WAL files change (a flush: a full write
buffer, or a shred), so this is what each flush costs every worker once. For
each N it fills a store with N tokens (1,000 per entry, as coalesced entries
carry them), flushes and compacts it, then prints, per round: the time to
open a view, to catch it up with nothing new, to open it again after each of
three flushes (one more entry each), the first and the median of twenty
100-token lookups of tokens in the store after the open and after the opens
again, the view's block cache capacity, and a catch-up after the core wrote
50,000 more tokens (the MiB of WAL it replays, and its milliseconds per MiB). ``--stores DIR`` keeps each
filled store in DIR/<N> and uses it again on the next run (a 50 M store takes
some twenty minutes to fill on two cores), so that two trees can be measured
on the same store, one after the other. Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import Entry, EntryKind  # noqa: E402
from tokenvault.core.commands import Actor, RotateEpochCommand, TokenizeCommand, encode_command  # noqa: E402
from tokenvault.core.store import VaultStore  # noqa: E402
from tokenvault.core.store_files import STORE_DIRECTORY  # noqa: E402
from tokenvault.core.store_reader import StoreReader  # noqa: E402

ITEMS_PER_ENTRY = 1000
REPLAY_TOKENS = 50_000  # about 5 MiB of WAL: well inside one write buffer
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


def filled_store(directory: Path, tokens: int) -> tuple[VaultStore, list[str]]:
    """The store of ``tokens`` random tokens under ``directory`` (filled unless it was already), and a
    sample of 2,000 of its tokens."""
    data, sample_file = directory / "data", directory / "sample.txt"
    if not sample_file.exists():
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        store = VaultStore.open(data / STORE_DIRECTORY)
        started = time.perf_counter()
        sample = fill(store, tokens, random.Random(tokens))
        store._db.flush()
        store._db.compact_range(None, None)
        print(f"{tokens:>11,} tokens filled in {time.perf_counter() - started:.1f} s", flush=True)
        sample_file.write_text("\n".join(random.Random(1).sample(sample, min(2000, len(sample)))))
        return store, sample_file.read_text().split()
    return VaultStore.open(data / STORE_DIRECTORY), sample_file.read_text().split()


def lookups(reader: StoreReader, sample: list[str]) -> list[float]:
    """Milliseconds of each of twenty 100-token lookups (fewer for a small sample)."""
    return [timed(lambda: reader.lookup(sample[start:start + 100], 0)) for start in range(0, len(sample), 100)]


def measure(directory: Path, tokens: int, round_number: int) -> str:
    store, sample = filled_store(directory, tokens)
    try:
        reader = StoreReader(directory / "data" / STORE_DIRECTORY, directory / "view")
        open_ms = timed(reader.open)
        first = lookups(reader, sample)
        catch_up_ms = timed(reader.catch_up)
        reopen_ms = []
        for flush in range(3):
            more = TokenizeCommand(1, ((random_token(random.Random(f"{round_number} {flush}")), b"c" * 28),),
                                   None, None, None, 3_000)
            wals = sorted(path.name for path in (directory / "data" / STORE_DIRECTORY).rglob("*.log"))
            store.apply_batch([Entry(store.applied_index + 1, 1, EntryKind.COMMAND, encode_command(more))])
            store._db.flush()  # a new WAL file: the view's next catch-up opens it again
            assert sorted(path.name for path in (directory / "data" / STORE_DIRECTORY).rglob("*.log")) != wals
            reopen_ms.append(timed(reader.catch_up))
        again = lookups(reader, sample)
        cache_mib = getattr(reader, "cache_bytes", 32 << 20) / (1 << 20)
        replay_mib, replay_ms = replay(store, reader, directory / "data" / STORE_DIRECTORY, round_number)
        reader.close()
    finally:
        store.close()
    return (f"{tokens:>11,} tokens, round {round_number}: open {open_ms:6.1f} ms, catch-up with nothing new "
            f"{catch_up_ms:5.2f} ms, open again after a flush {' / '.join(f'{ms:.1f}' for ms in reopen_ms)} ms; "
            f"100-token lookups after the open: first {first[0]:5.2f}, median {statistics.median(first):5.2f} ms, "
            f"after the opens again: median {statistics.median(again):5.2f} ms; cache {cache_mib:.0f} MiB; "
            f"catch-up over {replay_mib:.1f} MiB of new WAL {replay_ms:.0f} ms "
            f"({replay_ms / replay_mib:.1f} ms per MiB)")


def replay(store: VaultStore, reader: StoreReader, store_directory: Path, round_number: int) -> tuple[float, float]:
    """What a catch-up costs once the core has written REPLAY_TOKENS new tokens (REPLAY_TOKENS / 1,000
    entries, no flush between): the MiB of WAL it replays and its milliseconds."""
    def wal_bytes() -> int:
        return sum(path.stat().st_size for path in store_directory.rglob("*.log"))

    wals = sorted(path.name for path in store_directory.rglob("*.log"))
    before = wal_bytes()
    generator = random.Random(f"replay {round_number}")
    for _ in range(REPLAY_TOKENS // ITEMS_PER_ENTRY):
        items = tuple((random_token(generator), generator.randbytes(28)) for _ in range(ITEMS_PER_ENTRY))
        command = TokenizeCommand(1, items, None, None, None, 4_000)
        store.apply_batch([Entry(store.applied_index + 1, 1, EntryKind.COMMAND, encode_command(command))])
    # The same WAL file: a catch-up, not an open (a flush here would make it an open).
    assert sorted(path.name for path in store_directory.rglob("*.log")) == wals
    written = (wal_bytes() - before) / (1 << 20)
    return written, timed(reader.catch_up)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1000000,10000000", help="token counts, comma-separated")
    parser.add_argument("--stores", default=None, help="keep the filled stores in DIR/<N> and use them again")
    parser.add_argument("--rounds", type=int, default=1, help="measurements per store")
    arguments = parser.parse_args()
    for tokens in (int(text) for text in arguments.tokens.split(",") if text.strip()):
        with contextlib.ExitStack() as stack:
            if arguments.stores is None:
                directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenvault-view-")))
            else:
                directory = Path(arguments.stores) / str(tokens)
            for round_number in range(1, arguments.rounds + 1):
                shutil.rmtree(directory / "view", ignore_errors=True)
                print(measure(directory, tokens, round_number), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
