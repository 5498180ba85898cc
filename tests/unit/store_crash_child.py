"""A child process for the store's crash tests (tests/unit/test_store_crash.py); not a test module.

``apply PATH SEED``: opens the store at PATH and applies the deterministic log
``entry(SEED, i)`` from its applied index on, in random batches that also replay
a few applied entries, printing the applied index after every batch (so the
parent knows what the store acknowledged), until it is killed.

``install PATH STAGED INDEX VIEW STEP``: installs the checkpoint STAGED and
SIGKILLs itself right after the install step STEP (``none``: finishes).
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path

from protocol import Entry, EntryKind
from tokenvault.core import store_files as store_module
from tokenvault.core.commands import RotateEpochCommand, TokenizeCommand, encode_command
from tokenvault.core.store import VaultStore

RETENTION_MS = 2_000
PURGE_LIMIT = 2
ROTATE_EVERY = 400


def token(epoch: int, number: int) -> str:
    return f"tv{epoch}_{number:032d}"


def entry(seed: int, index: int, view: int = 1) -> Entry:
    """Entry ``index`` of the deterministic log of ``seed``: rotations, keyed and unkeyed tokenizes, no-ops."""
    rng = random.Random(seed * 1_000_003 + index)
    epoch = (index - 1) // ROTATE_EVERY + 1
    at_ms = index * 10
    if (index - 1) % ROTATE_EVERY == 0:
        command = RotateEpochCommand(epoch, b"wrapped-%d" % epoch, at_ms, "admin", f"rotate-{epoch}", b"fp")
    elif index % 7 == 0:
        return Entry(index, view, EntryKind.NOOP, b"")
    else:
        numbers = [rng.randrange(3_000) for _ in range(rng.randint(1, 12))]
        items = tuple((token(epoch, n), b"ct:" + token(epoch, n).encode()) for n in numbers)
        key = f"k{rng.randrange(200)}" if rng.random() < 0.5 else None
        principal = f"p{rng.randrange(2)}"
        command = TokenizeCommand(epoch, items, principal, key, b"fp" if key else None, at_ms)
    return Entry(index, view, EntryKind.COMMAND, encode_command(command))


def open_store(path: Path) -> VaultStore:
    return VaultStore.open(path, retention_ms=RETENTION_MS, purge_limit_per_command=PURGE_LIMIT)


def run_apply(path: Path, seed: int) -> None:
    store = open_store(path)
    rng = random.Random(seed ^ os.getpid())
    print(f"ready {store.applied_index}", flush=True)
    while True:
        start = max(1, store.applied_index + 1 - rng.randint(0, 3))
        end = store.applied_index + rng.randint(1, 40)
        store.apply_batch([entry(seed, index) for index in range(start, end + 1)])
        if rng.random() < 0.05:
            store.checkpoint()
        print(f"applied {store.applied_index}", flush=True)


def run_install(path: Path, staged: Path, index: int, view: int, crash_at: str) -> None:
    def step(name: str) -> None:
        if name == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    store_module._after_install_step = step
    store = open_store(path)
    prepared = store.prepare_install(staged, index, view)
    retired = store.commit_install(prepared)
    retired.close()
    store.close()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "apply":
        run_apply(Path(sys.argv[2]), int(sys.argv[3]))
    elif mode == "install":
        run_install(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        raise SystemExit(f"unknown mode {mode}")
