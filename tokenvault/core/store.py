"""The vault state machine: committed log entries applied to RocksDB (``rocksdict``).

Described elsewhere: the store directory, ``CURRENT`` and its generations ("Layout") in
tokenvault.core.store_files; the keys and rows ("Keys") in tokenvault.core.store_layout; the batch
overlay and the lifecycle rows ("Expiry") in tokenvault.core.store_lifecycle.

Atomicity. One ``apply_batch`` call is ONE RocksDB WriteBatch, meta included,
so a crash leaves the store at the end of some batch. While a batch is applied
its writes sit in a batch-local overlay (``Batch``) that later commands of the
same batch read through: idempotency records added or deleted, epochs, the age
index for the purge, token rows. Token rows of plain tokenizes are checked
with one multi-get when the batch ends or when a later command of the batch
reads or deletes token rows (``add_tokens``: a delete, a purge, a tokenize
with options), and written into the overlay, which is written with the rest. A
delete removes a mapping's row with its ``L`` row and ``X`` index key. Any
exception (InsertOnceViolation, a gap, a malformed command) discards the
overlay: nothing of the batch reaches the database and the in-memory fields
are untouched, so memory and disk stay equal.

Durability. Writes go through RocksDB's WAL with ``sync=False``: a process
crash loses nothing written, a power failure may lose the latest batches (like
SQLite's ``synchronous=NORMAL``). That is safe because the replication
write-ahead log (tokenvault.core.wal) already made every entry durable before it was
applied: the store only promises what ``checkpoint`` returned, and the node
deletes log segments only up to that index. ``checkpoint`` fsyncs RocksDB's WAL;
there is nothing to commit later.

Snapshots. ``create_checkpoint`` writes a RocksDB checkpoint (hard links to the
immutable table files, safe from a worker thread while the event loop keeps
applying); ``verify_checkpoint``, ``prepare_install``, ``commit_install`` and
``abort_install`` check and install a received one without ever holding the
whole state in memory or scanning it.

Apply is deterministic: outcomes depend only on the entries and the state, and
idempotency records expire by the commands' own timestamps with a fixed amount
of purge work per command (oldest first, then by principal and key), so every
node that applies the same entries holds byte-identical state, whatever its
batch boundaries. ``retention_ms`` must therefore be the same on every node.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Concatenate, Literal, NamedTuple, ParamSpec, TypeVar

from rocksdict import (
    BottommostLevelCompaction,
    CompactOptions,
    Cache,
    Checkpoint,
    Rdict,
    WriteBatch,
    WriteOptions,
)

from protocol import Entry, EntryKind, Membership
from tokenvault.audit_chain import record_document
from tokenvault.auth import RuntimeKey
from tokenvault.core.commands import (AuditCommand, AuditTrimCommand, Command, CreateApiKeyCommand,
                                      DeleteTokensCommand, DestroyEpochCommand, PurgeExpiredCommand,
                                      RevokeApiKeyCommand, RotateEpochCommand, TokenizeCommand, decode_command,
                                      is_digit_string)
from tokenvault.core.store_files import (CREATING_SUFFIX, GENERATION_PREFIX, LoadedState, PreparedInstall,
                                         RetiredGeneration, create_store, fsync_tree, generation_name, install_step,
                                         read_current, read_state, remove_leftovers, remove_tree, verify_checkpoint,
                                         wal_file_bytes, wal_file_names, write_current)
from tokenvault.core.store_layout import (
    ACTIVE, AGE, AGE_END, AGE_HEADER_BYTES, API_KEY, AUDIT, AUDIT_ANCHOR_KEY, AUDIT_END, AUDIT_HEAD_KEY, AUDIT_KIND,
    BLOCK_CACHE_BYTES, CREATE_KEY_KIND, DESTROYED, EXPIRY, EXPIRY_END, FORMAT_TOKEN_END, IDEMPOTENCY, LIFE,
    MAX_API_KEYS, MAX_AUDIT_PAGE, MAX_STORED_EPOCH, MAX_TOKEN_PAGE, MEMBERSHIP_KEY, META_KEY, NO_RECORDS, RETIRED,
    REVOKE_KEY_KIND, ROTATE_KIND, TOKEN, TOKENIZE_KIND, U64, UNKNOWN_NODE, VERIFY_CACHE_BYTES,
    ApplyResult, EpochRecord, IdempotencyRecord, Outcome, SnapshotRejected, StoreCorruption, StoreDamaged, StoreError,
    age_created_at, age_key, api_key_value, bottom_files, bounded, damage, database_options, decode_epoch,
    decode_life, decode_meta, encode_meta, epoch_key, first_key, format_token_key, identity_key,
    json_bytes, life_rows, lookup_format_tokens, lookup_opaque, metadata_rows, open_database, pack, range_items,
    files_overlapped, range_keys, read_epochs, reason, shred_ranges, token_key, unpack, whole_key_space_ranges)
from tokenvault.core.store_lifecycle import (Batch, add_tokens, append_audit, apply_audit_trim, apply_delete,
                                             apply_destroy, apply_mappings, apply_purge_expired)
from tokenvault.smallfiles import fsync_directory

DEFAULT_RETENTION_MS = 48 * 3600 * 1000
# What VaultStore.flush_memtable found: a flush it started, one already running, or none (None).
FlushState = Literal["started", "running"] | None
# Expired idempotency records deleted per applied command at most. Each command
# adds at most one record, so purging up to 8 per command always keeps up.
PURGE_LIMIT_PER_COMMAND = 8


_Arguments = ParamSpec("_Arguments")
_Result = TypeVar("_Result")


def _stops_when_damaged(method: Callable[Concatenate["VaultStore", _Arguments], _Result]
                        ) -> Callable[Concatenate["VaultStore", _Arguments], _Result]:
    """RocksDB's report of a damaged file, met by this apply or read, becomes a StoreDamaged naming the
    file and the offset, and ``on_damage`` hears of it (the node stops: docs/failure-modes.md). A damaged
    block is never read as data, so no answer is wrong; but a node that went on would fail every request
    that meets the block, and a retry there would not help."""
    @functools.wraps(method)
    def checked(store: "VaultStore", /, *arguments: _Arguments.args, **keywords: _Arguments.kwargs) -> _Result:
        try:
            return method(store, *arguments, **keywords)
        except Exception as failure:
            damaged = damage(failure)
            if damaged is None:
                raise
            if store.on_damage is not None:
                store.on_damage(damaged)
            raise damaged from None
    return checked


# ---------------------------------------------------------------- the store
class ShredPlan(NamedTuple):
    """What ``VaultStore.prepare_shred`` planned: the ranges to compact, in key order, how many of the
    bottom level's table files they overlap (each one is rewritten), and how many there are (0: every
    file is in level 0)."""

    ranges: list[tuple[bytes | None, bytes | None]]
    overlapped: int
    bottom_files: int


class VaultStore:
    """The applied state of one node.

    Apply, reads, commit_install and close belong to one thread (the event
    loop). checkpoint, create_checkpoint, verify_checkpoint, prepare_install,
    abort_install and RetiredGeneration.close may run in worker threads meanwhile.
    """

    def __init__(self, path: Path, generation: str, database: Rdict, meta: tuple[int, int, int],
                 cache: Cache, retention_ms: int, purge_limit_per_command: int) -> None:
        self._path = path
        self._generation = generation
        self._db = database
        self._cache = cache
        self._options = database_options(cache)
        self._write_options = WriteOptions()  # WAL on, sync off: see the module docstring
        self._retention_ms = retention_ms
        self._purge_limit_per_command = purge_limit_per_command
        self._age_read_options = bounded(AGE, AGE_END)
        self._checkpoint_lock = threading.Lock()
        self._install_lock = threading.Lock()
        self._pending: PreparedInstall | None = None
        self._closed = False
        # Called after the runtime key table changed (an applied create or revoke, an installed
        # snapshot): the node's HTTP workers hold a copy of it (tokenvault.api.workers).
        self.on_api_keys_changed: Callable[[], None] | None = None
        # Called with the StoreDamaged of a damaged file met by an apply or a read (_stops_when_damaged).
        self.on_damage: Callable[[StoreDamaged], None] | None = None
        self._set_state(read_state(database, meta, StoreCorruption))

    def _set_state(self, state: LoadedState) -> None:
        """Take ``state`` (read_state of the live generation) as the in-memory state: assignments only, then
        on_api_keys_changed; every read that can fail was made by read_state."""
        self._applied_index, self._applied_view, self._token_count = state.meta
        self._active_epoch = state.active_epoch
        self._api_keys = state.api_keys
        self._audit_seq, self._audit_head = state.audit_head
        self._audit_anchor = state.audit_anchor
        self._membership = state.membership
        self._idempotency_floor_ms = state.idempotency_floor_ms
        # Every age key at or below this one is deleted: the purge seeks past it
        # instead of stepping over the tombstones of earlier purges. Not persisted.
        self._purge_resume_key: bytes | None = None
        # Whether any mapping may have a life row: reads skip the expiry check while none can.
        self._has_life = state.has_life
        # The expiry index's counterpart of _purge_resume_key.
        self._expiry_resume_key: bytes | None = None
        self._keys_changed()

    @classmethod
    def open(cls, path: Path, *, retention_ms: int = DEFAULT_RETENTION_MS,
             purge_limit_per_command: int = PURGE_LIMIT_PER_COMMAND) -> "VaultStore":
        """Open or create the store directory ``path``; raises StoreCorruption for a foreign or damaged one.

        ``retention_ms`` and ``purge_limit_per_command`` shape the replicated
        state, so every node of a cluster must use the same values.
        """
        if type(retention_ms) is not int or retention_ms < 0:
            raise ValueError("retention_ms must be a non-negative integer")
        if type(purge_limit_per_command) is not int or purge_limit_per_command < 1:
            raise ValueError("purge_limit_per_command must be a positive integer")
        path = Path(path)
        cache = Cache(BLOCK_CACHE_BYTES)
        remove_tree(path.with_name(path.name + CREATING_SUFFIX))  # an interrupted creation
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
        if not path.exists() and not path.is_symlink():
            create_store(path, cache)
        if path.is_symlink() or not path.is_dir():
            raise StoreCorruption(f"{path} is not a store directory")
        generation = read_current(path)
        # Opened first: RocksDB's lock on the live generation keeps a second
        # process from deleting what the first one is installing.
        database, meta = open_database(path / generation, database_options(cache), StoreCorruption)
        try:
            remove_leftovers(path, generation)
            store = cls(path, generation, database, meta, cache, retention_ms, purge_limit_per_command)
        except Exception as error:
            database.close()
            if isinstance(error, (StoreError, OSError)):
                raise
            raise StoreCorruption(f"{path / generation} cannot be read as a TokenVault store: "
                                  f"{reason(error)}") from None
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

    @property
    def path(self) -> Path:
        return self._path

    def membership(self) -> Membership | None:
        """The configuration of the last membership change applied; None before the first one."""
        return self._membership

    def active_epoch(self) -> int:
        """The active epoch, 0 before the first rotation."""
        return self._active_epoch

    def token_count(self) -> int:
        return self._token_count

    # ------------------------------------------------------------ apply
    @_stops_when_damaged
    def apply_batch(self, entries: Sequence[Entry]) -> list[ApplyResult]:
        """Apply committed entries as one atomic write; returns one result per applied command.

        Entries at or below the applied index are skipped (a replay after a
        restart); the rest must follow it without gaps. NOOP entries only move
        the applied index. On any error nothing of the batch is applied.
        """
        if not entries:
            return []
        batch = Batch(self._db, self._applied_index, self._applied_view, self._active_epoch,
                      self._token_count, self._idempotency_floor_ms, self._purge_resume_key)
        batch.audit_seq, batch.audit_head = self._audit_seq, self._audit_head
        batch.audit_anchor = self._audit_anchor
        batch.has_life, batch.expiry_resume = self._has_life, self._expiry_resume_key
        results: list[ApplyResult] = []
        membership = self._membership
        for entry in entries:
            if entry.index <= batch.applied_index:
                continue
            if entry.index != batch.applied_index + 1:
                raise ValueError(f"entry {entry.index} does not follow applied index {batch.applied_index}")
            if entry.kind == EntryKind.COMMAND:
                results.append(self._apply_command(entry.index, decode_command(entry.payload), batch))
            elif entry.kind == EntryKind.CONFIG:
                membership = Membership.decode(entry.payload)  # the core checked it; a bad one stops the batch
                batch.writes[MEMBERSHIP_KEY] = entry.payload
            batch.applied_index, batch.applied_view = entry.index, entry.view
        if batch.applied_index == self._applied_index:
            return results
        add_tokens(batch)
        write = WriteBatch(raw_mode=True)
        for key, value in batch.writes.items():
            if value is None:
                write.delete(key)
            else:
                write.put(key, value)
        if batch.audit_seq != self._audit_seq:
            write.put(AUDIT_HEAD_KEY, pack([batch.audit_seq, batch.audit_head]))
        if batch.audit_anchor != self._audit_anchor:
            # After the puts: records of this batch up to the anchor go too.
            write.delete_range(AUDIT, AUDIT + U64.pack(batch.audit_anchor[0] + 1))
            write.put(AUDIT_ANCHOR_KEY, pack(list(batch.audit_anchor)))
        write.put(META_KEY, encode_meta(batch.applied_index, batch.applied_view, batch.token_count))
        self._db.write(write, self._write_options)
        self._audit_seq, self._audit_head = batch.audit_seq, batch.audit_head
        self._audit_anchor = batch.audit_anchor
        self._applied_index, self._applied_view = batch.applied_index, batch.applied_view
        self._membership = membership
        self._active_epoch, self._token_count = batch.active_epoch, batch.token_count
        self._idempotency_floor_ms, self._purge_resume_key = batch.floor_ms, batch.resume_key
        self._has_life, self._expiry_resume_key = batch.has_life, batch.expiry_resume
        if batch.api_keys is not None:
            self._api_keys = batch.api_keys
            self._keys_changed()
        return results

    def _keys_changed(self) -> None:
        if self.on_api_keys_changed is not None:
            self.on_api_keys_changed()

    def _apply_command(self, index: int, command: Command, batch: Batch) -> ApplyResult:
        if type(command) is AuditCommand:
            for record in command.records:
                append_audit(record.fields(), batch)
            return ApplyResult(index, Outcome.OK, 200, None, AUDIT_KIND, 0, len(command.records))
        if type(command) is CreateApiKeyCommand:
            return self._apply_create_key(index, command, batch)
        if type(command) is RevokeApiKeyCommand:
            return self._apply_revoke_key(index, command, batch)
        if type(command) is TokenizeCommand:
            if command.epoch != batch.active_epoch:
                return ApplyResult(index, Outcome.EPOCH_MISMATCH, None, None)
            return self._apply_tokenize(index, command, batch)
        if type(command) is PurgeExpiredCommand:
            return apply_purge_expired(index, command, batch)
        if type(command) is DeleteTokensCommand:
            return apply_delete(index, command, batch)
        if type(command) is DestroyEpochCommand:
            return apply_destroy(index, command, batch)
        if type(command) is AuditTrimCommand:
            return apply_audit_trim(index, command, batch)
        assert type(command) is RotateEpochCommand  # the one kind left
        if command.epoch != batch.active_epoch + 1:
            return ApplyResult(index, Outcome.STALE_EPOCH, None, None)
        return self._apply_rotate(index, command, batch)

    def _apply_tokenize(self, index: int, command: TokenizeCommand, batch: Batch) -> ApplyResult:
        duplicate = self._existing_response(index, command.principal, command.idempotency_key,
                                            command.issued_at_ms, batch)
        if duplicate is not None:
            return duplicate
        if command.extended or batch.has_life:
            # Formats, expiry and metadata read and write rows through the overlay at once.
            collision = apply_mappings(index, command, batch)
            if collision is not None:
                return collision
        else:
            # Token rows are checked and written once for the whole batch (add_tokens):
            # nothing reads them before, and a failure drops the whole batch.
            batch.tokenized.append((index, command.epoch, command.items))
        response = None
        if command.idempotency_key is not None:
            # Only a keyed request can be replayed, so only then is the body built and kept.
            response = json_bytes({"epoch": command.epoch, "tokens": [token for token, _ in command.items]})
            self._record_idempotency(command.principal, command.idempotency_key, TOKENIZE_KIND,
                                     command.fingerprint, 200, response, command.issued_at_ms, batch)
        return ApplyResult(index, Outcome.OK, 200, response, TOKENIZE_KIND, command.epoch, len(command.items),
                           sets_metadata=command.metadata is not None)

    def _apply_rotate(self, index: int, command: RotateEpochCommand, batch: Batch) -> ApplyResult:
        duplicate = self._existing_response(index, command.principal, command.idempotency_key,
                                            command.created_at_ms, batch)
        if duplicate is not None:
            return duplicate
        if command.epoch > MAX_STORED_EPOCH:
            raise StoreError(f"entry {index} rotates past the largest epoch the store can hold")
        if batch.active_epoch:
            active_key = epoch_key(batch.active_epoch)
            value = batch.get(active_key)
            if value is None:
                raise StoreCorruption("the active epoch's record is missing")
            record = decode_epoch(active_key, value, StoreCorruption)
            batch.put(active_key, pack([record.wrapped_secret, record.created_at_ms, RETIRED]))
        batch.put(epoch_key(command.epoch), pack([command.wrapped_secret, command.created_at_ms, ACTIVE]))
        batch.active_epoch = command.epoch
        response = json_bytes({"epoch": command.epoch})
        self._record_idempotency(command.principal, command.idempotency_key, ROTATE_KIND, command.fingerprint,
                                 201, response, command.created_at_ms, batch)
        actor = command.actor
        # Entries written before the audit trail carry no actor: their principal still names the key.
        name = actor.name if actor.name is not None or actor.key_id is not None else command.principal
        append_audit([command.created_at_ms, actor.node or UNKNOWN_NODE, name, actor.key_id,
                      "epoch.rotate", 0, 0, actor.request_id, str(command.epoch)], batch)
        return ApplyResult(index, Outcome.OK, 201, response, ROTATE_KIND, command.epoch, 0)

    def _apply_create_key(self, index: int, command: CreateApiKeyCommand, batch: Batch) -> ApplyResult:
        keys = batch.keys_for_change(self._api_keys)
        if command.key_id in keys:
            return ApplyResult(index, Outcome.KEY_EXISTS, None, None)
        if len(keys) >= MAX_API_KEYS:
            return ApplyResult(index, Outcome.KEY_LIMIT, None, None)
        actor = command.actor
        created_by = actor.key_id if actor.key_id is not None else (actor.name or "")
        entry = RuntimeKey(command.key_id, command.name, frozenset(command.scopes), command.salt, command.digest,
                           command.created_at_ms, created_by)
        keys[command.key_id] = entry
        batch.put(API_KEY + command.key_id.encode("ascii"), api_key_value(entry))
        append_audit([command.created_at_ms, actor.node or UNKNOWN_NODE, actor.name, actor.key_id,
                      "key.create", 1, 1, actor.request_id, command.key_id], batch)
        return ApplyResult(index, Outcome.OK, 201, None, CREATE_KEY_KIND, 0, 1)

    def _apply_revoke_key(self, index: int, command: RevokeApiKeyCommand, batch: Batch) -> ApplyResult:
        keys = batch.keys_for_change(self._api_keys)
        if command.key_id not in keys:
            return ApplyResult(index, Outcome.KEY_NOT_FOUND, None, None)
        del keys[command.key_id]
        batch.delete(API_KEY + command.key_id.encode("ascii"))
        actor = command.actor
        append_audit([command.revoked_at_ms, actor.node or UNKNOWN_NODE, actor.name, actor.key_id,
                      "key.revoke", 1, 1, actor.request_id, command.key_id], batch)
        return ApplyResult(index, Outcome.OK, 200, None, REVOKE_KEY_KIND, 0, 1)

    def _existing_response(self, index: int, principal: str | None, key: str | None, now_ms: int,
                           batch: Batch) -> ApplyResult | None:
        """Purge a bounded number of expired records, then find a live record for (principal, key)."""
        expired_before_ms = now_ms - self._retention_ms
        if expired_before_ms > batch.floor_ms:
            # Skipped when no record can have expired: the purge would delete
            # nothing, so skipping it leaves the same state on every node.
            self._purge(expired_before_ms, batch)
        if key is None:
            return None
        assert principal is not None  # decode_command refuses a key without a principal
        identity = identity_key(principal, key)
        value = batch.get(IDEMPOTENCY + identity)
        if value is None:
            return None
        _, _, status, response, created_at_ms = unpack(value)
        if created_at_ms < expired_before_ms:
            # Expired but not purged yet: it no longer answers; the new command takes its place.
            batch.delete(IDEMPOTENCY + identity)
            batch.delete_age(age_key(created_at_ms, identity))
            return None
        return ApplyResult(index, Outcome.DUPLICATE, status, response)

    def _purge(self, expired_before_ms: int, batch: Batch) -> None:
        """Delete up to purge_limit_per_command records older than the cut-off, oldest first.

        Order: created_at_ms, then principal, then key (the age index's byte
        order), so every node deletes the same records whatever its batches.
        """
        bound = AGE + U64.pack(expired_before_ms)
        keys = batch.first_age_keys(self._purge_limit_per_command + 1, self._age_read_options)
        taken = []
        for key in keys[:self._purge_limit_per_command]:
            if key >= bound:
                break
            taken.append(key)
        for key in taken:
            batch.delete_age(key)
            batch.delete(IDEMPOTENCY + key[AGE_HEADER_BYTES:])
        if taken:
            batch.resume_key = taken[-1]
        batch.floor_ms = age_created_at(keys[len(taken)]) if len(keys) > len(taken) else NO_RECORDS

    def _record_idempotency(self, principal: str | None, key: str | None, kind: str, fingerprint: bytes | None,
                            status: int, response: bytes, created_at_ms: int, batch: Batch) -> None:
        if key is None:
            return
        assert principal is not None  # decode_command refuses a key without a principal
        identity = identity_key(principal, key)
        batch.put(IDEMPOTENCY + identity, pack([kind, fingerprint, status, response, created_at_ms]))
        batch.put_age(age_key(created_at_ms, identity))
        batch.floor_ms = min(batch.floor_ms, created_at_ms)

    # ------------------------------------------------------------ reads
    @_stops_when_damaged
    def lookup(self, tokens: Sequence[str], now_ms: int | None = None) -> dict[str, bytes]:
        """Ciphertexts of the known opaque tokens among ``tokens`` (unknown and expired ones are absent).

        ``now_ms`` is the read's clock (default: this machine's); a mapping whose
        expiry is at or before it is left out. One multi-get, two with expiries."""
        return lookup_opaque(self._db, tokens, now_ms, has_life=self._has_life)

    @_stops_when_damaged
    def lookup_format(self, epoch: int, tokens: Sequence[str], now_ms: int | None = None) -> dict[str, bytes]:
        """Ciphertexts of the live card and digits tokens of ``epoch`` among ``tokens`` (as ``lookup``)."""
        return lookup_format_tokens(self._db, epoch, tokens, now_ms, has_life=self._has_life)

    @_stops_when_damaged
    def metadata(self, epoch: int | None, tokens: Sequence[str]) -> dict[str, bytes]:
        """The metadata ciphertexts of the mappings among ``tokens`` that have metadata: opaque tokens
        when ``epoch`` is None, else card and digits tokens of ``epoch``. Expiry is not checked here:
        ask only for tokens ``lookup`` or ``lookup_format`` found."""
        return metadata_rows(self._db, epoch, tokens, has_life=self._has_life)

    @_stops_when_damaged
    def lives(self, epoch: int | None, tokens: Sequence[str]) -> dict[str, tuple[int | None, bytes | None]]:
        """``life`` of many mappings in one multi-get; those without a life row are left out."""
        return life_rows(self._db, epoch, tokens, has_life=self._has_life)

    @_stops_when_damaged
    def next_expiry_ms(self) -> int | None:
        """The earliest expiry time of any stored mapping (a seek on the expiry index), None when none."""
        start = EXPIRY if self._expiry_resume_key is None else self._expiry_resume_key + b"\x00"
        key = first_key(self._db, start, EXPIRY_END)
        return None if key is None else U64.unpack_from(key, 1)[0]

    @_stops_when_damaged
    def life(self, token: str, epoch: int | None = None) -> tuple[int | None, bytes | None]:
        """(expires_at_ms, metadata ciphertext) of a mapping as stored: an opaque token's when ``epoch``
        is None, else a format token's of ``epoch``; (None, None) without a life row."""
        row_key = token_key(token) if epoch is None else format_token_key(epoch, token)
        return decode_life(self._db.get(LIFE + row_key))

    @_stops_when_damaged
    def epochs(self) -> list[EpochRecord]:
        return read_epochs(self._db, StoreCorruption)

    def wrapped_secrets(self) -> list[tuple[int, bytes]]:
        """(epoch, wrapped secret) of every epoch not destroyed: what a key ring is built from (a
        destroyed epoch keeps its record, with no secret left to unwrap)."""
        return [(record.epoch, record.wrapped_secret) for record in self.epochs() if record.state != DESTROYED]

    @_stops_when_damaged
    def epoch_tokens(self, epoch: int, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` tokens issued in ``epoch`` after the token ``after`` (or from the first): its opaque
        tokens in key order, then its card and digits tokens in key order (a digit string as ``after``
        continues among those). At most two bounded seeks and scans. ``limit`` may be one past a page
        (MAX_TOKEN_PAGE + 1): a caller that asks for one token more learns whether its page is the last."""
        if type(epoch) is not int or not 1 <= epoch <= MAX_STORED_EPOCH or not 1 <= limit <= MAX_TOKEN_PAGE + 1:
            raise ValueError("epoch or limit out of range")
        prefix = token_key(f"tv{epoch}_")
        opaque_end = prefix[:-1] + bytes([prefix[-1] + 1])
        format_start = format_token_key(epoch, "")
        format_end = format_token_key(epoch + 1, "") if epoch < MAX_STORED_EPOCH else FORMAT_TOKEN_END
        if after is None:
            ranges = [(prefix, opaque_end), (format_start, format_end)]
        elif is_digit_string(after):  # a card or digits token: its group is the second
            ranges = [(max(format_start, format_token_key(epoch, after) + b"\x00"), format_end)]
        else:
            ranges = [(max(prefix, token_key(after) + b"\x00"), opaque_end), (format_start, format_end)]
        tokens: list[str] = []
        for start, end in ranges:
            if start >= end:
                continue
            skip = 1 if start[:1] == TOKEN else len(format_start)
            for key in range_keys(self._db, start, end):
                tokens.append(key[skip:].decode("ascii"))
                if len(tokens) >= limit:
                    return tokens
        return tokens

    def shred(self, keys: Iterable[bytes] | None) -> None:
        """Drop every older version of ``keys`` (rows deleted or rewritten) from RocksDB's files; None:
        of every key (the whole store is rewritten). ``prepare_shred``, then ``compact_for_shred`` of each
        range, then ``finish_shred``, at once; the node's shredder rests between the ranges instead."""
        for begin, end in self.prepare_shred(keys).ranges:
            self.compact_for_shred(begin, end)
        self.finish_shred()

    def prepare_shred(self, keys: Iterable[bytes] | None) -> ShredPlan:
        """The first step of a shred: flush the memtable (RocksDB then deletes the WAL files that held
        the old versions) and plan the key ranges to compact down to the bottom level, where a
        tombstone and what it covers are dropped together: those that hold ``keys`` (``shred_ranges``),
        or, for None, the whole key space a bottom file at a time (``whole_key_space_ranges``), with how
        many bottom files they overlap (the shredder sweeps instead of a pass that would rewrite most of
        them). May run in a worker thread."""
        with self._checkpoint_lock:
            if self._closed:
                raise StoreError("the store is closed")
            database = self._db
            database.flush()
            files = bottom_files(database)
        if keys is None:
            return ShredPlan(whole_key_space_ranges(files), len(files), len(files))
        ranges: list[tuple[bytes | None, bytes | None]] = list(shred_ranges(keys, files))
        return ShredPlan(ranges, files_overlapped(ranges, files), len(files))

    def flush_for_shred(self) -> None:
        """A sweep's flush before one of its ranges (``prepare_shred`` flushes before the first): the
        tombstones of every delete applied so far reach the table files, where the compactions after it
        drop them with what they cover. May run in a worker thread."""
        with self._checkpoint_lock:
            if self._closed:
                raise StoreError("the store is closed")
            self._db.flush()

    def compact_for_shred(self, begin: bytes | None, end: bytes | None) -> None:
        """Compact one range of ``prepare_shred`` down to the bottom level. Costs the bottom-level table
        files the range overlaps and what the flushed level-0 file overlaps in the levels between: it
        grows with the store (docs/performance.md, "What a shred pass costs"). May run in a worker
        thread; between two calls the store serves and checkpoints as usual (the ranges are keys, so they
        hold for a generation installed meanwhile too)."""
        with self._checkpoint_lock:
            if self._closed:
                raise StoreError("the store is closed")
            options = CompactOptions()
            options.set_bottommost_level_compaction(BottommostLevelCompaction.force())
            self._db.compact_range(begin, end, options)

    def finish_shred(self) -> None:
        """The last step of a shred: RocksDB's WAL synced, so that what the compactions wrote is durable."""
        with self._checkpoint_lock:
            if self._closed:
                raise StoreError("the store is closed")
            self._db.flush_wal(True)

    def api_key(self, key_id: str) -> RuntimeKey | None:
        """The runtime API key with this public id, from memory (authentication calls this per request)."""
        return self._api_keys.get(key_id)

    def api_keys(self) -> list[RuntimeKey]:
        """Every runtime API key, by id."""
        return [self._api_keys[key_id] for key_id in sorted(self._api_keys)]

    @property
    def audit_seq(self) -> int:
        """The sequence number of the newest audit record (0 when there is none)."""
        return self._audit_seq

    @property
    def audit_anchor(self) -> tuple[int, bytes]:
        """(seq, hash) of the last record an audit trim dropped ((0, 32 zero bytes) when none was): the
        trail's records start after it and the first links to its hash."""
        return self._audit_anchor

    @_stops_when_damaged
    def audit_page(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` audit records with seq > ``after``, in order, as JSON-ready documents.

        A record that cannot be decoded is returned as ``{"seq": n, "malformed": true}`` so that a
        verifier reports it instead of the node failing the request."""
        if not 0 <= after < 2**63 or not 1 <= limit <= MAX_AUDIT_PAGE:
            raise ValueError("after or limit out of range")
        start = AUDIT + U64.pack(after + 1)
        page: list[dict[str, Any]] = []
        for key, value in range_items(self._db, start, AUDIT_END):
            seq = U64.unpack_from(key, 1)[0] if len(key) == 1 + U64.size else after + len(page) + 1
            try:
                decoded = unpack(value)
                fields, previous, digest = decoded[1:-2], decoded[-2], decoded[-1]
                if type(decoded) is not list or len(fields) != 9 or decoded[0] != seq:
                    raise ValueError
                page.append(record_document(seq, fields, previous, digest))
            except Exception:
                page.append({"seq": seq, "malformed": True})
            if len(page) >= limit:
                break
        return page

    @_stops_when_damaged
    def idempotency_get(self, principal: str, key: str) -> IdempotencyRecord | None:
        value = self._db.get(IDEMPOTENCY + identity_key(principal, key))
        if value is None:
            return None
        kind, fingerprint, status, response, created_at_ms = unpack(value)
        return IdempotencyRecord(principal, key, kind, fingerprint, status, response, created_at_ms)

    # ------------------------------------------------------------ durability
    def forget_membership(self) -> None:
        """Drop the recorded configuration, durably: a restore from a backup builds a new cluster, whose
        configuration is its node configs' static one, not the one of the cluster the backup came from."""
        write = WriteBatch(raw_mode=True)
        write.delete(MEMBERSHIP_KEY)
        self._db.write(write, self._write_options)
        self._membership = None
        self.checkpoint()

    def flush_memtable(self, min_bytes: int | None) -> FlushState:
        """Start a flush of the memtable when its WAL file holds at least ``min_bytes`` (None: start none):
        whether one is now under way, ``"started"`` here or ``"running"`` already, or None.

        Does not wait for the flush: RocksDB writes the table file in its background threads. For the
        workers' views (tokenvault.core.store_reader), which replay the live WAL file on every catch-up
        and open only what a flushed file holds. Safe from a worker thread."""
        with self._checkpoint_lock:
            if self._closed:
                raise StoreError("the store is closed")
            database = self._db
            try:
                if (database.property_int_value("rocksdb.num-immutable-mem-table") or 0) > 0:
                    return "running"
                if min_bytes is None:
                    return None
                directory = self._path / self._generation
                if wal_file_bytes(directory, wal_file_names(directory)) < min_bytes:
                    return None
                database.flush(False)
            except Exception as failure:
                raise StoreError(f"the memtable could not be flushed: {reason(failure)}") from None
        return "started"

    def table_bytes(self) -> int:
        """The bytes of the live generation's table files (RocksDB's total-sst-files-size: files a
        compaction has replaced count until RocksDB deletes them)."""
        if self._closed:
            raise StoreError("the store is closed")
        return self._db.property_int_value("rocksdb.total-sst-files-size") or 0

    def checkpoint(self) -> int:
        """Make the applied state durable (fsync RocksDB's WAL); returns the applied index now on disk for sure.

        May run in a worker thread while the apply thread goes on: the index is
        read before the fsync, so every batch up to it was in the WAL by then.
        """
        with self._checkpoint_lock:  # a replaced generation is not closed meanwhile
            if self._closed:
                raise StoreError("the store is closed")
            index = self._applied_index
            self._db.flush_wal(True)
        return index

    # ------------------------------------------------------------ snapshots
    def create_checkpoint(self, directory: Path) -> tuple[int, int]:
        """Write a consistent copy of the store into ``directory`` (which must not exist yet).

        Returns (applied_index, applied_view) read from the copy itself: applies
        may go on meanwhile. Safe from a worker thread; the memtable is flushed
        first with the GIL released, so the checkpoint's own flush is short.
        RocksDB's own failures raise StoreError.
        """
        directory = Path(directory)
        if directory.exists() or directory.is_symlink():
            raise FileExistsError(f"{directory} exists already")
        with self._checkpoint_lock:
            if self._closed:
                raise StoreError("the store is closed")
            database = self._db
            try:  # RocksDB's errors (ENOSPC, EMFILE: "IO error: ...") come as a plain Exception
                database.flush()
                Checkpoint(database).create_checkpoint(str(directory))
            except Exception as failure:
                shutil.rmtree(directory, ignore_errors=True)  # what RocksDB wrote of it before failing
                raise StoreError(f"the checkpoint could not be taken: {reason(failure)}") from None
        try:
            options = database_options(Cache(VERIFY_CACHE_BYTES))
            copy, (index, view, _) = open_database(directory, options, StoreError, read_only=True)
            copy.close()
        except BaseException:
            # Each failed attempt would otherwise leave a checkpoint (hard links to every table file)
            # for each retry of the snapshot it was for.
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return index, view

    @staticmethod
    def verify_checkpoint(directory: Path, index: int, view: int) -> int:
        """Check a received checkpoint without a full scan and return its token count (opaque tokens); raises
        SnapshotRejected, never anything else (tokenvault.core.store_files.verify_checkpoint)."""
        return verify_checkpoint(directory, index, view)

    def prepare_install(self, staged: Path, index: int, view: int) -> PreparedInstall:
        """Verify ``staged`` and move it into the store as the next generation, open; CURRENT is not switched.

        Callable from a worker thread. ``staged`` must be on the store's
        filesystem. If verification fails it is left where it is; after the
        move, any failure deletes it. One install may be prepared at a time.
        Refusals (a bad checkpoint, another install prepared, a closed store)
        raise SnapshotRejected; I/O errors raise OSError.
        """
        staged = Path(staged)
        with self._install_lock:
            if self._closed:
                raise SnapshotRejected("the store is closed")
            if self._pending is not None:
                raise SnapshotRejected("another install is prepared already")
            placeholder = PreparedInstall(index, view, staged)
            self._pending = placeholder
        target: Path | None = None
        try:
            self.verify_checkpoint(staged, index, view)
            install_step("verified")
            target = self._path / generation_name(int(self._generation[len(GENERATION_PREFIX):]) + 1)
            if target.exists() or target.is_symlink():
                remove_tree(target)
            fsync_tree(staged)
            os.rename(staged, target)
            fsync_directory(self._path)
            fsync_directory(staged.parent)
            install_step("renamed")
            database, meta = open_database(target, self._options, SnapshotRejected)
            if meta[:2] != (index, view):
                database.close()
                raise SnapshotRejected("checkpoint is not at the announced index and view")
            install_step("opened")
        except Exception:
            with self._install_lock:
                self._pending = None
            if target is not None and target.exists():
                remove_tree(target)
                fsync_directory(self._path)
            raise
        prepared = PreparedInstall(index, view, target, database)
        with self._install_lock:
            self._pending = prepared
        return prepared

    def commit_install(self, prepared: PreparedInstall) -> RetiredGeneration:
        """Make a prepared generation the live state (on the apply thread; a small, bounded amount of work).

        Reads the new generation's in-memory state (read_state), then switches
        CURRENT, swaps the database handle and takes that state. Returns the
        replaced generation: close it from a worker thread. A generation whose
        state cannot be read (prepare_install verified it, so only a checkpoint
        that escaped verification) raises SnapshotRejected before CURRENT
        moves: the store stays on its old generation, and the install stays
        prepared for abort_install.
        """
        with self._install_lock:
            if prepared is not self._pending or prepared._database is None:
                raise StoreError("this install is not the prepared one")
            if self._closed:
                raise StoreError("the store is closed")
            new_database = prepared._database
            try:
                state = read_state(new_database, decode_meta(new_database.get(META_KEY), SnapshotRejected),
                                   SnapshotRejected)
            except SnapshotRejected:
                raise
            except Exception as failure:  # RocksDB's own error (a damaged block of the new generation)
                raise SnapshotRejected(f"{prepared.directory.name} cannot be read: {reason(failure)}") from None
            write_current(self._path, prepared.directory.name)
            old_database, old_directory = self._db, self._path / self._generation
            self._db, self._generation = new_database, prepared.directory.name
            prepared._database = None
            self._pending = None
        install_step("handle_swapped")
        # Every file of the new generation was fsynced before the switch, so
        # the installed state is durable from here on.
        self._set_state(state)
        return RetiredGeneration(old_database, old_directory, self._checkpoint_lock)

    def abort_install(self, prepared: PreparedInstall) -> None:
        """Close and delete a prepared generation; the live state is untouched."""
        with self._install_lock:
            if prepared is not self._pending:
                return
            self._pending = None
            database, prepared._database = prepared._database, None
        if database is not None:
            database.close()
        remove_tree(prepared.directory)
        fsync_directory(self._path)

    def close(self) -> None:
        with self._install_lock:
            pending, self._pending = self._pending, None
        if pending is not None and pending._database is not None:
            pending._database.close()
            pending._database = None  # its directory goes on the next open
        with self._checkpoint_lock:
            if self._closed:
                return
            self._closed = True
            failure: Exception | None = None
            try:
                self._db.flush_wal(True)
            except Exception as error:  # a store that met a write error refuses more ("Writer has previous error")
                failure = error
            try:
                self._db.close()
            except Exception as error:
                failure = failure or error
            if failure is not None:
                # Its files hold what they held at the failed write: the next start recovers from them as after a
                # kill, and replays the rest from the replication log.
                raise StoreError(f"closing the store failed: {reason(failure)}") from None
