"""Whether a RocksDB write (rocksdict) lets other Python threads run: the question behind moving the
store's apply write off the core's event-loop thread (docs/performance.md, eleventh sitting).

Usage:
    .venv/bin/python bench/rocksdb_gil.py

A thread counts in a tight loop while the main thread does one of three things:
40 RocksDB write batches of 5,000 rows, hashlib over 256 MiB (which releases
the GIL) and a pure-Python loop (which holds it). It prints the counting
thread's rate during each, as a share of its rate alone: about 100 % means
the main thread's work let it run, about 50 % that the two shared the GIL.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable

from rocksdict import Options, Rdict, WriteBatch


def counting_rate(work: Callable[[], None] | None, seconds: float = 0.3) -> float:
    """Loop iterations per second a second thread makes while ``work`` runs (alone: for ``seconds``)."""
    stop = threading.Event()
    counts: list[int] = []

    def count() -> None:
        number = 0
        while not stop.is_set():
            number += 1
        counts.append(number)

    thread = threading.Thread(target=count)
    thread.start()
    started = time.perf_counter()
    if work is None:
        time.sleep(seconds)
    else:
        work()
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join()
    return counts[0] / elapsed


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tokenvault-gil-") as directory:
        database = Rdict(os.path.join(directory, "db"), Options(raw_mode=True))
        batches = []
        for _ in range(40):
            batch = WriteBatch(raw_mode=True)
            for _ in range(5000):
                batch.put(os.urandom(24), os.urandom(48))
            batches.append(batch)
        data = os.urandom(256 * 1024 * 1024)

        def write() -> None:
            for batch in batches:
                database.write(batch)

        def python_loop() -> None:
            deadline = time.perf_counter() + 0.3
            while time.perf_counter() < deadline:
                pass

        alone = counting_rate(None)
        for label, work in (("RocksDB write batches", write), ("hashlib.sha256 (releases the GIL)",
                                                                 lambda: hashlib.sha256(data).digest()),
                            ("pure-Python loop (holds the GIL)", python_loop)):
            print(f"{label:<36} the other thread ran at {counting_rate(work) / alone * 100:3.0f} % of its rate alone")
        database.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
