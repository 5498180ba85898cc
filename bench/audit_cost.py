"""What the audit trail costs a detokenize: the same load against a fresh 3-node cluster with the
audit trail on (the default) and off (`[audit] enabled = false`, for measurement only).

    .venv/bin/python bench/audit_cost.py --batch 10 --concurrency 64 --duration 10 --rounds 2

Each round starts one cluster of each kind in a temporary directory (in alternating order, since
the machine's speed drifts), tokenizes a pool of values, then runs `loadgen.py`'s detokenize
workers against all three nodes round-robin and prints one line per run and the ratio. It
measures and prints; nothing asserts on its numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
from pathlib import Path

from loadgen import VaultTarget, Workload, drive, free_ports, read_pids, report_line

from tokenvault.devcluster import cluster
from tokenvault.client.vault import AsyncClient
from tokenvault.config import AuditConfig, load_config, write_node_config

NODES = 3


def _create(directory: Path, audit: bool) -> None:
    port_list = free_ports(2 * NODES)
    ports = [(port_list[2 * number], port_list[2 * number + 1]) for number in range(NODES)]
    spec, _ = cluster.init_cluster(directory, NODES, ports=ports)
    for node in spec.nodes:
        config = load_config(node.config)
        write_node_config(node.config, dataclasses.replace(config, audit=AuditConfig(enabled=audit)))


async def _measure(arguments: argparse.Namespace, audit: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="tokenvault-audit-bench-") as temporary:
        directory = Path(temporary) / "cluster"
        try:
            await asyncio.to_thread(_create, directory, audit)
            spec, _ = await asyncio.to_thread(cluster.start_cluster, directory, timeout_seconds=60)
            # The first primary creates epoch 1 just after the election: wait for a tokenize to work.
            ca_file = str(spec.ca_file) if spec.ca_file else None  # None: plain HTTP (TOKENVAULT_TLS=false)
            async with AsyncClient(list(spec.http_urls), spec.key("full"), deadline_seconds=30,
                                   ca_file=ca_file) as client:
                await client.tokenize(["warm-up"])
            target = VaultTarget(list(spec.http_urls), spec.key("full"), arguments.seed, ca_file)
            await target.fill_pool(max(arguments.pool, arguments.batch))
            workload = Workload("vault", "detokenize", tuple(target.urls), arguments.batch, spec.key("full"),
                                ca_file, seed=arguments.seed, pool=tuple(target.pool))
            measurement = await drive(workload, arguments.concurrency, arguments.duration, arguments.warmup,
                                      arguments.client, read_pids(node.pid_file for node in spec.nodes),
                                      processes=arguments.client_processes)
            print(report_line(f"detokenize x{arguments.batch} audit {'on' if audit else 'off'}", measurement),
                  flush=True)
            return measurement.requests / (measurement.window_seconds or 1.0)
        finally:
            if (directory / cluster.CLUSTER_FILE_NAME).exists():
                await asyncio.to_thread(cluster.stop_cluster, directory, 10)


async def main(arguments: argparse.Namespace) -> int:
    print(f"3-node cluster, detokenize {arguments.batch} token(s)/request, concurrency {arguments.concurrency}, "
          f"{arguments.duration:g} s after {arguments.warmup:g} s warm-up, {arguments.client} client in "
          f"{arguments.client_processes} process(es)", flush=True)
    ratios = []
    for round_number in range(1, arguments.rounds + 1):
        order = (True, False) if round_number % 2 else (False, True)
        rates = {audit: await _measure(arguments, audit) for audit in order}
        ratios.append(rates[True] / rates[False] if rates[False] else float("nan"))
        print(f"round {round_number}: audited / unaudited throughput = {ratios[-1]:.2f}", flush=True)
    return 0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--pool", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--client", choices=("aiohttp", "raw"), default="raw")
    parser.add_argument("--client-processes", type=int, default=1, metavar="N",
                        help="load generator processes sharing --concurrency (see loadgen.py)")
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_arguments())))
