"""The client history of a simulated run is checked for linearizability (client_history.py), and the check bites.

The sweep (test_sim_sweep.py) runs the check at the end of every seed's steps;
these tests show that it catches a stale read on its own, and that a search
too large to finish is a failure, never a pass.
"""

from __future__ import annotations

import pytest

import client_history
from broken_replicas import ReadsWithoutQuorumRound
from simulator import Simulation, SimulationConfig, SimulationFailure

# The seed among 0..399 of the sweep on which reads answered without the quorum round come back stale
# (tests/sim/mutant_table.py --only 'reads answered without the quorum round', 2026-12-05).
STALE_READ_SEED = 347


def test_history_check_alone_catches_a_stale_read(replay_seed: int | None) -> None:
    """With the per-read real-time check switched off, the linearizability check at the end of the
    run still refuses the history in which a primary answered a read without its quorum round."""
    if replay_seed is not None:
        pytest.skip("--seed replays the sweep only")
    simulation = Simulation(STALE_READ_SEED, SimulationConfig.from_seed(STALE_READ_SEED), ReadsWithoutQuorumRound)
    simulation.check_reads_in_real_time = False
    with pytest.raises(SimulationFailure, match="not linearizable") as failure:
        simulation.run()
    assert "missed it" in str(failure.value) and "step 2000" in str(failure.value)
    # The same seed with the real replica: reads, writes and a history that passes.
    real = Simulation(STALE_READ_SEED, SimulationConfig.from_seed(STALE_READ_SEED)).run()
    assert real.history_reads and real.history_registers_checked >= 20


def test_real_time_check_catches_the_same_stale_read_first() -> None:
    """With both checks on, the per-read check fires at the step of the stale answer, before the end."""
    simulation = Simulation(STALE_READ_SEED, SimulationConfig.from_seed(STALE_READ_SEED), ReadsWithoutQuorumRound)
    with pytest.raises(SimulationFailure, match="stale read"):
        simulation.run()
    assert simulation.step_number < simulation.config.steps


def test_a_search_that_outgrows_its_bound_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    simulation = Simulation(STALE_READ_SEED, SimulationConfig.from_seed(STALE_READ_SEED, steps=600))
    for _ in range(simulation.config.steps):
        simulation.step()
    assert simulation.history_writes
    simulation.check_linearizable_history()  # within the bound: passes
    monkeypatch.setattr(client_history, "MAX_SEARCH_STATES", 0)
    with pytest.raises(SimulationFailure, match="linearizability undecided"):
        simulation.check_linearizable_history()


def test_an_unacknowledged_write_may_or_may_not_be_seen() -> None:
    """A write never answered stays open: reads that saw it and reads that did not both linearize."""
    simulation = Simulation(1, SimulationConfig(cluster_size=1, steps=0))
    simulation.record_write_invoked(b"open")
    simulation.committed[1] = (1, b"open")
    for node_id, request_id, read_index in (("n1", 1, 0), ("n1", 2, 1), ("n1", 3, 1)):
        simulation.record_read_invoked(node_id, request_id)
        simulation.record_read_confirmed(node_id, request_id, read_index)
    assert simulation.linearizability_violations() == []
    # A write acknowledged before a read started, which then missed it (read index 1, the write at 2): refused.
    simulation.record_write_invoked(b"acked")
    simulation.committed[2] = (1, b"acked")
    simulation.record_write_acknowledged(b"acked")
    simulation.record_read_invoked("n1", 4)
    simulation.record_read_confirmed("n1", 4, 1)
    violations = simulation.linearizability_violations()
    assert len(violations) == 1 and violations[0].startswith("not linearizable: token b'acked'"), violations
