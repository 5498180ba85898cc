"""Random faults under load, on real processes: the guarantees of docs/guarantees.md hold through any
mix of them, not only through the one fault each other test makes.

While eight clients tokenize overlapping batches through every node and read back what they got, a
nemesis picks, every 0.3-1.5 s, one of: SIGKILL a whole node (restarted 0.5-3 s later), SIGKILL one
HTTP worker of a node (its core starts another), SIGSTOP a node for 0.2-1.5 s, or rotate the epoch
through a node. At most one node is down or stopped at a time, so a majority is always there to
serve. At the end every node is back and the recorded history is checked on every node (tests/
integration/history.py: nothing acknowledged lost, no token on two values, no value with two tokens in
one epoch, no read that missed a write acknowledged before it began), writes are acknowledged again,
and no node logged `node.fatal`.

``TOKENVAULT_SOAK_SECONDS`` sets how long the faults go on (default 20 s in the test run; a longer run
is the same test), ``TOKENVAULT_SOAK_SEED`` replays one sequence of faults (the seed is printed).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import ClusterHarness, RecordingClient, background_load, wait_for_acknowledged
from history import History, Kind
from test_failover import assert_history_holds, value_pool

# The /proc walk lives with the in-process node helpers, beside the unit tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from node_support import child_pids  # noqa: E402

pytestmark = pytest.mark.integration

SOAK_SECONDS = float(os.environ.get("TOKENVAULT_SOAK_SECONDS", "20"))
FAULT_GAP_SECONDS = (0.3, 1.5)
DOWN_SECONDS = (0.5, 3.0)
PAUSE_SECONDS = (0.2, 1.5)
ACTIONS = ("kill_node", "kill_worker", "pause_node", "rotate")
# After the faults: writes acknowledged again within this long of every node being back.
RECOVERY_SECONDS = 15.0


def _worker_pids(core_pid: int) -> list[int]:
    workers = []
    for child in child_pids(core_pid):
        try:
            command = (Path("/proc") / str(child) / "cmdline").read_bytes()
        except OSError:
            continue
        if b"tokenvault.api.worker" in command:
            workers.append(child)
    return workers


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
        action = self.rng.choice(ACTIONS)
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
        elif action == "kill_worker":
            pid = self.harness.pid(node)
            workers = _worker_pids(pid) if pid is not None else []
            if workers:
                victim = self.rng.choice(workers)
                try:
                    os.kill(victim, signal.SIGKILL)
                    self.note(f"SIGKILL worker {victim} of {node}")
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


async def test_random_kills_pauses_worker_kills_and_rotations_under_load_lose_nothing(
        make_cluster: Callable[..., ClusterHarness]) -> None:
    seed = int(os.environ.get("TOKENVAULT_SOAK_SEED", str(random.randrange(2**32))))
    print(f"soak seed {seed} ({SOAK_SECONDS:.0f} s of faults); replay with TOKENVAULT_SOAK_SEED={seed}")
    rng = random.Random(seed)
    harness = make_cluster()
    history = History()
    nemesis = Nemesis(harness, history, rng)
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
    print("faults made:\n" + "\n".join(nemesis.done))
    assert any(line.split("  ", 1)[1].startswith("SIGKILL node") for line in nemesis.done) or SOAK_SECONDS < 10
    assert history.acknowledged(Kind.TOKENIZE), history.summary()
    await assert_history_holds(harness, history, harness.node_ids)
    for node in harness.node_ids:
        assert harness.find_events(node, "node.fatal") == [], node
