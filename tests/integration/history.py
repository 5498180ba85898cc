"""A record of every client operation in an integration test, and the checks run over it.

Each operation is recorded with its kind, the node (or node list) it was sent
to, when it started and ended (time.monotonic) and its outcome: acknowledged
("ok", with the response), an error answer (with the HTTP status), or unknown
("timeout": the client gave up, so the operation may or may not have taken
effect). Recording is safe from several threads and asyncio tasks at once.

The checks (each returns `Violation`s, so a test can show every problem at once):

- detokenize_on_every_node: every acknowledged tokenize's tokens detokenize to
  their values on every live node (the caller passes one detokenize function
  per node, bound to that node only);
- token_single_value: no token is ever seen with two different values
  (acknowledged tokenizes, detokenize answers, and the final reads);
- value_epoch_single_token: no (value, epoch) pair was answered with two tokens;
- response_single_epoch: every token of a response has the response's epoch
  as its `tv<E>_` prefix, and a response has one token per value;
- client_sequential: one client's operations do not overlap (the per-client
  check below relies on it);
- client_epoch_monotonic: the epochs one client sees never go backwards;
- rotation_epoch_authority: a tokenize that started after a rotation was
  acknowledged has an epoch at least the rotation's;
- linearizable: the whole history against a model of the vault (every token an
  insert-once register, the active epoch a counter), by a Wing-Gong search
  (linearizability.py).

Violation messages never contain a submitted value, only a short fingerprint.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import re
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

TOKEN_PATTERN = re.compile(r"tv([1-9][0-9]*)_([a-z2-7]{26,})\Z")
DETOKENIZE_BATCH_ITEMS = 500
MAX_REPORTED_VIOLATIONS = 20


class Kind(StrEnum):
    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"
    ROTATE = "rotate"


class Status(StrEnum):
    PENDING = "pending"
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation. `inputs` are the values (tokenize) or tokens (detokenize);
    `outputs` the tokens (tokenize) or values (detokenize) of an acknowledged answer."""

    operation_id: int
    client_id: str
    kind: Kind
    node: str
    start_monotonic: float
    inputs: tuple[str, ...] = ()
    end_monotonic: float | None = None
    status: Status = Status.PENDING
    epoch: int | None = None
    outputs: tuple[str | None, ...] = ()
    error_status: int | None = None
    error: str = ""
    answered_by: str = ""  # the node (its URL) that gave an acknowledged answer, when the client said

    @property
    def acknowledged(self) -> bool:
        return self.status is Status.OK

    def describe(self) -> str:
        """A one-line description without any value."""
        timing = f"{self.start_monotonic:.3f}..{'?' if self.end_monotonic is None else f'{self.end_monotonic:.3f}'}"
        outcome = str(self.status)
        if self.status is Status.OK and self.epoch is not None:
            outcome += f" epoch {self.epoch}"
        if self.error_status is not None:
            outcome += f" status {self.error_status}"
        if self.error:
            outcome += f" ({self.error})"
        answered = f" answered by {self.answered_by}" if self.answered_by else ""
        return f"op {self.operation_id} {self.kind} by {self.client_id} via {self.node}{answered} [{timing}] {outcome}"


@dataclass(frozen=True, slots=True)
class Violation:
    check: str
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {self.detail}"


def value_label(value: str) -> str:
    """A short stand-in for a value in messages (the value itself is never shown)."""
    return "value#" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:10]


def token_epoch(token: str) -> int | None:
    """The epoch in a token's `tv<E>_` prefix, or None when it is not of the token grammar."""
    match = TOKEN_PATTERN.match(token) if len(token) <= 128 else None
    return int(match.group(1)) if match else None


class History:
    """A thread-safe, asyncio-safe log of operations (each method holds a lock only briefly)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._operations: dict[int, Operation] = {}
        self._next_id = 1

    def begin(self, client_id: str, kind: Kind | str, node: str, inputs: Iterable[str] = ()) -> int:
        """Record the start of an operation (call it just before sending); returns its id."""
        with self._lock:
            operation_id = self._next_id
            self._next_id += 1
            self._operations[operation_id] = Operation(
                operation_id=operation_id, client_id=client_id, kind=Kind(kind), node=node,
                start_monotonic=self._clock(), inputs=tuple(inputs))
        return operation_id

    def _finish(self, operation_id: int, **changes: object) -> Operation:
        with self._lock:
            operation = self._operations[operation_id]
            if operation.status is not Status.PENDING:
                raise RuntimeError(f"operation {operation_id} was already finished ({operation.status})")
            finished = replace(operation, end_monotonic=self._clock(), **changes)
            self._operations[operation_id] = finished
        return finished

    def ok(self, operation_id: int, *, epoch: int | None = None, outputs: Iterable[str | None] = (),
           answered_by: str = "") -> Operation:
        """The operation was acknowledged with this response (by ``answered_by``, when known)."""
        return self._finish(operation_id, status=Status.OK, epoch=epoch, outputs=tuple(outputs),
                            answered_by=answered_by)

    def error(self, operation_id: int, status: int | None, description: str = "") -> Operation:
        """The node answered with an error status (e.g. 503): not acknowledged."""
        return self._finish(operation_id, status=Status.ERROR, error_status=status, error=description[:200])

    def timeout(self, operation_id: int, description: str = "") -> Operation:
        """No answer (timeout, dropped connection): the outcome is unknown."""
        return self._finish(operation_id, status=Status.TIMEOUT, error=description[:200])

    def operations(self) -> list[Operation]:
        with self._lock:
            return list(self._operations.values())

    def acknowledged(self, kind: Kind | str | None = None) -> list[Operation]:
        wanted = None if kind is None else Kind(kind)
        return [operation for operation in self.operations()
                if operation.acknowledged and (wanted is None or operation.kind is wanted)]

    def acknowledged_tokens(self) -> dict[str, str]:
        """Every token of an acknowledged tokenize, with its value (the first seen if a token repeats)."""
        return acknowledged_token_map(self.operations())

    def summary(self) -> str:
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for operation in self.operations():
            outcome = str(operation.status)
            if operation.error_status is not None or operation.error:
                outcome += f" {operation.error_status or ''} {operation.error}".rstrip()
            counts[(operation.kind, outcome)] += 1
        return ", ".join(f"{kind} {outcome}: {count}" for (kind, outcome), count in sorted(counts.items()))


def acknowledged_token_map(operations: Iterable[Operation]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for operation in operations:
        if operation.acknowledged and operation.kind is Kind.TOKENIZE:
            for value, token in zip(operation.inputs, operation.outputs):
                if token is not None:
                    mapping.setdefault(token, value)
    return mapping


# ---------------------------------------------------------------- checks over the recorded operations


def check_response_single_epoch(operations: Sequence[Operation]) -> list[Violation]:
    violations = []
    for operation in operations:
        if not operation.acknowledged or operation.kind is not Kind.TOKENIZE:
            continue
        if len(operation.outputs) != len(operation.inputs):
            violations.append(Violation("response_single_epoch",
                                        f"{operation.describe()}: {len(operation.outputs)} tokens for "
                                        f"{len(operation.inputs)} values"))
            continue
        epochs = {token_epoch(token) if token is not None else None for token in operation.outputs}
        if epochs != {operation.epoch}:
            shown = sorted(str(epoch) for epoch in epochs)
            violations.append(Violation("response_single_epoch",
                                        f"{operation.describe()}: token epochs {shown} "
                                        f"(None = not a token) in a response of epoch {operation.epoch}"))
    return violations


def check_token_single_value(operations: Sequence[Operation],
                             final_reads: Mapping[str, Mapping[str, str | None]]) -> list[Violation]:
    seen: dict[str, tuple[str, str]] = {}
    violations = []

    def observe(token: str, value: str, source: str) -> None:
        first = seen.setdefault(token, (value, source))
        if first[0] != value:
            violations.append(Violation("token_single_value",
                                        f"{token} is {value_label(first[0])} in {first[1]} but "
                                        f"{value_label(value)} in {source}"))

    for operation in operations:
        if not operation.acknowledged:
            continue
        if operation.kind is Kind.TOKENIZE:
            for value, token in zip(operation.inputs, operation.outputs):
                if token is not None:
                    observe(token, value, f"op {operation.operation_id}")
        elif operation.kind is Kind.DETOKENIZE:
            for token, value in zip(operation.inputs, operation.outputs):
                if value is not None:
                    observe(token, value, f"op {operation.operation_id}")
    for node, reads in final_reads.items():
        for token, value in reads.items():
            if value is not None:
                observe(token, value, f"the final read on {node}")
    return violations


def check_value_epoch_single_token(operations: Sequence[Operation]) -> list[Violation]:
    tokens_by_pair: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)
    for operation in operations:
        if operation.acknowledged and operation.kind is Kind.TOKENIZE and operation.epoch is not None:
            for value, token in zip(operation.inputs, operation.outputs):
                if token is not None:
                    tokens_by_pair[(value, operation.epoch)].setdefault(token, operation.operation_id)
    violations = []
    for (value, epoch), tokens in tokens_by_pair.items():
        if len(tokens) > 1:
            listed = ", ".join(f"{token} (op {operation_id})" for token, operation_id in tokens.items())
            violations.append(Violation("value_epoch_single_token",
                                        f"{value_label(value)} in epoch {epoch} got {len(tokens)} tokens: {listed}"))
    return violations


def _by_client(operations: Sequence[Operation]) -> dict[str, list[Operation]]:
    grouped: dict[str, list[Operation]] = defaultdict(list)
    for operation in operations:
        grouped[operation.client_id].append(operation)
    for client_operations in grouped.values():
        client_operations.sort(key=lambda operation: (operation.start_monotonic, operation.operation_id))
    return grouped


def check_client_sequential(operations: Sequence[Operation]) -> list[Violation]:
    violations = []
    for client_id, client_operations in _by_client(operations).items():
        for earlier, later in zip(client_operations, client_operations[1:]):
            if earlier.end_monotonic is None or earlier.end_monotonic > later.start_monotonic:
                violations.append(Violation("client_sequential",
                                            f"client {client_id}: op {later.operation_id} started before "
                                            f"op {earlier.operation_id} ended"))
    return violations


def check_client_epoch_monotonic(operations: Sequence[Operation]) -> list[Violation]:
    violations = []
    for client_id, client_operations in _by_client(operations).items():
        highest: Operation | None = None
        for operation in client_operations:
            if not operation.acknowledged or operation.epoch is None:
                continue
            if highest is not None and operation.epoch < (highest.epoch or 0):
                violations.append(Violation("client_epoch_monotonic",
                                            f"client {client_id}: {operation.describe()} after op "
                                            f"{highest.operation_id} saw epoch {highest.epoch}"))
            elif highest is None or operation.epoch > (highest.epoch or 0):
                highest = operation
    return violations


def check_rotation_epoch_authority(operations: Sequence[Operation]) -> list[Violation]:
    rotations = sorted((operation for operation in operations
                        if operation.acknowledged and operation.kind is Kind.ROTATE
                        and operation.epoch is not None and operation.end_monotonic is not None),
                       key=lambda operation: operation.end_monotonic or 0.0)
    if not rotations:
        return []
    end_times = [rotation.end_monotonic or 0.0 for rotation in rotations]
    # The strongest rotation acknowledged before each point in time (prefix maximum by epoch).
    strongest: list[Operation] = []
    for rotation in rotations:
        best = strongest[-1] if strongest and (strongest[-1].epoch or 0) >= (rotation.epoch or 0) else rotation
        strongest.append(best)
    violations = []
    for operation in operations:
        if not operation.acknowledged or operation.kind is not Kind.TOKENIZE or operation.epoch is None:
            continue
        count_before = bisect.bisect_left(end_times, operation.start_monotonic)
        if count_before == 0:
            continue
        rotation = strongest[count_before - 1]
        if operation.epoch < (rotation.epoch or 0):
            violations.append(Violation("rotation_epoch_authority",
                                        f"{operation.describe()} started after op {rotation.operation_id} "
                                        f"acknowledged epoch {rotation.epoch}"))
    return violations


def check_final_reads(operations: Sequence[Operation],
                      final_reads: Mapping[str, Mapping[str, str | None]]) -> list[Violation]:
    """Every acknowledged token, read back on every node, has its value."""
    expected = acknowledged_token_map(operations)
    violations = []
    for node, reads in final_reads.items():
        wrong = [token for token, value in expected.items() if reads.get(token) != value]
        if wrong:
            missing = sum(1 for token in wrong if reads.get(token) is None)
            violations.append(Violation("detokenize_on_every_node",
                                        f"{node}: {len(wrong)} of {len(expected)} acknowledged tokens do not "
                                        f"detokenize to their value ({missing} unknown), e.g. {wrong[:3]}"))
    return violations


def check_operations(operations: Sequence[Operation],
                     final_reads: Mapping[str, Mapping[str, str | None]] | None = None) -> list[Violation]:
    """Every check over recorded operations and (optionally) final per-node reads of the acknowledged tokens."""
    reads = final_reads or {}
    return [*check_response_single_epoch(operations), *check_token_single_value(operations, reads),
            *check_value_epoch_single_token(operations), *check_client_sequential(operations),
            *check_client_epoch_monotonic(operations), *check_rotation_epoch_authority(operations),
            *check_final_reads(operations, reads), *_linearizability(operations)]


def _linearizability(operations: Sequence[Operation]) -> list[Violation]:
    from linearizability import check_linearizable  # it builds on this module's types

    return check_linearizable(operations)


# ---------------------------------------------------------------- reading back on every node

Detokenize = Callable[[Sequence[str]], Sequence[str | None]]
AsyncDetokenize = Callable[[Sequence[str]], Awaitable[Sequence[str | None]]]


def _batches(tokens: Sequence[str], size: int) -> list[list[str]]:
    return [list(tokens[start:start + size]) for start in range(0, len(tokens), size)]


def _store_answer(reads: dict[str, str | None], batch: list[str], answer: Sequence[str | None]) -> None:
    if len(answer) != len(batch):
        raise ValueError(f"detokenize answered {len(answer)} values for {len(batch)} tokens")
    reads.update(zip(batch, answer))


def check_history(history: History | Sequence[Operation], detokenizers: Mapping[str, Detokenize],
                  batch_items: int = DETOKENIZE_BATCH_ITEMS) -> list[Violation]:
    """`check_history_async` for plain functions (called where no event loop runs)."""
    def as_async(detokenize: Detokenize) -> AsyncDetokenize:
        async def call(batch):
            return detokenize(batch)
        return call

    return asyncio.run(check_history_async(history, {node: as_async(function) for node, function in detokenizers.items()},
                                           batch_items))


async def check_history_async(history: History | Sequence[Operation], detokenizers: Mapping[str, AsyncDetokenize],
                              batch_items: int = DETOKENIZE_BATCH_ITEMS) -> list[Violation]:
    """Read every acknowledged token back through each node's function, then run every check."""
    operations = history.operations() if isinstance(history, History) else list(history)
    tokens = list(acknowledged_token_map(operations))
    reads: dict[str, dict[str, str | None]] = {}
    failures = []
    for node, detokenize in detokenizers.items():
        reads[node] = {}
        try:
            for batch in _batches(tokens, batch_items):
                _store_answer(reads[node], batch, await detokenize(batch))
        except Exception as error:  # noqa: BLE001 - any failure to read back is a finding, not a crash
            failures.append(Violation("detokenize_on_every_node", f"{node}: read-back failed: "
                                      f"{type(error).__name__}: {str(error)[:200]}"))
            del reads[node]
    return [*failures, *check_operations(operations, reads)]


def format_violations(violations: Sequence[Violation], history: History | None = None) -> str:
    lines = [str(violation) for violation in violations[:MAX_REPORTED_VIOLATIONS]]
    if len(violations) > MAX_REPORTED_VIOLATIONS:
        lines.append(f"... and {len(violations) - MAX_REPORTED_VIOLATIONS} more")
    if history is not None:
        lines.append(f"history: {history.summary()}")
    return "\n".join(lines)


def assert_no_violations(violations: Sequence[Violation], history: History | None = None) -> None:
    if violations:
        raise AssertionError(f"{len(violations)} history violation(s):\n{format_violations(violations, history)}")
