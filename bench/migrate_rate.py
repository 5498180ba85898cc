"""How fast `tokenvault admin epoch migrate` moves an epoch: a fresh 3-node cluster, an epoch filled with
opaque tokens (some with a TTL and metadata) and card tokens, a rotation, then the migration timed.

    .venv/bin/python bench/migrate_rate.py --values 20000 --cards 2000 --batch-size 500

Prints one line: tokens migrated, seconds, tokens per second, and how the epoch was filled; then how many
times an event loop of the cluster (a node's core or one of its HTTP workers) was held past 10, 25 and
50 ms during the migration (tokenvault_event_loop_stall_seconds, read before and after); then each node
core's peak and current memory and its data directory's size, for runs of growing epochs. Run it from
two checkouts (PYTHONPATH=<checkout>) to compare versions on one machine. It measures and prints;
nothing asserts on its numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fill import scrape_metrics, stall_figures
from loadgen import free_ports

from tokenvault.client.vault import AsyncClient
from tokenvault.devcluster import cluster

NODES = 3
REQUEST_ITEMS = 500
FILL_CONCURRENCY = 8
STALL_THRESHOLDS_SECONDS = (0.01, 0.025, 0.05)  # bucket bounds of tokenvault_event_loop_stall_seconds
METRICS_MAX_AGE_SECONDS = 1.0  # a node's /metrics page may be this old


def _luhn_complete(partial: str) -> str:
    """``partial`` with the check digit that makes it Luhn-valid (a card number to tokenize)."""
    for check in "0123456789":
        digits = [int(digit) for digit in partial + check][::-1]
        total = sum(digit if position % 2 == 0 else (digit * 2 - 9 if digit * 2 > 9 else digit * 2)
                    for position, digit in enumerate(digits))
        if total % 10 == 0:
            return partial + check
    raise AssertionError("unreachable")


async def _fill(client: AsyncClient, values: int, cards: int, seed: str, with_life: bool) -> None:
    """The epoch's tokens, FILL_CONCURRENCY requests of REQUEST_ITEMS values in flight (large epochs fill
    in minutes, not hours); every other plain request with a TTL and metadata when ``with_life``."""
    requests: list[tuple[list[str], dict[str, object]]] = []
    plain = [f"migrate-{seed}-{number}" for number in range(values)]
    for start in range(0, len(plain), REQUEST_ITEMS):
        with_ttl = with_life and (start // REQUEST_ITEMS) % 2 == 1
        life = {"ttl_seconds": 86400, "metadata": {"batch": start}} if with_ttl else {}
        requests.append((plain[start:start + REQUEST_ITEMS], life))
    numbers = [_luhn_complete(f"4{number:014d}") for number in range(cards)]
    for start in range(0, len(numbers), REQUEST_ITEMS):
        requests.append((numbers[start:start + REQUEST_ITEMS], {"token_format": "card"}))
    pending = iter(requests)

    async def sender() -> None:
        for chunk, options in pending:
            await client.tokenize(chunk, **options)  # type: ignore[arg-type]

    await asyncio.gather(*(sender() for _ in range(FILL_CONCURRENCY)))


def _stalls_over(spec: cluster.ClusterSpec) -> dict[str, dict[float, float]]:
    """Event-loop stalls past each threshold so far, per node and process kind ("n1 core", "n1 workers")."""
    totals: dict[str, dict[float, float]] = {}
    for node in spec.nodes:
        exposition = scrape_metrics(node.http_url, spec.ca_file)
        for kind, workers in (("core", False), ("workers", True)):
            figures = stall_figures(exposition, STALL_THRESHOLDS_SECONDS, workers)
            totals[f"{node.node_id} {kind}"] = dict.fromkeys(STALL_THRESHOLDS_SECONDS, 0.0) | (
                figures[0] if figures is not None else {})
    return totals


async def _prepare(directory: Path, arguments: argparse.Namespace) -> cluster.ClusterSpec:
    port_list = free_ports(2 * NODES)
    ports = [(port_list[2 * number], port_list[2 * number + 1]) for number in range(NODES)]
    await asyncio.to_thread(cluster.init_cluster, directory, NODES, ports=ports)
    spec, _ = await asyncio.to_thread(cluster.start_cluster, directory, timeout_seconds=60)
    ca_file = str(spec.ca_file) if spec.ca_file else None
    async with AsyncClient(list(spec.http_urls), spec.key("full"), deadline_seconds=30, ca_file=ca_file) as client:
        await client.tokenize(["warm-up"])
        await _fill(client, arguments.values, arguments.cards, os.urandom(4).hex(), not arguments.no_ttl)
        await client.rotate_epoch()
    return spec


def _memory_and_disk(spec: cluster.ClusterSpec) -> str:
    """Each node's core: its peak and current resident memory (VmHWM, VmRSS) and its data directory's
    size, so that runs of growing epochs show what grows with them."""
    parts = []
    for node in spec.nodes:
        figures = {}
        try:
            pid = int(node.pid_file.read_text().strip())
            for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in ("VmHWM", "VmRSS"):
                    figures[name] = int(value.split()[0]) // 1024
        except (OSError, ValueError, IndexError):
            pass
        disk = 0
        for path in node.data_dir.rglob("*"):
            try:
                disk += path.stat().st_size if path.is_file() else 0
            except OSError:  # a file a compaction removed meanwhile
                pass
        parts.append(f"{node.node_id} core peak {figures.get('VmHWM', '?')} MB, now {figures.get('VmRSS', '?')} MB, "
                     f"data {disk / 2**20:,.0f} MB")
    return "; ".join(parts)


def _migrate(directory: Path, batch_size: int) -> tuple[float, str]:
    command = [sys.executable, "-c", "from tokenvault.cli.main import main; main()", "admin", "epoch", "migrate",
               "1", "--batch-size", str(batch_size), "--json", "--state-file", str(directory / "migrate.json"),
               "--cluster-json", str(directory / cluster.CLUSTER_FILE_NAME)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=directory)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"migrate failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout.strip().splitlines()[-1]


async def main(arguments: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="tokenvault-migrate-bench-") as temporary:
        directory = Path(temporary) / "cluster"
        try:
            filled_at = time.perf_counter()
            spec = await _prepare(directory, arguments)
            fill_seconds = time.perf_counter() - filled_at
            time.sleep(METRICS_MAX_AGE_SECONDS)
            before = _stalls_over(spec)
            seconds, answer = await asyncio.to_thread(_migrate, directory, arguments.batch_size)
            time.sleep(METRICS_MAX_AGE_SECONDS)
            after = _stalls_over(spec)
            resources = _memory_and_disk(spec)
            primary = cluster.primary_of(cluster.cluster_status(spec))
        finally:
            if (directory / cluster.CLUSTER_FILE_NAME).exists():
                await asyncio.to_thread(cluster.stop_cluster, directory, 10)
    migrated = json.loads(answer)["migrated"]
    life = "none" if arguments.no_ttl else "half"
    print(f"3 nodes, epoch of {arguments.values} opaque ({life} with TTL and metadata) + {arguments.cards} card "
          f"tokens, batch {arguments.batch_size}: {migrated} migrated in {seconds:.1f} s = "
          f"{migrated / seconds:,.0f} tokens/s", flush=True)
    grew = {part: {threshold: after[part][threshold] - before[part][threshold]
                   for threshold in STALL_THRESHOLDS_SECONDS}
            for part in after}
    bounds = " / ".join(f"{threshold * 1000:.0f}" for threshold in STALL_THRESHOLDS_SECONDS)
    print("event-loop stalls during the migration, all nodes and processes: " + ", ".join(
        f"over {threshold * 1000:.0f} ms: {sum(counts[threshold] for counts in grew.values()):.0f}"
        for threshold in STALL_THRESHOLDS_SECONDS), flush=True)
    print(f"  by node and process kind, over {bounds} ms (primary after the migration: "
          f"{primary or 'none agreed'}): " + "; ".join(
              f"{part} " + " / ".join(f"{counts[threshold]:.0f}" for threshold in STALL_THRESHOLDS_SECONDS)
              for part, counts in grew.items()), flush=True)
    print(f"cluster started and epoch filled in {fill_seconds:.0f} s; after the migration: {resources}", flush=True)
    return 0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=20_000)
    parser.add_argument("--cards", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--no-ttl", action="store_true", help="No mapping with a TTL or metadata.")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_arguments())))
