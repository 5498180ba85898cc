"""Proof that the sweep's checks bite: each deliberately broken replica is caught within a stated number of seeds.

The bounds are measured (first catching seed in brackets) with the default
sweep configuration: AcknowledgesWithoutMajority [seed 0], VotesWithoutUpToDateCheck
[seed 2], CommitsEarlierViewByCounting [seed 39; 11 of the first 200 seeds catch it].
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


@pytest.mark.parametrize(("replica_class", "within_seeds", "expected_symptom"), [
    (AcknowledgesWithoutMajority, 10, "lacks committed entry"),
    (VotesWithoutUpToDateCheck, 20, "acknowledged"),
    (CommitsEarlierViewByCounting, 100, "lacks committed entry"),
], ids=lambda value: getattr(value, "__name__", str(value)))
def test_broken_variant_is_caught_by_the_sweep(replica_class: type[Replica], within_seeds: int,
                                               expected_symptom: str, replay_seed: int | None) -> None:
    if replay_seed is not None:
        pytest.skip("--seed replays the sweep only")
    caught = first_catching_seed(replica_class, within_seeds)
    assert caught is not None, f"{replica_class.__name__} survived {within_seeds} seeds: the checks do not bite"
    seed, message = caught
    assert expected_symptom in message, message
    # The same seeds pass with the real replica (the sweep runs them all), so the catch is the variant's doing.
    Simulation(seed, SimulationConfig.from_seed(seed)).run()
