"""Proof that the sweep's checks bite: each deliberately broken replica is caught within a stated number of seeds.

Measured with the default sweep configuration (seeds 0, 1, 2, ... as the sweep
runs them): AcknowledgesWithoutMajority is caught at seed 0 (174 of the first
200 seeds catch it), VotesWithoutUpToDateCheck at seed 1 (73 of 200), and
CommitsEarlierViewByCounting, which needs Raft's figure-8 history to arise by
chance, at seed 34 (3 of 200); its bound is therefore the whole 500-seed sweep.
tests/sim/test_sim_scenarios.py also builds figure 8 on purpose and catches it there.
"""

from __future__ import annotations

import pytest

from broken_replicas import AcknowledgesWithoutMajority, CommitsEarlierViewByCounting, VotesWithoutUpToDateCheck
from protocol import Replica
from simulator import Simulation, SimulationConfig, SimulationFailure


def first_catching_seed(replica_class: type[Replica], within_seeds: int) -> tuple[int, str] | None:
    for seed in range(within_seeds):
        try:
            Simulation(seed, SimulationConfig.from_seed(seed), replica_class).run()
        except SimulationFailure as failure:
            return seed, str(failure)
    return None


SAFETY_SYMPTOMS = ("lacks committed entry", "over acknowledged", "lacks acknowledged", "was committed there",
                   "differs", "two primaries", "stale read", "was lost", "truncates applied")


@pytest.mark.parametrize(("replica_class", "within_seeds"), [
    (AcknowledgesWithoutMajority, 10),
    (VotesWithoutUpToDateCheck, 20),
    (CommitsEarlierViewByCounting, 500),
], ids=lambda value: getattr(value, "__name__", str(value)))
def test_broken_variant_is_caught_by_the_sweep(replica_class: type[Replica], within_seeds: int,
                                               replay_seed: int | None) -> None:
    if replay_seed is not None:
        pytest.skip("--seed replays the sweep only")
    caught = first_catching_seed(replica_class, within_seeds)
    assert caught is not None, f"{replica_class.__name__} survived {within_seeds} seeds: the checks do not bite"
    seed, message = caught
    assert any(symptom in message for symptom in SAFETY_SYMPTOMS), f"caught, but not by a safety check:\n{message}"
    # The same seeds pass with the real replica (the sweep runs them all), so the catch is the variant's doing.
    Simulation(seed, SimulationConfig.from_seed(seed)).run()
