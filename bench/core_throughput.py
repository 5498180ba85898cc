"""Committed entries per second through three in-memory protocol.Replica instances.

No disk, no sockets: the driver loop below carries out every Ready at once
(persisting is a no-op, messages go straight to the destination's inbox), so
the figure is the cost of the replication core itself. Each driver cycle the
client proposes ``batch`` single-payload entries on the primary, then every
replica handles its Ready once; an entry counts when the primary applies it
(it is then durable on a majority and would be acknowledged to the client).

    .venv/bin/python bench/core_throughput.py [--entries N] [--payload-bytes B] [--repeat R] [--codec]

``--codec`` also encodes and decodes every message with protocol.codec, as
the TCP transport does.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import deque

from protocol import (INITIAL_HARD_STATE, ReplicaConfig, Replica, RestoredState, Role, decode_body)
from protocol.codec import encode_body

MEMBERS = ("n1", "n2", "n3")
# A run that commits nothing for this many driver cycles is stuck (a message the loop never delivers).
MAX_IDLE_CYCLES = 10_000


def build_cluster() -> dict[str, Replica]:
    empty = RestoredState(INITIAL_HARD_STATE, 0, 0, ())
    return {member: Replica(ReplicaConfig(member, MEMBERS), empty, random.Random(number))
            for number, member in enumerate(MEMBERS)}


def elect(replicas: dict[str, Replica], inboxes: dict[str, deque], applied: dict[str, int], codec: bool) -> Replica:
    primary = replicas["n1"]
    for _ in range(MAX_IDLE_CYCLES):
        if primary.role is Role.PRIMARY and primary.commit_index >= 1:
            return primary
        primary.tick()
        run_cycle(replicas, inboxes, applied, codec)
    raise RuntimeError(f"no primary with a committed entry after {MAX_IDLE_CYCLES} ticks: the driver loop is wrong")


def run_cycle(replicas: dict[str, Replica], inboxes: dict[str, deque], applied: dict[str, int], codec: bool) -> None:
    """One pass of every replica's driver: deliver its inbox, then carry out its Ready (if any)."""
    for member, replica in replicas.items():
        inbox = inboxes[member]
        while inbox:
            sender, message = inbox.popleft()
            replica.step(sender, message)
        if not replica.has_ready():
            continue
        ready = replica.ready()
        # Persisting is a no-op here, so the messages that wait for the fsync leave with the others.
        for destination, message in ready.all_messages:
            if codec:
                message = decode_body(encode_body(message))
            inboxes[destination].append((member, message))
        if ready.committed:
            applied[member] = ready.committed[-1].index
        replica.advance(ready)


def measure(entry_count: int, batch: int, payload_bytes: int, codec: bool) -> tuple[float, int]:
    replicas = build_cluster()
    inboxes: dict[str, deque] = {member: deque() for member in MEMBERS}
    applied = {member: 0 for member in MEMBERS}
    primary = elect(replicas, inboxes, applied, codec)
    payload = b"p" * payload_bytes
    first_index = primary.last_index + 1
    target_index = primary.last_index + entry_count
    started = time.perf_counter()
    idle_cycles = 0
    while applied["n1"] < target_index:
        before = applied["n1"]
        for _ in range(min(batch, target_index - primary.last_index)):
            primary.propose(payload)
        run_cycle(replicas, inboxes, applied, codec)
        idle_cycles = 0 if applied["n1"] > before else idle_cycles + 1
        if idle_cycles >= MAX_IDLE_CYCLES:
            raise RuntimeError(f"nothing committed in {MAX_IDLE_CYCLES} cycles: the driver loop is wrong")
    elapsed = time.perf_counter() - started
    return elapsed, target_index - first_index + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000, help="entries to commit per run (batch 100)")
    parser.add_argument("--payload-bytes", type=int, default=64, help="bytes of each entry's payload")
    parser.add_argument("--repeat", type=int, default=5, help="runs per setting; median and best are printed")
    parser.add_argument("--codec", action="store_true", help="encode and decode every message")
    arguments = parser.parse_args()
    print(f"three in-memory replicas, {arguments.payload_bytes}-byte payloads, "
          f"codec={'on' if arguments.codec else 'off'}, {arguments.repeat} runs per setting")
    for batch in (1, 100):
        entries = arguments.entries if batch > 1 else max(1, arguments.entries // 10)
        rates = []
        for _ in range(max(1, arguments.repeat)):
            elapsed, committed = measure(entries, batch, arguments.payload_bytes, arguments.codec)
            rates.append(committed / elapsed)
        print(f"payloads per proposal batch {batch:>3}: {entries:>7} entries per run, committed entries/s "
              f"median {statistics.median(rates):>9,.0f}, best {max(rates):>9,.0f}")


if __name__ == "__main__":
    main()
