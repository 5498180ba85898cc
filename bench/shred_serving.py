"""A serving cluster under a steady stream of deletes: what the shredder's backlog, the log, the store and
the cores' memory do on every node, and what the deletes cost the tokenize load beside them.

    TOKENVAULT_CLUSTER_DIR=/tmp/shserve ./run_cluster.sh start
    .venv/bin/python bench/fill.py --cluster-json /tmp/shserve/cluster.json --tokens 10000000 --batch 100 \\
        --concurrency 64 --client raw
    .venv/bin/python bench/shred_serving.py --cluster-json /tmp/shserve/cluster.json --rates 1000,4000 \\
        --seconds 120

For each rate of deletes: first the tokens to delete, ``rate`` x ``--seconds`` fresh values tokenized in
requests of 1,000 (the store grows by them, and the stream takes them away again); then a tokenize load
of its own for ``--seconds`` (bench/loadgen.py ``run``: ``--load-batch`` values a request,
``--concurrency`` in flight, raw client), once alone and once beside a stream of deletes of
``--delete-batch`` of those tokens at ``rate`` tokens a second, sent to every node in turn (a backup
forwards them to the primary). Meanwhile each node's ``/metrics`` and its core's resident memory
(/proc) are read every second. After the stream it waits until no node has a delete waiting
(``tokenvault_shred_oldest_wait_seconds`` 0 on every node twice in a row).

Prints, per rate: the load's report line alone and beside the deletes; the deletes acknowledged, their
rate and latency; per node the largest backlog of rows, the longest the oldest delete waited (the gauge,
sampled each second), its shred passes (``tokenvault_shred_pass_seconds``: how many, how many of the
whole key space, their average and total seconds; the longest its log's ``shred.done`` and
``shred.pass`` lines tell of), its write-ahead log and table files at
the start, at their largest and after the drain, its core's resident memory at the start and at its
largest; and how long the drain took after the stream. It measures and prints; nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fill import process_rss_bytes, scrape_metrics  # noqa: E402
from loadgen import Measurement  # noqa: E402
from tokenvault.client.vault import AsyncClient  # noqa: E402
from tokenvault.devcluster import cluster  # noqa: E402
from tokenvault.devcluster.cluster_spec import ClusterSpec, NodeSpec  # noqa: E402

BENCH = Path(__file__).resolve().parent
POOL_REQUEST_VALUES = 1000
POOL_CONCURRENCY = 8
DELETES_IN_FLIGHT = 8
SAMPLE_SECONDS = 1.0
DRAIN_SECONDS = 1800.0  # the longest the bench waits for every node's deletes to be shredded (--drain-seconds)
LOAD_WARMUP_SECONDS = 2.0
METRICS = ("tokenvault_shred_backlog_rows", "tokenvault_shred_oldest_wait_seconds",
           "tokenvault_wal_segment_bytes", "tokenvault_store_table_bytes")
PASS_METRICS = {"tokenvault_shred_pass_seconds_count": "passes", "tokenvault_shred_pass_seconds_sum": "pass seconds"}


@dataclass
class NodeTrace:
    """One node's samples over a run: the first, the largest and the last of each figure."""

    first: dict[str, float] = field(default_factory=dict)
    largest: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)

    def add(self, figures: dict[str, float]) -> None:
        for name, value in figures.items():
            self.first.setdefault(name, value)
            self.largest[name] = max(self.largest.get(name, value), value)
            self.last[name] = value


def node_figures(node: NodeSpec, ca_file: Path | None) -> dict[str, float]:
    """The shred and size gauges of ``node``'s /metrics and its core's resident memory; what it cannot
    read is left out."""
    figures: dict[str, float] = {}
    try:
        exposition = scrape_metrics(node.http_url, ca_file)
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                if sample.name in METRICS and not sample.labels:
                    figures[sample.name] = sample.value
                elif sample.name in PASS_METRICS and "scope" in sample.labels:
                    figures[f"{PASS_METRICS[sample.name]} {sample.labels['scope']}"] = sample.value
        for name in PASS_METRICS.values():  # a series not shown yet has counted nothing
            for scope in ("keys", "whole"):
                figures.setdefault(f"{name} {scope}", 0.0)
    except (OSError, ValueError):  # no answer, or a page cut short
        pass
    if (rss := process_rss_bytes(cluster.running_pid(node))) is not None:
        figures["core_rss_bytes"] = rss
    return figures


async def sample(spec: ClusterSpec, traces: dict[str, NodeTrace], stop: asyncio.Event) -> None:
    """Every node's figures each SAMPLE_SECONDS until ``stop`` is set."""
    while not stop.is_set():
        for node in spec.nodes:
            traces[node.node_id].add(await asyncio.to_thread(node_figures, node, spec.ca_file))
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)
        except asyncio.TimeoutError:
            pass


async def tokenize_pool(client: AsyncClient, count: int, prefix: str) -> list[str]:
    """``count`` fresh values tokenized, POOL_CONCURRENCY requests of POOL_REQUEST_VALUES in flight."""
    starts = iter(range(0, count, POOL_REQUEST_VALUES))
    tokens: list[str] = []

    async def sender() -> None:
        for start in starts:
            values = [f"{prefix}-{number}" for number in range(start, min(start + POOL_REQUEST_VALUES, count))]
            tokens.extend((await client.tokenize(values)).tokens)

    await asyncio.gather(*(sender() for _ in range(POOL_CONCURRENCY)))
    return tokens


@dataclass
class DeleteStream:
    acknowledged: int = 0
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0


async def delete_stream(spec: ClusterSpec, tokens: list[str], rate: int, batch: int,
                        stop: asyncio.Event) -> DeleteStream:
    """Deletes of ``batch`` of ``tokens`` at ``rate`` tokens a second until ``stop`` or the tokens run
    out, DELETES_IN_FLIGHT at most, each to the next node in turn."""
    result = DeleteStream()
    ca_file = str(spec.ca_file) if spec.ca_file else None
    clients = [AsyncClient([url], spec.key("full"), deadline_seconds=30, ca_file=ca_file) for url in spec.http_urls]
    slots = asyncio.Semaphore(DELETES_IN_FLIGHT)
    pending: set[asyncio.Task[None]] = set()

    async def send(client: AsyncClient, chunk: list[str]) -> None:
        started = time.perf_counter()
        try:
            await client.delete_tokens(chunk)
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            result.acknowledged += 1
            result.tokens += len(chunk)
        except Exception as error:  # counted and reported: the stream goes on
            result.errors[type(error).__name__] = result.errors.get(type(error).__name__, 0) + 1
        finally:
            slots.release()

    started = time.perf_counter()
    sent = 0
    try:
        while not stop.is_set() and sent + batch <= len(tokens):
            if sent + batch > rate * (time.perf_counter() - started):
                await asyncio.sleep(0.005)
                continue
            await slots.acquire()
            chunk = tokens[sent:sent + batch]
            task = asyncio.create_task(send(clients[(sent // batch) % len(clients)], chunk))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += batch
        await asyncio.gather(*pending)
    finally:
        result.seconds = time.perf_counter() - started
        for client in clients:
            await client.close()
    return result


def run_load(cluster_json: Path, arguments: argparse.Namespace, seconds: float) -> str:
    """bench/loadgen.py ``run``: its report line (with the CPU lines under it)."""
    command = [sys.executable, str(BENCH / "loadgen.py"), "run", "--cluster-json", str(cluster_json),
               "--mode", "tokenize", "--batch", str(arguments.load_batch), "--concurrency",
               str(arguments.concurrency), "--duration", str(seconds), "--warmup", str(LOAD_WARMUP_SECONDS),
               "--client", "raw"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 600)
    if done.returncode != 0:
        raise SystemExit(f"the load failed ({done.returncode}): {done.stderr[-2000:]}")
    lines = done.stdout.splitlines()
    return "\n".join(lines[1:]) if len(lines) > 1 else done.stdout


def shred_lines(node: NodeSpec, offset: int) -> list[dict[str, object]]:
    """The node's ``shred.done`` and ``shred.pass`` lines logged after byte ``offset`` of its log."""
    lines = []
    try:
        with node.log_file.open("rb") as handle:
            handle.seek(offset)
            for raw in handle:
                if b'"shred.' not in raw:
                    continue
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if line.get("event") in ("shred.done", "shred.pass"):
                    lines.append(line)
    except OSError:
        pass
    return lines


def log_size(node: NodeSpec) -> int:
    try:
        return node.log_file.stat().st_size
    except OSError:
        return 0


def describe_node(node_id: str, role: str, trace: NodeTrace, lines: list[dict[str, object]]) -> str:
    def grew(name: str) -> float:
        return trace.last.get(name, 0.0) - trace.first.get(name, 0.0)

    passes = {scope: grew(f"passes {scope}") for scope in ("keys", "whole")}
    seconds = sum(grew(f"pass seconds {scope}") for scope in ("keys", "whole"))
    logged = [float(line["store_seconds"]) for line in lines if "store_seconds" in line]  # type: ignore[arg-type]
    count = sum(passes.values())
    timing = (f"{seconds / count:.1f} s a pass on average, {seconds:.0f} s in all"
              + (f", the longest logged {max(logged):.1f} s" if logged else "")) if count else "no pass"

    def megabytes(which: dict[str, float], name: str) -> str:
        return f"{which[name] / 1e6:,.0f}" if name in which else "?"

    return (f"  {node_id} ({role}): backlog at most {trace.largest.get('tokenvault_shred_backlog_rows', 0):,.0f} rows, "
            f"oldest delete waited at most {trace.largest.get('tokenvault_shred_oldest_wait_seconds', 0):.1f} s; "
            f"{count:.0f} shred passes ({passes['whole']:.0f} of the whole key space), {timing}\n"
            f"      write-ahead log {megabytes(trace.first, 'tokenvault_wal_segment_bytes')} MB at the start, "
            f"{megabytes(trace.largest, 'tokenvault_wal_segment_bytes')} at most, "
            f"{megabytes(trace.last, 'tokenvault_wal_segment_bytes')} after; table files "
            f"{megabytes(trace.first, 'tokenvault_store_table_bytes')} / "
            f"{megabytes(trace.largest, 'tokenvault_store_table_bytes')} / "
            f"{megabytes(trace.last, 'tokenvault_store_table_bytes')} MB; core memory "
            f"{megabytes(trace.first, 'core_rss_bytes')} MB at the start, "
            f"{megabytes(trace.largest, 'core_rss_bytes')} at most")


async def drain(spec: ClusterSpec, traces: dict[str, NodeTrace], limit_seconds: float) -> float | None:
    """Seconds until no node has a delete waiting (twice in a row), or None past ``limit_seconds``."""
    started = time.perf_counter()
    clear_in_a_row = 0
    while time.perf_counter() - started < limit_seconds:
        waiting = False
        for node in spec.nodes:
            figures = await asyncio.to_thread(node_figures, node, spec.ca_file)
            traces[node.node_id].add(figures)
            waiting |= figures.get("tokenvault_shred_oldest_wait_seconds", 1.0) > 0
        clear_in_a_row = 0 if waiting else clear_in_a_row + 1
        if clear_in_a_row == 2:
            return time.perf_counter() - started
        await asyncio.sleep(SAMPLE_SECONDS)
    return None


async def one_rate(spec: ClusterSpec, cluster_json: Path, arguments: argparse.Namespace, rate: int) -> None:
    ca_file = str(spec.ca_file) if spec.ca_file else None
    async with AsyncClient(list(spec.http_urls), spec.key("full"), deadline_seconds=60, ca_file=ca_file) as client:
        made = time.perf_counter()
        tokens = await tokenize_pool(client, rate * int(arguments.seconds), f"shred-serving-{os.urandom(4).hex()}")
    print(f"{rate:,} deletes a second of {arguments.delete_batch} tokens for {arguments.seconds:g} s "
          f"({len(tokens):,} tokens to delete, tokenized in {time.perf_counter() - made:.0f} s); "
          f"tokenize load of {arguments.load_batch} value(s) a request, concurrency {arguments.concurrency}:",
          flush=True)
    if not arguments.no_baseline:
        print("  alone:        " + await asyncio.to_thread(run_load, cluster_json, arguments, arguments.seconds),
              flush=True)
    traces = {node.node_id: NodeTrace() for node in spec.nodes}
    offsets = {node.node_id: log_size(node) for node in spec.nodes}
    stop_sampling, stop_deleting = asyncio.Event(), asyncio.Event()
    sampler = asyncio.create_task(sample(spec, traces, stop_sampling))
    deleter = asyncio.create_task(delete_stream(spec, tokens, rate, arguments.delete_batch, stop_deleting))
    await asyncio.sleep(LOAD_WARMUP_SECONDS)  # the deletes run through the load's warm-up and window
    load = await asyncio.to_thread(run_load, cluster_json, arguments, arguments.seconds - LOAD_WARMUP_SECONDS)
    stop_deleting.set()
    deletes = await deleter
    stop_sampling.set()
    await sampler
    drained = await drain(spec, traces, arguments.drain_seconds)
    print("  with deletes: " + load, flush=True)
    latency = Measurement(latencies_ms=deletes.latencies_ms)
    errors = ", ".join(f"{kind}: {count}" for kind, count in sorted(deletes.errors.items())) or "none"
    print(f"  deletes: {deletes.acknowledged:,} requests acknowledged ({deletes.tokens:,} tokens, "
          f"{deletes.tokens / max(deletes.seconds, 1e-9):,.0f} a second), latency p50 "
          f"{latency.percentile_ms(0.5):.1f} ms, p99 {latency.percentile_ms(0.99):.1f} ms, "
          f"max {max(deletes.latencies_ms, default=0):.1f} ms; errors {errors}", flush=True)
    statuses = await asyncio.to_thread(cluster.cluster_status, spec)
    primary = cluster.primary_of(statuses)
    for node in spec.nodes:
        role = "primary" if node.node_id == primary else "backup"
        print(describe_node(node.node_id, role, traces[node.node_id], shred_lines(node, offsets[node.node_id])),
              flush=True)
    print("  " + (f"every node's deletes shredded {drained:.0f} s after the stream" if drained is not None
                  else f"deletes still waiting {arguments.drain_seconds:.0f} s after the stream"), flush=True)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster-json", type=Path, required=True, help="a running cluster's cluster.json")
    parser.add_argument("--rates", default="1000,4000", help="comma-separated deleted tokens a second")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long each stream and load run")
    parser.add_argument("--delete-batch", type=int, default=100, help="tokens a delete request")
    parser.add_argument("--load-batch", type=int, default=1, help="values a tokenize request of the load")
    parser.add_argument("--concurrency", type=int, default=16, help="tokenize requests of the load in flight")
    parser.add_argument("--no-baseline", action="store_true", help="skip the load run without deletes")
    parser.add_argument("--drain-seconds", type=float, default=DRAIN_SECONDS,
                        help="the longest to wait after the stream for every node's deletes to be shredded")
    arguments = parser.parse_args(argv)
    rates = [int(part) for part in arguments.rates.split(",")]
    if min(rates) < 1 or arguments.seconds <= LOAD_WARMUP_SECONDS + 1 or not 1 <= arguments.delete_batch <= 1000:
        parser.error(f"rates must be at least 1, the seconds over {LOAD_WARMUP_SECONDS + 1:g}, "
                     "the delete batch 1 to 1,000")
    spec = cluster.load_cluster(arguments.cluster_json.parent)
    for rate in rates:
        await one_rate(spec, arguments.cluster_json, arguments, rate)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
