"""Options of the cluster simulation: ``pytest tests/sim --seed N`` replays one seed of the sweep."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("simulation", "seeded cluster simulation (tests/sim)")
    group.addoption("--seed", type=int, default=None,
                    help="run only this simulation seed (replays a failure printed by the sweep)")
    group.addoption("--sim-seeds", type=int, default=500, help="number of seeds the sweep runs (default 500)")
    group.addoption("--sim-steps", type=int, default=2000, help="steps per seed in the sweep (default 2000)")


@pytest.fixture
def replay_seed(request: pytest.FixtureRequest) -> int | None:
    # getoption with a default also works when this conftest was not loaded at start-up
    # (a whole-suite run from the repository root), where the option cannot be given anyway.
    return request.config.getoption("--seed", default=None)


@pytest.fixture
def sweep_seeds(request: pytest.FixtureRequest, replay_seed: int | None) -> range:
    if replay_seed is not None:
        return range(replay_seed, replay_seed + 1)
    return range(request.config.getoption("--sim-seeds", default=500))


@pytest.fixture
def sweep_steps(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("--sim-steps", default=2000)
