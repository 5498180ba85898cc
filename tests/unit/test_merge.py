"""A worker's plain sealed tokenizes of one loop turn go to its core as one call (tokenvault.api.merge):
each request still gets its own tokens, exactly as when sent alone; a rotation the worker missed sends
each back the usual way; the merged call never holds more than the node's per-request bound."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from node_support import RunningNode
from test_channel import pair
from tokenvault.api.core_calls import CoreCalls
from tokenvault.api.merge import ReadPointMerger, SealedMerger
from tokenvault.api.remote import EPOCH_TOPIC, RemoteService
from tokenvault.errors import EpochChanged, Outcome, Overloaded, Unavailable


class CountingWorker:
    def __init__(self, service: RemoteService, calls: list[tuple[str, int]]) -> None:
        self.service, self.calls = service, calls

    def sealed_calls(self) -> list[int]:
        """The number of values of each tokenize_sealed call the core received."""
        return [values for method, values in self.calls if method == "tokenize_sealed"]


@pytest.fixture
async def worker(single: RunningNode) -> AsyncIterator[CountingWorker]:
    calls = CoreCalls(single.service, single.node.metrics, lambda: [], max_backup_streams=1)
    received: list[tuple[str, int]] = []
    handlers = calls.handlers

    def counted(method: str) -> Any:
        async def handle(arguments: dict[str, Any]) -> Any:
            received.append((method, len(arguments.get("values") or ())))
            return await handlers[method](arguments)
        return handle

    service = RemoteService(single.node_id, timeout_seconds=2.0, max_items=50)
    core, channel = await pair({method: counted(method) for method in handlers}, on_push=service.on_push)
    service.channel = channel
    single.node.on_keyring_changed = lambda: core.push(EPOCH_TOPIC, calls.active_epoch_keys())
    core.push(EPOCH_TOPIC, calls.active_epoch_keys())
    await service.read_health()  # a round trip: the push has arrived
    yield CountingWorker(service, received)
    await core.close()
    await channel.close()


async def test_the_tokenizes_of_one_turn_are_one_call_and_each_gets_its_own_tokens(single: RunningNode,
                                                                                   worker: CountingWorker) -> None:
    requests = [[f"merged-{number}", f"shared-{number % 3}"] for number in range(20)]
    answers = await asyncio.gather(*(worker.service.tokenize("p", values, None) for values in requests))
    assert worker.sealed_calls() == [40]
    for values, answer in zip(requests, answers):
        alone = await single.service.tokenize("p", values, None)  # the core's own answer, now a read
        assert answer.status == 200 and json.loads(answer.body) == json.loads(alone.body)
        assert answer.body == alone.body
    assert single.node.store.token_count() == 23  # 20 distinct values, 3 shared ones


async def test_a_merged_call_never_holds_more_than_the_per_request_bound(worker: CountingWorker) -> None:
    requests = [[f"bound-{number}-{item}" for item in range(7)] for number in range(20)]
    answers = await asyncio.gather(*(worker.service.tokenize("p", values, None) for values in requests))
    assert all(answer.status == 200 for answer in answers)
    assert sum(worker.sealed_calls()) == 140 and max(worker.sealed_calls()) <= 50
    assert len(worker.sealed_calls()) == 3  # 49 + 49 + 42: a request is never split


async def test_after_a_rotation_the_worker_missed_every_merged_request_is_tokenized_in_the_new_epoch(
        single: RunningNode, worker: CountingWorker) -> None:
    await worker.service.tokenize("p", ["before"], None)
    single.node.on_keyring_changed = lambda: None  # the worker does not hear of the rotation
    await single.service.rotate_epoch("admin", None)
    answers = await asyncio.gather(*(worker.service.tokenize("p", [f"after-{n}"], None) for n in range(5)))
    assert {json.loads(answer.body)["epoch"] for answer in answers} == {2}
    # One merged call refused for its epoch, then each request sealed by the core in epoch 2.
    assert worker.sealed_calls() == [1, 5]
    assert [method for method, _ in worker.calls].count("tokenize") == 5


async def test_a_failed_call_fails_each_of_its_requests_and_the_next_turn_starts_afresh() -> None:
    sent: list[int] = []

    async def send(principal: str, epoch: int, values: list[str], items: list[list[Any]]) -> Outcome:
        sent.append(len(values))
        if len(sent) == 1:
            raise Overloaded("the core is busy")
        body = {"epoch": epoch, "tokens": [token for token, _ in items]}
        return Outcome(200, json.dumps(body).encode(), False)

    merger = SealedMerger(send, max_items=10)
    first = await asyncio.gather(*(merger.submit("p", 1, [f"v{n}"], [[f"t{n}", b"c"]]) for n in range(3)),
                                 return_exceptions=True)
    assert all(isinstance(answer, Overloaded) for answer in first)
    second = await asyncio.gather(*(merger.submit("p", 1, [f"v{n}"], [[f"t{n}", b"c"]]) for n in range(3)))
    assert [json.loads(answer.body)["tokens"] for answer in second] == [["t0"], ["t1"], ["t2"]]
    assert sent == [3, 3] and (merger.calls, merger.requests) == (2, 6)


async def test_an_answer_that_does_not_name_the_tokens_sent_fails_the_requests() -> None:
    async def send(principal: str, epoch: int, values: list[str], items: list[list[Any]]) -> Outcome:
        return Outcome(200, json.dumps({"epoch": epoch, "tokens": ["someone-else"]}).encode(), False)

    merger = SealedMerger(send, max_items=10)
    with pytest.raises(Unavailable, match="out of shape"):
        await merger.submit("p", 1, ["v"], [["t", b"c"]])


async def test_read_points_go_at_most_max_points_a_call_and_each_gets_its_own_answer() -> None:
    sent: list[int] = []

    async def send(points: list[dict[str, Any]]) -> Any:
        sent.append(len(points))
        # The core's answer for each point: its index, or its own error.
        return [[409, "epoch-changed", "not the active epoch", {}, False] if point["n"] == 3 else [point["n"]]
                for point in points]

    merger = ReadPointMerger(send, max_points=4)
    answers = await asyncio.gather(*(merger.ask({"n": number}) for number in range(10)), return_exceptions=True)
    assert sent == [4, 4, 2]  # one turn, never more than four a call
    assert isinstance(answers[3], EpochChanged)
    assert [answer for number, answer in enumerate(answers) if number != 3] == [0, 1, 2, 4, 5, 6, 7, 8, 9]


async def test_a_read_point_refused_503_comes_back_with_its_retry_after() -> None:
    """The core answers a read point's error with its headers, as a channel failure: a 503's Retry-After
    (every 503 the node answers carries one, docs/api.md) reaches the worker's answer unchanged."""
    async def send(points: list[dict[str, Any]]) -> Any:
        return [[503, "overloaded", "busy", {"Retry-After": "7"}, True] if point["n"] == 1
                else [503, "unavailable", "no headers"] for point in points]

    merger = ReadPointMerger(send, max_points=4)
    busy, malformed = await asyncio.gather(merger.ask({"n": 1}), merger.ask({"n": 2}), return_exceptions=True)
    assert isinstance(busy, Overloaded) and busy.headers["Retry-After"] == "7"
    assert isinstance(malformed, Unavailable) and "out of shape" in malformed.detail


async def test_the_core_answers_a_read_point_error_with_its_headers(single: RunningNode) -> None:
    calls = CoreCalls(single.service, single.node.metrics, lambda: [], max_backup_streams=1)
    calls._read_points_in_flight = 10**6  # past the bound: the whole call is refused, not a point
    with pytest.raises(Overloaded):
        await calls._read_points({"points": [{"kind": "tokenize", "epoch": 1, "items": 1}]})
    calls._read_points_in_flight = 0

    async def refused() -> int:
        raise Unavailable("no quorum")

    calls._read_point = lambda point: refused  # type: ignore[method-assign]
    (answer,) = await calls._read_points({"points": [{"kind": "tokenize"}]})
    assert answer[:3] == [503, "unavailable", "no quorum"] and answer[3]["Retry-After"] == "1"
    assert answer[4] is False  # may still take effect (a read point has none, but the field says so)
