"""Linearizability of a recorded client history against a model of the vault.

The checker is Wing and Gong's search with Lowe's cache (as in Jepsen's Knossos
and Porcupine): repeatedly pick a call that no pending completed call must
precede in real time, apply it to the model, and backtrack on a dead end; a
(linearized set, model state) pair seen before is not searched again. A call
whose outcome is unknown (it timed out, or was answered 503 or by a broken
connection, which the API says may still take effect once) may be linearized
anywhere after it started, with or without its effect, or never.

The vault model is P-compositional (Herlihy and Wing's locality), so each
object is checked alone and the history is linearizable when every object's
is:

- one insert-once register per token: a tokenize acknowledged with token t for
  value v is ``insert(t, v)`` (it succeeds when t is unset or already holds v,
  and never maps t to a second value); a detokenize that answered t with v or
  null is ``read(t) -> v | null``;
- the active epoch, which only grows: an acknowledged rotation to E is
  ``advance() -> E``, an acknowledged tokenize in epoch E is ``read() -> E``;
  rotations the history did not record may happen at any time, so a read of a
  later epoch is allowed and moves it there, but never one of an earlier
  epoch. Only two reads of each epoch can bind (the one that ended first and
  the one that started last, since epoch E holds on one interval of time), so
  only those are searched.

Whether a token is the right function of its value and epoch is a property of
the keys, not of concurrency; history.py checks what it can of it.
"""

from __future__ import annotations

import datetime
import math
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from history import Kind, Operation, Status, Violation, token_epoch, value_label

# Statuses of an error answer after which the request may still take effect (once).
UNKNOWN_OUTCOME_STATUSES = frozenset({None, 500, 502, 503, 504})
MAX_SEARCH_STATES = 200_000


@dataclass(frozen=True, slots=True)
class Call:
    """One call on one object: [start, end] in real time; end None when its outcome is unknown."""

    call_id: int
    start: float
    end: float | None
    operation: Hashable
    output: Hashable = None
    # Where the call came from, for a failure message (a client operation's id and node); not compared.
    source: str = field(default="", compare=False)

    @property
    def unknown(self) -> bool:
        return self.end is None


# step(state, call) -> the states the model may be in after the call (empty: not allowed here).
Step = Callable[[Hashable, Call], Iterable[Hashable]]


class SearchTooLarge(Exception):
    """The search space outgrew MAX_SEARCH_STATES: no verdict (never reported as a violation)."""


def is_linearizable(calls: Sequence[Call], initial: Hashable, step: Step,
                    max_states: int | None = None) -> bool:
    """Whether some order of the calls, consistent with real time, is a run of the model."""
    max_states = MAX_SEARCH_STATES if max_states is None else max_states
    completed = [call for call in calls if not call.unknown]
    seen: set[tuple[frozenset[int], Hashable]] = set()
    stack: list[tuple[frozenset[int], Hashable]] = [(frozenset(), initial)]
    while stack:
        linearized, state = stack.pop()
        remaining = [call for call in completed if call.call_id not in linearized]
        if not remaining:
            return True
        # A call may go next only if no remaining completed call ended before it started.
        deadline = min(call.end for call in remaining if call.end is not None)
        for call in calls:
            if call.call_id in linearized or call.start >= deadline:
                continue
            options = list(step(state, call))
            if call.unknown:
                options.append(state)  # an unknown call may have had no effect
            for next_state in options:
                key = (linearized | {call.call_id}, next_state)
                if key not in seen:
                    if len(seen) >= max_states:
                        raise SearchTooLarge(f"more than {max_states} states")
                    seen.add(key)
                    stack.append(key)
    return False


# ---------------------------------------------------------------- the vault as objects


def register_step(state: Hashable, call: Call) -> list[Hashable]:
    """An insert-once register: ("insert", v) and ("read",) -> v or None."""
    if call.operation == ("read",):
        return [state] if state == call.output else []
    _, value = call.operation  # type: ignore[misc]
    return [value] if state is None or state == value else []


def epoch_step(state: Hashable, call: Call) -> list[Hashable]:
    """The active epoch, which only grows: ("advance",) -> E moves it to E, ("read",) -> E sees E.

    Rotations the history did not record (an operator's, a bootstrap) may
    happen at any time, so a read of a later epoch also moves the state there;
    what can never happen is an epoch going back. An advance of unknown outcome
    moves it one further or not at all."""
    assert isinstance(state, int)
    if call.operation == ("advance",):
        if call.unknown:
            return [state + 1]
        assert isinstance(call.output, int)
        return [call.output] if call.output > state else []
    assert isinstance(call.output, int)
    return [call.output] if call.output >= state else []


def _end(operation: Operation) -> float | None:
    """The end of an operation's interval, or None when its outcome is unknown; raises for no-effect errors."""
    if operation.status is Status.OK:
        return operation.end_monotonic
    if operation.status is Status.TIMEOUT or operation.status is Status.PENDING:
        return None
    if operation.error_status in UNKNOWN_OUTCOME_STATUSES:
        return None
    raise LookupError("an answer that says the request had no effect")


def token_histories(operations: Sequence[Operation]) -> dict[str, list[Call]]:
    """One insert-once register's calls per token seen in an acknowledged answer."""
    calls: dict[str, list[Call]] = defaultdict(list)
    unknown_tokenizes: list[Operation] = []
    values_read: dict[str, set[str]] = defaultdict(set)
    for operation in operations:
        if operation.kind is Kind.TOKENIZE and operation.status is Status.OK:
            for value, token in zip(operation.inputs, operation.outputs):
                if token is not None:
                    calls[token].append(Call(len(calls[token]), operation.start_monotonic, operation.end_monotonic,
                                             ("insert", value), source=_source(operation)))
        elif operation.kind is Kind.TOKENIZE:
            try:
                if _end(operation) is None:
                    unknown_tokenizes.append(operation)
            except LookupError:
                pass
        elif operation.kind is Kind.DETOKENIZE and operation.status is Status.OK:
            for token, value in zip(operation.inputs, operation.outputs):
                calls[token].append(Call(len(calls[token]), operation.start_monotonic, operation.end_monotonic,
                                         ("read",), value, source=_source(operation)))
                if value is not None:
                    values_read[token].add(value)
    # A tokenize whose answer never came may have written any of its values' tokens.
    for token, values in values_read.items():
        for operation in unknown_tokenizes:
            for value in values.intersection(operation.inputs):
                calls[token].append(Call(len(calls[token]), operation.start_monotonic, None, ("insert", value),
                                         source=_source(operation)))
    return dict(calls)


def _source(operation: Operation) -> str:
    answered = f", answered by {operation.answered_by}" if operation.answered_by else ""
    return f"op {operation.operation_id} via {operation.node}{answered}"


MAX_DESCRIBED_CALLS = 40


def describe_calls(calls: Sequence[Call]) -> str:
    """The calls of one object in order of start, times relative to the first, values by label only."""
    ordered = sorted(calls, key=lambda call: call.start)
    origin = ordered[0].start if ordered else 0.0
    # The first call's wall-clock time, to find it in the nodes' logs (the calls' times are monotonic).
    started = datetime.datetime.fromtimestamp(time.time() - (time.monotonic() - origin), datetime.timezone.utc)
    lines = [f"    (times from {started:%H:%M:%S.%f} UTC, when the check runs in the process that recorded them)"]
    for call in ordered[:MAX_DESCRIBED_CALLS]:
        end = "?" if call.end is None else f"{call.end - origin:.3f}"
        if call.operation == ("read",):
            what = f"read -> {'null' if call.output is None else value_label(str(call.output))}"
        else:
            what = f"{call.operation[0]} {value_label(str(call.operation[1]))}"  # type: ignore[index]
        lines.append(f"    [{call.start - origin:.3f}..{end}] {what} ({call.source})")
    if len(ordered) > MAX_DESCRIBED_CALLS:
        lines.append(f"    ... and {len(ordered) - MAX_DESCRIBED_CALLS} more")
    return "\n".join(lines)


def epoch_history(operations: Sequence[Operation]) -> list[Call]:
    """The epoch counter's calls: every rotation, and the two binding reads of each epoch."""
    calls: list[Call] = []
    reads: dict[int, list[Operation]] = defaultdict(list)
    for operation in operations:
        if operation.kind is Kind.ROTATE:
            try:
                end = _end(operation)
            except LookupError:
                continue
            calls.append(Call(len(calls), operation.start_monotonic, end, ("advance",),
                              operation.epoch if end is not None else None))
        elif operation.kind is Kind.TOKENIZE and operation.status is Status.OK and operation.epoch is not None:
            reads[operation.epoch].append(operation)
    for epoch, epoch_reads in sorted(reads.items()):
        ended_first = min(epoch_reads, key=lambda read: read.end_monotonic or math.inf)
        started_last = max(epoch_reads, key=lambda read: read.start_monotonic)
        for read in {ended_first.operation_id: ended_first, started_last.operation_id: started_last}.values():
            calls.append(Call(len(calls), read.start_monotonic, read.end_monotonic, ("read",), epoch))
    return calls


def initial_epoch(operations: Sequence[Operation]) -> int:
    """The epoch active when the history starts, as far as it shows: the smallest one answered, or the
    one before the smallest rotation acknowledged (1 when the history shows neither)."""
    seen = [operation.epoch for operation in operations
            if operation.kind is Kind.TOKENIZE and operation.status is Status.OK and operation.epoch is not None]
    seen += [operation.epoch - 1 for operation in operations
             if operation.kind is Kind.ROTATE and operation.status is Status.OK and operation.epoch is not None]
    return min(seen, default=1)


def check_linearizable(operations: Sequence[Operation]) -> list[Violation]:
    """Every token's register and the epoch counter are linearizable; a violation names the object.

    A search that outgrows MAX_SEARCH_STATES gives no verdict, which is
    reported as a violation of its own (``linearizable-undecided``) rather than
    passed silently; the histories of this suite stay far below it."""
    violations: list[Violation] = []
    for token, calls in sorted(token_histories(operations).items()):
        try:
            if not is_linearizable(calls, None, register_step):
                epoch = token_epoch(token)
                values = sorted({value_label(call.operation[1]) for call in calls if call.operation[0] == "insert"})
                violations.append(Violation("linearizable", f"the calls on one token of epoch {epoch} (values "
                                            f"{values}, {len(calls)} calls) have no linearization:\n"
                                            + describe_calls(calls)))
        except SearchTooLarge:
            violations.append(Violation("linearizable-undecided", f"the search over one token's {len(calls)} calls "
                                        f"outgrew {MAX_SEARCH_STATES} states"))
    epoch_calls = epoch_history(operations)
    try:
        if epoch_calls and not is_linearizable(epoch_calls, initial_epoch(operations), epoch_step):
            violations.append(Violation("linearizable", f"rotations and the epochs tokenizes answered "
                                        f"({len(epoch_calls)} calls) have no linearization"))
    except SearchTooLarge:
        violations.append(Violation("linearizable-undecided", f"the search over the epoch's {len(epoch_calls)} "
                                    f"calls outgrew {MAX_SEARCH_STATES} states"))
    return violations

