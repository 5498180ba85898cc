"""Storage throughput: command codec, WAL group commit and the store's apply (RocksDB), measured in-process.

Usage:
    .venv/bin/python bench/storage_throughput.py [--commands N] [--batch-entries N] [--directory DIR] [--no-fsync]

Prints one line per measurement. Tokens and ciphertexts are random bytes of the
real sizes (32-character token bodies, 16-byte AES-SIV tag plus a short value);
no cryptography runs here, so the numbers are the storage layer's own ceiling.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import Entry, EntryKind, HardState  # noqa: E402
from tokenvault.core.commands import RotateEpochCommand, TokenizeCommand, decode_command, encode_command  # noqa: E402
from tokenvault.core.store import VaultStore  # noqa: E402
from tokenvault.core.wal import WriteAheadLog  # noqa: E402


def random_token(rng: random.Random) -> str:
    return "tv1_" + base64.b32encode(rng.randbytes(20)).decode().lower()


def tokenize_payload(rng: random.Random, items: int, key: str | None) -> bytes:
    pairs = tuple((random_token(rng), rng.randbytes(16 + 12)) for _ in range(items))
    command = TokenizeCommand(1, pairs, "bench", key, b"f" * 32 if key else None, int(time.time() * 1000))
    return encode_command(command)


def report(name: str, count: int, unit: str, seconds: float, extra: str = "") -> None:
    print(f"{name:<58} {count / seconds:>12,.0f} {unit}/s  ({count} in {seconds:.2f} s){extra}")


def bench_codec(rng: random.Random) -> None:
    for items in (1, 100, 1000):
        payload = tokenize_payload(rng, items, "key")
        command = decode_command(payload)
        repeats = max(20, 20_000 // items)
        started = time.perf_counter()
        for _ in range(repeats):
            encode_command(command)
        encode_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(repeats):
            decode_command(payload)
        decode_seconds = time.perf_counter() - started
        print(f"codec {items:>4}-item tokenize: encode {encode_seconds / repeats * 1e6:8.1f} us, "
              f"decode {decode_seconds / repeats * 1e6:8.1f} us, {len(payload)} bytes")


def make_entries(rng: random.Random, commands: int, items: int, with_keys: bool) -> list[Entry]:
    entries = [Entry(1, 1, EntryKind.COMMAND,
                     encode_command(RotateEpochCommand(1, b"w" * 60, 0, None, None, None)))]
    for number in range(commands):
        key = f"key-{number}" if with_keys else None
        entries.append(Entry(number + 2, 1, EntryKind.COMMAND, tokenize_payload(rng, items, key)))
    return entries


def bench_wal(directory: Path, entries: list[Entry], batch_entries: int, fsync: bool, label: str) -> None:
    log, _ = WriteAheadLog.open(directory, fsync=fsync)
    sync_seconds = []
    started = time.perf_counter()
    for start in range(0, len(entries), batch_entries):
        batch = entries[start:start + batch_entries]
        log.append(truncate_from=None, entries=batch, hard_state=HardState(1, "n1", batch[-1].index))
        before = time.perf_counter()
        log.sync()
        sync_seconds.append(time.perf_counter() - before)
    elapsed = time.perf_counter() - started
    log.close()
    median_ms = statistics.median(sync_seconds) * 1000
    report(f"wal append+sync {label}, {batch_entries}/sync", len(entries), "entries", elapsed,
           f", {len(sync_seconds) / elapsed:,.0f} syncs/s, median sync {median_ms:.2f} ms")


def bench_apply(path: Path, entries: list[Entry], batch_entries: int, items: int, label: str) -> VaultStore:
    store = VaultStore.open(path)
    store.apply_batch(entries[:1])
    commands = entries[1:]
    started = time.perf_counter()
    for start in range(0, len(commands), batch_entries):
        store.apply_batch(commands[start:start + batch_entries])
    elapsed = time.perf_counter() - started
    report(f"apply {label}, {batch_entries}/batch", len(commands), "commands", elapsed,
           f", {len(commands) * items / elapsed:,.0f} values/s")
    started = time.perf_counter()
    store.checkpoint()
    print(f"  checkpoint after it: {(time.perf_counter() - started) * 1000:.1f} ms")
    return store


def bench_lookup(store: VaultStore, entries: list[Entry], per_request: int) -> None:
    tokens = [token for entry in entries[1:] for token, _ in decode_command(entry.payload).items]
    requests = max(1, min(2000, len(tokens) // per_request))
    started = time.perf_counter()
    for number in range(requests):
        store.lookup(tokens[number * per_request:(number + 1) * per_request])
    elapsed = time.perf_counter() - started
    report(f"lookup {per_request} tokens per call", requests * per_request, "tokens", elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=20_000, help="1-item commands to apply (100-item: 1/50 of it)")
    parser.add_argument("--batch-entries", type=int, default=64, help="entries per WAL sync / apply batch")
    parser.add_argument("--directory", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync in the WAL")
    arguments = parser.parse_args()
    rng = random.Random(7)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, fsync={'off' if arguments.no_fsync else 'on'}")
    bench_codec(rng)
    with tempfile.TemporaryDirectory(dir=arguments.directory) as temporary:
        root = Path(temporary)
        single = make_entries(rng, arguments.commands, 1, with_keys=False)
        keyed = make_entries(rng, arguments.commands, 1, with_keys=True)
        hundred = make_entries(rng, max(1, arguments.commands // 50), 100, with_keys=False)
        bench_wal(root / "wal-1", single, arguments.batch_entries, not arguments.no_fsync, "1-item commands")
        bench_wal(root / "wal-100", hundred, 8, not arguments.no_fsync, "100-item commands")
        bench_wal(root / "wal-each", single[:2000], 1, not arguments.no_fsync, "1-item commands")
        store = bench_apply(root / "single.db", single, arguments.batch_entries, 1, "1-item tokenize")
        store.close()
        store = bench_apply(root / "keyed.db", keyed, arguments.batch_entries, 1, "1-item tokenize + idempotency key")
        store.close()
        store = bench_apply(root / "hundred.db", hundred, 8, 100, "100-item tokenize")
        bench_lookup(store, hundred, 100)
        bench_lookup(store, hundred, 1)
        store.close()


if __name__ == "__main__":
    main()
