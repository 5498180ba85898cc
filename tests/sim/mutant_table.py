"""Runs each planted bug (tests/sim/broken_replicas.py MUTANTS) over the sweep's seeds; prints a markdown table.

    .venv/bin/python tests/sim/mutant_table.py --seeds 200

A seed "catches" a mutant when its run raises SimulationFailure (an invariant
broke) or an assertion of the core fires. The table goes into docs/replication.md
("Mutants"); a mutant the sweep catches rarely names the hand-built scenario in
tests/sim/test_sim_scenarios.py that catches it every time.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from broken_replicas import MUTANTS  # noqa: E402
from simulator import Simulation, SimulationConfig, SimulationFailure  # noqa: E402

# Mutants the sweep reaches too rarely, and the named scenario that catches each of them.
SCENARIOS = {
    "reads answered without the quorum round":
        "test_sim_scenarios.py::test_read_without_quorum_round_on_an_isolated_primary_is_caught",
    "driver sends replies before the fsync": "test_sim_scenarios.py::test_replies_before_the_fsync_are_caught",
    "installs an older snapshot": "test_sim_scenarios.py::test_older_snapshot_mutant_is_caught",
    "accepts messages from lower views": "test_sim_scenarios.py::test_message_of_a_lower_view_is_refused",
    "up-to-date check compares index only": "test_sim_scenarios.py::test_up_to_date_check_by_index_only_is_caught",
    "reads before the view's first commit":
        "test_sim_scenarios.py::test_reads_before_the_views_first_commit_are_caught",
    "commits an earlier view by counting":
        "test_sim_scenarios.py::test_figure_eight_breaks_a_replica_that_commits_by_counting",
    "counts its own vote before it is durable":
        "test_sim_scenarios.py::test_a_sole_voter_counting_its_vote_before_it_is_durable_is_caught",
    "drops the polls of members an uncommitted change removed":
        "test_sim_scenarios.py::test_dropping_the_polls_of_members_an_uncommitted_change_removed_is_caught",
    "floors at the match index": "test_sim_scenarios.py::test_an_acknowledged_entry_that_never_committed_raises_no_floor",
    "reports every vote below a floor":
        "test_sim_scenarios.py::test_a_pre_vote_overtaken_by_the_acknowledgement_is_refused_but_not_reported",
}


def catching_seeds(name: str, seeds: range, steps: int) -> list[int]:
    replica_class, driver_bugs = MUTANTS[name]
    caught = []
    for seed in seeds:
        try:
            Simulation(seed, SimulationConfig.from_seed(seed, steps), replica_class, driver_bugs).run()
        except (SimulationFailure, AssertionError):
            caught.append(seed)
    return caught


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="seeds 0..N-1 of the sweep (default 200)")
    parser.add_argument("--steps", type=int, default=2000, help="steps per seed (default 2000, as the sweep)")
    parser.add_argument("--only", action="append", default=None, help="run only this mutant (repeatable)")
    arguments = parser.parse_args()
    seeds = range(arguments.seeds)
    started = time.monotonic()
    print(f"`.venv/bin/python tests/sim/mutant_table.py --seeds {arguments.seeds}` "
          f"({datetime.date.today().isoformat()}, {arguments.steps} steps per seed)\n")
    print("| mutant | seeds that caught it | catch rate | first catching seed | also caught by |")
    print("|---|---|---|---|---|")
    for name in arguments.only or MUTANTS:
        caught = catching_seeds(name, seeds, arguments.steps)
        rate = len(caught) / len(seeds)
        first = str(caught[0]) if caught else "none"
        scenario = f"tests/sim/{SCENARIOS[name]}" if name in SCENARIOS else ""
        if rate < 0.05 and not scenario:
            scenario = "NOT REACHED: below 5% and no scenario"
        print(f"| {name} | {len(caught)} of {len(seeds)} | {rate:.1%} | {first} | {scenario} |", flush=True)
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
