"""The vault state machine: committed log entries applied to RocksDB (``rocksdict``).

Layout. ``path`` is a directory holding a pointer file ``CURRENT`` (the name of
the live generation, e.g. ``gen-000001``) and that generation directory, a
RocksDB database. A snapshot install adds the next generation beside it and
switches ``CURRENT`` with write-temp + fsync + rename + directory fsync, so a
crash leaves either the old or the new generation named; open deletes every
other generation and temporary file. A new store is built in a sibling
directory ``<path>.creating`` and renamed into place, so ``path`` never exists
half-made.

Keys (one column family, raw bytes; multi-byte integers big-endian so that
byte order is numeric order):

- ``t`` + token (UTF-8) -> epoch (4 bytes) + ciphertext. Insert-once.
- ``e`` + epoch (8 bytes) -> msgpack [wrapped_secret, created_at_ms, state]; a destroyed
  epoch keeps its row with an empty wrapped_secret (tokenvault/core/shred.py erases
  the old bytes from the files).
- ``i`` + identity -> msgpack [kind, fingerprint, status, response, created_at_ms],
  where identity is principal and key, each UTF-8 with 0x00 escaped as
  0x00 0xFF and ended by 0x00. That keeps byte order equal to (principal, key)
  order, and UTF-8 never holds 0xFF, so no two identities collide.
- ``a`` + created_at_ms (8 bytes) + identity -> empty: the age index. The purge
  and the idempotency floor are a seek on it, never a scan.
- ``m`` -> msgpack [marker, schema version, applied_index, applied_view,
  token_count], checked on every open.
- ``k`` + key id (16 hex characters) -> msgpack [name, scopes, salt, digest,
  created_at_ms, created_by]: the runtime API keys (tokenvault.auth). Never the
  key, only its salted digest. At most ``MAX_API_KEYS``; a revoke deletes the
  row (the audit trail keeps who created and revoked it). Also held in memory,
  so authentication never touches the database.
- ``c`` -> the payload of the last configuration entry applied (protocol.membership:
  the cluster's voters and learners with their peer addresses); absent until the
  first membership change, when the static config's members hold. It travels
  in snapshots, so a node that installs one knows the configuration it is at.
- ``A`` + seq (8 bytes) -> msgpack [seq, *fields, previous hash, hash]: the
  audit trail (tokenvault.audit_chain), and ``h`` -> msgpack [last seq, last hash],
  its head. Records are appended at apply, never changed or deleted.
- ``F`` + epoch (4 bytes) + token (ASCII digits) -> ciphertext: card and digits
  tokens (tokenvault.crypto.formats). They carry no epoch, and one digit string
  can be a token of several epochs, so the epoch is part of the key. Insert-once
  like ``t`` rows; a card token and a digits token of the same length can
  coincide within an epoch, and a command that would store a second value under
  such a key is refused whole (Outcome.TOKEN_COLLISION). Not counted in the
  meta's token_count, which counts ``t`` rows.
- ``L`` + row key -> msgpack [expires_at_ms or None, metadata ciphertext or
  None]: the life of a mapping that has an expiry or metadata; the row key is
  the mapping's ``t`` or ``F`` key. Absent: the mapping never expires and has
  no metadata.
- ``X`` + expires_at_ms (8 bytes) + row key -> empty: the expiry index, one key
  per mapping that has an expiry. The purge (PurgeExpiredCommand) is a seek on
  it, earliest expiry first, never a scan.

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

Atomicity. One ``apply_batch`` call is ONE RocksDB WriteBatch, meta included,
so a crash leaves the store at the end of some batch. While a batch is applied
its writes sit in a batch-local overlay (``_Batch``) that later commands of the
same batch read through: idempotency records added or deleted, epochs, the age
index for the purge, token rows. Token rows of plain tokenizes are checked
with one multi-get when the batch ends or when a later command of the batch
reads or deletes token rows (``_add_tokens``: a delete, a purge, a tokenize
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

import bisect
import json
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar, cast

import msgpack
from rocksdict import (
    AccessType,
    BlockBasedOptions,
    BottommostLevelCompaction,
    CompactOptions,
    Cache,
    Checkpoint,
    DBCompressionType,
    DBRecoveryMode,
    Options,
    Rdict,
    RdictIter,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from protocol import Entry, EntryKind, Membership, MembershipError
from tokenvault.audit_chain import GENESIS_HASH, chain_hash, record_document
from tokenvault.auth import RuntimeKey
from tokenvault.core.commands import (OPAQUE_FORMAT, AuditCommand, Command, CreateApiKeyCommand,
                                      DeleteTokensCommand, DestroyEpochCommand, PurgeExpiredCommand,
                                      RevokeApiKeyCommand, RotateEpochCommand, TokenizeCommand, decode_command)
from tokenvault.core.wal import fsync_directory

DEFAULT_RETENTION_MS = 48 * 3600 * 1000
# Expired idempotency records deleted per applied command at most. Each command
# adds at most one record, so purging up to 8 per command always keeps up.
PURGE_LIMIT_PER_COMMAND = 8

SCHEMA_VERSION = 2  # version 1 was the SQLite store
STORE_MARKER = "tokenvault-store"  # first field of the meta record: marks a database as ours
# The store's directory inside a node's data directory (tokenvault.core.node, and its HTTP workers' views).
STORE_DIRECTORY = "store"
CURRENT_FILE = "CURRENT"
CURRENT_TEMP_FILE = "CURRENT.tmp"
CREATING_SUFFIX = ".creating"
GENERATION_PREFIX = "gen-"
_GENERATION_NAME = re.compile(r"gen-(\d{6,})")
# What rocksdict writes beside a raw-mode database; it reads it back on open and
# it could switch the comparator or add prefix extractors, so anything else is refused.
ROCKSDICT_CONFIG_FILE = "rocksdict-config.json"
_ROCKSDICT_CONFIG = {"raw_mode": True, "prefix_extractors": {}}

# --- RocksDB tuning -----------------------------------------------------------
# Block cache shared by the live and a prepared generation: bounds read memory
# whatever the store size (RSS stays well under 500 MB at 20 M tokens).
BLOCK_CACHE_BYTES = 64 * 1024 * 1024
# Full (not block-based) bloom filters: most insert-once checks and many
# detokenize lookups are misses, which a filter answers without reading a block.
# 10 bits/key is about 1 % false positives; at 20 M tokens that is 25 MB.
BLOOM_BITS_PER_KEY = 10
# Memtable size: large enough that flushes (and level-0 files) are few, small
# enough that two of them (one being flushed) stay a small part of memory.
WRITE_BUFFER_BYTES = 64 * 1024 * 1024
MAX_WRITE_BUFFERS = 2
# One flush and one compaction at a time: the node's other work keeps the other cores.
MAX_BACKGROUND_JOBS = 2
# RocksDB's info log: a few small files, never an ever-growing directory.
INFO_LOG_KEEP_FILES = 2
INFO_LOG_MAX_BYTES = 4 * 1024 * 1024
# Opening a received checkpoint for verification reads a handful of blocks.
VERIFY_CACHE_BYTES = 1024 * 1024
# Longest RocksDB error text quoted in a StoreCorruption or SnapshotRejected message.
REASON_MAX_CHARS = 200
# Epochs are stored in 4 bytes per token row; each rotation adds exactly one,
# so reaching this would take four billion rotations.
MAX_STORED_EPOCH = 2**32 - 1
# Keys a shred compacts one by one; more become one range from the lowest to the highest.
SHRED_POINT_RANGES = 64

TOKENIZE_KIND = "tokenize"
ROTATE_KIND = "rotate"
PURGE_KIND = "purge"
ACTIVE = "active"
RETIRED = "retired"
DESTROYED = "destroyed"
DELETE_KIND = "token.delete"
DESTROY_KIND = "epoch.destroy"
# Tokens one page of an epoch's token listing holds at most (the migration reads it page by page).
MAX_TOKEN_PAGE = 1000
CREATE_KEY_KIND = "key.create"
REVOKE_KEY_KIND = "key.revoke"
AUDIT_KIND = "audit"
# Runtime API keys in the replicated table: bounded so the in-memory copy is.
MAX_API_KEYS = 1000
# Audit records one page read returns at most.
MAX_AUDIT_PAGE = 1000
UNKNOWN_NODE = "-"

_TOKEN = b"t"
_EPOCH = b"e"
_IDEMPOTENCY = b"i"
_AGE = b"a"
_META_KEY = b"m"
_AGE_END = b"b"  # first key after the age index
_EPOCH_END = b"f"
_TOKEN_END = b"u"
_API_KEY = b"k"
_API_KEY_END = b"l"
_AUDIT = b"A"
_AUDIT_END = b"B"
_AUDIT_HEAD_KEY = b"h"
_FORMAT_TOKEN = b"F"
_FORMAT_TOKEN_END = b"G"
_LIFE = b"L"
_LIFE_END = b"M"
_EXPIRY = b"X"
_EXPIRY_END = b"Y"
_EXPIRY_HEADER_BYTES = 1 + 8
_MEMBERSHIP_KEY = b"c"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_AGE_HEADER_BYTES = 1 + _U64.size
_NO_RECORDS = 2**63  # the idempotency floor of an empty age index
_Name = TypeVar("_Name")


class Outcome(StrEnum):
    OK = "ok"
    EPOCH_MISMATCH = "epoch_mismatch"
    STALE_EPOCH = "stale_epoch"
    DUPLICATE = "duplicate"
    KEY_LIMIT = "key_limit"
    KEY_EXISTS = "key_exists"
    KEY_NOT_FOUND = "key_not_found"
    TOKEN_COLLISION = "token_collision"
    EPOCH_ACTIVE = "epoch_active"
    EPOCH_NOT_FOUND = "epoch_not_found"


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
    state: str  # "active" | "retired" | "destroyed"


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
    """The store directory is not a TokenVault store of the expected schema, or is damaged."""


class SnapshotRejected(StoreError):
    """A received checkpoint failed validation; the current state is untouched."""


# A test hook: called after each step of an install (and of the CURRENT switch)
# so a test can stop the install there, as a crash would.
_after_install_step: Callable[[str], None] = lambda step: None


# ---------------------------------------------------------------- encoding
def _identity(principal: str, key: str) -> bytes:
    return (principal.encode().replace(b"\x00", b"\x00\xff") + b"\x00"
            + key.encode().replace(b"\x00", b"\x00\xff") + b"\x00")


def _token_key(token: str) -> bytes:
    return _TOKEN + token.encode()


def _format_token_key(epoch: int, token: str) -> bytes:
    return _FORMAT_TOKEN + _U32.pack(epoch) + token.encode("ascii")


def _expiry_key(expires_at_ms: int, row_key: bytes) -> bytes:
    return _EXPIRY + _U64.pack(expires_at_ms) + row_key


def _decode_life(value: bytes | None) -> tuple[int | None, bytes | None]:
    """(expires_at_ms, metadata ciphertext) of a mapping; (None, None) when it has no ``L`` row."""
    if value is None:
        return None, None
    try:
        expires_at_ms, metadata = _unpack(value)
    except Exception:
        raise StoreCorruption("a mapping's life record is malformed") from None
    if (expires_at_ms is not None and not _is_count(expires_at_ms)) or (
            metadata is not None and type(metadata) is not bytes):
        raise StoreCorruption("a mapping's life record is malformed")
    return expires_at_ms, metadata


def _epoch_key(epoch: int) -> bytes:
    return _EPOCH + _U64.pack(epoch)


def _age_key(created_at_ms: int, identity: bytes) -> bytes:
    return _AGE + _U64.pack(created_at_ms) + identity


def _age_created_at(age_key: bytes) -> int:
    created_at_ms: int = _U64.unpack_from(age_key, 1)[0]
    return created_at_ms


def _pack(value: object) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _meta_value(applied_index: int, applied_view: int, token_count: int) -> bytes:
    return _pack([STORE_MARKER, SCHEMA_VERSION, applied_index, applied_view, token_count])


def _unpack(value: bytes) -> Any:
    """A msgpack document: of no known shape until the caller has checked it."""
    return msgpack.unpackb(value, raw=False, strict_map_key=True)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _decode_meta(value: bytes | None, error: type[StoreError]) -> tuple[int, int, int]:
    """(applied_index, applied_view, token_count) from the meta record, or ``error``."""
    if value is None:
        raise error("not a TokenVault store (no meta record)")
    try:
        meta = _unpack(value)
    except Exception:
        raise error("not a TokenVault store (meta record is not readable)") from None
    if type(meta) is not list or len(meta) < 2 or meta[0] != STORE_MARKER:
        raise error("not a TokenVault store (marker differs)")
    if meta[1] != SCHEMA_VERSION:
        raise error("unsupported store schema version")
    if len(meta) != 5 or not all(_is_count(field_value) for field_value in meta[2:]):
        raise error("store meta record is malformed")
    return meta[2], meta[3], meta[4]


def _read_membership(database: Rdict, error: type[StoreError]) -> Membership | None:
    value = database.get(_MEMBERSHIP_KEY)
    if value is None:
        return None
    try:
        return Membership.decode(bytes(value))
    except MembershipError as failure:
        raise error(f"store membership record is malformed: {failure}") from None


def _decode_epoch(key: bytes, value: bytes, error: type[StoreError]) -> EpochRecord:
    try:
        wrapped_secret, created_at_ms, state = _unpack(value)
    except Exception:
        raise error("an epoch record is malformed") from None
    if (len(key) != 1 + _U64.size or type(wrapped_secret) is not bytes or not _is_count(created_at_ms)
            or state not in (ACTIVE, RETIRED, DESTROYED)):
        raise error("an epoch record is malformed")
    return EpochRecord(_U64.unpack_from(key, 1)[0], wrapped_secret, created_at_ms, state)


def _api_key_value(entry: RuntimeKey) -> bytes:
    return _pack([entry.name, sorted(entry.scopes), entry.salt, entry.digest, entry.created_at_ms,
                  entry.created_by])


def _decode_api_key(key: bytes, value: bytes, error: type[StoreError]) -> RuntimeKey:
    try:
        name, scopes, salt, digest, created_at_ms, created_by = _unpack(value)
        return RuntimeKey(key[1:].decode("ascii"), name, frozenset(scopes), salt, digest, created_at_ms,
                          created_by)
    except Exception:
        raise error("an API key record is malformed") from None


def _read_api_keys(database: Rdict, error: type[StoreError]) -> dict[str, RuntimeKey]:
    keys: dict[str, RuntimeKey] = {}
    for key, value in _items(database, _API_KEY, _API_KEY_END):
        entry = _decode_api_key(key, value, error)
        keys[entry.key_id] = entry
        if len(keys) > MAX_API_KEYS:
            raise error("more API keys than the table may hold")
    return keys


def _read_audit_head(database: Rdict, error: type[StoreError]) -> tuple[int, bytes]:
    value = database.get(_AUDIT_HEAD_KEY)
    if value is None:
        return 0, GENESIS_HASH
    try:
        seq, digest = _unpack(value)
    except Exception:
        raise error("the audit head record is malformed") from None
    if not _is_count(seq) or type(digest) is not bytes or len(digest) != len(GENESIS_HASH):
        raise error("the audit head record is malformed")
    return seq, digest


# ---------------------------------------------------------------- files
def _generation_name(number: int) -> str:
    return f"{GENERATION_PREFIX}{number:06d}"


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory under ``directory`` (deepest first), and itself."""
    for root, directories, files in os.walk(directory, topdown=False):
        for name in files:
            entry = Path(root) / name
            if not entry.is_symlink():
                _fsync_file(entry)
        fsync_directory(Path(root))


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _write_current(store_directory: Path, generation: str) -> None:
    """Point CURRENT at ``generation``: write a temporary file, fsync, rename, fsync the directory."""
    temporary = store_directory / CURRENT_TEMP_FILE
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = memoryview(f"{generation}\n".encode())
        while data:
            data = data[os.write(descriptor, data):]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    _after_install_step("current_temp_written")
    os.replace(temporary, store_directory / CURRENT_FILE)
    _after_install_step("current_renamed")
    fsync_directory(store_directory)


def _read_current(store_directory: Path) -> str:
    current = store_directory / CURRENT_FILE
    if not current.is_file():
        raise StoreCorruption(f"{store_directory} holds files but no {CURRENT_FILE} pointer: "
                              "not a TokenVault store, or a damaged one")
    try:
        text = current.read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError):
        raise StoreCorruption(f"{current} is unreadable") from None
    name = text[:-1] if text.endswith("\n") else ""
    if _GENERATION_NAME.fullmatch(name) is None:
        raise StoreCorruption(f"{current} does not name a generation")
    if not (store_directory / name).is_dir():
        raise StoreCorruption(f"{current} names {name}, which is missing")
    return name


def _remove_leftovers(store_directory: Path, current: str) -> None:
    """Delete generations other than ``current`` and a temporary CURRENT: leftovers of an interrupted install."""
    removed = False
    for entry in store_directory.iterdir():
        if entry.name == CURRENT_TEMP_FILE or (_GENERATION_NAME.fullmatch(entry.name) and entry.name != current):
            _remove_tree(entry)
            removed = True
    if removed:
        fsync_directory(store_directory)


# ---------------------------------------------------------------- RocksDB
def _options(cache: Cache, *, create: bool = False) -> Options:
    options = Options(raw_mode=True)
    options.create_if_missing(create)
    options.set_error_if_exists(create)
    table = BlockBasedOptions()
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)
    table.set_block_cache(cache)
    options.set_block_based_table_factory(table)
    # Ciphertexts are random, so compression gains little; lz4 costs little on the
    # upper levels and zstd packs the bottom level (most of the data) a bit tighter.
    options.set_compression_type(DBCompressionType.lz4())
    options.set_bottommost_compression_type(DBCompressionType.zstd())
    options.set_write_buffer_size(WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(MAX_WRITE_BUFFERS)
    options.set_level_compaction_dynamic_level_bytes(True)
    options.set_max_background_jobs(MAX_BACKGROUND_JOBS)
    options.set_keep_log_file_num(INFO_LOG_KEEP_FILES)
    options.set_max_log_file_size(INFO_LOG_MAX_BYTES)
    # After a power cut, recover up to the first damaged WAL record: a prefix of
    # the applied batches, each whole (the replication log has the rest).
    options.set_wal_recovery_mode(DBRecoveryMode.point_in_time())
    return options


def _reason(failure: BaseException) -> str:
    """RocksDB's own words (a status such as "IO error: ..." or "Corruption: block checksum
    mismatch ..." naming files and offsets, never keys or values), one line, bounded."""
    text = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
    return text[:REASON_MAX_CHARS]


def _check_rocksdict_config(directory: Path, error: type[StoreError]) -> None:
    config = directory / ROCKSDICT_CONFIG_FILE
    if not config.exists():
        return
    try:
        document = json.loads(config.read_bytes())
    except (OSError, ValueError):
        raise error(f"{ROCKSDICT_CONFIG_FILE} is unreadable") from None
    if document != _ROCKSDICT_CONFIG:
        raise error(f"{ROCKSDICT_CONFIG_FILE} holds options this store does not use")


def _open_database(directory: Path, options: Options, error: type[StoreError], *,
                   read_only: bool = False) -> tuple[Rdict, tuple[int, int, int]]:
    """Open an existing generation; returns it with its meta. Any problem raises ``error``."""
    if directory.is_symlink() or not directory.is_dir():
        raise error(f"{directory} is not a database directory")
    _check_rocksdict_config(directory, error)
    try:
        family_names = Rdict.list_cf(str(directory), options)
    except Exception as failure:
        raise error(f"{directory} is not a readable RocksDB database: {_reason(failure)}") from None
    if family_names != ["default"]:
        raise error(f"{directory} holds column families this store does not use")
    # The default column family's options are named explicitly: without that,
    # rocksdict reopens an existing database without our table options (no bloom filter).
    families = {"default": options}
    try:
        if read_only:
            database = Rdict(str(directory), options, column_families=families,
                             access_type=AccessType.read_only(False))
        else:
            database = Rdict(str(directory), options, column_families=families)
    except Exception as failure:
        raise error(f"{directory} cannot be opened as a RocksDB database: {_reason(failure)}") from None
    try:
        try:
            meta_value = database.get(_META_KEY)
        except Exception as failure:
            raise error(f"{directory}: reading the meta record failed: {_reason(failure)}") from None
        return database, _decode_meta(meta_value, error)
    except BaseException:
        database.close()
        raise


def _bounded(lower: bytes, upper: bytes) -> ReadOptions:
    read_options = ReadOptions()
    read_options.set_iterate_lower_bound(lower)
    read_options.set_iterate_upper_bound(upper)
    return read_options


# rocksdict's stubs type a key as any of str, int, float, bytes and bool and a value as Any, whatever
# the mode; every database here is opened in raw mode (Options(raw_mode=True)), where both are bytes.
_RdictKey = str | int | float | bytes | bool


def _items(database: Rdict, lower: bytes, upper: bytes) -> Iterable[tuple[bytes, bytes]]:
    """The rows in [lower, upper) in key order. The start is explicit: RocksDB applies
    iterate_lower_bound to backward moves only."""
    return cast("Iterable[tuple[bytes, bytes]]", database.items(from_key=lower, read_opt=_bounded(lower, upper)))


def _keys(database: Rdict, lower: bytes, upper: bytes) -> Iterable[bytes]:
    """The keys in [lower, upper) in key order (as ``_items``)."""
    return cast("Iterable[bytes]", database.keys(from_key=lower, read_opt=_bounded(lower, upper)))


def _get_many(database: Rdict, keys: list[bytes]) -> list[bytes | None]:
    """The values of ``keys`` in order, None where absent: one multi-get."""
    return cast("list[bytes | None]", database.get(cast("list[_RdictKey]", keys)))


def lookup_opaque(database: Rdict, tokens: Sequence[str], now_ms: int | None, *,
                  has_life: bool) -> dict[str, bytes]:
    """Ciphertexts of the live opaque tokens among ``tokens`` in ``database`` (VaultStore.lookup; also
    tokenvault.core.store_reader's, over a secondary instance). ``has_life``: whether any mapping may
    have a life row; without one the expiry check is skipped. One multi-get, two with expiries."""
    unique = list(dict.fromkeys(tokens))
    if not unique:
        return {}
    keys = [_token_key(token) for token in unique]
    values = _get_many(database, keys)
    found = {token: value[_U32.size:] for token, value in zip(unique, values) if value is not None}
    if has_life and found:
        _drop_expired(database, found, dict(zip(unique, keys)), now_ms)
    return found


def _drop_expired(database: Rdict, found: dict[str, bytes], row_keys: dict[str, bytes], now_ms: int | None) -> None:
    """Leave out of ``found`` the mappings whose expiry is at or before ``now_ms`` (default: now)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    tokens = list(found)
    for token, value in zip(tokens, _get_many(database, [_LIFE + row_keys[token] for token in tokens])):
        expires_at_ms = _decode_life(value)[0]
        if expires_at_ms is not None and expires_at_ms <= now_ms:
            del found[token]


def _read_epochs(database: Rdict, error: type[StoreError], limit: int | None = None) -> list[EpochRecord]:
    records = []
    for key, value in _items(database, _EPOCH, _EPOCH_END):
        records.append(_decode_epoch(key, value, error))
        if limit is not None and len(records) > limit:
            raise error("more epochs than applied entries")
    return records


def _check_epochs(records: list[EpochRecord], error: type[StoreError]) -> int:
    """The active epoch (0 if none): epochs run 1..n, only the last may be active."""
    if [record.epoch for record in records] != list(range(1, len(records) + 1)):
        raise error("epoch records are not the consecutive epochs 1..n")
    active = [record.epoch for record in records if record.state == ACTIVE]
    if len(active) > 1:
        raise error("more than one active epoch")
    if active and active[0] != len(records):
        raise error("an epoch other than the newest is active")
    return active[0] if active else 0


def _first_key(database: Rdict, lower: bytes, upper: bytes) -> bytes | None:
    iterator = database.iter(_bounded(lower, upper))
    iterator.seek(lower)
    return iterator.key() if iterator.valid() else None


def _entry_upper_bound(database: Rdict) -> int:
    """At least the number of distinct live keys: every one has an entry in a table file or a memtable."""
    in_tables = sum(int(live["num_entries"]) for live in database.live_files())
    in_memory = sum(database.property_int_value(name) or 0 for name in (
        "rocksdb.num-entries-active-mem-table", "rocksdb.num-entries-imm-mem-tables"))
    return in_tables + in_memory


def _check_token_count(database: Rdict, token_count: int, error: type[StoreError]) -> None:
    """Cheap plausibility of the meta's token count: no scan, a seek and file metadata only."""
    has_tokens = _first_key(database, _TOKEN, _TOKEN_END) is not None
    if has_tokens != (token_count > 0):
        raise error("token count in meta contradicts the token rows")
    if token_count > _entry_upper_bound(database):
        raise error("token count in meta exceeds the entries in the database")


# ---------------------------------------------------------------- installs
@dataclass(eq=False)
class PreparedInstall:
    """A verified checkpoint moved into the store as the next generation, open, not yet live."""

    index: int
    view: int
    directory: Path
    _database: Rdict | None = field(repr=False, default=None)


class RetiredGeneration:
    """The generation an install replaced. ``close()`` (or calling it; from a worker thread: it can
    take 0.3 s) closes its database and deletes its directory; a crash before that leaves it for the
    next open to delete."""

    def __init__(self, database: Rdict, directory: Path, lock: threading.Lock) -> None:
        self._database: Rdict | None = database
        self.directory = directory
        self._lock = lock  # held by create_checkpoint while it reads a database

    def close(self) -> None:
        with self._lock:
            database, self._database = self._database, None
            if database is None:
                return
            database.close()
        _after_install_step("old_closed")
        _remove_tree(self.directory)
        fsync_directory(self.directory.parent)

    __call__ = close


# ---------------------------------------------------------------- the store
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
        self._options = _options(cache)
        self._write_options = WriteOptions()  # WAL on, sync off: see the module docstring
        self._retention_ms = retention_ms
        self._purge_limit_per_command = purge_limit_per_command
        self._age_read_options = _bounded(_AGE, _AGE_END)
        self._checkpoint_lock = threading.Lock()
        self._install_lock = threading.Lock()
        self._pending: PreparedInstall | None = None
        self._closed = False
        # Called after the runtime key table changed (an applied create or revoke, an installed
        # snapshot): the node's HTTP workers hold a copy of it (tokenvault.api.workers).
        self.on_api_keys_changed: Callable[[], None] | None = None
        self._load_state(meta)

    def _load_state(self, meta: tuple[int, int, int]) -> None:
        self._applied_index, self._applied_view, self._token_count = meta
        self._active_epoch = _check_epochs(_read_epochs(self._db, StoreCorruption), StoreCorruption)
        self._api_keys = _read_api_keys(self._db, StoreCorruption)
        self._keys_changed()
        self._audit_seq, self._audit_head = _read_audit_head(self._db, StoreCorruption)
        self._membership = _read_membership(self._db, StoreCorruption)
        first = _first_key(self._db, _AGE, _AGE_END)
        # No idempotency record is older than the floor: a purge with an earlier
        # cut-off would delete nothing, so it is skipped (the same on every node).
        self._idempotency_floor_ms = _NO_RECORDS if first is None else _age_created_at(first)
        # Every age key at or below this one is deleted: the purge seeks past it
        # instead of stepping over the tombstones of earlier purges. Not persisted.
        self._purge_resume_key: bytes | None = None
        # Whether any mapping may have a life row: reads skip the expiry check while none can.
        self._has_life = _first_key(self._db, _LIFE, _LIFE_END) is not None
        # The expiry index's counterpart of _purge_resume_key.
        self._expiry_resume_key: bytes | None = None

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
        _remove_tree(path.with_name(path.name + CREATING_SUFFIX))  # an interrupted creation
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
        if not path.exists() and not path.is_symlink():
            cls._create(path, cache)
        if path.is_symlink() or not path.is_dir():
            raise StoreCorruption(f"{path} is not a store directory")
        generation = _read_current(path)
        # Opened first: RocksDB's lock on the live generation keeps a second
        # process from deleting what the first one is installing.
        database, meta = _open_database(path / generation, _options(cache), StoreCorruption)
        try:
            _remove_leftovers(path, generation)
            store = cls(path, generation, database, meta, cache, retention_ms, purge_limit_per_command)
        except Exception as error:
            database.close()
            if isinstance(error, (StoreError, OSError)):
                raise
            raise StoreCorruption(f"{path / generation} cannot be read as a TokenVault store: "
                                  f"{_reason(error)}") from None
        store.checkpoint()
        return store

    @staticmethod
    def _create(path: Path, cache: Cache) -> None:
        """Build an empty store beside ``path`` and rename it into place, so ``path`` is never half-made."""
        building = path.with_name(path.name + CREATING_SUFFIX)
        building.mkdir()
        generation = _generation_name(1)
        database = Rdict(str(building / generation), _options(cache, create=True))
        try:
            batch = WriteBatch(raw_mode=True)
            batch.put(_META_KEY, _meta_value(0, 0, 0))
            sync = WriteOptions()
            sync.sync = True
            database.write(batch, sync)
        finally:
            database.close()
        fsync_tree(building / generation)
        _write_current(building, generation)
        os.rename(building, path)
        fsync_directory(path.parent)

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
    def apply_batch(self, entries: Sequence[Entry]) -> list[ApplyResult]:
        """Apply committed entries as one atomic write; returns one result per applied command.

        Entries at or below the applied index are skipped (a replay after a
        restart); the rest must follow it without gaps. NOOP entries only move
        the applied index. On any error nothing of the batch is applied.
        """
        if not entries:
            return []
        batch = _Batch(self._db, self._applied_index, self._applied_view, self._active_epoch,
                       self._token_count, self._idempotency_floor_ms, self._purge_resume_key)
        batch.audit_seq, batch.audit_head = self._audit_seq, self._audit_head
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
                batch.writes[_MEMBERSHIP_KEY] = entry.payload
            batch.applied_index, batch.applied_view = entry.index, entry.view
        if batch.applied_index == self._applied_index:
            return results
        self._add_tokens(batch)
        write = WriteBatch(raw_mode=True)
        for key, value in batch.writes.items():
            if value is None:
                write.delete(key)
            else:
                write.put(key, value)
        if batch.audit_seq != self._audit_seq:
            write.put(_AUDIT_HEAD_KEY, _pack([batch.audit_seq, batch.audit_head]))
        write.put(_META_KEY, _meta_value(batch.applied_index, batch.applied_view, batch.token_count))
        self._db.write(write, self._write_options)
        self._audit_seq, self._audit_head = batch.audit_seq, batch.audit_head
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

    def _apply_command(self, index: int, command: Command, batch: "_Batch") -> ApplyResult:
        if type(command) is AuditCommand:
            for record in command.records:
                self._append_audit(record.fields(), batch)
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
            return self._apply_purge_expired(index, command, batch)
        if type(command) is DeleteTokensCommand:
            return self._apply_delete(index, command, batch)
        if type(command) is DestroyEpochCommand:
            return self._apply_destroy(index, command, batch)
        assert type(command) is RotateEpochCommand  # the one kind left
        if command.epoch != batch.active_epoch + 1:
            return ApplyResult(index, Outcome.STALE_EPOCH, None, None)
        return self._apply_rotate(index, command, batch)

    def _apply_tokenize(self, index: int, command: TokenizeCommand, batch: "_Batch") -> ApplyResult:
        duplicate = self._existing_response(index, command.principal, command.idempotency_key,
                                            command.issued_at_ms, batch)
        if duplicate is not None:
            return duplicate
        if command.extended or batch.has_life:
            # Formats, expiry and metadata read and write rows through the overlay at once.
            collision = self._apply_mappings(index, command, batch)
            if collision is not None:
                return collision
        else:
            # Token rows are checked and written once for the whole batch (_add_tokens):
            # nothing reads them before, and a failure drops the whole batch.
            batch.tokenized.append((index, command.epoch, command.items))
        response = None
        if command.idempotency_key is not None:
            # Only a keyed request can be replayed, so only then is the body built and kept.
            response = _json_bytes({"epoch": command.epoch, "tokens": [token for token, _ in command.items]})
            self._record_idempotency(command.principal, command.idempotency_key, TOKENIZE_KIND,
                                     command.fingerprint, 200, response, command.issued_at_ms, batch)
        return ApplyResult(index, Outcome.OK, 200, response, TOKENIZE_KIND, command.epoch, len(command.items))

    def _apply_rotate(self, index: int, command: RotateEpochCommand, batch: "_Batch") -> ApplyResult:
        duplicate = self._existing_response(index, command.principal, command.idempotency_key,
                                            command.created_at_ms, batch)
        if duplicate is not None:
            return duplicate
        if command.epoch > MAX_STORED_EPOCH:
            raise StoreError(f"entry {index} rotates past the largest epoch the store can hold")
        if batch.active_epoch:
            active_key = _epoch_key(batch.active_epoch)
            value = batch.get(active_key)
            if value is None:
                raise StoreCorruption("the active epoch's record is missing")
            record = _decode_epoch(active_key, value, StoreCorruption)
            batch.put(active_key, _pack([record.wrapped_secret, record.created_at_ms, RETIRED]))
        batch.put(_epoch_key(command.epoch), _pack([command.wrapped_secret, command.created_at_ms, ACTIVE]))
        batch.active_epoch = command.epoch
        response = _json_bytes({"epoch": command.epoch})
        self._record_idempotency(command.principal, command.idempotency_key, ROTATE_KIND, command.fingerprint,
                                 201, response, command.created_at_ms, batch)
        actor = command.actor
        # Entries written before the audit trail carry no actor: their principal still names the key.
        name = actor.name if actor.name is not None or actor.key_id is not None else command.principal
        self._append_audit([command.created_at_ms, actor.node or UNKNOWN_NODE, name, actor.key_id,
                            "epoch.rotate", 0, 0, actor.request_id, str(command.epoch)], batch)
        return ApplyResult(index, Outcome.OK, 201, response, ROTATE_KIND, command.epoch, 0)

    def _apply_create_key(self, index: int, command: CreateApiKeyCommand, batch: "_Batch") -> ApplyResult:
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
        batch.put(_API_KEY + command.key_id.encode("ascii"), _api_key_value(entry))
        self._append_audit([command.created_at_ms, actor.node or UNKNOWN_NODE, actor.name, actor.key_id,
                            "key.create", 1, 1, actor.request_id, command.key_id], batch)
        return ApplyResult(index, Outcome.OK, 201, None, CREATE_KEY_KIND, 0, 1)

    def _apply_revoke_key(self, index: int, command: RevokeApiKeyCommand, batch: "_Batch") -> ApplyResult:
        keys = batch.keys_for_change(self._api_keys)
        if command.key_id not in keys:
            return ApplyResult(index, Outcome.KEY_NOT_FOUND, None, None)
        del keys[command.key_id]
        batch.delete(_API_KEY + command.key_id.encode("ascii"))
        actor = command.actor
        self._append_audit([command.revoked_at_ms, actor.node or UNKNOWN_NODE, actor.name, actor.key_id,
                            "key.revoke", 1, 1, actor.request_id, command.key_id], batch)
        return ApplyResult(index, Outcome.OK, 200, None, REVOKE_KEY_KIND, 0, 1)

    @staticmethod
    def _append_audit(fields: list[Any], batch: "_Batch") -> None:
        """The next record of the chain: sequence number and hash are a function of the log alone."""
        seq = batch.audit_seq + 1
        digest = chain_hash(batch.audit_head, seq, fields)
        batch.put(_AUDIT + _U64.pack(seq), _pack([seq, *fields, batch.audit_head, digest]))
        batch.audit_seq, batch.audit_head = seq, digest

    def _existing_response(self, index: int, principal: str | None, key: str | None, now_ms: int,
                           batch: "_Batch") -> ApplyResult | None:
        """Purge a bounded number of expired records, then find a live record for (principal, key)."""
        expired_before_ms = now_ms - self._retention_ms
        if expired_before_ms > batch.floor_ms:
            # Skipped when no record can have expired: the purge would delete
            # nothing, so skipping it leaves the same state on every node.
            self._purge(expired_before_ms, batch)
        if key is None:
            return None
        assert principal is not None  # decode_command refuses a key without a principal
        identity = _identity(principal, key)
        value = batch.get(_IDEMPOTENCY + identity)
        if value is None:
            return None
        _, _, status, response, created_at_ms = _unpack(value)
        if created_at_ms < expired_before_ms:
            # Expired but not purged yet: it no longer answers; the new command takes its place.
            batch.delete(_IDEMPOTENCY + identity)
            batch.delete_age(_age_key(created_at_ms, identity))
            return None
        return ApplyResult(index, Outcome.DUPLICATE, status, response)

    def _purge(self, expired_before_ms: int, batch: "_Batch") -> None:
        """Delete up to purge_limit_per_command records older than the cut-off, oldest first.

        Order: created_at_ms, then principal, then key (the age index's byte
        order), so every node deletes the same records whatever its batches.
        """
        bound = _AGE + _U64.pack(expired_before_ms)
        keys = batch.first_age_keys(self._purge_limit_per_command + 1, self._age_read_options)
        taken = []
        for key in keys[:self._purge_limit_per_command]:
            if key >= bound:
                break
            taken.append(key)
        for key in taken:
            batch.delete_age(key)
            batch.delete(_IDEMPOTENCY + key[_AGE_HEADER_BYTES:])
        if taken:
            batch.resume_key = taken[-1]
        batch.floor_ms = _age_created_at(keys[len(taken)]) if len(keys) > len(taken) else _NO_RECORDS

    def _record_idempotency(self, principal: str | None, key: str | None, kind: str, fingerprint: bytes | None,
                            status: int, response: bytes, created_at_ms: int, batch: "_Batch") -> None:
        if key is None:
            return
        assert principal is not None  # decode_command refuses a key without a principal
        identity = _identity(principal, key)
        batch.put(_IDEMPOTENCY + identity, _pack([kind, fingerprint, status, response, created_at_ms]))
        batch.put_age(_age_key(created_at_ms, identity))
        batch.floor_ms = min(batch.floor_ms, created_at_ms)

    def _add_tokens(self, batch: "_Batch") -> None:
        """Check the pending tokenized items with one multi-get and add the new rows to the overlay; an
        existing token keeps its value. Runs at the end of a batch and before any command that reads
        or deletes token rows, so those see every earlier command of the batch."""
        if not batch.tokenized:
            return
        keys: dict[str, bytes] = {}
        for _, _, items in batch.tokenized:
            for token, _ in items:
                if token not in keys:
                    keys[token] = _token_key(token)
        known = batch.get_many(keys)
        added = 0
        for index, epoch, items in batch.tokenized:
            prefix = _U32.pack(epoch)
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

    def _apply_mappings(self, index: int, command: TokenizeCommand, batch: "_Batch") -> ApplyResult | None:
        """Insert or renew the command's mappings through the overlay (module docstring, "Expiry");
        an ApplyResult when a format token is held by another value (nothing is written then)."""
        self._add_tokens(batch)
        format_rows = command.token_format != OPAQUE_FORMAT
        prefix = b"" if format_rows else _U32.pack(command.epoch)
        rows: dict[bytes, tuple[bytes, str, int]] = {}
        for position, (token, ciphertext) in enumerate(command.items):
            key = _format_token_key(command.epoch, token) if format_rows else _token_key(token)
            first = rows.setdefault(key, (prefix + ciphertext, token, position))
            if first[0] != prefix + ciphertext:
                raise InsertOnceViolation(f"entry {index} maps one token to two values; refusing it")
        existing = batch.get_many({key: key for key in rows})
        for key, (value, _, _) in rows.items():
            found = existing.get(key)
            if found is not None and found != value:
                if format_rows:
                    return ApplyResult(index, Outcome.TOKEN_COLLISION, None, None)
                raise InsertOnceViolation(
                    f"entry {index} maps an existing token to a different value; refusing to overwrite")
        lives = batch.get_many({key: _LIFE + key for key in rows})
        now_ms = command.issued_at_ms
        for key, (value, _, position) in rows.items():
            metadata = None if command.metadata is None else command.metadata[position]
            old = _decode_life(lives.get(key))
            if existing.get(key) is None:
                batch.put(key, value)
                if not format_rows:
                    batch.token_count += 1
                new = (command.expires_at_ms, metadata)
            elif old[0] is not None and old[0] <= now_ms:
                new = (command.expires_at_ms, metadata)  # expired: a new life
            else:
                # Live: no expiry is the latest of all, and the later of two expiries wins.
                expires_at_ms = old[0]
                if old[0] is not None and command.expires_at_ms is not None:
                    expires_at_ms = max(old[0], command.expires_at_ms)
                new = (expires_at_ms, metadata if metadata is not None else old[1])
            self._set_life(key, old, new, batch)
        return None

    @staticmethod
    def _set_life(key: bytes, old: tuple[int | None, bytes | None], new: tuple[int | None, bytes | None],
                  batch: "_Batch") -> None:
        if old == new:
            return
        if old[0] is not None and old[0] != new[0]:
            batch.delete(_expiry_key(old[0], key))
        if new[0] is not None and old[0] != new[0]:
            expiry_key = _expiry_key(new[0], key)
            batch.put(expiry_key, b"")
            if batch.expiry_resume is not None and expiry_key <= batch.expiry_resume:
                batch.expiry_resume = None  # a live key below it: seek from the start again
        if new == (None, None):
            batch.delete(_LIFE + key)
        else:
            batch.put(_LIFE + key, _pack(list(new)))
            batch.has_life = True

    def _apply_purge_expired(self, index: int, command: PurgeExpiredCommand, batch: "_Batch") -> ApplyResult:
        """Delete up to ``limit`` mappings that expired at or before the command's now_ms, earliest first
        (then by row key): the expiry index's byte order, the same on every node."""
        self._add_tokens(batch)
        taken = []
        for key in batch.first_keys(_EXPIRY, _EXPIRY_END, batch.expiry_resume, command.limit):
            if _U64.unpack_from(key, 1)[0] > command.now_ms:
                break
            taken.append(key)
        for key in taken:
            row_key = key[_EXPIRY_HEADER_BYTES:]
            batch.delete(key)
            batch.delete(_LIFE + row_key)
            if row_key[:1] == _TOKEN and batch.get(row_key) is not None:
                batch.token_count -= 1
            batch.delete(row_key)
        if taken:
            batch.expiry_resume = taken[-1]
        return ApplyResult(index, Outcome.OK, 200, None, PURGE_KIND, 0, len(taken))

    def _apply_delete(self, index: int, command: DeleteTokensCommand, batch: "_Batch") -> ApplyResult:
        """Remove the rows of the tokens that exist (as of this entry), with their expiry and metadata;
        the others are not counted.

        Tokenizes earlier in the batch are settled first (_add_tokens), so a token added and deleted in
        one batch is gone. Tokenizing the same value again later re-creates the same token, with a
        new life (docs/api.md)."""
        self._add_tokens(batch)
        keys = list(dict.fromkeys(_token_key(token) for token in command.tokens))
        existing = batch.get_many({key: key for key in keys})
        lives = batch.get_many({key: _LIFE + key for key in keys})
        deleted = 0
        for key in keys:
            if existing.get(key) is not None:
                batch.delete(key)
                self._set_life(key, _decode_life(lives.get(key)), (None, None), batch)
                deleted += 1
        batch.token_count -= deleted
        actor = command.actor
        self._append_audit([command.deleted_at_ms, actor.node or UNKNOWN_NODE, actor.name, actor.key_id,
                            DELETE_KIND, len(keys), deleted, actor.request_id, None], batch)
        return ApplyResult(index, Outcome.OK, 200, _json_bytes({"deleted": deleted}), DELETE_KIND, 0, deleted)

    def _apply_destroy(self, index: int, command: DestroyEpochCommand, batch: "_Batch") -> ApplyResult:
        """Erase the epoch's wrapped secret from its row; the active epoch is refused, a destroyed one
        is destroyed already (OK again, so a retry after a lost answer succeeds)."""
        if command.epoch == batch.active_epoch:
            return ApplyResult(index, Outcome.EPOCH_ACTIVE, None, None)
        key = _epoch_key(command.epoch) if command.epoch <= MAX_STORED_EPOCH else None
        value = batch.get(key) if key is not None else None
        if key is None or value is None:
            return ApplyResult(index, Outcome.EPOCH_NOT_FOUND, None, None)
        record = _decode_epoch(key, value, StoreCorruption)
        if record.state != DESTROYED:
            batch.put(key, _pack([b"", record.created_at_ms, DESTROYED]))
        actor = command.actor
        self._append_audit([command.destroyed_at_ms, actor.node or UNKNOWN_NODE, actor.name, actor.key_id,
                            DESTROY_KIND, 0, 0, actor.request_id, str(command.epoch)], batch)
        response = _json_bytes({"epoch": command.epoch, "state": DESTROYED})
        return ApplyResult(index, Outcome.OK, 200, response, DESTROY_KIND, command.epoch, 0)

    # ------------------------------------------------------------ reads
    def lookup(self, tokens: Sequence[str], now_ms: int | None = None) -> dict[str, bytes]:
        """Ciphertexts of the known opaque tokens among ``tokens`` (unknown and expired ones are absent).

        ``now_ms`` is the read's clock (default: this machine's); a mapping whose
        expiry is at or before it is left out. One multi-get, two with expiries."""
        return lookup_opaque(self._db, tokens, now_ms, has_life=self._has_life)

    def lookup_format(self, epoch: int, tokens: Sequence[str], now_ms: int | None = None) -> dict[str, bytes]:
        """Ciphertexts of the live card and digits tokens of ``epoch`` among ``tokens`` (as ``lookup``)."""
        unique = [token for token in dict.fromkeys(tokens) if token.isascii() and token.isdigit()]
        if not unique or not 1 <= epoch <= MAX_STORED_EPOCH:
            return {}
        keys = [_format_token_key(epoch, token) for token in unique]
        found = {token: value for token, value in zip(unique, _get_many(self._db, keys)) if value is not None}
        if self._has_life and found:
            _drop_expired(self._db, found, dict(zip(unique, keys)), now_ms)
        return found

    def metadata(self, epoch: int | None, tokens: Sequence[str]) -> dict[str, bytes]:
        """The metadata ciphertexts of the mappings among ``tokens`` that have metadata: opaque tokens
        when ``epoch`` is None, else card and digits tokens of ``epoch``. Expiry is not checked here:
        ask only for tokens ``lookup`` or ``lookup_format`` found."""
        unique = list(dict.fromkeys(tokens))
        if not unique or not self._has_life:
            return {}
        if epoch is None:
            keys = [_LIFE + _token_key(token) for token in unique]
        else:
            keys = [_LIFE + _format_token_key(epoch, token) for token in unique]
        found = {}
        for token, value in zip(unique, _get_many(self._db, keys)):
            metadata = _decode_life(value)[1]
            if metadata is not None:
                found[token] = metadata
        return found

    def next_expiry_ms(self) -> int | None:
        """The earliest expiry time of any stored mapping (a seek on the expiry index), None when none."""
        start = _EXPIRY if self._expiry_resume_key is None else self._expiry_resume_key + b"\x00"
        key = _first_key(self._db, start, _EXPIRY_END)
        return None if key is None else _U64.unpack_from(key, 1)[0]

    def life(self, token: str, epoch: int | None = None) -> tuple[int | None, bytes | None]:
        """(expires_at_ms, metadata ciphertext) of a mapping as stored: an opaque token's when ``epoch``
        is None, else a format token's of ``epoch``; (None, None) without a life row."""
        row_key = _token_key(token) if epoch is None else _format_token_key(epoch, token)
        return _decode_life(self._db.get(_LIFE + row_key))

    def epochs(self) -> list[EpochRecord]:
        return _read_epochs(self._db, StoreCorruption)

    def epoch_tokens(self, epoch: int, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` tokens issued in ``epoch``, in key order, after the token ``after`` (or from
        the first): one bounded seek and scan. Opaque tokens only; format tokens, which the token
        text does not place in an epoch, would be a second key range read here."""
        if type(epoch) is not int or not 1 <= epoch <= MAX_STORED_EPOCH or not 1 <= limit <= MAX_TOKEN_PAGE:
            raise ValueError("epoch or limit out of range")
        prefix = _token_key(f"tv{epoch}_")
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        start = prefix if after is None else _token_key(after) + b"\x00"
        if start < prefix:
            start = prefix
        tokens: list[str] = []
        if start >= end:
            return tokens
        for key in _keys(self._db, start, end):
            tokens.append(key[1:].decode())
            if len(tokens) >= limit:
                break
        return tokens

    def shred(self, keys: Sequence[bytes]) -> None:
        """Drop every older version of ``keys`` (rows deleted or rewritten) from RocksDB's files.

        Flushes the memtable (RocksDB then deletes the WAL files that held the old versions) and
        compacts the key ranges down to the bottom level, where a tombstone and what it covers
        are dropped together. May run in a worker thread; costs the table files that overlap the
        keys, so many scattered keys become one range from the lowest to the highest."""
        with self._checkpoint_lock:
            if self._closed:
                raise StoreError("the store is closed")
            database = self._db
            database.flush()
            ordered = sorted(set(keys))
            ranges = ([(key, key + b"\x00") for key in ordered] if len(ordered) <= SHRED_POINT_RANGES
                      else [(ordered[0], ordered[-1] + b"\x00")])
            options = CompactOptions()
            options.set_bottommost_level_compaction(BottommostLevelCompaction.force())
            for begin, end in ranges:
                database.compact_range(begin, end, options)
            database.flush_wal(True)

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

    def audit_page(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` audit records with seq > ``after``, in order, as JSON-ready documents.

        A record that cannot be decoded is returned as ``{"seq": n, "malformed": true}`` so that a
        verifier reports it instead of the node failing the request."""
        if not 0 <= after < 2**63 or not 1 <= limit <= MAX_AUDIT_PAGE:
            raise ValueError("after or limit out of range")
        start = _AUDIT + _U64.pack(after + 1)
        page: list[dict[str, Any]] = []
        for key, value in _items(self._db, start, _AUDIT_END):
            seq = _U64.unpack_from(key, 1)[0] if len(key) == 1 + _U64.size else after + len(page) + 1
            try:
                decoded = _unpack(value)
                fields, previous, digest = decoded[1:-2], decoded[-2], decoded[-1]
                if type(decoded) is not list or len(fields) != 9 or decoded[0] != seq:
                    raise ValueError
                page.append(record_document(seq, fields, previous, digest))
            except Exception:
                page.append({"seq": seq, "malformed": True})
            if len(page) >= limit:
                break
        return page

    def idempotency_get(self, principal: str, key: str) -> IdempotencyRecord | None:
        value = self._db.get(_IDEMPOTENCY + _identity(principal, key))
        if value is None:
            return None
        kind, fingerprint, status, response, created_at_ms = _unpack(value)
        return IdempotencyRecord(principal, key, kind, fingerprint, status, response, created_at_ms)

    # ------------------------------------------------------------ durability
    def forget_membership(self) -> None:
        """Drop the recorded configuration, durably: a restore from a backup builds a new cluster, whose
        configuration is its node configs' static one, not the one of the cluster the backup came from."""
        write = WriteBatch(raw_mode=True)
        write.delete(_MEMBERSHIP_KEY)
        self._db.write(write, self._write_options)
        self._membership = None
        self.checkpoint()

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
        """
        directory = Path(directory)
        if directory.exists() or directory.is_symlink():
            raise FileExistsError(f"{directory} exists already")
        with self._checkpoint_lock:
            if self._closed:
                raise StoreError("the store is closed")
            database = self._db
            database.flush()
            Checkpoint(database).create_checkpoint(str(directory))
        options = _options(Cache(VERIFY_CACHE_BYTES))
        copy, (index, view, _) = _open_database(directory, options, StoreError, read_only=True)
        copy.close()
        return index, view

    @staticmethod
    def verify_checkpoint(directory: Path, index: int, view: int) -> None:
        """Check a received checkpoint without a full scan; raises SnapshotRejected, never anything else.

        Checks: a RocksDB database of one column family and our options, the
        marker and schema version, meta at (index, view), epochs 1..n with at
        most one (the newest) active, and a token count that fits the token rows
        and the number of entries. RocksDB verifies the checksum of every block
        it reads; blocks not read are not checked here.
        """
        if type(index) is not int or type(view) is not int or index < 0 or view < 0:
            raise SnapshotRejected("checkpoint index and view must be non-negative integers")
        try:
            options = _options(Cache(VERIFY_CACHE_BYTES))
            database, (meta_index, meta_view, token_count) = _open_database(
                Path(directory), options, SnapshotRejected, read_only=True)
        except SnapshotRejected:
            raise
        except Exception:
            raise SnapshotRejected("checkpoint cannot be opened") from None
        try:
            if (meta_index, meta_view) != (index, view):
                raise SnapshotRejected("checkpoint is not at the announced index and view")
            _check_epochs(_read_epochs(database, SnapshotRejected, limit=index), SnapshotRejected)
            _check_token_count(database, token_count, SnapshotRejected)
            _read_membership(database, SnapshotRejected)
        except SnapshotRejected:
            raise
        except Exception:
            raise SnapshotRejected("checkpoint is damaged") from None
        finally:
            database.close()

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
            _after_install_step("verified")
            target = self._path / _generation_name(int(self._generation[len(GENERATION_PREFIX):]) + 1)
            if target.exists() or target.is_symlink():
                _remove_tree(target)
            fsync_tree(staged)
            os.rename(staged, target)
            fsync_directory(self._path)
            fsync_directory(staged.parent)
            _after_install_step("renamed")
            database, meta = _open_database(target, self._options, SnapshotRejected)
            if meta[:2] != (index, view):
                database.close()
                raise SnapshotRejected("checkpoint is not at the announced index and view")
            _after_install_step("opened")
        except Exception:
            with self._install_lock:
                self._pending = None
            if target is not None and target.exists():
                _remove_tree(target)
                fsync_directory(self._path)
            raise
        prepared = PreparedInstall(index, view, target, database)
        with self._install_lock:
            self._pending = prepared
        return prepared

    def commit_install(self, prepared: PreparedInstall) -> RetiredGeneration:
        """Make a prepared generation the live state (on the apply thread; a small, bounded amount of work).

        Switches CURRENT, swaps the database handle and reloads the in-memory
        meta. Returns the replaced generation: close it from a worker thread.
        """
        with self._install_lock:
            if prepared is not self._pending or prepared._database is None:
                raise StoreError("this install is not the prepared one")
            if self._closed:
                raise StoreError("the store is closed")
            new_database = prepared._database
            _write_current(self._path, prepared.directory.name)
            old_database, old_directory = self._db, self._path / self._generation
            self._db, self._generation = new_database, prepared.directory.name
            prepared._database = None
            self._pending = None
        _after_install_step("handle_swapped")
        # Every file of the new generation was fsynced before the switch, so
        # the installed state is durable from here on.
        self._load_state(_decode_meta(new_database.get(_META_KEY), StoreCorruption))
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
        _remove_tree(prepared.directory)
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
            try:
                self._db.flush_wal(True)
            finally:
                self._db.close()


# One shared encoder: json.dumps with non-default separators builds a new
# encoder per call, which was a measurable part of applying a 1-item command.
# The output is identical to json.dumps(document, separators=(",", ":")).
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _json_bytes(document: dict[str, Any]) -> bytes:
    return _JSON_ENCODER.encode(document).encode()


class _Batch:
    """What a batch changes, kept aside until it is written as one WriteBatch.

    ``writes`` is the overlay for epoch, idempotency and age keys (None: deleted);
    reads of those keys during the batch go through it. ``live_age`` holds the
    overlay's live age keys in order, so the purge can merge them with the database.
    """

    __slots__ = ("db", "applied_index", "applied_view", "active_epoch", "token_count", "floor_ms",
                 "resume_key", "writes", "live_age", "tokenized", "api_keys", "audit_seq", "audit_head",
                 "has_life", "expiry_resume")

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
            for name, value in zip(unread, _get_many(self.db, [keys[name] for name in unread])):
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
        iterator = self.db.iter(_bounded(lower, upper))
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
        start = _AGE + _U64.pack(min(self.floor_ms, _NO_RECORDS - 1))
        if self.resume_key is not None:
            start = max(start, self.resume_key + b"\x00")
        iterator = self.db.iter(read_options)
        iterator.seek(start)
        return self._merged_keys(iterator, self.live_age, bisect.bisect_left(self.live_age, start), count)
