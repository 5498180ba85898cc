"""The audit trail as it grows, and what trimming it costs: a store filled with N audit records, in-process.

Usage:
    .venv/bin/python bench/audit_trim.py [--records 1000000,5000000] [--directory DIR]

For each N: the time to apply N records (1,000 per entry, as detokenizes of a
busy node group-commit them), the store's size on disk, the time to read the
first page, then a trim through the newest record but 1,000 (one log entry:
a range delete), the first page after it, and the size once RocksDB has
compacted the range away. Prints one line per N; asserts nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import Entry, EntryKind  # noqa: E402
from sizes import run_over_sizes  # noqa: E402
from tokenvault.core.commands import (Actor, AuditCommand, AuditRecord, AuditTrimCommand,  # noqa: E402
                                      encode_command)
from tokenvault.core.store import VaultStore  # noqa: E402

RECORDS_PER_ENTRY = 1000
ENTRIES_PER_BATCH = 20
KEPT = 1000


def directory_bytes(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def fill(store: VaultStore, records: int) -> int:
    """Apply ``records`` audit records; the next free log index."""
    index = store.applied_index + 1
    made = 0
    while made < records:
        batch = []
        for _ in range(ENTRIES_PER_BATCH):
            count = min(RECORDS_PER_ENTRY, records - made)
            if count <= 0:
                break
            command = AuditCommand(tuple(
                AuditRecord(1_700_000_000_000 + made + number, "n2", "reader", None, "detokenize", 10, 10,
                            f"{made + number:016x}", None) for number in range(count)))
            batch.append(Entry(index, 1, EntryKind.COMMAND, encode_command(command)))
            index += 1
            made += count
        store.apply_batch(batch)
    return index


def measure(directory: Path, records: int) -> str:
    store = VaultStore.open(directory / "store")
    started = time.perf_counter()
    index = fill(store, records)
    fill_seconds = time.perf_counter() - started
    store._db.flush()
    size_before = directory_bytes(directory / "store")
    started = time.perf_counter()
    store.audit_page(0, 1000)
    page_before_ms = (time.perf_counter() - started) * 1000
    through = store.audit_seq - KEPT
    anchor = store.audit_page(through - 1, 1)[0]
    command = AuditTrimCommand(through, bytes.fromhex(anchor["hash"]), 1_800_000_000_000, Actor(name="admin"))
    started = time.perf_counter()
    (result,) = store.apply_batch([Entry(index, 1, EntryKind.COMMAND, encode_command(command))])
    trim_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    first = store.audit_page(0, 1000)
    page_after_ms = (time.perf_counter() - started) * 1000
    assert result.outcome.value == "ok" and first[0]["seq"] == through + 1
    started = time.perf_counter()
    store._db.compact_range(None, None)
    compact_seconds = time.perf_counter() - started
    size_after = directory_bytes(directory / "store")
    store.close()
    return (f"{records:>11,} records: fill {fill_seconds:6.1f} s ({records / fill_seconds:,.0f} records/s), "
            f"store {size_before / 2**20:7.1f} MiB ({size_before / records:.0f} B/record), first page "
            f"{page_before_ms:5.1f} ms | trim through {through:,}: {trim_ms:6.1f} ms, first page after "
            f"{page_after_ms:5.1f} ms, compaction {compact_seconds:5.1f} s, store after {size_after / 2**20:6.1f} MiB")


def main() -> int:
    return run_over_sizes(__doc__ or "", "records", "1000000,5000000", "tokenvault-audit-", measure)


if __name__ == "__main__":
    raise SystemExit(main())
