"""Waiting on a future with a deadline, cheaply; cancelling a group of tasks; batching the requests of
one event-loop turn (TurnBatcher); computing a batch a slice at a time between turns of the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
# Items computed between two turns of the event loop by computed_in_slices: FF1 tokens cost about 15 µs
# each, so a slice is about 2 ms of the loop's time.
SLICE_ITEMS = 128


async def computed_in_slices(function: Callable[[T], R], inputs: Sequence[T]) -> list[R]:
    """``[function(x) for x in inputs]``, ``SLICE_ITEMS`` at a time with a turn of the event loop before
    each slice (the first too, so that two batches computed one after the other are apart as well): a
    large batch of CPU work leaves the loop to the other requests every few milliseconds."""
    results: list[R] = []
    for start in range(0, len(inputs), SLICE_ITEMS):
        await asyncio.sleep(0)
        results.extend(map(function, inputs[start:start + SLICE_ITEMS]))
    return results


async def await_future(future: asyncio.Future[T], timeout_seconds: float) -> T:
    """``await future``, failing it with asyncio.TimeoutError after ``timeout_seconds``.

    What asyncio.wait_for does for a plain future, without the wrapper task and
    callbacks it adds (about 4 us per request here): a timer that fails the
    future, cancelled once it resolves. Whoever resolves the future later sees
    it done and leaves it alone.
    """
    timer = asyncio.get_running_loop().call_later(timeout_seconds, _expire, future)
    try:
        return await future
    finally:
        timer.cancel()


def fail_waiting(futures: Iterable[asyncio.Future[Any]], error: BaseException) -> None:
    """Hand ``error`` to whoever awaits each of ``futures`` not settled yet (the requests of one batch);
    marked retrieved, since a batch whose requests all left is not an error. KeyboardInterrupt and
    SystemExit are raised again after: they stop the process, not a batch."""
    for future in futures:
        if not future.done():
            future.set_exception(error)
            future.exception()
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        raise error


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel every task, then wait for each to finish; their errors are not the caller's concern."""
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    for task in pending:
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass


class TurnBatch:
    """A batch the requests of one event-loop turn join (TurnBatcher); sent once."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = False


Batch = TypeVar("Batch", bound=TurnBatch)


class TurnBatcher(Generic[Batch]):
    """The requests of one turn of the event loop join one open batch, which one task sends at the end
    of the turn (``_send_batch``), or at once when ``_flush`` is called for it (it is full). Subclasses
    make batches, open them with ``_open_batch`` and say how one is sent; a batch is sent once.

    Used by the core's coalescer (tokenvault/api/coalesce.py) and a worker's mergers
    (tokenvault/api/merge.py)."""

    def __init__(self) -> None:
        self._open: Batch | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def _open_batch(self, batch: Batch) -> Batch:
        self._open = batch
        asyncio.get_running_loop().call_soon(self._flush, batch)
        return batch

    def _flush(self, batch: Batch) -> None:
        if self._open is batch:
            self._open = None
        if batch.started:
            return
        batch.started = True
        task = asyncio.get_running_loop().create_task(self._send_batch(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send_batch(self, batch: Batch) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Cancel the batches being sent (the node is stopping)."""
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)
