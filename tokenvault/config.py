"""The node configuration: a TOML file, validated completely before a node starts.

``load_config(path)`` reads and validates a file; ``to_toml(config)`` and
``write_node_config(path, config)`` write one (tomllib cannot write, so this
module has a small emitter for exactly this schema). Every record validates
itself on construction, so a NodeConfig built in code (as the cluster tool
does) is held to the same rules as one read from disk.

Error messages name the offending key and never contain secret material: of the
values, only integers and paths (a key file's, the data directory's) are echoed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from protocol.membership import MAX_MEMBERS
from tokenvault.auth import (ALL_SCOPES, KEY_AS_NAME, PRINCIPAL_NAME_PATTERN, ApiKeyEntry, ApiKeyTable,
                             ApiKeyTableError, looks_like_a_key)
from tokenvault.crypto.keys import (MASTER_KEY_ENVIRONMENT_VARIABLE, MAX_VALUE_BYTES, CryptoError, KeyWrapper, MasterKey,
                                   read_secret_file, take_from_environment)
from tokenvault.crypto.tls import NodeTlsFiles
from tokenvault.smallfiles import FileTooLarge, fsync_directory, read_small_file, write_whole

CLUSTER_SECRET_BYTES = 32
# A cluster starts with an odd count of members (a majority of an even one tolerates no more failures than
# the odd count below it), at most what a configuration holds.
ALLOWED_MEMBER_COUNTS = tuple(range(1, MAX_MEMBERS + 1, 2))
LOG_LEVELS = ("debug", "info", "warning", "error")
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_HOSTNAME_PATTERN = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
_MAX_CONFIG_FILE_BYTES = 1 << 20
_ENVIRONMENT_VARIABLE_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
DEFAULT_PIN_ENVIRONMENT_VARIABLE = "TOKENVAULT_PKCS11_PIN"


class ConfigError(ValueError):
    """The configuration is invalid or a file it names cannot be used."""


def _shown(value: int | float) -> str:
    """A refused number as an error message shows it. TOML reads integers of any length (a hexadecimal one of
    thousands of digits in a small file), and Python will not write one of more than 4300 digits as text."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return str(value)


def _check_int(name: str, value: object, minimum: int, maximum: int) -> None:
    # bool is an int subclass; `fsync = true` must not pass as a port.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer")
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {_shown(value)}")


def _check_fraction(name: str, value: object, minimum: float, maximum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number")
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum:g} and {maximum:g}, got {_shown(value)}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false")


def _check_string(name: str, value: object, max_chars: int = 4096) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string")
    if len(value) > max_chars:
        raise ConfigError(f"{name} must be at most {max_chars} characters")
    return value


def _check_host(name: str, value: object) -> None:
    host = _check_string(name, value, 253)
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not _HOSTNAME_PATTERN.match(host):
        raise ConfigError(f"{name} must be an IP address or a host name")


def _check_path(name: str, value: object, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Path):
        raise ConfigError(f"{name} must be a path")
    text = str(value)
    if not value.is_absolute():
        raise ConfigError(f"{name} must be an absolute path")
    if "\x00" in text or len(text) > 4096:
        raise ConfigError(f"{name} is not a usable path")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{name} must be valid UTF-8") from None


def split_host_port(name: str, address: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[ipv6]:port``."""
    host, separator, port_text = address.rpartition(":")
    if not separator or not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ConfigError(f"{name} must be host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{name} must put only an IPv6 address in brackets") from None
    else:
        _check_host(name, host)
    port = int(port_text)
    _check_int(f"{name} port", port, 1, 65535)
    return host, port


MAX_HTTP_WORKERS = 256
# Each backup stream pins a checkpoint of the whole store on disk until it ends.
MAX_BACKUP_STREAMS = 16


@dataclass(frozen=True, slots=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8101
    # A connection must deliver a request's headers within header_timeout_ms of
    # opening (or of the previous response), and each piece of a request body
    # within body_timeout_ms of the last; otherwise it is closed.
    header_timeout_ms: int = 10_000
    body_timeout_ms: int = 10_000
    # Open HTTP connections beyond max_connections are answered 503 and closed at once.
    max_connections: int = 1024
    # Request bodies being received at once, on the whole node and per API key
    # (docs/security.md, "Unauthenticated and abusive traffic").
    max_body_reads: int = 256
    max_body_reads_per_key: int = 32
    # Requests being worked on at once on the node, once their bodies are in memory (every request with
    # a body; not /health, /metrics or a backup stream): past it 503 overloaded, Retry-After 1.
    max_inflight_requests: int = 256
    # Backup streams (GET /v1/admin/backup) at once on the node: each holds a checkpoint of the store
    # (hard links) and a thread reading it; past it 503 backup-busy, Retry-After 5.
    max_backup_streams: int = 1
    # HTTP worker processes sharing the port (tokenvault.api.workers): absent, the machine's cores
    # minus one (at least one); 0 keeps the whole node in one process (for debugging). The limits
    # above are the node's: each worker enforces its even share of them (docs/architecture.md).
    workers: int | None = None
    # Whether the workers answer detokenizes and repeat tokenizes of tokens they find in their own
    # read-only view of the store (tokenvault.core.store_reader); false sends them all to the core;
    # absent, on when the node runs 2 or more workers (with one, the worker is the busier process
    # and the view's work costs more there than it saves the core: docs/performance.md).
    store_reads: bool | None = None

    def __post_init__(self) -> None:
        _check_host("http.host", self.host)
        if self.store_reads is not None:
            _check_bool("http.store_reads", self.store_reads)
        if self.workers is not None:
            _check_int("http.workers", self.workers, 0, MAX_HTTP_WORKERS)
        _check_int("http.port", self.port, 1, 65535)
        _check_int("http.header_timeout_ms", self.header_timeout_ms, 10, 600_000)
        _check_int("http.body_timeout_ms", self.body_timeout_ms, 10, 600_000)
        _check_int("http.max_connections", self.max_connections, 1, 1_000_000)
        _check_int("http.max_body_reads", self.max_body_reads, 1, 1_000_000)
        _check_int("http.max_body_reads_per_key", self.max_body_reads_per_key, 1, self.max_body_reads)
        _check_int("http.max_inflight_requests", self.max_inflight_requests, 1, 1_000_000)
        _check_int("http.max_backup_streams", self.max_backup_streams, 1, MAX_BACKUP_STREAMS)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    host: str = "127.0.0.1"
    port: int = 8201
    # Connections on the peer port that have not finished the handshake, at once; the rest are closed at
    # once, so strangers cannot tie up more than this many sockets and handshake buffers.
    max_unauthenticated_connections: int = 8

    def __post_init__(self) -> None:
        _check_host("peer.host", self.host)
        _check_int("peer.port", self.port, 1, 65535)
        _check_int("peer.max_unauthenticated_connections", self.max_unauthenticated_connections, 1, 1024)


@dataclass(frozen=True, slots=True)
class MemberConfig:
    """One cluster member as every node sees it."""

    id: str
    peer_addr: str
    http_url: str

    def __post_init__(self) -> None:
        _check_string("members.id", self.id, 32)
        if not NODE_ID_PATTERN.match(self.id):
            raise ConfigError(
                "members.id must be 1-32 characters of [A-Za-z0-9_.-] starting with a letter or digit"
            )
        label = f"members[{self.id}]"
        _check_string(f"{label}.peer_addr", self.peer_addr, 300)
        split_host_port(f"{label}.peer_addr", self.peer_addr)
        self._http_host_port(label)

    def _http_host_port(self, label: str) -> tuple[str, int]:
        name = f"{label}.http_url"
        url = _check_string(name, self.http_url, 300)
        if not url.isascii() or any(character.isspace() or not character.isprintable() for character in url):
            raise ConfigError(f"{name} must be printable ASCII without spaces")
        shape = f"{name} must look like https://host:port (or http://host:port without TLS)"
        try:
            parts = urlsplit(url)
        except ValueError:  # an unclosed bracket, or brackets around something not an IPv6 address
            raise ConfigError(shape) from None
        # https:// when the cluster has a [tls] section, http:// for a plain one (NodeConfig checks which).
        if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(shape)
        if parts.username is not None or parts.password is not None:
            raise ConfigError(f"{name} must not contain credentials")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{name} has an invalid port") from None
        if port is None or parts.hostname is None:
            raise ConfigError(f"{name} must name a host and a port")
        if ":" not in parts.hostname:
            _check_host(name, parts.hostname)
        _check_int(f"{name} port", port, 1, 65535)
        return parts.hostname, port

    @property
    def http_scheme(self) -> str:
        return urlsplit(self.http_url).scheme

    @property
    def peer_host(self) -> str:
        return split_host_port("peer_addr", self.peer_addr)[0]

    @property
    def peer_port(self) -> int:
        return split_host_port("peer_addr", self.peer_addr)[1]


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_items: int = 1000
    max_value_bytes: int = 4096
    max_body_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        _check_int("limits.max_items", self.max_items, 1, 100_000)
        _check_int("limits.max_value_bytes", self.max_value_bytes, 1, MAX_VALUE_BYTES)
        _check_int("limits.max_body_bytes", self.max_body_bytes, 1024, 1024 * 1024 * 1024)


RATE_LIMIT_KINDS = ("tokenize", "detokenize", "admin")
MAX_RATE_LIMIT_KEYS = 10_000


def _rate_and_burst(rate: int, burst: int) -> tuple[int, int]:
    return (0, 0) if rate == 0 else (rate, burst or rate)


@dataclass(frozen=True, slots=True)
class KeyRateLimitsConfig:
    """One API key's own limits (``[[rate_limits.keys]]``), by the key's name; a kind whose
    ``_per_second`` is left out keeps the ``[rate_limits]`` default."""

    name: str
    tokenize_per_second: int | None = None
    tokenize_burst: int | None = None
    detokenize_per_second: int | None = None
    detokenize_burst: int | None = None
    admin_per_second: int | None = None
    admin_burst: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not PRINCIPAL_NAME_PATTERN.match(self.name):
            raise ConfigError("rate_limits.keys: name must be an API key name (1-64 characters of "
                              "[A-Za-z0-9_.-] starting with a letter or digit)")
        if looks_like_a_key(self.name):
            raise ConfigError(f"rate_limits.keys: {KEY_AS_NAME}")
        for kind in RATE_LIMIT_KINDS:
            rate, burst = getattr(self, f"{kind}_per_second"), getattr(self, f"{kind}_burst")
            label = f"rate_limits.keys[{self.name}].{kind}"
            if rate is not None:
                _check_int(f"{label}_per_second", rate, 0, 10_000_000)
            if burst is not None:
                _check_int(f"{label}_burst", burst, 0, 10_000_000)
                if rate is None:
                    raise ConfigError(f"{label}_burst needs {kind}_per_second in the same table")

    def rate_and_burst(self, kind: str) -> tuple[int, int] | None:
        """This key's (rate, burst) of ``kind``, or None when it keeps the default."""
        rate = getattr(self, f"{kind}_per_second")
        if rate is None:
            return None
        return _rate_and_burst(rate, getattr(self, f"{kind}_burst") or 0)


@dataclass(frozen=True, slots=True)
class RateLimitsConfig:
    """Requests per second and burst, per API key and endpoint kind, on each node; 0 means unlimited.

    The six numbers are every key's default; ``keys`` gives single keys their
    own. A burst of 0 with a rate set means a burst of one second's worth (the rate).
    """

    tokenize_per_second: int = 0
    tokenize_burst: int = 0
    detokenize_per_second: int = 0
    detokenize_burst: int = 0
    admin_per_second: int = 0
    admin_burst: int = 0
    keys: tuple[KeyRateLimitsConfig, ...] = ()

    def __post_init__(self) -> None:
        for kind in RATE_LIMIT_KINDS:
            _check_int(f"rate_limits.{kind}_per_second", getattr(self, f"{kind}_per_second"), 0, 10_000_000)
            _check_int(f"rate_limits.{kind}_burst", getattr(self, f"{kind}_burst"), 0, 10_000_000)
        object.__setattr__(self, "keys", _key_rate_limits(self.keys))

    def rate_and_burst(self, kind: str, key_name: str | None = None) -> tuple[int, int]:
        """(rate per second, burst) of ``kind`` for ``key_name`` (or the default); (0, 0) when unlimited."""
        for entry in self.keys:
            if entry.name == key_name:
                own = entry.rate_and_burst(kind)
                if own is not None:
                    return own
        return _rate_and_burst(getattr(self, f"{kind}_per_second"), getattr(self, f"{kind}_burst"))


def _key_rate_limits(entries: object) -> tuple[KeyRateLimitsConfig, ...]:
    """``[[rate_limits.keys]]`` as records: tables from TOML are converted, names must be unique."""
    if not isinstance(entries, (list, tuple)):
        raise ConfigError("rate_limits.keys must be an array of tables ([[rate_limits.keys]])")
    if len(entries) > MAX_RATE_LIMIT_KEYS:
        raise ConfigError(f"rate_limits.keys may list at most {MAX_RATE_LIMIT_KEYS} keys")
    records = []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict):
            _check_known_keys(f"rate_limits.keys[{index}]", entry,
                              {item.name for item in fields(KeyRateLimitsConfig)})
            if "name" not in entry:
                raise ConfigError(f"rate_limits.keys[{index}] is missing name")
            entry = KeyRateLimitsConfig(**entry)
        if not isinstance(entry, KeyRateLimitsConfig):
            raise ConfigError(f"rate_limits.keys[{index}] must be a table")
        records.append(entry)
    names = [record.name for record in records]
    if len(set(names)) != len(names):
        raise ConfigError("rate_limits.keys: every name must be unique")
    return tuple(records)


@dataclass(frozen=True, slots=True)
class TimingConfig:
    tick_ms: int = 50
    election_timeout_ticks: int = 20
    heartbeat_interval_ticks: int = 2
    request_timeout_ms: int = 5000

    def __post_init__(self) -> None:
        _check_int("timing.tick_ms", self.tick_ms, 1, 10_000)
        _check_int("timing.election_timeout_ticks", self.election_timeout_ticks, 2, 100_000)
        # A primary must send heartbeats within a backup's election timeout (a few
        # times within it in practice), or backups would keep electing new primaries.
        _check_int(
            "timing.heartbeat_interval_ticks",
            self.heartbeat_interval_ticks,
            1,
            max(1, self.election_timeout_ticks - 1),
        )
        _check_int("timing.request_timeout_ms", self.request_timeout_ms, 1, 3_600_000)


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    retention_hours: int = 48

    def __post_init__(self) -> None:
        # The contract promises idempotency keys are kept at least 24 hours.
        _check_int("idempotency.retention_hours", self.retention_hours, 24, 24 * 365 * 10)

    @property
    def retention_ms(self) -> int:
        return self.retention_hours * 3_600_000


@dataclass(frozen=True, slots=True)
class WalConfig:
    max_segment_bytes: int = 64 * 1024 * 1024
    fsync: bool = True
    # Every compact_every_entries applied entries the store is checkpointed, WAL
    # segments below it are deleted and the core drops entries older than the
    # last compact_keep_entries; a backup further behind then gets a snapshot.
    compact_every_entries: int = 20_000
    compact_keep_entries: int = 10_000
    # The same two bounds in bytes of entry payloads, whichever comes first, so
    # that large entries (1,000-value tokenizes) do not keep hundreds of MiB of
    # log in memory: compaction after this many applied bytes, and at most this
    # many bytes of the newest entries kept for lagging backups.
    compact_every_bytes: int = 32 * 1024 * 1024
    compact_keep_bytes: int = 16 * 1024 * 1024
    # A snapshot streams in chunks of this size, one per round trip; at most
    # 8 MiB, half the peer frame limit (16 MiB), so a chunk and its frame fit.
    snapshot_chunk_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        _check_int("wal.max_segment_bytes", self.max_segment_bytes, 4096, 1024 * 1024 * 1024)
        _check_bool("wal.fsync", self.fsync)
        _check_int("wal.compact_every_entries", self.compact_every_entries, 10, 1_000_000_000)
        _check_int("wal.compact_keep_entries", self.compact_keep_entries, 0, 1_000_000_000)
        _check_int("wal.compact_every_bytes", self.compact_every_bytes, 4096, 1 << 40)
        _check_int("wal.compact_keep_bytes", self.compact_keep_bytes, 0, 1 << 40)
        _check_int("wal.snapshot_chunk_bytes", self.snapshot_chunk_bytes, 1024, 8 * 1024 * 1024)


@dataclass(frozen=True, slots=True)
class ShredConfig:
    # The shredder (tokenvault/core/shred.py) erases deleted rows by rewriting the store's files, up to
    # all of them, on every node, a key range (about a bottom-level file) at a time. It compacts at most
    # this fraction of the time: after a compaction of C seconds it rests C * (1 / max_busy_fraction - 1)
    # before the next range or pass, and a pass takes every delete that arrived meanwhile. 1.0 runs
    # them back to back.
    max_busy_fraction: float = 0.25

    def __post_init__(self) -> None:
        _check_fraction("shred.max_busy_fraction", self.max_busy_fraction, 0.01, 1.0)


@dataclass(frozen=True, slots=True)
class SealerConfig:
    # A helper process seals tokenize batches of at least min_values values on
    # another core (tokenvault/core/sealer.py); smaller batches, and batches that would
    # put more than max_pending_values values in its queue, are sealed in process.
    enabled: bool = True
    min_values: int = 32
    max_pending_values: int = 2048

    def __post_init__(self) -> None:
        _check_bool("sealer.enabled", self.enabled)
        _check_int("sealer.min_values", self.min_values, 1, 100_000)
        _check_int("sealer.max_pending_values", self.max_pending_values, 1, 10_000_000)


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    """The master key as an AES-256 key inside a PKCS#11 token (tokenvault/crypto/custody.py).
    The PIN comes from the environment variable ``pin_env`` or the file ``pin_file``,
    never from the config itself."""

    module: Path
    token_label: str
    key_label: str
    pin_env: str = DEFAULT_PIN_ENVIRONMENT_VARIABLE
    pin_file: Path | None = None

    def __post_init__(self) -> None:
        for name in ("module", "pin_file"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, Path(getattr(self, name)))
        _check_path("pkcs11.module", self.module, optional=False)
        _check_path("pkcs11.pin_file", self.pin_file, optional=True)
        # Labels are at most 32 bytes in PKCS#11 (CK_TOKEN_INFO.label); key labels have no fixed bound.
        _check_string("pkcs11.token_label", self.token_label, 32)
        if len(self.token_label.encode("utf-8", "surrogatepass")) > 32:
            raise ConfigError("pkcs11.token_label must be at most 32 bytes in UTF-8 (a PKCS#11 token label's size)")
        _check_string("pkcs11.key_label", self.key_label, 256)
        if not isinstance(self.pin_env, str) or not _ENVIRONMENT_VARIABLE_PATTERN.match(self.pin_env):
            raise ConfigError("pkcs11.pin_env must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")


def _inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` is ``directory`` or lies under it (lexically, after normalising . and ..)."""
    return Path(os.path.normpath(path)).is_relative_to(Path(os.path.normpath(directory)))


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The node's certificate and key and the cluster CA (tokenvault/crypto/tls.py): HTTPS and mutual-TLS peer links.

    The files themselves are checked when the node starts (tls.check_node_files), so that a config can be
    validated on a machine that does not hold them."""

    cert_file: Path
    key_file: Path
    ca_file: Path

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "ca_file"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, Path(value))
            _check_path(f"tls.{name}", getattr(self, name), optional=False)

    def files(self) -> "NodeTlsFiles":
        return NodeTlsFiles(self.cert_file, self.key_file, self.ca_file)


@dataclass(frozen=True, slots=True)
class AuditConfig:
    # Every detokenize waits until its audit record is committed (tokenvault/api/audit.py).
    # A node batches its records: the first waits at most flush_ms for company,
    # one log entry carries at most max_batch_records, and at most
    # max_pending_records wait at once (more are refused with 503).
    # enabled = false exists for measurement only: it breaks the audit promise.
    enabled: bool = True
    flush_ms: int = 2
    max_batch_records: int = 1024
    max_pending_records: int = 8192

    def __post_init__(self) -> None:
        _check_bool("audit.enabled", self.enabled)
        _check_int("audit.flush_ms", self.flush_ms, 0, 1000)
        _check_int("audit.max_batch_records", self.max_batch_records, 1, 4096)
        _check_int("audit.max_pending_records", self.max_pending_records, 1, 1_000_000)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A whole node configuration. Paths given as strings are converted to Path."""

    node_id: str
    data_dir: Path
    members: tuple[MemberConfig, ...]
    api_keys: tuple[ApiKeyEntry, ...]
    master_key_file: Path | None = None
    cluster_secret_file: Path | None = None
    log_file: Path | None = None
    log_level: str = "info"
    http: HttpConfig = field(default_factory=HttpConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    rate_limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)
    wal: WalConfig = field(default_factory=WalConfig)
    shred: ShredConfig = field(default_factory=ShredConfig)
    sealer: SealerConfig = field(default_factory=SealerConfig)
    pkcs11: Pkcs11Config | None = None
    # None is a plain cluster: HTTP without TLS and peer links authenticated by the cluster secret only.
    tls: TlsConfig | None = None
    audit: AuditConfig = field(default_factory=AuditConfig)
    # A node added to a running cluster (run_cluster.sh add-node): ``members`` names the voters it was
    # told of and itself, and it starts as a learner; the replicated configuration is the truth from
    # its first snapshot or log entry on. A cluster's first nodes have join = false.
    join: bool = False

    def __post_init__(self) -> None:
        for name in ("data_dir", "master_key_file", "cluster_secret_file", "log_file"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, Path(value))
        for name in ("members", "api_keys"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        _check_string("node_id", self.node_id, 32)
        if not NODE_ID_PATTERN.match(self.node_id):
            raise ConfigError(
                "node_id must be 1-32 characters of [A-Za-z0-9_.-] starting with a letter or digit"
            )
        _check_path("data_dir", self.data_dir, optional=False)
        _check_path("master_key_file", self.master_key_file, optional=True)
        _check_path("cluster_secret_file", self.cluster_secret_file, optional=True)
        _check_path("log_file", self.log_file, optional=True)
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        self._check_sections()
        self._check_members()
        self._check_api_keys()
        self._check_key_custody()

    def _check_sections(self) -> None:
        for name, section_type in _SECTIONS.items():
            if not isinstance(getattr(self, name), section_type):
                raise ConfigError(f"[{name}] must be a {section_type.__name__}")
        if self.http.host == self.peer.host and self.http.port == self.peer.port:
            raise ConfigError("http and peer must not listen on the same host and port")
        if self.tls is not None and not isinstance(self.tls, TlsConfig):
            raise ConfigError("[tls] must be a TlsConfig")

    def _check_members(self) -> None:
        if not all(isinstance(member, MemberConfig) for member in self.members):
            raise ConfigError("members must be MemberConfig records")
        if type(self.join) is not bool:
            raise ConfigError("join must be true or false")
        if self.join and not 2 <= len(self.members) <= MAX_MEMBERS:
            raise ConfigError(f"a joining node's members list it and 1 to {MAX_MEMBERS - 1} voters")
        if not self.join and len(self.members) not in ALLOWED_MEMBER_COUNTS:
            raise ConfigError(
                f"members must list an odd count of nodes from 1 to {MAX_MEMBERS} (got {len(self.members)}): "
                f"a majority of an "
                f"even-sized cluster tolerates no more failures than one node fewer"
            )
        for attribute in ("id", "peer_addr", "http_url"):
            values = [getattr(member, attribute) for member in self.members]
            if len(set(values)) != len(values):
                raise ConfigError(f"members: every {attribute} must be unique")
        if self.node_id not in self.member_ids:
            raise ConfigError("node_id must be one of the members' ids")
        # Clients find nodes by these URLs; they must say what the nodes really serve.
        expected_scheme = "https" if self.tls is not None else "http"
        if any(member.http_scheme != expected_scheme for member in self.members):
            reason = "the config has a [tls] section" if self.tls is not None else "the config has no [tls] section"
            raise ConfigError(f"members: every http_url must start with {expected_scheme}:// ({reason})")
        # Peers authenticate each other with an HMAC over this shared secret;
        # without it anyone who can reach the peer port could join the log.
        if len(self.members) > 1 and self.cluster_secret_file is None:
            raise ConfigError("cluster_secret_file is required when there is more than one member")

    def _check_api_keys(self) -> None:
        if not self.api_keys:
            raise ConfigError("api_keys must list at least one key")
        if not all(isinstance(entry, ApiKeyEntry) for entry in self.api_keys):
            raise ConfigError("api_keys must be ApiKeyEntry records")
        try:
            ApiKeyTable(self.api_keys)
        except ApiKeyTableError as error:
            raise ConfigError(f"api_keys: {error}") from None
        # Per-key limits apply by name to these keys only: a name that is none of theirs (a typo, a key
        # removed) limited nobody, silently.
        names = {entry.name for entry in self.api_keys}
        unknown = next((limits.name for limits in self.rate_limits.keys if limits.name not in names), None)
        if unknown is not None:
            raise ConfigError(f"rate_limits.keys: {unknown!r} is no [[api_keys]] name (per-key limits apply to "
                              "the configured keys, by name)")

    def _check_key_custody(self) -> None:
        """One key source, and no key file, PIN file or cluster secret beside the data it protects (a copy of
        the data directory would carry it: the cluster secret lets its holder pass for a peer, which is sent
        replicated entries and forwarded requests, values in them, where the links have no TLS)."""
        if self.pkcs11 is not None and not isinstance(self.pkcs11, Pkcs11Config):
            raise ConfigError("[pkcs11] must be a Pkcs11Config")
        if self.pkcs11 is not None and self.master_key_file is not None:
            raise ConfigError("set either master_key_file or [pkcs11], not both: the master key has one source")
        for name, path in (("master_key_file", self.master_key_file),
                           ("pkcs11.pin_file", self.pkcs11.pin_file if self.pkcs11 else None),
                           ("cluster_secret_file", self.cluster_secret_file)):
            if path is not None and _inside(path, self.data_dir):
                raise ConfigError(_beside_the_data(name, path, self.data_dir))

    @property
    def member_ids(self) -> tuple[str, ...]:
        return tuple(member.id for member in self.members)

    @property
    def self_member(self) -> MemberConfig:
        return next(member for member in self.members if member.id == self.node_id)

    @property
    def peers(self) -> tuple[MemberConfig, ...]:
        """Every member except this node."""
        return tuple(member for member in self.members if member.id != self.node_id)

    @property
    def replicated_settings(self) -> tuple[tuple[str, int], ...]:
        """The settings that shape the replicated state, sorted by name: the idempotency retention decides
        which idempotency keys still answer as each entry is applied, so nodes that differ would apply one
        log to different states. The peer handshake carries them, and a node refuses the links of a peer
        whose settings differ (tokenvault/core/transport.py, docs/configuration.md)."""
        return (("idempotency.retention_ms", self.idempotency.retention_ms),)

    def api_key_table(self) -> ApiKeyTable:
        return ApiKeyTable(self.api_keys)

    def load_master_key(self, environ: Mapping[str, str] | None = None) -> KeyWrapper:
        """The master key from its one source: the PKCS#11 token of [pkcs11]; else
        TOKENVAULT_MASTER_KEY (hex) when set; else master_key_file (mode 0600).

        TOKENVAULT_MASTER_KEY and the PIN variable are removed from the environment
        as they are read (``os.environ`` when ``environ`` is None), so that no child
        process inherits them. Raises ConfigError naming what is wrong."""
        try:
            if self.pkcs11 is not None:
                return self._open_pkcs11(environ)
            if self.master_key_file is not None:
                self._check_not_beside_the_data("master_key_file", self.master_key_file)
            return MasterKey.load(self.master_key_file, environ)
        except CryptoError as error:
            raise ConfigError(str(error)) from None

    def _open_pkcs11(self, environ: Mapping[str, str] | None) -> KeyWrapper:
        # Imported here: only a node configured with a token needs the module (and python-pkcs11).
        from tokenvault.crypto.custody import Pkcs11MasterKey

        assert self.pkcs11 is not None
        if take_from_environment(MASTER_KEY_ENVIRONMENT_VARIABLE, environ):
            raise ConfigError(f"{MASTER_KEY_ENVIRONMENT_VARIABLE} is set but the config keeps the master key in a "
                              f"PKCS#11 token ([pkcs11]); unset the variable (the master key has one source)")
        if self.pkcs11.pin_file is not None:
            self._check_not_beside_the_data("pkcs11.pin_file", self.pkcs11.pin_file)
        return Pkcs11MasterKey.open(self.pkcs11, environ)

    def _check_not_beside_the_data(self, name: str, path: Path) -> None:
        """The check of _check_key_custody again on the real paths, after symlinks."""
        real_path, real_data_dir = Path(os.path.realpath(path)), Path(os.path.realpath(self.data_dir))
        if real_path.is_relative_to(real_data_dir):
            raise ConfigError(_beside_the_data(name, real_path, real_data_dir))

    def load_cluster_secret(self) -> bytes:
        """The 32-byte peer handshake secret from cluster_secret_file (mode 0600)."""
        if self.cluster_secret_file is None:
            raise ConfigError("cluster_secret_file is not set in the config")
        self._check_not_beside_the_data("cluster_secret_file", self.cluster_secret_file)
        try:
            return read_secret_file(self.cluster_secret_file, "cluster secret", CLUSTER_SECRET_BYTES)
        except CryptoError as error:
            raise ConfigError(str(error)) from None


def _beside_the_data(name: str, path: Path, data_dir: Path) -> str:
    return (f"{name} {path} is inside the data directory {data_dir}: a copy of the data directory would "
            f"carry it along with what it protects; keep the file outside it (and outside any directory copied "
            f"with it)")


# ---------------------------------------------------------------- reading TOML

_TOP_LEVEL_KEYS = {
    "node_id": "string", "data_dir": "path", "log_file": "path", "log_level": "string",
    "master_key_file": "path", "cluster_secret_file": "path", "join": "bool",
}
_SECTIONS: dict[str, type] = {
    "http": HttpConfig, "peer": PeerConfig, "limits": LimitsConfig,
    "rate_limits": RateLimitsConfig, "timing": TimingConfig, "idempotency": IdempotencyConfig,
    "wal": WalConfig, "shred": ShredConfig, "sealer": SealerConfig, "audit": AuditConfig,
}
_REQUIRED_KEYS = ("node_id", "data_dir", "members", "api_keys")
_TLS_KEYS = ("cert_file", "key_file", "ca_file")


def _tls_from_table(table: object) -> TlsConfig:
    if not isinstance(table, dict):
        raise ConfigError("[tls] must be a table")
    _check_known_keys("[tls]", table, set(_TLS_KEYS))
    for key in _TLS_KEYS:
        if key not in table:
            raise ConfigError(f"[tls] is missing {key}")
    paths = {key: Path(_check_string(f"tls.{key}", table[key])) for key in _TLS_KEYS}
    return TlsConfig(**paths)


def _check_known_keys(name: str, table: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        # Key names come from the file's structure, not its values; a typo
        # should fail loudly rather than leave a default silently in force.
        shown = ", ".join(repr(key[:64]) for key in unknown[:5])
        raise ConfigError(f"{name}: unknown key(s) {shown}")


def _section_from_table(name: str, table: object) -> object:
    section_type = _SECTIONS[name]
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    _check_known_keys(f"[{name}]", table, {item.name for item in fields(section_type)})
    return section_type(**table)


def _member_from_table(index: int, table: object) -> MemberConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"members[{index}] must be a table ([[members]])")
    _check_known_keys(f"members[{index}]", table, {"id", "peer_addr", "http_url"})
    for key in ("id", "peer_addr", "http_url"):
        if key not in table:
            raise ConfigError(f"members[{index}] is missing {key}")
    return MemberConfig(id=table["id"], peer_addr=table["peer_addr"], http_url=table["http_url"])


def _api_key_from_table(index: int, table: object) -> ApiKeyEntry:
    label = f"api_keys[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{label} must be a table ([[api_keys]])")
    _check_known_keys(label, table, {"name", "sha256", "scopes", "salt"})
    for key in ("name", "sha256", "scopes"):
        if key not in table:
            raise ConfigError(f"{label} is missing {key}")
    scopes = table["scopes"]
    if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
        raise ConfigError(f"{label}.scopes must be a list of strings")
    if len(set(scopes)) != len(scopes):
        raise ConfigError(f"{label}.scopes lists a scope twice")
    if not set(scopes) <= ALL_SCOPES:
        raise ConfigError(f"{label}.scopes may only contain {', '.join(sorted(ALL_SCOPES))}")
    digest = table["sha256"]
    if isinstance(digest, str):
        digest = digest.lower()
    try:
        return ApiKeyEntry(name=table["name"], sha256=digest, scopes=frozenset(scopes),
                           salt=table["salt"].lower() if isinstance(table.get("salt"), str) else table.get("salt"))
    except ApiKeyTableError as error:
        raise ConfigError(f"{label}: {error}") from None


def _pkcs11_from_table(table: object) -> Pkcs11Config:
    if not isinstance(table, dict):
        raise ConfigError("[pkcs11] must be a table")
    if "pin" in table or "user_pin" in table:
        raise ConfigError("[pkcs11] must not hold the PIN: give it in the environment variable named by "
                          f"pin_env (default {DEFAULT_PIN_ENVIRONMENT_VARIABLE}) or in pin_file")
    _check_known_keys("[pkcs11]", table, {item.name for item in fields(Pkcs11Config)})
    for key in ("module", "token_label", "key_label"):
        if key not in table:
            raise ConfigError(f"[pkcs11] is missing {key}")
    for key in ("module", "pin_file"):
        if key in table:
            _check_string(f"pkcs11.{key}", table[key])
    return Pkcs11Config(**table)


def _list_of_tables(name: str, value: object) -> list[object]:
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be an array of tables ([[{name}]])")
    return value


def config_from_mapping(document: Mapping[str, Any]) -> NodeConfig:
    """Validate a parsed TOML document and build the NodeConfig."""
    _check_known_keys("config", document,
                      set(_TOP_LEVEL_KEYS) | set(_SECTIONS) | {"members", "api_keys", "pkcs11", "tls"})
    for key in _REQUIRED_KEYS:
        if key not in document:
            raise ConfigError(f"config is missing the required key {key}")
    arguments: dict[str, Any] = {}
    for key, kind in _TOP_LEVEL_KEYS.items():
        if key not in document:
            continue
        if kind == "bool":
            if type(document[key]) is not bool:
                raise ConfigError(f"{key} must be true or false")
            arguments[key] = document[key]
            continue
        value = _check_string(key, document[key])
        arguments[key] = Path(value) if kind == "path" else value
    for name in _SECTIONS:
        if name in document:
            arguments[name] = _section_from_table(name, document[name])
    if "pkcs11" in document:
        arguments["pkcs11"] = _pkcs11_from_table(document["pkcs11"])
    if "tls" in document:
        arguments["tls"] = _tls_from_table(document["tls"])
    members = _list_of_tables("members", document["members"])
    arguments["members"] = tuple(_member_from_table(index, table) for index, table in enumerate(members))
    keys = _list_of_tables("api_keys", document["api_keys"])
    arguments["api_keys"] = tuple(_api_key_from_table(index, table) for index, table in enumerate(keys))
    return NodeConfig(**arguments)


def parse_config(text: str) -> NodeConfig:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # The decoder's message names a line and column, never the content.
        raise ConfigError(f"not valid TOML: {error}") from None
    except RecursionError:  # the decoder recurses into nested arrays and tables
        raise ConfigError("not valid TOML for a node config: nested too deeply") from None
    except ValueError:  # int() of a decimal literal of more than 4300 digits; no key takes one
        raise ConfigError("not valid TOML for a node config: an integer too long to read") from None
    return config_from_mapping(document)


def load_config(path: Path | str) -> NodeConfig:
    """Read, parse and validate a node config file. Raises ConfigError."""
    path = Path(path)
    try:
        content = read_small_file(path, _MAX_CONFIG_FILE_BYTES)
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r} ({error.strerror})") from None
    except FileTooLarge:
        raise ConfigError(f"config file {str(path)!r} is larger than {_MAX_CONFIG_FILE_BYTES} bytes") from None
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8") from None
    try:
        return parse_config(text)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


# ---------------------------------------------------------------- writing TOML

def _toml_string(text: str) -> str:
    """A TOML basic string. TOML 1.0 requires escaping the quote, the backslash
    and every control character except tab; everything else may appear raw."""
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\n": "\\n", "\f": "\\f", "\r": "\\r", "\t": "\\t"}
    pieces = []
    for character in text:
        if character in escapes:
            pieces.append(escapes[character])
        elif ord(character) < 0x20 or ord(character) == 0x7F:
            pieces.append(f"\\u{ord(character):04X}")
        else:
            pieces.append(character)
    return '"' + "".join(pieces) + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back to the same float
    if isinstance(value, (str, Path)):
        return _toml_string(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write a {type(value).__name__} to the config")


def _key_rate_limits_toml(entries: tuple[KeyRateLimitsConfig, ...]) -> list[str]:
    lines: list[str] = []
    for entry in entries:
        lines.extend(["", "[[rate_limits.keys]]"])
        for item in fields(entry):
            value = getattr(entry, item.name)
            if value is not None:
                lines.append(f"{item.name} = {_toml_value(value)}")
    return lines


def to_toml(config: NodeConfig) -> str:
    """The TOML text of ``config``; load_config reads it back to an equal config."""
    lines: list[str] = []
    for key in ("node_id", "data_dir", "log_file", "log_level", "master_key_file", "cluster_secret_file"):
        value = getattr(config, key)
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    if config.join:
        lines.append("join = true")
    for name in _SECTIONS:
        section = getattr(config, name)
        lines.append("")
        lines.append(f"[{name}]")
        for item in fields(section):
            value = getattr(section, item.name)
            if (name == "rate_limits" and item.name == "keys") or value is None:
                continue  # the keys' own table follows; None is a setting left to its default
            lines.append(f"{item.name} = {_toml_value(value)}")
        if name == "rate_limits":
            lines.extend(_key_rate_limits_toml(section.keys))
    if config.pkcs11 is not None:
        lines.extend(["", "[pkcs11]"])
        for item in fields(Pkcs11Config):
            value = getattr(config.pkcs11, item.name)
            if value is not None:
                lines.append(f"{item.name} = {_toml_value(value)}")
    if config.tls is not None:
        lines.extend(["", "[tls]"])
        for key in _TLS_KEYS:
            lines.append(f"{key} = {_toml_value(getattr(config.tls, key))}")
    for member in config.members:
        lines.extend(["", "[[members]]"])
        lines.append(f"id = {_toml_value(member.id)}")
        lines.append(f"peer_addr = {_toml_value(member.peer_addr)}")
        lines.append(f"http_url = {_toml_value(member.http_url)}")
    for entry in config.api_keys:
        lines.extend(["", "[[api_keys]]"])
        lines.append(f"name = {_toml_value(entry.name)}")
        lines.append(f"sha256 = {_toml_value(entry.sha256)}")
        if entry.salt is not None:
            lines.append(f"salt = {_toml_value(entry.salt)}")
        lines.append(f"scopes = {_toml_value(sorted(entry.scopes))}")
    return "\n".join(lines) + "\n"


def write_node_config(path: Path | str, config: NodeConfig) -> None:
    """Write ``config`` to ``path`` atomically with mode 0600 (write a temporary
    file, fsync, rename over the target, fsync the directory)."""
    path = Path(path)
    data = to_toml(config).encode("utf-8")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        write_whole(descriptor, data)
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        temporary.unlink(missing_ok=True)
        raise
    os.close(descriptor)
    os.replace(temporary, path)
    fsync_directory(path.parent)
