"""The channel between a node's core and its HTTP workers (tokenvault.api.channel, remote, core_calls)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import tracemalloc
from types import SimpleNamespace
from typing import Any, cast

import msgpack
import pytest
from structlog.testing import capture_logs

from tokenvault import auth
from node_support import RunningNode, wait_until
from tokenvault.api.channel import (DEFAULT_REQUESTS_IN_FLIGHT, MAX_CONCURRENT_CALLS, MAX_CONTAINER_ITEMS,
                                    MAX_FRAME_ELEMENTS, Channel, ChannelClosed, current_call, decode_message,
                                    max_frame_bytes)
from tokenvault.api import channel as channel_module
from tokenvault.api.core_calls import CoreCalls, merge_expositions
from tokenvault.api.http import HttpLimits
from tokenvault.api.remote import EPOCH_TOPIC, RemoteService, _decode_epoch_keys, decode_key_rows
from tokenvault.crypto.keys import EpochKeys, new_epoch_secret
from tokenvault.config import HttpConfig, LimitsConfig, RateLimitsConfig
from tokenvault.errors import (IdempotencyMismatch, InvalidRequest, Outcome, Overloaded, PayloadTooLarge,
                               RateLimited, ServiceError, Unauthenticated, Unavailable, problem_body_of)
from tokenvault.metrics import Metrics

FRAME_BYTES = 64 * 1024


async def pair(core_handlers: dict[str, Any], worker_handlers: dict[str, Any] | None = None,
               on_push: Any = None) -> tuple[Channel, Channel]:
    core_socket, worker_socket = socket.socketpair()
    core_reader, core_writer = await asyncio.open_unix_connection(sock=core_socket)
    worker_reader, worker_writer = await asyncio.open_unix_connection(sock=worker_socket)
    core = Channel(core_reader, core_writer, handlers=core_handlers, max_frame_bytes=FRAME_BYTES, name="core").start()
    worker = Channel(worker_reader, worker_writer, handlers=worker_handlers or {}, on_push=on_push,
                     max_frame_bytes=FRAME_BYTES, name="worker").start()
    return core, worker


async def test_calls_return_results_and_outcomes_and_errors_come_back_as_their_class() -> None:
    async def echo(arguments: dict[str, Any]) -> Any:
        return arguments["x"]

    async def outcome(arguments: dict[str, Any]) -> Outcome:
        return Outcome(201, b'{"a":1}', True)

    async def mismatch(arguments: dict[str, Any]) -> Any:
        raise IdempotencyMismatch()

    async def limited(arguments: dict[str, Any]) -> Any:
        raise RateLimited("slow down", retry_after_seconds=3)

    core, worker = await pair({"echo": echo, "outcome": outcome, "mismatch": mismatch, "limited": limited})
    assert await worker.call("echo", {"x": [1, "two", b"3", None]}) == [1, "two", b"3", None]
    assert await worker.call("outcome", {}) == Outcome(201, b'{"a":1}', True)
    with pytest.raises(IdempotencyMismatch):
        await worker.call("mismatch", {})
    with pytest.raises(RateLimited) as raised:
        await worker.call("limited", {})
    assert raised.value.headers["Retry-After"] == "3" and raised.value.detail == "slow down"
    with pytest.raises(Unavailable, match="unknown call"):
        await worker.call("no-such-call", {})
    await core.close()
    await worker.close()


async def test_a_503_comes_back_saying_whether_the_request_had_no_effect() -> None:
    """docs/api.md, Errors: a 503 says whether the request certainly had no effect ("effect": "none");
    the worker answers what the core said (before, the channel carried no such field)."""
    async def lost(arguments: dict[str, Any]) -> Any:
        raise Unavailable("the primary changed before the write committed", no_effect=True)

    async def unknown(arguments: dict[str, Any]) -> Any:
        raise Unavailable("not confirmed in time; it may still take effect")

    core, worker = await pair({"lost": lost, "unknown": unknown})
    try:
        for method, no_effect in (("lost", True), ("unknown", False)):
            with pytest.raises(Unavailable) as raised:
                await worker.call(method, {})
            assert raised.value.no_effect is no_effect
            assert json.loads(problem_body_of(raised.value))["effect"] == ("none" if no_effect else "unknown")
    finally:
        await core.close()
        await worker.close()


async def test_a_bug_in_a_handler_is_answered_503_never_left_waiting() -> None:
    async def broken(arguments: dict[str, Any]) -> Any:
        raise KeyError("oops")

    core, worker = await pair({"broken": broken})
    with pytest.raises(Unavailable):
        await asyncio.wait_for(worker.call("broken", {}), 5)
    await core.close()
    await worker.close()


async def test_calls_waiting_when_the_other_side_dies_fail_with_channel_closed() -> None:
    gate = asyncio.Event()

    async def slow(arguments: dict[str, Any]) -> Any:
        await gate.wait()

    core, worker = await pair({"slow": slow})
    waiting = asyncio.create_task(worker.call("slow", {}))
    await asyncio.sleep(0.05)
    await core.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(worker.closed.wait(), 5)
    with pytest.raises(ChannelClosed):
        await worker.call("slow", {})


async def test_a_frame_over_the_bound_closes_the_channel_before_it_is_buffered() -> None:
    core_socket, worker_socket = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=core_socket)
    core = Channel(reader, writer, handlers={}, max_frame_bytes=FRAME_BYTES, name="core").start()
    # Only the length is sent: the channel must refuse it without waiting for the body.
    worker_socket.sendall(struct.pack(">I", FRAME_BYTES + 1))
    await asyncio.wait_for(core.closed.wait(), 5)
    worker_socket.close()


# msgpack's true is an integer to Python: as a kind it read as REPLY, as an id as call 1.
@pytest.mark.parametrize("message", [[], [9, 1], [0, "id", "m", {}], [1], "not an array", [3, 5, None],
                                     [0, True, "m", {}], [True, 1, False, None], [4, False]])
async def test_messages_out_of_shape_close_the_channel(message: object) -> None:
    core_socket, worker_socket = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=core_socket)
    core = Channel(reader, writer, handlers={}, max_frame_bytes=FRAME_BYTES, name="core").start()
    frame = msgpack.packb(message)
    worker_socket.sendall(struct.pack(">I", len(frame)) + frame)
    await asyncio.wait_for(core.closed.wait(), 5)
    worker_socket.close()


async def test_a_call_that_reuses_the_id_of_a_call_still_served_closes_the_channel() -> None:
    """Call ids are the caller's own, and a hostile or buggy worker may send one twice while the first
    is served: the two could no longer be told apart (a CANCEL marked only the later one given up, and
    the first one's end forgot the later one, whose CANCEL then reached nothing). Such a call closes the
    channel, as a frame out of shape does; the calls it was serving see their caller gone."""
    gate = asyncio.Event()
    served: list[Any] = []

    async def slow(arguments: dict[str, Any]) -> Any:
        served.append(current_call())
        await gate.wait()
        return None

    core_socket, worker_socket = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=core_socket)
    core = Channel(reader, writer, handlers={"slow": slow}, max_frame_bytes=FRAME_BYTES, name="core").start()

    def send(message: list[Any]) -> None:
        frame = msgpack.packb(message)
        worker_socket.sendall(struct.pack(">I", len(frame)) + frame)

    try:
        send([0, 7, "slow", {}])
        await wait_until(lambda: served, 5.0, "the first call to be served")
        send([0, 8, "slow", {}])  # another id: served beside it
        await wait_until(lambda: len(served) == 2, 5.0, "the second call to be served")
        assert not core.closed.is_set()
        send([0, 7, "slow", {}])
        await wait_until(core.closed.is_set, 5.0, "the channel to close on an id in use")
        assert len(served) == 2 and all(call.caller_gone for call in served)
    finally:
        gate.set()
        worker_socket.close()
        await core.close()


async def test_the_key_table_push_reaches_the_worker_and_a_malformed_one_refuses_every_runtime_key() -> None:
    service = RemoteService("n1")
    core, worker = await pair({}, on_push=service.on_push)
    row = ["0123456789abcdef", "ci", ["tokenize"], b"s" * 16, b"d" * 32, 5, "admin"]
    core.push("keys", [row])
    await asyncio.wait_for(service.keys_ready.wait(), 5)
    key = service.api_key("0123456789abcdef")
    assert key is not None and key.scopes == frozenset({auth.TOKENIZE}) and key.name == "ci"
    core.push("keys", [row[:3]])  # out of shape: the worker keeps no runtime key rather than a stale table
    await asyncio.sleep(0.1)
    assert service.api_key("0123456789abcdef") is None
    await core.close()
    await worker.close()


def test_the_epoch_push_carries_the_format_key_and_a_malformed_one_leaves_the_core_to_seal() -> None:
    keys = EpochKeys(3, new_epoch_secret())
    token_key, data_key = keys.derived_keys()
    pushed = {"epoch": 3, "token_key": token_key, "data_key": data_key, "format_key": keys.derived_format_key()}
    worker_keys = _decode_epoch_keys(pushed)
    assert worker_keys is not None and worker_keys.seals_formats
    assert worker_keys.seal_format("card", "4111111111111111") == keys.seal_format("card", "4111111111111111")
    assert worker_keys.seal("v") == keys.seal("v")
    # Without a format key (the sealer's keys) only opaque tokens are sealed by the worker.
    opaque_only = _decode_epoch_keys({**pushed, "format_key": None})
    assert opaque_only is not None and not opaque_only.seals_formats
    for bad in (b"short", "text"):
        assert _decode_epoch_keys({**pushed, "format_key": bad}) is None
    assert "format_key" not in repr(worker_keys) and "4111" not in repr(worker_keys)


def test_key_rows_are_checked_field_by_field() -> None:
    with pytest.raises(ValueError):
        decode_key_rows([["id", "name", "tokenize", b"", b"", 0, "x"]])  # scopes not a list
    assert decode_key_rows([]) == {}


def test_each_worker_enforces_its_share_of_the_node_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever this machine's limit on open files (tests/unit/test_serve.py tests that bound).
    monkeypatch.setattr("tokenvault.api.http.connections_allowed", lambda: 1 << 30)
    config = SimpleNamespace(limits=LimitsConfig(),
                             http=HttpConfig(max_connections=1000, max_body_reads=256, max_body_reads_per_key=32,
                                             max_inflight_requests=300, max_backup_streams=2),
                             rate_limits=RateLimitsConfig(tokenize_per_second=100, tokenize_burst=30))
    whole = HttpLimits.from_config(config)
    share = HttpLimits.from_config(config, share=3)
    assert (whole.max_connections, share.max_connections) == (1000, 334)
    assert (whole.max_body_reads, share.max_body_reads) == (256, 86)
    assert (whole.max_body_reads_per_key, share.max_body_reads_per_key) == (32, 11)
    assert (whole.max_inflight_requests, share.max_inflight_requests) == (300, 100)
    # Not shared: on a node of workers the core holds the backup bound for the whole node (CoreCalls).
    assert (whole.max_backup_streams, share.max_backup_streams) == (2, 2)
    assert share.rate_limits["tokenize"].rate_per_second == pytest.approx(100 / 3)
    # Under a low limit on open files each process takes fewer connections than its share.
    monkeypatch.setattr("tokenvault.api.http.connections_allowed", lambda: 100)
    assert HttpLimits.from_config(config, share=3).max_connections == 100
    assert share.rate_limits["tokenize"].burst == pytest.approx(10)
    assert share.rate_limits["detokenize"].unlimited


def test_the_node_exposition_merges_the_core_and_every_worker() -> None:
    core, first, second = Metrics("core"), Metrics("worker"), Metrics("worker")
    core.set_role("primary")
    first.observe_request("/v1/tokenize", "POST", 200, 0.002)
    second.observe_request("/v1/tokenize", "POST", 200, 0.002)
    second.observe_request("/v1/tokenize", "POST", 200, 0.004)
    text = merge_expositions([(None, core.render()[0].decode()), ("1", first.render()[0].decode()),
                              ("2", second.render()[0].decode())]).decode()
    assert 'tokenvault_role{role="primary"} 1.0' in text
    assert 'tokenvault_http_requests_total{method="POST",route="/v1/tokenize",status="200",worker="1"} 1.0' in text
    assert 'tokenvault_http_requests_total{method="POST",route="/v1/tokenize",status="200",worker="2"} 2.0' in text
    assert text.count("# TYPE tokenvault_http_requests_total counter") == 1
    # The core holds no HTTP family and a worker no replication family: nothing is shown twice.
    assert "tokenvault_http_requests" not in core.render()[0].decode()
    assert "tokenvault_commit_index" not in first.render()[0].decode()


@pytest.mark.parametrize("status", [101, 204, 205, 304, 600, -1, True])
async def test_an_outcome_whose_status_cannot_carry_its_body_is_refused_by_the_worker(status: int) -> None:
    """A worker writes its core's Outcome to its client as status and JSON body: a 1xx, 204, 205 or 304
    with a body, or a status no HTTP answer has, would desynchronise the client's connection (the body
    read as the next answer). The worker refuses such an answer as out of shape (its channel closes: the
    call fails 503) instead of passing it on."""
    async def corrupt(arguments: dict[str, Any]) -> Outcome:
        return Outcome(status, b'{"epoch":1,"tokens":[]}', False)

    async def fine(arguments: dict[str, Any]) -> Outcome:
        return Outcome(201, b'{"epoch":2}', False)

    core, worker = await pair({"corrupt": corrupt, "fine": fine})
    try:
        assert await worker.call("fine", {}) == Outcome(201, b'{"epoch":2}', False)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(worker.call("corrupt", {}), 5)
    finally:
        await core.close()
        await worker.close()


@pytest.mark.parametrize("headers", [{"Content-Length": "0"}, {"transfer-encoding": "chunked"},
                                     {"Connection": "keep-alive"}, {"Content-Type": "text/html"},
                                     {"X-Split\r\nContent-Length": "0"}, {"Retry-After": "1\r\nContent-Length: 0"},
                                     {"": "1"}, {"Retry-After": "1" * 2000}])
async def test_a_failure_whose_headers_would_frame_the_http_answer_is_a_plain_503(headers: dict[str, str]) -> None:
    """A worker writes a failure's headers into its HTTP answer, before its own Content-Length: a core's
    failure that names a header the server frames the answer with (a second Content-Length, a
    Transfer-Encoding, ...) or one no header may be would split or desynchronise the client's
    connection. Such a failure is out of shape: the worker answers a plain 503 without its headers, and
    the headers the project's errors carry still pass."""
    async def corrupt(arguments: dict[str, Any]) -> Any:
        raise _with_headers(RateLimited("slow down", retry_after_seconds=2), headers)

    async def challenged(arguments: dict[str, Any]) -> Any:
        raise Unauthenticated("unknown API key", headers={"WWW-Authenticate": 'Bearer realm="tokenvault"'})

    core, worker = await pair({"corrupt": corrupt, "challenged": challenged})
    try:
        with pytest.raises(Unavailable) as refused:
            await asyncio.wait_for(worker.call("corrupt", {}), 5)
        assert not isinstance(refused.value, RateLimited) and refused.value.status == 503
        assert all(refused.value.headers.get(name) != value for name, value in headers.items())
        assert not {name.lower() for name in refused.value.headers} & {"content-length", "transfer-encoding",
                                                                       "connection", "content-type"}
        with pytest.raises(Unauthenticated) as passed:
            await worker.call("challenged", {})
        assert passed.value.headers == {"WWW-Authenticate": 'Bearer realm="tokenvault"'}
    finally:
        await core.close()
        await worker.close()


def _with_headers(error: ServiceError, headers: dict[str, str]) -> ServiceError:
    error.headers.update(headers)
    return error


async def test_a_value_msgpack_cannot_carry_is_a_400_for_a_call_and_a_503_for_an_answer() -> None:
    async def echo(arguments: dict[str, Any]) -> Any:
        return arguments["x"]

    async def huge(arguments: dict[str, Any]) -> Any:
        return 2**70

    core, worker = await pair({"echo": echo, "huge": huge})
    with pytest.raises(InvalidRequest):
        await worker.call("echo", {"x": 2**70})  # a client's integer past 64 bits: its own error
    with pytest.raises(Unavailable) as refused:
        await asyncio.wait_for(worker.call("huge", {}), 5)  # the core's own answer: never left waiting
    assert not isinstance(refused.value, InvalidRequest)
    assert await worker.call("echo", {"x": 7}) == 7  # and the channel goes on
    await core.close()
    await worker.close()


async def test_the_core_renders_the_node_exposition_once_a_period_for_all_its_workers() -> None:
    """Every worker asks its core for each scrape it cannot answer from its own recent copy: with W
    workers a flood reaches the core W times a period, and the core's fan-out to every worker runs once."""
    asked: list[str] = []

    class FakeWorkerChannel:
        def __init__(self, name: str) -> None:
            self.name = name

        async def call(self, method: str, arguments: dict[str, Any]) -> Any:
            asked.append(self.name)
            return Metrics("worker").render()[0].decode()

    service = SimpleNamespace(node=SimpleNamespace(config=SimpleNamespace(limits=None)))
    workers = [("1", FakeWorkerChannel("1")), ("2", FakeWorkerChannel("2"))]
    calls = CoreCalls(cast(Any, service), Metrics("core"), lambda: cast(Any, workers), max_backup_streams=1)
    texts = await asyncio.gather(*(calls.handlers["metrics"]({}) for _ in range(10)))
    assert len(set(texts)) == 1 and 'worker="2"' in texts[0]
    assert sorted(asked) == ["1", "2"]


@pytest.mark.parametrize("garbage", ["not a metric {", 'tokenvault_x{a="1"} not-a-number', 'x{a="1} 1',
                                     "# TYPE x nonsense\nx 1"])
async def test_a_worker_whose_metrics_do_not_parse_is_left_out_of_the_node_exposition(garbage: str) -> None:
    """The core merges every worker's exposition into the node's, which every worker relays: a worker
    (buggy, or compromised) whose text does not parse is left out of it, as a worker that does not answer
    is, and logged by its name and the error's type, never its text; the core's samples and the other
    workers' still come back. On the code before, the parse failed the whole rendering: every worker's
    /metrics answered 503 for as long as that one worker sent it."""
    class FakeWorkerChannel:
        def __init__(self, text: str) -> None:
            self.text = text

        async def call(self, method: str, arguments: dict[str, Any]) -> Any:
            return self.text

    good = Metrics("worker")
    good.observe_request("/v1/tokenize", "POST", 200, 0.002)
    core_metrics = Metrics("core")
    core_metrics.set_role("primary")
    service = SimpleNamespace(node=SimpleNamespace(config=SimpleNamespace(limits=None)))
    workers = [("1", FakeWorkerChannel(garbage)), ("2", FakeWorkerChannel(good.render()[0].decode()))]
    calls = CoreCalls(cast(Any, service), core_metrics, lambda: cast(Any, workers), max_backup_streams=1)
    with capture_logs() as logs:
        text = await calls.handlers["metrics"]({})
    assert 'tokenvault_role{role="primary"} 1.0' in text
    assert 'tokenvault_http_requests_total{method="POST",route="/v1/tokenize",status="200",worker="2"} 1.0' in text
    assert 'worker="1"' not in text
    refused = [entry for entry in logs if entry["event"] == "metrics.worker_exposition_refused"]
    assert [(entry["worker"], entry["log_level"]) for entry in refused] == [("1", "error")]
    assert garbage not in repr(logs)


# --------------------------------------------------------------------------- msgpack bounds

NODE_FRAME_BYTES = max_frame_bytes(LimitsConfig().max_body_bytes)  # a node's channel bound, default limits


def array_header(length: int) -> bytes:
    return b"\xdd" + length.to_bytes(4, "big")


def nested_empty_containers(size: int, empty: bytes) -> bytes:
    """Arrays of 1,024 arrays of 1,024 empty containers (each under every per-container bound), ``size`` bytes."""
    inner = array_header(1024) + empty * 1024
    middle = array_header(1024) + inner * 1024
    count = (size - 5) // len(middle)
    rest = size - 5 - count * len(middle) - 5
    return array_header(count + 1) + middle * count + array_header(rest) + empty * rest


@pytest.mark.parametrize("frame", [
    lambda: array_header(NODE_FRAME_BYTES - 5) + b"\x90" * (NODE_FRAME_BYTES - 5),
    lambda: nested_empty_containers(NODE_FRAME_BYTES, b"\x90"),
    lambda: nested_empty_containers(NODE_FRAME_BYTES, b"\x80"),
], ids=["flat-arrays", "nested-arrays", "nested-maps"])
def test_a_frame_of_the_largest_size_made_of_containers_is_refused_with_bounded_memory(frame: Any) -> None:
    """Without a bound on the whole, 16 MiB of nested empty arrays took about 1 GiB before any check."""
    data = frame()
    assert len(data) == NODE_FRAME_BYTES
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            decode_message(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * NODE_FRAME_BYTES, f"{peak / 2**20:.1f} MiB allocated"


async def test_a_call_of_too_many_nested_arrays_closes_the_channel_before_a_handler_sees_it() -> None:
    calls: list[Any] = []

    async def echo(arguments: dict[str, Any]) -> Any:
        calls.append(arguments)
        return len(arguments["x"])

    core_socket, worker_socket = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=core_socket)
    core = Channel(reader, writer, handlers={"echo": echo}, max_frame_bytes=NODE_FRAME_BYTES, name="core").start()
    # Every array is well under MAX_CONTAINER_ITEMS; together they are past MAX_FRAME_ELEMENTS (about 40 MiB).
    arrays = MAX_FRAME_ELEMENTS // 2048 + 1
    frame = msgpack.packb([0, 1, "echo", {"x": [[[]] * 1024] * arrays}])
    assert len(frame) < NODE_FRAME_BYTES
    await asyncio.to_thread(worker_socket.sendall, struct.pack(">I", len(frame)) + frame)
    await asyncio.wait_for(core.closed.wait(), 5)
    assert calls == []
    worker_socket.close()


def test_the_largest_legitimate_frames_decode_and_a_container_past_the_bound_is_refused() -> None:
    items = MAX_CONTAINER_ITEMS
    sealed_call = [0, 2**63 - 1, "tokenize_sealed", {
        "principal": "p" * 255, "epoch": 2**63 - 1, "values": ["v"] * items,
        "items": [["tv1_" + "t" * 32, b"c" * 17]] * items, "token_format": "opaque", "metadata_json": None,
        "ttl_seconds": None, "metadata": [b"m" * 17] * items}]
    epochs = [1, 2**63 - 1, False, {"active_epoch": items, "epochs": [
        {"epoch": epoch, "created_at": "2026-12-06T10:00:00.000Z", "state": "active"} for epoch in range(items)]}]
    record = {"seq": 1, "at_ms": 2**40, "node": "n1", "key_name": "k", "key_id": None, "action": "detokenize",
              "items": 1, "found": 1, "request_id": "r", "subject": None, "prev_hash": "0" * 64, "hash": "1" * 64}
    audit_page = [1, 3, False, {"records": [record] * 10_000, "last_seq": 10_000, "next_after": None, "anchor": None}]
    for message in (sealed_call, epochs, audit_page):
        frame = msgpack.packb(message, use_bin_type=True)
        assert len(frame) <= NODE_FRAME_BYTES
        assert decode_message(frame) == message
    for past in ([0] * (items + 1), {str(number): 0 for number in range(items + 1)}):
        with pytest.raises(ValueError):
            decode_message(msgpack.packb([1, 1, False, past]))


# --------------------------------------------------------------------------- frame bound, pushes


async def test_plain_tokenizes_merged_in_one_turn_keep_within_the_channel_frame_bound() -> None:
    """Each request fits a channel frame; the worker's merger starts a new call when the next request would
    take its call past the frame bound (not only past max_items), so none of them fails for being merged."""
    frame = 2 * 16 * 1024 + 64 * 1024  # a small bound: 10 requests of 12 KB sealed take about 240 KB
    keys = EpochKeys(1, new_epoch_secret())
    token_key, data_key = keys.derived_keys()
    sizes: list[int] = []

    async def tokenize_sealed(arguments: dict[str, Any]) -> Any:
        sizes.append(len(msgpack.packb(arguments, use_bin_type=True)))
        return Outcome(200, json.dumps({"epoch": 1, "tokens": [t for t, _ in arguments["items"]]}).encode(), False)

    core_socket, worker_socket = socket.socketpair()
    core_reader, core_writer = await asyncio.open_unix_connection(sock=core_socket)
    worker_reader, worker_writer = await asyncio.open_unix_connection(sock=worker_socket)
    service = RemoteService("n1", max_items=1000)
    core = Channel(core_reader, core_writer, handlers={"tokenize_sealed": tokenize_sealed}, max_frame_bytes=frame,
                   name="core").start()
    worker = Channel(worker_reader, worker_writer, handlers={}, on_push=service.on_push, max_frame_bytes=frame,
                     name="worker").start()
    service.channel = worker
    core.push(EPOCH_TOPIC, {"epoch": 1, "token_key": token_key, "data_key": data_key, "format_key": None,
                            "readable": []})
    await asyncio.sleep(0.05)
    requests = [[f"{i}{j}".ljust(4000, "x") for j in range(3)] for i in range(10)]
    try:
        results = await asyncio.gather(*(service.tokenize("p", values, None) for values in requests),
                                       return_exceptions=True)
        assert not [result for result in results if isinstance(result, BaseException)], results
        assert 1 < service.merger.calls < 10 and max(sizes) <= frame
    finally:
        await core.close()
        await worker.close()


async def test_a_detokenize_answer_larger_than_the_old_frame_bound_is_answered_through_a_worker(
        single: RunningNode) -> None:
    """The frame bound covers the largest answer of the limits, not only twice the body: with [limits]
    max_body_bytes = 16 KiB, 30 values of 4,000 bytes written by small requests are read back in one
    detokenize through a worker, as the core alone answers them."""
    frame = max_frame_bytes(16 * 1024, max_items=1000, max_value_bytes=4096)
    values = [f"{i}".ljust(4000, "v") for i in range(30)]
    tokens: list[str] = []
    for start in range(0, 30, 3):  # requests of 12 KB each: within a 16 KiB body
        outcome = await single.service.tokenize("p", values[start:start + 3], None)
        tokens += json.loads(outcome.body)["tokens"]
    calls = CoreCalls(single.service, single.node.metrics, lambda: [], max_backup_streams=1)
    core_socket, worker_socket = socket.socketpair()
    core_reader, core_writer = await asyncio.open_unix_connection(sock=core_socket)
    worker_reader, worker_writer = await asyncio.open_unix_connection(sock=worker_socket)
    core = Channel(core_reader, core_writer, handlers=calls.handlers, max_frame_bytes=frame, name="core").start()
    worker = Channel(worker_reader, worker_writer, handlers={}, max_frame_bytes=frame, name="worker").start()
    try:
        assert await RemoteService(single.node_id, worker).detokenize(tokens) == values
    finally:
        await core.close()
        await worker.close()


async def test_an_answer_over_the_frame_bound_is_a_503_and_a_call_over_it_a_413() -> None:
    async def big(arguments: dict[str, Any]) -> Any:
        return b"x" * FRAME_BYTES

    core, worker = await pair({"big": big})
    try:
        with pytest.raises(Unavailable) as answered:
            await asyncio.wait_for(worker.call("big", {}), 5)
        assert answered.value.status == 503
        with pytest.raises(PayloadTooLarge):
            await worker.call("big", {"x": b"x" * FRAME_BYTES})
    finally:
        await core.close()
        await worker.close()


async def test_pushes_to_a_worker_that_stopped_reading_are_bounded_and_the_newest_arrives_in_order() -> None:
    """A stuck worker (SIGSTOP, a loop held by a long catch-up) gets 200 key-table pushes of 200 KB: the
    core buffers about HOLD_BACK_BYTES and one held push a topic, not 40 MB; once the worker reads again
    it gets the newest table, and an answer sent after a push never arrives before it."""
    core_socket, worker_socket = socket.socketpair()
    core_reader, core_writer = await asyncio.open_unix_connection(sock=core_socket)

    async def answer(arguments: dict[str, Any]) -> Any:
        return "answered"

    core = Channel(core_reader, core_writer, handlers={"answer": answer}, max_frame_bytes=max_frame_bytes(8 << 20),
                   name="core").start()
    row = ["k" * 16, "name", ["tokenize"], b"s" * 16, b"d" * 32, 0, "admin"]
    for number in range(200):  # 200 key changes while the worker is stuck
        core.push("keys", [row] * 2000 + [[str(number)]])
        await asyncio.sleep(0)
    buffered = core_writer.transport.get_write_buffer_size() + sum(map(len, core._outgoing))
    assert buffered < 4 * 1024 * 1024, f"{buffered} bytes buffered for one stuck worker"
    seen: list[Any] = []
    worker_reader, worker_writer = await asyncio.open_unix_connection(sock=worker_socket)
    worker = Channel(worker_reader, worker_writer, handlers={}, on_push=lambda topic, table: seen.append(table[-1]),
                     max_frame_bytes=max_frame_bytes(8 << 20), name="worker").start()
    try:
        assert await asyncio.wait_for(worker.call("answer", {}), 5) == "answered"
        assert seen[-1] == ["199"] and len(seen) < 20  # the newest, before the answer; the held ones merged
    finally:
        await core.close()
        await worker.close()


async def test_a_handler_knows_its_call_and_learns_when_its_caller_gave_it_up() -> None:
    gate = asyncio.Event()
    served: list[Any] = []

    async def slow(arguments: dict[str, Any]) -> Any:
        call = current_call()
        served.append(call)
        await gate.wait()
        return None

    core, worker = await pair({"slow": slow})
    try:
        asking = asyncio.create_task(worker.call("slow", {}))
        await wait_until(lambda: served, 5.0, "the call to be served")
        assert served[0].channel is core and not served[0].caller_gone
        asking.cancel()
        await asyncio.gather(asking, return_exceptions=True)
        await wait_until(lambda: served[0].abandoned, 5.0, "the core to hear the call was given up")
        gate.set()
        closed: list[bool] = []
        core.on_close(lambda: closed.append(True))
    finally:
        await worker.close()
        await core.close()
    assert closed == [True]


async def test_the_calls_a_worker_has_in_flight_in_its_core_are_bounded_in_bytes_past_which_they_are_overloaded(
        ) -> None:
    """docs/security.md: the core holds at most ``max_call_bytes_in_flight`` of one worker's calls it has not
    answered, by default (DEFAULT_REQUESTS_IN_FLIGHT + 1) frame bounds; a call past it is answered 503
    overloaded at once, with no effect, and the channel stays up. Before, the core held up to 4,096 calls
    of a frame each, whatever their size (about 69 GiB at the default limits)."""
    gate = asyncio.Event()
    held: list[int] = []

    async def hold(arguments: dict[str, Any]) -> Any:
        held.append(len(arguments["pad"]))
        await gate.wait()
        return len(arguments["pad"])

    core, worker = await pair({"hold": hold})
    pad = b"x" * (FRAME_BYTES - 1024)  # each call's frame is just under the frame bound
    budget = (DEFAULT_REQUESTS_IN_FLIGHT + 1) * FRAME_BYTES
    sent = budget // len(pad) + 40
    calls: list[asyncio.Task[Any]] = []
    try:
        calls.extend(asyncio.create_task(worker.call("hold", {"pad": pad})) for _ in range(sent))
        await wait_until(lambda: len(held) + sum(call.done() for call in calls) == sent, 10.0,
                         "every call to be held or refused")
        refused = [call.exception() for call in calls if call.done()]
        assert refused and all(isinstance(error, Overloaded) and error.no_effect and "Retry-After" in error.headers
                               for error in refused)
        # Held: the calls that fit the budget, in order, each a frame of the pad and a few bytes of headers.
        assert len(held) * len(pad) <= budget < (len(held) + 1) * (len(pad) + 64)
        assert all(not call.done() for call in calls[:len(held)])
        assert not core.closed.is_set() and not worker.closed.is_set()
        gate.set()
        assert await asyncio.gather(*calls[:len(held)]) == [len(pad)] * len(held)
        assert await worker.call("hold", {"pad": pad}) == len(pad)  # answered calls free their bytes
    finally:
        gate.set()
        await core.close()
        await worker.close()
        await asyncio.gather(*calls, return_exceptions=True)


async def test_calls_past_the_most_a_core_runs_at_once_are_overloaded_and_the_channel_stays_up() -> None:
    """docs/api.md: an overload is 503 "overloaded" (no effect, Retry-After). A call past the
    MAX_CONCURRENT_CALLS a core runs at once for one worker was answered as a plain 503 "unavailable"."""
    gate = asyncio.Event()
    held: list[int] = []

    async def hold(arguments: dict[str, Any]) -> Any:
        held.append(1)
        await gate.wait()
        return 1

    core, worker = await pair({"hold": hold})
    calls = [asyncio.create_task(worker.call("hold", {})) for _ in range(MAX_CONCURRENT_CALLS + 3)]
    try:
        await wait_until(lambda: len(held) + sum(call.done() for call in calls) == len(calls), 10.0,
                         "every call to be held or refused")
        refused = [call.exception() for call in calls if call.done()]
        assert len(held) == MAX_CONCURRENT_CALLS and len(refused) == 3
        assert all(isinstance(error, Overloaded) and error.no_effect for error in refused), refused
        assert not core.closed.is_set() and not worker.closed.is_set()
        gate.set()
        assert sum(await asyncio.gather(*calls[:MAX_CONCURRENT_CALLS])) == MAX_CONCURRENT_CALLS
    finally:
        gate.set()
        await core.close()
        await worker.close()
        await asyncio.gather(*calls, return_exceptions=True)


async def test_a_side_that_sends_calls_it_must_refuse_and_never_reads_is_closed_with_bounded_frames() -> None:
    """A refusal (an overload, an unknown call) does not wait for the socket as an answer does: a worker
    that floods its core with calls and never reads its answers made the core hold a failure frame for each,
    without bound. Past MAX_HELD_FRAMES_WHEN_REFUSING frames held unwritten the core closes the channel
    (channel.refused) instead."""
    core_socket, raw = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=core_socket)
    core = Channel(reader, writer, handlers={}, max_frame_bytes=FRAME_BYTES, name="core").start()
    raw.setblocking(False)
    loop = asyncio.get_running_loop()
    calls = b"".join(struct.pack(">I", len(frame)) + frame
                     for frame in (msgpack.packb([0, call_id, "nothing-here", {}]) for call_id in range(1, 2001)))
    sent = 0
    try:
        while not core.closed.is_set() and sent < 200:  # at most 400,000 calls, each refused
            try:
                await asyncio.wait_for(loop.sock_sendall(raw, calls), 5.0)
            except (BrokenPipeError, ConnectionResetError):
                break  # closed meanwhile
            sent += 1
            held = len(core._outgoing)
            assert held <= channel_module.MAX_HELD_FRAMES_WHEN_REFUSING
        await wait_until(core.closed.is_set, 5.0, "the core to close the channel of a side that does not read")
    finally:
        raw.close()
        await core.close()
