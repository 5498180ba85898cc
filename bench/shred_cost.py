"""What one shred pass costs as the store grows: deletes of scattered tokens at 1 M, 10 M, ... tokens.

Usage:
    .venv/bin/python bench/shred_cost.py [--tokens 1000000,10000000] [--deletes 1,32,33,500]
                                         [--ranges store,before] [--directory DIR]

Every delete is shredded (tokenvault/core/shred.py): one pass flushes the memtable and compacts the
deleted rows down to RocksDB's bottom level, in the shredder's thread. Each deleted token leaves two
keys (its row and its life row). The pass compacts up to SHRED_POINT_RANGES keys each alone, and more
in one range for each bottom-level table file that holds keys (``store_layout.shred_ranges``).
``--ranges before`` runs the same passes the way the store ran them before (more keys as one range
from the lowest to the highest), for comparison in the same run, each on tokens of its own. For each store size this fills (or reuses,
under ``--directory``) a store of random tokens, then for each count of deletes applies one delete
command of that many random tokens of the store and times the shred pass of its keys, as the shredder
would run it. Prints each pass's seconds, its ranges, and the bytes of the store's table files before
and after. Asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from view_open import filled_store  # noqa: E402
from protocol import Entry, EntryKind  # noqa: E402
from tokenvault.core.commands import Actor, DeleteTokensCommand, encode_command  # noqa: E402
from tokenvault.core import store as store_module  # noqa: E402
from tokenvault.core.shred import shred_keys  # noqa: E402
from tokenvault.core.store_layout import bottom_files, shred_ranges  # noqa: E402

POINT_RANGES_BEFORE = 64


def ranges_before(keys: list[bytes], files: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The store's ranges before they followed the bottom files: up to 64 keys each alone, more as one
    range from the lowest key to the highest."""
    ordered = sorted(set(keys))
    if len(ordered) <= POINT_RANGES_BEFORE:
        return [(key, key + b"\x00") for key in ordered]
    return [(ordered[0], ordered[-1] + b"\x00")]


RANGES = {"store": shred_ranges, "before": ranges_before}


def measure(directory: Path, tokens: int, deletes: list[int], modes: list[str]) -> None:
    store, sample = filled_store(directory, tokens)
    try:
        present = store.lookup(sample)  # a store kept from an earlier run lacks the tokens it deleted
        chosen = [token for token in sample if token in present]
        random.Random(tokens).shuffle(chosen)
        for count in deletes:
            for mode in modes:
                victims, chosen = tuple(chosen[:count]), chosen[count:]
                if len(victims) < count:
                    print(f"{tokens:>11,} tokens: the sample has too few tokens left for {count} deletes", flush=True)
                    return
                command = DeleteTokensCommand(victims, int(time.time() * 1000), Actor(node="n1", request_id="bench"))
                index = store.applied_index + 1
                store.apply_batch([Entry(index, 1, EntryKind.COMMAND, encode_command(command))])
                keys = shred_keys(command)
                ranges = len(RANGES[mode](keys, bottom_files(store._db)))
                before = store.table_bytes()
                store_module.shred_ranges = RANGES[mode]
                started = time.perf_counter()
                store.shred(keys)
                seconds = time.perf_counter() - started
                store_module.shred_ranges = shred_ranges
                print(f"{tokens:>11,} tokens  {count:>6,} deletes ({len(keys):>6,} keys, {mode:>7}: {ranges:>3} ranges)"
                      f"  pass {seconds:7.2f} s  table files {before / 2**20:7.0f} -> "
                      f"{store.table_bytes() / 2**20:7.0f} MiB", flush=True)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1000000,10000000", help="comma-separated store sizes")
    parser.add_argument("--deletes", default="1,32,33,500", help="comma-separated tokens per delete")
    parser.add_argument("--ranges", default="store", help="comma-separated: store (the store's), before")
    parser.add_argument("--directory", type=Path, default=None,
                        help="where the filled stores are kept (and reused); default: a new temporary one")
    arguments = parser.parse_args(argv)
    sizes = [int(part) for part in arguments.tokens.split(",")]
    deletes = [int(part) for part in arguments.deletes.split(",")]
    modes = arguments.ranges.split(",")
    if min(sizes) < 1 or min(deletes) < 1 or sum(deletes) * len(modes) > 2000 or not set(modes) <= set(RANGES):
        parser.error("sizes and deletes must be at least 1, at most 2,000 deletes in all (the sample), "
                     f"and --ranges among {sorted(RANGES)}")
    base = arguments.directory or Path(tempfile.mkdtemp(prefix="shred-cost-"))
    for tokens in sizes:
        measure(base / f"tokens-{tokens}", tokens, deletes, modes)


if __name__ == "__main__":
    main()
