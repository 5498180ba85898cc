"""What a local cluster is made of, and the generation and reading of its directory.

This is the description half of the cluster tool (``tokenvault.devcluster.cluster``, which
re-exports every public name defined here): the spec types (NodeSpec,
ApiKeyInfo, ClusterSpec, NodeSettings), the TOKENVAULT_* environment knobs,
the planning of node ids, ports and paths, the generation of the secrets, the
per-node configs and cluster.json, and reading cluster.json back. It neither
starts nor queries node processes, and takes no directory lock;
``tokenvault.devcluster.cluster`` does that around these functions.
"""

from __future__ import annotations

import hmac
import json
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.membership import MAX_MEMBERS
from tokenvault.auth import ApiKeyEntry, generate_api_key, salted_api_key_hash
from tokenvault.config import (ALLOWED_MEMBER_COUNTS, ConfigError, HttpConfig, MemberConfig, NodeConfig, PeerConfig, SealerConfig,
                               TimingConfig, TlsConfig, WalConfig, write_node_config)
from tokenvault.crypto.keys import CryptoError, MasterKey, write_secret_file
from tokenvault.crypto.tls import ClusterTlsFiles, create_cluster_tls
from tokenvault.smallfiles import MAX_CLUSTER_FILE_BYTES, FileTooLarge, fsync_directory, read_small_file, write_whole

ALLOWED_NODE_COUNTS = ALLOWED_MEMBER_COUNTS  # what a node config allows its static members
NODE_COUNT_RULE = f"--nodes must be odd, from 1 to {MAX_MEMBERS}"
DEFAULT_NODE_COUNT = 3
DEFAULT_BASE_PORT = 8100
HOST = "127.0.0.1"
CLUSTER_FILE_NAME = "cluster.json"
MASTER_KEY_FILE_NAME = "master.key"
KEY_DIRECTORY_ENVIRONMENT_VARIABLE = "TOKENVAULT_KEY_DIR"
KEY_DIRECTORY_SUFFIX = ".keys"
TLS_DIRECTORY_NAME = "tls"
API_KEY_SCOPES: dict[str, tuple[str, ...]] = {
    "admin": ("admin",),
    "tokenizer": ("tokenize",),
    "detokenizer": ("detokenize",),
    "full": ("admin", "tokenize", "detokenize", "detokenize_masked", "delete", "retokenize"),
    "masked": ("detokenize_masked",),
}
# Environment knobs written into node configs when a cluster is generated.
ENVIRONMENT_KNOBS = {
    "TOKENVAULT_TICK_MS": "timing.tick_ms",
    "TOKENVAULT_ELECTION_TIMEOUT_TICKS": "timing.election_timeout_ticks",
    "TOKENVAULT_HEARTBEAT_INTERVAL_TICKS": "timing.heartbeat_interval_ticks",
    "TOKENVAULT_REQUEST_TIMEOUT_MS": "timing.request_timeout_ms",
    "TOKENVAULT_WAL_FSYNC": "wal.fsync",
    "TOKENVAULT_COMPACT_EVERY_ENTRIES": "wal.compact_every_entries",
    "TOKENVAULT_COMPACT_KEEP_ENTRIES": "wal.compact_keep_entries",
    "TOKENVAULT_SNAPSHOT_CHUNK_BYTES": "wal.snapshot_chunk_bytes",
    "TOKENVAULT_LOG_LEVEL": "log_level",
    "TOKENVAULT_SEALER": "sealer.enabled",
    "TOKENVAULT_HTTP_WORKERS": "http.workers",
    "TOKENVAULT_HTTP_STORE_READS": "http.store_reads",
    "TOKENVAULT_TLS": "[tls] (a CA and node certificates; false makes a plain-HTTP cluster)",
}


class ClusterError(Exception):
    """A cluster command cannot be carried out; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class NodeSpec:
    node_id: str
    http_url: str
    peer_addr: str
    data_dir: Path
    log_file: Path
    pid_file: Path
    config: Path

    @property
    def directory(self) -> Path:
        return self.config.parent

    @property
    def output_file(self) -> Path:
        return self.directory / "node.out"

    @property
    def http_port(self) -> int:
        return int(self.http_url.rsplit(":", 1)[1])

    @property
    def peer_port(self) -> int:
        return int(self.peer_addr.rsplit(":", 1)[1])

    def to_json(self) -> dict[str, str]:
        return {"id": self.node_id, "http_url": self.http_url, "peer_addr": self.peer_addr,
                "data_dir": str(self.data_dir), "log_file": str(self.log_file),
                "pid_file": str(self.pid_file), "config": str(self.config)}


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    name: str
    key: str
    scopes: tuple[str, ...]

    def __repr__(self) -> str:
        return f"ApiKeyInfo(name={self.name!r}, scopes={self.scopes!r})"


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    directory: Path
    nodes: tuple[NodeSpec, ...]
    api_keys: tuple[ApiKeyInfo, ...]
    # The cluster CA certificate (PEM) that HTTPS clients verify nodes against; None for a plain cluster.
    ca_file: Path | None = None

    @property
    def uses_tls(self) -> bool:
        return self.ca_file is not None

    @property
    def cluster_file(self) -> Path:
        return self.directory / CLUSTER_FILE_NAME

    @property
    def http_urls(self) -> tuple[str, ...]:
        return tuple(node.http_url for node in self.nodes)

    def node(self, node_id: str) -> NodeSpec:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        known = ", ".join(node.node_id for node in self.nodes)
        raise ClusterError(f"no node {node_id!r} in this cluster (nodes: {known})")

    def key(self, name: str) -> str:
        for info in self.api_keys:
            if info.name == name:
                return info.key
        raise ClusterError(f"no API key named {name!r} in {self.cluster_file}")

    def to_json(self) -> dict[str, Any]:
        return {"nodes": [node.to_json() for node in self.nodes],
                "api_keys": {info.name: {"key": info.key, "scopes": list(info.scopes)} for info in self.api_keys},
                "ca_file": str(self.ca_file) if self.ca_file is not None else None}


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """What the environment knobs set in every generated node config."""

    log_level: str = "info"
    timing: TimingConfig = field(default_factory=TimingConfig)
    wal: WalConfig = field(default_factory=WalConfig)
    sealer: SealerConfig = field(default_factory=SealerConfig)
    # TLS on HTTP and mutual TLS on peer links; False (TOKENVAULT_TLS=false) only when asked for explicitly.
    tls: bool = True
    # HTTP worker processes per node; None leaves http.workers out (the node's default: cores minus one).
    http_workers: int | None = None
    # Whether the HTTP workers read the store themselves (http.store_reads); None leaves it out (the
    # node's default: on with 2 or more workers).
    http_store_reads: bool | None = None


# ---------------------------------------------------------------- generation


def default_cluster_directory(environ: Mapping[str, str] | None = None) -> Path:
    environment = os.environ if environ is None else environ
    return Path(environment.get("TOKENVAULT_CLUSTER_DIR") or ".cluster").expanduser().absolute()


def run_cluster_command(directory: Path, command: str) -> str:
    """``./run_cluster.sh COMMAND`` as it is typed for the cluster in ``directory``: with
    TOKENVAULT_CLUSTER_DIR when that is not the default ./.cluster. Why: a hint without it, given for a
    cluster elsewhere, ran on ./.cluster, another cluster or none."""
    line = f"./run_cluster.sh {command}"
    if directory != default_cluster_directory({}):
        line = f"TOKENVAULT_CLUSTER_DIR={shlex.quote(str(directory))} {line}"
    return line


def base_port_from_environment(environ: Mapping[str, str] | None = None) -> int:
    environment = os.environ if environ is None else environ
    text = environment.get("TOKENVAULT_BASE_PORT", "").strip()
    if not text:
        return DEFAULT_BASE_PORT
    if not _is_decimal(text) or not 1 <= int(text) <= 65535 - 100 - max(ALLOWED_NODE_COUNTS):
        raise ClusterError(f"TOKENVAULT_BASE_PORT must be an integer from 1 to {65535 - 105}")
    return int(text)


def _is_decimal(text: str) -> bool:
    """ASCII digits, at most 18 of them. str.isdigit is true of "²" (which int() refuses) and of other
    scripts' digits, and int() refuses more than 4300 digits: each was a ValueError, not a clear error."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def _environment_integer(environment: Mapping[str, str], name: str, default: int) -> int:
    text = environment.get(name, "").strip()
    if not text:
        return default
    if not _is_decimal(text):
        raise ClusterError(f"{name} must be a non-negative integer of at most 18 digits")
    return int(text)


def settings_from_environment(environ: Mapping[str, str] | None = None) -> NodeSettings:
    """Read the TOKENVAULT_* knobs listed in ENVIRONMENT_KNOBS (unset ones keep the config defaults)."""
    environment = os.environ if environ is None else environ
    defaults = TimingConfig()
    fsync_text = environment.get("TOKENVAULT_WAL_FSYNC", "").strip().lower()
    if fsync_text not in ("", "true", "false", "1", "0"):
        raise ClusterError("TOKENVAULT_WAL_FSYNC must be true or false")
    sealer_text = environment.get("TOKENVAULT_SEALER", "").strip().lower()
    if sealer_text not in ("", "true", "false", "1", "0"):
        raise ClusterError("TOKENVAULT_SEALER must be true or false")
    tls_text = environment.get("TOKENVAULT_TLS", "").strip().lower()
    if tls_text not in ("", "true", "false", "1", "0"):
        raise ClusterError("TOKENVAULT_TLS must be true or false")
    store_reads_text = environment.get("TOKENVAULT_HTTP_STORE_READS", "").strip().lower()
    if store_reads_text not in ("", "true", "false", "1", "0"):
        raise ClusterError("TOKENVAULT_HTTP_STORE_READS must be true or false")
    try:
        timing = TimingConfig(
            tick_ms=_environment_integer(environment, "TOKENVAULT_TICK_MS", defaults.tick_ms),
            election_timeout_ticks=_environment_integer(
                environment, "TOKENVAULT_ELECTION_TIMEOUT_TICKS", defaults.election_timeout_ticks),
            heartbeat_interval_ticks=_environment_integer(
                environment, "TOKENVAULT_HEARTBEAT_INTERVAL_TICKS", defaults.heartbeat_interval_ticks),
            request_timeout_ms=_environment_integer(
                environment, "TOKENVAULT_REQUEST_TIMEOUT_MS", defaults.request_timeout_ms))
        wal_defaults = WalConfig()
        wal = WalConfig(fsync=fsync_text not in ("false", "0"),
                        compact_every_entries=_environment_integer(
                            environment, "TOKENVAULT_COMPACT_EVERY_ENTRIES", wal_defaults.compact_every_entries),
                        compact_keep_entries=_environment_integer(
                            environment, "TOKENVAULT_COMPACT_KEEP_ENTRIES", wal_defaults.compact_keep_entries),
                        snapshot_chunk_bytes=_environment_integer(
                            environment, "TOKENVAULT_SNAPSHOT_CHUNK_BYTES", wal_defaults.snapshot_chunk_bytes))
        workers_text = environment.get("TOKENVAULT_HTTP_WORKERS", "").strip()
        http_workers = None
        if workers_text:
            http_workers = _environment_integer(environment, "TOKENVAULT_HTTP_WORKERS", 0)
            HttpConfig(workers=http_workers)  # the config's own range check
        log_level = environment.get("TOKENVAULT_LOG_LEVEL", "").strip().lower() or "info"
        if log_level not in ("debug", "info", "warning", "error"):
            raise ClusterError("TOKENVAULT_LOG_LEVEL must be debug, info, warning or error")
    except ConfigError as error:
        raise ClusterError(f"environment knob out of range: {error}") from None
    return NodeSettings(log_level=log_level, timing=timing, wal=wal,
                        sealer=SealerConfig(enabled=sealer_text not in ("false", "0")),
                        tls=tls_text not in ("false", "0"), http_workers=http_workers,
                        http_store_reads=None if not store_reads_text else store_reads_text not in ("false", "0"))


def plan_nodes(directory: Path, count: int, ports: Sequence[tuple[int, int]],
               tls: bool = True) -> tuple[NodeSpec, ...]:
    """Node i (1-based) gets the i-th (http_port, peer_port) pair and the directory `n<i>`."""
    scheme = "https" if tls else "http"
    nodes = []
    for number, (http_port, peer_port) in zip(range(1, count + 1), ports, strict=True):
        node_directory = directory / f"n{number}"
        nodes.append(NodeSpec(
            node_id=f"n{number}", http_url=f"{scheme}://{HOST}:{http_port}", peer_addr=f"{HOST}:{peer_port}",
            data_dir=node_directory / "data", log_file=node_directory / "node.log",
            pid_file=node_directory / "node.pid", config=node_directory / "node.toml"))
    return tuple(nodes)


def contract_ports(count: int, base_port: int) -> list[tuple[int, int]]:
    """The contract's ports: HTTP on base+i, peer protocol on base+100+i."""
    return [(base_port + number, base_port + 100 + number) for number in range(1, count + 1)]


def _write_private_file(path: Path, text: str) -> None:
    """Create `path` with mode 0600 atomically and whole (temporary file written to its last byte, fsync,
    rename, directory fsync)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        write_whole(descriptor, text.encode("utf-8"))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    fsync_directory(path.parent)


def key_directory(cluster_directory: Path | str, environ: Mapping[str, str] | None = None) -> Path:
    """Where a dev cluster keeps its master key: $TOKENVAULT_KEY_DIR, else the sibling
    directory ``<cluster dir>.keys`` (``./.cluster.keys`` for ``./.cluster``).

    Never under the cluster directory, so that a copy of the cluster directory (every
    node's data) does not carry the key that opens it."""
    environment = os.environ if environ is None else environ
    cluster_directory = Path(os.path.normpath(Path(cluster_directory).expanduser().absolute()))
    configured = environment.get(KEY_DIRECTORY_ENVIRONMENT_VARIABLE, "").strip()
    if configured:
        directory = Path(os.path.normpath(Path(configured).expanduser().absolute()))
    else:
        directory = cluster_directory.with_name(cluster_directory.name + KEY_DIRECTORY_SUFFIX)
    if directory.is_relative_to(cluster_directory):
        raise ClusterError(f"{KEY_DIRECTORY_ENVIRONMENT_VARIABLE}={directory} is inside the cluster directory "
                           f"{cluster_directory}: the master key must live outside it")
    return directory


def _place_master_key(cluster_directory: Path, master_key: MasterKey | None) -> Path:
    """The cluster's master key file in its key directory: the one already there (a key directory outlives
    its cluster directory), else ``master_key`` or a new key written there (mode 0600)."""
    directory = key_directory(cluster_directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / MASTER_KEY_FILE_NAME
    if not (path.exists() or path.is_symlink()):
        (master_key or MasterKey.generate()).write_file(path)
        return path
    check_existing_master_key(path, master_key)
    return path


def check_existing_master_key(path: Path, master_key: MasterKey | None, remedy: str = "") -> None:
    """Refuse the key file at ``path`` (which exists) if it cannot be read or holds another key than
    ``master_key`` (any readable key when None); ``remedy`` ends the message of the second."""
    try:
        existing = MasterKey.from_file(path)
    except CryptoError as error:
        raise ClusterError(f"cannot use the existing master key {path}: {error}") from None
    if master_key is not None and not hmac.compare_digest(existing.to_hex(), master_key.to_hex()):
        raise ClusterError(f"{path} already holds another master key than the one given; set "
                           f"{KEY_DIRECTORY_ENVIRONMENT_VARIABLE} to another directory for this cluster{remedy}")


def _salted_entry(name: str, key: str, scopes: Iterable[str]) -> ApiKeyEntry:
    """A bootstrap key as a node config stores it: name, scopes, and HMAC-SHA256 under its own salt."""
    salt, digest = salted_api_key_hash(key)
    return ApiKeyEntry(name=name, sha256=digest, scopes=frozenset(scopes), salt=salt)


def _node_config(spec: ClusterSpec, node: NodeSpec, settings: NodeSettings, master_key_file: Path,
                 tls_files: ClusterTlsFiles | None) -> NodeConfig:
    members = tuple(MemberConfig(id=member.node_id, peer_addr=member.peer_addr, http_url=member.http_url)
                    for member in spec.nodes)
    api_keys = tuple(_salted_entry(info.name, info.key, info.scopes) for info in spec.api_keys)
    tls = None
    if tls_files is not None:
        files = tls_files.nodes[node.node_id]
        tls = TlsConfig(cert_file=files.cert_file, key_file=files.key_file, ca_file=files.ca_file)
    return NodeConfig(
        node_id=node.node_id, data_dir=node.data_dir, members=members, api_keys=api_keys,
        master_key_file=master_key_file, cluster_secret_file=spec.directory / "cluster.secret",
        log_file=node.log_file, log_level=settings.log_level,
        http=HttpConfig(host=HOST, port=node.http_port, workers=settings.http_workers,
                        store_reads=settings.http_store_reads),
        peer=PeerConfig(host=HOST, port=node.peer_port),
        timing=settings.timing, wal=settings.wal, sealer=settings.sealer, tls=tls)


def _generate(directory: Path, nodes: tuple[NodeSpec, ...], settings: NodeSettings,
              master_key: MasterKey | None = None) -> ClusterSpec:
    """Write a new cluster's secrets, configs and cluster.json; ``master_key`` is given when restoring a
    backup (whose epoch secrets only that key opens), otherwise the key directory's key or a new one."""
    keys = tuple(ApiKeyInfo(name, generate_api_key(), scopes) for name, scopes in API_KEY_SCOPES.items())
    tls_files = None
    if settings.tls:
        # Each node's certificate names the host its URLs use, and its node id.
        tls_files = create_cluster_tls(directory / TLS_DIRECTORY_NAME, {node.node_id: [HOST] for node in nodes})
    spec = ClusterSpec(directory, nodes, keys, tls_files.ca_cert_file if tls_files is not None else None)
    master_key_file = _place_master_key(directory, master_key)
    configs = [_node_config(spec, node, settings, master_key_file, tls_files) for node in nodes]
    write_secret_file(directory / "cluster.secret", os.urandom(32))
    for node, config in zip(nodes, configs):
        node.directory.mkdir(mode=0o700)
        node.data_dir.mkdir(mode=0o700)
        write_node_config(node.config, config)
    # Written last: its presence marks a complete cluster directory.
    _write_private_file(spec.cluster_file, json.dumps(spec.to_json(), indent=2) + "\n")
    return spec


def load_cluster(directory: Path | str) -> ClusterSpec:
    """Read cluster.json of an existing cluster directory."""
    directory = Path(directory).expanduser().absolute()
    path = directory / CLUSTER_FILE_NAME
    try:
        document = json.loads(read_small_file(path, MAX_CLUSTER_FILE_BYTES))
        nodes = tuple(NodeSpec(node_id=str(node["id"]), http_url=str(node["http_url"]),
                               peer_addr=str(node["peer_addr"]), data_dir=Path(node["data_dir"]),
                               log_file=Path(node["log_file"]), pid_file=Path(node["pid_file"]),
                               config=Path(node["config"])) for node in document["nodes"])
        keys = tuple(ApiKeyInfo(str(name), str(entry["key"]), tuple(entry["scopes"]))
                     for name, entry in document["api_keys"].items())
        # Clusters generated before TLS existed have no ca_file and stay plain.
        ca_text = document.get("ca_file")
        if ca_text is not None and not isinstance(ca_text, str):
            raise TypeError("ca_file")
        ca_file = Path(ca_text) if ca_text else None
    except FileNotFoundError:
        raise ClusterError(f"no cluster in {directory} (no {CLUSTER_FILE_NAME}); "
                           f"run '{run_cluster_command(directory, 'start')}'")
    except FileTooLarge:
        raise ClusterError(f"{path} is larger than {MAX_CLUSTER_FILE_BYTES} bytes: not a cluster file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        # RecursionError: nesting deeper than the parser's stack, which 1 MiB of '[' is.
        raise ClusterError(f"{path} is unreadable or not in the expected shape") from None
    if not nodes:
        raise ClusterError(f"{path} lists no nodes")
    return ClusterSpec(directory, nodes, keys, ca_file)
