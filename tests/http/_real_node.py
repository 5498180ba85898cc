"""One real `tokenvault serve` process (a cluster of one) for the HTTP tests.

The node is generated and started through tokenvault.devcluster.cluster's programmatic
API in a temporary directory, on ports the kernel handed out for port 0, with
fast election timing so that it becomes primary in a fraction of a second.
`RealNode.stop` always ends the process: SIGTERM through stop_cluster, then a
SIGKILL of the recorded pid if the process is still there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from tokenvault.devcluster import cluster
from tokenvault.config import TimingConfig, WalConfig
from tokenvault.crypto.tls import http_client_context

# A one-member cluster elects itself after one election timeout: 5-10 ticks of 20 ms.
FAST_TIMING = TimingConfig(tick_ms=20, election_timeout_ticks=5, heartbeat_interval_ticks=1,
                           request_timeout_ms=2000)
START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 5.0
KILL_TIMEOUT_SECONDS = 5.0
START_ATTEMPTS = 3
POLL_INTERVAL_SECONDS = 0.05
REQUEST_TIMEOUT_SECONDS = 5.0
MAX_RESPONSE_BYTES = 1 << 20

def node_settings(tls: bool = True) -> cluster.NodeSettings:
    # fsync stays on: the node under test takes the same durable write path as in production.
    return cluster.NodeSettings(log_level="info", timing=FAST_TIMING, wal=WalConfig(fsync=True), tls=tls,
                                http_workers=1)


def https_opener(ca_file: Path | None) -> urllib.request.OpenerDirector:
    """No proxy; https:// verified against the cluster CA."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ca_file is not None:
        handlers.append(urllib.request.HTTPSHandler(context=http_client_context(ca_file)))
    return urllib.request.build_opener(*handlers)


def free_port_pair() -> tuple[int, int]:
    """An HTTP and a peer port, both handed out by the kernel for port 0 (held together, so distinct)."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for probe in probes:
            probe.bind((cluster.HOST, 0))
        http_port, peer_port = (probe.getsockname()[1] for probe in probes)
    finally:
        for probe in probes:
            probe.close()
    return http_port, peer_port


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class RealNode:
    """A started node: its cluster directory and spec, and the pid of its process."""

    directory: Path
    spec: cluster.ClusterSpec
    pid: int

    @property
    def node(self) -> cluster.NodeSpec:
        return self.spec.nodes[0]

    @property
    def base_url(self) -> str:
        return self.node.http_url

    @property
    def ca_file(self) -> Path | None:
        """The cluster CA (None for a plain node)."""
        return self.spec.ca_file

    @property
    def full_key(self) -> str:
        """The 'full' API key (admin, tokenize, detokenize) as cluster.json lists it."""
        return self.spec.key("full")

    def is_alive(self) -> bool:
        """True when the node's process is still the one this fixture started."""
        return cluster.running_pid(self.node) == self.pid

    def request(self, method: str, path: str, document: Any = None, key: str | None = None) -> HttpReply:
        """One HTTP request (no proxy); error statuses are returned, not raised."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = None
        if document is not None:
            data = json.dumps(document).encode("utf-8")
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with https_opener(self.ca_file).open(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
                return HttpReply(response.status, dict(response.headers), response.read(MAX_RESPONSE_BYTES))
        except urllib.error.HTTPError as error:
            with error:
                return HttpReply(error.code, dict(error.headers), error.read(MAX_RESPONSE_BYTES))

    def log_files(self) -> list[Path]:
        """The node's JSON log and its captured stdout/stderr."""
        return [self.node.log_file, self.node.output_file]

    def output_tail(self) -> str:
        return cluster.output_tail(self.node, lines=30)

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL the recorded pid if it is still there afterwards."""
        try:
            cluster.stop_cluster(self.directory, timeout_seconds=STOP_TIMEOUT_SECONDS)
        finally:
            _kill_if_alive(self.node, self.pid)


def _kill_if_alive(node: cluster.NodeSpec, pid: int) -> None:
    # running_pid checks that the pid still runs this node's config, so a recycled pid is never signalled.
    if cluster.running_pid(node) != pid:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + KILL_TIMEOUT_SECONDS
    while cluster.running_pid(node) == pid:
        if time.monotonic() >= deadline:
            raise RuntimeError(f"node process {pid} is still alive after SIGKILL")
        time.sleep(POLL_INTERVAL_SECONDS)


def _stop_leftovers(directory: Path) -> None:
    """After a failed start: end whatever process the attempt launched."""
    if not (directory / cluster.CLUSTER_FILE_NAME).exists():
        return
    spec = cluster.load_cluster(directory)
    pids = [(node, cluster.running_pid(node)) for node in spec.nodes]
    try:
        cluster.stop_cluster(directory, timeout_seconds=STOP_TIMEOUT_SECONDS)
    finally:
        for node, pid in pids:
            if pid is not None:
                _kill_if_alive(node, pid)


def start_real_node(root: Path, tls: bool = True) -> RealNode:
    """Generate and start a one-node cluster under `root` (TLS unless `tls` is False); retry on a port
    taken in between."""
    for attempt in range(1, START_ATTEMPTS + 1):
        directory = root / f"cluster-{attempt}"
        try:
            spec, _ = cluster.start_cluster(directory, 1, ports=[free_port_pair()], settings=node_settings(tls),
                                            timeout_seconds=START_TIMEOUT_SECONDS)
        except cluster.ClusterError as error:
            _stop_leftovers(directory)
            if "already in use" not in str(error).lower() or attempt == START_ATTEMPTS:
                raise
            shutil.rmtree(directory, ignore_errors=True)
            continue
        pid = cluster.running_pid(spec.nodes[0])
        if pid is None:
            _stop_leftovers(directory)
            raise RuntimeError(f"the node answered but has no running process\n{cluster.output_tail(spec.nodes[0])}")
        return RealNode(directory=directory, spec=spec, pid=pid)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def running_real_node(root: Path, tls: bool = True) -> Iterator[RealNode]:
    """A started one-node cluster under ``root``, stopped on the way out whatever happened."""
    node = start_real_node(root, tls=tls)
    try:
        yield node
    finally:
        node.stop()
