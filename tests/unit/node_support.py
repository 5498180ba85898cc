"""Shared helpers for the in-process node, service and transport tests.

Every node of a test runs in the test's one event loop, with its real WAL and
SQLite store under tmp_path and real TCP on 127.0.0.1 (ports chosen by binding
port 0). Waiting is always polling against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from protocol import FrameDecoder, Hello, HelloProof, Message, Role, encode_frame
from tokenvault.core import commands
from tokenvault.auth import ApiKeyEntry
from tokenvault.config import (IdempotencyConfig, HttpConfig, MemberConfig, NodeConfig, PeerConfig,
                               ShredConfig, TimingConfig, WalConfig)
from tokenvault.crypto.keys import MasterKey, write_secret_file
from tokenvault.core.node import Node
from tokenvault.api.http import HttpApp, http_server
from tokenvault.api.service import NodeService
from tokenvault.core.transport import GREETING
from tokenvault.crypto import tls
from tokenvault.crypto.tls import NodeTlsFiles
from tokenvault.devcluster.cluster import process_stats

POLL_INTERVAL_SECONDS = 0.01
NONCE_BYTES = 32
HANDSHAKE_CONTEXT = b"tokenvault/peer-handshake\x00"

# The HTTP workers of a node started as a real process from these configs (tests/unit/test_custody.py):
# one, whatever the machine's cores, so that the tests start the same processes everywhere.
TEST_HTTP_WORKERS = 1


# --------------------------------------------------------------------------- waiting

async def wait_until(predicate: Callable[[], Any], timeout_seconds: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_seconds} s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_SECONDS)


async def retry_until_ok(call: Callable[[], Awaitable[Any]], timeout_seconds: float, what: str,
                         retry_on: tuple[type[BaseException], ...]) -> Any:
    """Repeat ``call`` while it raises one of ``retry_on``; its first result, or fail at the deadline."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            return await call()
        except retry_on as error:
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout_seconds} s: {what} (last error {error!r})")
        await asyncio.sleep(POLL_INTERVAL_SECONDS * 5)


# --------------------------------------------------------------------------- configs

def free_ports(count: int) -> list[int]:
    """``count`` distinct ephemeral ports the kernel just handed out (bound to 0, then released).

    All probes stay bound until every port is chosen, so the kernel cannot hand
    out the same port twice within one call.
    """
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(probe)
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


@dataclass(frozen=True, slots=True)
class ClusterFiles:
    """The secrets every node of one test cluster shares."""

    master_key_file: Path
    cluster_secret_file: Path
    cluster_secret: bytes


def write_cluster_files(directory: Path) -> ClusterFiles:
    directory.mkdir(parents=True, exist_ok=True)
    master_key_file = directory / "master.key"
    MasterKey.generate().write_file(master_key_file)
    cluster_secret = os.urandom(32)
    cluster_secret_file = directory / "cluster.secret"
    write_secret_file(cluster_secret_file, cluster_secret)
    return ClusterFiles(master_key_file, cluster_secret_file, cluster_secret)


API_KEYS = (ApiKeyEntry(name="admin", sha256=hashlib.sha256(b"unused test key").hexdigest(),
                        scopes=frozenset({"admin", "tokenize", "detokenize", "delete", "retokenize"})),)


_FAST_TIMING = TimingConfig(tick_ms=10, election_timeout_ticks=25, heartbeat_interval_ticks=2,
                            request_timeout_ms=2000)


def Timing(**overrides: int) -> TimingConfig:  # noqa: N802 - reads like the config type it returns
    """The tests' fast timing: short ticks and timeouts, with any field overridden."""
    return dataclasses.replace(_FAST_TIMING, **overrides)


def make_configs(root: Path, node_count: int, timing: TimingConfig = _FAST_TIMING, log_file: Path | None = None,
                 wal_max_segment_bytes: int = 64 * 1024 * 1024, wal: WalConfig | None = None,
                 shred: ShredConfig | None = None) -> list[NodeConfig]:
    """One NodeConfig per member (ids n1..nN), data under ``root``/<id>/data."""
    files = write_cluster_files(root / "secrets")
    ids = [f"n{number}" for number in range(1, node_count + 1)]
    ports = free_ports(2 * node_count)
    peer_ports = dict(zip(ids, ports[:node_count]))
    http_ports = dict(zip(ids, ports[node_count:]))
    members = tuple(MemberConfig(id=node_id, peer_addr=f"127.0.0.1:{peer_ports[node_id]}",
                                 http_url=f"http://127.0.0.1:{http_ports[node_id]}") for node_id in ids)
    return [NodeConfig(node_id=node_id, data_dir=root / node_id / "data", members=members, api_keys=API_KEYS,
                       master_key_file=files.master_key_file,
                       cluster_secret_file=files.cluster_secret_file if node_count > 1 else None,
                       log_file=log_file, http=HttpConfig(port=http_ports[node_id], workers=TEST_HTTP_WORKERS),
                       peer=PeerConfig(port=peer_ports[node_id]), timing=timing,
                       idempotency=IdempotencyConfig(),
                       wal=wal or WalConfig(max_segment_bytes=wal_max_segment_bytes, fsync=True),
                       shred=shred or ShredConfig())
            for node_id in ids]


# --------------------------------------------------------------------------- running nodes

@dataclass(slots=True)
class RunningNode:
    config: NodeConfig
    node: Node
    service: NodeService
    closed: bool = False

    @property
    def node_id(self) -> str:
        return self.config.node_id

    def is_primary(self) -> bool:
        return not self.closed and self.node.replica.role == Role.PRIMARY

    def is_serving(self) -> bool:
        """Primary, with its first epoch applied: a fresh node elects itself before the bootstrap
        rotation commits, and a tokenize between the two is 503 "no active epoch yet"."""
        return self.is_primary() and self.node.store.active_epoch() >= 1

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.service.close()
            await self.node.close()


async def start_node(config: NodeConfig) -> RunningNode:
    node = Node(config)
    service = NodeService(node)
    await node.start()
    return RunningNode(config, node, service)


@dataclass(slots=True)
class Cluster:
    """Nodes of one test cluster; ``close`` stops every node still running."""

    configs: list[NodeConfig]
    nodes: list[RunningNode] = field(default_factory=list)

    def running(self) -> list[RunningNode]:
        return [running for running in self.nodes if not running.closed]

    def primaries(self) -> list[RunningNode]:
        return [running for running in self.running() if running.is_primary()]

    def by_id(self, node_id: str) -> RunningNode:
        return next(running for running in self.nodes if running.node_id == node_id)

    async def wait_for_stable_primary(self, timeout_seconds: float = 5.0) -> RunningNode:
        """The single primary once every running node follows it and has applied epoch 1."""
        def settled() -> RunningNode | None:
            primaries = self.primaries()
            if len(primaries) != 1:
                return None
            primary = primaries[0]
            for running in self.running():
                if running.node.replica.primary_id != primary.node_id:
                    return None
                if running.node.store.active_epoch() < 1:
                    return None
            return primary
        return await wait_until(settled, timeout_seconds, "one primary followed by every running node")

    async def restart(self, running: RunningNode) -> RunningNode:
        """Close ``running`` if needed and start a new Node on the same config and directories."""
        await running.close()
        restarted = await start_node(running.config)
        self.nodes[self.nodes.index(running)] = restarted
        return restarted

    def backups(self) -> list[RunningNode]:
        return [running for running in self.running() if not running.is_primary()]

    async def close(self) -> None:
        for running in self.nodes:
            await running.close()


async def start_cluster(root: Path, node_count: int, timing: TimingConfig = _FAST_TIMING,
                        wal_max_segment_bytes: int = 64 * 1024 * 1024, wal: WalConfig | None = None,
                        shred: ShredConfig | None = None) -> Cluster:
    cluster = Cluster(make_configs(root, node_count, timing, wal_max_segment_bytes=wal_max_segment_bytes, wal=wal,
                                   shred=shred))
    try:
        for config in cluster.configs:
            cluster.nodes.append(await start_node(config))
    except BaseException:
        await cluster.close()
        raise
    return cluster


# Logs compacted after every 10 applied entries, keeping one, in small segments: a backup stopped for a dozen
# entries is behind the primary's log base and catches up by snapshot.
SNAPSHOT_SOON = WalConfig(max_segment_bytes=4096, fsync=True, compact_every_entries=10, compact_keep_entries=1)


async def cluster_with_a_stopped_backup(root: Path) -> tuple[Cluster, RunningNode, RunningNode]:
    """Three nodes with SNAPSHOT_SOON logs, a stable primary and one backup stopped: (cluster, primary,
    the stopped backup, for ``cluster.restart``). The caller closes the cluster."""
    cluster = await start_cluster(root, 3, wal=SNAPSHOT_SOON)
    try:
        primary = await cluster.wait_for_stable_primary()
        stopped = cluster.backups()[0]
        await stopped.close()
    except BaseException:
        await cluster.close()
        raise
    return cluster, primary, stopped


async def save_backup(running: RunningNode, path: Path) -> tuple[int, int]:
    """Take a backup of ``running`` through its service into ``path``; returns its (index, view)."""
    stream = await running.service.open_backup()
    try:
        with open(path, "wb") as handle:
            async for chunk in stream.chunks(65536):
                handle.write(chunk)
    finally:
        await stream.close()
    return stream.index, stream.view


# --------------------------------------------------------------------------- partitions

class Partition:
    """Cuts a node off from the others by dropping every frame delivered across the cut.

    The TCP links stay up (as behind a black-holing switch), so nothing notices
    a disconnect; only the messages vanish. It wraps the transport's private
    delivery callback because the Node binds its handler at construction.
    """

    def __init__(self, cluster: Cluster, isolated_id: str) -> None:
        self.cluster = cluster
        self.isolated_id = isolated_id
        self.originals: dict[str, Callable[[str, object], None]] = {}
        self.dropped = 0
        for running in cluster.running():
            transport = running.node.transport
            assert transport is not None
            original = transport._on_message
            self.originals[running.node_id] = original
            transport._on_message = self._filter(running.node_id, original)

    def _filter(self, receiver_id: str, deliver: Callable[[str, object], None]) -> Callable[[str, object], None]:
        def filtered(sender_id: str, message: object) -> None:
            if (sender_id == self.isolated_id) != (receiver_id == self.isolated_id):
                self.dropped += 1
                return
            deliver(sender_id, message)
        return filtered

    def heal(self) -> None:
        for running in self.cluster.running():
            if running.node_id in self.originals and running.node.transport is not None:
                running.node.transport._on_message = self.originals[running.node_id]
        self.originals.clear()


# --------------------------------------------------------------------------- proposal gates

class ProposalGate:
    """Wraps ``node.propose`` so a test can hold chosen proposals until it opens the gate.

    ``hold(payload)`` decides which proposals wait; every proposal's decoded
    command is recorded in order, so a test can see what the service proposed.
    """

    def __init__(self, node: Node, hold: Callable[[object], bool]) -> None:
        self.node = node
        self.original = node.propose
        self.hold = hold
        self.opened = asyncio.Event()
        self.waiting = asyncio.Event()
        self.proposed: list[object] = []
        node.propose = self._propose  # type: ignore[method-assign]

    async def _propose(self, payload: bytes, timeout_seconds: float):
        command = commands.decode_command(payload)
        self.proposed.append(command)
        if self.hold(command):
            self.waiting.set()
            await self.opened.wait()
        return await self.original(payload, timeout_seconds)

    def open(self) -> None:
        self.opened.set()

    def remove(self) -> None:
        self.opened.set()
        self.node.propose = self.original  # type: ignore[method-assign]


# --------------------------------------------------------------------------- raw peer connections

# The incarnation a raw test peer presents (tokenvault/core/incarnations.py): any 16 bytes.
RAW_PEER_INCARNATION = b"\x07" * 16


def handshake_proof(secret: bytes, nonce: bytes, prover_id: str, verifier_id: str,
                    prover_incarnation: bytes = RAW_PEER_INCARNATION,
                    prover_settings: tuple[tuple[str, int], ...] = ()) -> bytes:
    """The peer handshake MAC as transport.py documents it, written independently for the tests."""
    settings = b"\x00".join(b"%s=%d" % (name.encode(), value) for name, value in prover_settings)
    message = (HANDSHAKE_CONTEXT + prover_id.encode() + b"\x00" + verifier_id.encode() + b"\x00" + nonce
               + b"\x00" + prover_incarnation + b"\x00" + settings)
    return hmac.new(secret, message, hashlib.sha256).digest()


class RawPeer:
    """A hand-driven peer connection: lets a test play a (possibly hostile) node."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(16 * 1024 * 1024)
        self.received: list[Message] = []

    @classmethod
    async def connect(cls, port: int, *, greeting: bool = True, tls_context: ssl.SSLContext | None = None,
                      timeout_seconds: float = 3.0) -> "RawPeer":
        """Connect; by default wait for the acceptor's greeting (and then start TLS when given a context)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        peer = cls(reader, writer)
        if greeting:
            assert await asyncio.wait_for(reader.readexactly(len(GREETING)), timeout_seconds) == GREETING
            if tls_context is not None:
                await asyncio.wait_for(writer.start_tls(tls_context, server_hostname="127.0.0.1"), timeout_seconds)
        return peer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self, count: int, timeout_seconds: float = 3.0) -> list[Message]:
        """Read until ``count`` more messages arrived; raises EOFError if the other side closed."""
        async def read() -> list[Message]:
            while len(self.received) < count:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("the peer closed the connection")
                self.received.extend(self.decoder.feed(data))
            taken, self.received = self.received[:count], self.received[count:]
            return taken
        return await asyncio.wait_for(read(), timeout_seconds)

    async def read_until_closed(self, timeout_seconds: float = 3.0) -> bytes:
        """Everything the other side sends until it closes the connection (fails if it never does)."""
        async def read() -> bytes:
            chunks = []
            while True:
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:
                    return b"".join(chunks)
                if not data:
                    return b"".join(chunks)
                chunks.append(data)
        return await asyncio.wait_for(read(), timeout_seconds)

    async def handshake(self, my_id: str, acceptor_id: str, secret: bytes,
                        trailing: bytes = b"", settings: tuple[tuple[str, int], ...] = ()) -> None:
        """Dial side of the handshake; ``trailing`` bytes go out in the same write as the proof; ``settings``
        are the replicated-state settings presented (a real node's: its config's replicated_settings)."""
        my_nonce = os.urandom(NONCE_BYTES)
        await self.send(encode_frame(Hello(node_id=my_id, nonce=my_nonce, incarnation=RAW_PEER_INCARNATION,
                                           settings=settings)))
        hello, proof = await self.receive(2)
        assert isinstance(hello, Hello) and hello.node_id == acceptor_id
        assert isinstance(proof, HelloProof)
        assert hmac.compare_digest(proof.mac, handshake_proof(secret, my_nonce, acceptor_id, my_id, hello.incarnation,
                                                              hello.settings))
        answer = HelloProof(node_id=my_id, mac=handshake_proof(secret, hello.nonce, my_id, acceptor_id,
                                                               prover_settings=settings))
        await self.send(encode_frame(answer) + trailing)

    def close(self) -> None:
        self.writer.close()


def write_certificate_naming(ca_cert_file: Path, ca_key_file: Path, node_ids: list[str], directory: Path,
                             stem: str) -> NodeTlsFiles:
    """A certificate for 127.0.0.1 signed by the cluster CA (as ``tls.create_node_certificate`` makes one)
    whose subject alternative names name every one of ``node_ids``, which the cluster tool never writes,
    and its key, as ``<stem>.crt`` and ``<stem>.key`` under ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = tls.load_certificate(ca_cert_file)
    ca_key = tls.load_private_key(ca_key_file)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    names += [x509.UniformResourceIdentifier(tls.node_identity_uri(node_id)) for node_id in node_ids]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_ids[0])]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_file, 0o600)
    return NodeTlsFiles(cert_file, key_file, ca_cert_file)


def data_files(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file()]


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (a real node's sealer and HTTP workers), from /proc."""
    return [child for child, fields in process_stats() if len(fields) > 1 and int(fields[1]) == pid]


def children_running(pid: int, module: bytes) -> list[int]:
    """The direct children of ``pid`` that run ``python -m module`` (b"tokenvault.api.worker": a real
    node's HTTP workers; b"tokenvault.core.sealer": its sealer), in pid order."""
    found = []
    for child in child_pids(pid):
        try:
            command = (Path("/proc") / str(child) / "cmdline").read_bytes()
        except OSError:
            continue
        if module in command.split(b"\0"):
            found.append(child)
    return sorted(found)


def files_holding(directory: Path, needle: bytes) -> list[Path]:
    """Every file under ``directory`` whose bytes hold ``needle``: the scans that show a value, a
    ciphertext or a secret is (or is no longer) on a node's disk. A file deleted while the walk runs
    (a compaction) is passed over."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            path = Path(root) / name
            try:
                data = path.read_bytes()
            except (FileNotFoundError, PermissionError):
                continue
            if needle in data:
                found.append(path)
    return found


@contextlib.asynccontextmanager
async def http_client(app: HttpApp) -> AsyncIterator[aiohttp.ClientSession]:
    """``app`` served on 127.0.0.1 (the node's own HTTP server) and a client session on its URL."""
    server = http_server(app)
    await server.start("127.0.0.1", 0)
    host, port = server.addresses[0][:2]
    try:
        async with aiohttp.ClientSession(base_url=f"http://{host}:{port}") as session:
            yield session
    finally:
        await server.close(0)
