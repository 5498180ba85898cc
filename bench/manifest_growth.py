"""What many shreds do to a store's MANIFEST, and so to every open of a worker's view, in-process.

Usage:
    .venv/bin/python bench/manifest_growth.py [--tokens 20000] [--shreds 0,1000,3000,10000]
                                              [--max-manifest-bytes 0,65536]

Every delete, destroy and retokenize is shredded (tokenvault/core/shred.py): the store flushes its
memtable and compacts the keys, and each flush and compaction appends a record to RocksDB's MANIFEST.
A view of the store (tokenvault/core/store_reader.py) opens again after every flush and replays the
whole MANIFEST as it opens, on its worker's event loop. For each bound on the MANIFEST (0: RocksDB's
own default, 1 GiB; otherwise the store's MAX_MANIFEST_BYTES is set to it for the run) this fills a
store with ``--tokens`` random tokens, shreds one token at a time, and prints, at each count of shreds,
the MANIFEST's size and the median of five view opens. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from view_open import fill  # noqa: E402
from tokenvault.core import store_layout  # noqa: E402
from tokenvault.core.store import VaultStore  # noqa: E402
from tokenvault.core.store_files import read_current  # noqa: E402
from tokenvault.core.store_layout import token_key  # noqa: E402
from tokenvault.core.store_reader import StoreReader  # noqa: E402

OPENS = 5
ROCKSDB_DEFAULT = 1024 ** 3  # RocksDB's own max_manifest_file_size


def manifest_bytes(store_path: Path) -> int:
    generation = store_path / read_current(store_path)
    return sum(entry.stat().st_size for entry in os.scandir(generation) if entry.name.startswith("MANIFEST-"))


def view_open_ms(store_path: Path, scratch: Path) -> float:
    times = []
    for _ in range(OPENS):
        reader = StoreReader(store_path, scratch)
        started = time.perf_counter()
        reader.open()
        times.append(1000 * (time.perf_counter() - started))
        reader.close()
    return statistics.median(times)


def run(bound: int, tokens: int, counts: list[int], directory: Path) -> None:
    store_layout.MAX_MANIFEST_BYTES = bound or ROCKSDB_DEFAULT
    store_path = directory / "store"
    store = VaultStore.open(store_path)
    try:
        sample = fill(store, tokens, random.Random(7))
        shredded = 0
        for count in counts:
            started = time.perf_counter()
            while shredded < count:
                store.shred([token_key(sample[shredded % len(sample)])])
                shredded += 1
            shred_seconds = time.perf_counter() - started
            print(f"bound {'default' if not bound else f'{bound // 1024} KiB':>8}  shreds {count:>6,}"
                  f"  manifest {manifest_bytes(store_path) / 1024:8.0f} KiB"
                  f"  view open {view_open_ms(store_path, directory / 'scratch'):7.1f} ms"
                  f"  (the shreds since the last line took {shred_seconds:.1f} s)", flush=True)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--shreds", default="0,1000,3000,10000", help="comma-separated counts, ascending")
    parser.add_argument("--max-manifest-bytes", default=f"0,{store_layout.MAX_MANIFEST_BYTES}",
                        help="comma-separated bounds to compare (0: RocksDB's default)")
    arguments = parser.parse_args(argv)
    counts = [int(part) for part in arguments.shreds.split(",")]
    bounds = [int(part) for part in arguments.max_manifest_bytes.split(",")]
    if arguments.tokens < 1 or counts != sorted(counts) or min(counts) < 0 or min(bounds) < 0:
        parser.error("--tokens must be at least 1, --shreds ascending counts, bounds at least 0")
    for bound in bounds:
        directory = Path(tempfile.mkdtemp(prefix="manifest-growth-"))
        try:
            run(bound, arguments.tokens, counts, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
