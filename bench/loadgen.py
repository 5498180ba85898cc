"""Load generator for TokenVault (and, for comparison, etcd), on asyncio + aiohttp.

    python bench/loadgen.py run --cluster-json .cluster/cluster.json --mode tokenize --batch 1 --concurrency 64
    python bench/loadgen.py compare-etcd            # starts a 3-node vault and a 3-member etcd, drives both

`run` drives an already running vault: every worker holds one request in
flight at a time, so --concurrency is the number of requests in flight. Each
request carries --batch values: fresh random synthetic strings for tokenize;
tokens from a pool tokenized beforehand for detokenize; values drawn from that
pool for `repeat` (tokenize of values that have their tokens already, as when
the same cards come back at every purchase); `mixed` alternates tokenize and
detokenize.
It prints requests/s, values/s, p50 and p99 latency of acknowledged requests
and error counts for the measured window (after --warmup seconds). Given a
cluster.json it also prints the CPU time the nodes (together, with their sealer and HTTP worker processes,
and by process kind) and the load
generator used per acknowledged request, read from /proc over warm-up and
window; compare-etcd does the same for both systems. `--client raw` swaps
aiohttp's client for a minimal one (bench/httpclients.py) that takes less of
the cores the target shares with it.

`--client-processes N` (run, compare-etcd, workers) generates the load from N
processes instead of one, for machines with many cores: at about 40 us of
client CPU per request, one Python process saturates its core long before a
16-core target does. The parent spawns this script N times (a hidden `_child`
command, its Workload as JSON on stdin, its results as JSON on stdout), splits
--concurrency among them, gives each its own seed (so no two send the same
fresh values) and a common window on CLOCK_MONOTONIC, and merges their counts
and latencies into one line; the load generator's CPU is theirs summed.

`compare-etcd` starts its own clusters in a temporary directory, on loopback,
and runs the same client against: vault single-value tokenize, etcd
insert-if-absent transactions (compare create_revision = 0, then put) through
etcd's JSON gateway, and vault 100-value tokenize; it prints the ratio. It
needs Debian's `etcd-server` (apt-get install etcd-server) and says so if etcd
is missing.

Nothing here asserts on timing: it measures and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import aiohttp

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from httpclients import CLIENT_KINDS, AiohttpClient, RawClient, open_client  # noqa: E402
from tokenvault.crypto.formats import luhn_valid  # noqa: E402

Client = AiohttpClient | RawClient

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
DETOKENIZE_POOL_VALUES = 20_000
# How long preparing the pool retries 503 answers (a node that has just started).
PREPARE_RETRY_SECONDS = 10.0
PREPARE_BATCH = 1000
ETCD_INSTALL_HINT = "etcd is not installed: run 'apt-get install etcd-server' (Debian) and try again"


@dataclass(slots=True)
class Measurement:
    """What the measured window saw; errors are counted by kind (HTTP status or exception name)."""

    requests: int = 0
    values: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    window_seconds: float = 0.0
    completed_ok: int = 0  # acknowledged requests including the warm-up, for CPU per operation
    server_cpu_seconds: float | None = None  # CPU the target's processes used during warm-up + window
    # The same by process kind: "core" (the node process), "worker" (HTTP workers), "sealer", "other".
    server_cpu_by_kind: dict[str, float] = field(default_factory=dict)
    # The one process that used the most CPU meanwhile: (kind, pid, CPU seconds, elapsed seconds).
    # On a machine with cores to spare, one at about 1.0 CPUs is what bounds the run.
    busiest_process: tuple[str, int, float, float] | None = None
    client_cpu_seconds: float = 0.0  # CPU this load generator used meanwhile

    def percentile_ms(self, fraction: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    values: int
    error: str | None = None


Operation = Callable[[Client, int], Awaitable[Outcome]]


def random_values(count: int, generator: random.Random) -> list[str]:
    """Synthetic values: a fixed prefix and 24 random hex digits, so each is new to the vault."""
    return [f"synthetic-{generator.getrandbits(96):024x}" for _ in range(count)]


def random_cards(count: int, generator: random.Random) -> list[str]:
    """Fresh random 16-digit card numbers with a valid Luhn check digit (what format=card accepts)."""
    cards = []
    for _ in range(count):
        partial = f"4{generator.getrandbits(50) % 10**14:014d}"
        cards.append(next(partial + check for check in "0123456789" if luhn_valid(partial + check)))
    return cards


def process_cpu_seconds(pids: Sequence[int]) -> float | None:
    """User + system CPU seconds the processes have used so far (Linux /proc), or None if unreadable."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND
        except (OSError, IndexError, ValueError):
            return None
    return total


def with_children(pids: Sequence[int]) -> list[int]:
    """``pids`` and their direct children (a node's sealer and HTTP workers), read from /proc."""
    wanted = set(pids)
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent in wanted:
            children.append(int(entry))
    return list(pids) + children


def process_kind(pid: int) -> str:
    """What a vault process is, from its command line: "worker", "sealer", "core" or "other"."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().split(b"\0")
    except OSError:
        return "other"
    if b"tokenvault.api.worker" in command:
        return "worker"
    if b"tokenvault.core.sealer" in command:
        return "sealer"
    if b"serve" in command:
        return "core"
    return "other"


def cpu_by_pid(pids: Sequence[int]) -> dict[int, float] | None:
    """process_cpu_seconds of each process, or None if a process is unreadable."""
    seconds: dict[int, float] = {}
    for pid in pids:
        used = process_cpu_seconds([pid])
        if used is None:
            return None
        seconds[pid] = used
    return seconds


def cpu_by_kind(by_pid: dict[int, float]) -> dict[str, float]:
    """CPU seconds per process (cpu_by_pid) summed per process_kind."""
    totals: dict[str, float] = {}
    for pid, seconds in by_pid.items():
        kind = process_kind(pid)
        totals[kind] = totals.get(kind, 0.0) + seconds
    return totals


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class Window:
    """The instants of one run on CLOCK_MONOTONIC (time.monotonic), which every process of a Linux
    machine shares: so load processes started separately still warm up and measure the same seconds."""

    start_at: float
    measure_from: float
    stop_at: float

    @classmethod
    def starting_at(cls, start_at: float, warmup_seconds: float, duration_seconds: float) -> Window:
        return cls(start_at, start_at + warmup_seconds, start_at + warmup_seconds + duration_seconds)


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds each of the target's processes had used at one instant (time.monotonic ``at``),
    None where a process could not be read."""

    by_pid: dict[int, float] | None
    at: float = 0.0

    @property
    def total(self) -> float | None:
        return None if self.by_pid is None else sum(self.by_pid.values())


def server_cpu(pids: Sequence[int]) -> CpuSnapshot:
    if not pids:
        return CpuSnapshot(None)
    return CpuSnapshot(cpu_by_pid(pids), time.monotonic())


def record_server_cpu(measurement: Measurement, pids: Sequence[int], before: CpuSnapshot) -> None:
    """Store in ``measurement`` the CPU ``pids`` used since ``before``, where both ends could be read:
    in total, by process kind, and the busiest process's."""
    after = server_cpu(pids) if before.by_pid is not None else CpuSnapshot(None)
    if before.by_pid is None or after.by_pid is None:
        return
    used = {pid: seconds - before.by_pid.get(pid, 0.0) for pid, seconds in after.by_pid.items()}
    measurement.server_cpu_seconds = sum(used.values())
    measurement.server_cpu_by_kind = cpu_by_kind(used)
    if used:
        pid = max(used, key=lambda candidate: used[candidate])
        measurement.busiest_process = (process_kind(pid), pid, used[pid], after.at - before.at)


async def drive(load: Operation | Workload, concurrency: int, duration_seconds: float, warmup_seconds: float,
                client_kind: str = "aiohttp", server_pids: Sequence[int] = (),
                ca_file: str | Path | None = None, processes: int = 1) -> Measurement:
    """Run `concurrency` workers for warmup + duration; record requests that start after the warmup.

    With ``server_pids`` it also records the CPU those processes and the load
    generator used over warm-up + window, so the report can give CPU per
    operation. ``processes`` > 1 spreads the workers over that many load
    processes (see drive_processes), which needs a Workload: a child process
    cannot receive an Operation, only the description it is built from.
    """
    if not 1 <= processes <= concurrency:
        raise ValueError(f"{processes} load processes cannot share {concurrency} worker(s)")
    server_pids = with_children(server_pids) if server_pids else []
    if processes > 1:
        if not isinstance(load, Workload):
            raise TypeError("only a Workload can be driven from several processes: an Operation cannot be sent")
        return await drive_processes(load, concurrency, duration_seconds, warmup_seconds, client_kind,
                                     server_pids, processes)
    operation = build_operation(load) if isinstance(load, Workload) else load
    if isinstance(load, Workload) and ca_file is None:
        ca_file = load.ca_file  # a workload names the CA its nodes are verified against, as in a load process
    before = server_cpu(server_pids)
    window = Window.starting_at(time.monotonic(), warmup_seconds, duration_seconds)
    measurement = await run_workers(operation, range(concurrency), window, client_kind, ca_file)
    record_server_cpu(measurement, server_pids, before)
    return measurement


async def run_workers(operation: Operation, numbers: range, window: Window, client_kind: str,
                      ca_file: str | Path | None) -> Measurement:
    """The workers ``numbers`` of one process: wait for the window's start, then send until its end.

    The numbers are global across load processes because operations pick a
    node by ``worker % len(urls)``. The CPU recorded is this process's own,
    from opening the client to the last response.
    """
    measurement = Measurement(window_seconds=window.stop_at - window.measure_from)
    client_before = own_cpu_seconds()
    async with open_client(client_kind, len(numbers), ca_file) as client:
        # Why time.monotonic and not loop.time(): uvloop's loop clock has millisecond resolution, too
        # coarse for latencies, while CLOCK_MONOTONIC has nanoseconds and is the same in every process.
        clock = time.monotonic
        await asyncio.sleep(max(0.0, window.start_at - clock()))

        async def worker(number: int) -> None:
            while (started := clock()) < window.stop_at:
                try:
                    outcome = await operation(client, number)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as error:
                    outcome = Outcome(False, 0, type(error).__name__)
                finished = clock()
                measurement.completed_ok += outcome.ok
                if started < window.measure_from or finished > window.stop_at:
                    continue
                if outcome.ok:
                    measurement.requests += 1
                    measurement.values += outcome.values
                    measurement.latencies_ms.append((finished - started) * 1000.0)
                else:
                    measurement.errors[outcome.error or "error"] += 1
                    # Why: a failing target would otherwise be hammered in a tight loop.
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(worker(number) for number in numbers))
    measurement.client_cpu_seconds = own_cpu_seconds() - client_before
    return measurement


def report_line(label: str, measurement: Measurement) -> str:
    window = measurement.window_seconds or 1.0
    errors = ", ".join(f"{kind}: {count}" for kind, count in sorted(measurement.errors.items())) or "none"
    line = (f"{label:<34} {measurement.requests / window:>10.0f} req/s {measurement.values / window:>11.0f} values/s"
            f"   p50 {measurement.percentile_ms(0.50):7.2f} ms   p99 {measurement.percentile_ms(0.99):7.2f} ms"
            f"   ok {measurement.requests}   errors {errors}")
    if measurement.server_cpu_seconds is not None and measurement.completed_ok:
        per_op = 1e6 / measurement.completed_ok
        line += (f"\n{'':<34} CPU per acknowledged request: servers {measurement.server_cpu_seconds * per_op:.0f} us,"
                 f" load generator {measurement.client_cpu_seconds * per_op:.0f} us")
        if measurement.server_cpu_by_kind:
            kinds = ", ".join(f"{kind} {seconds * per_op:.0f} us"
                              for kind, seconds in sorted(measurement.server_cpu_by_kind.items()))
            line += f"\n{'':<34} servers by process kind: {kinds}"
        if measurement.busiest_process is not None and measurement.busiest_process[3] > 0:
            kind, pid, seconds, elapsed = measurement.busiest_process
            line += (f"\n{'':<34} busiest process: {kind} (pid {pid}) at {seconds / elapsed:.2f} CPUs"
                     " over warm-up and window")
    return line


# ---------------------------------------------------------------- vault operations


class VaultTarget:
    """Builds tokenize/detokenize operations against a list of vault node URLs (round-robin per worker)."""

    def __init__(self, urls: Sequence[str], api_key: str, seed: int | None, ca_file: str | Path | None = None,
                 token_format: str = "opaque", ttl_seconds: int | None = None) -> None:
        self.urls = [url.rstrip("/") for url in urls]
        self.token_format = token_format  # tokenize mode: "opaque", or "card" with random Luhn-valid cards
        self.ttl_seconds = ttl_seconds  # tokenize mode: each request asks for this TTL
        self.ca_file = ca_file  # the cluster CA for https:// nodes
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.generator = random.Random(seed)
        self.pool: list[str] = []
        self.pool_values: list[str] = []

    def url_for(self, worker: int) -> str:
        return self.urls[worker % len(self.urls)]

    async def post(self, client: Client, worker: int, url: str, body: dict[str, object]) -> tuple[int, dict]:
        status, payload = await client.post(worker, url, json.dumps(body).encode(), self.headers)
        if status != 200:
            return status, {}
        return status, json.loads(payload)

    def tokenize(self, batch: int) -> Operation:
        async def operation(client: Client, worker: int) -> Outcome:
            if self.token_format == "card":
                document: dict[str, object] = {"values": random_cards(batch, self.generator), "format": "card"}
            else:
                document = {"values": random_values(batch, self.generator)}
            if self.ttl_seconds is not None:
                document["ttl_seconds"] = self.ttl_seconds
            status, body = await self.post(client, worker, self.url_for(worker) + "/v1/tokenize", document)
            if status != 200 or len(body.get("tokens", ())) != batch:
                return Outcome(False, 0, f"HTTP {status}")
            return Outcome(True, batch)

        return operation

    def repeat(self, batch: int) -> Operation:
        async def operation(client: Client, worker: int) -> Outcome:
            values = self.generator.sample(self.pool_values, min(batch, len(self.pool_values)))
            status, body = await self.post(client, worker, self.url_for(worker) + "/v1/tokenize",
                                           self._tokenize_document(values))
            if status != 200 or len(body.get("tokens", ())) != len(values):
                return Outcome(False, 0, f"HTTP {status}")
            return Outcome(True, len(values))

        return operation

    def detokenize(self, batch: int) -> Operation:
        async def operation(client: Client, worker: int) -> Outcome:
            tokens = self.generator.sample(self.pool, min(batch, len(self.pool)))
            status, body = await self.post(client, worker, self.url_for(worker) + "/v1/detokenize",
                                           {"tokens": tokens})
            values = body.get("values", ())
            if status != 200 or len(values) != len(tokens) or any(value is None for value in values):
                return Outcome(False, 0, f"HTTP {status}" if status != 200 else "unknown token")
            return Outcome(True, len(tokens))

        return operation

    def mixed(self, batch: int) -> Operation:
        tokenize, detokenize = self.tokenize(batch), self.detokenize(batch)
        counter = 0

        async def operation(client: Client, worker: int) -> Outcome:
            nonlocal counter
            counter += 1
            return await (tokenize if counter % 2 else detokenize)(client, worker)

        return operation

    def _tokenize_document(self, values: list[str]) -> dict[str, object]:
        if self.token_format == "card":
            return {"values": values, "format": "card"}
        return {"values": values}

    async def fill_pool(self, count: int) -> None:
        """Tokenize `count` values once so that detokenize has tokens that exist (card numbers, whose
        card tokens a detokenize resolves in the active epoch, with --format card)."""
        async with open_client("aiohttp", 1, self.ca_file) as client:
            deadline = time.monotonic() + PREPARE_RETRY_SECONDS
            while len(self.pool) < count:
                size = min(PREPARE_BATCH, count - len(self.pool))
                values = random_cards(size, self.generator) if self.token_format == "card" \
                    else random_values(size, self.generator)
                status, body = await self.post(client, 0, self.urls[0] + "/v1/tokenize",
                                               self._tokenize_document(values))
                if status == 503 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)  # a node just started may not know its primary yet
                    continue
                if status != 200:
                    raise SystemExit(f"preparing detokenize tokens failed: HTTP {status} from {self.urls[0]}")
                self.pool.extend(body["tokens"])
                self.pool_values.extend(values)


# ---------------------------------------------------------------- etcd


def etcd_insert_if_absent(client_urls: Sequence[str], seed: int | None) -> Operation:
    """One etcd transaction per request: if create_revision(key) == 0 then put(key, value)."""
    generator = random.Random(seed)

    def encode(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    headers = {"Content-Type": "application/json"}

    async def operation(client: Client, worker: int) -> Outcome:
        key = encode(f"/bench/{generator.getrandbits(96):024x}")
        body = {"compare": [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
                "success": [{"request_put": {"key": key, "value": encode("ciphertext-stand-in")}}]}
        url = client_urls[worker % len(client_urls)] + "/v3/kv/txn"
        status, payload = await client.post(worker, url, json.dumps(body).encode(), headers)
        if status != 200:
            return Outcome(False, 0, f"HTTP {status}")
        return Outcome(bool(json.loads(payload).get("succeeded")), 1, "not inserted")

    return operation


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def start_etcd(directory: Path, members: int = 3,
               tls: bool = False) -> tuple[list[subprocess.Popen[bytes]], list[str], Path | None]:
    """Start a `members`-member etcd cluster on loopback; returns the processes, the client URLs and,
    with ``tls``, the CA its certificates chain to.

    With ``tls`` every member serves its clients and its peers over TLS, as the vault's nodes do
    with TLS on (a certificate per member from a CA made here, peers verified by it; clients
    present none, as the vault's HTTP clients present none), so that a comparison with TLS pays
    for it on both sides."""
    binary = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if binary is None:
        raise SystemExit(ETCD_INSTALL_HINT)
    ports = free_ports(2 * members)
    scheme = "https" if tls else "http"
    client_urls = [f"{scheme}://127.0.0.1:{ports[2 * number]}" for number in range(members)]
    peer_urls = [f"{scheme}://127.0.0.1:{ports[2 * number + 1]}" for number in range(members)]
    initial = ",".join(f"e{number + 1}={peer_urls[number]}" for number in range(members))
    names = [f"e{number + 1}" for number in range(members)]
    certificates = None
    if tls:
        from tokenvault.crypto.tls import create_cluster_tls

        certificates = create_cluster_tls(directory / "tls", {name: ["127.0.0.1"] for name in names})
    processes = []
    for number, name in enumerate(names):
        command = [binary, "--name", name, "--data-dir", str(directory / name),
                   "--listen-client-urls", client_urls[number], "--advertise-client-urls", client_urls[number],
                   "--listen-peer-urls", peer_urls[number], "--initial-advertise-peer-urls", peer_urls[number],
                   "--initial-cluster", initial, "--initial-cluster-state", "new",
                   "--initial-cluster-token", "tokenvault-bench", "--log-level", "warn"]
        if certificates is not None:
            files = certificates.nodes[name]
            command += ["--cert-file", str(files.cert_file), "--key-file", str(files.key_file),
                        "--peer-cert-file", str(files.cert_file), "--peer-key-file", str(files.key_file),
                        "--peer-trusted-ca-file", str(files.ca_file), "--peer-client-cert-auth"]
        with open(directory / f"{name}.out", "ab") as output:
            processes.append(subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
    ca_file = certificates.ca_cert_file if certificates is not None else None
    wait_etcd_healthy(client_urls, processes, directory, ca_file=ca_file)
    return processes, client_urls, ca_file


def wait_etcd_healthy(client_urls: Sequence[str], processes: Sequence[subprocess.Popen[bytes]],
                      directory: Path, timeout_seconds: float = 30.0, ca_file: Path | None = None) -> None:
    import ssl
    import urllib.request

    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ca_file is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(ca_file))))
    opener = urllib.request.build_opener(*handlers)
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in processes):
            raise SystemExit(f"an etcd member exited during start; see {directory}/e*.out")
        healthy = 0
        for url in client_urls:
            try:
                with opener.open(url + "/health", timeout=1) as response:
                    healthy += json.loads(response.read()).get("health") in ("true", True)
            except (OSError, ValueError):
                pass
        if healthy == len(client_urls):
            return
        time.sleep(0.2)
    raise SystemExit(f"etcd did not become healthy within {timeout_seconds:g} s; see {directory}/e*.out")


def stop_processes(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# ---------------------------------------------------------------- workloads


VAULT_MODES = ("tokenize", "detokenize", "repeat", "mixed")
MODES = {"vault": VAULT_MODES, "etcd": ("insert-if-absent",)}


def derive_seed(seed: int | None, label: str) -> int | None:
    """A seed of its own for one use of ``seed`` (the pool, a load process, a round of compare-etcd),
    reproducible from ``seed``; None, fresh randomness, stays None."""
    return None if seed is None else random.Random(f"{seed} {label}").getrandbits(64)


@dataclass(frozen=True, slots=True)
class Workload:
    """A load described fully enough for a load process to rebuild its Operation (build_operation).

    Why not send the Operation itself: it is a closure over a client-side
    target, which cannot cross into another process; this travels as JSON.
    """

    system: str  # "vault" or "etcd"
    mode: str  # one of MODES[system]
    urls: tuple[str, ...]
    batch: int = 1
    api_key: str = ""
    ca_file: str | None = None  # the cluster CA for https:// nodes
    token_format: str = "opaque"  # vault tokenize: "opaque", or "card" with random Luhn-valid cards
    seed: int | None = None  # None: fresh randomness
    pool: tuple[str, ...] = ()  # tokens that exist, for detokenize and mixed
    pool_values: tuple[str, ...] = ()  # the values those tokens stand for, for repeat
    ttl_seconds: int | None = None  # vault tokenize: the TTL each request asks for

    def __post_init__(self) -> None:
        # Why here: a mistake found in the parent is clearer than the same one in every load process.
        if self.mode not in MODES.get(self.system, ()):
            raise ValueError(f"unknown workload {self.system!r} {self.mode!r}")

    def for_process(self, index: int) -> Workload:
        """The workload of load process ``index``: the same with a seed of its own, so that no two
        processes send the same fresh values (tokenize) or keys (etcd)."""
        return dataclasses.replace(self, seed=derive_seed(self.seed, f"process {index}"))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Workload:
        sequences = {name: tuple(document[name]) for name in ("urls", "pool", "pool_values")}
        return cls(**{**document, **sequences})


def build_operation(workload: Workload) -> Operation:
    """The Operation a workload describes; every run, in one process or several, gets it from here."""
    if workload.system == "etcd":
        return etcd_insert_if_absent(workload.urls, workload.seed)
    target = VaultTarget(workload.urls, workload.api_key, workload.seed, workload.ca_file, workload.token_format,
                         workload.ttl_seconds)
    target.pool, target.pool_values = list(workload.pool), list(workload.pool_values)
    return {"tokenize": target.tokenize, "detokenize": target.detokenize, "repeat": target.repeat,
            "mixed": target.mixed}[workload.mode](workload.batch)


# ---------------------------------------------------------------- load processes


# Why wait this long before the warm-up: every load process must have started Python, imported
# aiohttp and opened its client before the common window begins (about 0.3 s each on an idle machine).
CHILD_STARTUP_SECONDS = 1.5
# How long past its window's end a load process may take to answer before it counts as hung.
CHILD_EXTRA_SECONDS = 30.0
# The hidden command that runs one load process (kept out of --help: it is internal).
CHILD_COMMAND = "_child"


class LoadProcessError(RuntimeError):
    """A load process failed or overran; the message carries its standard error."""


class ChildSpec(TypedDict):
    """What the parent sends a load process on stdin."""

    workload: dict[str, Any]  # Workload.to_json()
    first_worker: int  # its workers' global numbers start here
    workers: int
    client: str
    window: dict[str, float]  # the fields of Window


class ChildResult(TypedDict):
    """What a load process prints on stdout: a Measurement without what the parent knows itself."""

    requests: int
    values: int
    latencies_ms: list[float]
    errors: dict[str, int]
    completed_ok: int
    client_cpu_seconds: float


def worker_ranges(concurrency: int, processes: int) -> list[range]:
    """Split the worker numbers 0..concurrency-1 into `processes` consecutive ranges that differ in
    size by at most one (the remainder goes to the first ones)."""
    share, remainder = divmod(concurrency, processes)
    ranges, first = [], 0
    for index in range(processes):
        size = share + (index < remainder)
        ranges.append(range(first, first + size))
        first += size
    return ranges


async def drive_processes(workload: Workload, concurrency: int, duration_seconds: float, warmup_seconds: float,
                          client_kind: str, server_pids: Sequence[int], processes: int) -> Measurement:
    """drive() from `processes` child processes of this script, all measuring the same window.

    Why child processes and not one process: at about 40 us of client CPU
    per request, a single Python process saturates one core long before a
    many-core target does. Why spawned and not forked: this runs inside an
    asyncio loop, which a forked child would inherit in an unusable state.
    The server CPU is read here over warm-up and window as in a single
    process; the load generator's CPU is the sum of what the children report.
    """
    window = Window.starting_at(time.monotonic() + CHILD_STARTUP_SECONDS, warmup_seconds, duration_seconds)
    timeout = CHILD_STARTUP_SECONDS + warmup_seconds + duration_seconds + CHILD_EXTRA_SECONDS
    specs = [ChildSpec(workload=workload.for_process(index).to_json(), first_worker=numbers.start,
                       workers=len(numbers), client=client_kind, window=dataclasses.asdict(window))
             for index, numbers in enumerate(worker_ranges(concurrency, processes))]
    tasks = [asyncio.create_task(run_child(index, spec, timeout)) for index, spec in enumerate(specs)]
    try:
        # Why wait on the tasks rather than sleep: a process that fails during start-up fails the run at once.
        done, _ = await asyncio.wait(tasks, timeout=max(0.0, window.start_at - time.monotonic()),
                                     return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
        before = server_cpu(server_pids)
        results = await asyncio.gather(*tasks)
    except BaseException:
        # Why cancel the others: a run whose numbers are incomplete is worthless, and the
        # remaining children would otherwise keep loading the target until their window ends.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    measurement = merge_measurements(results, window)
    record_server_cpu(measurement, server_pids, before)
    return measurement


async def run_child(index: int, spec: ChildSpec, timeout_seconds: float) -> ChildResult:
    """Start load process `index` with its spec on stdin and return the result it prints on stdout;
    raise LoadProcessError, with its stderr, if it fails or takes longer than `timeout_seconds`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), CHILD_COMMAND, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(json.dumps(spec).encode()), timeout_seconds)
    except asyncio.TimeoutError:
        raise LoadProcessError(f"load process {index} did not finish within {timeout_seconds:g} s") from None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise LoadProcessError(f"load process {index} exited with status {process.returncode}:\n"
                               f"{stderr.decode(errors='replace').strip()}")
    result: ChildResult = json.loads(stdout)
    return result


def merge_measurements(results: Sequence[ChildResult], window: Window) -> Measurement:
    """One Measurement from the load processes' results."""
    measurement = Measurement(window_seconds=window.stop_at - window.measure_from)
    for result in results:
        measurement.requests += result["requests"]
        measurement.values += result["values"]
        measurement.latencies_ms.extend(result["latencies_ms"])
        measurement.errors.update(result["errors"])
        measurement.completed_ok += result["completed_ok"]
        measurement.client_cpu_seconds += result["client_cpu_seconds"]
    return measurement


def child_result(measurement: Measurement) -> ChildResult:
    """What a load process sends back, latencies rounded to a microsecond (finer than a percentile
    here needs, and it keeps the JSON of a few hundred thousand requests small)."""
    return ChildResult(requests=measurement.requests, values=measurement.values,
                       latencies_ms=[round(latency, 3) for latency in measurement.latencies_ms],
                       errors=dict(measurement.errors), completed_ok=measurement.completed_ok,
                       client_cpu_seconds=measurement.client_cpu_seconds)


async def child_drive(spec: ChildSpec) -> ChildResult:
    """The body of a load process: rebuild the operation from the spec and run its workers."""
    workload = Workload.from_json(spec["workload"])
    window = Window(**spec["window"])
    operation = build_operation(workload)
    if time.monotonic() > window.measure_from:
        # Why refuse: a process that starts inside the window would silently measure less than the others.
        raise SystemExit("this load process started after the measured window had begun (a loaded machine?)")
    numbers = range(spec["first_worker"], spec["first_worker"] + spec["workers"])
    return child_result(await run_workers(operation, numbers, window, spec["client"], workload.ca_file))


def child_main() -> int:
    """Entry point of a load process (the hidden `_child` command): spec on stdin, result on stdout."""
    spec: ChildSpec = json.load(sys.stdin)
    install_uvloop()
    json.dump(asyncio.run(child_drive(spec)), sys.stdout)
    return 0


# ---------------------------------------------------------------- commands


def load_cluster_json(path: str) -> tuple[list[str], str, list[int], str | None]:
    """URLs, the 'full' API key, the pids of the running nodes (those with a readable pid file) and the CA."""
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    urls = [node["http_url"] for node in document["nodes"]]
    return (urls, document["api_keys"]["full"]["key"], read_pids(node.get("pid_file") for node in document["nodes"]),
            document.get("ca_file"))


def read_pids(pid_files: Iterable[str | Path | None]) -> list[int]:
    pids = []
    for pid_file in pid_files:
        try:
            pids.append(int(Path(pid_file).read_text().strip()))  # type: ignore[arg-type]
        except (OSError, TypeError, ValueError):
            pass
    return pids


async def vault_workload(urls: Sequence[str], api_key: str, ca_file: str | Path | None,
                         arguments: argparse.Namespace) -> Workload:
    """The vault workload that `run` and `workers` describe, with its pool tokenized first where the
    mode needs one. The pool has a seed of its own, so that tokenize's fresh values do not repeat it."""
    target = VaultTarget(urls, api_key, derive_seed(arguments.seed, "pool"), ca_file, arguments.format)
    if arguments.mode in ("detokenize", "mixed", "repeat"):
        await target.fill_pool(max(arguments.pool, arguments.batch))
    return Workload("vault", arguments.mode, tuple(target.urls), arguments.batch, api_key,
                    str(ca_file) if ca_file else None, arguments.format, arguments.seed,
                    tuple(target.pool), tuple(target.pool_values), getattr(arguments, "ttl_seconds", None))


def client_label(arguments: argparse.Namespace) -> str:
    processes = arguments.client_processes
    return f"{arguments.client} client in {processes} process{'es' if processes > 1 else ''}"


async def command_run(arguments: argparse.Namespace) -> int:
    urls = [url for entry in arguments.url for url in entry.split(",") if url]
    api_key = arguments.api_key or os.environ.get("TOKENVAULT_API_KEY")
    ca_file = arguments.ca_file or os.environ.get("TOKENVAULT_CA_FILE") or None
    server_pids: list[int] = []
    if arguments.cluster_json:
        cluster_urls, cluster_key, server_pids, cluster_ca_file = load_cluster_json(arguments.cluster_json)
        urls = urls or cluster_urls
        api_key = api_key or cluster_key
        ca_file = ca_file or cluster_ca_file
    if not urls or not api_key:
        raise SystemExit("give --url and --api-key, or --cluster-json")
    workload = await vault_workload(urls, api_key, ca_file, arguments)
    ttl = f", TTL {arguments.ttl_seconds} s" if arguments.ttl_seconds is not None else ""
    print(f"{arguments.mode} ({arguments.format}{ttl}), {arguments.batch} value(s)/request, concurrency {arguments.concurrency}, "
          f"{arguments.duration:g} s after {arguments.warmup:g} s warm-up, {client_label(arguments)}, "
          f"against {', '.join(urls)}", flush=True)
    # CPU per request counts every node of the cluster (all of them work for each write).
    measurement = await drive(workload, arguments.concurrency, arguments.duration, arguments.warmup,
                              arguments.client, server_pids, ca_file, arguments.client_processes)
    print(report_line(f"vault {arguments.mode} x{arguments.batch}", measurement))
    return 0


async def command_compare_etcd(arguments: argparse.Namespace) -> int:
    from tokenvault.devcluster import cluster

    if shutil.which("etcd") is None and not Path("/usr/bin/etcd").exists():
        raise SystemExit(ETCD_INSTALL_HINT)
    with tempfile.TemporaryDirectory(prefix="tokenvault-bench-") as temporary:
        directory = Path(temporary)
        vault_directory = directory / "vault"
        port_list = free_ports(6)
        ports = [(port_list[2 * number], port_list[2 * number + 1]) for number in range(3)]
        (directory / "etcd").mkdir()
        etcd_processes: list[subprocess.Popen[bytes]] = []
        try:
            settings = cluster.settings_from_environment()
            if arguments.workers is not None:
                settings = dataclasses.replace(settings, http_workers=arguments.workers)
            spec, _ = await asyncio.to_thread(cluster.start_cluster, vault_directory, 3, ports=ports,
                                              settings=settings, timeout_seconds=60)
            # Why match by default: with TLS on, every vault request and replication message is
            # encrypted; an etcd in plain HTTP would not pay for the same protection.
            etcd_tls = settings.tls if arguments.etcd_tls == "match" else arguments.etcd_tls == "on"
            etcd_processes, etcd_urls, etcd_ca_file = await asyncio.to_thread(start_etcd, directory / "etcd",
                                                                              tls=etcd_tls)
            return await compare(arguments, list(spec.http_urls), spec.key("full"), etcd_urls,
                                 read_pids(node.pid_file for node in spec.nodes),
                                 [process.pid for process in etcd_processes], spec.ca_file, etcd_ca_file)
        finally:
            stop_processes(etcd_processes)
            if (vault_directory / cluster.CLUSTER_FILE_NAME).exists():
                await asyncio.to_thread(cluster.stop_cluster, vault_directory, 10)


async def compare(arguments: argparse.Namespace, vault_urls: list[str], api_key: str,
                  etcd_urls: list[str], vault_pids: list[int], etcd_pids: list[int],
                  ca_file: str | Path | None = None, etcd_ca_file: str | Path | None = None) -> int:
    concurrency, duration, warmup = arguments.concurrency, arguments.duration, arguments.warmup
    print(f"3-node vault {', '.join(vault_urls)}\n3-member etcd {', '.join(etcd_urls)}\n"
          f"concurrency {concurrency}, {duration:g} s per run after {warmup:g} s warm-up, "
          f"{client_label(arguments)}\n", flush=True)
    client, processes = arguments.client, arguments.client_processes

    def vault_tokenize(batch: int, run: str) -> Workload:
        # Why a seed per run: a run that repeated an earlier run's values would measure repeats, not inserts.
        return Workload("vault", "tokenize", tuple(vault_urls), batch, api_key, str(ca_file) if ca_file else None,
                        seed=derive_seed(arguments.seed, run))

    ratios: list[float] = []
    for round_number in range(1, arguments.rounds + 1):
        # Why alternate the order: the machine's speed drifts; a pair measured back to back in
        # both orders is fairer than two long runs one after the other.
        order = ("vault", "etcd") if round_number % 2 else ("etcd", "vault")
        results: dict[str, Measurement] = {}
        for system in order:
            if system == "vault":
                results[system] = await drive(vault_tokenize(1, f"vault {round_number}"), concurrency, duration,
                                              warmup, client, vault_pids, ca_file, processes)
                label = "vault tokenize x1"
            else:
                etcd = Workload("etcd", "insert-if-absent", tuple(etcd_urls),
                                ca_file=str(etcd_ca_file) if etcd_ca_file else None,
                                seed=derive_seed(arguments.seed, f"etcd {round_number}"))
                results[system] = await drive(etcd, concurrency, duration, warmup, client, etcd_pids,
                                              processes=processes)
                label = "etcd txn insert-if-absent x1"
            prefix = f"[{round_number}] " if arguments.rounds > 1 else ""
            print(report_line(prefix + label, results[system]), flush=True)
        if results["etcd"].requests:
            ratios.append(results["vault"].requests / results["etcd"].requests)
    vault_batch = await drive(vault_tokenize(100, "vault x100"), concurrency, duration, warmup, client, vault_pids,
                              ca_file, processes)
    print(report_line("vault tokenize x100", vault_batch), flush=True)
    if ratios:
        listed = ", ".join(f"{ratio:.2f}x" for ratio in ratios)
        print(f"\nvault/etcd single-value operations per second: {listed}"
              + (f" (median {statistics.median(ratios):.2f}x)" if len(ratios) > 1 else ""))
    return 0


async def command_workers(arguments: argparse.Namespace) -> int:
    """One node (a cluster of one) per worker count, each driven with the same single-value load."""
    from tokenvault.devcluster import cluster

    counts = [int(text) for text in arguments.counts.split(",") if text.strip()]
    # (workers, store reads): each count with the workers' store reads on, off, or both (W=0 has none).
    store_reads: tuple[bool | None, ...] = {"auto": (None,), "on": (True,), "off": (False,),
                                            "both": (True, False)}[arguments.store_reads]
    runs = [(count, reads) for count in counts for reads in (store_reads if count else (None,))]
    print(f"one node, {arguments.mode} ({arguments.format}) of {arguments.batch} value(s), concurrency {arguments.concurrency}, "
          f"{arguments.duration:g} s per run "
          f"after {arguments.warmup:g} s warm-up, {client_label(arguments)}, {os.cpu_count()} cores visible\n",
          flush=True)
    for round_number in range(1, arguments.rounds + 1):
        # Alternate the order between rounds, so the machine's drift does not favour one count.
        order = runs if round_number % 2 else list(reversed(runs))
        for count, reads in order:
            with tempfile.TemporaryDirectory(prefix="tokenvault-bench-") as temporary:
                directory = Path(temporary) / "vault"
                http_port, peer_port = free_ports(2)
                settings = dataclasses.replace(cluster.settings_from_environment(), http_workers=count,
                                               http_store_reads=reads)
                try:
                    spec, _ = await asyncio.to_thread(cluster.start_cluster, directory, 1,
                                                      ports=[(http_port, peer_port)], settings=settings,
                                                      timeout_seconds=60)
                    workload = await vault_workload(list(spec.http_urls), spec.key("full"), spec.ca_file, arguments)
                    measurement = await drive(workload, arguments.concurrency, arguments.duration, arguments.warmup,
                                              arguments.client, read_pids(node.pid_file for node in spec.nodes),
                                              spec.ca_file, arguments.client_processes)
                    prefix = f"[{round_number}] " if arguments.rounds > 1 else ""
                    reads_label = "" if count == 0 or arguments.store_reads != "both" else \
                        (" store-reads" if reads else " core-reads")
                    print(report_line(f"{prefix}W={count}{reads_label} {arguments.mode} x{arguments.batch}",
                                      measurement), flush=True)
                finally:
                    if (directory / cluster.CLUSTER_FILE_NAME).exists():
                        await asyncio.to_thread(cluster.stop_cluster, directory, 10)
    return 0


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="drive a running vault")
    run.add_argument("--url", action="append", default=[], help="node URL (repeat or comma-separate)")
    run.add_argument("--api-key", help="API key with the needed scopes (or env TOKENVAULT_API_KEY)")
    run.add_argument("--cluster-json", help="take URLs, the 'full' key and the CA from this cluster.json")
    run.add_argument("--ca-file", help="cluster CA for https:// nodes (or env TOKENVAULT_CA_FILE)")
    run.add_argument("--mode", choices=VAULT_MODES, default="tokenize")
    run.add_argument("--batch", type=int, default=1, help="values (or tokens) per request")
    run.add_argument("--format", choices=("opaque", "card"), default="opaque",
                     help="tokenize mode: opaque tokens of synthetic strings, or card tokens of random card numbers")
    run.add_argument("--pool", type=int, default=DETOKENIZE_POOL_VALUES, help="values tokenized beforehand for detokenize and repeat")
    run.add_argument("--ttl-seconds", type=int, default=None,
                     help="tokenize mode: every request asks for this TTL (docs/api.md, ttl_seconds)")
    compare_parser = commands.add_parser("compare-etcd", help="start a 3-node vault and a 3-member etcd, drive both")
    compare_parser.add_argument("--rounds", type=int, default=1,
                                help="single-value pairs to run, alternating which system goes first; "
                                     "prints every ratio and their median")
    compare_parser.add_argument("--etcd-tls", choices=("match", "on", "off"), default="match",
                                help="etcd's client and peer links over TLS (match: when the vault's are, "
                                     "TOKENVAULT_TLS; on; off)")
    compare_parser.add_argument("--workers", type=int, default=None,
                                help="HTTP worker processes per vault node (default: the node's own default, "
                                     "cores minus one)")
    workers_parser = commands.add_parser("workers", help="one node per HTTP worker count, same load on each")
    workers_parser.add_argument("--counts", default="0,1,2,4,8", help="worker counts, comma-separated")
    workers_parser.add_argument("--rounds", type=int, default=1, help="rounds over the counts, order alternating")
    workers_parser.add_argument("--batch", type=int, default=1, help="values (or tokens) per request")
    workers_parser.add_argument("--mode", choices=("tokenize", "detokenize", "repeat"), default="tokenize")
    workers_parser.add_argument("--format", choices=("opaque", "card"), default="opaque",
                                help="card: card numbers, so detokenize resolves card tokens (a reveal)")
    workers_parser.add_argument("--pool", type=int, default=DETOKENIZE_POOL_VALUES,
                                help="values tokenized beforehand for detokenize and repeat")
    workers_parser.add_argument("--store-reads", choices=("auto", "on", "off", "both"), default="auto",
                                help="the workers answer detokenize and repeat tokenize from their view of the store"
                                     " (http.store_reads; auto: the node's default, on from 2 workers)")
    for sub in (run, compare_parser, workers_parser):
        sub.add_argument("--concurrency", type=int, default=64, help="requests in flight")
        sub.add_argument("--duration", type=float, default=10.0, help="measured seconds")
        sub.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
        sub.add_argument("--seed", type=int, default=None, help="random seed for the synthetic values")
        sub.add_argument("--client", choices=CLIENT_KINDS, default="aiohttp",
                         help="HTTP client: aiohttp, or raw (a minimal asyncio HTTP/1.1 client that costs "
                              "the shared cores less; see bench/httpclients.py)")
        sub.add_argument("--client-processes", type=int, default=1, metavar="N",
                         help="load generator processes sharing --concurrency, all measuring the same window "
                              "(for many cores, where one Python process is the bottleneck)")
    arguments = parser.parse_args(argv)
    if arguments.seed is None:
        arguments.seed = random.SystemRandom().getrandbits(32)
    if (getattr(arguments, "batch", 1) < 1 or getattr(arguments, "rounds", 1) < 1 or arguments.concurrency < 1
            or arguments.duration <= 0):
        parser.error("--batch, --rounds and --concurrency must be at least 1 and --duration positive")
    if not 1 <= arguments.client_processes <= arguments.concurrency:
        parser.error("--client-processes must be between 1 and --concurrency")
    return arguments


def install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CHILD_COMMAND]:
        # Why before argparse: a load process's command is internal, so it is kept out of --help.
        return child_main()
    arguments = parse_arguments(argv)
    install_uvloop()
    handler = {"run": command_run, "compare-etcd": command_compare_etcd, "workers": command_workers}[arguments.command]
    return asyncio.run(handler(arguments))


if __name__ == "__main__":
    sys.exit(main())
