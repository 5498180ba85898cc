"""Test hosts in network namespaces: each node in its own namespace, behind a veth pair on one bridge.

Faults are cut into the namespaces' own packet filters (iptables), so they hit
the node's real sockets the way a network does: both ways, one way, or only
towards some peers. Delay and jitter need the kernel's netem queueing
discipline; ``netem_available`` says whether this machine has it.

Everything here needs root and iproute2 and iptables; ``unavailable_reason``
says what is missing so the tests can skip with that reason. Names carry a
per-process tag, and ``NetnsCluster.close`` removes every namespace, link and
process it made, whatever happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from harness import HTTP_WORKERS, wait_for
from tokenvault.auth import ApiKeyEntry
from tokenvault.config import HttpConfig, MemberConfig, NodeConfig, PeerConfig, TimingConfig, write_node_config
from tokenvault.crypto.keys import MasterKey, write_secret_file

HTTP_PORT = 7000
PEER_PORT = 7001
REQUEST_TIMEOUT_SECONDS = 2.0
COMMAND_TIMEOUT_SECONDS = 10.0
# The test hosts are on a private bridge: never through a proxy the environment may name.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: iproute2, iptables)"
    probe = f"tvprobe{os.getpid() % 100000}"
    created = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if created.returncode != 0:
        return f"cannot create a network namespace: {created.stderr.strip()[:200]}"
    try:
        rule = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-A", "OUTPUT", "-d", "192.0.2.1",
                               "-j", "DROP"], capture_output=True, text=True)
        if rule.returncode != 0:
            return f"iptables does not work in a namespace: {rule.stderr.strip()[:200]}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def netem_available() -> bool:
    """Whether the kernel has netem (delay, jitter); checked on a throwaway namespace's loopback."""
    probe = f"tvnetem{os.getpid() % 100000}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return False
    try:
        subprocess.run(["ip", "-n", probe, "link", "set", "lo", "up"], capture_output=True)
        added = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                                "delay", "1ms"], capture_output=True)
        return added.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[:300]}")


@dataclass
class NetnsNode:
    node_id: str
    namespace: str
    address: str
    host_link: str  # the veth end on the bridge, in the root namespace
    config_path: Path
    output_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{HTTP_PORT}"


@dataclass
class NetnsCluster:
    """N nodes, one namespace each, on one bridge; the test process is a client on the bridge."""

    directory: Path
    node_count: int = 3
    timing: TimingConfig = field(default_factory=lambda: TimingConfig(
        tick_ms=20, election_timeout_ticks=25, heartbeat_interval_ticks=2, request_timeout_ms=2000))
    nodes: list[NetnsNode] = field(default_factory=list)
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    _made: ClassVar[int] = 0

    def __post_init__(self) -> None:
        # Names unique per process and per cluster (interface names have at most 15 characters), so
        # a namespace the kernel is still tearing down never collides with the next test's.
        NetnsCluster._made += 1
        tag, sequence = os.getpid() % 10000, NetnsCluster._made % 100
        self.prefix = f"t{tag:04d}{sequence:02d}"
        self.bridge = f"{self.prefix}br"
        self.subnet = f"10.{150 + sequence % 100}.{tag % 250}"

    # ------------------------------------------------------------ life cycle
    def start(self) -> "NetnsCluster":
        try:
            self._build_network()
            self._write_configs()
            for node in self.nodes:
                self.start_node(node)
            self.wait_for_primary()
        except BaseException:
            self.close()
            raise
        return self

    def _build_network(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for number in range(1, self.node_count + 1):
            node_id = f"n{number}"
            namespace, link = f"{self.prefix}-{node_id}", f"{self.prefix}v{number}"
            address = f"{self.subnet}.{10 + number}"
            _run("ip", "netns", "add", namespace)
            _run("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _run("ip", "link", "set", link, "master", self.bridge, "up")
            _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _run("ip", "-n", namespace, "link", "set", "eth0", "up")
            _run("ip", "-n", namespace, "link", "set", "lo", "up")
            directory = self.directory / node_id
            directory.mkdir(parents=True)
            self.nodes.append(NetnsNode(node_id, namespace, address, link, directory / "node.toml",
                                        directory / "node.out"))

    def _write_configs(self) -> None:
        secrets_directory = self.directory / "secrets"
        secrets_directory.mkdir(mode=0o700)
        master_key_file, cluster_secret_file = secrets_directory / "master.key", secrets_directory / "cluster.secret"
        MasterKey.generate().write_file(master_key_file)
        write_secret_file(cluster_secret_file, os.urandom(32))
        members = tuple(MemberConfig(id=node.node_id, peer_addr=f"{node.address}:{PEER_PORT}", http_url=node.url)
                        for node in self.nodes)
        key = ApiKeyEntry(name="full", sha256=hashlib.sha256(self.api_key.encode()).hexdigest(),
                          scopes=frozenset({"admin", "tokenize", "detokenize"}))
        for node in self.nodes:
            config = NodeConfig(node_id=node.node_id, data_dir=self.directory / node.node_id / "data",
                                members=members, api_keys=(key,), master_key_file=master_key_file,
                                cluster_secret_file=cluster_secret_file,
                                log_file=self.directory / node.node_id / "node.log",
                                http=HttpConfig(host=node.address, port=HTTP_PORT, workers=HTTP_WORKERS),
                                peer=PeerConfig(host=node.address, port=PEER_PORT), timing=self.timing)
            write_node_config(node.config_path, config)

    def start_node(self, node: NetnsNode) -> None:
        command = ["ip", "netns", "exec", node.namespace, sys.executable, "-m", "tokenvault.cli", "serve",
                   "--config", str(node.config_path)]
        with open(node.output_path, "ab") as output:
            node.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def kill(self, node: NetnsNode) -> None:
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait(timeout=COMMAND_TIMEOUT_SECONDS)

    def close(self) -> None:
        for node in self.nodes:
            self.kill(node)
        for node in self.nodes:
            subprocess.run(["ip", "link", "del", node.host_link], capture_output=True)
            subprocess.run(["ip", "netns", "del", node.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    # ------------------------------------------------------------ faults
    def peers_of(self, node: NetnsNode) -> list[str]:
        return [other.address for other in self.nodes if other is not node]

    def drop(self, node: NetnsNode, *, incoming: bool, outgoing: bool, addresses: Sequence[str] | None = None) -> None:
        """Drop the node's packets to and/or from ``addresses`` (default: every peer; the client stays)."""
        for address in addresses if addresses is not None else self.peers_of(node):
            if outgoing:
                _run("ip", "netns", "exec", node.namespace, "iptables", "-A", "OUTPUT", "-d", address, "-j", "DROP")
            if incoming:
                _run("ip", "netns", "exec", node.namespace, "iptables", "-A", "INPUT", "-s", address, "-j", "DROP")

    def delay(self, node: NetnsNode, delay_ms: int, jitter_ms: int) -> None:
        """Delay (with jitter) everything the node sends; needs netem."""
        _run("ip", "netns", "exec", node.namespace, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay",
             f"{delay_ms}ms", f"{jitter_ms}ms")

    def heal(self, node: NetnsNode) -> None:
        _run("ip", "netns", "exec", node.namespace, "iptables", "-F")
        subprocess.run(["ip", "netns", "exec", node.namespace, "tc", "qdisc", "del", "dev", "eth0", "root"],
                       capture_output=True)

    # ------------------------------------------------------------ client
    def request(self, node: NetnsNode, method: str, path: str, document: Any = None,
                timeout_seconds: float = REQUEST_TIMEOUT_SECONDS) -> tuple[int, Any]:
        """(status, JSON body); status 0 when the node could not be reached or did not answer in time."""
        data = json.dumps(document).encode() if document is not None else None
        request = urllib.request.Request(node.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"})
        try:
            with _OPENER.open(request, timeout=timeout_seconds) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, None
        except (OSError, ValueError):
            return 0, None

    def health(self, node: NetnsNode) -> dict[str, Any] | None:
        status, body = self.request(node, "GET", "/health", timeout_seconds=1.0)
        return body if status == 200 else None

    def primary(self, among: Sequence[NetnsNode] | None = None) -> NetnsNode | None:
        """The node that the given nodes (default: all) agree is primary, and that says so itself."""
        candidates = list(among if among is not None else self.nodes)
        healths = [self.health(node) for node in candidates]
        if any(health is None for health in healths):
            return None
        primary_ids = {health["primary_id"] for health in healths if health is not None}
        if len(primary_ids) != 1 or None in primary_ids:
            return None
        primary_id = primary_ids.pop()
        primary = next(node for node in self.nodes if node.node_id == primary_id)
        health = self.health(primary)
        return primary if health is not None and health["role"] == "primary" else None

    def wait_for_primary(self, among: Sequence[NetnsNode] | None = None, timeout_seconds: float = 20.0,
                         other_than: NetnsNode | None = None) -> NetnsNode:
        def agreed() -> NetnsNode | None:
            primary = self.primary(among)
            return primary if primary is not None and primary is not other_than else None
        what = "one agreed primary" + (f" other than {other_than.node_id}" if other_than else "")
        return wait_for(agreed, timeout_seconds, what)

    def tokenize(self, node: NetnsNode, values: list[str]) -> list[str] | None:
        status, body = self.request(node, "POST", "/v1/tokenize", {"values": values})
        return body["tokens"] if status == 200 else None

    def detokenize(self, node: NetnsNode, tokens: list[str]) -> list[str | None] | None:
        status, body = self.request(node, "POST", "/v1/detokenize", {"tokens": tokens})
        return body["values"] if status == 200 else None
