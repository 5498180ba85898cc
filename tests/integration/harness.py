"""Real-process clusters for the integration tests.

`ClusterHarness` generates a cluster directory through tokenvault.devcluster.cluster
(init_cluster) on a random free base port, with fast timing knobs, optionally
splices a `FaultProxy` into every peer link, and then starts, kills, restarts,
pauses (SIGSTOP) and resumes (SIGCONT) the `tokenvault serve` processes. It
reads /health and the nodes' JSON logs, hands out clients bound to one node or
to all of them, and always stops every process it started on teardown.

Peer links: the node with the smaller id dials the larger one, so the proxy for
the link n1<->n2 goes into n1's config, as n2's peer address; direction "a->b"
of that proxy is n1 -> n2.

Blocking calls (process control, health polls) must not run on an event loop
that also drives client load: async tests wrap them in `asyncio.to_thread`, or
use the `*_async` variants here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from faultproxy import FaultProxy
from history import History, Kind
from tokenvault.devcluster import cluster
from tokenvault.client.vault import (AsyncClient, NoNodeAvailable, ProblemError, ResponseError, RotateResult,
                               TokenizeResult)
from tokenvault.config import TimingConfig, WalConfig, load_config, write_node_config

# Fast knobs: a 25 ms tick and an election timeout of 12-24 ticks (300-600 ms) keep failovers
# well inside the contract's 5 s while leaving slack for a loaded two-core machine.
TICK_MS = int(os.environ.get("TOKENVAULT_IT_TICK_MS", "25"))
ELECTION_TIMEOUT_TICKS = int(os.environ.get("TOKENVAULT_IT_ELECTION_TIMEOUT_TICKS", "12"))
HEARTBEAT_INTERVAL_TICKS = 2
# HTTP worker processes per node: every integration test runs against nodes of a core and two workers
# (issue 10: "every existing integration and fault test passes with W = 2"); 0 runs one process per node.
HTTP_WORKERS = int(os.environ.get("TOKENVAULT_IT_HTTP_WORKERS", "2"))
REQUEST_TIMEOUT_MS = 2000
# A client's timeout for tests that count exactly what each request did (values sealed, audit records):
# long enough that a slow machine never makes the client send a request twice.
NO_RETRY_SECONDS = 30.0
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 2.0
HEALTH_TIMEOUT_SECONDS = 1.0
POLL_INTERVAL_SECONDS = 0.05
# Below Linux's ephemeral range (32768-60999), so outgoing connections never hold our ports.
BASE_PORT_RANGE = (10000, 32000)
PORT_ATTEMPTS = 200
START_ATTEMPTS = 3
LOG_TAIL_LINES = 40
LOAD_STOP_TIMEOUT_SECONDS = 20.0

Value = TypeVar("Value")


def election_timeout_seconds(settings: cluster.NodeSettings | None = None) -> float:
    """The longest randomised election timeout (2x the configured ticks)."""
    timing = (settings or fast_settings()).timing
    return 2 * timing.election_timeout_ticks * timing.tick_ms / 1000.0


def fast_settings() -> cluster.NodeSettings:
    timing = TimingConfig(tick_ms=TICK_MS, election_timeout_ticks=ELECTION_TIMEOUT_TICKS,
                          heartbeat_interval_ticks=HEARTBEAT_INTERVAL_TICKS, request_timeout_ms=REQUEST_TIMEOUT_MS)
    return cluster.NodeSettings(log_level="info", timing=timing, wal=WalConfig(fsync=True), http_workers=HTTP_WORKERS)


def default_settings() -> cluster.NodeSettings:
    """The shipped defaults (tick 50 ms, election timeout 20-40 ticks): for the contract's "within 5 s"."""
    return cluster.NodeSettings(log_level="info", timing=TimingConfig(), wal=WalConfig(fsync=True),
                                http_workers=HTTP_WORKERS)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((cluster.HOST, port))
        except OSError:
            return False
    return True


def free_base_port(node_count: int, rng: random.Random) -> int:
    """A base port whose base+i (HTTP) and base+100+i (peer) ports are all free right now."""
    for _ in range(PORT_ATTEMPTS):
        base = rng.randrange(*BASE_PORT_RANGE)
        ports = [base + offset + number for offset in (0, 100) for number in range(1, node_count + 1)]
        if all(_port_free(port) for port in ports):
            return base
    raise RuntimeError("no free base port found")


def memory_bytes(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


def reset_peak_memory(pid: int) -> None:
    """Set the process's VmHWM back to its current RSS (Linux: write 5 to /proc/PID/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def wait_for(predicate: Callable[[], Value], timeout_seconds: float, description: str,
             interval_seconds: float = POLL_INTERVAL_SECONDS) -> Value:
    """Poll `predicate` until it returns something truthy; return that, or fail after the deadline."""
    deadline = time.monotonic() + timeout_seconds
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_seconds:g} s waiting for {description} "
                                 f"(last: {str(last)[:300]})")
        time.sleep(interval_seconds)


async def wait_for_async(predicate: Callable[[], Awaitable[Value]], timeout_seconds: float, description: str,
                         interval_seconds: float = POLL_INTERVAL_SECONDS) -> Value:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    last: Any = None
    while True:
        last = await predicate()
        if last:
            return last
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout_seconds:g} s waiting for {description} "
                                 f"(last: {str(last)[:300]})")
        await asyncio.sleep(interval_seconds)


def _is_serve_process(pid: int, config_path: Path) -> bool:
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and str(config_path).encode() in arguments


class ClusterHarness:
    """One cluster of real `tokenvault serve` processes in `directory`."""

    def __init__(self, directory: Path, node_count: int = 3, *, with_proxies: bool = False,
                 settings: cluster.NodeSettings | None = None, rng: random.Random | None = None) -> None:
        self.directory = Path(directory)
        self.node_count = node_count
        self.with_proxies = with_proxies
        self.settings = settings or fast_settings()
        self.rng = rng or random.Random()
        self.spec: cluster.ClusterSpec | None = None
        self.proxies: dict[tuple[str, str], FaultProxy] = {}
        self.paused: set[str] = set()
        self.known_pids: dict[int, str] = {}

    # ------------------------------------------------------------ creation and start

    def create_and_start(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> "ClusterHarness":
        """Generate the cluster on a free base port and start it; retry on a port collision."""
        for attempt in range(1, START_ATTEMPTS + 1):
            self._create()
            try:
                self.start_all(timeout_seconds)
                return self
            except cluster.ClusterError as error:
                if "already in use" not in str(error) or attempt == START_ATTEMPTS:
                    raise AssertionError(f"the cluster did not start:\n{error}\n{self.log_tails()}") from None
                self.stop()
                shutil.rmtree(self.directory)
        raise AssertionError("unreachable")

    def _create(self) -> None:
        base_port = free_base_port(self.node_count, self.rng)
        self.proxies = {}
        self.spec, _ = cluster.init_cluster(self.directory, self.node_count, base_port, settings=self.settings)
        if self.with_proxies:
            self._splice_proxies()

    def _splice_proxies(self) -> None:
        """Put a proxy on every link: into the dialer's (smaller id's) config entry for the larger id."""
        assert self.spec is not None
        for dialer in self.spec.nodes:
            config = load_config(dialer.config)
            members = []
            for member in config.members:
                if dialer.node_id < member.id:
                    proxy = FaultProxy(member.peer_host, member.peer_port, name=f"{dialer.node_id}-{member.id}")
                    self.proxies[(dialer.node_id, member.id)] = proxy.start()
                    member = dataclasses.replace(member, peer_addr=proxy.address)
                members.append(member)
            write_node_config(dialer.config, dataclasses.replace(config, members=tuple(members)))

    def start_all(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> None:
        """Start every node that is not running and wait for a primary."""
        cluster.start_cluster(self.directory, timeout_seconds=timeout_seconds)
        self._remember_pids()

    def _remember_pids(self) -> None:
        for node in self.nodes:
            pid = cluster.running_pid(node)
            if pid is not None:
                self.known_pids[pid] = node.node_id

    # ------------------------------------------------------------ nodes

    @property
    def nodes(self) -> tuple[cluster.NodeSpec, ...]:
        assert self.spec is not None, "the cluster is not created"
        return self.spec.nodes

    @property
    def node_ids(self) -> list[str]:
        return [node.node_id for node in self.nodes]

    def node(self, node_id: str) -> cluster.NodeSpec:
        assert self.spec is not None
        return self.spec.node(node_id)

    def url(self, node_id: str) -> str:
        return self.node(node_id).http_url

    def key(self, name: str = "full") -> str:
        assert self.spec is not None
        return self.spec.key(name)

    @property
    def ca_file(self) -> Path | None:
        """The cluster CA that clients verify the nodes' https:// URLs against (None for a plain cluster)."""
        assert self.spec is not None
        return self.spec.ca_file

    def pid(self, node_id: str) -> int | None:
        return cluster.running_pid(self.node(node_id))

    def exit_status(self, node_id: str) -> int | None:
        """How the node's last process ended (negative: by that signal); None while it runs."""
        return cluster.exit_status(self.node(node_id))

    def kill(self, node_id: str) -> None:
        """SIGKILL (kill -9) one node; kill_node waits until it is gone and its ports are free."""
        self.paused.discard(node_id)
        cluster.kill_node(self.directory, node_id)

    def kill_all(self) -> None:
        for node_id in self.node_ids:
            if self.pid(node_id) is not None:
                self.kill(node_id)

    def restart(self, node_id: str, timeout_seconds: float = START_TIMEOUT_SECONDS) -> None:
        """Start a killed or stopped node with its data and wait until it answers /health."""
        try:
            cluster.restart_node(self.directory, node_id, timeout_seconds)
        except cluster.ClusterError as error:
            raise AssertionError(f"{node_id} did not restart:\n{error}\n{self._port_holders(node_id)}") from None
        self._remember_pids()

    def _port_holders(self, node_id: str) -> str:
        """What holds the node's ports (sockets, with owners when visible), for failure messages."""
        node = self.node(node_id)
        ports = (f":{node.http_port} ", f":{node.peer_port} ")
        try:
            listing = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return "(ss is not available)"
        lines = [line for line in listing.splitlines()
                 if any(port in line for port in ports) and not line.startswith("TIME-WAIT")]
        return "sockets on its ports:\n" + "\n".join(lines[:20])

    def pause(self, node_id: str) -> None:
        """SIGSTOP the node: it stays alive but does nothing (no ticks, no answers)."""
        pid = self.pid(node_id)
        assert pid is not None, f"{node_id} is not running"
        os.kill(pid, signal.SIGSTOP)
        self.paused.add(node_id)

    def resume(self, node_id: str) -> None:
        pid = self.pid(node_id)
        assert pid is not None, f"{node_id} is not running"
        os.kill(pid, signal.SIGCONT)
        self.paused.discard(node_id)

    def last_wal_segment(self, node_id: str) -> Path:
        segments = sorted((self.node(node_id).data_dir / "wal").glob("segment-*.wal"))
        assert segments, f"{node_id} wrote no write-ahead-log segment"
        return segments[-1]

    def tear_wal_tail(self, node_id: str) -> bytes:
        """Append a half-written record to the (stopped) node's last WAL segment; returns the bytes.

        The header promises a 200-byte payload of which only 30 bytes follow: what an interrupted
        write leaves behind (u32 length, u32 crc, u8 type ENTRY, then part of the payload)."""
        assert self.pid(node_id) is None, f"{node_id} must be stopped to tear its log"
        torn_record = struct.pack(">IIB", 200, 0x12345678, 1) + bytes(range(1, 31))
        with open(self.last_wal_segment(node_id), "ab") as handle:
            handle.write(torn_record)
        return torn_record

    # ------------------------------------------------------------ health

    def health(self, node_id: str, timeout_seconds: float = HEALTH_TIMEOUT_SECONDS) -> dict[str, Any] | None:
        try:
            return cluster.fetch_health(self.url(node_id), timeout_seconds, self.ca_file)
        except (OSError, ValueError):
            return None

    def metrics_text(self, node_id: str, timeout_seconds: float = HEALTH_TIMEOUT_SECONDS) -> str:
        """The node's /metrics page (Prometheus text)."""
        with cluster.open_url(self.url(node_id) + "/metrics", timeout_seconds, self.ca_file) as response:
            return response.read().decode("utf-8")

    def metrics_when(self, node_id: str, holds: Callable[[str], bool], timeout_seconds: float = 5.0) -> str:
        """The node's /metrics page once ``holds`` is true of it: a page may be up to a second old
        (tokenvault.metrics.METRICS_MAX_AGE_SECONDS), so what a test just did shows within about that."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            text = self.metrics_text(node_id)
            if holds(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the metrics of {node_id} did not come to hold within {timeout_seconds} s")
            time.sleep(0.05)

    async def health_async(self, node_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.health, node_id)

    def healths(self, node_ids: Iterable[str] | None = None) -> dict[str, dict[str, Any] | None]:
        chosen = list(node_ids) if node_ids is not None else self.node_ids
        return dict(zip(chosen, _parallel(self.health, chosen)))

    def agreed_primary(self, node_ids: Iterable[str] | None = None) -> str | None:
        """The primary that every given node answers with: one says role primary in view V and every
        other given node answers, in view V, that it is the primary. None while there is none."""
        return _agreement(self.healths(node_ids))

    def wait_for_primary(self, node_ids: Iterable[str] | None = None,
                         timeout_seconds: float = 10.0) -> str:
        chosen = list(node_ids) if node_ids is not None else self.node_ids
        seen: list[dict[str, dict[str, Any] | None]] = [{}]

        def agreed() -> str | None:
            seen[0] = self.healths(chosen)
            return _agreement(seen[0])

        try:
            return wait_for(agreed, timeout_seconds, f"a primary agreed by {chosen}")
        except AssertionError as error:
            raise AssertionError(f"{error}; last answers: {_describe_answers(seen[0])}") from None

    def wait_for_applied(self, node_ids: Iterable[str], index: int, timeout_seconds: float = 10.0) -> None:
        chosen = list(node_ids)

        def caught_up() -> bool:
            answers = self.healths(chosen)
            return all(answer is not None and answer.get("applied_index", -1) >= index for answer in answers.values())

        wait_for(caught_up, timeout_seconds, f"{chosen} to apply index {index}")

    # ------------------------------------------------------------ logs

    def log_mark(self, node_id: str) -> int:
        """The current size of the node's log: events after it are the ones that happen from now on."""
        try:
            return self.node(node_id).log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def log_events(self, node_id: str, since: int = 0) -> list[dict[str, Any]]:
        try:
            with open(self.node(node_id).log_file, "rb") as handle:
                handle.seek(since)
                data = handle.read()
        except FileNotFoundError:
            return []
        events = []
        for line in data.splitlines():
            try:
                document = json.loads(line)
            except ValueError:
                continue
            if isinstance(document, dict):
                events.append(document)
        return events

    def find_events(self, node_id: str, event: str, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
        return [document for document in self.log_events(node_id, since)
                if document.get("event") == event
                and all(document.get(name) == value for name, value in fields.items())]

    def wait_for_event(self, node_id: str, event: str, since: int = 0, timeout_seconds: float = 10.0,
                       **fields: Any) -> dict[str, Any]:
        found = wait_for(lambda: self.find_events(node_id, event, since, **fields), timeout_seconds,
                         f"{event} {fields or ''} in {node_id}'s log")
        return found[0]

    def relaunch_in_its_start(self, node_id: str) -> tuple[int, int]:
        """The node killed and launched again, returned as soon as it logs node.started, while its HTTP
        workers are still starting (asserted): its pid, and the log mark before the launch."""
        self.kill(node_id)
        mark = self.log_mark(node_id)
        pid = cluster.launch_node(self.node(node_id))
        self.known_pids[pid] = node_id
        wait_for(lambda: self.find_events(node_id, "node.started", mark), 30, f"{node_id} to begin its start", 0.005)
        assert not self.find_events(node_id, "workers.started", mark)  # its workers are not serving yet
        return pid, mark

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.spec is None:
            return "(no cluster was created)"
        return "\n".join(cluster.output_tail(node, lines) for node in self.spec.nodes)

    # ------------------------------------------------------------ faults on peer links

    def proxy(self, first: str, second: str) -> FaultProxy:
        """The proxy on the link between two nodes (either order); "a->b" is smaller id -> larger id."""
        return self.proxies[(min(first, second), max(first, second))]

    def links_of(self, node_id: str) -> list[FaultProxy]:
        return [proxy for (first, second), proxy in self.proxies.items() if node_id in (first, second)]

    def isolate(self, node_id: str, silently: bool = False) -> None:
        """Cut the node off from every other node (its HTTP port stays reachable).

        By default its peer connections are reset and new ones refused; `silently` drops every
        byte instead and keeps connections open, like a network that loses packets without a word."""
        for proxy in self.links_of(node_id):
            if silently:
                proxy.drop()
            else:
                proxy.partition()

    def cut_from(self, source: str, destination: str) -> None:
        """Drop every byte `source` sends to `destination` (the other direction keeps flowing)."""
        self.proxy(source, destination).cut("a->b" if source < destination else "b->a")

    def heal_all(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()

    # ------------------------------------------------------------ clients

    def client(self, node_ids: str | Sequence[str] | None = None, key: str = "full", *,
               timeout_seconds: float = 2.0, deadline_seconds: float = 6.0) -> AsyncClient:
        """An AsyncClient for one node, several (in the given order, with failover), or all nodes."""
        if node_ids is None:
            chosen = self.node_ids
        elif isinstance(node_ids, str):
            chosen = [node_ids]
        else:
            chosen = list(node_ids)
        return AsyncClient([self.url(node_id) for node_id in chosen], self.key(key),
                           timeout_seconds=timeout_seconds, deadline_seconds=deadline_seconds,
                           retry_after_cap_seconds=0.5, ca_file=self.ca_file)

    @contextlib.asynccontextmanager
    async def node_clients(self, node_ids: Iterable[str] | None = None, **options: Any
                           ) -> AsyncIterator[dict[str, AsyncClient]]:
        """One client bound to each node (no failover), closed on exit."""
        chosen = list(node_ids) if node_ids is not None else self.node_ids
        clients = {node_id: self.client(node_id, **options) for node_id in chosen}
        try:
            yield clients
        finally:
            for client in clients.values():
                await client.close()

    # ------------------------------------------------------------ teardown

    def stop(self) -> None:
        """Stop every process this harness started (SIGCONT, SIGTERM, then SIGKILL) and every proxy."""
        if self.spec is not None:
            self._remember_pids()
            for node_id in list(self.paused):
                with contextlib.suppress(OSError, AssertionError):
                    self.resume(node_id)
            with contextlib.suppress(cluster.ClusterError, OSError):
                cluster.stop_cluster(self.directory, timeout_seconds=STOP_TIMEOUT_SECONDS)
            for pid, node_id in self.known_pids.items():
                if _is_serve_process(pid, self.node(node_id).config):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            for node in self.nodes:
                with contextlib.suppress(cluster.ClusterError, OSError):
                    cluster.running_pid(node)  # reaps our exited children
        for proxy in self.proxies.values():
            proxy.stop()


def _agreement(answers: dict[str, dict[str, Any] | None]) -> str | None:
    if not answers or any(answer is None for answer in answers.values()):
        return None
    primaries = [node_id for node_id, answer in answers.items() if answer and answer.get("role") == "primary"]
    if len(primaries) != 1:
        return None
    primary = primaries[0]
    view = answers[primary]["view"]  # type: ignore[index]
    agreed = all(answer is not None and answer.get("view") == view and answer.get("primary_id") == primary
                 for answer in answers.values())
    return primary if agreed else None


def _describe_answers(answers: dict[str, dict[str, Any] | None]) -> str:
    parts = []
    for node_id, answer in answers.items():
        if answer is None:
            parts.append(f"{node_id}: no /health answer within {HEALTH_TIMEOUT_SECONDS:g} s")
        else:
            parts.append(f"{node_id}: {answer.get('role')} view {answer.get('view')} primary "
                         f"{answer.get('primary_id')} commit {answer.get('commit_index')} "
                         f"applied {answer.get('applied_index')}")
    return "; ".join(parts)


def _parallel(function: Callable[[str], Value], items: Sequence[str]) -> list[Value]:
    """Call a blocking function for every item at once (a hung node costs one timeout, not one each)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        return list(pool.map(function, items))


# ---------------------------------------------------------------- recorded client operations


class RecordingClient:
    """Sends requests through an AsyncClient and records each one in a History.

    An error answer (problem+json) is recorded as an error with its status; no answer
    (timeout, connection lost, no node reachable) as a timeout, because the
    request may still have taken effect. A response that breaks the contract's
    shape is recorded and re-raised so that the test fails.
    """

    def __init__(self, history: History, client_id: str, client: AsyncClient, node_label: str) -> None:
        self.history = history
        self.client_id = client_id
        self.client = client
        self.node_label = node_label

    async def _record(self, kind: Kind, inputs: Sequence[str], send: Callable[[], Awaitable[Value]],
                      finish: Callable[[int, Value], None]) -> Value | None:
        operation_id = self.history.begin(self.client_id, kind, self.node_label, inputs)
        try:
            result = await send()
        except ProblemError as error:
            self.history.error(operation_id, error.status, error.title)
            return None
        except (NoNodeAvailable, asyncio.TimeoutError, OSError) as error:
            self.history.timeout(operation_id, type(error).__name__)
            return None
        except ResponseError as error:
            self.history.error(operation_id, None, f"ResponseError: {error}")
            raise
        finish(operation_id, result)
        return result

    async def tokenize(self, values: Sequence[str]) -> TokenizeResult | None:
        return await self._record(
            Kind.TOKENIZE, values, lambda: self.client.tokenize(values),
            lambda operation_id, result: self.history.ok(operation_id, epoch=result.epoch, outputs=result.tokens,
                                                         answered_by=self.client.current_url))

    async def detokenize(self, tokens: Sequence[str]) -> tuple[str | None, ...] | None:
        return await self._record(
            Kind.DETOKENIZE, tokens, lambda: self.client.detokenize(tokens),
            lambda operation_id, result: self.history.ok(operation_id, outputs=result,
                                                         answered_by=self.client.current_url))

    async def rotate(self) -> RotateResult | None:
        return await self._record(
            Kind.ROTATE, (), lambda: self.client.rotate_epoch(),
            lambda operation_id, result: self.history.ok(operation_id, epoch=result.epoch))

    async def close(self) -> None:
        await self.client.close()


async def run_load(harness: ClusterHarness, history: History, stop: asyncio.Event, values: Sequence[str], *,
                   workers: int = 6, batch_items: int = 5, node_ids: Sequence[str] | None = None,
                   seed: int = 0, read_every: int = 4, **client_options: Any) -> None:
    """Concurrent sequential clients over all nodes, tokenizing overlapping batches until `stop` is set.

    Worker i prefers node i mod N and fails over to the others. Every fourth
    operation of a worker reads back its last acknowledged tokens.
    """
    chosen = list(node_ids) if node_ids is not None else harness.node_ids

    async def worker(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        order = chosen[number % len(chosen):] + chosen[:number % len(chosen)]
        recorder = RecordingClient(history, f"worker-{number}", harness.client(order, **client_options),
                                   "+".join(order))
        last_tokens: tuple[str, ...] = ()
        try:
            operation_count = 0
            while not stop.is_set():
                operation_count += 1
                if last_tokens and operation_count % read_every == 0:
                    await recorder.detokenize(last_tokens)
                    continue
                result = await recorder.tokenize(rng.sample(list(values), min(batch_items, len(values))))
                if result is not None:
                    last_tokens = result.tokens
        finally:
            await recorder.close()

    await asyncio.gather(*(worker(number) for number in range(workers)))


@contextlib.asynccontextmanager
async def background_load(harness: ClusterHarness, history: History, values: Sequence[str],
                          **options: Any) -> AsyncIterator[asyncio.Event]:
    """Run `run_load` while the body runs; on exit stop it and wait for its operations to finish."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_load(harness, history, stop, values, **options))
    try:
        yield stop
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, LOAD_STOP_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            raise AssertionError("the load clients did not finish in time") from None


async def wait_for_acknowledged(history: History, count: int, since_monotonic: float = 0.0,
                                timeout_seconds: float = 15.0) -> None:
    """Wait until `count` tokenizes that started at or after `since_monotonic` were acknowledged."""

    async def enough() -> bool:
        return sum(1 for operation in history.acknowledged(Kind.TOKENIZE)
                   if operation.start_monotonic >= since_monotonic) >= count

    await wait_for_async(enough, timeout_seconds, f"{count} acknowledged tokenizes ({history.summary()})")
