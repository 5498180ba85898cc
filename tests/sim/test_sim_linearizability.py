"""The client history of a simulated run is checked for linearizability (client_history.py), and the check bites.

The sweep (test_sim_sweep.py) runs the check at the end of every seed's steps;
these tests show that it catches a stale read on its own, and that a search
too large to finish is a failure, never a pass.
"""

from __future__ import annotations

import random

import pytest

import client_history
from linearizability import is_linearizable, register_step
from broken_replicas import ReadsWithoutQuorumRound
from simulator import Simulation, SimulationConfig, SimulationFailure

# The only seed of 0..399 of the sweep on which the per-read check catches the replica that answers reads
# without the quorum round ("stale read"; found 2026-12-05 by running that mutant over those seeds).
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


def _verdicts(history: client_history.ClientHistory) -> tuple[dict[bytes, bool], dict[bytes, bool]]:
    """Per token: (the search over every read, the search over the binding reads only)."""
    def verdicts(every_read: bool) -> dict[bytes, bool]:
        return {payload: is_linearizable(calls, None, register_step)
                for payload, calls in history.token_calls(every_read).items()}
    return verdicts(True), verdicts(False)


class _BareHistory(client_history.ClientHistory):
    def __init__(self) -> None:
        self._init_history()
        self.step_number = 0
        self.committed: dict[int, tuple[int, bytes]] = {}


def test_binding_reads_give_the_verdict_of_every_read_on_random_histories() -> None:
    """The sweep searches each token's write with only its two binding reads; the Wing-Gong search over
    every read agrees, on random small histories (open and acknowledged writes, reads that saw the
    token and reads that missed it, in any overlap)."""
    rng = random.Random(12)
    outcomes = set()
    for _ in range(400):
        history = _BareHistory()
        reads = rng.randint(1, 6)
        events = sorted(rng.sample(range(1, 100), 2 * (reads + 1)))
        rng.shuffle(events)
        start, end = sorted(events[:2])
        history.history_writes[b"p"] = client_history.WriteRecord(start, 0, end if rng.random() < 0.6 else None)
        if rng.random() < 0.8:
            history.committed[2] = (1, b"p")
        for number in range(reads):
            start, end = sorted(events[2 + 2 * number:4 + 2 * number])
            history.history_reads.append(client_history.ReadRecord(start, end, 0, 0, "n1", rng.choice((1, 2))))
        every, binding = _verdicts(history)
        assert every == binding, (history.history_writes, history.history_reads)
        outcomes.add(every[b"p"])
    assert outcomes == {True, False}


def test_binding_reads_give_the_verdict_of_every_read_on_simulated_histories() -> None:
    """The same on the histories of sweep seeds, and on the mutant's stale read."""
    histories = []
    for seed in range(15):
        simulation = Simulation(seed, SimulationConfig.from_seed(seed))
        for _ in range(simulation.config.steps):
            simulation.step()
        histories.append(simulation)
    mutant = Simulation(STALE_READ_SEED, SimulationConfig.from_seed(STALE_READ_SEED), ReadsWithoutQuorumRound)
    mutant.check_reads_in_real_time = False
    for _ in range(mutant.config.steps):
        mutant.step()
    histories.append(mutant)
    refused = 0
    for history in histories:
        every, binding = _verdicts(history)
        assert every == binding, history.seed
        refused += list(every.values()).count(False)
    assert refused == 2  # the mutant's two tokens; the real replica's histories all pass
    assert sum(len(history.history_reads) for history in histories[:-1]) >= 50
