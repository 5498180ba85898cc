"""Unit tests of the integration suite's operation history and its checker, on synthetic histories.

Each check is shown passing on a correct history and failing on one built to
break exactly it, so the checker can be seen to bite.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from history import (History, Kind, Status, Violation, assert_no_violations, check_history,  # noqa: E402
                     check_history_async, check_operations, token_epoch, value_label)

SECRET_MARKER = "synthetic-secret-marker"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def at(self, when: float) -> "FakeClock":
        self.now = when
        return self


def token_for(value: str, epoch: int) -> str:
    digest = hashlib.sha256(f"{epoch}/{value}".encode()).digest()[:20]
    return f"tv{epoch}_" + base64.b32encode(digest).decode().lower()


class Builder:
    """Adds finished operations to a History at chosen times."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.history = History(clock=self.clock)

    def tokenize(self, client: str, start: float, end: float, values: Sequence[str], epoch: int,
                 tokens: Sequence[str] | None = None, node: str = "n1") -> int:
        self.clock.at(start)
        operation_id = self.history.begin(client, Kind.TOKENIZE, node, values)
        self.clock.at(end)
        outputs = list(tokens) if tokens is not None else [token_for(value, epoch) for value in values]
        self.history.ok(operation_id, epoch=epoch, outputs=outputs)
        return operation_id

    def rotate(self, client: str, start: float, end: float, epoch: int, acknowledged: bool = True) -> int:
        self.clock.at(start)
        operation_id = self.history.begin(client, Kind.ROTATE, "n1")
        self.clock.at(end)
        if acknowledged:
            self.history.ok(operation_id, epoch=epoch)
        else:
            self.history.timeout(operation_id, "gave up")
        return operation_id

    def detokenize(self, client: str, start: float, end: float, tokens: Sequence[str],
                   values: Sequence[str | None]) -> int:
        self.clock.at(start)
        operation_id = self.history.begin(client, Kind.DETOKENIZE, "n2", tokens)
        self.clock.at(end)
        self.history.ok(operation_id, outputs=values)
        return operation_id

    def failed_tokenize(self, client: str, start: float, end: float, values: Sequence[str], status: int) -> int:
        self.clock.at(start)
        operation_id = self.history.begin(client, Kind.TOKENIZE, "n3", values)
        self.clock.at(end)
        self.history.error(operation_id, status, "service unavailable")
        return operation_id

    def store(self) -> dict[str, str]:
        return self.history.acknowledged_tokens()


def perfect_reads(builder: Builder, nodes: Sequence[str] = ("n1", "n2", "n3")) -> dict:
    store = builder.store()

    def detokenize(tokens: Sequence[str]) -> list[str | None]:
        return [store.get(token) for token in tokens]

    return {node: detokenize for node in nodes}


def checks_of(violations: Sequence[Violation]) -> set[str]:
    return {violation.check for violation in violations}


def correct_history() -> Builder:
    builder = Builder()
    builder.tokenize("c1", 1.0, 1.5, ["a", "b"], epoch=1)
    builder.tokenize("c2", 1.2, 1.6, ["b", "c"], epoch=1)
    builder.rotate("admin", 2.0, 2.5, epoch=2)
    builder.tokenize("c1", 2.2, 2.7, ["a"], epoch=1)          # started before the rotation's ack: may be old
    builder.tokenize("c1", 3.0, 3.2, ["a", "d"], epoch=2)
    builder.tokenize("c2", 3.1, 3.3, ["b"], epoch=2)
    builder.detokenize("c3", 3.5, 3.6, [token_for("a", 1), token_for("zz", 1)], ["a", None])
    builder.failed_tokenize("c3", 4.0, 4.1, ["e"], 503)
    builder.rotate("admin", 5.0, 5.1, epoch=3, acknowledged=False)
    return builder


# ---------------------------------------------------------------- recording


def test_records_times_outcomes_and_refuses_a_second_finish() -> None:
    clock = FakeClock().at(10.0)
    history = History(clock=clock)
    first = history.begin("c1", "tokenize", "n1", ["v"])
    clock.at(10.5)
    history.ok(first, epoch=1, outputs=["tv1_" + "a" * 32])
    second = history.begin("c1", Kind.TOKENIZE, "n2", ["w"])
    clock.at(11.0)
    history.error(second, 503, "no quorum")
    third = history.begin("c2", Kind.DETOKENIZE, "n3", ["tv1_" + "a" * 32])
    history.timeout(third, "timed out")
    fourth = history.begin("c2", Kind.ROTATE, "n1")
    operations = {operation.operation_id: operation for operation in history.operations()}
    assert (operations[first].start_monotonic, operations[first].end_monotonic) == (10.0, 10.5)
    assert operations[first].status is Status.OK and operations[first].acknowledged
    assert operations[second].status is Status.ERROR and operations[second].error_status == 503
    assert operations[third].status is Status.TIMEOUT and not operations[third].acknowledged
    assert operations[fourth].status is Status.PENDING and operations[fourth].end_monotonic is None
    assert [operation.operation_id for operation in history.acknowledged()] == [first]
    assert history.acknowledged(Kind.ROTATE) == []
    assert history.acknowledged_tokens() == {"tv1_" + "a" * 32: "v"}
    with pytest.raises(RuntimeError):
        history.ok(first, epoch=1)
    assert "tokenize ok: 1" in history.summary() and "tokenize error 503 no quorum: 1" in history.summary()


def test_recording_from_many_threads_and_tasks_loses_nothing() -> None:
    history = History()

    def client(number: int) -> None:
        for index in range(200):
            operation_id = history.begin(f"thread-{number}", Kind.TOKENIZE, "n1", [f"{number}-{index}"])
            history.ok(operation_id, epoch=1, outputs=[token_for(f"{number}-{index}", 1)])

    async def task(number: int) -> None:
        for index in range(200):
            operation_id = history.begin(f"task-{number}", Kind.TOKENIZE, "n2", [f"t{number}-{index}"])
            await asyncio.sleep(0)
            history.ok(operation_id, epoch=1, outputs=[token_for(f"t{number}-{index}", 1)])

    async def tasks() -> None:
        await asyncio.gather(*(task(number) for number in range(8)))

    threads = [threading.Thread(target=client, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    asyncio.run(tasks())
    for thread in threads:
        thread.join()
    operations = history.operations()
    assert len(operations) == 3200
    assert len({operation.operation_id for operation in operations}) == 3200
    assert all(operation.acknowledged for operation in operations)
    assert check_operations(operations) == []


# ---------------------------------------------------------------- a correct history passes


def test_a_correct_history_passes_every_check() -> None:
    builder = correct_history()
    assert check_history(builder.history, perfect_reads(builder)) == []


def test_async_read_back_passes_and_fails_like_the_sync_one() -> None:
    builder = correct_history()
    store = builder.store()

    async def good(tokens: Sequence[str]) -> list[str | None]:
        return [store.get(token) for token in tokens]

    async def forgetful(tokens: Sequence[str]) -> list[str | None]:
        return [None for _ in tokens]

    assert asyncio.run(check_history_async(builder.history, {"n1": good, "n2": good})) == []
    violations = asyncio.run(check_history_async(builder.history, {"n1": good, "n2": forgetful}))
    assert checks_of(violations) == {"detokenize_on_every_node"}
    assert "n2" in violations[0].detail and "n1" not in violations[0].detail


def test_read_back_is_batched() -> None:
    builder = Builder()
    builder.tokenize("c1", 1.0, 2.0, [f"value-{index}" for index in range(23)], epoch=1)
    store = builder.store()
    batch_sizes: list[int] = []

    def detokenize(tokens: Sequence[str]) -> list[str | None]:
        batch_sizes.append(len(tokens))
        return [store[token] for token in tokens]

    assert check_history(builder.history, {"n1": detokenize}, batch_items=10) == []
    assert batch_sizes == [10, 10, 3]


# ---------------------------------------------------------------- each check bites


def test_a_token_missing_or_wrong_on_one_node_is_found() -> None:
    builder = correct_history()
    store = builder.store()
    lost = token_for("d", 2)

    def missing_one(tokens: Sequence[str]) -> list[str | None]:
        return [None if token == lost else store[token] for token in tokens]

    def wrong_one(tokens: Sequence[str]) -> list[str | None]:
        return ["other" if token == lost else store[token] for token in tokens]

    violations = check_history(builder.history, {**perfect_reads(builder), "n2": missing_one})
    assert checks_of(violations) == {"detokenize_on_every_node"}
    assert "n2" in violations[0].detail and lost in violations[0].detail and "1 unknown" in violations[0].detail
    violations = check_history(builder.history, {**perfect_reads(builder), "n3": wrong_one})
    assert checks_of(violations) == {"detokenize_on_every_node", "token_single_value"}


def test_a_node_that_cannot_be_read_is_a_violation() -> None:
    builder = correct_history()

    def unreachable(tokens: Sequence[str]) -> list[str | None]:
        raise ConnectionError("refused")

    def short(tokens: Sequence[str]) -> list[str | None]:
        return [None]

    violations = check_history(builder.history, {**perfect_reads(builder), "n1": unreachable, "n3": short})
    assert checks_of(violations) == {"detokenize_on_every_node"}
    assert {violation.detail.split(":")[0] for violation in violations} == {"n1", "n3"}


def test_one_token_with_two_values_is_found() -> None:
    builder = Builder()
    shared = token_for("x", 1)
    builder.tokenize("c1", 1.0, 1.1, ["x"], epoch=1, tokens=[shared])
    builder.tokenize("c2", 1.0, 1.1, ["y"], epoch=1, tokens=[shared])
    assert "token_single_value" in checks_of(check_operations(builder.history.operations()))


def test_a_detokenize_answer_contradicting_a_tokenize_is_found() -> None:
    builder = Builder()
    builder.tokenize("c1", 1.0, 1.1, ["x"], epoch=1)
    builder.detokenize("c2", 2.0, 2.1, [token_for("x", 1)], ["not-x"])
    # The linearizability check finds it too: the token's register held "x" when "not-x" was read.
    assert checks_of(check_operations(builder.history.operations())) == {"token_single_value", "linearizable"}


def test_one_value_with_two_tokens_in_one_epoch_is_found() -> None:
    builder = Builder()
    builder.tokenize("c1", 1.0, 1.1, ["x"], epoch=1)
    builder.tokenize("c2", 1.0, 1.1, ["x"], epoch=1, tokens=[token_for("x-but-different", 1)])
    builder.tokenize("c3", 1.0, 1.1, ["x"], epoch=2)  # another epoch may give another token
    violations = check_operations(builder.history.operations())
    assert checks_of(violations) == {"value_epoch_single_token"}
    assert len(violations) == 1 and "epoch 1" in violations[0].detail


def test_a_response_mixing_epochs_is_found() -> None:
    builder = Builder()
    builder.tokenize("c1", 1.0, 1.1, ["x", "y"], epoch=2, tokens=[token_for("x", 2), token_for("y", 1)])
    assert checks_of(check_operations(builder.history.operations())) == {"response_single_epoch"}


def test_tokens_whose_prefix_differs_from_the_response_epoch_are_found() -> None:
    builder = Builder()
    builder.tokenize("c1", 1.0, 1.1, ["x"], epoch=2, tokens=[token_for("x", 1)])
    builder.tokenize("c2", 1.0, 1.1, ["y"], epoch=1, tokens=["not-a-token"])
    builder.tokenize("c3", 1.0, 1.1, ["z", "w"], epoch=1, tokens=[token_for("z", 1)])
    violations = check_operations(builder.history.operations())
    assert checks_of(violations) == {"response_single_epoch"}
    assert len(violations) == 3


def test_epochs_going_backwards_for_one_client_are_found() -> None:
    builder = Builder()
    builder.tokenize("c1", 1.0, 1.1, ["x"], epoch=2)
    builder.tokenize("c1", 2.0, 2.1, ["y"], epoch=1)
    builder.tokenize("c2", 1.0, 1.1, ["z"], epoch=1)  # another client may still see epoch 1 ...
    builder.tokenize("c2", 2.0, 2.1, ["w"], epoch=2)  # ... and then 2
    violations = check_operations(builder.history.operations())
    assert checks_of(violations) == {"client_epoch_monotonic", "linearizable"}  # epochs never go back
    assert "client c1" in violations[0].detail


def test_a_rotation_seen_by_a_client_counts_for_its_later_tokenizes() -> None:
    builder = Builder()
    builder.rotate("c1", 1.0, 1.1, epoch=3)
    builder.tokenize("c1", 2.0, 2.1, ["x"], epoch=2)
    assert {"client_epoch_monotonic", "rotation_epoch_authority"} <= checks_of(
        check_operations(builder.history.operations()))


def test_overlapping_operations_of_one_client_are_found() -> None:
    builder = Builder()
    builder.tokenize("c1", 1.0, 2.0, ["x"], epoch=1)
    builder.tokenize("c1", 1.5, 2.5, ["y"], epoch=1)
    assert checks_of(check_operations(builder.history.operations())) == {"client_sequential"}


def test_a_tokenize_started_after_a_rotation_ack_in_an_older_epoch_is_found() -> None:
    builder = Builder()
    builder.rotate("admin", 1.0, 2.0, epoch=2)
    builder.tokenize("c1", 1.5, 2.5, ["x"], epoch=1)  # started before the ack: allowed
    builder.tokenize("c2", 2.0, 2.5, ["y"], epoch=1)  # started exactly at the ack: allowed (not after)
    late = builder.tokenize("c3", 2.1, 2.6, ["z"], epoch=1)
    builder.tokenize("c4", 2.1, 2.6, ["w"], epoch=2)
    violations = check_operations(builder.history.operations())
    assert checks_of(violations) == {"rotation_epoch_authority", "linearizable"}
    authority = [violation for violation in violations if violation.check == "rotation_epoch_authority"]
    assert len(authority) == 1 and f"op {late} " in authority[0].detail


def test_the_newest_acknowledged_rotation_is_the_bar() -> None:
    builder = Builder()
    builder.rotate("admin", 1.0, 1.1, epoch=2)
    builder.rotate("admin", 2.0, 2.1, epoch=3)
    builder.rotate("other-admin", 2.0, 2.2, epoch=2)  # a replayed rotation answer with an older epoch
    builder.tokenize("c1", 3.0, 3.1, ["x"], epoch=2)
    violations = check_operations(builder.history.operations())
    assert checks_of(violations) == {"rotation_epoch_authority", "linearizable"}
    assert "epoch 3" in violations[0].detail


def test_unacknowledged_operations_do_not_count() -> None:
    builder = Builder()
    builder.rotate("admin", 1.0, 1.1, epoch=5, acknowledged=False)
    builder.failed_tokenize("c1", 2.0, 2.1, ["x"], 503)
    builder.tokenize("c1", 3.0, 3.1, ["x"], epoch=1)
    assert check_history(builder.history, perfect_reads(builder)) == []


def test_violations_never_show_a_value() -> None:
    builder = Builder()
    shared = token_for(SECRET_MARKER, 1)
    builder.tokenize("c1", 1.0, 1.1, [SECRET_MARKER], epoch=1, tokens=[shared])
    builder.tokenize("c2", 1.0, 1.1, [SECRET_MARKER + "-2"], epoch=1, tokens=[shared])
    builder.tokenize("c3", 1.0, 1.1, [SECRET_MARKER], epoch=1, tokens=[token_for("other", 1)])

    def wrong(tokens: Sequence[str]) -> list[str | None]:
        return [SECRET_MARKER + "-3" for _ in tokens]

    violations = check_history(builder.history, {"n1": wrong})
    assert checks_of(violations) >= {"token_single_value", "value_epoch_single_token", "detokenize_on_every_node"}
    with pytest.raises(AssertionError) as raised:
        assert_no_violations(violations, builder.history)
    assert SECRET_MARKER not in str(raised.value)
    assert value_label(SECRET_MARKER) in str(raised.value)


def test_token_epoch_reads_only_the_token_grammar() -> None:
    assert token_epoch(token_for("x", 12)) == 12
    assert token_epoch("tv0_" + "a" * 32) is None
    assert token_epoch("tv1_" + "A" * 32) is None
    assert token_epoch("tv1_" + "a" * 25) is None
    assert token_epoch("tv1_" + "a" * 200) is None


def test_assert_no_violations_passes_quietly_when_clean() -> None:
    assert_no_violations([])
    reads: Mapping[str, Mapping[str, str | None]] = {"n1": {}}
    assert check_operations([], reads) == []
