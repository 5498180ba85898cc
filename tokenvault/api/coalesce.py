"""Group commit across requests: the sealed items of concurrent tokenizes become one log entry.

On the primary, every opaque tokenize without metadata and without an
Idempotency-Key whose values an HTTP worker sealed and that is not answered as
a read adds its (token, ciphertext) pairs to the open batch of its epoch, and
so does an opaque one with a TTL (no metadata) that a backup forwarded or a
node without workers took, once the core sealed it. A request's TTL travels
with its items: the entry carries one expiry when all its items have the same
(or none), else one per item (``item_expires_at_ms``), each counted from the
clock of the moment the entry is proposed, so a request held for a turn or
more gets its whole TTL from then; the batch is proposed as ONE tokenize entry at the next turn of the
event loop, or at once when it reaches ``max_items`` pairs or ``max_bytes``
bytes. Each request is answered with its own tokens when the entry is applied.
Under load many requests arrive in one turn, so the core's cost per request
(encoding, WAL record, replication message, apply) falls as load rises; alone,
a request waits for one loop turn only.

While ``max_in_flight`` merged entries are proposed and not yet answered
(committed and applied, or failed), the open batch is not proposed at the
end of its turn: it stays open, the requests of the following turns join
it, and it is proposed when an entry in flight is answered (or at once when
it fills up). Under load that makes entries larger and fewer — each entry
costs every node a WAL record, an fsync, a replication message and an apply
batch — while a request that finds nothing in flight is proposed at the end
of its turn as before. The request timeout counts from when a batch opens,
holding included: a batch proposed late gets only what is left of it, and one
held past it is failed without being proposed (it had no effect), so holding
never makes a request wait longer than the timeout. One entry in flight (the
default) measured best on two cores (docs/performance.md, fourteenth sitting).

Why only those requests: an idempotent tokenize records its own response under
its own key, so it stays one entry. A card or digits tokenize, or one with
metadata, is one entry too (NodeService._tokenize_sealed_extended): a command
has one format and one metadata rule, and a card and digits token coincidence
(TOKEN_COLLISION) refuses a whole entry, so merging would fail the other
requests of the entry for one request's token. Two requests of one entry may
carry the same value with different TTLs: the store applies the items of one
token in order, as two entries (tokenvault/core/store_lifecycle.py), so
merging leaves each mapping as separate entries would.

Merging changes nothing a client sees: the apply step checks insert-once over
the whole entry and tokens are deterministic, so the same value in two merged
requests is one mapping; a rotation applied first fails the whole entry with
EPOCH_MISMATCH, and every request of it is told EpochChanged (its worker lets
the core seal again in the new epoch) — no request ever mixes epochs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from tokenvault.core import commands
from tokenvault.errors import Unavailable
from tokenvault.futures import TurnBatch, TurnBatcher, fail_waiting

DEFAULT_MAX_ITEMS = 4096
DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_MAX_IN_FLIGHT = 1

# Proposes an encoded command, waiting at most the given seconds for its result.
Propose = Callable[[bytes, float], Awaitable[Any]]


class _Batch(TurnBatch):
    __slots__ = ("epoch", "items", "ttls", "bytes", "requests", "done", "opened_at")

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.opened_at = time.monotonic()
        self.epoch = epoch
        self.items: list[tuple[str, bytes]] = []
        # Each item's TTL in seconds (None: none), once a request with a TTL joined; None while none has.
        self.ttls: list[int | None] | None = None
        self.bytes = 0
        self.requests = 0
        self.done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()


class TokenizeCoalescer(TurnBatcher[_Batch]):
    """Merges concurrent sealed tokenizes of one epoch into one entry; ``submit`` returns its apply result."""

    def __init__(self, propose: Propose, *, timeout_seconds: float, max_items: int = DEFAULT_MAX_ITEMS,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        if max_items < 1 or max_bytes < 1 or max_in_flight < 1:
            raise ValueError("max_items, max_bytes and max_in_flight must be at least 1")
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        super().__init__()
        self._propose = propose
        self._timeout_seconds = timeout_seconds
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        # Batches whose turn ended while max_in_flight entries were in flight, oldest first (the
        # open batch, still taking requests, and batches of an earlier epoch, closed).
        self._held: deque[_Batch] = deque()
        # What the last entries carried, for the metrics and the tests.
        self.entries_proposed = 0
        self.requests_merged = 0
        self.entries_held = 0
        self.entries_timed_out = 0  # held past the timeout: failed without being proposed

    def _flush(self, batch: _Batch) -> None:
        """Propose ``batch`` now if it is full or fewer than max_in_flight entries are in flight, else hold it."""
        if batch.started:
            return
        full = len(batch.items) >= self._max_items or batch.bytes >= self._max_bytes
        if not full and self._in_flight >= self._max_in_flight:
            if batch not in self._held:
                self._held.append(batch)
                self.entries_held += 1
            return  # the open batch stays open: the requests of the next turns join it
        if batch in self._held:
            self._held.remove(batch)
        self._in_flight += 1
        super()._flush(batch)

    def _answered(self) -> None:
        """An entry in flight was answered: the oldest held batch is proposed."""
        self._in_flight -= 1
        if self._held:
            self._flush(self._held[0])

    async def submit(self, epoch: int, items: list[tuple[str, bytes]], ttl_seconds: int | None = None) -> Any:
        """Propose ``items`` (with those of other requests of this turn), each with ``ttl_seconds`` when
        given; the entry's ApplyResult.

        The proposal's exceptions (Unavailable, Overloaded, ...) reach every request of the entry.
        Cancelling one request does not cancel the entry the others wait for."""
        size = sum(len(token) + len(ciphertext) for token, ciphertext in items)
        batch = self._open
        if (batch is None or batch.epoch != epoch or len(batch.items) + len(items) > self._max_items
                or batch.bytes + size > self._max_bytes):
            if batch is not None:
                self._open = None  # closed: a held batch of an earlier epoch takes no more requests
                self._flush(batch)
            batch = self._open_batch(_Batch(epoch))
        if ttl_seconds is not None and batch.ttls is None:
            batch.ttls = [None] * len(batch.items)
        if batch.ttls is not None:
            batch.ttls.extend([ttl_seconds] * len(items))
        batch.items.extend(items)
        batch.bytes += size
        batch.requests += 1
        if len(batch.items) >= self._max_items or batch.bytes >= self._max_bytes:
            self._flush(batch)
        return await asyncio.shield(batch.done)

    async def _send_batch(self, batch: _Batch) -> None:
        try:
            left = self._timeout_seconds - (time.monotonic() - batch.opened_at)
            if left <= 0:
                self.entries_timed_out += 1
                fail_waiting([batch.done], Unavailable(
                    "earlier writes did not commit in time, so this one was not proposed; it had no effect: retry",
                    no_effect=True))
                return
            self.entries_proposed += 1
            self.requests_merged += batch.requests
            command = _command(batch, int(time.time() * 1000))
            result = await self._propose(commands.encode_command(command), left)
        except BaseException as error:  # noqa: BLE001 - handed to every waiting request
            fail_waiting([batch.done], error)
            return
        finally:
            self._answered()
        if not batch.done.done():
            batch.done.set_result(result)

    async def close(self) -> None:
        """Cancel the entries being proposed and fail the held batches (the node is stopping)."""
        held, self._held = list(self._held), deque()
        self._open = None
        for batch in held:
            batch.started = True
        stopping = Unavailable("the node is stopping; the write had no effect", no_effect=True)
        fail_waiting([batch.done for batch in held], stopping)
        await super().close()


def _command(batch: _Batch, issued_at_ms: int) -> commands.TokenizeCommand:
    """The batch's entry. Expiries come from this clock as the entry is proposed (a request held for a
    turn or more gets its TTL from then, never less); one expiry for the entry where every item has the
    same, else one per item."""
    expires_at_ms, item_expires_at_ms = None, None
    if batch.ttls is not None:
        expiries = tuple(None if ttl is None else issued_at_ms + ttl * 1000 for ttl in batch.ttls)
        if len(set(expiries)) == 1:
            expires_at_ms = expiries[0]
        else:
            item_expires_at_ms = expiries
    return commands.TokenizeCommand(
        epoch=batch.epoch, items=tuple(batch.items), principal=None, idempotency_key=None, fingerprint=None,
        issued_at_ms=issued_at_ms, expires_at_ms=expires_at_ms, item_expires_at_ms=item_expires_at_ms)
