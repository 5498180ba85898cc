"""A worker's plain sealed tokenizes of one event-loop turn, sent to its core as one call; and the
read points of one turn (ReadPointMerger), likewise.

The core merges the sealed items of concurrent requests into one log entry
(tokenvault/api/coalesce.py), but before that it pays for every request on
its own: a channel message to decode and validate, the epoch check, the
re-seal of the first value, the read check's lookup, the coalescer's bookkeeping
and a reply to encode. Those costs are per call, not per value, and the core is
the one process of a node that cannot be multiplied. So a worker sends the
plain tokenizes (opaque, no Idempotency-Key, TTL or metadata) it sealed in one
turn of its event loop as ONE ``tokenize_sealed`` call, and answers each
request with its own tokens when that call is answered.

Why this changes nothing a client sees: these are exactly the requests the
core's coalescer merges into one entry anyway, so they already share one fate
(committed together, or refused together). The tokens are the worker's own
(deterministic, sealed here); the core answers the merged call only once its
items are stored, or as a read when every one of them is stored already (the
same value in two merged requests is one mapping). A rotation the worker had
not heard of refuses the merged call with EpochChanged, and each request then
takes the usual way (the core seals it in the new epoch). A call holds at most
``max_items`` values, the node's per-request bound, so a merged call is one
allowed request; and at most ``max_bytes`` of values and pairs (the channel's
frame bound less its overhead), so a turn of requests that each fit a channel
message never makes one that does not: the next request starts a new call.

Alone, a request waits for one loop turn only; under load a worker merges
what its connections delivered in the same turn.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from tokenvault.api.channel import decode_failure
from tokenvault.errors import Outcome, Unavailable
from tokenvault.futures import TurnBatch, TurnBatcher, fail_waiting

# Sends one tokenize_sealed call (principal, epoch, values, items) and returns the core's Outcome.
Send = Callable[[str, int, list[str], list[list[Any]]], Awaitable[Outcome]]


# What a merged call's members other than its values and pairs take, at most (principal, epoch, names).
CALL_OVERHEAD_BYTES = 4096
# msgpack's headers of one value and its [token, ciphertext] pair, at most.
ITEM_OVERHEAD_BYTES = 20


def sealed_request_bytes(items: list[list[Any]]) -> int:
    """At least what a request's values and [token, ciphertext] pairs take in a call: a value's UTF-8
    bytes are fewer than its ciphertext's, so each item is counted as its ciphertext twice and its token."""
    return sum(2 * len(ciphertext) + len(token) + ITEM_OVERHEAD_BYTES for token, ciphertext in items)


class _Call(TurnBatch):
    __slots__ = ("epoch", "principal", "values", "items", "done", "requests", "bytes")

    def __init__(self, epoch: int, principal: str) -> None:
        super().__init__()
        self.epoch = epoch
        self.principal = principal  # the first request's: a plain sealed tokenize records no principal
        self.values: list[str] = []
        self.items: list[list[Any]] = []
        self.requests = 0
        self.bytes = CALL_OVERHEAD_BYTES
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()


class SealedMerger(TurnBatcher[_Call]):
    """Merges the plain sealed tokenizes of one loop turn into one call to the core; ``submit`` returns
    when that call is answered (its epoch) or raises its error."""

    def __init__(self, send: Send, max_items: int, max_bytes: Callable[[], int | None] = lambda: None) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        super().__init__()
        self._send = send
        self._max_items = max_items
        # The bytes a call may take now (the channel's frame bound); None: no bound.
        self._max_bytes = max_bytes
        # What the calls carried, for the metrics and the tests.
        self.calls = 0
        self.requests = 0

    async def submit(self, principal: str, epoch: int, values: list[str], items: list[list[Any]]) -> Outcome:
        """This request's answer: ``{"epoch", "tokens"}`` with its own tokens, once the merged call is."""
        call = self._open
        size = sealed_request_bytes(items)
        max_bytes = self._max_bytes()
        if (call is None or call.epoch != epoch or len(call.values) + len(values) > self._max_items
                or (max_bytes is not None and call.requests and call.bytes + size > max_bytes)):
            if call is not None:
                self._flush(call)
            call = self._open_batch(_Call(epoch, principal))
        call.values.extend(values)
        call.items.extend(items)
        call.requests += 1
        call.bytes += size
        if len(call.values) >= self._max_items:
            self._flush(call)
        answered_epoch = await asyncio.shield(call.done)
        body = {"epoch": answered_epoch, "tokens": [token for token, _ in items]}
        return Outcome(200, json.dumps(body, separators=(",", ":")).encode(), False)

    async def _send_batch(self, call: _Call) -> None:
        self.calls += 1
        self.requests += call.requests
        try:
            outcome = await self._send(call.principal, call.epoch, call.values, call.items)
            epoch = _answered_epoch(outcome, call.items)
        except BaseException as error:  # noqa: BLE001 - handed to every request of the call
            fail_waiting([call.done], error)
            return
        if not call.done.done():
            call.done.set_result(epoch)


def _answered_epoch(outcome: Outcome, items: list[list[Any]]) -> int:
    """The epoch of the core's answer to a merged call, which must name exactly the tokens sent."""
    try:
        document = json.loads(outcome.body) if outcome.status == 200 else None
    except ValueError:
        document = None
    if (not isinstance(document, dict) or type(document.get("epoch")) is not int
            or document.get("tokens") != [token for token, _ in items]):
        raise Unavailable("the node's core answered a merged tokenize out of shape; retry")
    return int(document["epoch"])


# Sends one read_points call with the points of a turn; the core's answer, one result per point.
SendPoints = Callable[[list[dict[str, Any]]], Awaitable[Any]]


class _Points(TurnBatch):
    __slots__ = ("points",)

    def __init__(self) -> None:
        super().__init__()
        self.points: list[tuple[dict[str, Any], asyncio.Future[int]]] = []


class ReadPointMerger(TurnBatcher[_Points]):
    """The read points a worker asks of its core in one loop turn — each detokenize it answers from its
    view (``detokenize_read_point``: the audit record, the catch-up, the removal index) and each repeat
    tokenize (``tokenize_read_point``: the read barrier, the epoch check) — sent as ONE ``read_points``
    call of at most ``max_points``. The core runs every point as it would alone (each detokenize keeps
    its own audit record) and answers each with its index or its own error, so merging changes no
    answer: it saves the core one message to decode, dispatch and answer per request."""

    def __init__(self, send: SendPoints, max_points: int) -> None:
        if max_points < 1:
            raise ValueError("max_points must be at least 1")
        super().__init__()
        self._send = send
        self._max_points = max_points
        self.calls = 0  # for the tests

    async def ask(self, point: dict[str, Any]) -> int:
        """The point's index (the core's removal index), or its error raised as the core raised it."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        call = self._open if self._open is not None else self._open_batch(_Points())
        call.points.append((point, future))
        if len(call.points) >= self._max_points:
            self._flush(call)  # full: sent now; the turn's later points make another call
        return await asyncio.shield(future)

    async def _send_batch(self, call: _Points) -> None:
        self.calls += 1
        points = call.points
        try:
            results = await self._send([point for point, _ in points])
            if not isinstance(results, list) or len(results) != len(points):
                raise Unavailable("the node's core answered read points out of shape; retry")
        except BaseException as error:  # noqa: BLE001 - handed to every point of the call
            fail_waiting([future for _, future in points], error)
            return
        for (_, future), result in zip(points, results):
            if not future.done():
                _settle(future, result)


def _settle(future: asyncio.Future[int], result: object) -> None:
    """One point's result as the core sends it: ``[index]``, or ``[status, problem, detail, headers, no_effect]``
    (its error, decoded as a channel's failure: its Retry-After kept)."""
    if isinstance(result, list) and len(result) == 1 and type(result[0]) is int and result[0] >= 0:
        future.set_result(result[0])
        return
    future.set_exception(decode_failure(result) if isinstance(result, list)
                         else Unavailable("the node's core answered a read point out of shape; retry"))
    future.exception()
