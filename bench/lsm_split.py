"""Whether splitting the token rows over several column families (smaller trees, fewer levels) would
cut RocksDB's compaction work per token as the store grows: the design the store-growth section of
docs/performance.md weighed for issue 9's fill ratio on two cores.

Usage:
    .venv/bin/python bench/lsm_split.py [--tokens 20000000] [--window 4000000] [--families 1]
                                        [--buffers split|each]

Fills a fresh raw RocksDB database, opened with the store's own options
(tokenvault.core.store_layout.database_options), with random 32-character tokens and 44-byte rows
(a 4-byte epoch and a 40-byte ciphertext), 1,000 per write batch, each batch after a multi-get of
its keys (the insert-once check of an apply). With ``--families N`` above 1 the rows go to N column
families by the token's first character, each with the store's options; ``--buffers split`` gives
each family 1/N of the store's write buffer (the same memory in all), ``each`` the whole buffer
(N times the memory); ``--write-buffer-mib`` sets that buffer (default the store's 64 MiB), so that one
family with a smaller buffer can be set beside the split. Prints per window the values/s, the CPU per value of the whole process and
of the writing thread (the difference is RocksDB's flushes and compactions), and, once the
compactions have settled, the same over the whole fill, the bytes RocksDB's flushes and compactions
wrote per value and the bytes on disk per value. Asserts nothing; deletes its database at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rocksdict import Cache, Rdict, WriteBatch  # noqa: E402

from tokenvault.core import store_layout  # noqa: E402

BATCH = 1000
ROW_BYTES = 44
TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
SETTLE_POLL_SECONDS = 0.2
_BUSY = ("rocksdb.num-running-compactions", "rocksdb.compaction-pending", "rocksdb.num-running-flushes",
         "rocksdb.mem-table-flush-pending")


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _open(directory: Path, families: int, buffers: str,
          write_buffer_bytes: int = store_layout.WRITE_BUFFER_BYTES) -> tuple[Rdict, list[Rdict]]:
    cache = Cache(store_layout.BLOCK_CACHE_BYTES)
    options = store_layout.database_options(cache, create=True)
    each = write_buffer_bytes // families if buffers == "split" else write_buffer_bytes
    if families == 1:
        options.set_write_buffer_size(each)
        database = Rdict(str(directory), options)
        return database, [database]
    database = Rdict(str(directory), options)
    handles = []
    for number in range(families):
        family_options = store_layout.database_options(cache)
        family_options.set_write_buffer_size(each)
        handles.append(database.create_column_family(f"t{number}", family_options))
    return database, handles


def _int_property(handle: Rdict, name: str) -> int:
    return handle.property_int_value(name) or 0


def _settle(handles: list[Rdict]) -> None:
    while any(_int_property(handle, name) for handle in handles for name in _BUSY):
        time.sleep(SETTLE_POLL_SECONDS)


def _bytes_written(handles: list[Rdict]) -> int:
    """What the flushes and compactions of every family wrote to table files, from RocksDB's
    per-family statistics ("Cumulative compaction: N GB write", flushes included). RocksDB prints it to
    0.01 GB, so a family's figure is exact to about 10 MB: meant for fills of millions of tokens.
    (RocksDB's tickers are exact, but enabling them would add their own cost to the CPU measured.)"""
    total = 0.0
    for handle in handles:
        text = handle.property_value("rocksdb.cfstats") or ""
        match = re.search(r"Cumulative compaction: ([0-9.]+) GB write", text)
        if match:
            total += float(match.group(1))
    return int(total * (1 << 30))


def fill(tokens: int, window: int, families: int, buffers: str, directory: Path,
         write_buffer_bytes: int = store_layout.WRITE_BUFFER_BYTES) -> None:
    database, handles = _open(directory, families, buffers, write_buffer_bytes)
    column_families = ([database.get_column_family_handle(f"t{number}") for number in range(families)]
                       if families > 1 else [None])
    route = {character: position % families for position, character in enumerate(TOKEN_ALPHABET)}
    generator = random.Random(7)
    print(f"lsm split: {tokens:,} tokens, {families} famil{'y' if families == 1 else 'ies'},"
          f" write buffer {write_buffer_bytes >> 20} MiB {'in all' if buffers == 'split' else 'each'}", flush=True)
    print(f"{'tokens':>12} {'values/s':>9} {'cpu us/value':>13} {'writing':>8} {'L0 files':>9}", flush=True)
    made, generating = 0, 0.0
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    window_at, window_cpu, window_made, window_thread, window_generating = (
        started, cpu_started, 0, time.thread_time(), 0.0)
    try:
        while made < tokens:
            generation_started = time.thread_time()
            count = min(BATCH, tokens - made)
            groups: list[list[tuple[bytes, bytes]]] = [[] for _ in range(families)]
            for _ in range(count):
                token = "".join(generator.choices(TOKEN_ALPHABET, k=32))
                groups[route[token[0]]].append((b"t" + token.encode(), generator.randbytes(ROW_BYTES)))
            generating += time.thread_time() - generation_started
            batch = WriteBatch(raw_mode=True)
            for handle, family, rows in zip(handles, column_families, groups):
                if not rows:
                    continue
                found = handle.get([key for key, _ in rows])
                for (key, row), existing in zip(rows, found):
                    if existing is None:
                        batch.put(key, row, family)
            database.write(batch)
            made += count
            if made - window_made >= window or made >= tokens:
                now, cpu, thread = time.perf_counter(), _cpu_seconds(), time.thread_time()
                values, made_here = made - window_made, generating - window_generating
                level0 = sum(_int_property(handle, "rocksdb.num-files-at-level0") for handle in handles)
                print(f"{made:>12,} {values / (now - window_at):>9,.0f}"
                      f" {1e6 * (cpu - window_cpu - made_here) / values:>13.1f}"
                      f" {1e6 * (thread - window_thread - made_here) / values:>8.1f} {level0:>9}", flush=True)
                window_at, window_cpu, window_made, window_thread, window_generating = (
                    now, cpu, made, thread, generating)
        filled = time.perf_counter() - started
        _settle(handles)
        settled = time.perf_counter() - started
        cpu_total = _cpu_seconds() - cpu_started - generating
        written = _bytes_written(handles)
    finally:
        database.close()
    disk = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    print(f"filled at {tokens / filled:,.0f} values/s; compactions settled {settled - filled:.0f} s later;"
          f" {1e6 * cpu_total / tokens:.1f} us of CPU per value in all; flushes and compactions wrote"
          f" {written / tokens:.0f} bytes per value; {disk / tokens:.0f} bytes per value on disk", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--window", type=int, default=4_000_000)
    parser.add_argument("--families", type=int, default=1, help="column families for the token rows (1-32)")
    parser.add_argument("--buffers", choices=("split", "each"), default="split")
    parser.add_argument("--write-buffer-mib", type=int, default=store_layout.WRITE_BUFFER_BYTES >> 20,
                        help="the write buffer, split over the families or each family's (default: the store's)")
    parser.add_argument("--directory", type=Path, default=None, help="where the database goes (default: a temporary one)")
    arguments = parser.parse_args(argv)
    if (arguments.tokens < 1 or arguments.window < 1 or not 1 <= arguments.families <= len(TOKEN_ALPHABET)
            or not 1 <= arguments.write_buffer_mib <= 1024):
        parser.error("--tokens and --window must be at least 1, --families 1 to 32, --write-buffer-mib 1 to 1024")
    directory = Path(tempfile.mkdtemp(prefix="lsm-split-", dir=arguments.directory))
    try:
        fill(arguments.tokens, arguments.window, arguments.families, arguments.buffers, directory,
             arguments.write_buffer_mib << 20)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
