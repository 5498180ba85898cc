"""The linearizability checker on hand-made histories: it accepts what is linearizable and finds what is not.

These run in process (no cluster); the real-process tests run the same checker
over the histories they record (history.check_operations).
"""

from __future__ import annotations

from history import History, Kind, value_label
from linearizability import Call, SearchTooLarge, check_linearizable, is_linearizable, register_step

T1 = "tv1_" + "a" * 32
T2 = "tv2_" + "b" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def at(self, seconds: float) -> "Clock":
        self.now = seconds
        return self


def recorder() -> tuple[History, Clock]:
    clock = Clock()
    return History(clock), clock


def test_a_read_overlapping_the_insert_may_see_either_state() -> None:
    history, clock = recorder()
    write = history.begin("a", Kind.TOKENIZE, "n1", ["v"])
    clock.at(1)
    read_before = history.begin("b", Kind.DETOKENIZE, "n2", [T1])
    clock.at(2)
    history.ok(write, epoch=1, outputs=[T1])
    clock.at(3)
    history.ok(read_before, outputs=[None])
    read_after = history.begin("b", Kind.DETOKENIZE, "n2", [T1])
    clock.at(4)
    history.ok(read_after, outputs=["v"])
    assert check_linearizable(history.operations()) == []


def test_a_read_that_starts_after_the_acknowledgement_and_misses_it_is_found() -> None:
    history, clock = recorder()
    write = history.begin("a", Kind.TOKENIZE, "n1", ["SECRET-VALUE-42"])
    clock.at(1)
    history.ok(write, epoch=1, outputs=[T1])
    clock.at(2)
    stale = history.begin("b", Kind.DETOKENIZE, "n2", [T1])
    clock.at(3)
    history.ok(stale, outputs=[None])
    violations = check_linearizable(history.operations())
    assert [violation.check for violation in violations] == ["linearizable"]
    assert "SECRET-VALUE-42" not in str(violations[0]), "a violation never shows a value"
    # It shows the token's calls in order, each with its operation and node, values by label only.
    lines = str(violations[0]).splitlines()[2:]
    assert [line.split("] ", 1)[1] for line in lines] == [
        f"insert {value_label('SECRET-VALUE-42')} (op {write} via n1)", f"read -> null (op {stale} via n2)"]
    assert lines[0].strip().startswith("[0.000..1.000]") and lines[1].strip().startswith("[2.000..3.000]")


def test_a_value_read_then_lost_is_found_even_when_its_write_had_no_answer() -> None:
    history, clock = recorder()
    write = history.begin("a", Kind.TOKENIZE, "n1", ["v"])  # times out: may or may not have happened
    clock.at(1)
    history.timeout(write)
    first = history.begin("b", Kind.DETOKENIZE, "n2", [T1])
    clock.at(2)
    history.ok(first, outputs=["v"])
    clock.at(3)
    second = history.begin("c", Kind.DETOKENIZE, "n3", [T1])
    clock.at(4)
    history.ok(second, outputs=[None])
    assert len(check_linearizable(history.operations())) == 1
    # The first read alone is fine: the unknown write explains it.
    assert check_linearizable(history.operations()[:2]) == []


def test_a_value_nobody_wrote_is_found() -> None:
    history, clock = recorder()
    read = history.begin("b", Kind.DETOKENIZE, "n2", [T1])
    clock.at(1)
    history.ok(read, outputs=["v"])
    assert len(check_linearizable(history.operations())) == 1


def test_a_tokenize_in_an_old_epoch_after_a_rotation_was_acknowledged_is_found() -> None:
    history, clock = recorder()
    rotate = history.begin("admin", Kind.ROTATE, "n1")
    clock.at(1)
    history.ok(rotate, epoch=2)
    concurrent_old = history.begin("a", Kind.TOKENIZE, "n2", ["w"])
    clock.at(2)
    history.ok(concurrent_old, epoch=2, outputs=[T2])
    assert check_linearizable(history.operations()) == []
    late_old = history.begin("a", Kind.TOKENIZE, "n2", ["v"])
    clock.at(3)
    history.ok(late_old, epoch=1, outputs=[T1])
    assert [violation.check for violation in check_linearizable(history.operations())] == ["linearizable"]


def test_two_values_on_one_token_are_found() -> None:
    calls = [Call(0, 0.0, 1.0, ("insert", "v")), Call(1, 2.0, 3.0, ("insert", "w"))]
    assert not is_linearizable(calls, None, register_step)
    assert is_linearizable(calls[:1] + [Call(1, 0.5, 3.0, ("insert", "v"))], None, register_step)


def test_an_unknown_call_may_be_left_out() -> None:
    calls = [Call(0, 0.0, None, ("insert", "w")), Call(1, 1.0, 2.0, ("read",), None)]
    assert is_linearizable(calls, None, register_step)


def test_a_search_that_outgrows_its_bound_is_reported_not_passed() -> None:
    calls = [Call(number, 0.0, 10.0, ("insert", "v")) for number in range(12)]
    try:
        is_linearizable(calls, None, register_step, max_states=10)
    except SearchTooLarge:
        pass
    else:
        raise AssertionError("twelve concurrent calls need more than ten states")
    history, clock = recorder()
    operations = [history.begin("c", Kind.TOKENIZE, "n1", ["v"]) for _ in range(12)]
    clock.at(10)
    for operation in operations:
        history.ok(operation, epoch=1, outputs=[T1])
    import linearizability
    original, linearizability.MAX_SEARCH_STATES = linearizability.MAX_SEARCH_STATES, 10
    try:
        checks = {violation.check for violation in check_linearizable(history.operations())}
    finally:
        linearizability.MAX_SEARCH_STATES = original
    assert checks == {"linearizable-undecided"}
