"""The apply of one batch of commands: the batch overlay (``Batch``) and the version-2 lifecycle rows (format
tokens ``F``, lives ``L``, the expiry index ``X``; delete, purge of expired mappings, destroy of an epoch).
tokenvault.core.store.VaultStore.apply_batch drives them; the key layout is in tokenvault.core.store_layout.

Expiry. An ``L`` row's expiry is an absolute time in ms computed by the
primary from the command's own issued_at_ms; apply compares it only with
timestamps carried in commands (a tokenize's issued_at_ms, a purge's now_ms),
never with this machine's clock. Reads (``lookup``, ``lookup_format``,
``metadata``) take a ``now_ms`` from their caller, the node's clock at read
time, and leave out mappings whose expiry is at or before it. Tokenizing a
value again (a tokenize command whose row already exists): when the mapping
has expired by the command's issued_at_ms it starts a new life with the
command's expiry and metadata; otherwise it keeps the later of the two
expiries (no expiry counts as the latest), and the command's metadata, if it
has any, replaces the stored one. So tokenizing again never shortens a life.
An item without an expiry leaves a live expiry as it is, except in a
re-tokenize's entry (``carries_lives``), where it makes the mapping permanent:
it carries over a mapping that never expires.
"""

from __future__ import annotations

import bisect
from typing import Any, TypeVar

from rocksdict import Rdict, RdictIter, ReadOptions

from tokenvault.audit_chain import GENESIS_HASH, chain_hash
from tokenvault.auth import RuntimeKey
from tokenvault.core.commands import (OPAQUE_FORMAT, AuditTrimCommand, DeleteTokensCommand, DestroyEpochCommand,
                                      PurgeExpiredCommand, TokenizeCommand)
from tokenvault.core.store_layout import (AGE, AUDIT, AUDIT_TRIM_KIND, DELETE_KIND, DESTROY_KIND, DESTROYED, EXPIRY,
                                          EXPIRY_END, EXPIRY_HEADER_BYTES, LIFE, MAX_STORED_EPOCH, NO_RECORDS,
                                          PURGE_KIND, TOKEN, U32, U64, UNKNOWN_NODE, ApplyResult, InsertOnceViolation,
                                          Outcome, StoreCorruption, bounded, decode_epoch, decode_life,
                                          delete_row_keys, epoch_key, expiry_index_key, format_token_key, json_bytes,
                                          multi_get, pack, token_key, unpack)

_Name = TypeVar("_Name")


class Batch:
    """What a batch changes, kept aside until it is written as one WriteBatch.

    ``writes`` is the overlay for epoch, idempotency and age keys (None: deleted);
    reads of those keys during the batch go through it. ``live_age`` holds the
    overlay's live age keys in order, so the purge can merge them with the database.
    """

    __slots__ = ("db", "applied_index", "applied_view", "active_epoch", "token_count", "floor_ms",
                 "resume_key", "writes", "live_age", "tokenized", "api_keys", "audit_seq", "audit_head",
                 "audit_anchor", "has_life", "expiry_resume")

    def __init__(self, db: Rdict, applied_index: int, applied_view: int, active_epoch: int, token_count: int,
                 floor_ms: int, resume_key: bytes | None) -> None:
        self.db = db
        self.applied_index = applied_index
        self.applied_view = applied_view
        self.active_epoch = active_epoch
        self.token_count = token_count
        self.floor_ms = floor_ms
        self.resume_key = resume_key
        self.writes: dict[bytes, bytes | None] = {}
        self.live_age: list[bytes] = []
        # (entry index, epoch, items) of each applied tokenize command.
        self.tokenized: list[tuple[int, int, tuple[tuple[str, bytes], ...]]] = []
        # A copy of the runtime key table made at the batch's first key change, else None.
        self.api_keys: dict[str, RuntimeKey] | None = None
        self.audit_seq = 0
        self.audit_head = GENESIS_HASH
        # (seq, hash) of the last record trimmed away (apply_audit_trim); the store drops every record up to it.
        self.audit_anchor: tuple[int, bytes] = (0, GENESIS_HASH)
        self.has_life = False
        self.expiry_resume: bytes | None = None

    def keys_for_change(self, current: dict[str, RuntimeKey]) -> dict[str, RuntimeKey]:
        """The batch's own copy of the key table: the live one changes only once the batch is written."""
        if self.api_keys is None:
            self.api_keys = dict(current)
        return self.api_keys

    def get(self, key: bytes) -> bytes | None:
        if key in self.writes:
            return self.writes[key]
        return self.db.get(key)

    def get_many(self, keys: dict[_Name, bytes]) -> dict[_Name, bytes]:
        """The values of ``keys`` (by name) as the batch sees them, absent ones left out; one multi-get."""
        writes = self.writes
        unread = [name for name, key in keys.items() if key not in writes]
        found: dict[_Name, bytes] = {}
        if unread:
            for name, value in zip(unread, multi_get(self.db, [keys[name] for name in unread])):
                if value is not None:
                    found[name] = value
        for name, key in keys.items():
            value = writes.get(key) if key in writes else None
            if value is not None:
                found[name] = value
        return found

    def first_keys(self, lower: bytes, upper: bytes, resume: bytes | None, count: int) -> list[bytes]:
        """The first ``count`` live keys in [lower, upper) as the batch sees them, after ``resume``.

        The overlay's keys of the range are collected by a pass over it: only
        the purge calls this, once per purge command."""
        start = lower if resume is None else max(lower, resume + b"\x00")
        added = sorted(key for key, value in self.writes.items()
                       if value is not None and start <= key < upper)
        iterator = self.db.iter(bounded(lower, upper))
        iterator.seek(start)
        return self._merged_keys(iterator, added, 0, count)

    def _merged_keys(self, iterator: RdictIter, added: list[bytes], position: int, count: int) -> list[bytes]:
        """The first ``count`` keys of the database (``iterator``, seeked to the start) merged in order
        with the overlay's live keys ``added[position:]`` (sorted); keys this batch wrote or deleted are
        taken from the overlay, never the database."""
        found: list[bytes] = []
        writes = self.writes
        while len(found) < count:
            while iterator.valid() and iterator.key() in writes:
                iterator.next()  # deleted or rewritten in this batch: the overlay decides
            stored = iterator.key() if iterator.valid() else None
            overlay = added[position] if position < len(added) else None
            if stored is not None and (overlay is None or stored < overlay):
                found.append(stored)
                iterator.next()
            elif overlay is not None:
                found.append(overlay)
                position += 1
            else:
                break
        return found

    def put(self, key: bytes, value: bytes) -> None:
        self.writes[key] = value

    def delete(self, key: bytes) -> None:
        self.writes[key] = None

    def put_age(self, key: bytes) -> None:
        self.writes[key] = b""
        position = bisect.bisect_left(self.live_age, key)
        if position == len(self.live_age) or self.live_age[position] != key:
            self.live_age.insert(position, key)
        if self.resume_key is not None and key <= self.resume_key:
            self.resume_key = None  # a live key below it: seek from the floor again

    def delete_age(self, key: bytes) -> None:
        self.writes[key] = None
        position = bisect.bisect_left(self.live_age, key)
        if position < len(self.live_age) and self.live_age[position] == key:
            del self.live_age[position]

    def first_age_keys(self, count: int, read_options: ReadOptions) -> list[bytes]:
        """The first ``count`` live age keys as the batch sees them (database shadowed by the overlay)."""
        start = AGE + U64.pack(min(self.floor_ms, NO_RECORDS - 1))
        if self.resume_key is not None:
            start = max(start, self.resume_key + b"\x00")
        iterator = self.db.iter(read_options)
        iterator.seek(start)
        return self._merged_keys(iterator, self.live_age, bisect.bisect_left(self.live_age, start), count)


def append_audit(fields: list[Any], batch: Batch) -> None:
    """The next record of the chain: sequence number and hash are a function of the log alone."""
    seq = batch.audit_seq + 1
    digest = chain_hash(batch.audit_head, seq, fields)
    batch.put(AUDIT + U64.pack(seq), pack([seq, *fields, batch.audit_head, digest]))
    batch.audit_seq, batch.audit_head = seq, digest


def add_tokens(batch: Batch) -> None:
    """Check the pending tokenized items with one multi-get and add the new rows to the overlay; an
    existing token keeps its value. Runs at the end of a batch and before any command that reads
    or deletes token rows, so those see every earlier command of the batch."""
    if not batch.tokenized:
        return
    keys: dict[str, bytes] = {}
    for _, _, items in batch.tokenized:
        for token, _ in items:
            if token not in keys:
                keys[token] = token_key(token)
    known = batch.get_many(keys)
    added = 0
    for index, epoch, items in batch.tokenized:
        prefix = U32.pack(epoch)
        for token, ciphertext in items:
            value = prefix + ciphertext
            existing = known.get(token)
            if existing is None:
                known[token] = value
                batch.put(keys[token], value)
                added += 1
            elif existing != value:
                # The message carries positions only: a token is no secret, but
                # there is no reason to spread it through logs either.
                raise InsertOnceViolation(
                    f"entry {index} maps an existing token to a different value; refusing to overwrite")
    batch.token_count += added
    batch.tokenized.clear()


def apply_mappings(index: int, command: TokenizeCommand, batch: Batch) -> ApplyResult | None:
    """Insert or renew the command's mappings through the overlay (module docstring, "Expiry");
    an ApplyResult when a format token is held by another value (nothing is written then)."""
    add_tokens(batch)
    format_rows = command.token_format != OPAQUE_FORMAT
    prefix = b"" if format_rows else U32.pack(command.epoch)
    rows: dict[bytes, tuple[bytes, str, list[int]]] = {}  # row key -> (row value, token, its items' positions)
    for position, (token, ciphertext) in enumerate(command.items):
        key = format_token_key(command.epoch, token) if format_rows else token_key(token)
        first = rows.setdefault(key, (prefix + ciphertext, token, []))
        if first[0] != prefix + ciphertext:
            raise InsertOnceViolation(f"entry {index} maps one token to two values; refusing it")
        first[2].append(position)
    existing = batch.get_many({key: key for key in rows})
    for key, (value, _, _) in rows.items():
        found = existing.get(key)
        if found is not None and found != value:
            if format_rows:
                return ApplyResult(index, Outcome.TOKEN_COLLISION, None, None)
            raise InsertOnceViolation(
                f"entry {index} maps an existing token to a different value; refusing to overwrite")
    lives = batch.get_many({key: LIFE + key for key in rows})
    now_ms = command.issued_at_ms
    for key, (value, _, positions) in rows.items():
        old = decode_life(lives.get(key))
        new = old
        stored = existing.get(key) is not None
        # The items of one token in order, each as an entry of its own would be applied: an entry that
        # merges requests (tokenvault/api/coalesce.py) leaves each mapping as separate entries would.
        for position in positions:
            metadata = None if command.metadata is None else command.metadata[position]
            expiry = command.expiry_of(position)
            if not stored:
                batch.put(key, value)
                if not format_rows:
                    batch.token_count += 1
                stored = True
                new = (expiry, metadata)
            elif new[0] is not None and new[0] <= now_ms:
                new = (expiry, metadata)  # expired: a new life
            else:
                # Live: no expiry is the latest of all, and the later of two expiries wins; an item without
                # one leaves a live expiry as it is, unless it carries over a life that never ends.
                expires_at_ms = new[0]
                if new[0] is not None and expiry is not None:
                    expires_at_ms = max(new[0], expiry)
                elif expiry is None and command.carries_lives:
                    expires_at_ms = None
                new = (expires_at_ms, metadata if metadata is not None else new[1])
        _set_life(key, old, new, batch)
    return None


def _set_life(key: bytes, old: tuple[int | None, bytes | None], new: tuple[int | None, bytes | None],
              batch: Batch) -> None:
    if old == new:
        return
    if old[0] is not None and old[0] != new[0]:
        batch.delete(expiry_index_key(old[0], key))
    if new[0] is not None and old[0] != new[0]:
        expiry_key = expiry_index_key(new[0], key)
        batch.put(expiry_key, b"")
        if batch.expiry_resume is not None and expiry_key <= batch.expiry_resume:
            batch.expiry_resume = None  # a live key below it: seek from the start again
    if new == (None, None):
        batch.delete(LIFE + key)
    else:
        batch.put(LIFE + key, pack(list(new)))
        batch.has_life = True


def apply_purge_expired(index: int, command: PurgeExpiredCommand, batch: Batch) -> ApplyResult:
    """Delete up to ``limit`` mappings that expired at or before the command's now_ms, earliest first
    (then by row key): the expiry index's byte order, the same on every node."""
    add_tokens(batch)
    taken = []
    for key in batch.first_keys(EXPIRY, EXPIRY_END, batch.expiry_resume, command.limit):
        if U64.unpack_from(key, 1)[0] > command.now_ms:
            break
        taken.append(key)
    for key in taken:
        row_key = key[EXPIRY_HEADER_BYTES:]
        batch.delete(key)
        batch.delete(LIFE + row_key)
        if row_key[:1] == TOKEN and batch.get(row_key) is not None:
            batch.token_count -= 1
        batch.delete(row_key)
    if taken:
        batch.expiry_resume = taken[-1]
    return ApplyResult(index, Outcome.OK, 200, None, PURGE_KIND, 0, len(taken))


def apply_delete(index: int, command: DeleteTokensCommand, batch: Batch) -> ApplyResult:
    """Remove the rows of the tokens that exist (as of this entry), with their expiry and metadata;
    the others are not counted.

    Tokenizes earlier in the batch are settled first (add_tokens), so a token added and deleted in
    one batch is gone. Tokenizing the same value again later re-creates the same token, with a
    new life (docs/api.md)."""
    add_tokens(batch)
    keys = delete_row_keys(command.tokens, command.epoch)
    existing = batch.get_many({key: key for key in keys})
    lives = batch.get_many({key: LIFE + key for key in keys})
    deleted = 0
    for key in keys:
        if existing.get(key) is not None:
            batch.delete(key)
            _set_life(key, decode_life(lives.get(key)), (None, None), batch)
            deleted += 1
            if key[:1] == TOKEN:  # the count is of opaque mappings (format rows are not counted)
                batch.token_count -= 1
    actor = command.actor
    append_audit([command.deleted_at_ms, actor.node or UNKNOWN_NODE, actor.name, actor.key_id,
                  DELETE_KIND, len(keys), deleted, actor.request_id, None], batch)
    return ApplyResult(index, Outcome.OK, 200, json_bytes({"deleted": deleted}), DELETE_KIND, 0, deleted)


def apply_destroy(index: int, command: DestroyEpochCommand, batch: Batch) -> ApplyResult:
    """Erase the epoch's wrapped secret from its row; the active epoch is refused, a destroyed one
    is destroyed already (OK again, so a retry after a lost answer succeeds)."""
    if command.epoch == batch.active_epoch:
        return ApplyResult(index, Outcome.EPOCH_ACTIVE, None, None)
    key = epoch_key(command.epoch) if command.epoch <= MAX_STORED_EPOCH else None
    value = batch.get(key) if key is not None else None
    if key is None or value is None:
        return ApplyResult(index, Outcome.EPOCH_NOT_FOUND, None, None)
    record = decode_epoch(key, value, StoreCorruption)
    if record.state != DESTROYED:
        batch.put(key, pack([b"", record.created_at_ms, DESTROYED]))
    actor = command.actor
    append_audit([command.destroyed_at_ms, actor.node or UNKNOWN_NODE, actor.name, actor.key_id,
                  DESTROY_KIND, 0, 0, actor.request_id, str(command.epoch)], batch)
    response = json_bytes({"epoch": command.epoch, "state": DESTROYED})
    return ApplyResult(index, Outcome.OK, 200, response, DESTROY_KIND, command.epoch, 0)


def apply_audit_trim(index: int, command: AuditTrimCommand, batch: Batch) -> ApplyResult:
    """Make record ``through_seq`` the chain's anchor and drop it and every record before it (the store
    deletes the range when it writes the batch); the trim is itself recorded. Refused, with nothing
    changed, unless that record exists and has the hash the operator gave: a trail is only trimmed as
    far as someone exported it. Trimming again to the anchor with its hash is a no-op (a retry)."""
    anchor_seq, anchor_hash = batch.audit_anchor
    through = command.through_seq
    if through <= anchor_seq:
        if through != anchor_seq or command.through_hash != anchor_hash:
            return ApplyResult(index, Outcome.AUDIT_TRIMMED_ALREADY, None, None)
        return ApplyResult(index, Outcome.OK, 200, _trimmed(through, 0, anchor_hash), AUDIT_TRIM_KIND, 0, 0)
    stored = batch.get(AUDIT + U64.pack(through)) if through <= batch.audit_seq else None
    if stored is None:
        return ApplyResult(index, Outcome.AUDIT_RECORD_NOT_FOUND, None, None)
    try:
        digest = unpack(stored)[-1]
    except Exception:
        raise StoreCorruption(f"audit record {through} is malformed") from None
    if digest != command.through_hash:
        return ApplyResult(index, Outcome.AUDIT_HASH_MISMATCH, None, None)
    removed = through - anchor_seq
    batch.audit_anchor = (through, digest)
    actor = command.actor
    append_audit([command.trimmed_at_ms, actor.node or UNKNOWN_NODE, actor.name, actor.key_id,
                  AUDIT_TRIM_KIND, removed, removed, actor.request_id, str(through)], batch)
    return ApplyResult(index, Outcome.OK, 200, _trimmed(through, removed, digest), AUDIT_TRIM_KIND, 0, removed)


def _trimmed(through: int, removed: int, anchor_hash: bytes) -> bytes:
    return json_bytes({"trimmed_through": through, "removed": removed, "anchor_hash": anchor_hash.hex()})
