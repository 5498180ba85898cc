"""Crash tests of tokenvault.core.store with real processes killed by SIGKILL.

The child (tests/unit/store_crash_child.py) applies a deterministic log; the
test kills it at random moments and checks that the reopened store is exactly
a store that applied the log up to its applied index (no batch half there,
nothing after it), and that every batch the child saw written survived. The
install test kills the child right after each step of an install and checks
that the store comes back in the old or the new state, never anything else.
"""

from __future__ import annotations

import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store_crash_child import PURGE_LIMIT, RETENTION_MS, entry, open_store
from tokenvault.core.store import VaultStore

CHILD = Path(__file__).with_name("store_crash_child.py")
KILLS = 6
TOTAL_SECONDS = 20.0  # a hard bound on the whole test, start-up of every child included
SEED = 7


def _dump(store: VaultStore) -> list[tuple[bytes, bytes]]:
    return list(store._db.items())


def _read_line(process: subprocess.Popen, deadline: float) -> str:
    """One line from the child's stdout, or fail at the deadline."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("the child did not report in time")
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if ready:
            line = process.stdout.readline()
            if not line:
                raise AssertionError(f"the child exited early: {process.wait()} {process.stderr.read()}")
            return line.strip()


def test_sigkill_at_random_moments_leaves_the_store_at_the_end_of_an_acknowledged_batch(tmp_path):
    path = tmp_path / "store"
    rng = random.Random(SEED)
    deadline = time.monotonic() + TOTAL_SECONDS
    reference = VaultStore.open(tmp_path / "reference", retention_ms=RETENTION_MS, purge_limit_per_command=PURGE_LIMIT)
    previous_index = 0
    for _ in range(KILLS):
        process = subprocess.Popen([sys.executable, str(CHILD), "apply", str(path), str(SEED)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert _read_line(process, deadline).startswith("ready")
            # Kill after a random number of acknowledged batches (0: maybe mid-first-batch).
            acknowledged = previous_index
            for _ in range(rng.randint(0, 60)):
                acknowledged = int(_read_line(process, deadline).split()[1])
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
            process.stdout.close()
            process.stderr.close()
        assert process.returncode == -signal.SIGKILL
        crashed = open_store(path)
        try:
            applied = crashed.applied_index
            # A written batch survives a process crash; the store never goes back.
            assert applied >= acknowledged >= previous_index
            reference.apply_batch([entry(SEED, index) for index in range(reference.applied_index + 1, applied + 1)])
            assert reference.applied_index == applied
            assert _dump(crashed) == _dump(reference)
            assert (crashed.token_count(), crashed.active_epoch()) == (reference.token_count(), reference.active_epoch())
        finally:
            crashed.close()
        previous_index = applied
    assert previous_index > 0
    reference.close()


def _state(path: Path) -> tuple[int, int, list]:
    store = open_store(path)
    try:
        return store.applied_index, store.token_count(), _dump(store)
    finally:
        store.close()


STEPS_BEFORE_SWITCH = ["verified", "renamed", "opened", "current_temp_written"]
STEPS_AFTER_SWITCH = ["current_renamed", "handle_swapped", "old_closed", "none"]


@pytest.mark.parametrize("crash_at", STEPS_BEFORE_SWITCH + STEPS_AFTER_SWITCH)
def test_a_crash_after_any_install_step_leaves_the_old_or_the_new_state(tmp_path, crash_at):
    source = open_store(tmp_path / "source")
    source.apply_batch([entry(SEED, index) for index in range(1, 121)])
    index, view = source.create_checkpoint(tmp_path / "staged")
    new = (index, source.token_count(), _dump(source))
    source.close()
    store = open_store(tmp_path / "store")
    store.apply_batch([entry(SEED + 1, index) for index in range(1, 31)])
    store.close()
    old = _state(tmp_path / "store")
    assert old != new
    completed = subprocess.run([sys.executable, str(CHILD), "install", str(tmp_path / "store"),
                                str(tmp_path / "staged"), str(index), str(view), crash_at],
                               capture_output=True, text=True, timeout=60)
    if crash_at == "none":
        assert completed.returncode == 0, completed.stderr
    else:
        assert completed.returncode == -signal.SIGKILL, completed.stderr
    assert _state(tmp_path / "store") == (old if crash_at in STEPS_BEFORE_SWITCH else new)
    # Open removed whatever the install left behind: one generation and CURRENT.
    names = sorted(entry_path.name for entry_path in (tmp_path / "store").iterdir())
    assert len(names) == 2 and names[0] == "CURRENT" and names[1].startswith("gen-")
