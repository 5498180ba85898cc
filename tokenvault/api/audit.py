"""The audit trail's group commit: each node's buffer of records waiting to be replicated.

Every detokenize, API key change and epoch change leaves one audit record in a
replicated log-ordered table (tokenvault.core.store). A record holds who (key name
and id), what (action, item count, found count, subject such as a key id or an
epoch), when, on which node and for which request — never a value and never a
token. The record format and the hash chain are in tokenvault/audit_chain.py.

Group commit. A detokenize does not become a log entry of its own: each node
buffers its records (``AuditBuffer``) and proposes up to ``max_batch_records``
of them as one entry, ``flush_ms`` after the first is buffered or, when
``max_batches_in_flight`` batches are being committed already, as soon as one
of them is (a backup forwards each batch to the primary like other writes). A detokenize
answers only once the entry holding its record has committed; if it cannot be
written in time the detokenize fails with 503 (fail closed). The buffer holds at
most ``max_pending_records``; past that a detokenize is refused with 503 at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


from tokenvault.core.commands import AuditRecord
from tokenvault.logs import get_logger

# Audit batches of one node being committed at once.
DEFAULT_BATCHES_IN_FLIGHT = 4

log = get_logger("audit")


class AuditUnavailable(Exception):
    """The audit record could not be committed (buffer full, no primary, timeout)."""


# Commits one batch; returns the log index of the entry that holds it (None when unknown).
Proposer = Callable[[tuple[AuditRecord, ...]], Awaitable[int | None]]


class AuditBuffer:
    """Buffers one node's audit records and commits them in batches (group commit).

    ``append`` returns once the record's batch is committed, with the log index
    of its entry (None when the proposer did not say), or raises
    AuditUnavailable. Up to ``max_batches_in_flight`` batches are being
    committed at once (a commit waits for fsyncs on a majority, so one batch at
    a time would cap a node at one batch per commit latency); records arriving
    meanwhile form the next batch, so under load each entry carries many
    records and an idle node adds no latency beyond ``flush_ms``."""

    def __init__(self, propose: Proposer, *, flush_ms: int, max_batch_records: int,
                 max_pending_records: int, max_batches_in_flight: int = DEFAULT_BATCHES_IN_FLIGHT) -> None:
        self._propose = propose
        self._flush_seconds = flush_ms / 1000
        self._max_batch_records = max_batch_records
        self._max_pending_records = max_pending_records
        self._slots = asyncio.Semaphore(max_batches_in_flight)
        self._waiting: list[tuple[AuditRecord, asyncio.Future[int | None]]] = []
        self._pending_count = 0
        self._flusher: asyncio.Task[None] | None = None
        self._commits: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pending_count(self) -> int:
        return self._pending_count

    async def append(self, record: AuditRecord) -> int | None:
        if self._closed:
            raise AuditUnavailable("the node is shutting down")
        if self._pending_count >= self._max_pending_records:
            raise AuditUnavailable("too many audit records are waiting to be written")
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((record, future))
        self._pending_count += 1
        try:
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
            return await future
        finally:
            self._pending_count -= 1

    async def _flush_loop(self) -> None:
        # The first record of a quiet period waits flush_ms for company; under
        # load the commit time of the batches in flight does the batching.
        await asyncio.sleep(self._flush_seconds)
        while self._waiting and not self._closed:
            await self._slots.acquire()
            batch = [(record, future) for record, future in self._waiting[:self._max_batch_records]
                     if not future.done()]
            del self._waiting[:self._max_batch_records]
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._commit(batch))
            self._commits.add(task)
            task.add_done_callback(self._commits.discard)

    async def _commit(self, batch: list[tuple[AuditRecord, asyncio.Future[int | None]]]) -> None:
        try:
            index = await self._propose(tuple(record for record, _ in batch))
        except asyncio.CancelledError:
            self._fail(batch, "the node is shutting down")
            raise
        except Exception as error:  # every failure of the write fails its requests closed
            log.warning("audit.write_failed", records=len(batch), error_type=type(error).__name__)
            self._fail(batch, "the audit record could not be written; the request was refused")
        else:
            for _, future in batch:
                if not future.done():
                    future.set_result(index)
        finally:
            self._slots.release()

    @staticmethod
    def _fail(batch: list[tuple[AuditRecord, asyncio.Future[int | None]]], reason: str) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(AuditUnavailable(reason))

    async def close(self) -> None:
        self._closed = True
        self._fail(self._waiting, "the node is shutting down")
        self._waiting = []
        tasks = [task for task in (self._flusher, *self._commits) if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
