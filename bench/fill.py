"""Fill a running vault to N tokens as fast as it takes them, printing every window as it goes.

    python bench/fill.py --cluster-json .cluster/cluster.json --tokens 20000000 --batch 100 --concurrency 64 \\
        --window 20 [--client raw] [--processes 4] [--restart-check]
    python bench/fill.py --cluster-json .cluster/cluster.json --measure-start

The fill sends tokenize requests of --batch fresh values each, --concurrency of
them in flight, spread over --processes load processes, until N tokens are
acknowledged (HTTP 200 with one token per value). Values are 16-digit card-like
strings, an affine permutation of a counter modulo 10^16 with a random
multiplier and offset per run: no value repeats within a run (every token is
new), and consecutive values look unrelated. They are not Luhn-valid: the vault
does not check, and a check digit would cost the generator microseconds a value.

Every --window seconds it prints one line: elapsed time, tokens acknowledged so
far, values/s in the window, p50/p99/max latency of the requests that finished
in it and errors; then, read from each node of the cluster.json: the node
process's RSS (/proc), the data directory's size on disk (allocated blocks),
the event-loop stall gauge (worst of the last minute) and how many stalls of
more than 100 ms and 1 s the stall histograms gained in the window, over the
node's every event loop, its HTTP workers' included
(tokenvault/core/loopwatch.py), and the highest view any node reports in /health.
A view that grows is an election; the line says so. At the end a summary
compares the first window with the last full one (rate and p99 ratios).

--restart-check then stops every node the way `./run_cluster.sh stop` does
(SIGTERM, pid files), starts them again from the same data directories, and
prints how long each took to answer /health and the cluster to have a primary.
--measure-start does only the measuring, for nodes someone else (re)started:
from each node process's start time (/proc) to /health answering and a primary
being known; when a node is already serving at the first poll it reads the
times from the node's log instead.

It measures and prints; nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import math
import multiprocessing
import os
import queue
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from httpclients import CLIENT_KINDS, open_client  # noqa: E402
from loadgen import Measurement, VaultTarget  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tokenvault.devcluster.cluster import (CLUSTER_FILE_NAME, ClusterError, cluster_status, fetch_health,  # noqa: E402
                                launch_node, load_cluster, open_url, output_tail, running_pid, stop_cluster)

CARD_DIGITS = 16
CARD_SPACE = 10 ** CARD_DIGITS
ERROR_PAUSE_SECONDS = 0.05  # a failing target is not hammered in a tight loop
FLUSH_DELAY_SECONDS = 0.05  # a load process reports a window this long after it ends
SCRAPE_TIMEOUT_SECONDS = 5.0
METRICS_PAGE_MAX_BYTES = 16 * 1024 * 1024
STALL_THRESHOLDS_SECONDS = (0.1, 1.0)
LOG_TAIL_BYTES = 8 * 1024 * 1024
PRIMARY_EVENTS = ("primary.elected", "primary.changed")


# ---------------------------------------------------------------- values and window statistics


class CardValues:
    """Unique 16-digit strings: value(n) = (n * multiplier + offset) mod 10^16, a bijection on [0, 10^16).

    The multiplier is odd and not a multiple of 5, so it is coprime to 10^16
    and distinct counters below 10^16 give distinct values.
    """

    def __init__(self, seed: int) -> None:
        generator = random.Random(seed)
        multiplier = generator.randrange(CARD_SPACE // 10, CARD_SPACE) | 1
        while multiplier % 5 == 0:
            multiplier += 2
        self.multiplier = multiplier
        self.offset = generator.randrange(CARD_SPACE)

    def value(self, number: int) -> str:
        if not 0 <= number < CARD_SPACE:
            raise ValueError("counter out of range")
        return f"{(number * self.multiplier + self.offset) % CARD_SPACE:016d}"


def window_index(finished: float, started_at: float, window_seconds: float) -> int:
    """The window a request that finished at `finished` (same clock as `started_at`) is counted in."""
    return max(0, int((finished - started_at) // window_seconds))


def merge(into: Measurement, other: Measurement) -> None:
    """Add one load process's window to the total of that window."""
    into.requests += other.requests
    into.values += other.values
    into.latencies_ms.extend(other.latencies_ms)
    into.errors.update(other.errors)


@dataclass(frozen=True, slots=True)
class WindowFigures:
    values_per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int


def figures(window: Measurement, duration_seconds: float) -> WindowFigures:
    """Rate and latency percentiles of one window (NaN latencies when nothing finished in it)."""
    return WindowFigures(values_per_second=window.values / duration_seconds if duration_seconds > 0 else 0.0,
                         p50_ms=window.percentile_ms(0.50), p99_ms=window.percentile_ms(0.99),
                         max_ms=max(window.latencies_ms, default=math.nan), errors=sum(window.errors.values()))


def ratio(last: float, first: float) -> float:
    return last / first if first and not math.isnan(first) and not math.isnan(last) else math.nan


# ---------------------------------------------------------------- load processes


@dataclass(frozen=True, slots=True)
class LoadSettings:
    urls: tuple[str, ...]
    api_key: str
    batch: int
    client: str
    window_seconds: float
    seed: int
    processes: int
    ca_file: str | None = None  # the cluster CA for https:// nodes


def load_process(index: int, concurrency: int, settings: LoadSettings, budget: Any, start: Any,
                 reports: Any) -> None:
    """Entry point of one load process: wait for the common start time, then fill until the budget is spent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C by emptying the budget
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    reports.put(("ready", index))
    start.wait()
    asyncio.run(_fill(index, concurrency, settings, budget, start.started_at.value, reports))


async def _fill(index: int, concurrency: int, settings: LoadSettings, budget: Any, started_at: float,
                reports: Any) -> None:
    target = VaultTarget(settings.urls, settings.api_key, settings.seed + index, settings.ca_file)
    values = CardValues(settings.seed)  # the same permutation everywhere, counters disjoint per process
    numbers = itertools.count(index, settings.processes)
    windows: dict[int, Measurement] = {}
    # CLOCK_MONOTONIC is one clock for every process of the machine, so all load
    # processes and the parent cut the windows at the same instants.
    clock = time.monotonic

    def claim() -> int:
        with budget.get_lock():
            count = min(settings.batch, budget.value)
            budget.value -= count
        return count

    def give_back(count: int) -> None:
        with budget.get_lock():
            budget.value += count

    async def worker(client: Any, worker_number: int) -> None:
        url = target.url_for(worker_number) + "/v1/tokenize"
        while (count := claim()) > 0:
            batch = [values.value(next(numbers)) for _ in range(count)]
            started = clock()
            try:
                status, body = await target.post(client, worker_number, url, {"values": batch})
                error = None if status == 200 and len(body.get("tokens", ())) == count else f"HTTP {status}"
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as failure:
                error = type(failure).__name__
            finished = clock()
            window = windows.setdefault(window_index(finished, started_at, settings.window_seconds), Measurement())
            if error is None:
                window.requests += 1
                window.values += count
                window.latencies_ms.append((finished - started) * 1000.0)
            else:
                window.errors[error] += 1
                give_back(count)
                await asyncio.sleep(ERROR_PAUSE_SECONDS)

    def flush(through: int, done: bool) -> None:
        ready = {number: windows.pop(number) for number in sorted(windows) if number <= through}
        reports.put(("flush", index, through, ready, done, clock()))

    async def reporter() -> None:
        # Why a timer: a window's figures must reach the parent even when no request finishes for a while.
        while True:
            current = window_index(clock(), started_at, settings.window_seconds)
            next_boundary = started_at + (current + 1) * settings.window_seconds
            await asyncio.sleep(max(0.0, next_boundary + FLUSH_DELAY_SECONDS - clock()))
            flush(window_index(clock(), started_at, settings.window_seconds) - 1, False)

    async with open_client(settings.client, concurrency, settings.ca_file) as client:
        reporting = asyncio.get_running_loop().create_task(reporter())
        await asyncio.gather(*(worker(client, worker_number) for worker_number in range(concurrency)))
        reporting.cancel()
    flush(max(windows, default=-1), True)


class _StartSignal:
    """An event plus the common start time, both shareable with spawned processes."""

    def __init__(self, context: Any) -> None:
        self.event = context.Event()
        self.started_at = context.Value("d", 0.0)

    def wait(self) -> None:
        self.event.wait()

    def set(self, started_at: float) -> None:
        self.started_at.value = started_at
        self.event.set()


# ---------------------------------------------------------------- the cluster's side


@dataclass(slots=True)
class NodeSample:
    """One node as seen at the end of a window."""

    node_id: str
    health: dict[str, Any] | None = None
    rss_bytes: int | None = None
    disk_bytes: int | None = None
    stall_over: dict[float, float] | None = None  # cumulative count of stalls longer than each threshold
    stall_max_seconds: float | None = None


def process_rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def disk_usage_bytes(directory: Path) -> int | None:
    """Bytes allocated on disk to the files under `directory` (st_blocks, like du), or None if it is missing.

    A file with several hard links (a store checkpoint links the live files) is counted once, as du does.
    """
    if not Path(directory).is_dir():
        return None
    total = 0
    seen: set[tuple[int, int]] = set()
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                status = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue  # removed while walking (compaction, a released WAL segment)
            if (status.st_dev, status.st_ino) not in seen:
                seen.add((status.st_dev, status.st_ino))
                total += status.st_blocks * 512
    return total


def stall_figures(exposition: str, thresholds: Sequence[float] = STALL_THRESHOLDS_SECONDS,
                  workers: bool | None = None) -> tuple[dict[float, float], float | None] | None:
    """From a /metrics text: how many stalls exceeded each threshold (a bucket bound of the histogram) so
    far, and the worst-of-a-minute gauge, over every event loop of the node (its core and each HTTP
    worker's, a series each); ``workers`` True or False: the HTTP workers' series only, or the core's."""
    buckets: dict[tuple[tuple[str, str], ...], dict[float, float]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    maxima: list[float] = []
    for family in text_string_to_metric_families(exposition):
        if family.name == "tokenvault_event_loop_stall_seconds":
            for sample in family.samples:
                if workers is not None and ("worker" in sample.labels) != workers:
                    continue
                series = tuple(sorted((name, value) for name, value in sample.labels.items() if name != "le"))
                if sample.name.endswith("_bucket"):
                    buckets.setdefault(series, {})[float(sample.labels["le"])] = sample.value
                elif sample.name.endswith("_count"):
                    counts[series] = sample.value
        elif family.name == "tokenvault_event_loop_stall_max_seconds":
            maxima.extend(sample.value for sample in family.samples
                          if workers is None or ("worker" in sample.labels) == workers)
    if not counts:
        return None
    over = {threshold: sum(count - buckets.get(series, {}).get(threshold, count) for series, count in counts.items())
            for threshold in thresholds}
    return over, max(maxima) if maxima else None


def scrape_metrics(http_url: str, ca_file: Path | str | None = None) -> str:
    """A node's /metrics page, read bounded (16 MiB); raises OSError when it does not answer."""
    with open_url(http_url.rstrip("/") + "/metrics", SCRAPE_TIMEOUT_SECONDS, ca_file) as response:
        page: bytes = response.read(METRICS_PAGE_MAX_BYTES)
    return page.decode("utf-8", "replace")


def sample_node(node: Any, ca_file: Path | None = None) -> NodeSample:
    sample = NodeSample(node.node_id)
    try:
        sample.health = fetch_health(node.http_url, SCRAPE_TIMEOUT_SECONDS, ca_file)
    except (OSError, ValueError):
        pass
    try:
        stalls = stall_figures(scrape_metrics(node.http_url, ca_file))
        if stalls is not None:
            sample.stall_over, sample.stall_max_seconds = stalls
    except (OSError, ValueError):
        pass
    sample.rss_bytes = process_rss_bytes(running_pid(node))
    sample.disk_bytes = disk_usage_bytes(node.data_dir)
    return sample


def sample_cluster(nodes: Sequence[Any], ca_file: Path | None = None) -> list[NodeSample]:
    """Every node sampled at once, so a hung node costs one timeout, not one per node."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        return list(pool.map(lambda node: sample_node(node, ca_file), nodes))


def highest_view(samples: Iterable[NodeSample]) -> int | None:
    views = [sample.health.get("view") for sample in samples if sample.health]
    views = [view for view in views if isinstance(view, int)]
    return max(views) if views else None


def mebibytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def milliseconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


HEADER = (f"{'elapsed':>8} {'tokens':>11} {'values/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6}"
          f" | {'rss MiB':>8} {'disk MiB':>8} {'worst 60s':>9} {'>100ms':>6} {'>1s':>4} {'view':>4}")


def window_line(elapsed_seconds: float, tokens: int, numbers: WindowFigures, samples: list[NodeSample],
                previous: list[NodeSample] | None, errors: Counter[str], partial: bool) -> str:
    """One printed line; per-node figures are joined with '/' in cluster.json order."""
    line = (f"{elapsed_seconds:7.1f}s {tokens:>11,} {numbers.values_per_second:>9,.0f}"
            f" {milliseconds(numbers.p50_ms):>7} {milliseconds(numbers.p99_ms):>7} {milliseconds(numbers.max_ms):>7}"
            f" {numbers.errors:>6}")
    rss = "/".join(mebibytes(sample.rss_bytes) for sample in samples)
    disk = "/".join(mebibytes(sample.disk_bytes) for sample in samples)
    maxima = [sample.stall_max_seconds for sample in samples if sample.stall_max_seconds is not None]
    stall_max = f"{max(maxima) * 1000:.0f}ms" if maxima else "-"
    over_100, over_1s = (stalls_gained(samples, previous, threshold) for threshold in STALL_THRESHOLDS_SECONDS)
    view = highest_view(samples)
    line += (f" | {rss:>8} {disk:>8} {stall_max:>9} {'-' if over_100 is None else f'{over_100:.0f}':>6}"
             f" {'-' if over_1s is None else f'{over_1s:.0f}':>4} {'-' if view is None else view:>4}")
    notes = []
    if partial:
        notes.append("partial window")
    previous_view = highest_view(previous) if previous else None
    if view is not None and previous_view is not None and view != previous_view:
        notes.append(f"ELECTION: view {previous_view} -> {view}")
    down = [sample.node_id for sample in samples if sample.health is None]
    if down:
        notes.append(f"no /health from {', '.join(down)}")
    if errors:
        notes.append(", ".join(f"{kind}: {count}" for kind, count in sorted(errors.items())))
    return line + (f"   ({'; '.join(notes)})" if notes else "")


def stalls_gained(samples: list[NodeSample], previous: list[NodeSample] | None, threshold: float) -> float | None:
    """Stalls longer than `threshold` that the nodes' histograms gained since `previous` (None: no node has one)."""
    gained = None
    for sample in samples:
        if sample.stall_over is None:
            continue
        before = next((old.stall_over for old in previous or () if old.node_id == sample.node_id), None)
        now = sample.stall_over[threshold]
        # A restarted node counts from zero again.
        gained = (gained or 0.0) + (now - before[threshold] if before is not None and now >= before[threshold]
                                    else now)
    return gained


# ---------------------------------------------------------------- the fill


@dataclass(slots=True)
class FillResult:
    tokens: int = 0
    requests: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    windows: list[tuple[float, WindowFigures, bool]] = field(default_factory=list)  # (duration, figures, partial)
    elections: int = 0
    stalls_over: dict[float, float] = field(default_factory=lambda: dict.fromkeys(STALL_THRESHOLDS_SECONDS, 0.0))
    worst_stall_seconds: float | None = None
    last_samples: list[NodeSample] = field(default_factory=list)


def split_concurrency(concurrency: int, processes: int) -> list[int]:
    """Requests in flight per load process: as even as possible, each at least one."""
    share, extra = divmod(concurrency, processes)
    return [share + (1 if number < extra else 0) for number in range(processes)]


def run_fill(arguments: argparse.Namespace, spec: Any, urls: Sequence[str]) -> FillResult:
    context = multiprocessing.get_context("spawn")
    settings = LoadSettings(tuple(urls), spec.key("full"), arguments.batch, arguments.client, arguments.window,
                            arguments.seed, arguments.processes,
                            str(spec.ca_file) if spec.ca_file is not None else None)
    budget = context.Value("q", arguments.tokens)
    start = _StartSignal(context)
    reports = context.Queue()
    workers = [context.Process(target=load_process, args=(number, share, settings, budget, start, reports),
                               name=f"fill-load-{number}", daemon=True)
               for number, share in enumerate(split_concurrency(arguments.concurrency, arguments.processes))]
    for process in workers:
        process.start()
    try:
        for _ in workers:
            _expect_ready(reports, workers)
        started_at = time.monotonic()
        start.set(started_at)
        return _collect(arguments, spec, reports, workers, budget, started_at)
    finally:
        _empty(budget)  # after a second Ctrl-C or an error too: the load processes wind down
        for process in workers:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


def _expect_ready(reports: Any, workers: Sequence[Any]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            message = reports.get(timeout=0.5)
        except queue.Empty:
            if any(process.exitcode not in (None, 0) for process in workers):
                raise SystemExit("a load process failed to start") from None
            continue
        if message[0] == "ready":
            return
    raise SystemExit("the load processes did not start within 60 s")


def _collect(arguments: argparse.Namespace, spec: Any, reports: Any, workers: Sequence[Any], budget: Any,
             started_at: float) -> FillResult:
    """Merge the load processes' windows, sample the nodes at every boundary, print each window once complete."""
    result = FillResult()
    width = arguments.window
    pending: dict[int, Measurement] = {}
    samples: dict[int, list[NodeSample]] = {}
    flushed = [-1] * len(workers)
    done = [False] * len(workers)
    ended_at = started_at
    printed = -1
    last_acknowledged = time.monotonic()
    previous_samples = sample_cluster(spec.nodes, spec.ca_file)
    interrupted = _stop_on_first_interrupt()
    print(HEADER, flush=True)
    while not all(done):
        boundary = started_at + (len(samples) + 1) * width
        try:
            message = reports.get(timeout=max(0.01, min(1.0, boundary - time.monotonic())))
        except queue.Empty:
            message = None
        if message is not None and message[0] == "flush":
            _, number, through, windows, finished, process_clock = message
            for index, window in windows.items():
                merge(pending.setdefault(index, Measurement()), window)
                if window.values:
                    last_acknowledged = time.monotonic()
            flushed[number] = max(flushed[number], through)
            done[number] = done[number] or finished
            if finished:
                ended_at = max(ended_at, process_clock)
            continue  # drain every waiting report before sampling or printing
        if time.monotonic() >= boundary:
            samples[len(samples)] = sample_cluster(spec.nodes, spec.ca_file)
        # The load processes report once per window, so an acknowledgement is known up to a window late.
        quiet_seconds = time.monotonic() - last_acknowledged - width
        if interrupted or (arguments.abort_after > 0 and quiet_seconds > arguments.abort_after):
            print("interrupted: letting the requests in flight finish" if interrupted else
                  f"aborting: no token acknowledged for {arguments.abort_after:g} s", flush=True)
            _empty(budget)
            interrupted.clear()
            last_acknowledged = math.inf
        if any(process.exitcode not in (None, 0) for process in workers):
            raise SystemExit("a load process died; see its traceback above")
        # Print every window whose load figures (from every process) and node sample are both in.
        while printed + 1 in samples and all(done[number] or flushed[number] > printed
                                              for number in range(len(workers))):
            printed += 1
            previous_samples = _print_window(result, printed, width, width, pending.pop(printed, Measurement()),
                                             samples[printed], previous_samples, False)
    final = max(window_index(ended_at, started_at, width), max(pending, default=-1))
    final_samples = sample_cluster(spec.nodes, spec.ca_file)
    for index in range(printed + 1, final + 1):
        partial = index == final and index not in samples
        duration = max(1e-9, ended_at - started_at - index * width) if partial else width
        previous_samples = _print_window(result, index, width, duration, pending.pop(index, Measurement()),
                                         samples.get(index, final_samples), previous_samples, partial)
    result.seconds = ended_at - started_at
    result.last_samples = previous_samples
    return result


def _stop_on_first_interrupt() -> list[bool]:
    """A flag that the first Ctrl-C sets (the fill then winds down); a second one interrupts as usual."""
    flag: list[bool] = []

    def handler(_signal: int, _frame: Any) -> None:
        flag.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)
    return flag


def _empty(budget: Any) -> None:
    with budget.get_lock():
        budget.value = 0


def _print_window(result: FillResult, index: int, width: float, duration: float, window: Measurement,
                  samples: list[NodeSample], previous: list[NodeSample], partial: bool) -> list[NodeSample]:
    result.tokens += window.values
    result.requests += window.requests
    result.errors.update(window.errors)
    numbers = figures(window, duration)
    result.windows.append((duration, numbers, partial))
    before, after = highest_view(previous), highest_view(samples)
    if before is not None and after is not None and after != before:
        result.elections += 1
    for threshold in STALL_THRESHOLDS_SECONDS:
        result.stalls_over[threshold] += stalls_gained(samples, previous, threshold) or 0.0
    maxima = [sample.stall_max_seconds for sample in samples if sample.stall_max_seconds is not None]
    if maxima:
        result.worst_stall_seconds = max(maxima + [result.worst_stall_seconds or 0.0])
    print(window_line(index * width + duration, result.tokens, numbers, samples, previous, window.errors, partial),
          flush=True)
    return samples


def summary_lines(result: FillResult) -> list[str]:
    """The closing summary: totals, and the first window against the last full one."""
    rate = result.tokens / result.seconds if result.seconds > 0 else 0.0
    errors = ", ".join(f"{kind}: {count}" for kind, count in sorted(result.errors.items())) or "none"
    lines = [f"filled {result.tokens:,} tokens in {result.seconds:.1f} s ({rate:,.0f} values/s on average),"
             f" {result.requests:,} requests acknowledged, errors: {errors}"]
    # The last full window, when there are two: the partial one at the end only drains what is in flight.
    full = [numbers for _, numbers, partial in result.windows if not partial]
    compared = full if len(full) >= 2 else [numbers for _, numbers, _ in result.windows]
    if len(compared) >= 2:
        first, last = compared[0], compared[-1]
        label = "last full window" if compared is full else "last (partial) window"
        lines.append(f"first window {first.values_per_second:,.0f} values/s, p99 {milliseconds(first.p99_ms)} ms;"
                     f" {label} {last.values_per_second:,.0f} values/s, p99 {milliseconds(last.p99_ms)} ms")
        lines.append(f"last/first: rate {ratio(last.values_per_second, first.values_per_second):.2f}x,"
                     f" p99 {ratio(last.p99_ms, first.p99_ms):.2f}x")
    else:
        lines.append("one window only: no first/last comparison (use a smaller --window)")
    worst = "-" if result.worst_stall_seconds is None else f"{result.worst_stall_seconds * 1000:.0f} ms"
    lines.append(f"elections seen: {result.elections}; event-loop stalls over 100 ms: "
                 f"{result.stalls_over[0.1]:.0f}, over 1 s: {result.stalls_over[1.0]:.0f}; worst stall gauge: {worst}")
    for sample in result.last_samples:
        lines.append(f"{sample.node_id}: rss {mebibytes(sample.rss_bytes)} MiB,"
                     f" data directory {mebibytes(sample.disk_bytes)} MiB on disk")
    return lines


# ---------------------------------------------------------------- start-up measurements


def process_start_time(pid: int) -> float | None:
    """When `pid` started, in Unix seconds (from /proc; resolution one clock tick, 10 ms)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as handle:
            uptime_seconds = float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    # Why uptime and not /proc/stat's btime: btime is rounded to whole seconds.
    return time.time() - (uptime_seconds - start_ticks / os.sysconf("SC_CLK_TCK"))


def log_event_times(log_file: Path, since: float) -> dict[str, float]:
    """Unix times of the first node.replayed (the start's replay done; node.recovered was that before
    2026-12-07) and primary event after `since`, from the node log's tail."""
    found: dict[str, float] = {}
    try:
        with open(log_file, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - LOG_TAIL_BYTES))
            lines = handle.read().splitlines()
    except OSError:
        return found
    for raw in lines:
        if b"node.replayed" not in raw and b"primary." not in raw:
            continue
        try:
            record = json.loads(raw)
            when = datetime.fromisoformat(record["ts"]).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        event = record.get("event")
        kind = "primary" if event in PRIMARY_EVENTS else event
        if when >= since and kind in ("node.replayed", "primary") and kind not in found:
            found[kind] = when
    return found


def wait_until_serving(spec: Any, since: dict[str, float], timeout_seconds: float) -> dict[str, dict[str, float]]:
    """Poll every node's /health; record, per node, seconds after `since[node]` of first answer and of a primary.

    A node whose process is gone without having answered is marked "exited" and no longer waited for.
    """
    seen: dict[str, dict[str, float]] = {node.node_id: {} for node in spec.nodes}
    first_poll = True
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        now = time.time()
        for status in cluster_status(spec, 1.0):
            marks = seen[status.node_id]
            if status.node_id not in since:
                continue
            if status.health is None:
                if status.pid is None and "exited" not in marks:
                    marks["exited"] = now - since[status.node_id]
                continue
            if first_poll:
                marks.setdefault("serving_at_first_poll", now - since[status.node_id])
            marks.setdefault("health", now - since[status.node_id])
            if status.health.get("primary_id") is not None:
                marks.setdefault("primary", now - since[status.node_id])
        first_poll = False
        if all("primary" in seen[node_id] or "exited" in seen[node_id] for node_id in since):
            break
        time.sleep(0.02)
    return seen


def measure_start(spec: Any, timeout_seconds: float) -> None:
    """For every running node: from its process start to /health answering and a primary being known."""
    since: dict[str, float] = {}
    for node in spec.nodes:
        pid = running_pid(node)
        started = process_start_time(pid) if pid is not None else None
        if started is None:
            print(f"{node.node_id}: not running (no live pid in {node.pid_file})")
            continue
        since[node.node_id] = started
    seen = wait_until_serving(spec, since, timeout_seconds)
    for node in spec.nodes:
        if node.node_id not in since:
            continue
        marks = seen[node.node_id]
        prefix = f"{node.node_id}: process started {datetime.fromtimestamp(since[node.node_id]).isoformat()}"
        if "serving_at_first_poll" in marks:
            logged = log_event_times(node.log_file, since[node.node_id] - 1.0)
            print(f"{prefix}; already serving at the first poll, {marks['health']:.2f} s after start (upper bound);"
                  f" from its log: replayed at {_after(logged.get('node.replayed'), since[node.node_id])},"
                  f" primary known at {_after(logged.get('primary'), since[node.node_id])}")
        else:
            print(f"{prefix}; {_serving_report(node, marks)}")


def _after(when: float | None, since: float) -> str:
    return "- (not in the log's tail)" if when is None else f"+{when - since:.2f} s"


def _seconds(value: float | None) -> str:
    return "- (timed out)" if value is None else f"{value:.2f} s"


def _serving_report(node: Any, marks: dict[str, float]) -> str:
    if "exited" in marks and "health" not in marks:
        return f"exited before answering /health\n{output_tail(node, 4)}"
    return (f"/health answered after {_seconds(marks.get('health'))},"
            f" primary known after {_seconds(marks.get('primary'))}")


def restart_check(spec: Any, timeout_seconds: float) -> None:
    """Stop every node as `./run_cluster.sh stop` does, start them again, time /health and the primary."""
    print(f"\nrestart check: stopping {', '.join(node.node_id for node in spec.nodes)} (SIGTERM)", flush=True)
    stopping = time.monotonic()
    stop_cluster(spec.directory, timeout_seconds=timeout_seconds, report=lambda line: print("  " + line))
    print(f"  stopped in {time.monotonic() - stopping:.2f} s", flush=True)
    since: dict[str, float] = {}
    for node in spec.nodes:
        since[node.node_id] = time.time()
        pid = launch_node(node)
        print(f"  started {node.node_id} (pid {pid}): tokenvault serve --config {node.config}", flush=True)
    seen = wait_until_serving(spec, since, timeout_seconds)
    for node in spec.nodes:
        marks = seen[node.node_id]
        rss = f", rss {mebibytes(process_rss_bytes(running_pid(node)))} MiB" if "health" in marks else ""
        print(f"  {node.node_id}: {_serving_report(node, marks)}{rss}")


# ---------------------------------------------------------------- command line


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster-json", required=True,
                        help="the cluster.json of a cluster directory (URLs, the 'full' API key, pid files, data"
                             " directories)")
    parser.add_argument("--url", action="append", default=[],
                        help="send requests to these node URLs instead of every node (repeat or comma-separate),"
                             " e.g. the primary only")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens to have acknowledged")
    parser.add_argument("--batch", type=int, default=100, help="values per tokenize request")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight, over all load processes")
    parser.add_argument("--window", type=float, default=20.0, help="seconds per printed window")
    parser.add_argument("--processes", type=int, default=1, help="load processes (multiprocessing)")
    parser.add_argument("--client", choices=CLIENT_KINDS, default="aiohttp", help="HTTP client (see loadgen.py)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the value permutation (random by default)")
    parser.add_argument("--abort-after", type=float, default=60.0,
                        help="stop when no token was acknowledged for this many seconds (0: never)")
    parser.add_argument("--restart-check", action="store_true",
                        help="after filling, stop and restart every node and time /health and the primary")
    parser.add_argument("--measure-start", action="store_true",
                        help="do not fill: time each running node from process start to /health and a primary")
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="seconds to wait for stopping, /health and a primary in the start-up checks")
    arguments = parser.parse_args(argv)
    if arguments.seed is None:
        arguments.seed = random.SystemRandom().getrandbits(32)
    if arguments.batch < 1 or arguments.processes < 1 or arguments.concurrency < arguments.processes:
        parser.error("--batch and --processes must be at least 1, and --concurrency at least --processes")
    if arguments.tokens < 0 or arguments.window <= 0:
        parser.error("--tokens must not be negative and --window must be positive")
    if arguments.tokens >= CARD_SPACE:
        parser.error("--tokens must stay below 10^16 (the space of 16-digit values)")
    return arguments


def load_spec(path: str) -> Any:
    if Path(path).name != CLUSTER_FILE_NAME:
        raise SystemExit(f"--cluster-json must name a cluster directory's {CLUSTER_FILE_NAME}")
    try:
        return load_cluster(Path(path).parent)
    except ClusterError as error:
        raise SystemExit(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    spec = load_spec(arguments.cluster_json)
    if arguments.measure_start:
        measure_start(spec, arguments.start_timeout)
        return 0
    urls = [url for entry in arguments.url for url in entry.split(",") if url] or list(spec.http_urls)
    if arguments.tokens:
        print(f"filling {arguments.tokens:,} tokens: {arguments.batch} values/request, concurrency"
              f" {arguments.concurrency} over {arguments.processes} process(es), {arguments.client} client,"
              f" {arguments.window:g} s windows, against {', '.join(urls)} (seed {arguments.seed})", flush=True)
        result = run_fill(arguments, spec, urls)
        print("\n".join(summary_lines(result)), flush=True)
    if arguments.restart_check:
        restart_check(spec, arguments.start_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
