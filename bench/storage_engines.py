"""Storage engines side by side on the vault's workload: SQLite, RocksDB (rocksdict), LMDB.

Usage:
    python bench/storage_engines.py --engine rocksdb|lmdb|sqlite --tokens 1000000,10000000,50000000 \
        --directory DIR [--batch 100] [--commit-every N] [--commit-seconds S] [--max-seconds S]

One run fills one store in DIR (which must not exist, or be empty) with the
vault's shape of data and stops at the largest milestone of ``--tokens``:

- keys: ``tv1_`` + 32 characters of base32 [a-z2-7] (160 random bits), 36 ASCII bytes;
- values: 4-byte epoch + 32 random bytes (the AES-SIV ciphertext of a 16-byte
  card-like value: 16-byte tag + 16 bytes); SQLite keeps the epoch in its own
  INTEGER column as tokenvault/core/store.py does;
- insert-once: every batch (``--batch``, default 100) first looks up all its
  keys (multi-get), then inserts them;
- point reads: batches of 100 random existing keys (RocksDB ``db.get([...])``,
  LMDB ``Cursor.getmulti``, SQLite ``SELECT ... WHERE token IN (...)``).

Each key is derived from (seed, batch number, position) with SHAKE-128, so any
existing key can be regenerated for the read phase without keeping the keys in
memory (which would distort the process RSS). Key and value generation is part
of the timed insert loop; its cost alone is printed at the start.

Output: one ``window`` line per 1,000,000 inserted tokens (the insert-rate
curve), and at each milestone one ``milestone`` line: insert rate over the last
window, point-read rate, bytes per token on disk (whole directory; RocksDB before
and after a full compact_range), RSS (VmRSS and its anonymous part, RssAnon:
LMDB's VmRSS also counts the pages of its memory-mapped file), time to close and
reopen, and time to take a consistent checkpoint to a directory next to DIR
(RocksDB: flush + Checkpoint, hard links on the same file system; LMDB:
env.copy(compact=False); SQLite: wal_checkpoint(TRUNCATE) + the backup API),
each followed by an fsync of the checkpoint's files. Rates are given per wall
second and per second of this process's CPU time (all its threads, RocksDB's
background compaction included), since the machine is shared; ``load1`` is the
1-minute load average at the time. Milestone measurements are
not counted in the insert windows. If ``--max-seconds`` (wall time since the
start, measurements included) runs out first, the run stops, says where, gives
the rate at the stop, and measures the store at that size.

The three engines are imported lazily: a missing package ends the run with a
message naming it. Install them with pip (``rocksdict``, ``lmdb``; ``psutil`` is
optional, /proc/self/status is read without it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import time
from pathlib import Path

WINDOW_TOKENS = 1_000_000
READ_BATCH = 100
READ_SECONDS = 3.0
READ_KEYS_PREPARED = 200_000  # random existing keys generated before the read window, then cycled
EPOCH = (1).to_bytes(4, "big")
CIPHERTEXT_BYTES = 32
MIB = 1024 * 1024
GIB = 1024 * MIB


# ---------------------------------------------------------------- data
BASE32 = b"abcdefghijklmnopqrstuvwxyz234567"
# byte -> base32 symbol of its low 5 bits: 256 = 8 x 32, so uniform symbols from
# uniform bytes (base64.b32encode is pure Python before 3.13 and would dominate).
TO_BASE32 = bytes(BASE32[byte & 31] for byte in range(256))


class KeySource:
    """Batch b's keys: SHAKE-128(seed | b) mapped to base32 symbols, 32 per key (160 random bits)."""

    def __init__(self, seed: int, batch: int) -> None:
        self.seed = seed.to_bytes(8, "big")
        self.batch = batch

    def keys(self, batch_number: int) -> list[bytes]:
        text = hashlib.shake_128(self.seed + batch_number.to_bytes(8, "big")).digest(32 * self.batch)
        text = text.translate(TO_BASE32)
        return [b"tv1_" + text[i:i + 32] for i in range(0, 32 * self.batch, 32)]

    def key(self, index: int) -> bytes:
        batch_number, position = divmod(index, self.batch)
        raw = hashlib.shake_128(self.seed + batch_number.to_bytes(8, "big")).digest(32 * self.batch)
        return b"tv1_" + raw[32 * position:32 * position + 32].translate(TO_BASE32)


def values(count: int) -> list[bytes]:
    raw = os.urandom(CIPHERTEXT_BYTES * count)
    return [EPOCH + raw[i:i + CIPHERTEXT_BYTES] for i in range(0, CIPHERTEXT_BYTES * count, CIPHERTEXT_BYTES)]


# ---------------------------------------------------------------- process and disk
def rss_bytes() -> tuple[int, int]:
    """(VmRSS, RssAnon) of this process in bytes."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon"):
                found[name] = int(rest.split()[0]) * 1024
    return found.get("VmRSS", 0), found.get("RssAnon", 0)


def directory_bytes(path: Path) -> tuple[int, int]:
    """(allocated, apparent) bytes of all files under path."""
    allocated = apparent = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                status = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            allocated += status.st_blocks * 512
            apparent += status.st_size
    return allocated, apparent


def fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        descriptor = os.open(root, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# ---------------------------------------------------------------- engines
class MissingPackage(Exception):
    pass


class RocksEngine:
    name = "rocksdb"

    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        try:
            import rocksdict
        except ImportError as error:
            raise MissingPackage("rocksdb needs the 'rocksdict' package (pip install rocksdict)") from error
        self.rocksdict = rocksdict
        self.path = directory / "rocksdb"
        self.compacts = True
        self.open()

    def _options(self):
        rocksdict = self.rocksdict
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(10, False)
        table.set_block_cache(rocksdict.Cache(64 * MIB))
        options.set_block_based_table_factory(table)
        return options

    def open(self) -> None:
        # The default column family's options must be passed explicitly: given only
        # ``options``, rocksdict (0.3.29) reopens an existing database with the
        # column family options read back from its OPTIONS file, where the bloom
        # filter does not survive (filter_policy=nullptr): every SST written after
        # a reopen would have no filter. detail() prints the filter coverage.
        self.db = self.rocksdict.Rdict(str(self.path), self._options(),
                                       column_families={"default": self._options()})
        write = self.rocksdict.WriteOptions()
        write.sync = False  # WAL on, not synced per write
        write.disable_wal = False
        self.db.set_write_options(write)

    def close(self) -> None:
        self.db.close()

    def insert_batch(self, keys: list[bytes], vals: list[bytes]) -> int:
        existing = self.db.get(keys)
        batch = self.rocksdict.WriteBatch(raw_mode=True)
        new = 0
        for key, value, found in zip(keys, vals, existing):
            if found is None:
                batch.put(key, value)
                new += 1
        self.db.write(batch)
        return new

    def commit(self) -> None:
        pass

    def maybe_commit(self, rows: int) -> None:
        pass

    def read_batch(self, keys: list[bytes]) -> int:
        return sum(1 for value in self.db.get(keys) if value is not None)

    def probe(self, key: bytes) -> bool:
        return self.db.get(key) is not None

    def compact(self) -> None:
        self.db.compact_range(None, None)

    def detail(self) -> str:
        names = ("estimate-live-data-size", "num-live-versions", "estimate-table-readers-mem",
                 "cur-size-all-mem-tables", "block-cache-usage")
        parts = []
        for name in names:
            try:
                parts.append(f"{name}={self.db.property_int_value('rocksdb.' + name)}")
            except Exception:  # noqa: BLE001 - a property this build lacks
                pass
        files = {}
        for level in range(7):
            try:
                count = int(self.db.property_value(f"rocksdb.num-files-at-level{level}"))
            except Exception:  # noqa: BLE001
                continue
            if count:
                files[f"L{level}"] = count
        table = self.db.property_value("rocksdb.aggregated-table-properties") or ""
        fields = dict(part.strip().split("=", 1) for part in table.split(";") if "=" in part)
        parts.append(f"sst_entries={fields.get('# entries', '?')} "
                     f"filter_entries={fields.get('# entries for filter', '?')} "
                     f"filter_bytes={fields.get('filter block size', '?')}")
        return " ".join(parts) + f" files={files}"

    def checkpoint(self, target: Path) -> None:
        self.db.flush()
        self.rocksdict.Checkpoint(self.db).create_checkpoint(str(target))


class GroupCommit:
    """Commit every `seconds` or every `batches` batches, like the store's flush."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.every_batches = args.commit_every
        self.every_seconds = args.commit_seconds
        self.pending_batches = 0
        self.opened_at = time.perf_counter()

    def due(self) -> bool:
        self.pending_batches += 1
        return (self.pending_batches >= self.every_batches
                or time.perf_counter() - self.opened_at >= self.every_seconds)

    def reset(self) -> None:
        self.pending_batches = 0
        self.opened_at = time.perf_counter()


class LmdbEngine:
    name = "lmdb"

    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        try:
            import lmdb
        except ImportError as error:
            raise MissingPackage("lmdb needs the 'lmdb' package (pip install lmdb)") from error
        self.lmdb = lmdb
        self.path = directory / "lmdb"
        self.path.mkdir(parents=True, exist_ok=True)
        self.map_size = args.lmdb_map_gib * GIB
        self.group = GroupCommit(args)
        self.compacts = False
        self.txn = None
        self.open()

    def open(self) -> None:
        # sync=True: each commit fsyncs (commits are grouped); readahead off for random access.
        self.env = self.lmdb.open(str(self.path), map_size=self.map_size, sync=True, metasync=True,
                                  readahead=False, max_dbs=0, lock=True)

    def close(self) -> None:
        self.commit()
        self.env.close()

    def _write_txn(self):
        if self.txn is None:
            self.txn = self.env.begin(write=True)
            self.group.reset()
        return self.txn

    def insert_batch(self, keys: list[bytes], vals: list[bytes]) -> int:
        txn = self._write_txn()
        get = txn.get
        put = txn.put
        missing = [(key, value) for key, value in zip(keys, vals) if get(key) is None]
        new = 0
        for key, value in missing:
            new += put(key, value, overwrite=False)
        if self.group.due():
            self.commit()
        return new

    def commit(self) -> None:
        if self.txn is not None:
            self.txn.commit()
            self.txn = None

    def read_batch(self, keys: list[bytes]) -> int:
        with self.env.begin() as txn:
            return len(txn.cursor().getmulti(keys))

    def probe(self, key: bytes) -> bool:
        with self.env.begin() as txn:
            return txn.get(key) is not None

    def compact(self) -> None:
        pass

    def detail(self) -> str:
        stat = self.env.stat()
        info = self.env.info()
        used = (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]) * stat["psize"]
        with self.env.begin() as txn:
            entries = txn.stat()["entries"]
        return (f"lmdb: depth={stat['depth']} branch_pages={stat['branch_pages']} leaf_pages={stat['leaf_pages']} "
                f"tree_bytes={used} ({used / max(1, entries):.1f} B/token) "
                f"file_high_water={(info['last_pgno'] + 1) * stat['psize']} (the rest is LMDB's free-page list)")

    def checkpoint(self, target: Path) -> None:
        self.commit()
        target.mkdir()
        self.env.copy(str(target), compact=False)


_INSERT_CHUNK_ROWS = (256, 128, 64, 32, 16, 8, 4, 2, 1)  # as tokenvault/core/store.py
_INSERT_TOKENS = {rows: "INSERT OR IGNORE INTO tokens (token, epoch, ciphertext) VALUES "
                  + ",".join(("(?,?,?)",) * rows) for rows in _INSERT_CHUNK_ROWS}


class SqliteEngine:
    name = "sqlite"

    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        import sqlite3
        self.sqlite3 = sqlite3
        self.path = directory / "store.sqlite3"
        self.group = GroupCommit(args)
        self.compacts = False
        self.in_transaction = False
        self.open()
        if not self.connection.execute("SELECT name FROM sqlite_master WHERE name = 'tokens'").fetchone():
            self.connection.execute("CREATE TABLE tokens (token TEXT PRIMARY KEY, epoch INTEGER NOT NULL,"
                                    " ciphertext BLOB NOT NULL) WITHOUT ROWID")
        self._selects: dict[int, str] = {}

    def open(self) -> None:
        # The pragmas of tokenvault/core/store.py's _connect.
        self.connection = self.sqlite3.connect(self.path, isolation_level=None, cached_statements=256)
        self.connection.execute("PRAGMA journal_mode = WAL")
        self.connection.execute("PRAGMA synchronous = NORMAL")
        self.connection.execute("PRAGMA cache_size = -262144")
        self.connection.execute("PRAGMA wal_autocheckpoint = 65536")

    def close(self) -> None:
        self.commit()
        self.connection.close()

    def _select(self, count: int) -> str:
        sql = self._selects.get(count)
        if sql is None:
            sql = self._selects[count] = f"SELECT token, ciphertext FROM tokens WHERE token IN ({','.join('?' * count)})"
        return sql

    def insert_batch(self, keys: list[bytes], vals: list[bytes]) -> int:
        if not self.in_transaction:
            self.connection.execute("BEGIN IMMEDIATE")
            self.in_transaction = True
            self.group.reset()
        tokens = [key.decode() for key in keys]
        existing = {row[0] for row in self.connection.execute(self._select(len(tokens)), tokens)}
        rows = [(token, 1, value[4:]) for token, value in zip(tokens, vals) if token not in existing]
        position = 0
        for size in _INSERT_CHUNK_ROWS:
            while len(rows) - position >= size:
                parameters = [item for row in rows[position:position + size] for item in row]
                self.connection.execute(_INSERT_TOKENS[size], parameters)
                position += size
        if self.group.due():
            self.commit()
        return len(rows)

    def commit(self) -> None:
        if self.in_transaction:
            self.connection.execute("COMMIT")
            self.in_transaction = False

    def read_batch(self, keys: list[bytes]) -> int:
        tokens = [key.decode() for key in keys]
        return len(self.connection.execute(self._select(len(tokens)), tokens).fetchall())

    def probe(self, key: bytes) -> bool:
        return self.connection.execute(self._select(1), [key.decode()]).fetchone() is not None

    def compact(self) -> None:
        pass

    def detail(self) -> str:
        page_size = self.connection.execute("PRAGMA page_size").fetchone()[0]
        pages = self.connection.execute("PRAGMA page_count").fetchone()[0]
        free = self.connection.execute("PRAGMA freelist_count").fetchone()[0]
        wal = self.path.with_name(self.path.name + "-wal")
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        return f"sqlite: db_file={pages * page_size} free_pages={free} wal_file={wal_bytes} page_size={page_size}"

    def checkpoint(self, target: Path) -> None:
        self.commit()
        self.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        target.mkdir()
        copy = self.sqlite3.connect(target / "store.sqlite3")
        try:
            self.connection.backup(copy)
        finally:
            copy.close()


ENGINES = {"rocksdb": RocksEngine, "lmdb": LmdbEngine, "sqlite": SqliteEngine}


# ---------------------------------------------------------------- run
def say(line: str) -> None:
    print(line, flush=True)


def measure_reads(engine, source: KeySource, inserted: int, rng: random.Random) -> tuple[float, int]:
    """Keys/s of 100-key multi-gets over about READ_SECONDS; keys are generated before timing."""
    batch_size = min(READ_BATCH, inserted)
    batches = []
    for _ in range(max(1, min(READ_KEYS_PREPARED, inserted) // batch_size)):
        # distinct keys within a batch: SQLite's IN (...) returns a duplicate once
        batches.append([source.key(index) for index in rng.sample(range(inserted), batch_size)])
    done = found = 0
    position = 0
    started = time.perf_counter()
    cpu_started = time.process_time()
    while done % 10_000 or time.perf_counter() - started < READ_SECONDS:
        batch = batches[position]
        position = (position + 1) % len(batches)
        found += engine.read_batch(batch)
        done += len(batch)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    if found != done:
        raise SystemExit(f"read check failed: {found} of {done} existing keys found")
    return done / seconds, done / cpu_seconds, done


def measure_store(engine, args, source: KeySource, inserted: int, window_rate: float, window_cpu_rate: float,
                  label: str, rng: random.Random) -> None:
    engine.commit()
    read_rate, read_cpu_rate, read_keys = measure_reads(engine, source, inserted, rng)
    allocated, apparent = directory_bytes(args.directory)
    disk = f"disk {allocated / inserted:.1f} B/token ({allocated / GIB:.2f} GiB, apparent {apparent / GIB:.2f} GiB)"
    if engine.compacts:
        started = time.perf_counter()
        engine.compact()
        compact_seconds = time.perf_counter() - started
        after, after_apparent = directory_bytes(args.directory)
        disk = (f"disk before compaction {allocated / inserted:.1f} B/token ({allocated / GIB:.2f} GiB), "
                f"after compact_range {after / inserted:.1f} B/token ({after / GIB:.2f} GiB, "
                f"compaction {compact_seconds:.1f} s)")
    vm_rss, rss_anon = rss_bytes()
    detail = engine.detail()
    started = time.perf_counter()
    engine.close()
    closed = time.perf_counter()
    engine.open()
    if not engine.probe(source.key(rng.randrange(inserted))):
        raise SystemExit("reopened store lost a key")
    opened = time.perf_counter()
    target = Path(f"{args.directory}.checkpoint")
    if target.exists():
        shutil.rmtree(target)
    started_checkpoint = time.perf_counter()
    engine.checkpoint(target)
    made = time.perf_counter()
    fsync_tree(target)
    synced = time.perf_counter()
    checkpoint_allocated, _ = directory_bytes(target)
    shutil.rmtree(target)
    after_checkpoint, _ = directory_bytes(args.directory)
    say(f"{label} engine={engine.name} tokens={inserted:,} insert={window_rate:,.0f} values/s "
        f"({window_cpu_rate:,.0f} per CPU-s, last window) "
        f"read={read_rate:,.0f} keys/s ({read_cpu_rate:,.0f} per CPU-s, {read_keys:,} keys in 100-key multi-gets) "
        f"{disk} load1={os.getloadavg()[0]:.2f} "
        f"VmRSS={vm_rss / MIB:,.0f} MiB RssAnon={rss_anon / MIB:,.0f} MiB "
        f"close={closed - started:.2f} s reopen={opened - closed:.3f} s "
        f"checkpoint={synced - started_checkpoint:.2f} s (make {made - started_checkpoint:.2f} s + fsync "
        f"{synced - made:.2f} s, {checkpoint_allocated / GIB:.2f} GiB)")
    say(f"  detail engine={engine.name} tokens={inserted:,} {detail} | directory after checkpoint "
        f"{after_checkpoint / inserted:.1f} B/token ({after_checkpoint / GIB:.2f} GiB)")


def generation_rate(source: KeySource, batch: int) -> float:
    started = time.perf_counter()
    count = 0
    while time.perf_counter() - started < 1.0:
        for number in range(1_000):
            source.keys(10**9 + number)
            values(batch)
        count += 1_000 * batch
    return count / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument("--tokens", default="1000000,10000000,50000000",
                        help="comma-separated milestones; the run stops at the largest")
    parser.add_argument("--directory", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--commit-every", type=int, default=4_000,
                        help="sqlite/lmdb: commit after this many batches (default 4,000 = 400k rows at 100)")
    parser.add_argument("--commit-seconds", type=float, default=5.0,
                        help="sqlite/lmdb: or after this many seconds, whichever comes first (default 5)")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="stop after this wall time (0: no limit)")
    parser.add_argument("--lmdb-map-gib", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    milestones = sorted({int(part.replace("_", "")) for part in args.tokens.split(",") if part.strip()})
    if args.directory.exists() and any(args.directory.iterdir()):
        parser.error(f"{args.directory} is not empty")
    args.directory.mkdir(parents=True, exist_ok=True)
    try:
        engine = ENGINES[args.engine](args.directory, args)
    except MissingPackage as error:
        say(f"skip engine={args.engine}: {error}")
        return 2
    rng = random.Random(args.seed)
    source = KeySource(args.seed, args.batch)
    say(f"engine={args.engine} batch={args.batch} milestones={','.join(f'{m:,}' for m in milestones)} "
        f"directory={args.directory} max_seconds={args.max_seconds or 'none'}"
        + (f" commit_every={args.commit_every} batches or {args.commit_seconds} s" if args.engine != "rocksdb" else ""))
    say(f"harness alone: key+value generation {generation_rate(source, args.batch):,.0f} values/s")

    run_started = time.perf_counter()
    inserted = 0
    batch_number = 0
    window_started = time.perf_counter()
    window_cpu = time.process_time()
    window_inserted = 0
    window_number = 0
    last_window_rate = last_window_cpu_rate = 0.0
    pending = list(milestones)
    while pending:
        keys = source.keys(batch_number)
        batch_number += 1
        new = engine.insert_batch(keys, values(len(keys)))
        if new != len(keys):
            raise SystemExit(f"insert-once check found {len(keys) - new} existing keys in batch {batch_number}")
        inserted += new
        window_inserted += new
        if window_inserted >= WINDOW_TOKENS:
            now = time.perf_counter()
            cpu_now = time.process_time()
            window_number += 1
            last_window_rate = window_inserted / (now - window_started)
            last_window_cpu_rate = window_inserted / max(1e-9, cpu_now - window_cpu)
            say(f"window {window_number:>3} engine={args.engine} tokens={inserted:,} insert={last_window_rate:,.0f} "
                f"values/s ({last_window_cpu_rate:,.0f} per CPU-s, process CPU {cpu_now - window_cpu:.1f} s "
                f"in {now - window_started:.1f} s) elapsed={now - run_started:,.0f} s load1={os.getloadavg()[0]:.2f}")
            window_inserted = 0
            window_started = now
            window_cpu = cpu_now
        if inserted >= pending[0]:
            pending.pop(0)
            rate, cpu_rate = last_window_rate, last_window_cpu_rate
            if window_inserted:  # milestone off a window boundary, or before the first full window
                rate = window_inserted / (time.perf_counter() - window_started)
                cpu_rate = window_inserted / max(1e-9, time.process_time() - window_cpu)
            measure_store(engine, args, source, inserted, rate, cpu_rate, "milestone", rng)
            window_started = time.perf_counter()
            window_cpu = time.process_time()
            window_inserted = 0
            continue
        if args.max_seconds and batch_number % 100 == 0 and time.perf_counter() - run_started >= args.max_seconds:
            now = time.perf_counter()
            rate = window_inserted / (now - window_started) if window_inserted else last_window_rate
            cpu_rate = (window_inserted / max(1e-9, time.process_time() - window_cpu) if window_inserted
                        else last_window_cpu_rate)
            say(f"STOPPED engine={args.engine}: --max-seconds {args.max_seconds:,.0f} reached at tokens={inserted:,} "
                f"before milestone {pending[0]:,}; insert rate at stop {rate:,.0f} values/s ({cpu_rate:,.0f} per CPU-s) "
                f"(current partial window of {window_inserted:,}), last full window "
                + (f"{last_window_rate:,.0f} values/s" if last_window_rate else "none"))
            measure_store(engine, args, source, inserted, rate, cpu_rate, "partial", rng)
            break
    engine.close()
    say(f"done engine={args.engine} tokens={inserted:,} wall={time.perf_counter() - run_started:,.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
