"""Hypothesis drives the cluster simulator: it picks the faults, the simulator checks the invariants.

Where the seed sweep draws every decision from one random stream, here
Hypothesis chooses the sequence of operations (which node crashes, which
partition forms, when writes are fsynced) and shrinks any failure to a short
sequence. The invariants are those of tests/sim/simulator.py, checked after
every rule; teardown heals all faults and requires a new entry to commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sim"))
from simulator import Simulation, SimulationConfig  # noqa: E402

node_numbers = st.integers(min_value=0, max_value=4)


class ClusterMachine(RuleBasedStateMachine):
    simulation: Simulation | None = None

    @initialize(seed=st.integers(0, 2**32 - 1), size=st.sampled_from((1, 3, 5)),
                loss=st.sampled_from((0.0, 0.05, 0.3)), duplicate=st.sampled_from((0.0, 0.1)),
                delay=st.integers(0, 3), entries_per_message=st.sampled_from((1, 3, 64)),
                split=st.sampled_from((0.0, 0.3)))
    def start(self, seed: int, size: int, loss: float, duplicate: float, delay: int, entries_per_message: int,
              split: float) -> None:
        config = SimulationConfig(cluster_size=size, loss_probability=loss, duplicate_probability=duplicate,
                                  max_delay_ticks=delay, max_entries_per_message=entries_per_message,
                                  max_bytes_per_message=96, max_inflight_appends=2, split_ready_probability=split,
                                  through_codec=True)
        self.simulation = Simulation(seed, config)

    def node(self, number: int):
        assert self.simulation is not None
        return list(self.simulation.nodes.values())[number % len(self.simulation.nodes)]

    @rule(count=st.integers(1, 20))
    def deliver(self, count: int) -> None:
        for _ in range(count):
            self.simulation.deliver_one()  # type: ignore[union-attr]

    @rule(ticks=st.integers(1, 6))
    def tick(self, ticks: int) -> None:
        for _ in range(ticks):
            self.simulation.tick()  # type: ignore[union-attr]

    @rule(count=st.integers(1, 4))
    def propose(self, count: int) -> None:
        for _ in range(count):
            self.simulation.propose()  # type: ignore[union-attr]

    @rule()
    def read(self) -> None:
        self.simulation.request_read()  # type: ignore[union-attr]

    @rule(number=node_numbers)
    def crash(self, number: int) -> None:
        node = self.node(number)
        if node.replica is not None:
            self.simulation.crash(node)  # type: ignore[union-attr]

    @rule(number=node_numbers)
    def restart(self, number: int) -> None:
        node = self.node(number)
        if node.replica is None:
            self.simulation.restart(node)  # type: ignore[union-attr]

    @rule(number=node_numbers)
    def fsync(self, number: int) -> None:
        self.simulation.finish_pending(self.node(number))  # type: ignore[union-attr]

    @rule(number=node_numbers)
    def compact(self, number: int) -> None:
        node = self.node(number)
        if node.replica is not None:
            self.simulation.compact(node)  # type: ignore[union-attr]

    @rule(groups=st.lists(st.integers(0, 1), min_size=5, max_size=5))
    def partition(self, groups: list[int]) -> None:
        simulation = self.simulation
        assert simulation is not None
        simulation.partition_of = dict(zip(simulation.member_ids, groups))
        simulation.note(f"partition {groups}")

    @rule()
    def heal(self) -> None:
        self.simulation.heal()  # type: ignore[union-attr]

    @precondition(lambda self: self.simulation is not None)
    @invariant()
    def invariants_hold(self) -> None:
        self.simulation.check_step_invariants()  # type: ignore[union-attr]

    def teardown(self) -> None:
        if self.simulation is not None:
            self.simulation.check_liveness()


ClusterMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=100, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestClusterMachine = ClusterMachine.TestCase
