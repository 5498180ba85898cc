"""Whether the shredder keeps up with a steady stream of deletes, and what its backlog does when it cannot.

Usage:
    .venv/bin/python bench/shred_stream.py [--tokens 10000000] [--rates 500,4000] [--seconds 120]
                                           [--batch 100] [--directory DIR] [--max-busy-fraction 1]

For each store size and rate of deletes: a store of random tokens (bench/view_open.py's, filled once
and reused under ``--directory``), the node's own ``Shredder`` (tokenvault/core/shred.py) with a
stand-in for the write-ahead log (the bench times the store's passes, not the log's release), and
delete commands of ``--batch`` random tokens applied to the store and noted to the shredder at
``--rates`` tokens a second for ``--seconds``, on one event loop as a node's core runs them (its passes
back to back by default, what the store can shred; a node rests between them, ``[shred]
max_busy_fraction``, and bench/shred_serving.py measures that on a serving cluster). The
tokens deleted are fresh random ones: a delete of a token the store lacks leaves the same two keys
to shred, and their pass compacts the same bottom-level files, as those of random stored tokens
would. Then it waits for the backlog to drain. Prints each pass (its keys and seconds) and, per
run: tokens deleted, rows shredded a second over the stream, the largest backlog of rows, the
longest a delete waited from its apply to the end of the pass that took its last rows, and the time
to drain; first, the memory the keys of one full pass take. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from view_open import filled_store, random_token  # noqa: E402
from protocol import Entry, EntryKind  # noqa: E402
from tokenvault.core.commands import Actor, DeleteTokensCommand, encode_command  # noqa: E402
from tokenvault.core.shred import MAX_KEYS_PER_PASS, Shredder, ShredPass, shred_keys  # noqa: E402
from tokenvault.core.store import VaultStore  # noqa: E402

TICK_SECONDS = 0.05
DRAIN_SECONDS = 1800  # the longest a run waits for its backlog after the stream


class NoLog:
    """The write-ahead log as the shredder sees it, holding nothing: its release is not timed here."""

    first_held_index = 2**62
    last_index = 0


async def stream(store: VaultStore, rate: int, seconds: float, batch: int, seed: int,
                 max_busy_fraction: float) -> None:
    waiting: collections.deque[tuple[float, int]] = collections.deque()  # (applied at, entry) in log order
    waits: list[float] = []
    passes: list[tuple[int, float]] = []

    def on_pass(done: ShredPass) -> None:
        passes.append((done.rows, done.store_seconds))
        now = time.perf_counter()
        while waiting and waiting[0][1] <= done.through_index:
            waits.append(now - waiting.popleft()[0])
        print(f"    pass of {done.rows:>9,} keys{' (the whole key space)' if done.whole_store else ''}: "
              f"{done.store_seconds:6.2f} s", flush=True)

    shredder = Shredder(lambda: store, NoLog(), lambda error: print(f"shred failed: {error!r}"),  # type: ignore[arg-type]
                        on_pass=on_pass, max_busy_fraction=max_busy_fraction)
    generator = random.Random(seed)
    actor = Actor(node="n1", request_id="bench")
    largest_backlog = deleted = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        while deleted + batch <= rate * elapsed:
            command = DeleteTokensCommand(tuple(random_token(generator) for _ in range(batch)),
                                          int(time.time() * 1000), actor)
            index = store.applied_index + 1
            store.apply_batch([Entry(index, 1, EntryKind.COMMAND, encode_command(command))])
            shredder.note(index, command)
            waiting.append((time.perf_counter(), index))
            deleted += batch
        largest_backlog = max(largest_backlog, shredder.backlog_keys)
        await asyncio.sleep(TICK_SECONDS)
    stream_seconds = time.perf_counter() - started
    backlog_at_end = shredder.backlog_keys
    shredded_in_stream = sum(keys for keys, _ in passes)
    drain_started = time.perf_counter()
    while shredder.busy and time.perf_counter() - drain_started < DRAIN_SECONDS:
        await asyncio.sleep(TICK_SECONDS)
    drained = not shredder.busy
    drain_seconds = time.perf_counter() - drain_started
    await shredder.close()
    print(f"  {rate:>6,} deletes/s for {stream_seconds:.0f} s: {deleted:,} tokens deleted; "
          f"{shredded_in_stream / stream_seconds:,.0f} rows shredded a second meanwhile "
          f"({2 * deleted / stream_seconds:,.0f} arrived); largest backlog {largest_backlog:,} rows, "
          f"{backlog_at_end:,} at the end; longest wait of a delete {max(waits, default=0):.1f} s; "
          + (f"drained {drain_seconds:.1f} s after the stream" if drained
             else f"not drained {DRAIN_SECONDS} s after the stream"), flush=True)


def key_memory(batch: int) -> None:
    """What the shredder holds for a pass of MAX_KEYS_PER_PASS rows noted in deletes of ``batch``
    tokens: the keys' lists, as ``note`` keeps them (tracemalloc)."""
    generator = random.Random(0)
    commands = [DeleteTokensCommand(tuple(random_token(generator) for _ in range(batch)), 0, Actor())
                for _ in range(MAX_KEYS_PER_PASS // (2 * batch))]
    tracemalloc.start()
    held = [shred_keys(command) for command in commands]
    held_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rows = sum(map(len, held))
    print(f"keys a pass holds: {rows:,} rows in deletes of {batch} tokens, {held_bytes / 1e6:.1f} MB "
          f"({held_bytes / rows:.0f} bytes a row)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="10000000", help="comma-separated store sizes")
    parser.add_argument("--rates", default="500,4000", help="comma-separated deleted tokens a second")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long each stream runs")
    parser.add_argument("--batch", type=int, default=100, help="tokens a delete command")
    parser.add_argument("--max-busy-fraction", type=float, default=1.0,
                        help="the shredder's [shred] max_busy_fraction (default 1: passes back to back, what the "
                             "store can shred; a node's default is 0.25)")
    parser.add_argument("--directory", type=Path, default=None,
                        help="where the filled stores are kept (and reused); default: a new temporary one")
    arguments = parser.parse_args(argv)
    sizes = [int(part) for part in arguments.tokens.split(",")]
    rates = [int(part) for part in arguments.rates.split(",")]
    if min(sizes) < 1 or min(rates) < 1 or not 1 <= arguments.batch <= 1000 or arguments.seconds <= 0 \
            or not 0.01 <= arguments.max_busy_fraction <= 1:
        parser.error("sizes and rates must be at least 1, the batch 1 to 1,000, the seconds positive, "
                     "the busy fraction 0.01 to 1")
    base = arguments.directory or Path(tempfile.mkdtemp(prefix="shred-stream-"))
    key_memory(arguments.batch)
    for tokens in sizes:
        store, _ = filled_store(base / f"tokens-{tokens}", tokens)
        try:
            print(f"{tokens:>11,} tokens, deletes of {arguments.batch} tokens:", flush=True)
            for rate in rates:
                asyncio.run(stream(store, rate, arguments.seconds, arguments.batch, seed=rate,
                                   max_busy_fraction=arguments.max_busy_fraction))
        finally:
            store.close()


if __name__ == "__main__":
    main()
