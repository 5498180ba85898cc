"""The vault state machine: committed log entries applied to SQLite.

Tables: ``tokens`` (token -> epoch, ciphertext; insert-once), ``epochs`` (wrapped
secrets and their state), ``idempotency`` (the first response to each
(principal, key)) and ``meta`` (the applied log position and the token count).

Every batch of committed entries is applied under a savepoint that also records
the applied index and view; consecutive batches share one transaction that is
committed every COMMIT_INTERVAL_SECONDS or COMMIT_ROWS rows (``flush``). So
after a crash the store is exactly at some applied index (the last commit) and
the node replays the log from there.

Durability: the database runs in WAL journal mode with ``synchronous=NORMAL``.
Commits are then atomic and never corrupt the file, but the latest ones may be
lost on power failure. That is safe because the replication write-ahead log
(tokenvault.wal) already made every entry durable before it was applied: the
store only promises what ``checkpoint`` returned, and the node deletes log
segments only up to that index. ``checkpoint`` runs ``wal_checkpoint(TRUNCATE)``,
which under ``synchronous=NORMAL`` fsyncs the SQLite WAL before copying it and
the database file after, so one fsync pair covers many batches instead of one
fsync per applied batch on the hot path.

Apply is deterministic: outcomes depend only on the entries and the state, and
idempotency records expire by the commands' own timestamps with a fixed amount
of purge work per command, so every node that applies the same entries holds
the same state, whatever its batch boundaries. ``retention_ms`` must therefore
be the same on every node.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from protocol import Entry, EntryKind
from tokenvault.commands import RotateEpochCommand, TokenizeCommand, decode_command
from tokenvault.wal import fsync_directory

DEFAULT_RETENTION_MS = 48 * 3600 * 1000
# Expired idempotency records deleted per applied command at most. Each command
# adds at most one record, so purging up to 8 per command always keeps up.
PURGE_LIMIT_PER_COMMAND = 8
LOOKUP_CHUNK_TOKENS = 500
# Applied batches are committed together: at the latest after this many seconds
# (the node calls flush_if_due on its timer) or this many inserted rows. Longer
# windows rewrite each dirty page fewer times: in paired runs of 100-value
# batches, 2 s with a 65,536-page autocheckpoint beat 0.5 s with 16,384 pages
# every time (about 1.1-1.3x), and 5 s beat 2 s in the second and third 10 s run
# on a filling node in three pairs out of three (docs/performance.md, fourth
# sitting); the cost is a longer log replay after a crash (at most 5 s of writes).
COMMIT_INTERVAL_SECONDS = 5.0
COMMIT_ROWS = 400_000
# Tokens are HMAC outputs, so inserts land on random B-tree pages: a page cache
# that holds the tree's inner pages and many leaves keeps 100-value batches off
# the disk (measured: about 1.6x the default 2 MiB cache at 400,000 tokens).
CACHE_KIBIBYTES = 256 * 1024
# SQLite's own checkpoint runs only as a safety net; the node calls checkpoint()
# on its own schedule (it also decides which log segments may go).
AUTOCHECKPOINT_PAGES = 65536
SCHEMA_VERSION = 1
APPLICATION_ID = 0x54564C54  # "TVLT": marks a file as a TokenVault store
SQLITE_HEADER_BYTES = 100
TOKENIZE_KIND = "tokenize"
ROTATE_KIND = "rotate"
ACTIVE = "active"
RETIRED = "retired"

SCHEMA_STATEMENTS = (
    "CREATE TABLE tokens (token TEXT PRIMARY KEY, epoch INTEGER NOT NULL, ciphertext BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE epochs (epoch INTEGER PRIMARY KEY, wrapped_secret BLOB NOT NULL, created_at_ms INTEGER NOT NULL,"
    " state TEXT NOT NULL CHECK (state IN ('active', 'retired')))",
    "CREATE TABLE idempotency (principal TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL,"
    " fingerprint BLOB NOT NULL, status INTEGER NOT NULL, response BLOB NOT NULL, created_at_ms INTEGER NOT NULL,"
    " PRIMARY KEY (principal, key)) WITHOUT ROWID",
    "CREATE INDEX idempotency_by_age ON idempotency (created_at_ms, principal, key)",
    "CREATE TABLE meta (singleton INTEGER PRIMARY KEY CHECK (singleton = 1), applied_index INTEGER NOT NULL,"
    " applied_view INTEGER NOT NULL, token_count INTEGER NOT NULL)",
)

# Token rows go in as multi-row INSERTs of these sizes (largest first), one
# statement per chunk instead of one per row: SQLite steps once per statement and
# binds the parameters in C. 256 rows are 768 parameters, under SQLite's oldest
# default limit of 999; the fixed sizes keep the prepared statements cached.
_INSERT_CHUNK_ROWS = (256, 128, 64, 32, 16, 8, 4, 2, 1)
_INSERT_TOKENS = {rows: "INSERT OR IGNORE INTO tokens (token, epoch, ciphertext) VALUES "
                  + ",".join(("(?,?,?)",) * rows) for rows in _INSERT_CHUNK_ROWS}
_SELECT_IDEMPOTENCY = ("SELECT kind, fingerprint, status, response, created_at_ms FROM idempotency"
                       " WHERE principal = ? AND key = ?")
_INSERT_IDEMPOTENCY = "INSERT INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?)"
_DELETE_IDEMPOTENCY = "DELETE FROM idempotency WHERE principal = ? AND key = ?"
# Oldest first with the key as tie-breaker, so every node deletes the same rows.
_PURGE_IDEMPOTENCY = ("DELETE FROM idempotency WHERE (principal, key) IN (SELECT principal, key FROM idempotency"
                      " WHERE created_at_ms < ? ORDER BY created_at_ms, principal, key LIMIT ?)")
_NO_RECORDS = 2 ** 63  # the idempotency floor of an empty table
_UPDATE_META = "UPDATE meta SET applied_index = ?, applied_view = ?, token_count = ? WHERE singleton = 1"


class Outcome(StrEnum):
    OK = "ok"
    EPOCH_MISMATCH = "epoch_mismatch"
    STALE_EPOCH = "stale_epoch"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The result of one applied command; status and response are None unless OK or DUPLICATE."""

    index: int
    outcome: Outcome
    status: int | None
    response: bytes | None
    # What an OK command did, so the node can log and count without decoding it again.
    kind: str = ""
    epoch: int = 0
    items: int = 0


@dataclass(frozen=True, slots=True)
class EpochRecord:
    epoch: int
    wrapped_secret: bytes
    created_at_ms: int
    state: str  # "active" | "retired"


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    principal: str
    key: str
    kind: str
    fingerprint: bytes
    status: int
    response: bytes
    created_at_ms: int


class StoreError(Exception):
    """Base class of the store's own errors."""


class InsertOnceViolation(StoreError):
    """A command would map an existing token to a different ciphertext: corruption, never applied."""


class StoreCorruption(StoreError):
    """The database file is not a TokenVault store of the expected schema."""


class SnapshotRejected(StoreError):
    """A snapshot image failed validation; the current state is untouched."""


def _reference_schema() -> list[tuple]:
    connection = sqlite3.connect(":memory:")
    try:
        for statement in SCHEMA_STATEMENTS:
            connection.execute(statement)
        return _schema_of(connection)
    finally:
        connection.close()


def _schema_of(connection: sqlite3.Connection) -> list[tuple]:
    return connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()


def _check_store_schema(connection: sqlite3.Connection, error: type[StoreError]) -> None:
    """The file must hold exactly our tables and index: no extra tables, views or triggers."""
    if connection.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
        raise error("not a TokenVault store (application id differs)")
    if connection.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
        raise error("unsupported store schema version")
    if _schema_of(connection) != _reference_schema():
        raise error("store schema differs from the expected one")
    if connection.execute("SELECT count(*) FROM meta").fetchone()[0] != 1:
        raise error("store meta row is missing")


# One shared encoder: json.dumps with non-default separators builds a new
# encoder per call, which was a measurable part of applying a 1-item command.
# The output is identical to json.dumps(document, separators=(",", ":")).
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _json_bytes(document: dict) -> bytes:
    return _JSON_ENCODER.encode(document).encode()


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are begun and ended explicitly in apply_batch.
    connection = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    try:
        connection.execute("PRAGMA trusted_schema = OFF")
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreCorruption("the store cannot use WAL journal mode")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute(f"PRAGMA cache_size = -{CACHE_KIBIBYTES}")
        connection.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}")
    except BaseException:
        connection.close()
        raise
    return connection


def _initialise(connection: sqlite3.Connection) -> None:
    connection.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA_STATEMENTS:
            connection.execute(statement)
        connection.execute("INSERT INTO meta VALUES (1, 0, 0, 0)")
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class VaultStore:
    """The applied state of one node. Not thread-safe: use it from one thread."""

    def __init__(self, path: Path, connection: sqlite3.Connection, retention_ms: int,
                 purge_limit_per_command: int) -> None:
        self._path = path
        self._connection = connection
        self._retention_ms = retention_ms
        self._purge_limit_per_command = purge_limit_per_command
        self._load_meta()
        self._durable_index = 0
        # Applied batches accumulate in one open transaction that is committed
        # every few thousand rows or every commit_interval; see flush().
        self._transaction_open = False
        self._transaction_started = 0.0
        self._uncommitted_rows = 0
        self.commit_interval_seconds = COMMIT_INTERVAL_SECONDS
        self.commit_rows = COMMIT_ROWS

    def _load_meta(self) -> None:
        row = self._connection.execute("SELECT applied_index, applied_view, token_count FROM meta").fetchone()
        self._applied_index, self._applied_view, self._token_count = row
        active = self._connection.execute("SELECT max(epoch) FROM epochs WHERE state = 'active'").fetchone()[0]
        self._active_epoch = active or 0
        self._load_idempotency_floor()

    def _load_idempotency_floor(self) -> None:
        """No idempotency record is older than this: a purge with an earlier cut-off would delete nothing."""
        oldest = self._connection.execute("SELECT min(created_at_ms) FROM idempotency").fetchone()[0]
        self._idempotency_floor_ms = _NO_RECORDS if oldest is None else oldest

    @classmethod
    def open(cls, path: Path, *, retention_ms: int = DEFAULT_RETENTION_MS,
             purge_limit_per_command: int = PURGE_LIMIT_PER_COMMAND) -> "VaultStore":
        """Open or create the store at ``path``; raises StoreCorruption for a foreign or damaged file.

        ``retention_ms`` and ``purge_limit_per_command`` shape the replicated
        state, so every node of a cluster must use the same values.
        """
        if type(retention_ms) is not int or retention_ms < 0:
            raise ValueError("retention_ms must be a non-negative integer")
        if type(purge_limit_per_command) is not int or purge_limit_per_command < 1:
            raise ValueError("purge_limit_per_command must be a positive integer")
        path = Path(path)
        # A leftover of an install_snapshot interrupted before its rename.
        path.with_name(path.name + ".install").unlink(missing_ok=True)
        created = not path.exists()
        try:
            connection = _connect(path)
        except sqlite3.DatabaseError as error:
            raise StoreCorruption(f"cannot open the store: {error}") from None
        try:
            if created or not _schema_of(connection):
                _initialise(connection)
                fsync_directory(path.parent)
            _check_store_schema(connection, StoreCorruption)
            store = cls(path, connection, retention_ms, purge_limit_per_command)
        except sqlite3.DatabaseError as error:
            connection.close()
            raise StoreCorruption(f"cannot open the store: {error}") from None
        except BaseException:
            connection.close()
            raise
        store.checkpoint()
        return store

    # ------------------------------------------------------------ properties
    @property
    def applied_index(self) -> int:
        return self._applied_index

    @property
    def applied_view(self) -> int:
        return self._applied_view

    @property
    def retention_ms(self) -> int:
        return self._retention_ms

    def active_epoch(self) -> int:
        """The active epoch, 0 before the first rotation."""
        return self._active_epoch

    def token_count(self) -> int:
        return self._token_count

    # ------------------------------------------------------------ apply
    def apply_batch(self, entries: Sequence[Entry]) -> list[ApplyResult]:
        """Apply committed entries in one transaction; returns one result per applied command.

        Entries at or below the applied index are skipped (a replay after a
        restart); the rest must follow it without gaps. NOOP entries only move
        the applied index. On any error nothing of the batch is applied.
        """
        if not entries:
            return []
        connection = self._connection
        state = _BatchState(self._applied_index, self._applied_view, self._active_epoch, self._token_count)
        results: list[ApplyResult] = []
        if not self._transaction_open:
            connection.execute("BEGIN IMMEDIATE")
            self._transaction_open = True
            self._transaction_started = time.monotonic()
        # A savepoint per batch: a failing batch leaves no trace, earlier batches stay.
        connection.execute("SAVEPOINT apply_batch")
        try:
            for entry in entries:
                if entry.index <= state.applied_index:
                    continue
                if entry.index != state.applied_index + 1:
                    raise ValueError(f"entry {entry.index} does not follow applied index {state.applied_index}")
                if entry.kind == EntryKind.COMMAND:
                    results.append(self._apply_command(entry.index, decode_command(entry.payload), state))
                state.applied_index, state.applied_view = entry.index, entry.view
            if state.rows:
                self._insert_tokens(state)
            if state.applied_index != self._applied_index:
                connection.execute(_UPDATE_META, (state.applied_index, state.applied_view, state.token_count))
            connection.execute("RELEASE apply_batch")
        except BaseException:
            connection.execute("ROLLBACK TO apply_batch")
            connection.execute("RELEASE apply_batch")
            self._load_idempotency_floor()  # purges and inserts of the batch are undone
            raise
        self._uncommitted_rows += state.token_count - self._token_count + len(entries)
        self._applied_index, self._applied_view = state.applied_index, state.applied_view
        self._active_epoch, self._token_count = state.active_epoch, state.token_count
        if self._uncommitted_rows >= self.commit_rows:
            self.flush()
        return results

    def flush(self) -> None:
        """Commit the open transaction of applied batches.

        Why batches are not committed one by one: random token keys make every
        commit write a page per inserted row, and the replicated log already
        holds every applied entry durably. A crash loses at most the uncommitted
        tail of the store, and the applied index is committed in the same
        transaction, so a restart replays exactly those entries from the log.
        Reads go through this same connection and see uncommitted rows.
        """
        if self._transaction_open:
            self._connection.execute("COMMIT")
            self._transaction_open = False
            self._uncommitted_rows = 0

    def flush_if_due(self) -> None:
        """Commit when the open transaction is older than commit_interval_seconds (called on a timer)."""
        if self._transaction_open and time.monotonic() - self._transaction_started >= self.commit_interval_seconds:
            self.flush()

    def _apply_command(self, index: int, command, state: "_BatchState") -> ApplyResult:
        if type(command) is TokenizeCommand:
            if command.epoch != state.active_epoch:
                return ApplyResult(index, Outcome.EPOCH_MISMATCH, None, None)
            return self._apply_tokenize(index, command, state)
        if command.epoch != state.active_epoch + 1:
            return ApplyResult(index, Outcome.STALE_EPOCH, None, None)
        return self._apply_rotate(index, command, state)

    def _apply_tokenize(self, index: int, command: TokenizeCommand, state: "_BatchState") -> ApplyResult:
        duplicate = self._existing_response(index, command.principal, command.idempotency_key,
                                            command.issued_at_ms)
        if duplicate is not None:
            return duplicate
        # The rows are inserted once for the whole batch (_insert_tokens): nothing
        # later in the batch reads the tokens table, and a failure undoes the
        # whole batch either way.
        epoch = command.epoch
        state.rows.extend([(token, epoch, ciphertext) for token, ciphertext in command.items])
        state.row_entries.append((len(state.rows), index))
        response = None
        if command.idempotency_key is not None:
            # Only a keyed request can be replayed, so only then is the body built and kept.
            response = _json_bytes({"epoch": command.epoch, "tokens": [token for token, _ in command.items]})
            self._record_idempotency(command.principal, command.idempotency_key, TOKENIZE_KIND,
                                     command.fingerprint, 200, response, command.issued_at_ms)
        return ApplyResult(index, Outcome.OK, 200, response, TOKENIZE_KIND, command.epoch, len(command.items))

    def _apply_rotate(self, index: int, command: RotateEpochCommand, state: "_BatchState") -> ApplyResult:
        duplicate = self._existing_response(index, command.principal, command.idempotency_key,
                                            command.created_at_ms)
        if duplicate is not None:
            return duplicate
        connection = self._connection
        connection.execute("UPDATE epochs SET state = 'retired' WHERE state = 'active'")
        connection.execute("INSERT INTO epochs VALUES (?, ?, ?, 'active')",
                           (command.epoch, command.wrapped_secret, command.created_at_ms))
        state.active_epoch = command.epoch
        response = _json_bytes({"epoch": command.epoch})
        self._record_idempotency(command.principal, command.idempotency_key, ROTATE_KIND, command.fingerprint,
                                 201, response, command.created_at_ms)
        return ApplyResult(index, Outcome.OK, 201, response, ROTATE_KIND, command.epoch, 0)

    def _existing_response(self, index: int, principal: str | None, key: str | None,
                           now_ms: int) -> ApplyResult | None:
        """Purge a bounded number of expired records, then find a live record for (principal, key)."""
        connection = self._connection
        expired_before_ms = now_ms - self._retention_ms
        if expired_before_ms > self._idempotency_floor_ms:
            # Skipped when no record can have expired: the purge would delete nothing, so
            # skipping it leaves the same state on every node.
            connection.execute(_PURGE_IDEMPOTENCY, (expired_before_ms, self._purge_limit_per_command))
            self._load_idempotency_floor()
        if key is None:
            return None
        row = connection.execute(_SELECT_IDEMPOTENCY, (principal, key)).fetchone()
        if row is None:
            return None
        if row[4] < expired_before_ms:
            # Expired but not purged yet: it no longer answers; the new command takes its place.
            connection.execute(_DELETE_IDEMPOTENCY, (principal, key))
            return None
        return ApplyResult(index, Outcome.DUPLICATE, row[2], row[3])

    def _record_idempotency(self, principal: str | None, key: str | None, kind: str, fingerprint: bytes | None,
                            status: int, response: bytes, created_at_ms: int) -> None:
        if key is None:
            return
        self._connection.execute(_INSERT_IDEMPOTENCY,
                                 (principal, key, kind, fingerprint, status, response, created_at_ms))
        self._idempotency_floor_ms = min(self._idempotency_floor_ms, created_at_ms)

    def _insert_tokens(self, state: "_BatchState") -> None:
        """Insert the batch's token rows; an existing token must keep its ciphertext."""
        rows = state.rows
        connection = self._connection
        changes_before = connection.total_changes
        start = 0
        for size in _INSERT_CHUNK_ROWS:
            statement = _INSERT_TOKENS[size]
            while len(rows) - start >= size:
                connection.execute(statement, [field for row in rows[start:start + size] for field in row])
                start += size
        inserted = connection.total_changes - changes_before
        if inserted != len(rows):
            # Some tokens existed already (the same value tokenized again, or
            # repeated within the batch): they must map to the same ciphertext.
            self._verify_existing(state)
        state.token_count += inserted

    def _verify_existing(self, state: "_BatchState") -> None:
        stored = self._fetch([token for token, _, _ in state.rows])
        ends = iter(state.row_entries)
        end, index = next(ends)
        for position, (token, epoch, ciphertext) in enumerate(state.rows):
            while position >= end:
                end, index = next(ends)
            if stored.get(token) != (epoch, ciphertext):
                # The message carries positions only: a token is no secret, but
                # there is no reason to spread it through logs either.
                raise InsertOnceViolation(
                    f"entry {index} maps an existing token to a different value; refusing to overwrite")

    def _fetch(self, tokens: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        found: dict[str, tuple[int, bytes]] = {}
        unique = list(dict.fromkeys(tokens))
        for chunk in _chunks(unique, LOOKUP_CHUNK_TOKENS):
            sql = f"SELECT token, epoch, ciphertext FROM tokens WHERE token IN ({','.join('?' * len(chunk))})"
            for token, epoch, ciphertext in self._connection.execute(sql, chunk):
                found[token] = (epoch, ciphertext)
        return found

    # ------------------------------------------------------------ reads
    def lookup(self, tokens: Sequence[str]) -> dict[str, bytes]:
        """Ciphertexts of the known tokens among ``tokens`` (unknown ones are absent)."""
        found: dict[str, bytes] = {}
        unique = list(dict.fromkeys(tokens))
        for chunk in _chunks(unique, LOOKUP_CHUNK_TOKENS):
            sql = f"SELECT token, ciphertext FROM tokens WHERE token IN ({','.join('?' * len(chunk))})"
            found.update(self._connection.execute(sql, chunk).fetchall())
        return found

    def epochs(self) -> list[EpochRecord]:
        rows = self._connection.execute(
            "SELECT epoch, wrapped_secret, created_at_ms, state FROM epochs ORDER BY epoch").fetchall()
        return [EpochRecord(*row) for row in rows]

    def idempotency_get(self, principal: str, key: str) -> IdempotencyRecord | None:
        row = self._connection.execute(_SELECT_IDEMPOTENCY, (principal, key)).fetchone()
        if row is None:
            return None
        kind, fingerprint, status, response, created_at_ms = row
        return IdempotencyRecord(principal, key, kind, fingerprint, status, response, created_at_ms)

    # ------------------------------------------------------------ durability and snapshots
    def checkpoint(self) -> int:
        """Make the applied state durable; returns the applied index that is now on disk for sure.

        If SQLite could not finish the checkpoint (a reader held it back), the
        previously durable index is returned and the caller simply keeps more log.
        """
        self.flush()
        busy, _, _ = self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy == 0:
            self._durable_index = self._applied_index
        return self._durable_index

    def snapshot_bytes(self) -> tuple[int, int, bytes]:
        """(applied index, applied view, a consistent image of the whole database)."""
        self.flush()
        return self._applied_index, self._applied_view, _as_rollback_journal_image(self._connection.serialize())

    def install_snapshot(self, data: bytes, index: int, view: int) -> None:
        """Replace the whole state with a snapshot image taken at (index, view).

        The image is remote input: it must pass SQLite's integrity check, hold
        exactly this store's schema and sit at (index, view), or
        SnapshotRejected is raised and nothing changes. The swap is a write to a
        temporary file, fsync, rename over the database and a directory fsync.
        """
        image = _validated_image(data, index, view)
        self.flush()
        temporary = self._path.with_name(self._path.name + ".install")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view_of_image = memoryview(image)
            while view_of_image:
                view_of_image = view_of_image[os.write(descriptor, view_of_image):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        self._connection.close()
        # A WAL file left by the old database must never be replayed into the new one.
        for suffix in ("-wal", "-shm"):
            leftover = self._path.with_name(self._path.name + suffix)
            if leftover.exists():
                leftover.unlink()
        os.replace(temporary, self._path)
        fsync_directory(self._path.parent)
        self._connection = _connect(self._path)
        self._load_meta()
        self._durable_index = self._applied_index

    def close(self) -> None:
        self.flush()
        self._connection.close()


@dataclass(slots=True)
class _BatchState:
    """What a batch changes, kept aside until its transaction commits."""

    applied_index: int
    applied_view: int
    active_epoch: int
    token_count: int
    # The batch's token rows, and (rows so far, entry index) after each tokenize command.
    rows: list = field(default_factory=list)
    row_entries: list = field(default_factory=list)


def _as_rollback_journal_image(image: bytes) -> bytes:
    # Header bytes 18 and 19 select WAL or rollback-journal mode. SQLite loads
    # only rollback-journal images in memory, which is where a received
    # snapshot is validated; the store switches the file back to WAL on open.
    return image[:18] + b"\x01\x01" + image[20:]


def _validated_image(data: bytes, index: int, view: int) -> bytes:
    if type(data) is not bytes or len(data) < SQLITE_HEADER_BYTES:
        raise SnapshotRejected("snapshot image is too short to be a database")
    if type(index) is not int or type(view) is not int:
        raise SnapshotRejected("snapshot index and view must be integers")
    image = _as_rollback_journal_image(data)
    connection = sqlite3.connect(":memory:")
    try:
        connection.execute("PRAGMA trusted_schema = OFF")
        connection.deserialize(image)
        if connection.execute("PRAGMA integrity_check").fetchall() != [("ok",)]:
            raise SnapshotRejected("snapshot image fails the integrity check")
        _check_store_schema(connection, SnapshotRejected)
        meta = connection.execute("SELECT applied_index, applied_view, token_count FROM meta").fetchone()
        if meta[:2] != (index, view):
            raise SnapshotRejected("snapshot image is not at the announced index and view")
        if meta[2] != connection.execute("SELECT count(*) FROM tokens").fetchone()[0]:
            raise SnapshotRejected("snapshot image token count is inconsistent")
        if connection.execute("SELECT count(*) FROM epochs WHERE state = 'active'").fetchone()[0] > 1:
            raise SnapshotRejected("snapshot image has more than one active epoch")
    except sqlite3.DatabaseError:
        raise SnapshotRejected("snapshot image is not a valid database") from None
    finally:
        connection.close()
    return image
