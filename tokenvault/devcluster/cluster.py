"""The local cluster tool behind ./run_cluster.sh (`python -m tokenvault.devcluster <command>`).

It generates a cluster directory once (master key, cluster secret, API keys,
one config per node) and then starts, stops, kills and restarts node processes
from it; the same directory always restarts the same cluster with the same keys
and data. Layout under $TOKENVAULT_CLUSTER_DIR (default ./.cluster):

    cluster.secret               hex secret (peer handshake), mode 0600
    cluster.json                 node URLs/paths and the API keys (mode 0600)
    n1/ .. nN/                   node.toml (hashes of API keys only), data/,
                                 node.log (the node's JSON log), node.out
                                 (its stdout/stderr), node.pid

and, outside it, the master key: $TOKENVAULT_KEY_DIR/master.key, by default the
sibling <cluster dir>.keys/master.key (./.cluster.keys/master.key), hex, mode
0600 in a mode-0700 directory. A copy of the cluster directory, every node's
data included, therefore opens no value (docs/security.md, "Key custody"). A
cluster generated before this layout keeps its master.key inside and still
starts, with a warning.

The functions here are usable programmatically (integration tests drive a
cluster through init_cluster, start_cluster, cluster_status, kill_node,
restart_node and stop_cluster; restore_cluster builds a new cluster from a
backup); none of them uses asyncio, so they can be called from sync or async
code alike.

The cluster's description (the spec types, the environment knobs, the
generation and reading of the directory's files) is in tokenvault.devcluster.cluster_spec;
its public names are re-exported here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenvault.crypto.keys import CryptoError, MasterKey
from tokenvault.crypto.tls import TlsError, http_client_context
from tokenvault.devcluster.cluster_spec import _generate, _write_private_file, check_existing_master_key
# Re-exported (the "name as name" form marks them so for mypy): the cluster's public names live here too.
from tokenvault.devcluster.cluster_spec import (
    ALLOWED_NODE_COUNTS as ALLOWED_NODE_COUNTS, NODE_COUNT_RULE as NODE_COUNT_RULE, API_KEY_SCOPES as API_KEY_SCOPES,
    CLUSTER_FILE_NAME as CLUSTER_FILE_NAME, DEFAULT_BASE_PORT as DEFAULT_BASE_PORT,
    DEFAULT_NODE_COUNT as DEFAULT_NODE_COUNT, ENVIRONMENT_KNOBS as ENVIRONMENT_KNOBS, HOST as HOST,
    KEY_DIRECTORY_ENVIRONMENT_VARIABLE as KEY_DIRECTORY_ENVIRONMENT_VARIABLE,
    MASTER_KEY_FILE_NAME as MASTER_KEY_FILE_NAME, ApiKeyInfo as ApiKeyInfo, ClusterError as ClusterError,
    ClusterSpec as ClusterSpec, NodeSettings as NodeSettings, NodeSpec as NodeSpec,
    base_port_from_environment as base_port_from_environment, contract_ports as contract_ports,
    default_cluster_directory as default_cluster_directory, key_directory as key_directory,
    load_cluster as load_cluster, plan_nodes as plan_nodes, run_cluster_command as run_cluster_command,
    settings_from_environment as settings_from_environment)
from tokenvault.smallfiles import FileTooLarge, read_small_file

DEFAULT_START_TIMEOUT_SECONDS = 30.0
DEFAULT_STOP_TIMEOUT_SECONDS = 10.0
HEALTH_TIMEOUT_SECONDS = 1.0
POLL_INTERVAL_SECONDS = 0.1
LOCK_FILE_NAME = ".lock"
MAX_HEALTH_BYTES = 65536
MAX_PID_FILE_BYTES = 64  # a pid and a newline

Report = Callable[[str], None]
PORT_RELEASE_TIMEOUT_SECONDS = 10.0
# A killed node's workers and sealer exit by themselves within a second of it (docs/architecture.md);
# this is the bound `kill` and `stop` wait for them before they SIGKILL what is left of the node's group.
CHILDREN_EXIT_TIMEOUT_SECONDS = 5.0
# How long the processes of a node's group may take to be gone once SIGKILLed.
GROUP_KILL_TIMEOUT_SECONDS = 5.0
# How long a node seen gone is waited for, to read its exit status (exit_status).
EXIT_STATUS_WAIT_SECONDS = 1.0

# Processes started by this Python process, so that they can be reaped (a
# killed child stays a zombie, and looks alive, until its parent waits for it).
_children: dict[int, subprocess.Popen[bytes]] = {}
# The exit status of each such process once it has been reaped (negative: the signal that ended it).
_exit_statuses: dict[int, int] = {}


def _silent(message: str) -> None:
    del message


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node_id: str
    http_url: str
    pid: int | None
    health: Mapping[str, Any] | None
    error: str | None

    def field(self, name: str) -> Any:
        return None if self.health is None else self.health.get(name)

    def describe(self) -> str:
        """One status line: id, pid or "down", role, view, commit and applied index, active epoch."""
        if self.pid is None and self.health is None:
            return f"{self.node_id:<4} down"
        pid_text = f"pid {self.pid}" if self.pid is not None else "pid ? (no pid file)"
        if self.health is None:
            return f"{self.node_id:<4} {pid_text:<10} unreachable: {self.error}  {self.http_url}"
        return (f"{self.node_id:<4} {pid_text:<10} {str(self.field('role')):<9} view {self.field('view')}  "
                f"commit {self.field('commit_index')}  applied {self.field('applied_index')}  "
                f"epoch {self.field('active_epoch')}  {self.http_url}")


# ---------------------------------------------------------------- generation


def init_cluster(directory: Path | str, nodes: int = DEFAULT_NODE_COUNT, base_port: int = DEFAULT_BASE_PORT, *,
                 ports: Sequence[tuple[int, int]] | None = None, settings: NodeSettings | None = None,
                 master_key: MasterKey | None = None) -> tuple[ClusterSpec, bool]:
    """Generate the cluster directory if it has no cluster.json yet; return (spec, created).

    An existing cluster is returned unchanged (same keys and data) as long as it
    has `nodes` nodes. `ports` overrides the contract's port numbering, e.g. with
    free ephemeral ports in tests. `master_key` is used instead of a new one
    (restore_cluster passes the key of the cluster a backup came from).
    """
    directory = Path(directory).expanduser().absolute()
    if nodes not in ALLOWED_NODE_COUNTS:
        raise ClusterError(f"{NODE_COUNT_RULE} (a majority of an even count tolerates no more failures than "
                           f"the odd count below it)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(directory):
        if (directory / CLUSTER_FILE_NAME).exists():
            spec = load_cluster(directory)
            _check_node_count(spec, nodes)
            return spec, False
        leftovers = [entry.name for entry in directory.iterdir() if entry.name != LOCK_FILE_NAME]
        if leftovers:
            raise ClusterError(
                f"{directory} is not empty but has no {CLUSTER_FILE_NAME} (an interrupted set-up, or not a "
                f"cluster directory); remove it or set TOKENVAULT_CLUSTER_DIR to another directory")
        settings = settings or NodeSettings()
        planned = plan_nodes(directory, nodes, ports if ports is not None else contract_ports(nodes, base_port),
                             tls=settings.tls)
        try:
            return _generate(directory, planned, settings, master_key), True
        except BaseException:
            for entry in directory.iterdir():
                if entry.name != LOCK_FILE_NAME:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            raise


def _check_node_count(spec: ClusterSpec, nodes: int | None) -> None:
    if nodes is not None and nodes != len(spec.nodes):
        raise ClusterError(
            f"the cluster in {spec.directory} has {len(spec.nodes)} node(s), not {nodes}; run "
            f"'{run_cluster_command(spec.directory, 'start')}' without --nodes to restart it, or stop it and remove the directory "
            f"(or set TOKENVAULT_CLUSTER_DIR elsewhere) to create a {nodes}-node cluster")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise cluster commands on one directory (two concurrent starts must not both launch a node)."""
    descriptor = os.open(directory / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(descriptor, "r+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------- processes


def _reap(pid: int) -> bool:
    """True when `pid` is a child of ours that has exited (and is now reaped)."""
    child = _children.get(pid)
    if child is not None:
        returncode = child.poll()
        if returncode is None:
            return False
        del _children[pid]
        _exit_statuses[pid] = returncode
        return True
    try:
        reaped_pid, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return reaped_pid == pid


def _is_node_process(pid: int, node: NodeSpec) -> bool:
    """True when `pid` is alive and is this node's `serve` process (not a recycled pid)."""
    if _reap(pid) or not _held_by_a_live_process(pid):
        return False
    if not Path("/proc/self").exists():
        return True  # no command line to read: a live process under that pid is taken for the node
    try:
        arguments = (Path(f"/proc/{pid}") / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(node.config).encode() in arguments


def read_pid_file(node: NodeSpec) -> int | None:
    """The pid in the node's pid file; None when there is none, or it holds no pid (a stale or foreign file)."""
    try:
        text = read_small_file(node.pid_file, MAX_PID_FILE_BYTES).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    except FileTooLarge:
        return None
    except OSError as error:
        raise ClusterError(f"cannot read {node.pid_file}: {error.strerror}") from None
    return int(text) if text.isdigit() and 0 < int(text) < 2**22 else None


def running_pid(node: NodeSpec) -> int | None:
    """The pid of the node's running process, or None when it is down (a stale pid file counts as down)."""
    pid = read_pid_file(node)
    if pid is None or not _is_node_process(pid, node):
        return None
    return pid


def exit_status(node: NodeSpec) -> int | None:
    """The exit status of the node's last process, once it has exited, when this Python process started it
    (negative: the signal that ended it); None while it runs, or when another process started it."""
    pid = read_pid_file(node)
    if pid is None or running_pid(node) is not None:
        return None
    child = _children.get(pid)
    if child is not None and pid not in _exit_statuses:
        # Seen gone while another thread was reaping it (Popen.poll then says nothing): wait for it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            _exit_statuses[pid] = child.wait(timeout=EXIT_STATUS_WAIT_SECONDS)
            _children.pop(pid, None)
    return _exit_statuses.get(pid)


def _clear_stale_pid_file(node: NodeSpec, report: Report) -> None:
    pid = read_pid_file(node)
    if node.pid_file.exists() and (pid is None or not _is_node_process(pid, node)):
        report(f"{node.node_id}: removing stale pid file (pid {pid} is gone or is not this node)")
        node.pid_file.unlink(missing_ok=True)


def _serve_command(node: NodeSpec) -> list[str]:
    script = Path(sys.executable).parent / "tokenvault"
    if script.exists():
        return [str(script), "serve", "--config", str(node.config)]
    return [sys.executable, "-m", "tokenvault.cli", "serve", "--config", str(node.config)]


def _check_ports_free(node: NodeSpec) -> None:
    for label, port in (("HTTP", node.http_port), ("peer", node.peer_port)):
        if not _port_free(port):
            raise ClusterError(
                f"{node.node_id}: {label} port {port} is already in use by another process; stop it or "
                f"use another cluster directory with a different TOKENVAULT_BASE_PORT")


def _check_new_ports_free(ports: Sequence[tuple[int, int]]) -> None:
    """Before a cluster is generated: a cluster keeps the ports it was made with, so one generated on a
    port in use could never start, and TOKENVAULT_BASE_PORT, read only at generation, could not move it."""
    for number, (http_port, peer_port) in enumerate(ports, start=1):
        for label, port in (("HTTP", http_port), ("peer", peer_port)):
            if not _port_free(port):
                raise ClusterError(
                    f"n{number}: {label} port {port} is already in use by another process, so no cluster was "
                    f"generated; stop that process, or choose other ports with TOKENVAULT_BASE_PORT (node i "
                    f"serves HTTP on base+i and the peer protocol on base+100+i; default {DEFAULT_BASE_PORT})")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _group_members(group: int) -> list[int]:
    """The live processes (not zombies) of process group `group`."""
    if not Path("/proc/self").exists():
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [group]
    return [pid for pid, fields in process_stats()
            if len(fields) > 2 and fields[2] == str(group) and fields[0] not in ("Z", "X")]


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """Each process's pid and the fields of its /proc/<pid>/stat after its name (state, ppid, pgrp, ...);
    one that exits meanwhile is passed over. Linux only."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry)
            if fields:
                yield int(entry.name), fields


def _stat_fields(process: Path) -> list[str]:
    """The fields of ``process``/stat (a /proc/<pid> directory) after its name; [] when it is gone."""
    try:
        return (process / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _wait_group_gone(group: int, deadline: float) -> list[int]:
    """Wait until process group `group` has no live process; what is left at the deadline."""
    while True:
        left = _group_members(group)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def _held_by_a_live_process(pid: int) -> bool:
    """Whether a process that is not a zombie has the pid ``pid``."""
    if not Path("/proc/self").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = _stat_fields(Path(f"/proc/{pid}"))
    return bool(fields) and fields[0] not in ("Z", "X")


def _end_group_of_dead_core(node_id: str, group: int, report: Report) -> str | None:
    """Once the node's core, whose pid is ``group`` (it leads its own session and process group), is dead:
    wait up to CHILDREN_EXIT_TIMEOUT_SECONDS for the rest of its group (HTTP workers, sealer) to exit by
    themselves, as they do when they see the core gone (a worker removing its store view); SIGKILL the
    group's processes still there (a wedged worker keeps the node's HTTP port and its store view) and wait
    up to GROUP_KILL_TIMEOUT_SECONDS. Returns what is still wrong afterwards, or None when all are gone.

    Why signalling the group by the dead core's pid is safe: Linux reuses no pid that is still the id of a
    process group (or session) with a member. So while any of the node's processes is alive, no new
    process can get the pid ``group``, nor found a group of that id (only a process whose own pid it is
    can). Hence: the pid held by no live process (the core gone, or a zombie not reaped yet) means every
    member of group ``group`` is one of the node's; the pid held by a live process means it was reused,
    which only happens once the node's group was empty: nothing of the node is left and nothing is
    signalled. (The one window left: every member exits, the pid is reused and its new owner founds its
    own group, all between the check and the signal, microseconds apart.)"""
    left = _wait_group_gone(group, time.monotonic() + CHILDREN_EXIT_TIMEOUT_SECONDS)
    if not left or _held_by_a_live_process(group):
        return None
    listed = ", ".join(map(str, left))
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        return None
    except PermissionError:
        return f"{node_id}'s processes {listed} outlived it and cannot be signalled (they are another user's)"
    still = _wait_group_gone(group, time.monotonic() + GROUP_KILL_TIMEOUT_SECONDS)
    if still:
        return (f"{node_id}'s processes {', '.join(map(str, still))} are still alive "
                f"{GROUP_KILL_TIMEOUT_SECONDS:g} s after SIGKILL")
    report(f"{node_id}'s processes {listed} outlived it by {CHILDREN_EXIT_TIMEOUT_SECONDS:g} s: killed them "
           f"with SIGKILL (its node.log may say why they did not exit)")
    return None


def _wait_ports_free(node: NodeSpec, deadline: float) -> None:
    while True:
        try:
            _check_ports_free(node)
            return
        except ClusterError:
            if time.monotonic() >= deadline:
                raise ClusterError(f"{node.node_id} is gone but its ports were not released in time") from None
            time.sleep(0.02)


def launch_node(node: NodeSpec, report: Report = _silent) -> int:
    """Start the node's `tokenvault serve` process detached (own session) and write its pid file."""
    _clear_stale_pid_file(node, report)
    if running_pid(node) is not None:
        raise ClusterError(f"{node.node_id} is already running")
    _check_ports_free(node)
    descriptor = os.open(node.output_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    with os.fdopen(descriptor, "ab") as output:
        process = subprocess.Popen(_serve_command(node), stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, cwd=node.directory, start_new_session=True,
                                   close_fds=True)
    _children[process.pid] = process
    _write_private_file(node.pid_file, f"{process.pid}\n")
    return process.pid


def output_tail(node: NodeSpec, lines: int = 12) -> str:
    """The last lines of the node's stdout/stderr and log, for error messages."""
    parts = []
    for path in (node.output_file, node.log_file):
        try:
            with open(path, "rb") as handle:
                handle.seek(max(0, os.fstat(handle.fileno()).st_size - 16384))
                text = handle.read().decode("utf-8", "replace").splitlines()[-lines:]
        except OSError:
            continue
        if text:
            parts.append(f"--- last lines of {path} ---\n" + "\n".join(text))
    return "\n".join(parts) if parts else "(the node wrote no output)"


# ---------------------------------------------------------------- health and status

_plain_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@functools.lru_cache(maxsize=8)
def _https_opener(ca_file: str) -> urllib.request.OpenerDirector:
    """An opener that verifies nodes against the cluster CA (cached: a context costs a file read and parse)."""
    context = http_client_context(Path(ca_file))
    return urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                       urllib.request.HTTPSHandler(context=context))


def open_url(url: str, timeout_seconds: float, ca_file: Path | str | None = None) -> Any:
    """GET `url` without a proxy; https:// is verified against `ca_file` (the cluster CA) when given."""
    if ca_file is not None:
        try:
            opener = _https_opener(str(ca_file))
        except TlsError as error:
            raise ClusterError(str(error)) from None
    else:
        opener = _plain_opener
    return opener.open(url, timeout=timeout_seconds)


def fetch_health(url: str, timeout_seconds: float = HEALTH_TIMEOUT_SECONDS,
                 ca_file: Path | str | None = None) -> dict[str, Any]:
    """GET <url>/health (no proxy, short timeout); raises OSError or ValueError on failure."""
    with open_url(url.rstrip("/") + "/health", timeout_seconds, ca_file) as response:
        body = response.read(MAX_HEALTH_BYTES + 1)
    if len(body) > MAX_HEALTH_BYTES:
        raise ValueError("health response too large")
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("health response is not a JSON object")
    return document


def _describe_error(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        reason = error.reason
        return "connection refused" if isinstance(reason, ConnectionRefusedError) else str(reason)[:120]
    if isinstance(error, (TimeoutError, socket.timeout)):
        return "timed out"
    return f"{type(error).__name__}: {str(error)[:120]}"


def node_status(node: NodeSpec, timeout_seconds: float = HEALTH_TIMEOUT_SECONDS,
                ca_file: Path | None = None) -> NodeStatus:
    pid = running_pid(node)
    try:
        health: dict[str, Any] | None = fetch_health(node.http_url, timeout_seconds, ca_file)
        error = None
    except (OSError, ValueError) as failure:
        health, error = None, _describe_error(failure)
    return NodeStatus(node.node_id, node.http_url, pid, health, error)


def cluster_status(spec: ClusterSpec, timeout_seconds: float = HEALTH_TIMEOUT_SECONDS,
                   node_ids: Sequence[str] | None = None) -> list[NodeStatus]:
    """Every node's pid and /health, queried concurrently (a hung node costs one timeout, not one each)."""
    nodes = [node for node in spec.nodes if node_ids is None or node.node_id in node_ids]
    if not nodes:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        return list(pool.map(lambda node: node_status(node, timeout_seconds, spec.ca_file), nodes))


def primary_of(statuses: Sequence[NodeStatus]) -> str | None:
    """The primary every answering node agrees on: a node saying role "primary" (highest view wins)."""
    primaries = [status for status in statuses if status.field("role") == "primary"]
    if primaries:
        return max(primaries, key=lambda status: status.field("view") or 0).node_id
    answering = [status.field("primary_id") for status in statuses if status.health is not None]
    if answering and answering[0] is not None and all(primary == answering[0] for primary in answering):
        return str(answering[0])
    return None


def _wait(spec: ClusterSpec, node_ids: Sequence[str], timeout_seconds: float,
          ready: Callable[[list[NodeStatus]], bool], what: str) -> list[NodeStatus]:
    """Poll the nodes' health until `ready` holds; fail early when a node process exits."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        statuses = cluster_status(spec, HEALTH_TIMEOUT_SECONDS, node_ids)
        if ready(statuses):
            return statuses
        for status in statuses:
            if status.pid is None and status.health is None:
                node = spec.node(status.node_id)
                code = exit_status(node)
                how = "" if code is None else f" (exit status {code})"
                raise ClusterError(f"{node.node_id} exited{how} while waiting for {what}.\n{output_tail(node)}")
        if time.monotonic() >= deadline:
            lines = "\n".join(status.describe() for status in statuses)
            raise ClusterError(f"timed out after {timeout_seconds:g} s waiting for {what}:\n{lines}\n"
                               f"(see '{run_cluster_command(spec.directory, 'logs NODE_ID')}')")
        time.sleep(POLL_INTERVAL_SECONDS)


def wait_for_primary(spec: ClusterSpec, timeout_seconds: float = DEFAULT_START_TIMEOUT_SECONDS,
                     node_ids: Sequence[str] | None = None) -> list[NodeStatus]:
    """Wait until every given node answers /health and a primary is elected."""
    ids = list(node_ids) if node_ids is not None else [node.node_id for node in spec.nodes]

    def ready(statuses: list[NodeStatus]) -> bool:
        return all(status.health is not None for status in statuses) and primary_of(statuses) is not None

    return _wait(spec, ids, timeout_seconds, ready, "a primary to be elected")


# ---------------------------------------------------------------- commands


def start_cluster(directory: Path | str, nodes: int | None = None, base_port: int | None = None, *,
                  ports: Sequence[tuple[int, int]] | None = None, settings: NodeSettings | None = None,
                  timeout_seconds: float = DEFAULT_START_TIMEOUT_SECONDS,
                  report: Report = _silent) -> tuple[ClusterSpec, list[NodeStatus]]:
    """Create the cluster if needed, start every node that is not running, wait for a primary."""
    directory = Path(directory).expanduser().absolute()
    if (directory / CLUSTER_FILE_NAME).exists():
        spec = load_cluster(directory)
        _check_node_count(spec, nodes)
    else:
        count, base = nodes or DEFAULT_NODE_COUNT, base_port or DEFAULT_BASE_PORT
        _check_new_ports_free(ports if ports is not None else contract_ports(count, base))
        spec, _ = init_cluster(directory, count, base, ports=ports, settings=settings)
        report(f"generated a {len(spec.nodes)}-node cluster in {directory} (master key: "
               f"{master_key_file_of(spec)}, kept outside it)")
    _check_master_key_file(spec, report)
    with _locked(directory):
        for node in spec.nodes:
            _clear_stale_pid_file(node, report)
        # Why: checked node by node as each was launched, a port in use at n2 left n1 running and n3 not
        # started; every port of the nodes to start is checked first, so a refused start starts nothing.
        for node in spec.nodes:
            if running_pid(node) is None:
                _check_ports_free(node)
        for node in spec.nodes:
            pid = running_pid(node)
            if pid is not None:
                report(f"{node.node_id} is already running (pid {pid})")
                continue
            pid = launch_node(node, report)
            report(f"started {node.node_id} (pid {pid}) on {node.http_url}")
    try:
        statuses = wait_for_primary(spec, timeout_seconds)
    except ClusterError as error:
        raise ClusterError(f"{error}\n(nodes that did start keep running: "
                           f"'{run_cluster_command(spec.directory, 'status')}' shows them, "
                           f"'{run_cluster_command(spec.directory, 'stop')}' stops them)") from None
    return spec, _settle(spec, statuses)


def master_key_file_of(spec: ClusterSpec) -> Path | None:
    """The master key file the cluster's node configs name (None: they take it from the environment)."""
    from tokenvault.config import ConfigError, load_config

    try:
        return load_config(spec.nodes[0].config).master_key_file
    except ConfigError as error:
        raise ClusterError(str(error)) from None


def _check_master_key_file(spec: ClusterSpec, report: Report) -> None:
    """Before any node starts: a missing key file is one clear error, not N failed nodes; a key kept inside
    the cluster directory (a cluster generated before the key directory) starts with a warning."""
    path = master_key_file_of(spec)
    if path is None or os.environ.get("TOKENVAULT_MASTER_KEY"):
        return
    if not (path.exists() or path.is_symlink()):
        raise ClusterError(f"the master key file of this cluster, {path}, does not exist: without it no node "
                           f"can open the data in {spec.directory} (restore the key file from where you keep "
                           f"its copy)")
    if Path(os.path.normpath(path)).is_relative_to(spec.directory):
        report(f"warning: the master key {path} is inside the cluster directory, so a copy of {spec.directory} "
               f"opens every value; stop the cluster, move the file to {key_directory(spec.directory)}/ and set "
               f"master_key_file in each n*/node.toml to its new path")


def _settle(spec: ClusterSpec, statuses: list[NodeStatus], grace_seconds: float = 3.0) -> list[NodeStatus]:
    """Give backups a moment to apply what the new primary committed, so the printed status is in step.

    Not a condition of success: a node with a long log to catch up keeps doing so after start returns.
    """
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        primary = primary_of(statuses)
        target = next((status.field("commit_index") for status in statuses if status.node_id == primary), None)
        applied = [status.field("applied_index") for status in statuses]
        if isinstance(target, int) and all(isinstance(index, int) and index >= target for index in applied):
            break
        time.sleep(POLL_INTERVAL_SECONDS)
        statuses = cluster_status(spec)
    return statuses


def _wait_gone(nodes_and_pids: Sequence[tuple[NodeSpec, int]], deadline: float) -> list[tuple[NodeSpec, int]]:
    remaining = list(nodes_and_pids)
    while remaining:
        remaining = [(node, pid) for node, pid in remaining if _is_node_process(pid, node)]
        if not remaining or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return remaining


def stop_cluster(directory: Path | str, timeout_seconds: float = DEFAULT_STOP_TIMEOUT_SECONDS,
                 report: Report = _silent) -> list[str]:
    """SIGTERM every running node, wait up to `timeout_seconds`, SIGKILL the rest. Returns stopped ids."""
    spec = load_cluster(directory)
    with _locked(spec.directory):
        running = []
        for node in spec.nodes:
            _clear_stale_pid_file(node, report)
            pid = running_pid(node)
            if pid is None:
                report(f"{node.node_id} is not running")
                continue
            os.kill(pid, signal.SIGTERM)
            running.append((node, pid))
        survivors = _wait_gone(running, time.monotonic() + timeout_seconds)
        for node, pid in survivors:
            report(f"{node.node_id} (pid {pid}) did not stop within {timeout_seconds:g} s: sending SIGKILL")
            os.kill(pid, signal.SIGKILL)
        still_alive = _wait_gone(survivors, time.monotonic() + 5.0)
        outlived = []
        for node, pid in running:
            if (node, pid) not in still_alive:
                node.pid_file.unlink(missing_ok=True)
                report(f"stopped {node.node_id} (pid {pid})")
                # A node stopped gracefully stops its workers and sealer first; one killed after the
                # timeout leaves them to exit by themselves, and what does not is SIGKILLed, as in `kill`.
                problem = _end_group_of_dead_core(node.node_id, pid, report)
                if problem is not None:
                    outlived.append(problem)
        if still_alive:
            names = ", ".join(node.node_id for node, _ in still_alive)
            raise ClusterError(f"could not stop {names} even with SIGKILL")
        if outlived:
            raise ClusterError("; ".join(outlived))
    return [node.node_id for node, _ in running]


def kill_node(directory: Path | str, node_id: str, report: Report = _silent) -> int:
    """SIGKILL one node (no graceful shutdown) and wait until it is gone, its workers and sealer
    too, and its ports are free.

    Returns its pid. The process can look dead (its main thread a zombie) while
    other threads still hold its sockets; a restart right after must find the
    ports free, so this waits for that too and says so if it does not happen.
    """
    spec = load_cluster(directory)
    node = spec.node(node_id)
    with _locked(spec.directory):
        _clear_stale_pid_file(node, report)
        pid = running_pid(node)
        if pid is None:
            raise ClusterError(f"{node_id} is not running")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        if _wait_gone([(node, pid)], deadline):
            raise ClusterError(f"{node_id} (pid {pid}) is still alive after SIGKILL")
        node.pid_file.unlink(missing_ok=True)
        # Its HTTP workers and sealer (its process group: it leads its own session) see their core gone
        # and exit by themselves, a worker removing its store view; until they have, the node's data
        # directory is still being written. One that does not (wedged) is SIGKILLed with the group.
        problem = _end_group_of_dead_core(node_id, pid, report)
        if problem is not None:
            raise ClusterError(problem)
        _wait_ports_free(node, time.monotonic() + PORT_RELEASE_TIMEOUT_SECONDS)
    report(f"killed {node_id} (pid {pid}) with SIGKILL")
    return pid


def restart_node(directory: Path | str, node_id: str, timeout_seconds: float = DEFAULT_START_TIMEOUT_SECONDS,
                 report: Report = _silent) -> NodeStatus:
    """Start a stopped or killed node with its existing data and wait until it answers /health."""
    spec = load_cluster(directory)
    node = spec.node(node_id)
    with _locked(spec.directory):
        _clear_stale_pid_file(node, report)
        pid = running_pid(node)
        if pid is not None:
            report(f"{node_id} is already running (pid {pid})")
        else:
            pid = launch_node(node, report)
            report(f"started {node_id} (pid {pid}) on {node.http_url}")
    statuses = _wait(spec, [node_id], timeout_seconds,
                     lambda statuses: statuses[0].health is not None, f"{node_id} to answer /health")
    return statuses[0]


# ---------------------------------------------------------------- restore from a backup


def default_master_key_file() -> Path:
    """The master key a restore uses unless told: the default cluster's, $TOKENVAULT_KEY_DIR/master.key or
    ./.cluster.keys/master.key (not TOKENVAULT_CLUSTER_DIR's, since that names the new cluster)."""
    environment = {name: value for name, value in os.environ.items() if name == KEY_DIRECTORY_ENVIRONMENT_VARIABLE}
    return key_directory(default_cluster_directory({}), environment) / MASTER_KEY_FILE_NAME


def _check_key_file_takes(key_file: Path, master_key: MasterKey) -> None:
    """Refuse, before anything is written, a restore whose key directory holds another master key."""
    if key_file.exists() or key_file.is_symlink():
        check_existing_master_key(key_file, master_key, ", or remove that file if it is left from a failed restore")


def _undo_for_new_key_file(key_file: Path) -> Callable[[], None]:
    """What removes the master key file (and its key directory) that a restore about to run creates: only
    what does not exist yet, so that a key directory kept from before is never touched."""
    directory = key_file.parent
    file_existed = key_file.exists() or key_file.is_symlink()
    directory_existed = directory.exists() or directory.is_symlink()

    def undo() -> None:
        if not file_existed:
            with contextlib.suppress(OSError):
                key_file.unlink()
        if not directory_existed:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty

    return undo


def restore_cluster(directory: Path | str, backup_file: Path | str, master_key_file: Path | str,
                    nodes: int = DEFAULT_NODE_COUNT, base_port: int = DEFAULT_BASE_PORT, *,
                    ports: Sequence[tuple[int, int]] | None = None, settings: NodeSettings | None = None,
                    timeout_seconds: float = DEFAULT_START_TIMEOUT_SECONDS,
                    report: Report = _silent) -> tuple[ClusterSpec, list[NodeStatus]]:
    """Build a new cluster in `directory` (which must not exist) from a backup, and start it.

    The backup is verified whole first; then the directory is generated, with
    new API keys and cluster secret, as `start` does, and every node's data
    directory filled from the backup, which checks that the master key (the one
    of the cluster the backup came from) opens every epoch in it. If anything
    fails before the nodes start (a master key that does not open the backup
    included), everything the restore wrote is removed again: the directory, and
    the master key file and key directory when it created them, so that the same
    restore with the right key can follow.
    """
    from tokenvault.core.backup import BackupError, install_staged, shred_scope, staged_backup
    from tokenvault.config import ConfigError, load_config

    directory = Path(directory).expanduser().absolute()
    if directory.exists() or directory.is_symlink():
        raise ClusterError(f"{directory} exists already: a restore builds a new cluster directory; set "
                           f"TOKENVAULT_CLUSTER_DIR to a path that does not exist yet")
    if nodes not in ALLOWED_NODE_COUNTS:
        raise ClusterError(NODE_COUNT_RULE)
    master_key_path = Path(master_key_file).expanduser().absolute()
    if not master_key_path.exists():
        raise ClusterError(f"no master key file at {master_key_path}: pass --master-key-file PATH, the "
                           f"master.key of the cluster the backup was taken from (in its key directory, "
                           f"<cluster dir>.keys/ or ${KEY_DIRECTORY_ENVIRONMENT_VARIABLE})")
    try:
        master_key = MasterKey.from_file(master_key_path)
    except CryptoError as error:
        raise ClusterError(f"cannot use {master_key_path} as the master key: {error}") from None
    if not directory.parent.is_dir():
        raise ClusterError(f"directory {directory.parent} does not exist")
    key_file = key_directory(directory) / MASTER_KEY_FILE_NAME
    _check_key_file_takes(key_file, master_key)
    undo_key = _undo_for_new_key_file(key_file)
    try:
        with staged_backup(Path(backup_file), directory.parent) as staged:
            report(f"backup {backup_file} verified: index {staged.index}, view {staged.view}")
            if staged.manifest.pending is not None:
                report(f"it may hold rows deleted and not yet shredded: each node compacts "
                       f"{shred_scope(staged.manifest.pending)} when it starts")
            try:
                spec, _ = init_cluster(directory, nodes, base_port, ports=ports, settings=settings,
                                       master_key=master_key)
                for position, node in enumerate(spec.nodes):
                    restored = install_staged(staged, load_config(node.config), master_key,
                                              consume=position == len(spec.nodes) - 1)
                    report(f"{node.node_id}: data directory restored ({restored.token_count} opaque tokens in "
                           f"{restored.epochs} epoch(s))")
            except BaseException:
                # Why: the key file init_cluster wrote for a key that turns out not to open the backup
                # would refuse the retry with the right key ("already holds another master key").
                shutil.rmtree(directory, ignore_errors=True)
                undo_key()
                raise
    except (BackupError, ConfigError) as error:
        raise ClusterError(str(error)) from None
    report(f"generated a {len(spec.nodes)}-node cluster in {directory} with the backup's master key")
    return start_cluster(directory, timeout_seconds=timeout_seconds, report=report)
