"""What each token costs the store as it grows, split between the thread that applies and RocksDB's own
threads (flushes and compactions), in-process: no HTTP, no replication, no other process.

Usage:
    .venv/bin/python bench/store_growth.py [--tokens 20000000] [--window 4000000] [--tuning default]
                                           [--idempotent-items N] [--entry-applies K]

Fills a fresh store (tokenvault.core.store.VaultStore in a temporary directory) with random tokens,
20 entries of 1,000 per apply as coalesced entries carry them, each apply after one 1,000-token
lookup (the read check a node makes before it proposes). Prints for every window of ``--window``
tokens: values/s (making the random tokens included), the process's CPU per value (every thread),
the applying thread's own CPU per value (both without what making the tokens and entries cost),
the level-0 files and RocksDB's estimate of pending compaction bytes; then, once RocksDB's
compactions have settled, the CPU per value over the whole fill and the bytes on disk per value.
The difference between the two CPU figures is what RocksDB's background threads spent, which on a
node shares the machine with everything else.

``--idempotent-items N`` fills with commands of N values, each with an Idempotency-Key of its own (36
characters, as a UUID), looked up before the apply as the core does: the store's idempotency records (each
holding its response) grow with the tokens, one record per N of them. Nothing expires in a fill (every
command is stamped with one time), so the records are the most a store holds: those of the last
``retention_hours``.

``--entry-applies K`` then times K applies of ONE 1,000-token entry in a new epoch, for each of three
shapes: plain (while the store holds no expiring mapping: the quicker path), every other mapping with an expiry (as a re-tokenize of a TTL epoch carries them), and
that with a metadata ciphertext per mapping; it prints the median, 90th percentile and worst. That is
how long one such entry holds a node's event loop, since every node applies every entry there
(docs/performance.md, "Migration as the epoch grows").

``--tuning`` changes one RocksDB option from the store's own (tokenvault.core.store_layout), to see
whether it moves those figures: ``universal`` compaction, ``lz4`` on the bottom level instead of
zstd, ``no-compression`` (none on any level), ``level-base-1g`` (a 1 GiB base level instead of
256 MiB), ``write-buffer-128m``. Asserts nothing; deletes its store at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rocksdict import DBCompactionStyle, DBCompressionType, Options  # noqa: E402

from protocol import Entry, EntryKind  # noqa: E402
from tokenvault.core import store as store_module  # noqa: E402
from tokenvault.core import store_files, store_layout  # noqa: E402
from tokenvault.core.commands import Actor, RotateEpochCommand, TokenizeCommand, encode_command  # noqa: E402
from tokenvault.core.store import VaultStore  # noqa: E402

ITEMS_PER_ENTRY = 1000
ENTRIES_PER_APPLY = 20
CIPHERTEXT_BYTES = 40  # about a sealed short value
TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
SETTLE_POLL_SECONDS = 0.2
IDEMPOTENCY_PRINCIPAL = "bench"


def _universal(options: Options) -> None:
    options.set_compaction_style(DBCompactionStyle.universal())


def _lz4(options: Options) -> None:
    options.set_bottommost_compression_type(DBCompressionType.lz4())


def _no_compression(options: Options) -> None:
    options.set_compression_type(DBCompressionType.none())
    options.set_bottommost_compression_type(DBCompressionType.none())


def _level_base_1g(options: Options) -> None:
    options.set_max_bytes_for_level_base(1024 * 1024 * 1024)


def _write_buffer_128m(options: Options) -> None:
    options.set_write_buffer_size(128 * 1024 * 1024)


TUNINGS = {"default": None, "universal": _universal, "lz4": _lz4, "no-compression": _no_compression,
           "level-base-1g": _level_base_1g, "write-buffer-128m": _write_buffer_128m}


@contextlib.contextmanager
def tuning(name: str) -> Iterator[None]:
    """Within it, every store opened uses the store's options with ``name``'s change."""
    change = TUNINGS[name]
    if change is None:
        yield
        return
    original = store_layout.database_options

    def tuned(*arguments: Any, **keywords: Any) -> Options:
        options = original(*arguments, **keywords)
        change(options)
        return options

    modules = [module for module in (store_layout, store_module, store_files) if hasattr(module, "database_options")]
    for module in modules:
        setattr(module, "database_options", tuned)
    try:
        yield
    finally:
        for module in modules:
            setattr(module, "database_options", original)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _property(store: VaultStore, name: str) -> int:
    return store._db.property_int_value(name) or 0


def _settle(store: VaultStore) -> None:
    """Wait until RocksDB runs and plans no flush or compaction."""
    while (_property(store, "rocksdb.num-running-compactions") or _property(store, "rocksdb.compaction-pending")
           or _property(store, "rocksdb.num-running-flushes") or _property(store, "rocksdb.mem-table-flush-pending")):
        time.sleep(SETTLE_POLL_SECONDS)


def run(tokens: int, window: int, tuning_name: str, directory: Path, idempotent_items: int = 0,
        entry_applies: int = 0) -> None:
    with tuning(tuning_name):
        store = VaultStore.open(directory / "store")
        try:
            summary = _fill(store, tokens, window, tuning_name, idempotent_items)
            if entry_applies:
                _time_entry_applies(store, entry_applies)
        finally:
            store.close()
    disk = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    print(f"{summary}; {disk / tokens:.0f} bytes per value on disk", flush=True)


def _fill(store: VaultStore, tokens: int, window: int, tuning_name: str, idempotent_items: int = 0) -> str:
    """Fill ``store`` printing each window's line; the line of the whole fill, less the disk's figure.
    ``idempotent_items``: commands of that many values, each with an Idempotency-Key of its own (looked up
    first, as the core does), instead of 1,000-value commands without one."""
    generator = random.Random(7)
    rotate = RotateEpochCommand(1, b"w" * 60, 1_000, None, None, None, Actor(node="n1", request_id="bootstrap"))
    store.apply_batch([Entry(1, 1, EntryKind.COMMAND, encode_command(rotate))])
    shape = (f"commands of {idempotent_items} value(s), each with an Idempotency-Key" if idempotent_items
             else f"commands of {ITEMS_PER_ENTRY:,} values without one")
    print(f"store growth to {tokens:,} tokens, tuning {tuning_name}, {window:,}-token windows, {shape}", flush=True)
    per_entry = idempotent_items or ITEMS_PER_ENTRY
    entries_per_apply = ENTRIES_PER_APPLY * ITEMS_PER_ENTRY // per_entry  # the same values in every apply
    print(f"{'tokens':>12} {'values/s':>9} {'cpu us/value':>13} {'applying':>9} {'L0 files':>9} {'pending MiB':>12}",
          flush=True)
    index, made = 2, 0
    generating = 0.0  # this thread's CPU seconds spent making the tokens and entries, left out of every figure
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    window_at, window_cpu, window_made, window_thread = started, cpu_started, 0, time.thread_time()
    window_generating = 0.0
    while made < tokens:
        generation_started = time.thread_time()
        entries, keys = [], []
        items: tuple[tuple[str, bytes], ...] = ()
        for _ in range(entries_per_apply):
            count = min(per_entry, tokens - made)
            if count <= 0:
                break
            items = tuple(("tv1_" + "".join(generator.choices(TOKEN_ALPHABET, k=32)),
                           generator.randbytes(CIPHERTEXT_BYTES)) for _ in range(count))
            if idempotent_items:
                key = generator.randbytes(18).hex()  # 36 characters, a UUID's length
                keys.append(key)
                command = TokenizeCommand(1, items, IDEMPOTENCY_PRINCIPAL, key, generator.randbytes(32), 2_000)
            else:
                command = TokenizeCommand(1, items, None, None, None, 2_000)
            entries.append(Entry(index, 1, EntryKind.COMMAND, encode_command(command)))
            index += 1
            made += count
        generating += time.thread_time() - generation_started
        for key in keys:
            store.idempotency_get(IDEMPOTENCY_PRINCIPAL, key)
        store.lookup([token for token, _ in items])
        store.apply_batch(entries)
        if made - window_made >= window or made >= tokens:
            now, cpu, thread = time.perf_counter(), _cpu_seconds(), time.thread_time()
            values, made_here = made - window_made, generating - window_generating
            print(f"{made:>12,} {values / (now - window_at):>9,.0f}"
                  f" {1e6 * (cpu - window_cpu - made_here) / values:>13.1f}"
                  f" {1e6 * (thread - window_thread - made_here) / values:>9.1f}"
                  f" {_property(store, 'rocksdb.num-files-at-level0'):>9}"
                  f" {_property(store, 'rocksdb.estimate-pending-compaction-bytes') >> 20:>12}", flush=True)
            window_at, window_cpu, window_made, window_thread = now, cpu, made, thread
            window_generating = generating
    filled = time.perf_counter() - started
    _settle(store)
    settled, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started - generating
    return (f"filled at {tokens / filled:,.0f} values/s; compactions settled {settled - filled:.0f} s later;"
            f" {1e6 * cpu / tokens:.1f} us of CPU per value in all")


ENTRY_SHAPES = ("plain", "expiry", "expiry+metadata")
METADATA_CIPHERTEXT_BYTES = 60  # a small metadata document, sealed


def _time_entry_applies(store: VaultStore, count: int) -> None:
    """Apply ``count`` single 1,000-token entries of each shape in epoch 2 (rotated to here) and print
    the times."""
    generator = random.Random(11)
    index = store.applied_index + 1
    rotate = RotateEpochCommand(2, b"x" * 60, 3_000, None, None, None, Actor(node="n1", request_id="entries"))
    store.apply_batch([Entry(index, 1, EntryKind.COMMAND, encode_command(rotate))])
    far = 10**13  # an expiry nothing reaches during the run
    for shape in ENTRY_SHAPES:
        times = []
        for _ in range(count):
            index += 1
            items = tuple(("tv2_" + "".join(generator.choices(TOKEN_ALPHABET, k=32)),
                           generator.randbytes(CIPHERTEXT_BYTES)) for _ in range(ITEMS_PER_ENTRY))
            options: dict[str, Any] = {}
            if shape != "plain":
                options["item_expires_at_ms"] = tuple(far if position % 2 else None
                                                      for position in range(ITEMS_PER_ENTRY))
            if shape == "expiry+metadata":
                options["metadata"] = tuple(generator.randbytes(METADATA_CIPHERTEXT_BYTES)
                                            for _ in range(ITEMS_PER_ENTRY))
            entry = Entry(index, 1, EntryKind.COMMAND,
                          encode_command(TokenizeCommand(2, items, None, None, None, 4_000, **options)))
            started = time.perf_counter()
            store.apply_batch([entry])
            times.append(1000 * (time.perf_counter() - started))
        times.sort()
        print(f"one {ITEMS_PER_ENTRY:,}-token entry, {shape}: median {times[len(times) // 2]:.1f} ms,"
              f" p90 {times[len(times) * 9 // 10]:.1f} ms, worst {times[-1]:.1f} ms ({count} applies)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--window", type=int, default=4_000_000)
    parser.add_argument("--tuning", choices=sorted(TUNINGS), default="default")
    parser.add_argument("--idempotent-items", type=int, default=0, metavar="N",
                        help="commands of N values (1-1000), each with an Idempotency-Key: the store's idempotency"
                             " records grow with the tokens (default: 1,000-value commands without one)")
    parser.add_argument("--entry-applies", type=int, default=0, metavar="K",
                        help="after the fill, time K applies of one 1,000-token entry of each shape")
    parser.add_argument("--directory", type=Path, default=None, help="where the store goes (default: a temporary one)")
    arguments = parser.parse_args(argv)
    if arguments.tokens < 1 or arguments.window < 1 or arguments.entry_applies < 0:
        parser.error("--tokens and --window must be at least 1, --entry-applies at least 0")
    if not 0 <= arguments.idempotent_items <= ITEMS_PER_ENTRY:
        parser.error(f"--idempotent-items must be 0 to {ITEMS_PER_ENTRY}")
    directory = Path(tempfile.mkdtemp(prefix="store-growth-", dir=arguments.directory))
    try:
        run(arguments.tokens, arguments.window, arguments.tuning, directory, arguments.idempotent_items,
            arguments.entry_applies)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
