"""Random faults under load, on real processes: the guarantees of docs/guarantees.md hold through any
mix of them, not only through the one fault each other test makes.

While eight clients tokenize overlapping batches through every node and read back what they got, a
nemesis picks, every 0.3-1.5 s, one of: SIGKILL a whole node (restarted 0.5-3 s later), SIGKILL one
HTTP worker of a node (its core starts another), SIGKILL a node's sealer helper (the node seals in its
own process from then on), SIGSTOP a node for 0.2-1.5 s, or rotate the epoch through a node. Its first
fault always kills a node. At most one node is down or stopped at a time, so a majority is always
there to serve.

Beside them, a ninth client tokenizes fresh values with an Idempotency-Key and sends each request
again, with the same key, until it has three answers: every answer to one key must be the first one
(same epoch, same tokens), the later ones marked replayed, across the failovers and rotations between
them (docs/guarantees.md, idempotency). A tenth tokenizes fresh pairs of values (every other pair
with a TTL of an hour) and deletes the first token of each pair, again until the delete is
acknowledged.

At the end every node is back, and: the recorded history holds on every node
(tests/integration/history.py: nothing acknowledged lost, no token on two values, no value with two
tokens in one epoch, no read that missed a write acknowledged before it began); every node answers
null for every deleted token and the value for every other; writes are acknowledged again; and no
node logged `node.fatal`, nor took a member for one that lost entries it acknowledged
(`replica.backup_lost_entries`, `replica.member_below_floor`: false alarms here).

``TOKENVAULT_SOAK_SECONDS`` sets how long the faults go on (default 20 s in the test run; a longer run
is the same test), ``TOKENVAULT_SOAK_SEED`` replays one sequence of faults (the seed is printed),
``TOKENVAULT_SOAK_NODES`` the cluster's size (3; or 5).

The nodes compact their logs every ``COMPACT_EVERY_ENTRIES`` applied entries and keep only the last
``COMPACT_KEEP_ENTRIES``, so a node that was down for a second or two usually comes back behind the
primary's log and catches up from a snapshot, often one that may hold rows deleted and not yet
shredded (docs/architecture.md, "Snapshots"); the test prints how many snapshots each node installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from harness import ClusterHarness, RecordingClient, background_load, fast_settings, wait_for_acknowledged
from history import History, Kind
from tokenvault.client.vault import AsyncClient, NoNodeAvailable, ProblemError, TokenizeResult
from tokenvault.config import WalConfig
from test_failover import assert_history_holds, value_pool

# The /proc walk lives with the in-process node helpers, beside the unit tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from node_support import children_running  # noqa: E402

pytestmark = pytest.mark.integration

SOAK_SECONDS = float(os.environ.get("TOKENVAULT_SOAK_SECONDS", "20"))
SOAK_NODES = int(os.environ.get("TOKENVAULT_SOAK_NODES", "3"))
FAULT_GAP_SECONDS = (0.3, 1.5)
DOWN_SECONDS = (0.5, 3.0)
PAUSE_SECONDS = (0.2, 1.5)
ACTIONS = ("kill_node", "kill_worker", "kill_sealer", "pause_node", "rotate")
# After the faults: writes acknowledged again within this long of every node being back.
RECOVERY_SECONDS = 15.0
# Answers the idempotent client collects per key (the first, then replays).
ANSWERS_PER_KEY = 3
DETOKENIZE_ITEMS = 500  # tokens per detokenize of the final checks (under the node's max_items)
# Short logs: a node back from a kill is usually behind the compacted log and installs a snapshot.
COMPACT_EVERY_ENTRIES = 200
COMPACT_KEEP_ENTRIES = 50


class Nemesis:
    """The faults, one at a time, with what it did written down for the failure message."""

    def __init__(self, harness: ClusterHarness, history: History, rng: random.Random) -> None:
        self.harness = harness
        self.history = history
        self.rng = rng
        self.down: dict[str, float] = {}  # node -> when to restart it (monotonic)
        self.done: list[str] = []
        self.started = time.monotonic()

    def note(self, what: str) -> None:
        self.done.append(f"{time.monotonic() - self.started:6.2f} s  {what}")

    async def step(self) -> None:
        await self.restart_due()
        healthy = [node for node in self.harness.node_ids if node not in self.down]
        # The first fault kills a node, so that even a short run has one; the rest are drawn.
        action = self.rng.choice(ACTIONS) if self.done else "kill_node"
        node = self.rng.choice(healthy)
        if action == "kill_node" and not self.down:
            await asyncio.to_thread(self.harness.kill, node)
            self.down[node] = time.monotonic() + self.rng.uniform(*DOWN_SECONDS)
            self.note(f"SIGKILL node {node}")
        elif action == "pause_node" and not self.down:
            pause = self.rng.uniform(*PAUSE_SECONDS)
            self.harness.pause(node)
            self.note(f"SIGSTOP node {node} for {pause:.2f} s")
            try:
                await asyncio.sleep(pause)
            finally:
                self.harness.resume(node)
        elif action in ("kill_worker", "kill_sealer"):
            pid = self.harness.pid(node)
            module = b"tokenvault.api.worker" if action == "kill_worker" else b"tokenvault.core.sealer"
            children = children_running(pid, module) if pid is not None else []
            if children:
                victim = self.rng.choice(children)
                try:
                    os.kill(victim, signal.SIGKILL)
                    self.note(f"SIGKILL {module.decode().rsplit('.', 1)[1]} {victim} of {node}")
                except ProcessLookupError:
                    pass
        elif action == "rotate":
            admin = RecordingClient(self.history, "admin", self.harness.client(node, timeout_seconds=2.0,
                                                                              deadline_seconds=3.0), node)
            try:
                rotation = await admin.rotate()
            finally:
                await admin.close()
            self.note(f"rotate through {node}: {'epoch ' + str(rotation.epoch) if rotation else 'no answer'}")

    async def restart_due(self, all_of_them: bool = False) -> None:
        for node, due in sorted(self.down.items()):
            if all_of_them or time.monotonic() >= due:
                await asyncio.to_thread(self.harness.restart, node)
                del self.down[node]
                self.note(f"restarted {node}")

    async def heal(self) -> None:
        for node in list(self.harness.paused):
            self.harness.resume(node)
        await self.restart_due(all_of_them=True)


@contextlib.asynccontextmanager
async def client_with_marker(harness: ClusterHarness) -> AsyncIterator[tuple[AsyncClient, str]]:
    """A client over every node and a marker that keeps its values apart from every other client's."""
    client = harness.client(None, timeout_seconds=2.0, deadline_seconds=4.0)
    try:
        yield client, uuid.uuid4().hex[:10]
    finally:
        await client.close()


async def idempotent_requests(harness: ClusterHarness, stop: asyncio.Event, rng: random.Random,
                              answers: dict[str, tuple[list[str], list[TokenizeResult]]]) -> None:
    """Fresh values under a fresh key, sent again and again with that key until ANSWERS_PER_KEY
    answers came back; ``answers``: key -> (values, answers in order)."""
    async with client_with_marker(harness) as (client, marker):
        for number in itertools.count(1):
            if stop.is_set():
                return
            key = f"soak-{marker}-{number}"
            values = [f"idempotent-{marker}-{number}-{item}" for item in range(2)]
            answers[key] = (values, [])
            while len(answers[key][1]) < ANSWERS_PER_KEY and not stop.is_set():
                try:
                    answers[key][1].append(await client.tokenize(values, idempotency_key=key))
                except (ProblemError, NoNodeAvailable):
                    pass  # no answer (or 409 while the first is in flight, 503): the same key again
                await asyncio.sleep(rng.uniform(0.0, 0.5))


async def deletes(harness: ClusterHarness, stop: asyncio.Event, rng: random.Random,
                  deleted: list[str], kept: dict[str, str]) -> None:
    """Fresh pairs tokenized, the first of each deleted (retried until acknowledged); ``deleted``: the
    tokens whose delete was acknowledged, ``kept``: token -> value of the others."""
    async with client_with_marker(harness) as (client, marker):
        for number in itertools.count(1):
            if stop.is_set():
                return
            values = [f"deleted-{marker}-{number}", f"kept-{marker}-{number}"]
            try:
                result = await client.tokenize(values, ttl_seconds=3600 if number % 2 else None)
            except (ProblemError, NoNodeAvailable):
                continue  # it may have taken effect: its tokens are left out of both lists
            kept[result.tokens[1]] = values[1]
            while not stop.is_set():
                try:
                    await client.delete_tokens([result.tokens[0]])
                    deleted.append(result.tokens[0])
                    break
                except (ProblemError, NoNodeAvailable):
                    await asyncio.sleep(rng.uniform(0.0, 0.3))


def check_idempotent_answers(answers: dict[str, tuple[list[str], list[TokenizeResult]]]) -> int:
    """Every answer to a key is its first, the later ones replayed; how many keys had two or more."""
    repeated = 0
    for key, (values, results) in answers.items():
        if not results:
            continue
        first = results[0]
        assert len(first.tokens) == len(values), key
        for later in results[1:]:
            assert (later.epoch, later.tokens) == (first.epoch, first.tokens), (key, first, later)
            assert later.replayed, (key, later)
        repeated += len(results) > 1
    return repeated


async def test_random_kills_pauses_worker_kills_and_rotations_under_load_lose_nothing(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    seed = int(os.environ.get("TOKENVAULT_SOAK_SEED", str(random.randrange(2**32))))
    print(f"soak seed {seed} ({SOAK_SECONDS:.0f} s of faults); replay with TOKENVAULT_SOAK_SEED={seed}")
    rng = random.Random(seed)
    wal = WalConfig(fsync=True, compact_every_entries=COMPACT_EVERY_ENTRIES, compact_keep_entries=COMPACT_KEEP_ENTRIES)
    harness = make_cluster(nodes=SOAK_NODES, settings=dataclasses.replace(fast_settings(), wal=wal))
    history = History()
    nemesis = Nemesis(harness, history, rng)
    answers: dict[str, tuple[list[str], list[TokenizeResult]]] = {}
    deleted: list[str] = []
    kept: dict[str, str] = {}
    stop_idempotent = asyncio.Event()
    idempotent = asyncio.gather(idempotent_requests(harness, stop_idempotent, random.Random(seed + 1), answers),
                                deletes(harness, stop_idempotent, random.Random(seed + 2), deleted, kept))
    try:
        async with background_load(harness, history, value_pool("soak", 64), workers=8, batch_items=4,
                                   seed=seed % 1000, timeout_seconds=2.0, deadline_seconds=6.0):
            await wait_for_acknowledged(history, 10)
            ends = time.monotonic() + SOAK_SECONDS
            while time.monotonic() < ends:
                await nemesis.step()
                await asyncio.sleep(rng.uniform(*FAULT_GAP_SECONDS))
            await nemesis.heal()
            healed = time.monotonic()
            await asyncio.to_thread(harness.wait_for_primary)
            await wait_for_acknowledged(history, 10, since_monotonic=healed, timeout_seconds=RECOVERY_SECONDS)
    except BaseException:
        print("faults made:\n" + "\n".join(nemesis.done))
        raise
    finally:
        stop_idempotent.set()
        await idempotent
    print("faults made:\n" + "\n".join(nemesis.done))
    assert any("SIGKILL node" in line for line in nemesis.done), nemesis.done
    assert history.acknowledged(Kind.TOKENIZE), history.summary()
    await assert_history_holds(harness, history, harness.node_ids)
    repeated = check_idempotent_answers(answers)
    print(f"idempotent keys: {len(answers)}, answered more than once: {repeated}")
    assert repeated >= 3, answers
    async with harness.node_clients(harness.node_ids, deadline_seconds=10.0) as clients:
        for key, (values, results) in answers.items():
            if results:
                for node, client in clients.items():
                    assert await client.detokenize(results[0].tokens) == tuple(values), (key, node)
        print(f"deleted tokens: {len(deleted)}, kept: {len(kept)}")
        assert deleted and kept
        kept_tokens = list(kept)
        for node, client in clients.items():
            for start in range(0, max(len(deleted), len(kept_tokens)), DETOKENIZE_ITEMS):
                some_deleted = deleted[start:start + DETOKENIZE_ITEMS]
                some_kept = kept_tokens[start:start + DETOKENIZE_ITEMS]
                if some_deleted:
                    assert await client.detokenize(some_deleted) == (None,) * len(some_deleted), node
                if some_kept:
                    assert await client.detokenize(some_kept) == tuple(kept[token] for token in some_kept), node
    for node in harness.node_ids:
        assert harness.find_events(node, "node.fatal") == [], node
        # No member lost what it acknowledged here (a SIGKILL keeps what was fsynced): a report of lost
        # entries, by the primary or by a member's floor, would be a false alarm.
        for event in ("replica.backup_lost_entries", "replica.member_below_floor"):
            assert harness.find_events(node, event) == [], (node, event)
    installs = {node: [("keys", event["shred_keys"]) if event.get("shred_keys") is not None
                       else "whole" if event.get("shred_pending") else "clean"
                       for event in harness.find_events(node, "snapshot.installed")]
                for node in harness.node_ids}
    # Each install: clean, or what its node shreds after it (the keys its manifest listed, or its whole store).
    print("snapshots installed:", installs)
