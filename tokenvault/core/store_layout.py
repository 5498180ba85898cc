"""The store's rows: key layout, row encodings, constants, records, errors and the small RocksDB helpers
shared by tokenvault.core.store (the writer), tokenvault.core.store_lifecycle, tokenvault.core.store_files
and tokenvault.core.store_reader (the workers' read-only views).

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
"""

from __future__ import annotations

import bisect
import json
import re
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

import msgpack
from rocksdict import (
    AccessType,
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    DBRecoveryMode,
    Options,
    Rdict,
    ReadOptions,
)

from protocol import Membership, MembershipError
from protocol.codec import MAX_INTEGER
from tokenvault.audit_chain import GENESIS_HASH
from tokenvault.auth import RuntimeKey
from tokenvault.core.commands import KEY_ID_PATTERN, is_digit_string
from tokenvault.smallfiles import FileTooLarge, read_small_file

SCHEMA_VERSION = 2  # version 1 was the SQLite store
STORE_MARKER = "tokenvault-store"  # first field of the meta record: marks a database as ours
# What rocksdict writes beside a raw-mode database; it reads it back on open and
# it could switch the comparator or add prefix extractors, so anything else is refused.
ROCKSDICT_CONFIG_FILE = "rocksdict-config.json"
_ROCKSDICT_CONFIG = {"raw_mode": True, "prefix_extractors": {}}
# rocksdict writes that record as a few dozen bytes of JSON.
MAX_ROCKSDICT_CONFIG_BYTES = 4096

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
# A whole-key bloom filter on each memtable, this share of its size (1.3 MB: about 10 bits
# for each of the 0.7-1 M rows a full memtable holds). Without it every lookup of a key
# not in the memtable walks its skip list: 1-2.6 us a key at 0.1-0.5 M rows against
# 0.2-0.3 with the filter (bench/memtable_bloom.py), paid by the read check and the apply
# of every new token on every node.
MEMTABLE_BLOOM_RATIO = 0.02
# One flush and one compaction at a time: the node's other work keeps the other cores.
MAX_BACKGROUND_JOBS = 2
# RocksDB's MANIFEST gains a record with every flush and compaction, and every shred makes both
# (tokenvault/core/shred.py); past this size RocksDB starts a new one holding only the live files.
# Every open replays it, a worker's view after each flush included, on its event loop: unbounded (RocksDB's
# default is 1 GiB) it grew to 347 KiB in five minutes of one delete every 0.2 s, and a view open took
# 200 ms, five in a row held a worker 9 s; bounded so, an open stays under 10 ms (bench/manifest_growth.py).
MAX_MANIFEST_BYTES = 64 * 1024
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
# Keys a shred compacts each as a range of its own; more are grouped by bottom-level file
# (shred_ranges). A range a key measured cheaper than grouping at 16 and 32 deletes (32 and 64 keys);
# past it grouping beat the one range used before (bench/shred_cost.py, docs/performance.md). A range
# a key past 64 keys was not measured.
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
AUDIT_TRIM_KIND = "audit.trim"
# Runtime API keys in the replicated table: bounded so the in-memory copy is.
MAX_API_KEYS = 1000
# Audit records one page read returns at most.
MAX_AUDIT_PAGE = 1000
UNKNOWN_NODE = "-"

TOKEN = b"t"
EPOCH = b"e"
IDEMPOTENCY = b"i"
AGE = b"a"
META_KEY = b"m"
AGE_END = b"b"  # first key after the age index
EPOCH_END = b"f"
TOKEN_END = b"u"
API_KEY = b"k"
API_KEY_END = b"l"
AUDIT = b"A"
AUDIT_END = b"B"
AUDIT_HEAD_KEY = b"h"
# [seq, hash] of the last record an audit trim dropped: the chain's records start after it.
AUDIT_ANCHOR_KEY = b"n"
FORMAT_TOKEN = b"F"
FORMAT_TOKEN_END = b"G"
LIFE = b"L"
LIFE_END = b"M"
EXPIRY = b"X"
EXPIRY_END = b"Y"
EXPIRY_HEADER_BYTES = 1 + 8
MEMBERSHIP_KEY = b"c"
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
AGE_HEADER_BYTES = 1 + U64.size
NO_RECORDS = 2**63  # the idempotency floor of an empty age index


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
    AUDIT_RECORD_NOT_FOUND = "audit_record_not_found"
    AUDIT_HASH_MISMATCH = "audit_hash_mismatch"
    AUDIT_TRIMMED_ALREADY = "audit_trimmed_already"


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
    # A tokenize that carried metadata: it set, or replaced, what its mappings' metadata reads as.
    sets_metadata: bool = False


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


class StoreDamaged(StoreCorruption):
    """RocksDB met a damaged file (a block whose checksum does not match, a truncated file) in an apply
    or a read: the node stops (tokenvault.core.store, docs/failure-modes.md)."""


class SnapshotRejected(StoreError):
    """A received checkpoint failed validation; the current state is untouched."""


# ---------------------------------------------------------------- encoding
def identity_key(principal: str, key: str) -> bytes:
    return (principal.encode().replace(b"\x00", b"\x00\xff") + b"\x00"
            + key.encode().replace(b"\x00", b"\x00\xff") + b"\x00")


def token_key(token: str) -> bytes:
    return TOKEN + token.encode()


def format_token_key(epoch: int, token: str) -> bytes:
    return FORMAT_TOKEN + U32.pack(epoch) + token.encode("ascii")


def delete_row_keys(tokens: Iterable[str], format_epoch: int | None) -> list[bytes]:
    """The mapping rows a delete names, each once: an opaque token's, and a card or digits token's (a digit
    string) of ``format_epoch``; a digit string names none when no epoch is given."""
    keys = (token_key(token) if not is_digit_string(token)
            else None if format_epoch is None else format_token_key(format_epoch, token) for token in tokens)
    return list(dict.fromkeys(key for key in keys if key is not None))


def expiry_index_key(expires_at_ms: int, row_key: bytes) -> bytes:
    return EXPIRY + U64.pack(expires_at_ms) + row_key


def decode_life(value: bytes | None) -> tuple[int | None, bytes | None]:
    """(expires_at_ms, metadata ciphertext) of a mapping; (None, None) when it has no ``L`` row."""
    if value is None:
        return None, None
    try:
        expires_at_ms, metadata = unpack(value)
    except Exception:
        raise StoreCorruption("a mapping's life record is malformed") from None
    if (expires_at_ms is not None and not _is_count(expires_at_ms)) or (
            metadata is not None and type(metadata) is not bytes):
        raise StoreCorruption("a mapping's life record is malformed")
    return expires_at_ms, metadata


def epoch_key(epoch: int) -> bytes:
    return EPOCH + U64.pack(epoch)


def age_key(created_at_ms: int, identity: bytes) -> bytes:
    return AGE + U64.pack(created_at_ms) + identity


def age_created_at(age_key: bytes) -> int:
    created_at_ms: int = U64.unpack_from(age_key, 1)[0]
    return created_at_ms


def pack(value: object) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def encode_meta(applied_index: int, applied_view: int, token_count: int) -> bytes:
    return pack([STORE_MARKER, SCHEMA_VERSION, applied_index, applied_view, token_count])


def unpack(value: bytes) -> Any:
    """A msgpack document: of no known shape until the caller has checked it."""
    return msgpack.unpackb(value, raw=False, strict_map_key=True)


def _is_count(value: object) -> bool:
    """An int of 0..MAX_INTEGER (2**63 - 1): no index, view, count or time the vault writes is larger, and the
    replication log refuses a larger one (a restore from a meta record past it failed in the log, not here)."""
    return type(value) is int and 0 <= value <= MAX_INTEGER


def decode_meta(value: bytes | None, error: type[StoreError]) -> tuple[int, int, int]:
    """(applied_index, applied_view, token_count) from the meta record, or ``error``."""
    if value is None:
        raise error("not a TokenVault store (no meta record)")
    try:
        meta = unpack(value)
    except Exception:
        raise error("not a TokenVault store (meta record is not readable)") from None
    if type(meta) is not list or len(meta) < 2 or meta[0] != STORE_MARKER:
        raise error("not a TokenVault store (marker differs)")
    if meta[1] != SCHEMA_VERSION:
        raise error("unsupported store schema version")
    if len(meta) != 5 or not all(_is_count(field_value) for field_value in meta[2:]):
        raise error(f"store meta record is malformed: it is not [marker, version, applied index, view, token "
                    f"count], each count an integer from 0 to {MAX_INTEGER}")
    return meta[2], meta[3], meta[4]


def read_membership(database: Rdict, error: type[StoreError]) -> Membership | None:
    value = database.get(MEMBERSHIP_KEY)
    if value is None:
        return None
    try:
        return Membership.decode(bytes(value))
    except MembershipError as failure:
        raise error(f"store membership record is malformed: {failure}") from None


def decode_epoch(key: bytes, value: bytes, error: type[StoreError]) -> EpochRecord:
    try:
        wrapped_secret, created_at_ms, state = unpack(value)
    except Exception:
        raise error("an epoch record is malformed") from None
    if (len(key) != 1 + U64.size or type(wrapped_secret) is not bytes or not _is_count(created_at_ms)
            or state not in (ACTIVE, RETIRED, DESTROYED)):
        raise error("an epoch record is malformed")
    return EpochRecord(U64.unpack_from(key, 1)[0], wrapped_secret, created_at_ms, state)


def api_key_value(entry: RuntimeKey) -> bytes:
    return pack([entry.name, sorted(entry.scopes), entry.salt, entry.digest, entry.created_at_ms,
                  entry.created_by])


def _decode_api_key(key: bytes, value: bytes, error: type[StoreError]) -> RuntimeKey:
    """One ``k`` row, each field of the type api_key_value wrote (a key table is pushed to the HTTP workers
    and used by every authentication: a field of another type would fail there, not here)."""
    try:
        name, scopes, salt, digest, created_at_ms, created_by = unpack(value)
        key_id = key[1:].decode("ascii")
    except Exception:
        raise error("an API key record is malformed") from None
    if (KEY_ID_PATTERN.match(key_id) is None or type(name) is not str or type(scopes) is not list
            or not all(type(scope) is str for scope in scopes) or type(salt) is not bytes
            or type(digest) is not bytes or not _is_count(created_at_ms) or type(created_by) is not str):
        raise error("an API key record is malformed")
    return RuntimeKey(key_id, name, frozenset(scopes), salt, digest, created_at_ms, created_by)


def read_api_keys(database: Rdict, error: type[StoreError]) -> dict[str, RuntimeKey]:
    keys: dict[str, RuntimeKey] = {}
    for key, value in range_items(database, API_KEY, API_KEY_END):
        entry = _decode_api_key(key, value, error)
        keys[entry.key_id] = entry
        if len(keys) > MAX_API_KEYS:
            raise error("more API keys than the table may hold")
    return keys


def read_audit_anchor(database: Rdict, error: type[StoreError]) -> tuple[int, bytes]:
    """(seq, hash) of the last record an audit trim dropped; (0, the genesis hash) if none was."""
    return _read_seq_and_hash(database, AUDIT_ANCHOR_KEY, "anchor", error)


def read_audit_head(database: Rdict, error: type[StoreError]) -> tuple[int, bytes]:
    return _read_seq_and_hash(database, AUDIT_HEAD_KEY, "head", error)


def _read_seq_and_hash(database: Rdict, key: bytes, name: str, error: type[StoreError]) -> tuple[int, bytes]:
    value = database.get(key)
    if value is None:
        return 0, GENESIS_HASH
    try:
        seq, digest = unpack(value)
    except Exception:
        raise error(f"the audit {name} record is malformed") from None
    if not _is_count(seq) or type(digest) is not bytes or len(digest) != len(GENESIS_HASH):
        raise error(f"the audit {name} record is malformed")
    return seq, digest


# One shared encoder: json.dumps with non-default separators builds a new
# encoder per call, which was a measurable part of applying a 1-item command.
# The output is identical to json.dumps(document, separators=(",", ":")).
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"))


def json_bytes(document: dict[str, Any]) -> bytes:
    return _JSON_ENCODER.encode(document).encode()


def shred_ranges(keys: Iterable[bytes], bottom_files: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The key ranges, [begin, end), a shred compacts to drop the older versions of ``keys``, given the
    (first key, last key) of each table file of RocksDB's bottom level, in key order (none: the store
    has no level below its first). Up to SHRED_POINT_RANGES keys, a range each. More are grouped by the
    bottom file that holds their place in key order (or the gap between two files), a range a group
    from its lowest key to its highest: a forced compaction rewrites every bottom file its range
    overlaps, so each file that holds a key is rewritten once and no other. (One range from the lowest
    key to the highest, as before, rewrote every file between: at 50 M tokens a pass of 33 deletes took
    60 s, 27 s grouped; docs/performance.md, "What a shred pass costs as the store grows".) Every key is
    in a range, the ranges are disjoint and in key order."""
    ordered = sorted(set(keys))
    if len(ordered) <= SHRED_POINT_RANGES:
        return [(key, key + b"\x00") for key in ordered]
    starts = [first for first, _ in bottom_files]
    groups: list[list[bytes]] = []
    slot = -1
    for key in ordered:
        # 2i + 1: within the i-th file; 2i: in the gap before it (2n: after the last).
        at = bisect.bisect_right(starts, key) - 1
        here = 2 * at + 1 if at >= 0 and key <= bottom_files[at][1] else 2 * (at + 1)
        if here != slot:
            groups.append([])
            slot = here
        groups[-1].append(key)
    return [(group[0], group[-1] + b"\x00") for group in groups]


def files_overlapped(ranges: Sequence[tuple[bytes | None, bytes | None]],
                     bottom_files: Sequence[tuple[bytes, bytes]]) -> int:
    """How many of ``bottom_files`` ((first key, last key), in key order) at least one of ``ranges`` ([begin,
    end)) overlaps: the bottom files a shred of those ranges rewrites."""
    starts = [first for first, _ in bottom_files]
    touched: set[int] = set()
    for begin, end in ranges:
        # The files from the last that starts at or before ``begin`` to the last that starts before ``end``
        # (None: before every key, after every key).
        low = 0 if begin is None else max(bisect.bisect_right(starts, begin) - 1, 0)
        high = len(starts) if end is None else bisect.bisect_left(starts, end)
        touched.update(number for number in range(low, high) if begin is None or bottom_files[number][1] >= begin)
    return len(touched)


def whole_key_space_ranges(bottom_files: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes | None, bytes | None]]:
    """The whole key space as ranges a shred compacts one after another, given the (first key, last key)
    of each table file of RocksDB's bottom level, in key order: cut at the first key of every file but
    the first, so that each range rewrites about one bottom file (and the gaps beside it) and the
    shredder can rest between two. Disjoint but for their bounds, in key order, covering every key (None:
    before the first key or after the last); one range when the store has no level below its first."""
    bounds: list[bytes | None] = [None, *(first for first, _ in bottom_files[1:]), None]
    return list(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------- RocksDB
def database_options(cache: Cache, *, create: bool = False, metadata_in_cache: bool = False) -> Options:
    """The options every open of a generation uses. ``metadata_in_cache`` (the workers' views): each
    table file's index and filter blocks live in ``cache``, loaded when first read, instead of being
    read into the file's table reader when it is opened, so that a view opened again finds them there
    (tokenvault.core.store_reader); the files written are the same either way."""
    options = Options(raw_mode=True)
    options.create_if_missing(create)
    options.set_error_if_exists(create)
    table = BlockBasedOptions()
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)
    table.set_block_cache(cache)
    if metadata_in_cache:
        table.set_cache_index_and_filter_blocks(True)
        # A new level-0 file is the one most lookups of recent tokens read first.
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    options.set_block_based_table_factory(table)
    # Ciphertexts are random, so compression gains little; lz4 costs little on the
    # upper levels and zstd packs the bottom level (most of the data) a bit tighter.
    options.set_compression_type(DBCompressionType.lz4())
    options.set_bottommost_compression_type(DBCompressionType.zstd())
    options.set_write_buffer_size(WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(MAX_WRITE_BUFFERS)
    options.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO)
    options.set_memtable_whole_key_filtering(True)
    options.set_level_compaction_dynamic_level_bytes(True)
    options.set_max_background_jobs(MAX_BACKGROUND_JOBS)
    options.set_max_manifest_file_size(MAX_MANIFEST_BYTES)
    options.set_keep_log_file_num(INFO_LOG_KEEP_FILES)
    options.set_max_log_file_size(INFO_LOG_MAX_BYTES)
    # After a power cut, recover up to the first damaged WAL record: a prefix of
    # the applied batches, each whole (the replication log has the rest).
    options.set_wal_recovery_mode(DBRecoveryMode.point_in_time())
    return options


# RocksDB's aggregated table properties name these sums over every live table file, as "name=value; ".
_METADATA_PROPERTY = "rocksdb.aggregated-table-properties"
_METADATA_FIELDS = ("index block size", "filter block size")


def table_metadata_bytes(database: Rdict) -> int | None:
    """The bytes of every index and filter block of the database's table files; None when RocksDB's
    properties do not say (then nothing depends on the figure but a cache's size)."""
    text = database.property_value(_METADATA_PROPERTY)
    return parse_table_metadata_bytes(text) if isinstance(text, str) else None


def parse_table_metadata_bytes(text: str) -> int | None:
    sizes: dict[str, int] = {}
    for field in text.split(";"):
        name, equals, value = field.strip().rpartition("=")
        # "index block size (user-key? 17, delta-value? 17)=3928243": the name's own words come first.
        label = next((known for known in _METADATA_FIELDS if name.startswith(known)), None)
        if equals and label is not None and value.isdigit() and label not in sizes:
            sizes[label] = int(value)
    return sum(sizes.values()) if len(sizes) == len(_METADATA_FIELDS) else None


# A few RocksDB statuses quote a key in hex (say "corrupted internal key in DBIter: 74..."): any run of
# hex digits this long is cut out of a quoted status. Checksums, offsets and file numbers are decimal
# and shorter.
_HEX_RUN = re.compile(r"(?:0x)?[0-9A-Fa-f]{16,}")
_DIRECTORIES = re.compile(r"(?:/[^/\s]+)+/(?=[^/\s]+)")


def reason(failure: BaseException, *, file_names_only: bool = False) -> str:
    """RocksDB's own words (a status such as "IO error: ..." or "Corruption: block checksum
    mismatch ..." naming files and offsets; a key it quotes in hex is cut out), one line, bounded.
    ``file_names_only``: the files' names without their directories, so that the bound keeps what
    follows them (an offset)."""
    text = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
    if file_names_only:
        text = _DIRECTORIES.sub("", text)
    return _HEX_RUN.sub("<hex>", text)[:REASON_MAX_CHARS]


def damage(failure: BaseException) -> StoreDamaged | None:
    """A StoreDamaged for RocksDB's report of a damaged file (a block whose checksum does not match, a
    truncated file: its status starts "Corruption" and names the file and the offset); None for any
    other failure."""
    text = reason(failure, file_names_only=True)
    return StoreDamaged(f"the store is damaged: {text}") if text.startswith("Corruption") else None


def check_rocksdict_config(directory: Path, error: type[StoreError]) -> None:
    config = directory / ROCKSDICT_CONFIG_FILE
    if not config.exists():
        return
    try:
        document = json.loads(read_small_file(config, MAX_ROCKSDICT_CONFIG_BYTES))
    except OSError as failure:  # a directory, a file the node may not read: EISDIR, EACCES
        raise error(f"{config} cannot be read ({failure.strerror or type(failure).__name__})") from None
    except (ValueError, RecursionError, FileTooLarge):  # RecursionError: JSON nested past the parser's depth
        raise error(f"{config} is not JSON, or too large to be the one the store wrote") from None
    if document != _ROCKSDICT_CONFIG:
        raise error(f"{ROCKSDICT_CONFIG_FILE} holds options this store does not use")


def open_database(directory: Path, options: Options, error: type[StoreError], *,
                   read_only: bool = False) -> tuple[Rdict, tuple[int, int, int]]:
    """Open an existing generation; returns it with its meta. Any problem raises ``error``."""
    if directory.is_symlink() or not directory.is_dir():
        raise error(f"{directory} is not a database directory")
    check_rocksdict_config(directory, error)
    try:
        family_names = Rdict.list_cf(str(directory), options)
    except Exception as failure:
        raise error(f"{directory} is not a readable RocksDB database: {reason(failure)}") from None
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
        raise error(f"{directory} cannot be opened as a RocksDB database: {reason(failure)}") from None
    try:
        try:
            meta_value = database.get(META_KEY)
        except Exception as failure:
            raise error(f"{directory}: reading the meta record failed: {reason(failure)}") from None
        return database, decode_meta(meta_value, error)
    except BaseException:
        database.close()
        raise


def bounded(lower: bytes, upper: bytes) -> ReadOptions:
    read_options = ReadOptions()
    read_options.set_iterate_lower_bound(lower)
    read_options.set_iterate_upper_bound(upper)
    return read_options


# rocksdict's stubs type a key as any of str, int, float, bytes and bool and a value as Any, whatever
# the mode; every database here is opened in raw mode (Options(raw_mode=True)), where both are bytes.
_RdictKey = str | int | float | bytes | bool


def range_items(database: Rdict, lower: bytes, upper: bytes) -> Iterable[tuple[bytes, bytes]]:
    """The rows in [lower, upper) in key order. The start is explicit: RocksDB applies
    iterate_lower_bound to backward moves only."""
    return cast("Iterable[tuple[bytes, bytes]]", database.items(from_key=lower, read_opt=bounded(lower, upper)))


def bottom_files(database: Rdict) -> list[tuple[bytes, bytes]]:
    """(first key, last key) of each table file of the database's bottom level, in key order; none when
    every file is in level 0 (whose files overlap: a shred then compacts one range, all of it small)."""
    files = [(entry["level"], entry["start_key"], entry["end_key"]) for entry in database.live_files()]
    bottom = max((level for level, _, _ in files), default=0)
    if bottom == 0:
        return []
    return sorted((first, last) for level, first, last in files if level == bottom)


def range_keys(database: Rdict, lower: bytes, upper: bytes) -> Iterable[bytes]:
    """The keys in [lower, upper) in key order (as ``range_items``)."""
    return cast("Iterable[bytes]", database.keys(from_key=lower, read_opt=bounded(lower, upper)))


def multi_get(database: Rdict, keys: list[bytes]) -> list[bytes | None]:
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
    keys = [token_key(token) for token in unique]
    values = multi_get(database, keys)
    found = {token: value[U32.size:] for token, value in zip(unique, values) if value is not None}
    if has_life and found:
        drop_expired(database, found, dict(zip(unique, keys)), now_ms)
    return found


def lookup_format_tokens(database: Rdict, epoch: int, tokens: Sequence[str], now_ms: int | None, *,
                         has_life: bool) -> dict[str, bytes]:
    """Ciphertexts of the live card and digits tokens of ``epoch`` among ``tokens`` in ``database``
    (VaultStore.lookup_format; also a worker's view's), as ``lookup_opaque``."""
    unique = [token for token in dict.fromkeys(tokens) if is_digit_string(token)]
    if not unique or not 1 <= epoch <= MAX_STORED_EPOCH:
        return {}
    keys = [format_token_key(epoch, token) for token in unique]
    found = {token: value for token, value in zip(unique, multi_get(database, keys)) if value is not None}
    if has_life and found:
        drop_expired(database, found, dict(zip(unique, keys)), now_ms)
    return found


def metadata_rows(database: Rdict, epoch: int | None, tokens: Sequence[str], *, has_life: bool) -> dict[str, bytes]:
    """The metadata ciphertexts in ``database`` of the mappings among ``tokens`` that have metadata:
    opaque tokens when ``epoch`` is None, else card and digits tokens of ``epoch`` (VaultStore.metadata).
    Metadata lives in a mapping's life row, so a store without life rows has none."""
    return {token: metadata for token, (_, metadata) in life_rows(database, epoch, tokens, has_life=has_life).items()
            if metadata is not None}


def life_rows(database: Rdict, epoch: int | None, tokens: Sequence[str], *,
              has_life: bool) -> dict[str, tuple[int | None, bytes | None]]:
    """(expires_at_ms, metadata ciphertext) of each mapping among ``tokens`` that has a life row, in one
    multi-get: opaque tokens when ``epoch`` is None, else card and digits tokens of ``epoch``."""
    unique = list(dict.fromkeys(tokens))
    if not unique or not has_life:
        return {}
    keys = [LIFE + (token_key(token) if epoch is None else format_token_key(epoch, token)) for token in unique]
    return {token: decode_life(value) for token, value in zip(unique, multi_get(database, keys)) if value is not None}


def drop_expired(database: Rdict, found: dict[str, bytes], row_keys: dict[str, bytes], now_ms: int | None) -> None:
    """Leave out of ``found`` the mappings whose expiry is at or before ``now_ms`` (default: now)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    tokens = list(found)
    for token, value in zip(tokens, multi_get(database, [LIFE + row_keys[token] for token in tokens])):
        expires_at_ms = decode_life(value)[0]
        if expires_at_ms is not None and expires_at_ms <= now_ms:
            del found[token]


def read_epochs(database: Rdict, error: type[StoreError], limit: int | None = None) -> list[EpochRecord]:
    records = []
    for key, value in range_items(database, EPOCH, EPOCH_END):
        records.append(decode_epoch(key, value, error))
        if limit is not None and len(records) > limit:
            raise error("more epochs than applied entries")
    return records


def check_epochs(records: list[EpochRecord], error: type[StoreError]) -> int:
    """The active epoch (0 if none): epochs run 1..n, only the last may be active."""
    if [record.epoch for record in records] != list(range(1, len(records) + 1)):
        raise error("epoch records are not the consecutive epochs 1..n")
    active = [record.epoch for record in records if record.state == ACTIVE]
    if len(active) > 1:
        raise error("more than one active epoch")
    if active and active[0] != len(records):
        raise error("an epoch other than the newest is active")
    return active[0] if active else 0


def first_key(database: Rdict, lower: bytes, upper: bytes) -> bytes | None:
    iterator = database.iter(bounded(lower, upper))
    iterator.seek(lower)
    return iterator.key() if iterator.valid() else None


def _entry_upper_bound(database: Rdict) -> int:
    """At least the number of distinct live keys: every one has an entry in a table file or a memtable."""
    in_tables = sum(int(live["num_entries"]) for live in database.live_files())
    in_memory = sum(database.property_int_value(name) or 0 for name in (
        "rocksdb.num-entries-active-mem-table", "rocksdb.num-entries-imm-mem-tables"))
    return in_tables + in_memory


def check_token_count(database: Rdict, token_count: int, error: type[StoreError]) -> None:
    """Cheap plausibility of the meta's token count: no scan, a seek and file metadata only."""
    has_tokens = first_key(database, TOKEN, TOKEN_END) is not None
    if has_tokens != (token_count > 0):
        raise error("token count in meta contradicts the token rows")
    if token_count > _entry_upper_bound(database):
        raise error("token count in meta exceeds the entries in the database")

